//! The seed tool's traces and ours, each in the other's hands, with the seed tool's own
//! code (reflex-vla 0.11.2 from PyPI, run by `tests/seed_traces/seed_tool.py`):
//! traces its `RecordWriter` writes replay against the real `reflex serve` in full and
//! hash_only modes; traces `reflex serve` records are read by its `load_reader` and fed to
//! its A2C2 batch builder.
//!
//! The seed tool is installed by `deploy/ci-setup.sh` (with `--no-deps`, into a folder of
//! its own: `$REFLEX_SEED_TOOL_DIR`, by default `~/.cache/reflex-ci/reflex-vla-0.11.2`);
//! a missing install fails the test and says so.

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use util::*;

/// Runs `seed_tool.py ARGS` with the seed tool on PYTHONPATH; its stdout.
fn seed_tool(args: &[&str]) -> String {
    let dir = seed_tool_dir();
    assert!(
        dir.join("reflex/runtime/record.py").is_file()
            && dir.join("reflex_vla-0.11.2.dist-info").is_dir(),
        "the seed tool (reflex-vla 0.11.2) is not installed in {}: run `bash deploy/ci-setup.sh`",
        dir.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seed_traces/seed_tool.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .env("PYTHONPATH", &dir)
        .output()
        .expect("python3 must be installed (deploy/ci-setup.sh)");
    assert!(
        out.status.success(),
        "seed_tool.py {args:?} failed (a module missing? run `bash deploy/ci-setup.sh`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `reflex replay ARGS --output REPORT`: exit code, stdout, and the JSON report.
fn replay(dir: &Path, args: &[&str]) -> (i32, String, serde_json::Value) {
    let report = dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let out = Command::new(BIN)
        .arg("replay")
        .args(args)
        .arg("--output")
        .arg(&report)
        .output()
        .unwrap();
    let text = format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&report).unwrap_or_else(|e| panic!("no report ({e}):\n{text}")),
    )
    .unwrap();
    (out.status.code().unwrap_or(-1), text, report)
}

async fn model_hash(target: &str) -> String {
    let mut c = policy_client(target).await;
    timeout(c.get_model_info(reflex_proto::v1::GetModelInfoRequest {}))
        .await
        .unwrap()
        .into_inner()
        .model_hash
}

#[tokio::test(flavor = "multi_thread")]
async fn genuine_seed_traces_replay_in_full_and_hash_only_modes() {
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().join("export");
    export(&export_dir, 0);
    let frames_dir = dir.path().join("frames");
    let empty_dir = dir.path().join("empty");
    std::fs::create_dir_all(&frames_dir).unwrap();
    std::fs::create_dir_all(&empty_dir).unwrap();
    let frames: Vec<String> = (0..4u8)
        .map(|i| {
            let p = frames_dir.join(format!("frame{i}.jpg"));
            std::fs::write(&p, jpeg(i * 40)).unwrap();
            p.to_str().unwrap().to_string()
        })
        .collect();

    let (_server, sock) = serve(dir.path(), &export_dir, &[]).await;
    let target = format!("unix://{}", sock.display());
    let hash = model_hash(&target).await;
    let write = |mode: &str, state_len: &str| {
        let out = dir.path().join(format!("seed-{mode}-{state_len}"));
        let mut args = vec!["write", out.to_str().unwrap(), mode, &hash, state_len];
        args.extend(frames.iter().map(String::as_str));
        PathBuf::from(seed_tool(&args).trim())
    };

    // Full: the images are in the trace, hashed the seed's way (over the base64 text).
    let full = write("full", "8");
    let first: serde_json::Value =
        serde_json::from_str(trace_text(&full).lines().nth(1).unwrap()).unwrap();
    assert_eq!(first["request"]["image_sha256"].as_str().unwrap().len(), 16);
    let (code, out, report) = replay(dir.path(), &[full.to_str().unwrap(), "--target", &target]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["summary"]["replayed"], 4, "{out}");
    assert_eq!(report["summary"]["target_errors"], 0, "{out}");
    assert!(out.contains("providers: CPUExecutionProvider"), "{out}");
    assert!(out.contains("dropped_requests=unknown"), "{out}");
    assert!(report["error"].is_null(), "{report}");

    // hash_only: nothing to send without the frames, with `error` saying so.
    let hashed = write("hash_only", "8");
    let h = hashed.to_str().unwrap();
    let (code, out, report) = replay(dir.path(), &[h, "--target", &target]);
    assert_eq!(code, 1, "{out}");
    assert!(
        report["error"].as_str().unwrap().contains("--image-dir"),
        "{report}"
    );
    // With the folder of original frames, found by the seed's hash.
    let frames_arg = frames_dir.to_str().unwrap();
    let (code, out, report) = replay(
        dir.path(),
        &[h, "--target", &target, "--image-dir", frames_arg],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["summary"]["replayed"], 4, "{out}");
    assert_eq!(report["summary"]["target_errors"], 0, "{out}");
    // With a folder that lacks them: exit 1, and the report says why.
    let (code, out, report) = replay(
        dir.path(),
        &[
            h,
            "--target",
            &target,
            "--image-dir",
            empty_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("none of its 4 records were found under --image-dir"),
        "{report}"
    );

    // Calls that succeeded when recorded fail on a model that takes 8 state values: exit 2,
    // and the report's `error` says so although nothing was thrown.
    let short = write("full", "3");
    let (code, out, report) = replay(dir.path(), &[short.to_str().unwrap(), "--target", &target]);
    assert_eq!(code, 2, "{out}");
    assert_eq!(
        report["error"], "4 calls that succeeded when recorded failed on the target",
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn our_traces_are_read_by_the_seed_tools_reader_and_a2c2_trainer() {
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().join("export");
    export(&export_dir, 0);
    let traces = dir.path().join("traces");
    let (mut server, sock) = serve(
        dir.path(),
        &export_dir,
        &["--record", traces.to_str().unwrap()],
    )
    .await;
    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    let mut action_sum = 0f64;
    for i in 0..3u8 {
        let mut req = act_request(i * 30, Some(u64::from(i)));
        if i == 1 {
            req.instruction.clear();
        }
        let r = timeout(c.act(req)).await.unwrap().into_inner();
        action_sum += r.actions.iter().map(|&a| f64::from(a)).sum::<f64>();
    }
    // Two failed calls: a wrong state length; no state and no instruction.
    let mut bad = act_request(1, Some(7));
    bad.state.truncate(3);
    assert!(timeout(c.act(bad)).await.is_err());
    let mut bare = act_request(2, Some(8));
    bare.state.clear();
    bare.instruction.clear();
    assert!(timeout(c.act(bare)).await.is_err());
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).unwrap().success());
    let trace = trace_files(&traces).pop().expect("a trace was written");

    let out = seed_tool(&["read", trace.to_str().unwrap(), "7", "8", "50"]);
    let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["providers"], serde_json::json!(["cpu"]), "{got}");
    assert_eq!(got["records"], 5, "{got}");
    assert_eq!(
        got["errors"],
        serde_json::json!(["invalid-argument", "invalid-argument"]),
        "{got}"
    );
    assert_eq!(
        got["instructions"],
        serde_json::json!([
            "pick up the red cup",
            "",
            "pick up the red cup",
            "pick up the red cup",
            ""
        ]),
        "{got}"
    );
    assert_eq!(got["states"], serde_json::json!([8, 8, 8, 3, 0]), "{got}");
    assert_eq!(
        got["stage_names"],
        serde_json::json!([
            "decode_ms",
            "denoise_ms",
            "postprocess_ms",
            "prefix_ms",
            "queue_ms"
        ]),
        "{got}"
    );
    let sum = got["action_sum"].as_f64().unwrap();
    assert!(
        (sum - action_sum).abs() <= 1e-6 * action_sum.abs().max(1.0),
        "the seed's reader sums {sum}, the clients got {action_sum}"
    );
    assert_eq!(got["footer"]["total_requests"], 5, "{got}");
    assert_eq!(got["batch_shape"], serde_json::json!([150, 48]), "{got}");
    assert_eq!(got["batch_finite"], true, "{got}");
}
