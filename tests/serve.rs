//! `reflex serve` as a real process on real sockets: Act round trips, bad
//! input, health, reflection with the real grpcurl, queue bounds, SIGTERM.

mod util;

use std::process::Command;
use std::time::Duration;

use reflex_proto::v1 as pb;
use tonic::Code;
use util::*;

fn assert_actions(r: &pb::ActResponse) {
    assert_eq!((r.num_actions, r.action_dim), (50, 7));
    assert_eq!(r.actions.len(), 350);
    assert!(r.actions.iter().all(|a| a.is_finite()));
    assert_eq!(r.mode, "cpu");
    assert_eq!(r.model_hash.len(), 16);
    let d = r.denoise.unwrap();
    assert_eq!(
        (d.steps_used, d.steps_configured, d.adaptive),
        (10, 10, false)
    );
    assert!(r.latency.unwrap().total_ms > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn act_round_trip_over_unix_and_tcp_is_deterministic_per_seed() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let (p, sock) = serve(dir.path(), &exp, &["--listen", "127.0.0.1:0"]).await;
    let mut unix = policy_client(&format!("unix://{}", sock.display())).await;
    let mut tcp = policy_client(&p.tcp_addr()).await;

    let a = timeout(unix.act(act_request(1, Some(42))))
        .await
        .unwrap()
        .into_inner();
    assert_actions(&a);
    assert_eq!((a.noise_seed, a.seq, a.cache.as_str()), (42, 0, "miss"));
    let b = timeout(tcp.act(act_request(1, Some(42))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        a.actions, b.actions,
        "same seed and inputs → same actions, bit for bit"
    );
    assert_eq!((b.seq, b.cache.as_str()), (1, "hit"));
    let c = timeout(unix.act(act_request(1, None)))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(c.actions, a.actions);
    let again = timeout(unix.act(act_request(1, Some(c.noise_seed))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.actions, c.actions,
        "the returned fresh seed replays the call"
    );

    let info = timeout(unix.get_model_info(pb::GetModelInfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.model_hash, a.model_hash);
    assert_eq!(
        (info.state_dim, info.chunk_size, info.action_dim),
        (8, 50, 7)
    );
    assert_eq!(info.cameras, vec!["base", "wrist"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn act_stream_answers_in_order_and_survives_a_bad_request() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let (_p, sock) = serve(dir.path(), &exp, &[]).await;
    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    let mut bad = act_request(2, Some(1));
    bad.state.pop();
    let reqs = vec![act_request(1, Some(1)), bad, act_request(3, Some(3))];
    let got = act_stream_all(&mut c, reqs).await;
    assert_eq!(got.len(), 3);
    assert_actions(&got[0]);
    let err = got[1].error.as_ref().expect("second request failed");
    // The canonical code name the proto promises (was tonic's Debug form, `InvalidArgument`).
    assert_eq!(err.code, "INVALID_ARGUMENT");
    assert!(
        err.message.contains("state has 7 values"),
        "{}",
        err.message
    );
    assert_actions(&got[2]);
    assert!(got[2].seq > got[0].seq);
}

/// Regression: an ActStream answer to a failed request said `InvalidArgument` (tonic's
/// Debug form) where the proto promises the canonical `INVALID_ARGUMENT`, and carried
/// `seq` 0 although the call had used a seq of its own (the next call got the one after).
#[tokio::test(flavor = "multi_thread")]
async fn act_stream_errors_say_the_canonical_code_and_carry_the_calls_seq() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let (_p, sock) = serve(dir.path(), &exp, &["--listen", "127.0.0.1:0"]).await;
    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    // Two calls first, so the failed call's seq (2) cannot be mistaken for a default 0.
    for _ in 0..2 {
        timeout(c.act(act_request(1, Some(1)))).await.unwrap();
    }
    let mut bad_state = act_request(2, Some(2));
    bad_state.state.pop();
    let mut unknown_camera = act_request(3, Some(3));
    unknown_camera.images[0].camera = "left".into();
    let reqs = vec![bad_state, act_request(4, Some(4)), unknown_camera];
    let got = act_stream_all(&mut c, reqs).await;
    assert_eq!(got.len(), 3);
    assert_eq!(
        got.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![2, 3, 4],
        "every answer carries its own call's seq, failed or not"
    );
    for i in [0, 2] {
        let err = got[i].error.as_ref().expect("a failed request");
        assert_eq!(err.code, "INVALID_ARGUMENT", "answer {i}");
        assert!(got[i].actions.is_empty());
    }
    assert!(
        got[0]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("state has 7 values")
    );
    assert!(got[2].error.as_ref().unwrap().message.contains("\"left\""));
    assert_actions(&got[1]);
    // The next unary call continues the numbering.
    let next = timeout(c.act(act_request(1, Some(1))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.seq, 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_bad_input_is_invalid_argument_naming_the_field_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let (_p, sock) = serve(dir.path(), &exp, &["--max-message-mb", "1"]).await;
    let mut c = policy_client(&format!("unix://{}", sock.display())).await;

    let mut cases: Vec<(&str, pb::ActRequest, &str)> = vec![];
    cases.push((
        "empty request",
        pb::ActRequest::default(),
        "images is empty",
    ));
    let mut r = act_request(1, Some(1));
    r.state = vec![0.0; 3];
    cases.push((
        "wrong state length",
        r,
        "state has 3 values; this model takes 8",
    ));
    let mut r = act_request(1, Some(1));
    r.images[0].data = b"definitely not a jpeg".to_vec();
    cases.push((
        "undecodable image",
        r,
        "images[0].data (camera \"base\") is not a JPEG or PNG image",
    ));
    let mut r = act_request(1, Some(1));
    r.images[0].data.truncate(600);
    cases.push((
        "truncated jpeg",
        r,
        "images[0].data (camera \"base\") could not be decoded",
    ));
    let mut r = act_request(1, Some(1));
    r.images.push(pb::Image {
        camera: "left_wrist".into(),
        data: jpeg(2),
        sha256: String::new(),
    });
    cases.push((
        "unknown camera",
        r,
        "images[1].camera \"left_wrist\" is not a camera of this model",
    ));
    let mut r = act_request(1, Some(1));
    r.images[0].data = Vec::new();
    cases.push(("missing image bytes", r, "images[0].data is empty"));
    let mut r = act_request(1, Some(1));
    r.images[0].sha256 = "0".repeat(64);
    cases.push(("hash mismatch", r, "images[0].sha256 does not match"));
    let mut r = act_request(1, Some(1));
    r.images[0].data = vec![0xff; 1536 * 1024];
    cases.push((
        "oversized message",
        r,
        "the limit is 1048576 bytes (--max-message-mb)",
    ));

    for (what, req, want) in cases {
        let status = timeout(c.act(req)).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(want),
            "{what}: {:?} lacks {want:?}",
            status.message()
        );
        // And the next good call still works.
        let ok = timeout(c.act(act_request(9, Some(9))))
            .await
            .unwrap()
            .into_inner();
        assert_actions(&ok);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_resource_exhausted_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let (_p, sock) = serve(
        dir.path(),
        &exp,
        &[
            "--workers",
            "1",
            "--queue-depth",
            "1",
            "--cache-entries",
            "0",
        ],
    )
    .await;
    let target = format!("unix://{}", sock.display());
    let c = policy_client(&target).await;
    let calls: Vec<_> = (0..24)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move { c.act(act_request(i as u8, Some(i))).await })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for call in calls {
        match timeout(call).await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(s.message().contains("queue is full"), "{}", s.message());
                busy += 1
            }
            Err(s) => panic!("unexpected status {s:?}"),
        }
    }
    // How many of the burst get through beyond the first depends on how many arrive after a
    // place frees up: under load (the full suite on two cores) all 23 others can arrive while
    // the first runs, so only the first is counted on (it failed once as "ok 1, busy 23").
    assert!(
        ok >= 1 && busy >= 1 && ok + busy == 24,
        "ok {ok}, busy {busy}"
    );
    let mut c = c.clone();
    assert_actions(
        &timeout(c.act(act_request(1, Some(1))))
            .await
            .unwrap()
            .into_inner(),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_services_by_reflection_and_acts_from_json_over_both_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let (p, sock) = serve(dir.path(), &exp, &["--listen", "127.0.0.1:0"]).await;
    let tcp = p.tcp_addr();
    let sock = sock.to_str().unwrap().to_string();

    // No -authority flag: the server accepts grpcurl's socket-path :authority.
    let out = Command::new("grpcurl")
        .args(["-plaintext", "-unix", &sock, "list"])
        .output()
        .expect("grpcurl is installed (.ci/run installs it)");
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcurl list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for svc in ["reflex.v1.Policy", "grpc.health.v1.Health"] {
        assert!(
            listed.lines().any(|l| l == svc),
            "{svc} missing from:\n{listed}"
        );
    }
    let b64 = base64(&jpeg(4));
    let body = format!(
        r#"{{"images":[{{"camera":"base","data":"{b64}"}}],"instruction":"pick up the red cup","state":[0,0.2,0,-1.8,0,2,0.8,0.04],"episode_id":"ep-1","noise_seed":"42"}}"#
    );
    let mut via = vec![];
    for target in [vec!["-unix", sock.as_str()], vec![tcp.as_str()]] {
        let mut args = vec!["-plaintext", "-d", &body];
        args.extend(target);
        args.push("reflex.v1.Policy/Act");
        let out = Command::new("grpcurl").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "grpcurl Act failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["num_actions"], 50, "{v}");
        assert_eq!(v["action_dim"], 7);
        assert_eq!(v["noise_seed"], "42");
        assert_eq!(v["actions"].as_array().unwrap().len(), 350);
        via.push(v["actions"].clone());
    }
    assert_eq!(via[0], via[1]);
    // Same actions as a Rust client sending the same request.
    let mut c = policy_client(&format!("unix://{sock}")).await;
    let mut req = act_request(4, Some(42));
    req.episode_id = "ep-1".into();
    let r = timeout(c.act(req)).await.unwrap().into_inner();
    let ours: Vec<f64> = r.actions.iter().map(|v| *v as f64).collect();
    let theirs: Vec<f64> = via[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(*a as f32, *b as f32);
    }
    // Health through grpcurl as an operator would check it.
    let out = Command::new("grpcurl")
        .args(["-plaintext", &tcp, "grpc.health.v1.Health/Check"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_server_with_exit_0_within_2s() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let (mut p, sock) = serve(dir.path(), &exp, &[]).await;
    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    timeout(c.act(act_request(1, Some(1)))).await.unwrap();
    let t = std::time::Instant::now();
    p.signal(libc::SIGTERM);
    let status = p
        .wait_exit(Duration::from_secs(2))
        .expect("exited within 2 s");
    assert!(status.success(), "exit status {status:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(!sock.exists(), "socket file removed on shutdown");
    assert!(p.stderr().contains("stopped"));
}

#[test]
fn a_missing_export_fails_at_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            dir.path().join("nope").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no reflex_config.json"), "{err}");
}

#[test]
fn non_loopback_listen_without_insecure_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let out = Command::new(BIN)
        .args(["serve", exp.to_str().unwrap(), "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}

/// The README's "Calling it with grpcurl" recipe needed guesses (how to make the frame,
/// that `wrist` may be left out, that `seq` 0 vanishes from grpcurl's JSON). This runs the
/// recipe as the README has it, with only the port and the socket path changed, in an empty
/// folder with this build as `reflex`.
#[test]
fn readme_grpcurl_recipe_runs_verbatim() {
    use std::os::unix::process::CommandExt;
    let readme =
        read_to_string(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"));
    let section = readme
        .split_once("## Calling it with grpcurl")
        .expect("the README has the section")
        .1;
    let recipe = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .expect("the section starts with a sh block")
        .0;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sock = dir.path().join("reflex.sock");
    let script = recipe
        .replace("127.0.0.1:50051", &format!("127.0.0.1:{port}"))
        .replace("/tmp/reflex.sock", sock.to_str().unwrap());
    let bin_dir = std::path::Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .env("PATH", path)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        // Its own process group: the server the recipe starts with `&` goes with it.
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // SAFETY: kill(2) on the process group this test created.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let _ = child.wait();
    let (stdout, stderr) = (read_to_string(&out), read_to_string(&err));
    let status = status.unwrap_or_else(|| panic!("the recipe hung:\n{stdout}\n{stderr}"));
    assert!(
        status.success(),
        "{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );

    assert!(stdout.lines().any(|l| l == "reflex.v1.Policy"), "{stdout}");
    assert!(stdout.contains("\"cameras\""), "GetModelInfo: {stdout}");
    // The last JSON document is the Act response.
    let at = stdout.rfind("\n{").expect("an Act response") + 1;
    let act: serde_json::Value = serde_json::from_str(&stdout[at..]).unwrap();
    assert_eq!(act["num_actions"], 50, "{act}");
    assert_eq!(act["actions"].as_array().unwrap().len(), 350);
    assert_eq!(act["noise_seed"], "42");
    // -emit-defaults: the first call's seq is there, as "0".
    assert_eq!(act["seq"], "0", "{act}");
}
