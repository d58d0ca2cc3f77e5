//! The server under overload, as a real process with its real recorder: refusals cost no
//! work and no record but are counted in the footer; a call whose `grpc-timeout` passes in
//! the queue is answered DEADLINE_EXCEEDED and not run; one connection flooding the server
//! cannot take the places of the others.

mod util;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reflex_proto::v1 as pb;
use tonic::Code;
use util::*;

/// A reference export and `reflex serve` on it with `args` (and, when `record`, a private
/// recorder writing `<dir>/traces`); the temp dir, the server, its target URI, the traces.
async fn serving(args: &[&str], record: bool) -> (tempfile::TempDir, Proc, String, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let export_dir = dir.path().join("export");
    export(&export_dir, 7);
    let traces = dir.path().join("traces");
    let mut all = args.to_vec();
    if record {
        all.extend(["--record", traces.to_str().unwrap()]);
    }
    let (server, sock) = serve(dir.path(), &export_dir, &all).await;
    let target = format!("unix://{}", sock.display());
    (dir, server, target, traces)
}

/// The one trace file of the server's session and its parsed lines, after a clean stop.
fn stop_and_read(mut server: Proc, traces: &Path) -> Vec<serde_json::Value> {
    server.signal(libc::SIGTERM);
    let st = server
        .wait_exit(Duration::from_secs(30))
        .expect("server exits");
    assert!(st.success(), "{st}\n{}", server.stderr());
    let files = trace_files(traces);
    assert_eq!(files.len(), 1, "{files:?}");
    trace_lines(&files[0])
}

fn requests(lines: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    lines.iter().filter(|l| l["kind"] == "request").collect()
}

fn footer(lines: &[serde_json::Value]) -> &serde_json::Value {
    lines
        .iter()
        .find(|l| l["kind"] == "footer")
        .expect("a footer")
}

/// 129,442 refusals at 128 clients were each decoded, hashed and written as an error
/// record: the server spent most of its CPU saying no. A refusal is now answered before
/// any work, gets no seq and no record, and the session's count is in the footer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refusals_are_counted_in_the_footer_not_written_one_by_one() {
    let (_dir, server, target, traces) =
        serving(&["--workers", "1", "--queue-depth", "2"], true).await;
    let (mut ok, mut refused, mut seqs) = (0u64, 0u64, vec![]);
    for round in 0..6u8 {
        // 16 robots at once, each on its own connection: far more than 1 worker + 2 places.
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..16u8 {
            let target = target.clone();
            calls.spawn(async move {
                let mut c = policy_client(&target).await;
                c.act(act_request(round * 16 + i, None)).await
            });
        }
        while let Some(r) = calls.join_next().await {
            match r.unwrap() {
                Ok(resp) => {
                    ok += 1;
                    seqs.push(resp.into_inner().seq);
                }
                Err(s) if s.code() == Code::ResourceExhausted => {
                    assert!(s.message().contains("queue is full"), "{s:?}");
                    // gRPC's server pushback: how long this client should wait.
                    let ms: u64 = s
                        .metadata()
                        .get("grpc-retry-pushback-ms")
                        .expect("pushback")
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    assert!((1..=3000).contains(&ms), "{ms}");
                    refused += 1;
                }
                Err(s) => panic!("unexpected answer {s:?}"),
            }
        }
    }
    assert!(refused > 0 && ok > 0, "ok {ok}, refused {refused}");
    // Seqs count the admitted calls only: no gaps for the refusals.
    seqs.sort_unstable();
    assert_eq!(seqs, (0..ok).collect::<Vec<_>>());

    let lines = stop_and_read(server, &traces);
    let reqs = requests(&lines);
    assert_eq!(reqs.len() as u64, ok, "one record per admitted call");
    assert!(
        reqs.iter().all(|r| r["error"].is_null()),
        "no refusal is written as a record"
    );
    let f = footer(&lines);
    assert_eq!(f["total_requests"], ok, "{f}");
    assert_eq!(f["refused_requests"], refused, "{f}");
}

/// A call whose `grpc-timeout` ran out while it waited for a worker was still run, late,
/// for nobody. It is now answered DEADLINE_EXCEEDED by the server (recorded, with its seq),
/// and the worker skips it.
///
/// The one worker is held by a call that takes long for a reason of its own (two cameras
/// of 4096x4096 pixels to decode and resize), timed on this machine first; the short calls
/// arrive while it runs, with deadlines well inside its time. (Forty short calls used to be
/// the whole load: they only outlasted their deadlines while other tests loaded the
/// machine, and alone on two idle cores all forty finished in time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_whose_deadline_passes_in_the_queue_is_answered_and_not_run() {
    let (_dir, server, target, traces) = serving(
        &[
            "--workers",
            "1",
            "--queue-depth",
            "64",
            "--queue-per-connection",
            "64",
        ],
        true,
    )
    .await;
    let sock = target.strip_prefix("unix://").unwrap().to_string();
    let mut c = policy_client(&target).await;
    // Warm the engine so that the first call's set-up does not count.
    c.act(act_request(0, None)).await.unwrap();
    // Built before anything is timed: encoding the JPEGs takes longer than decoding them.
    // Two sets of pixels: the prefix cache must not answer the second without decoding.
    let (measured, holding) = (heavy_request(1), heavy_request(2));
    let started = Instant::now();
    c.act(measured).await.unwrap();
    let held = started.elapsed();
    eprintln!("a heavy call takes {held:?}");

    let blocker = {
        let sock = sock.clone();
        tokio::spawn(async move { client_without_timer(&sock).await.act(holding).await })
    };
    // The blocker is the only call: a worker takes it at once. The short calls come a
    // quarter of its time later and fall due between a quarter and a half of it after that.
    tokio::time::sleep(held / 4).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..40u32 {
        let sock = sock.clone();
        // Spread out, so that the expired answers do not all fall due in the same
        // millisecond: on a loaded machine a stampede of them, each recording its answer,
        // could let tonic's server-side timer drop some first.
        let deadline = (held / 4 + held * i / 160).max(Duration::from_millis(20));
        calls.spawn(async move {
            let mut c = client_without_timer(&sock).await;
            let mut req = tonic::Request::new(act_request(i as u8 + 1, None));
            req.set_timeout(deadline);
            c.act(req).await
        });
    }
    let (mut ok, mut expired, mut cancelled) = (2u64, 0u64, 0u64);
    while let Some(r) = calls.join_next().await {
        match r.unwrap() {
            Ok(_) => ok += 1,
            Err(s) if s.code() == Code::DeadlineExceeded => {
                assert!(s.message().contains("it was not run"), "{s:?}");
                expired += 1;
            }
            // The transport's own timer for the same deadline can still win the race on a
            // busy machine: the client then hears tonic's CANCELLED, though the server
            // recorded its own answer.
            Err(s) if s.code() == Code::Cancelled => cancelled += 1,
            Err(s) => panic!("unexpected answer {s:?}"),
        }
    }
    timeout(blocker)
        .await
        .unwrap()
        .expect("the call holding the worker is answered");
    ok += 1;
    eprintln!("ok {ok}, expired {expired}, cancelled {cancelled}");
    assert!(
        expired > 0,
        "ok {ok}, expired {expired}, cancelled {cancelled}"
    );

    let lines = stop_and_read(server, &traces);
    let reqs = requests(&lines);
    let late: Vec<_> = reqs
        .iter()
        .filter(|r| r["error"]["slug"] == "deadline-exceeded")
        .collect();
    assert!(
        (expired..=expired + cancelled).contains(&(late.len() as u64)),
        "each expired answer is recorded: {} records, {expired} DEADLINE_EXCEEDED + {cancelled} CANCELLED answers",
        late.len()
    );
    for r in &late {
        // Not run: no actions, no stage times, only the time it waited.
        assert_eq!(
            r["response"]["actions"].as_array().map_or(0, Vec::len),
            0,
            "{r}"
        );
        assert_eq!(
            r["latency"]["stages"]["denoise_ms"].as_f64().unwrap_or(0.0),
            0.0,
            "{r}"
        );
    }
    let ok_records = reqs.iter().filter(|r| r["error"].is_null()).count() as u64;
    assert!(
        (ok..=ok + cancelled).contains(&ok_records),
        "{ok_records} OK records for {ok} OK answers"
    );
}

/// An Act call that costs a worker far more than [`act_request`]: both cameras at the
/// largest size the server decodes (4096x4096), resized to the model's 224. Each `shade`
/// gives other pixels.
fn heavy_request(shade: u8) -> pb::ActRequest {
    let data = jpeg_of_side(shade, reflex_engine::preprocess::MAX_SIDE);
    let mut req = act_request(0, None);
    req.images = ["base", "wrist"]
        .into_iter()
        .map(|camera| pb::Image {
            camera: camera.into(),
            data: data.clone(),
            sha256: String::new(),
        })
        .collect();
    req
}

/// A Policy client on its own HTTP/2 connection to the Unix socket `sock` that sends a
/// call's `grpc-timeout` but keeps no timer of its own for it.
///
/// tonic's `Channel` starts its timer for the header's deadline before the call leaves, so
/// it always runs out before the server's (counted from when the call arrived): on a loaded
/// machine, where the call takes longer to arrive than the server's margin (a tenth of the
/// time, at most 5 ms), the client dropped every late call itself (CANCELLED, CI run of stop
/// 24) and never heard the server's answer. A robot whose client has a timer hears
/// DEADLINE_EXCEEDED or its own timeout either way; this test is about the server's answer.
async fn client_without_timer(
    sock: &str,
) -> pb::policy_client::PolicyClient<
    tower::util::BoxCloneService<
        http::Request<tonic::body::Body>,
        http::Response<hyper::body::Incoming>,
        hyper::Error,
    >,
> {
    let io = hyper_util::rt::TokioIo::new(
        timeout(tokio::net::UnixStream::connect(sock))
            .await
            .unwrap(),
    );
    let (send, conn) = timeout(hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        io,
    ))
    .await
    .unwrap();
    tokio::spawn(conn);
    let svc = tower::service_fn(move |req: http::Request<tonic::body::Body>| {
        let mut send = send.clone();
        async move { send.send_request(req).await }
    });
    pb::policy_client::PolicyClient::with_origin(
        tower::util::BoxCloneService::new(svc),
        "http://localhost".parse().unwrap(),
    )
}

/// One client sending 32 concurrent calls on one connection filled the whole queue, and
/// every other robot was refused. A connection now holds at most its share of the queue
/// (`--queue-per-connection`, default a quarter of it): the others always find a place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_flooding_one_connection_does_not_starve_the_others() {
    let (_dir, server, target, _) = serving(&["--workers", "1", "--queue-depth", "8"], false).await;
    let stop = tokio_util::sync::CancellationToken::new();

    // The flood: 32 calls in flight at all times on one HTTP/2 connection.
    let flood_client = policy_client(&target).await;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..32u8 {
        let mut c = flood_client.clone();
        let stop = stop.clone();
        flood.spawn(async move {
            let (mut ok, mut share) = (0u64, 0u64);
            while !stop.is_cancelled() {
                match c.act(act_request(i, None)).await {
                    Ok(_) => ok += 1,
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        assert!(s.message().contains("its share"), "{s:?}");
                        share += 1;
                    }
                    Err(s) => panic!("flood: {s:?}"),
                }
            }
            (ok, share)
        });
    }
    // Three robots, one connection each, one call at a time (a control loop).
    let mut robots = tokio::task::JoinSet::new();
    for r in 0..3u8 {
        let target = target.clone();
        robots.spawn(async move {
            let mut c = policy_client(&target).await;
            let mut times = vec![];
            for i in 0..30u8 {
                let t = Instant::now();
                let got = c.act(act_request(100 + r * 30 + i, None)).await;
                assert!(got.is_ok(), "robot {r} call {i}: {got:?}");
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times
        });
    }
    let mut times = vec![];
    while let Some(t) = robots.join_next().await {
        times.extend(t.unwrap());
    }
    stop.cancel();
    let (mut flood_ok, mut flood_refused) = (0, 0);
    while let Some(r) = flood.join_next().await {
        let (ok, share) = r.unwrap();
        flood_ok += ok;
        flood_refused += share;
    }
    times.sort_by(f64::total_cmp);
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    eprintln!(
        "robots: 90 calls, 0 refused, p50 {:.1} ms, p99 {p99:.1} ms; flood: {flood_ok} OK, {flood_refused} refused beyond its share",
        times[times.len() / 2]
    );
    assert!(flood_refused > 0, "the flood went over its share");
    drop(server);
}
