//! `reflex replay` as a real process against real traces, and the README's
//! grpcurl recipe with the real grpcurl.

mod util;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use util::*;

/// Records `calls` Act calls through `reflex serve --record` and returns the trace.
async fn record_trace(dir: &Path, export_dir: &Path, mode: &str, calls: usize) -> PathBuf {
    let traces = dir.join(format!("traces-{mode}"));
    let sdir = dir.join(format!("rec-{mode}"));
    std::fs::create_dir_all(&sdir).unwrap();
    let (mut p, sock) = serve(
        &sdir,
        export_dir,
        &[
            "--record",
            traces.to_str().unwrap(),
            "--record-images",
            mode,
        ],
    )
    .await;
    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    for i in 0..calls {
        // Fresh seeds (none sent): replay must send back the recorded one.
        timeout(c.act(act_request((i % 4) as u8 * 20, None)))
            .await
            .unwrap();
    }
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(5)).unwrap().success());
    trace_files(&traces).pop().expect("trace written")
}

fn replay(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).arg("replay").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn same_model_replays_bit_exactly_other_model_fails_actions() {
    let dir = tempfile::tempdir().unwrap();
    let (exp0, exp1) = (dir.path().join("export0"), dir.path().join("export1"));
    export(&exp0, 0);
    export(&exp1, 1);
    let trace = record_trace(dir.path(), &exp0, "full", 6).await;
    let t = trace.to_str().unwrap();

    let (code, out, err) = replay(&[t, "--model", exp0.to_str().unwrap(), "--diff", "all"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(
        out.matches("cos=1.000000 max_abs=0.00e+00 [PASS]").count(),
        6,
        "{out}"
    );
    assert!(out.contains("actions: 6/6 pass"), "{out}");
    assert!(
        out.contains("model_hash:") && out.contains("embodiment:"),
        "{out}"
    );

    let (code, out, err) = replay(&[t, "--model", exp1.to_str().unwrap()]);
    assert_eq!(
        code, 0,
        "a failing diff without --fail-on still exits 0: {out}{err}"
    );
    assert!(out.contains("actions: 0/6 pass"), "{out}");
    assert!(
        format!("{out}{err}").to_lowercase().contains("model_hash"),
        "a loud model_hash warning: {out}{err}"
    );
    let (code, out, _) = replay(&[t, "--model", exp1.to_str().unwrap(), "--fail-on", "actions"]);
    assert_eq!(code, 3, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn trace_errors_exit_1_and_target_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let trace = record_trace(dir.path(), &exp, "full", 3).await;
    let model = exp.to_str().unwrap();

    let (code, _, err) = replay(&[
        dir.path().join("missing.jsonl.gz").to_str().unwrap(),
        "--model",
        model,
    ]);
    assert_eq!(code, 1, "{err}");

    let text = trace_text(&trace);
    let lines: Vec<&str> = text.lines().collect();
    let write = |name: &str, content: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p
    };
    let v2 = write(
        "v2.jsonl",
        text.replace("\"schema_version\":1", "\"schema_version\":2"),
    );
    let (code, _, err) = replay(&[v2.to_str().unwrap(), "--model", model]);
    assert_eq!(code, 1);
    assert!(
        err.contains("schema_version") || err.contains("version 2"),
        "{err}"
    );

    let headless = write("headless.jsonl", lines[1..].join("\n") + "\n");
    let (code, _, err) = replay(&[headless.to_str().unwrap(), "--model", model]);
    assert_eq!(code, 1);
    assert!(err.to_lowercase().contains("header"), "{err}");

    let mut broken: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
    broken[2] = "{\"kind\":\"request\", this is not json".into();
    let malformed = write("malformed.jsonl", broken.join("\n") + "\n");
    let (code, _, err) = replay(&[malformed.to_str().unwrap(), "--model", model]);
    assert_eq!(code, 1);
    assert!(err.contains("line 3"), "the message names the line: {err}");

    // A crash-cut trace replays up to its last whole line, with a warning.
    let cut = write(
        "cut.jsonl",
        format!(
            "{}\n{}\n{}",
            lines[0],
            lines[1],
            &lines[2][..lines[2].len() / 2]
        ),
    );
    let (code, out, err) = replay(&[cut.to_str().unwrap(), "--model", model]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("actions: 1/1 pass"), "{out}");
    assert!(format!("{out}{err}").contains("truncated"), "{out}{err}");

    // Exit 2: nobody listens at the target; the model folder is not an export.
    let (code, _, err) = replay(&[
        trace.to_str().unwrap(),
        "--target",
        &format!("unix://{}", dir.path().join("nobody.sock").display()),
    ]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = replay(&[
        trace.to_str().unwrap(),
        "--model",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hash_only_trace_replays_with_image_dir_and_refuses_without() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let trace = record_trace(dir.path(), &exp, "hash_only", 4).await;
    let t = trace.to_str().unwrap();
    let (code, _, err) = replay(&[t, "--model", exp.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--image-dir") && err.contains("--no-replay"),
        "{err}"
    );

    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for shade in [0u8, 20, 40, 60] {
        std::fs::write(images.join(format!("frame-{shade}.jpg")), jpeg(shade)).unwrap();
    }
    let report = dir.path().join("report.json");
    let (code, out, err) = replay(&[
        t,
        "--model",
        exp.to_str().unwrap(),
        "--image-dir",
        images.to_str().unwrap(),
        "--output",
        report.to_str().unwrap(),
        "--n",
        "3",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("max_abs=0.00e+00 [PASS]").count(), 3, "{out}");
    let r: serde_json::Value = serde_json::from_str(&read_to_string(&report)).unwrap();
    assert_eq!(r["requests"].as_array().unwrap().len(), 3);
    assert_eq!(r["exit_code"], 0);
    for key in ["trace", "header", "summary"] {
        assert!(r.get(key).is_some(), "report lacks {key}: {r}");
    }

    let (code, out, _) = replay(&[t, "--no-replay"]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_grpcurl_recipe_replays_a_trace_line_with_the_same_actions() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let trace = record_trace(dir.path(), &exp, "full", 2).await;
    let (_p, sock) = serve(dir.path(), &exp, &[]).await;
    // The recipe from the README, verbatim apart from the paths.
    let recipe = format!(
        "zcat {trace} | jq -c 'select(.kind == \"request\" and .seq == 1) | .request' \
         | grpcurl -plaintext -unix -d @ {sock} reflex.v1.Policy/Act",
        trace = trace.display(),
        sock = sock.display()
    );
    let out = Command::new("bash")
        .args(["-o", "pipefail", "-c", &recipe])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "recipe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let recorded = trace_lines(&trace)
        .into_iter()
        .find(|l| l["kind"] == "request" && l["seq"] == 1)
        .unwrap();
    let want: Vec<f32> = recorded["response"]["actions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    let got: Vec<f32> = replayed["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(got.len(), 350);
    assert_eq!(
        got, want,
        "grpcurl replay of the recorded request gives the recorded actions"
    );
}
