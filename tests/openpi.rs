//! openpi's websocket policy protocol (`reflex serve --openpi-listen`) against the real
//! `reflex serve` on the reference model, driven by openpi's own client:
//! `openpi_client.websocket_client_policy.WebsocketClientPolicy` and `ActionChunkBroker`
//! (openpi-client 0.1.2 from PyPI, with msgpack and websockets), through
//! `tests/frontends/drive_openpi.py`.
//!
//! openpi-client and its dependencies are installed by `deploy/ci-setup.sh`; a missing one
//! fails the test and says so.

mod util;

use std::path::Path;
use std::process::Command;

use reflex_proto::v1 as pb;
use util::*;

/// Runs `drive_openpi.py ARGS`; its stdout as JSON.
fn drive_openpi(args: &[&str], envs: &[(&str, &Path)]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/frontends/drive_openpi.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("python3 must be installed (deploy/ci-setup.sh)");
    assert!(
        out.status.success(),
        "drive_openpi.py {args:?} failed (openpi-client, msgpack or websockets missing? run \
         `bash deploy/ci-setup.sh`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The (host, port) `reflex serve` logged for `--openpi-listen`.
fn openpi_addr(p: &Proc) -> (String, String) {
    let addr = logged_addr(p, "listen=ws://");
    let (host, port) = addr.rsplit_once(':').unwrap();
    (host.to_string(), port.to_string())
}

fn actions(v: &serde_json::Value) -> Vec<f32> {
    v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn openpi_client_drives_openpi_listen_equal_to_grpc_and_every_call_replays_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().join("export");
    export(&export_dir, 0);
    let token = write_secret(dir.path(), "token", b"openpi-token-0123456789abcdef0123");
    let traces = dir.path().join("traces");
    let (server, sock) = serve(
        dir.path(),
        &export_dir,
        &[
            "--openpi-listen",
            "127.0.0.1:0",
            "--auth-token-file",
            token.to_str().unwrap(),
            "--record",
            traces.to_str().unwrap(),
            "--record-images",
            "full",
        ],
    )
    .await;
    let (host, port) = openpi_addr(&server);
    let frame = dir.path().join("frame.rgb");
    let got = drive_openpi(
        &[
            "drive",
            &host,
            &port,
            "openpi-token-0123456789abcdef0123",
            frame.to_str().unwrap(),
        ],
        &[],
    );
    // The metadata frame on connect.
    let md = &got["metadata"];
    assert_eq!(md["server"], "reflex", "{got}");
    assert_eq!(
        (md["action_horizon"].as_u64(), md["action_dim"].as_u64()),
        (Some(50), Some(7))
    );
    assert_eq!(md["cameras"], serde_json::json!(["base", "wrist"]));
    assert_eq!(
        md["observation_keys"]["cameras"],
        serde_json::json!(["observation/image", "observation/wrist_image"])
    );
    // Actions as openpi's answer has them: an ndarray (50, 7) of float32.
    for call in ["hwc", "chw", "minimal"] {
        let c = &got[call];
        assert_eq!(
            (c["type"].as_str(), c["dtype"].as_str()),
            (Some("ndarray"), Some("float32")),
            "{call}: {got}"
        );
        assert_eq!(c["shape"], serde_json::json!([50, 7]), "{call}");
        assert!(c["policy_timing"]["infer_ms"].as_f64().unwrap() > 0.0);
        assert!(c["server_timing"]["infer_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(c["reflex"]["recorded"], true);
    }
    assert!(got["hwc"]["server_timing"]["prev_total_ms"].is_null());
    assert!(
        got["chw"]["server_timing"]["prev_total_ms"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    // The same pixels HWC or CHW, the same seed: the same actions, bit for bit.
    assert_eq!(got["hwc"]["reflex"]["noise_seed"], 7);
    assert_eq!(actions(&got["hwc"]), actions(&got["chw"]));
    // The broker: ten steps of one chunk, then the next chunk.
    let b = &got["broker"];
    assert_eq!(b["shapes"].as_array().unwrap().len(), 12);
    assert!(
        b["shapes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| *s == serde_json::json!([7]))
    );
    let seqs: Vec<u64> = b["seqs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [[3; 10].as_slice(), &[4, 4]].concat(), "{b}");
    for refused in ["no_token", "wrong_token"] {
        assert_eq!(got[refused]["status"], 401, "{refused}: {got}");
        assert!(!got[refused].to_string().contains("openpi-token-0123"));
    }

    // gRPC Act with the same pixels (as a PNG), state, prompt and seed answers the same.
    let rgb = std::fs::read(&frame).unwrap();
    let png = |rgb: Vec<u8>| {
        reflex_engine::preprocess::encode_png(&image::RgbImage::from_raw(224, 224, rgb).unwrap())
    };
    let wrist: Vec<u8> = (0..224u32 * 224)
        .flat_map(|i| {
            let (y, x) = (i / 224, i % 224);
            [(x * 7 + 99) % 256, (y * 3) % 256, (x * y + 99) % 256].map(|v| v as u8)
        })
        .collect();
    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    let r = timeout(c.act(pb::ActRequest {
        images: vec![
            pb::Image {
                camera: "base".into(),
                data: png(rgb),
                sha256: String::new(),
            },
            pb::Image {
                camera: "wrist".into(),
                data: png(wrist),
                sha256: String::new(),
            },
        ],
        instruction: "pick up the black bowl".into(),
        state: vec![0.0, 0.2, 0.0, -1.8, 0.0, 2.0, 0.8, 0.04],
        noise_seed: Some(7),
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    assert_eq!(r.actions, actions(&got["hwc"]), "openpi and gRPC disagree");
    stop_cleanly(server);

    // Every call in the trace, in order: 3 single calls, 2 broker calls, then gRPC's.
    let trace = trace_files(&traces).pop().expect("a trace was written");
    let lines = trace_lines(&trace);
    let reqs: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "request").collect();
    let seqs: Vec<u64> = reqs.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (0..6).collect::<Vec<_>>());
    assert!(reqs.iter().all(|r| r["error"].is_null()));
    // And it replays bit-exactly over gRPC from the recorded PNGs.
    assert_replays_bit_exactly(&trace, &export_dir, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn openpi_bad_input_is_a_text_frame_and_close_1011_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().join("export");
    export(&export_dir, 0);
    let traces = dir.path().join("traces");
    let (server, _sock) = serve(
        dir.path(),
        &export_dir,
        &[
            "--openpi-listen",
            "127.0.0.1:0",
            "--max-message-mb",
            "1",
            "--record",
            traces.to_str().unwrap(),
        ],
    )
    .await;
    let (host, port) = openpi_addr(&server);
    let got = drive_openpi(&["errors", &host, &port], &[]);
    let expect = [
        (
            "not_msgpack",
            "INVALID_ARGUMENT: the message is not msgpack",
        ),
        ("text_frame", "INVALID_ARGUMENT: expected a binary frame"),
        (
            "not_a_dict",
            "INVALID_ARGUMENT: the observation must be a dict",
        ),
        (
            "unknown_key",
            "INVALID_ARGUMENT: unknown observation key \"observation/imgae\"",
        ),
        (
            "missing_key",
            "INVALID_ARGUMENT: observation key \"observation/state\" (state) is missing",
        ),
        (
            "bad_shape",
            "INVALID_ARGUMENT: observation key \"observation/image\": an image must be (H, W, 3) or (3, H, W) uint8, got shape [224, 224, 4]",
        ),
        (
            "bad_dtype",
            "INVALID_ARGUMENT: observation key \"observation/image\": an image must be uint8",
        ),
        ("short_state", "INVALID_ARGUMENT: "),
        ("oversized", "INVALID_ARGUMENT: the message is "),
    ];
    for (case, start) in expect {
        let c = &got[case];
        let msg = c["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{case}: {got}"));
        assert!(msg.starts_with(start), "{case}: {msg}");
        assert_eq!(c["close_code"], 1011, "{case}: {c}");
    }
    // What the Act path refuses carries its seq: it is recorded, like a gRPC call.
    let short = got["short_state"]["error"].as_str().unwrap();
    assert!(
        short.contains("state") && short.contains("(seq 0)"),
        "{short}"
    );
    assert!(
        got["oversized"]["error"]
            .as_str()
            .unwrap()
            .contains("at most 1114112"),
        "{got}"
    );
    // The server still answers, on a new connection.
    assert_eq!(got["after"]["shape"], serde_json::json!([50, 7]), "{got}");
    assert_eq!(got["after"]["reflex"]["seq"], 1);
    // Plain HTTP: openpi's health check, and 426 for anything else.
    let addr = format!("{host}:{port}");
    let health = http_get(&addr, "/healthz").await;
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("OK\n"),
        "{health}"
    );
    let other = http_get(&addr, "/").await;
    assert!(other.starts_with("HTTP/1.1 426"), "{other}");
    assert!(other.contains("WebsocketClientPolicy"), "{other}");
    stop_cleanly(server);
    let trace = trace_files(&traces).pop().expect("a trace was written");
    let reqs: Vec<serde_json::Value> = trace_lines(&trace)
        .into_iter()
        .filter(|l| l["kind"] == "request")
        .collect();
    assert_eq!(reqs.len(), 2, "the refused state and the good call");
    assert_eq!(reqs[0]["error"]["slug"], "invalid-argument");
}

#[tokio::test(flavor = "multi_thread")]
async fn openpi_droid_and_aloha_observations_map_by_preset_and_openpi_map() {
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().join("export");
    export(&export_dir, 0);
    let runs: [(&str, &[&str], &str); 2] = [
        ("droid", &[], "observation/wrist_image_left→wrist"),
        (
            "aloha",
            &["--openpi-map", "prompt=task"],
            "images/cam_low→(unused), state←[state], prompt←task",
        ),
    ];
    for (preset, extra, keys) in runs {
        let sub = dir.path().join(preset);
        std::fs::create_dir(&sub).unwrap();
        let mut args = vec!["--openpi-listen", "127.0.0.1:0", "--openpi-preset", preset];
        args.extend_from_slice(extra);
        let (server, _sock) = serve(&sub, &export_dir, &args).await;
        assert!(
            server.wait_for_log("listen=ws://").contains(keys),
            "{}",
            server.stderr()
        );
        let (host, port) = openpi_addr(&server);
        let got = drive_openpi(&["preset", &host, &port, preset], &[]);
        assert_eq!(got["shape"], serde_json::json!([50, 7]), "{preset}: {got}");
        stop_cleanly(server);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openpi_listen_serves_wss_with_the_grpc_certificate_and_needs_a_token_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().join("export");
    export(&export_dir, 0);
    let (crt, key, ca) = tls_fixture(dir.path());
    let (server, _sock) = serve(
        dir.path(),
        &export_dir,
        &[
            "--openpi-listen",
            "127.0.0.1:0",
            "--tls-cert",
            crt.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    let addr = logged_addr(&server, "listen=wss://");
    let got = drive_openpi(
        &["tls", &format!("wss://{addr}")],
        &[("SSL_CERT_FILE", &ca)],
    );
    assert_eq!(got["after"]["shape"], serde_json::json!([50, 7]), "{got}");
    stop_cleanly(server);

    let sock = format!("unix://{}", dir.path().join("p.sock").display());
    let out = Command::new(BIN)
        .args(["serve", export_dir.to_str().unwrap(), "--listen", &sock])
        .args(["--openpi-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains("not a loopback address") && err.contains("--auth-token-file"),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["serve", export_dir.to_str().unwrap(), "--listen", &sock])
        .args([
            "--openpi-listen",
            "127.0.0.1:0",
            "--openpi-map",
            "camera=prompt",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("\"prompt\" is given two roles"), "{err}");
}
