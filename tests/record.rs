//! Recording end to end with real processes: one recorder daemon shared by
//! several servers, kill -9 of either side, a full disk, hostile clients,
//! and what each image mode keeps.

mod util;

use std::path::Path;
use std::time::Duration;

use reflex_proto::v1 as pb;
use util::*;

const NAME_PATTERN: &str = r"^\d{8}-\d{6}-[0-9a-f]{8}-[0-9a-f]{16}\.jsonl\.gz$";

fn name_matches(path: &Path, model_hash: &str) -> bool {
    let name = path.file_name().unwrap().to_string_lossy();
    let parts: Vec<&str> = name.trim_end_matches(".jsonl.gz").split('-').collect();
    let re_ok = parts.len() == 4
        && parts[0].len() == 8
        && parts[0].chars().all(|c| c.is_ascii_digit())
        && parts[1].len() == 6
        && parts[1].chars().all(|c| c.is_ascii_digit())
        && parts[2] == &model_hash[..8]
        && parts[3].len() == 16
        && parts[3].chars().all(|c| c.is_ascii_hexdigit());
    re_ok && name.ends_with(".jsonl.gz")
}

async fn drive(sock: &Path, calls: usize, shade: u8) -> Vec<pb::ActResponse> {
    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    let mut out = vec![];
    for i in 0..calls {
        let r = timeout(c.act(act_request(shade.wrapping_add(i as u8 % 3), Some(i as u64))))
            .await
            .expect("act succeeds");
        out.push(r.into_inner());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn one_recorder_three_servers_three_complete_files() {
    let dir = tempfile::tempdir().unwrap();
    let traces = dir.path().join("traces");
    let rsock = dir.path().join("recorder.sock");
    let _rec = recorder(&traces, &rsock, &[]).await;
    let recorder_uri = format!("unix://{}", rsock.display());

    let mut servers = vec![];
    for (i, seed) in [0u64, 1, 0].into_iter().enumerate() {
        let exp = dir.path().join(format!("export{i}"));
        export(&exp, seed);
        let sdir = dir.path().join(format!("s{i}"));
        std::fs::create_dir_all(&sdir).unwrap();
        let (p, sock) = serve(
            &sdir,
            &exp,
            &["--recorder", &recorder_uri, "--embodiment", "franka"],
        )
        .await;
        servers.push((p, sock, exp));
    }
    let calls = [7usize, 11, 5];
    let mut tasks = vec![];
    for (i, (_, sock, _)) in servers.iter().enumerate() {
        let sock = sock.clone();
        let n = calls[i];
        tasks.push(tokio::spawn(
            async move { drive(&sock, n, i as u8 * 40).await },
        ));
    }
    let mut infos = vec![];
    for (i, t) in tasks.into_iter().enumerate() {
        let resps = timeout(t).await.unwrap();
        assert!(
            resps.iter().all(|r| r.recorded),
            "every call handed to the recorder"
        );
        assert_eq!(
            resps.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (0..calls[i] as u64).collect::<Vec<_>>()
        );
        infos.push((resps[0].model_hash.clone(), resps.len()));
    }
    // Stop the servers: each ends its session with a footer.
    for (p, _, _) in &servers {
        p.signal(libc::SIGTERM);
    }
    for (p, _, _) in &mut servers {
        assert!(p.wait_exit(Duration::from_secs(5)).unwrap().success());
    }
    let files = trace_files(&traces);
    assert_eq!(files.len(), 3, "{files:?}");
    let mut seen = 0;
    for f in &files {
        let lines = trace_lines(f);
        let header = &lines[0];
        let (hash, n) = infos
            .iter()
            .find(|(h, n)| header["model_hash"] == h.as_str() && lines.len() == n + 2)
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "{f:?} matches no server: {} lines, header {header}",
                    lines.len()
                )
            });
        seen += 1;
        assert!(name_matches(f, &hash), "{f:?} vs {NAME_PATTERN}");
        assert_eq!(header["kind"], "header");
        assert_eq!(header["schema_version"], 1);
        assert_eq!(header["embodiment"], "franka");
        assert_eq!(header["config_hash"].as_str().unwrap().len(), 16);
        assert_eq!(header["redaction"]["image"], "hash_only");
        let footer = lines.last().unwrap();
        assert_eq!(footer["kind"], "footer");
        assert_eq!(footer["total_requests"], n as u64);
        assert_eq!(footer["dropped_requests"], 0);
        assert_eq!(footer["ended_reason"], "shutdown");
        for (i, l) in lines[1..=n].iter().enumerate() {
            assert_eq!(l["kind"], "request");
            assert_eq!(l["seq"], i as u64);
            assert_eq!(l["response"]["actions"].as_array().unwrap().len(), 50);
            assert_eq!(l["noise_seed"], i as u64);
        }
        let mode = std::fs::metadata(f).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o640
        );
    }
    assert_eq!(seen, 3);
    let dmode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&traces).unwrap().permissions());
    assert_eq!(dmode & 0o777, 0o750);
    let smode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&rsock).unwrap().permissions());
    assert_eq!(smode & 0o777, 0o660);
    // The headers carry the exports' real hashes.
    let configs: Vec<String> = servers
        .iter()
        .map(|(_, _, exp)| {
            serde_json::from_str::<serde_json::Value>(&read_to_string(
                &exp.join("reflex_config.json"),
            ))
            .unwrap()["weight_seed"]
                .to_string()
        })
        .collect();
    assert_eq!(configs, vec!["0", "1", "0"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_recorder_acts_still_succeed_drops_counted_reconnect_starts_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let traces = dir.path().join("traces");
    let rsock = dir.path().join("recorder.sock");
    let mut rec = recorder(&traces, &rsock, &["--flush-ms", "50"]).await;
    let exp = dir.path().join("export");
    export(&exp, 0);
    let uri = format!("unix://{}", rsock.display());
    let (server, sock) = serve(
        dir.path(),
        &exp,
        &["--recorder", &uri, "--record-queue", "4"],
    )
    .await;

    let first = drive(&sock, 10, 1).await;
    assert!(first.iter().all(|r| r.recorded));
    // Past the flush interval: these ten are on disk.
    tokio::time::sleep(Duration::from_millis(300)).await;
    rec.child.kill().unwrap();
    rec.child.wait().unwrap();
    let killed = trace_files(&traces);
    assert_eq!(killed.len(), 1);

    // The recorder is gone: every Act still answers; beyond the queue they are dropped.
    let during = drive(&sock, 20, 2).await;
    assert_eq!(during.len(), 20);
    let not_recorded = during.iter().filter(|r| !r.recorded).count();
    assert!(
        not_recorded >= 16,
        "queue of 4 → at least 16 of 20 dropped, got {not_recorded}"
    );

    // The killed file reads back up to its last flushed record.
    let mut reader = reflex_recorder::TraceReader::open(&killed[0]).expect("killed trace opens");
    let mut seqs = vec![];
    while let Some(r) = reader.next_record().expect("whole lines read") {
        if let reflex_recorder::Record::Request(r) = r {
            seqs.push(r.seq);
        }
    }
    assert_eq!(seqs, (0..10).collect::<Vec<u64>>());
    assert!(reader.footer().is_none() || reader.truncation().is_none());

    // Restart the recorder: it repairs the killed file, the server reconnects, a new file begins.
    let _rec2 = recorder(&traces, &rsock, &["--flush-ms", "50"]).await;
    eventually("server reconnects", Duration::from_secs(10), || {
        trace_files(&traces).len() == 2
    })
    .await;
    let after = drive(&sock, 5, 3).await;
    assert!(after.iter().all(|r| r.recorded));
    let last_seq = after.last().unwrap().seq;
    server.signal(libc::SIGTERM);
    let mut server = server;
    assert!(server.wait_exit(Duration::from_secs(5)).unwrap().success());

    let files = trace_files(&traces);
    assert_eq!(files.len(), 2);
    let repaired = trace_lines(&files.iter().find(|f| **f == killed[0]).unwrap().clone());
    assert_eq!(
        repaired.last().unwrap()["ended_reason"],
        "recorder_lost",
        "repaired at start-up"
    );
    let second = trace_lines(files.iter().find(|f| **f != killed[0]).unwrap());
    let footer = second.last().unwrap();
    assert_eq!(footer["kind"], "footer");
    let records: Vec<u64> = second
        .iter()
        .filter(|l| l["kind"] == "request")
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        *records.last().unwrap(),
        last_seq,
        "seq continues across files"
    );
    // Books: records in the new file + its drops = the calls it spans.
    let total = footer["total_requests"].as_u64().unwrap();
    let dropped = footer["dropped_requests"].as_u64().unwrap();
    assert_eq!(records.len() as u64 + dropped, total, "{footer}");
    assert!(
        dropped >= 16,
        "outage drops are accounted in the new file: {footer}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_server_gets_client_lost_footer_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let traces = dir.path().join("traces");
    let rsock = dir.path().join("recorder.sock");
    let _rec = recorder(&traces, &rsock, &[]).await;
    let exp = dir.path().join("export");
    export(&exp, 0);
    let uri = format!("unix://{}", rsock.display());
    let (mut server, sock) = serve(dir.path(), &exp, &["--recorder", &uri]).await;
    drive(&sock, 4, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let killed_at = std::time::Instant::now();
    let file = trace_files(&traces).pop().unwrap();
    eventually("client_lost footer", Duration::from_secs(1), || {
        trace_lines(&file)
            .last()
            .is_some_and(|l| l["ended_reason"] == "client_lost")
    })
    .await;
    assert!(killed_at.elapsed() < Duration::from_secs(1));
    let lines = trace_lines(&file);
    assert_eq!(lines.iter().filter(|l| l["kind"] == "request").count(), 4);
    assert_eq!(lines.last().unwrap()["total_requests"], 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_full_logs_once_keeps_serving_reports_degraded_and_spares_other_disks() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    let _guard = mount_tmpfs(&small, "96k");

    let (full_sock, ok_sock) = (dir.path().join("r1.sock"), dir.path().join("r2.sock"));
    let rec_full = recorder(&small.join("traces"), &full_sock, &["--flush-ms", "20"]).await;
    let _rec_ok = recorder(&dir.path().join("traces"), &ok_sock, &[]).await;
    let exp = dir.path().join("export");
    export(&exp, 0);
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let (_a, a_sock) = serve(
        &a_dir,
        &exp,
        &[
            "--recorder",
            &format!("unix://{}", full_sock.display()),
            "--record-images",
            "full",
        ],
    )
    .await;
    let (mut b, b_sock) = serve(
        &b_dir,
        &exp,
        &["--recorder", &format!("unix://{}", ok_sock.display())],
    )
    .await;

    // Full-image records (~20 KB each) fill 96 KiB quickly; every Act still answers.
    let a = drive(&a_sock, 40, 1).await;
    assert_eq!(a.len(), 40);
    let bresp = drive(&b_sock, 10, 2).await;
    assert_eq!(bresp.len(), 10);
    eventually("degraded status", Duration::from_secs(5), || true).await;
    let status = timeout(recorder_status(&full_sock)).await.unwrap();
    assert!(status.degraded, "{status:?}");
    assert!(!status.degraded_reason.is_empty());
    let ok_status = timeout(recorder_status(&ok_sock)).await.unwrap();
    assert!(!ok_status.degraded);
    let slugs = rec_full.stderr().matches("record-disk-full").count();
    assert_eq!(slugs, 1, "logged once:\n{}", rec_full.stderr());
    // The other disk's session is complete.
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(Duration::from_secs(5)).unwrap().success());
    let bfile = trace_files(&dir.path().join("traces")).pop().unwrap();
    let lines = trace_lines(&bfile);
    assert_eq!(lines.len(), 12);
    assert_eq!(lines[11]["ended_reason"], "shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_record_streams_cannot_escape_dir_or_crash_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let traces = dir.path().join("traces");
    let rsock = dir.path().join("recorder.sock");
    let rec = recorder(&traces, &rsock, &["--max-message-mb", "1"]).await;
    let ch = reflex_proto::connect(&format!("unix://{}", rsock.display()))
        .await
        .unwrap();
    let mut c = pb::recorder_client::RecorderClient::new(ch).max_encoding_message_size(64 << 20);
    use pb::record_event::Event;
    let start = |id: &str| pb::RecordEvent {
        event: Some(Event::Start(pb::SessionStart {
            session_id: id.into(),
            model_hash: "0123456789abcdef".into(),
            image_mode: "hash_only".into(),
            ..Default::default()
        })),
    };
    // Wrong first message.
    let act_first = pb::RecordEvent {
        event: Some(Event::Act(pb::ActRecord::default())),
    };
    let e = timeout(c.record(tokio_stream::iter(vec![act_first])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Path tricks in the session id.
    for id in [
        "../../etc/evil-session",
        "/tmp/evil",
        "a/b/c/d/e/f/g/h",
        "..",
        "",
    ] {
        let e = timeout(c.record(tokio_stream::iter(vec![start(id)])))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{id}");
    }
    // A giant message.
    let big = pb::ActRecord {
        actions: vec![1.0; 600_000],
        ..Default::default()
    };
    let giant = vec![
        start("0123456789abcdef"),
        pb::RecordEvent {
            event: Some(Event::Act(big)),
        },
    ];
    // Refused by the transport; the session is closed without the record.
    match timeout(c.record(tokio_stream::iter(giant))).await {
        Err(status) => assert_ne!(status.code(), tonic::Code::Ok),
        Ok(summary) => assert_eq!(summary.into_inner().records_written, 0),
    }
    for f in trace_files(&traces) {
        assert!(
            trace_lines(&f).iter().all(|l| l["kind"] != "request"),
            "giant record written to {f:?}"
        );
    }
    // Nothing was written outside DIR, and the daemon still serves.
    assert!(!dir.path().join("etc").exists() && !Path::new("/tmp/evil").exists());
    for f in std::fs::read_dir(&traces).unwrap() {
        let name = f.unwrap().file_name().to_string_lossy().to_string();
        assert!(!name.contains(".."), "{name}");
    }
    assert!(timeout(recorder_status(&rsock)).await.is_some());
    assert!(rec.stderr().lines().all(|l| !l.contains("panicked")));
}

#[tokio::test(flavor = "multi_thread")]
async fn image_modes_keep_exactly_what_they_promise() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let img = jpeg(1);
    // The first 48 bytes of the image in base64: present iff bytes were stored.
    let b64_prefix = base64(&img[..48]);
    let sha = {
        use sha2::Digest;
        reflex_engine::config::hex(&sha2::Sha256::digest(&img))
    };
    for mode in ["full", "hash_only", "none"] {
        let traces = dir.path().join(format!("traces-{mode}"));
        let sdir = dir.path().join(format!("s-{mode}"));
        std::fs::create_dir_all(&sdir).unwrap();
        let (mut p, sock) = serve(
            &sdir,
            &exp,
            &[
                "--record",
                traces.to_str().unwrap(),
                "--record-images",
                mode,
            ],
        )
        .await;
        drive(&sock, 3, 1).await;
        p.signal(libc::SIGTERM);
        assert!(p.wait_exit(Duration::from_secs(5)).unwrap().success());
        let f = trace_files(&traces).pop().expect("a trace file");
        let text = trace_text(&f);
        let lines = trace_lines(&f);
        assert_eq!(lines.len(), 5, "{mode}: {text}");
        assert_eq!(lines[0]["redaction"]["image"], mode);
        let req = &lines[1]["request"];
        match mode {
            "full" => {
                assert!(text.contains(&b64_prefix));
                assert_eq!(req["image_sha256"], sha.as_str());
            }
            "hash_only" => {
                assert!(!text.contains(&b64_prefix));
                assert_eq!(req["image_sha256"], sha.as_str());
                assert_eq!(req["images"][0]["sha256"], sha.as_str());
                assert!(req.get("image_b64").is_none());
            }
            _ => {
                assert!(!text.contains(&b64_prefix) && !text.contains(&sha));
                assert!(
                    req.get("images").is_none()
                        && req.get("image_sha256").is_none()
                        && req.get("image_b64").is_none()
                );
            }
        }
    }
}

/// Regression: a request naming two primary images (`image_b64` and `images[0].data`) was
/// refused by the service's validation, while the record kept `images[0]` as the primary and
/// dropped `image_b64` (server and recorder alike), so the recorded request replayed as a
/// valid call. One rule now (`reflex_proto::images`): the same answer from Act, from
/// ActStream, in the trace line, and from a replay of that line's `request` with grpcurl.
#[tokio::test(flavor = "multi_thread")]
async fn two_primary_images_get_one_answer_from_act_stream_trace_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let exp = dir.path().join("export");
    export(&exp, 0);
    let traces = dir.path().join("traces");
    let sdir = dir.path().join("s");
    std::fs::create_dir_all(&sdir).unwrap();
    let (mut p, sock) = serve(
        &sdir,
        &exp,
        &[
            "--record",
            traces.to_str().unwrap(),
            "--record-images",
            "full",
        ],
    )
    .await;
    let (primary, other) = (jpeg(1), jpeg(2));
    let mut two = act_request(1, Some(7));
    assert_eq!(
        (two.images[0].camera.as_str(), &two.images[0].data),
        ("base", &primary)
    );
    two.image_b64 = other.clone();
    const WANT: &str = "image_b64 and images[0].data are both set; send the primary image once";

    let mut c = policy_client(&format!("unix://{}", sock.display())).await;
    let status = timeout(c.act(two.clone())).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), WANT);
    let mut stream = timeout(c.act_stream(tokio_stream::iter(vec![two.clone()])))
        .await
        .unwrap()
        .into_inner();
    let answer = timeout(stream.message()).await.unwrap().unwrap();
    let err = answer.error.expect("refused on the stream too");
    assert_eq!(
        (err.code.as_str(), err.message.as_str()),
        ("INVALID_ARGUMENT", WANT)
    );
    assert_eq!(answer.seq, 1);
    drop(stream);

    // The private recorder may still be starting (these calls fail fast): its file first,
    // so that SIGTERM does not end the session before it could be delivered.
    eventually("a trace file", Duration::from_secs(10), || {
        !trace_files(&traces).is_empty()
    })
    .await;
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(5)).unwrap().success());
    let f = trace_files(&traces).pop().expect("a trace file");
    let lines = trace_lines(&f);
    assert_eq!(lines.len(), 4, "header, two calls, footer");
    let sha = |b: &[u8]| {
        use sha2::Digest;
        reflex_engine::config::hex(&sha2::Sha256::digest(b))
    };
    for (seq, line) in lines[1..3].iter().enumerate() {
        assert_eq!(line["seq"], seq as u64);
        assert_eq!(line["error"]["slug"], "invalid-argument", "{line}");
        assert_eq!(line["error"]["message"], WANT);
        let req = &line["request"];
        // Both primaries as sent, each with its own hash: no reader picked one.
        assert_eq!(req["images"][0]["camera"], "base");
        assert_eq!(req["images"][0]["data"], base64(&primary).as_str());
        assert_eq!(req["images"][0]["sha256"], sha(&primary).as_str());
        assert_eq!(req["image_b64"], base64(&other).as_str());
        assert_eq!(req["image_sha256"], sha(&other).as_str());
    }

    // The recorded request, sent as is, is refused the same way.
    let (_q, sock2) = serve(&sdir, &exp, &[]).await;
    let body = lines[1]["request"].to_string();
    let out = std::process::Command::new("grpcurl")
        .args(["-plaintext", "-d", &body, "-unix", sock2.to_str().unwrap()])
        .arg("reflex.v1.Policy/Act")
        .output()
        .expect("grpcurl is installed");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the replay was answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        said.contains("InvalidArgument") && said.contains(WANT),
        "{said}"
    );
}

/// Regression: the README's `grpcurl -plaintext -unix /run/reflex/recorder.sock
/// reflex.v1.Recorder/Status` failed with `RST_STREAM PROTOCOL_ERROR` (grpcurl sends the
/// socket path as `:authority`, and the recorder's listener lacked the server's rewrite),
/// and without a `.proto` grpcurl found no service (no reflection).
#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_recorder_status_no_rst_stream_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    let traces = dir.path().join("traces");
    let rsock = dir.path().join("run/recorder.sock");
    let _rec = recorder(&traces, &rsock, &[]).await;
    let status = grpcurl_recorder_status(&rsock);
    assert_eq!(status["dir"], traces.display().to_string(), "{status}");
    assert_eq!(
        status["reflex_version"],
        env!("CARGO_PKG_VERSION"),
        "{status}"
    );
    assert!(status.get("degraded").is_none(), "not degraded: {status}");
}
