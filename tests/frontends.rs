//! The drop-in front-ends against the real `reflex serve`, driven by the real clients:
//! the seed tool's `reflex.client.ReflexClient` / `ReflexAsyncClient` (reflex-vla 0.11.2
//! from PyPI, with httpx) on `--http-listen`, through `tests/frontends/seed_client.py`.
//!
//! The seed tool and httpx are installed by `deploy/ci-setup.sh`; a missing one fails the
//! test and says so.

mod util;

use std::path::Path;
use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use util::*;

/// Runs `seed_client.py ARGS`; its stdout as JSON.
fn seed_client(args: &[&str]) -> serde_json::Value {
    seed_client_env(args, &[])
}

fn seed_client_env(args: &[&str], envs: &[(&str, &Path)]) -> serde_json::Value {
    let dir = seed_tool_dir();
    assert!(
        dir.join("reflex/client/client.py").is_file(),
        "the seed tool (reflex-vla 0.11.2) is not installed in {}: run `bash deploy/ci-setup.sh`",
        dir.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/frontends/seed_client.py");
    let out = Command::new("python3")
        .arg(script)
        .args(args)
        .env("PYTHONPATH", &dir)
        .envs(envs.iter().copied())
        .output()
        .expect("python3 must be installed (deploy/ci-setup.sh)");
    assert!(
        out.status.success(),
        "seed_client.py {args:?} failed (httpx missing? run `bash deploy/ci-setup.sh`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The address `reflex serve` logged for `--http-listen`.
fn http_addr(p: &Proc) -> String {
    logged_addr(p, "listen=http://")
}

/// One raw HTTP/1.1 request; (status, head, body).
async fn raw(addr: &str, request: Vec<u8>) -> (u16, String, String) {
    let mut s = timeout(tokio::net::TcpStream::connect(addr)).await.unwrap();
    // An early answer (413) may close the connection while the body is still going out.
    let _ = timeout(s.write_all(&request)).await;
    let mut out = Vec::new();
    // The server may answer (413) before it has read the whole body, then close.
    let _ = timeout(s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, head.to_string(), body.to_string())
}

fn post(addr: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn json_body(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_client_drives_http_listen_sync_and_async_with_a_token_and_every_call_is_traced() {
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().join("export");
    export(&export_dir, 0);
    let token = write_secret(
        dir.path(),
        "token",
        b"s3cret-token-for-the-seed-client-0123",
    );
    let traces = dir.path().join("traces");
    let frame = dir.path().join("frame.jpg");
    std::fs::write(&frame, jpeg(30)).unwrap();
    let (server, sock) = serve(
        dir.path(),
        &export_dir,
        &[
            "--http-listen",
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
    let base = format!("http://{}", http_addr(&server));
    let got = seed_client(&[
        "drive",
        &base,
        "s3cret-token-for-the-seed-client-0123",
        frame.to_str().unwrap(),
    ]);
    assert_eq!(got["health"]["status"], "ok", "{got}");
    assert_eq!(got["config"]["action_dim"], 7, "{got}");
    assert_eq!(got["config"]["chunk_size"], 50, "{got}");
    let answers: Vec<&serde_json::Value> = got["sync"]
        .as_array()
        .unwrap()
        .iter()
        .chain(got["async"].as_array().unwrap())
        .collect();
    assert_eq!(answers.len(), 5, "{got}");
    for a in &answers {
        assert_eq!(a["shape"], serde_json::json!([50, 7]), "{got}");
        assert_eq!(
            (a["num_actions"].as_u64(), a["action_dim"].as_u64()),
            (Some(50), Some(7))
        );
        assert_eq!(a["inference_mode"], "cpu");
        assert_eq!(a["recorded"], true);
        assert!(a["latency_ms"].as_f64().unwrap() > 0.0);
    }
    // The same frame and instruction: the second call is a prefix-cache hit.
    assert_eq!(got["sync"][1]["cache"], "hit", "{got}");
    // 422 for what the model refuses: the seed client's validation error, not retried.
    assert_eq!(got["short_state"]["status"], 422, "{got}");
    assert_eq!(
        got["short_state"]["body"]["error"], "invalid_argument",
        "{got}"
    );
    assert!(
        got["short_state"]["body"]["message"]
            .as_str()
            .unwrap()
            .contains("state"),
        "{got}"
    );
    assert_eq!(got["bearer"]["status"], 200, "{got}");
    for refused in ["no_token", "wrong_token"] {
        assert_eq!(got[refused]["status"], 401, "{refused}: {got}");
        assert_eq!(got[refused]["body"]["error"], "unauthorized", "{got}");
        assert!(
            !got[refused].to_string().contains("s3cret"),
            "the token is never echoed"
        );
    }
    stop_cleanly(server);
    drop(sock);

    // Every call landed in the trace, in order, the refused one with its error.
    let trace = trace_files(&traces).pop().expect("a trace was written");
    let lines = trace_lines(&trace);
    let reqs: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "request").collect();
    let seqs: Vec<u64> = reqs.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (0..7).collect::<Vec<_>>(),
        "3 sync, 1 refused, 2 async, 1 bearer"
    );
    assert_eq!(reqs[3]["error"]["slug"], "invalid-argument");
    let mut client_seqs: Vec<u64> = answers.iter().map(|a| a["seq"].as_u64().unwrap()).collect();
    client_seqs.push(got["bearer"]["seq"].as_u64().unwrap());
    assert_eq!(client_seqs, [0, 1, 2, 4, 5, 6]);
    for (a, r) in answers
        .iter()
        .zip(reqs.iter().filter(|r| r["error"].is_null()))
    {
        let sum: f64 = r["response"]["actions"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap())
            .map(|v| v.as_f64().unwrap())
            .sum();
        let want = a["sum"].as_f64().unwrap();
        assert!(
            (sum - want).abs() < 1e-6 * want.abs().max(1.0),
            "{sum} vs {want}"
        );
    }
    // And it replays bit-exactly over gRPC, the refused call refused the same way.
    assert_replays_bit_exactly(&trace, &export_dir, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_client_retries_503_from_a_full_queue_until_answered() {
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().join("export");
    export(&export_dir, 0);
    let traces = dir.path().join("traces");
    let frame = dir.path().join("frame.jpg");
    std::fs::write(&frame, jpeg(60)).unwrap();
    let (server, _sock) = serve(
        dir.path(),
        &export_dir,
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--queue-depth",
            "1",
            "--cache-entries",
            "0",
            "--record",
            traces.to_str().unwrap(),
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    let base = format!("http://{}", http_addr(&server));
    let metrics = logged_addr(&server, "metrics=http://")
        .trim_end_matches("/metrics")
        .to_string();
    let got = seed_client(&["flood", &base, frame.to_str().unwrap(), "12"]);
    assert_eq!(got["answered"], 12, "{got}");
    // Counted like gRPC calls: 12 answered, and each refusal by its slug.
    let text = http_get(&metrics, "/metrics").await;
    let sample = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(
        sample("reflex_act_requests_total{status=\"ok\"}"),
        12.0,
        "{text}"
    );
    let refused = sample("reflex_act_requests_total{status=\"queue-full\"}");
    stop_cleanly(server);
    let trace = trace_files(&traces).pop().expect("a trace was written");
    let lines = trace_lines(&trace);
    let footer = lines.iter().rfind(|l| l["kind"] == "footer").unwrap();
    assert_eq!(footer["total_requests"], 12, "{footer}");
    // Refused calls have no seq and no record; the footer counts them.
    assert!(
        footer["refused_requests"].as_u64().unwrap() > 0,
        "the queue never refused: {footer}"
    );
    assert_eq!(
        footer["refused_requests"].as_u64().unwrap() as f64,
        refused,
        "the footer and the metrics count the same refusals"
    );
    assert_eq!(
        got["seqs"],
        serde_json::json!((0..12).collect::<Vec<u64>>()),
        "{got}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_bad_input_is_answered_in_the_seeds_error_shape() {
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().join("export");
    export(&export_dir, 0);
    let (server, _sock) = serve(
        dir.path(),
        &export_dir,
        &["--http-listen", "127.0.0.1:0", "--max-message-mb", "1"],
    )
    .await;
    let addr = http_addr(&server);
    let a = addr.as_str();

    let (code, _, body) = raw(a, post(a, "/act", b"{not json")).await;
    assert_eq!(code, 400);
    let v = json_body(&body);
    assert_eq!(v["error"], "invalid_request");
    assert!(v["message"].as_str().unwrap().contains("not JSON"), "{v}");

    let (code, _, body) = raw(a, post(a, "/act", br#"{"image":"aGk=","state":"1,2"}"#)).await;
    assert_eq!(code, 400);
    assert_eq!(
        json_body(&body)["message"],
        "state: expected an array of numbers"
    );
    let (code, _, body) = raw(a, post(a, "/act", br#"{"image":"%%%"}"#)).await;
    assert_eq!(code, 400);
    assert!(
        json_body(&body)["message"]
            .as_str()
            .unwrap()
            .starts_with("image:")
    );

    // What the Act path refuses: 422 with its message, and a seq (it is recorded).
    let img = base64(&jpeg(1));
    let (code, _, body) = raw(
        a,
        post(
            a,
            "/act",
            format!(r#"{{"image":"{img}","state":[1,2,3]}}"#).as_bytes(),
        ),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    let v = json_body(&body);
    assert_eq!(v["error"], "invalid_argument");
    assert!(v["message"].as_str().unwrap().contains("state"), "{v}");
    let (code, _, body) = raw(a, post(a, "/act", b"{}")).await;
    assert_eq!(code, 422, "no image: {body}");

    // Oversized: refused from Content-Length before the body is read, and by counting
    // when the body comes chunked without one.
    let big = 3 * 1024 * 1024;
    let head = format!(
        "POST /act HTTP/1.1\r\nHost: {a}\r\nContent-Length: {big}\r\nConnection: close\r\n\r\n"
    );
    let (code, _, body) = raw(a, head.into_bytes()).await;
    assert_eq!(code, 413);
    assert_eq!(json_body(&body)["error"], "payload_too_large");
    let mut chunked = format!(
        "POST /act HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..48 {
        chunked.extend_from_slice(format!("{:x}\r\n", 65536).as_bytes());
        chunked.extend(std::iter::repeat_n(b'a', 65536));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (code, _, body) = raw(a, chunked).await;
    assert_eq!(code, 413, "{body}");

    let (code, _, body) = raw(
        a,
        format!("GET /nope HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n").into_bytes(),
    )
    .await;
    assert_eq!(code, 404);
    assert_eq!(json_body(&body)["error"], "not_found");
    let (code, _, _) = raw(
        a,
        format!("GET /act HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n").into_bytes(),
    )
    .await;
    assert_eq!(code, 405);
    // The server still answers after all that.
    let (code, _, body) = raw(
        a,
        format!("GET /health HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n").into_bytes(),
    )
    .await;
    assert_eq!(
        (code, json_body(&body)["status"].as_str()),
        (200, Some("ok"))
    );
    stop_cleanly(server);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_loopback_front_end_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().join("export");
    export(&export_dir, 0);
    let sock = format!("unix://{}", dir.path().join("p.sock").display());
    let run = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args(["serve", export_dir.to_str().unwrap(), "--listen", &sock])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--http-listen", "0.0.0.0:0"]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("not a loopback address") && err.contains("--auth-token-file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_listen_serves_tls_with_the_grpc_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().join("export");
    export(&export_dir, 0);
    let (crt, key, ca) = tls_fixture(dir.path());
    let token = write_secret(dir.path(), "token", b"tls-token-0123456789abcdef0123456789");
    let frame = dir.path().join("frame.jpg");
    std::fs::write(&frame, jpeg(90)).unwrap();
    let (server, _sock) = serve(
        dir.path(),
        &export_dir,
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--tls-cert",
            crt.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--auth-token-file",
            token.to_str().unwrap(),
        ],
    )
    .await;
    let base = format!("https://{}", logged_addr(&server, "listen=https://"));
    let got = seed_client_env(
        &[
            "tls",
            &base,
            "tls-token-0123456789abcdef0123456789",
            frame.to_str().unwrap(),
        ],
        &[("SSL_CERT_FILE", &ca)],
    );
    assert_eq!(got["health"]["status"], "ok", "{got}");
    assert_eq!(got["act"]["shape"], serde_json::json!([50, 7]), "{got}");
    assert_ne!(
        got["plain"], "answered",
        "plain HTTP on the TLS port: {got}"
    );
    stop_cleanly(server);
}
