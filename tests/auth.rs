//! Access control with the real binary: the bearer token on TCP (missing, wrong, right),
//! Health left open, Unix sockets guarded by permissions only, TLS round trips (our client
//! and grpcurl), and the start-up refusals (non-loopback without a token, a token file or
//! key readable by everyone, half a TLS configuration).

mod util;

use std::process::Command;
use std::time::Duration;

use reflex_proto::ConnectOptions;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use util::*;

const TOKEN: &str = "reflex-test-token-0123456789abcdef";

fn with_token(token: &str) -> ConnectOptions {
    ConnectOptions::default().bearer_token(token).unwrap()
}

async fn act_code(
    c: &mut reflex_proto::v1::policy_client::PolicyClient<reflex_proto::AuthChannel>,
) -> Result<usize, tonic::Status> {
    timeout(c.act(act_request(1, Some(7))))
        .await
        .map(|r| r.into_inner().actions.len())
}

async fn health_over<T>(mut c: HealthClient<T>) -> i32
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    timeout(c.check(HealthCheckRequest {
        service: String::new(),
    }))
    .await
    .expect("health answers without a token")
    .into_inner()
    .status
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_needs_the_right_token_while_health_and_the_unix_socket_stay_open() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let token_file = write_secret(dir.path(), "token", format!("{TOKEN}\n").as_bytes());
    let (p, sock) = serve(
        dir.path(),
        &exp,
        &[
            "--listen",
            "127.0.0.1:0",
            "--auth-token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    let tcp = p.tcp_addr();
    let serving = p.wait_for_log("listen=tcp://");
    assert!(
        serving.contains("auth=token") && serving.contains("tls=false"),
        "{serving}"
    );
    let unix_line = p.wait_for_log("listen=unix://");
    assert!(unix_line.contains("auth=socket-permissions"), "{unix_line}");

    // No token, a wrong one, the right one.
    let none = act_code(&mut policy_client_with(&tcp, &ConnectOptions::default()).await).await;
    let s = none.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("authorization: Bearer"), "{s:?}");
    let wrong = act_code(&mut policy_client_with(&tcp, &with_token("reflex-wrong-token")).await)
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated, "{wrong:?}");
    assert!(!wrong.message().contains("reflex-wrong-token"));
    // A prefix of the right token is still wrong.
    let prefix = act_code(&mut policy_client_with(&tcp, &with_token(&TOKEN[..20])).await)
        .await
        .unwrap_err();
    assert_eq!(prefix.code(), tonic::Code::Unauthenticated);
    let right = act_code(&mut policy_client_with(&tcp, &with_token(TOKEN)).await).await;
    assert_eq!(right.expect("the right token is let in"), 50 * 7);
    // GetModelInfo is guarded too.
    let mut c = policy_client(&tcp).await;
    let s = timeout(c.get_model_info(reflex_proto::v1::GetModelInfoRequest {}))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);

    // Health needs no token on TCP.
    let ch = timeout(reflex_proto::connect(&tcp)).await.unwrap();
    assert_eq!(
        health_over(HealthClient::new(ch)).await,
        ServingStatus::Serving as i32
    );

    // The Unix socket is guarded by its file permissions, not the token.
    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    let r = timeout(c.act(act_request(1, Some(7)))).await.unwrap();
    assert_eq!(r.into_inner().actions.len(), 50 * 7);

    // Refusals are logged with the reason, never with a token.
    let refused = p.wait_for_log("auth-refused");
    assert!(
        refused.contains(r#"service="reflex.v1.Policy""#),
        "{refused}"
    );
    let log = p.stderr();
    assert!(
        log.contains(r#"reason="wrong""#) && log.contains(r#"reason="missing""#),
        "{log}"
    );
    assert!(!log.contains(TOKEN) && !log.contains("reflex-wrong-token"));
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_passes_the_token_as_a_header() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let token_file = write_secret(dir.path(), "token", TOKEN.as_bytes());
    let (p, _sock) = serve(
        dir.path(),
        &exp,
        &[
            "--listen",
            "127.0.0.1:0",
            "--auth-token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    let tcp = p.tcp_addr();

    // Reflection is guarded as well: without the header grpcurl cannot even list.
    let out = Command::new("grpcurl")
        .args(["-plaintext", &tcp, "list"])
        .output()
        .expect("grpcurl is installed (.ci/run installs it)");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Unauthenticated"), "{err}");

    let header = format!("authorization: Bearer {TOKEN}");
    let body = format!(
        r#"{{"images":[{{"camera":"base","data":"{}"}}],"instruction":"pick up the red cup","state":[0,0.2,0,-1.8,0,2,0.8,0.04],"noise_seed":"42"}}"#,
        base64(&jpeg(4))
    );
    let out = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-H",
            &header,
            "-d",
            &body,
            &tcp,
            "reflex.v1.Policy/Act",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grpcurl Act with the token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["actions"].as_array().unwrap().len(), 350, "{v}");
    assert_eq!(v["noise_seed"], "42");
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_round_trip_with_the_test_certificate_and_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let (cert, key, ca) = tls_fixture(dir.path());
    let token_file = write_secret(dir.path(), "token", TOKEN.as_bytes());
    let (p, _sock) = serve(
        dir.path(),
        &exp,
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--auth-token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    let tcp = p.tcp_addr();
    let serving = p.wait_for_log("listen=tcp://");
    assert!(
        serving.contains("tls=true") && serving.contains("auth=token"),
        "{serving}"
    );
    let port = tcp.rsplit(':').next().unwrap();
    let trusted = ConnectOptions::default().tls_ca_file(&ca).unwrap();

    // By name and by IP address (the certificate carries both).
    for host in ["localhost", "127.0.0.1"] {
        let target = format!("https://{host}:{port}");
        let ok = act_code(
            &mut policy_client_with(&target, &with_token(TOKEN).tls_ca_file(&ca).unwrap()).await,
        )
        .await;
        assert_eq!(ok.expect("TLS + token"), 50 * 7, "{target}");
    }
    let target = format!("https://localhost:{port}");
    // TLS does not replace the token.
    let s = act_code(&mut policy_client_with(&target, &trusted).await)
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
    // Health over TLS without a token.
    let ch = timeout(reflex_proto::connect_with(&target, &trusted))
        .await
        .unwrap();
    assert_eq!(
        health_over(HealthClient::new(ch)).await,
        ServingStatus::Serving as i32
    );

    // Plaintext to the TLS port gets nowhere.
    let mut c = policy_client_with(&tcp, &with_token(TOKEN)).await;
    let plain = tokio::time::timeout(Duration::from_secs(10), c.act(act_request(1, Some(7))))
        .await
        .expect("a plaintext call to a TLS port fails, it does not hang");
    assert!(plain.is_err());
    // A client that does not trust the CA refuses the server (the leaf is not a CA).
    let wrong_ca = ConnectOptions::default()
        .bearer_token(TOKEN)
        .unwrap()
        .tls_ca_file(&cert)
        .unwrap();
    let refused = match tokio::time::timeout(
        Duration::from_secs(10),
        reflex_proto::connect_with(&target, &wrong_ca),
    )
    .await
    .expect("no hang")
    {
        Err(_) => true,
        Ok(ch) => {
            let mut c = reflex_proto::v1::policy_client::PolicyClient::new(ch);
            timeout(c.act(act_request(1, Some(7)))).await.is_err()
        }
    };
    assert!(refused, "a certificate from an untrusted CA was accepted");

    // grpcurl over TLS with the CA and the token.
    let header = format!("authorization: Bearer {TOKEN}");
    let out = Command::new("grpcurl")
        .args([
            "-cacert",
            ca.to_str().unwrap(),
            "-H",
            &header,
            &format!("localhost:{port}"),
            "list",
        ])
        .output()
        .expect("grpcurl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "grpcurl over TLS failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("reflex.v1.Policy"));
}

/// Starts `reflex serve ARGS` expecting it to refuse; returns its stderr.
fn refused(args: &[&str]) -> String {
    let mut p = Proc::start("reflex serve", args, &[]);
    let st = p
        .wait_exit(TIMEOUT)
        .expect("the server should refuse to start, not run");
    assert!(!st.success(), "exit status {st:?}");
    // The reader thread may still be collecting the last lines.
    p.wait_for_log("error:");
    p.stderr()
}

#[test]
fn non_loopback_listen_without_a_token_exits_naming_the_way_out() {
    // An empty folder: the refusal must come before the model is loaded.
    let dir = tempfile::tempdir().unwrap();
    let err = refused(&[
        "serve",
        dir.path().to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
    ]);
    assert!(
        err.contains("not a loopback address")
            && err.contains("--auth-token-file")
            && err.contains("--insecure"),
        "{err}"
    );
    assert!(!err.contains("reflex_config.json"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn non_loopback_listen_with_a_token_starts_and_warns_about_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let token_file = write_secret(dir.path(), "token", TOKEN.as_bytes());
    let (p, _sock) = serve(
        dir.path(),
        &exp,
        &[
            "--listen",
            "0.0.0.0:0",
            "--auth-token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    p.wait_for_log("travels in clear text");
    let port = p.tcp_addr().rsplit(':').next().unwrap().to_string();
    let target = format!("127.0.0.1:{port}");
    let ok = act_code(&mut policy_client_with(&target, &with_token(TOKEN)).await).await;
    assert_eq!(ok.unwrap(), 50 * 7);
    let s = act_code(&mut policy_client_with(&target, &ConnectOptions::default()).await)
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unauthenticated);
}

#[test]
fn a_token_file_readable_by_everyone_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token_file = write_secret(dir.path(), "token", TOKEN.as_bytes());
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = refused(&[
        "serve",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--auth-token-file",
        token_file.to_str().unwrap(),
    ]);
    assert!(
        err.contains("readable by every user") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains(TOKEN));

    let empty = write_secret(dir.path(), "empty", b"\n");
    let err = refused(&[
        "serve",
        dir.path().to_str().unwrap(),
        "--auth-token-file",
        empty.to_str().unwrap(),
    ]);
    assert!(err.contains("is empty"), "{err}");
}

#[test]
fn tls_needs_both_the_certificate_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _ca) = tls_fixture(dir.path());
    let out = Command::new(BIN)
        .args([
            "serve",
            dir.path().to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-key"), "{err}");

    // The checked-in key is 0644 after a checkout: refused like a token file.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = refused(&[
        "serve",
        dir.path().to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    assert!(
        err.contains("--tls-key") && err.contains("readable by every user"),
        "{err}"
    );
}

/// `reflex replay --target` against a token-protected TCP listener: refused without
/// `--auth-token-file` (exit 2, the reason named), bit-exact with it.
#[tokio::test(flavor = "multi_thread")]
async fn replay_reaches_a_protected_target_with_its_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let token_file = write_secret(dir.path(), "token", TOKEN.as_bytes());
    let traces = dir.path().join("traces");
    let rec = dir.path().join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let (mut p, sock) = serve(
        &rec,
        &exp,
        &[
            "--record",
            traces.to_str().unwrap(),
            "--record-images",
            "full",
        ],
    )
    .await;
    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    for i in 0..3u8 {
        timeout(c.act(act_request(i * 30, None))).await.unwrap();
    }
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(5)).unwrap().success());
    let trace = trace_files(&traces).pop().expect("trace written");

    let (p, _) = serve(
        dir.path(),
        &exp,
        &[
            "--listen",
            "127.0.0.1:0",
            "--auth-token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    let tcp = p.tcp_addr();
    let run = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args([
                "replay",
                trace.to_str().unwrap(),
                "--target",
                &tcp,
                "--fail-on",
                "actions",
            ])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, text) = run(&[]);
    assert_eq!(code, Some(2), "no token: the target refuses\n{text}");
    assert!(
        text.contains("Unauthenticated") || text.contains("UNAUTHENTICATED"),
        "{text}"
    );
    let (code, text) = run(&["--auth-token-file", token_file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("actions: 3/3 pass"), "{text}");
    assert_eq!(text.matches("max_abs=0.00e+00").count(), 3, "{text}");
}
