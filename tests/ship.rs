//! `reflex ship` end to end: a real recorder writes traces, a real S3-compatible server
//! (s3s-fs, see `deploy/ci-setup.sh`) receives them, and every test reads the bucket back:
//! object list, sizes, SHA-256 equal to the local files, record counts in the manifests
//! equal to what the recorder wrote. The faults: the server killed mid-multipart, 500s and
//! connection resets from a proxy, wrong credentials, the shipper killed -9 mid-upload, a
//! trace still being written, a disk that fills while shipping.

mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use reflex_proto::v1 as pb;
use tokio::sync::mpsc;
use util::s3::{self, Fault, FaultProxy, S3Server};
use util::*;

const ROBOT: &str = "arm-07";
const PREFIX: &str = "traces";
const MODEL: &str = "0123456789abcdef";

/// One session fed straight into the recorder's socket: start, `records` acts of
/// `floats` pseudo-random action values each (incompressible enough to make big files),
/// end. Returns the recorder's summary.
async fn record_session(
    sock: &Path,
    session: &str,
    records: u64,
    floats: usize,
) -> pb::RecordSummary {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(open_session(sock.to_path_buf(), rx));
    tx.send(start(session)).await.unwrap();
    for seq in 0..records {
        tx.send(act(seq, floats)).await.unwrap();
    }
    tx.send(end(records)).await.unwrap();
    drop(tx);
    timeout(task).await.unwrap()
}

async fn open_session(sock: PathBuf, rx: mpsc::Receiver<pb::RecordEvent>) -> pb::RecordSummary {
    let ch = reflex_proto::connect(&format!("unix://{}", sock.display()))
        .await
        .unwrap();
    let mut c = pb::recorder_client::RecorderClient::new(ch).max_encoding_message_size(64 << 20);
    c.record(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner()
}

fn start(session: &str) -> pb::RecordEvent {
    pb::RecordEvent {
        event: Some(pb::record_event::Event::Start(pb::SessionStart {
            session_id: session.into(),
            model_hash: MODEL.into(),
            image_mode: "hash_only".into(),
            ..Default::default()
        })),
    }
}

fn act(seq: u64, floats: usize) -> pb::RecordEvent {
    // xorshift: cheap, deterministic, and full of entropy in the low bits.
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let actions = (0..floats)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / 16_777_216.0
        })
        .collect();
    pb::RecordEvent {
        event: Some(pb::record_event::Event::Act(pb::ActRecord {
            seq,
            actions,
            num_actions: 1,
            action_dim: floats as u32,
            ..Default::default()
        })),
    }
}

fn end(total: u64) -> pb::RecordEvent {
    pb::RecordEvent {
        event: Some(pb::record_event::Event::End(pb::SessionEnd {
            reason: "shutdown".into(),
            total_requests: total,
            ..Default::default()
        })),
    }
}

/// A test's world: temp dir, recorder, S3 server.
struct World {
    dir: tempfile::TempDir,
    traces: PathBuf,
    sock: PathBuf,
    _recorder: Proc,
    s3: S3Server,
    /// file name → records written, from the recorder's own summaries.
    written: BTreeMap<String, u64>,
}

impl World {
    async fn new() -> World {
        World::with_traces(None).await
    }

    async fn with_traces(traces: Option<PathBuf>) -> World {
        let dir = tempfile::tempdir().unwrap();
        let traces = traces.unwrap_or_else(|| dir.path().join("traces"));
        let sock = dir.path().join("recorder.sock");
        let recorder = recorder(&traces, &sock, &["--flush-ms", "20"]).await;
        let s3 = S3Server::start(&dir.path().join("s3"));
        World {
            dir,
            traces,
            sock,
            _recorder: recorder,
            s3,
            written: BTreeMap::new(),
        }
    }

    async fn record(&mut self, session: &str, records: u64, floats: usize) {
        let s = record_session(&self.sock, session, records, floats).await;
        assert_eq!(s.records_written, records);
        let name = Path::new(&s.file)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        self.written.insert(name, records);
    }

    fn ship_args<'a>(&'a self, endpoint: &'a str, extra: &[&'a str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "ship",
            "--dir",
            self.traces.to_str().unwrap(),
            "--to",
            &format!("s3://{}/{PREFIX}", s3::BUCKET),
            "--robot",
            ROBOT,
            "--endpoint",
            endpoint,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// `reflex ship ... --once`, bounded.
    fn ship_once(&self, endpoint: &str, extra: &[&str], creds: (&str, &str)) -> Output {
        let mut args = self.ship_args(endpoint, extra);
        args.push("--once".into());
        run_bounded(
            Command::new(BIN)
                .args(&args)
                .env("RUST_LOG", "info")
                .env("AWS_ACCESS_KEY_ID", creds.0)
                .env("AWS_SECRET_ACCESS_KEY", creds.1)
                .env("HOME", self.dir.path()),
        )
    }

    /// The shipper as a daemon.
    fn ship_daemon(&self, endpoint: &str, extra: &[&str]) -> Proc {
        let args = self.ship_args(endpoint, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::start(
            "reflex ship",
            &args,
            &[
                ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY),
                ("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY),
                ("HOME", self.dir.path().to_str().unwrap()),
            ],
        )
    }

    /// Local closed files: name → (size, sha256, records, key).
    fn local(&self) -> BTreeMap<String, (u64, String, u64, String)> {
        self.written
            .iter()
            .map(|(name, records)| {
                let (size, sha, key) = local_file(&self.traces.join(name), PREFIX, ROBOT);
                (name.clone(), (size, sha, *records, key))
            })
            .collect()
    }

    /// The bucket holds exactly `expect` (from [`World::local`]): one data object per file
    /// with its size and SHA-256, one manifest per file with the same and the records.
    async fn assert_bucket(&self, expect: &BTreeMap<String, (u64, String, u64, String)>) {
        let store = s3::bucket(&self.s3.endpoint());
        let objects = s3::objects(&store, PREFIX).await;
        let manifest_root = format!("{PREFIX}/robot={ROBOT}/_manifest/");
        let (manifests, data): (BTreeMap<_, _>, BTreeMap<_, _>) = objects
            .into_iter()
            .partition(|(k, _)| k.starts_with(&manifest_root));
        let want: BTreeMap<String, (u64, String)> = expect
            .values()
            .map(|(size, sha, _, key)| (key.clone(), (*size, sha.clone())))
            .collect();
        assert_eq!(data, want, "data objects (key → size, sha256)");
        assert_eq!(
            manifests.len(),
            expect.len(),
            "one manifest per file: {manifests:?}"
        );
        for (name, (size, sha, records, key)) in expect {
            let line = s3::manifest(&store, &format!("{manifest_root}{name}.json")).await;
            assert_eq!(line["key"], key.as_str());
            assert_eq!(line["size"], *size);
            assert_eq!(line["sha256"], sha.as_str());
            assert_eq!(line["records"], *records, "{name}");
        }
    }
}

/// A local trace file's size, SHA-256 and the key it must have in the bucket.
fn local_file(path: &Path, prefix: &str, robot: &str) -> (u64, String, String) {
    local_file_of(path, prefix, robot, MODEL)
}

/// `local_file` for a trace of the model `model` (a real server's export).
fn local_file_of(path: &Path, prefix: &str, robot: &str, model: &str) -> (u64, String, String) {
    let name = path.file_name().unwrap().to_string_lossy();
    let bytes = std::fs::read(path).unwrap();
    let header = reflex_recorder::TraceReader::open(path)
        .unwrap()
        .header()
        .clone();
    let key = format!(
        "{prefix}/robot={robot}/date={}/model={model}/{name}",
        &header.started_at[..10]
    );
    (bytes.len() as u64, s3::sha256_hex(&bytes), key)
}

fn run_bounded(cmd: &mut Command) -> Output {
    run_bounded_for(cmd, Duration::from_secs(60))
}

fn text(o: &Output) -> String {
    output_text(o)
}

/// The plain path, and what "a trace still being written is never shipped" means: one
/// session stays open while the shipper runs; its file is not shipped, not counted as a
/// failure, and goes up once it is closed. A second run uploads nothing.
#[tokio::test(flavor = "multi_thread")]
async fn once_ships_closed_files_verified_and_never_an_open_one_nor_twice() {
    let mut w = World::new().await;
    w.record("session-a1", 40, 350).await;
    // Big enough for a multipart upload of 5 MiB parts.
    w.record("session-b2", 30, 60_000).await;
    // An open session: start and some acts, flushed, no end.
    let (tx, rx) = mpsc::channel(16);
    let open = tokio::spawn(open_session(w.sock.clone(), rx));
    tx.send(start("session-open")).await.unwrap();
    for seq in 0..5 {
        tx.send(act(seq, 350)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let open_file = trace_files(&w.traces)
        .into_iter()
        .find(|p| p.to_string_lossy().contains("session-open"))
        .expect("the open session's file exists");

    let expect = w.local();
    let out = w.ship_once(
        &w.s3.endpoint(),
        &["--part-mb", "5"],
        (s3::ACCESS_KEY, s3::SECRET_KEY),
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("shipped 2 file(s)") && stdout.contains("open=1"),
        "{}",
        text(&out)
    );
    assert!(
        expect.values().any(|v| v.0 > 5 << 20),
        "one file needs multipart"
    );
    w.assert_bucket(&expect).await;
    let state = std::fs::read_to_string(w.traces.join(".reflex-ship.json")).unwrap();
    assert!(!state.contains("session-open"), "{state}");

    // Again: nothing to do, nothing uploaded.
    let again = w.ship_once(&w.s3.endpoint(), &[], (s3::ACCESS_KEY, s3::SECRET_KEY));
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("shipped 0 file(s)"),
        "{}",
        text(&again)
    );
    w.assert_bucket(&expect).await;

    // Close the session: now it ships, and with --delete-after-upload every shipped file
    // leaves the disk (after its verification).
    tx.send(act(5, 350)).await.unwrap();
    tx.send(end(6)).await.unwrap();
    drop(tx);
    let summary = timeout(open).await.unwrap();
    assert_eq!(summary.records_written, 6);
    w.written.insert(
        open_file
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned(),
        6,
    );
    let expect = w.local();
    let third = w.ship_once(
        &w.s3.endpoint(),
        &["--delete-after-upload"],
        (s3::ACCESS_KEY, s3::SECRET_KEY),
    );
    assert!(third.status.success(), "{}", text(&third));
    assert!(
        String::from_utf8_lossy(&third.stdout).contains("shipped 1 file(s)"),
        "{}",
        text(&third)
    );
    w.assert_bucket(&expect).await;
    assert!(trace_files(&w.traces).is_empty(), "deleted after upload");
}

/// 500s and connection resets (one mid-part) from a proxy: retried with backoff
/// (`slug=ship-retry`), and the bucket ends up exact.
#[tokio::test(flavor = "multi_thread")]
async fn http_500s_and_connection_resets_are_retried_to_an_exact_bucket() {
    let mut w = World::new().await;
    w.record("session-c3", 20, 350).await;
    w.record("session-d4", 25, 60_000).await;
    let expect = w.local();
    // Kept-alive connections carry many requests: each fault ends its connection, and the
    // next one gets the next fault. The 2 and 3 MiB resets land inside a 5 MiB part.
    let plan = vec![
        Fault::Status500,
        Fault::ResetAfter(200),
        Fault::ResetAfter(2 << 20),
        Fault::Status500,
        Fault::ResetAfter(3 << 20),
    ];
    let proxy = FaultProxy::start(w.s3.port, plan).await;
    let out = w.ship_once(
        &proxy.endpoint(),
        &["--part-mb", "5", "--attempts", "12"],
        (s3::ACCESS_KEY, s3::SECRET_KEY),
    );
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ship-retry"), "{}", text(&out));
    assert!(
        proxy.faults_done.load(std::sync::atomic::Ordering::SeqCst) == 5,
        "every fault was hit"
    );
    w.assert_bucket(&expect).await;
}

/// Wrong credentials, a missing bucket, a bad URL: one clear error, exit 1 (64 for the
/// URL), nothing uploaded, nothing deleted.
#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_or_bucket_are_a_clear_error_and_nothing_is_deleted() {
    let mut w = World::new().await;
    w.record("session-e5", 10, 350).await;
    let before = trace_files(&w.traces);
    let out = w.ship_once(
        &w.s3.endpoint(),
        &["--delete-after-upload"],
        (s3::ACCESS_KEY, "not-the-secret"),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: cannot use s3://fleet/traces"),
        "{}",
        text(&out)
    );
    assert!(stderr.contains("ship-failed"), "{}", text(&out));
    assert_eq!(trace_files(&w.traces), before, "nothing deleted");
    assert!(
        s3::objects(&s3::bucket(&w.s3.endpoint()), "")
            .await
            .is_empty()
    );

    let mut args = w.ship_args(&w.s3.endpoint(), &["--once"]);
    args[4] = "s3://no-such-bucket/x".into();
    let out = run_bounded(
        Command::new(BIN)
            .args(&args)
            .env("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("error: cannot use s3://no-such-bucket/x"),
        "{}",
        text(&out)
    );

    args[4] = "fleet/x".into();
    let out = run_bounded(Command::new(BIN).args(&args));
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not an s3://BUCKET/PREFIX URL"),
        "{}",
        text(&out)
    );
    // No credentials at all.
    let out = run_bounded(
        Command::new(BIN)
            .args(w.ship_args(&w.s3.endpoint(), &["--once"]))
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("HOME", w.dir.path()),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no credentials"),
        "{}",
        text(&out)
    );
    assert_eq!(trace_files(&w.traces), before, "nothing deleted");
}

/// The S3 server killed -9 while a multipart upload is under way, and started again on the
/// same folder: the shipper retries, no partial object is ever listed, the bucket ends
/// exact.
#[tokio::test(flavor = "multi_thread")]
async fn s3_server_killed_mid_multipart_and_restarted() {
    let mut w = World::new().await;
    w.record("session-f6", 40, 60_000).await;
    let expect = w.local();
    // 40 Mbit/s: 5 MiB parts a second apart.
    let ship = w.ship_daemon(
        &w.s3.endpoint(),
        &[
            "--part-mb",
            "5",
            "--max-mbps",
            "40",
            "--interval-secs",
            "1",
            "--attempts",
            "20",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    ship.wait_for_log("credentials");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.s3.kill();
    // Down for longer than a part's pause: the next part finds no server.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    w.s3.restart();
    // No object is visible before the upload completes.
    let listed = s3::objects(&s3::bucket(&w.s3.endpoint()), PREFIX).await;
    assert!(
        listed.is_empty() || listed.len() == 2,
        "whole or nothing: {listed:?}"
    );
    ship.wait_for_log("already_there=");
    ship.wait_for_log("ship-retry");
    w.assert_bucket(&expect).await;
    // The backlog gauge and the counters, as Prometheus scrapes them, once a pass has ended.
    ship.wait_for_log("uploaded=1");
    let line = ship.wait_for_log("serving Prometheus metrics");
    let at = line.find("http://").unwrap() + "http://".len();
    let addr = line[at..].split('/').next().unwrap().to_string();
    let text = scrape(&addr);
    for want in [
        "reflex_ship_backlog_files 0",
        "reflex_ship_backlog_bytes 0",
        "reflex_ship_uploaded_files_total 1",
        &format!(
            "reflex_ship_uploaded_bytes_total {}",
            expect.values().next().unwrap().0
        ),
    ] {
        assert!(text.lines().any(|l| l == want), "{want} in:\n{text}");
    }
    let retries = text
        .lines()
        .find_map(|l| l.strip_prefix("reflex_ship_retries_total "))
        .unwrap();
    assert!(retries.parse::<u64>().unwrap() >= 1, "{text}");
}

/// GET /metrics over plain HTTP/1.0.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    c.write_all(b"GET /metrics HTTP/1.0\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

/// The shipper killed -9 mid-upload and started again: nothing lost, nothing uploaded
/// twice (the second run finds what the first one finished in the bucket, or in its state).
#[tokio::test(flavor = "multi_thread")]
async fn shipper_killed_9_mid_upload_resumes_with_nothing_lost_or_twice() {
    let mut w = World::new().await;
    for i in 0..3 {
        w.record(&format!("session-g{i:02}x"), 20, 350).await;
    }
    w.record("session-h7", 40, 60_000).await;
    let expect = w.local();
    let ship = w.ship_daemon(
        &w.s3.endpoint(),
        &["--part-mb", "5", "--max-mbps", "40", "--interval-secs", "1"],
    );
    ship.wait_for_log("credentials");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ship.signal(libc::SIGKILL);
    let first = ship.stderr();
    drop(ship);
    let out = w.ship_once(
        &w.s3.endpoint(),
        &["--part-mb", "5"],
        (s3::ACCESS_KEY, s3::SECRET_KEY),
    );
    assert!(out.status.success(), "{}", text(&out));
    let second = String::from_utf8_lossy(&out.stderr).into_owned();
    // Every file was uploaded by exactly one of the runs.
    for name in expect.keys() {
        let uploaded = |log: &str| {
            log.lines()
                .filter(|l| {
                    l.contains("shipped")
                        && l.contains(name.as_str())
                        && l.contains("already_there=false")
                })
                .count()
        };
        assert_eq!(
            uploaded(&first) + uploaded(&second),
            1,
            "{name} uploaded once\nfirst:\n{first}\nsecond:\n{second}"
        );
    }
    w.assert_bucket(&expect).await;
}

/// The trace folder on a tiny file system that fills while the shipper runs: recording
/// the upload in the state fails (ENOSPC), nothing is deleted or lost, and once there is
/// room again the object already in the bucket is recognised, not uploaded again.
#[tokio::test(flavor = "multi_thread")]
async fn local_disk_full_while_shipping_loses_nothing_and_uploads_nothing_twice() {
    let outer = tempfile::tempdir().unwrap();
    let small = outer.path().join("small");
    let _unmount = mount_tmpfs(&small, "2m");
    let mut w = World::with_traces(Some(small.join("traces"))).await;
    w.record("session-i8", 30, 350).await;
    let expect = w.local();
    // Shipping is on (the state file exists), then the disk fills up.
    reflex_recorder::shipped::ShipState::default()
        .save(&w.traces)
        .unwrap();
    let filler = small.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 4 << 20]);
    // The upload succeeds, recording it in the state cannot.
    let full = w.ship_once(
        &w.s3.endpoint(),
        &["--attempts", "2", "--delete-after-upload"],
        (s3::ACCESS_KEY, s3::SECRET_KEY),
    );
    assert_eq!(full.status.code(), Some(1), "{}", text(&full));
    assert!(
        String::from_utf8_lossy(&full.stderr).contains("ship-failed"),
        "{}",
        text(&full)
    );
    assert_eq!(
        trace_files(&w.traces).len(),
        1,
        "nothing deleted while unrecorded"
    );
    w.assert_bucket(&expect).await;
    // Room again: recognised in the bucket, recorded, deleted; not uploaded again.
    std::fs::remove_file(&filler).unwrap();
    let after = w.ship_once(
        &w.s3.endpoint(),
        &["--delete-after-upload"],
        (s3::ACCESS_KEY, s3::SECRET_KEY),
    );
    assert!(after.status.success(), "{}", text(&after));
    assert!(
        String::from_utf8_lossy(&after.stdout)
            .contains("shipped 0 file(s), 0 bytes; 1 already in the bucket"),
        "{}",
        text(&after)
    );
    assert!(trace_files(&w.traces).is_empty());
    w.assert_bucket(&expect).await;
}

/// The fleet soak (the "done when"): `ROBOTS` robots (default 50), each a real
/// `reflex serve` of the reference export recording through its own `reflex recorder`
/// (rotating files every 1 MB so files close all the time) and driven by its own
/// `reflex bench load --target` (one client, Acts back to back; its books check runs at the
/// end), one shipper daemon per robot through a fault proxy (500s and resets on a
/// schedule), the S3 server killed and restarted every 45 s and one shipper killed -9 and
/// restarted every 20 s, for `SOAK_SECS` (default 300). Then every load run ends (its server
/// stopped, its session closed), every shipper runs once more, and the bucket must equal
/// the folders: 0 lost, 0 duplicated, 0 partial, and the manifests' record counts equal the
/// recorders'. Prints throughput and shipper CPU per MB. `SOAK_FEED=synthetic` feeds the
/// recorders synthetic records through their sockets instead of servers (20 a second each).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "fleet soak, minutes of CPU: ROBOTS=50 SOAK_SECS=300 cargo test --release --test ship -- --ignored fleet_soak --nocapture"]
async fn fleet_soak() {
    let env_num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let robots = env_num("ROBOTS", 50) as usize;
    let secs = env_num("SOAK_SECS", 300);
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3Server::start(&dir.path().join("s3"));
    // Every connection ends in a fault sooner or later (kept-alive ones would otherwise
    // carry everything): a 500, or a reset after 64 KiB to 2 MiB.
    let plan: Vec<Fault> = (0..1_000_000)
        .map(|i| match i % 4 {
            0 => Fault::Status500,
            1 => Fault::ResetAfter(64 << 10),
            2 => Fault::ResetAfter(512 << 10),
            _ => Fault::ResetAfter(2 << 20),
        })
        .collect();
    let proxy = FaultProxy::start(s3.port, plan).await;
    let endpoint = proxy.endpoint();
    struct Robot {
        traces: PathBuf,
        sock: PathBuf,
        _recorder: Proc,
        shipper: Option<Proc>,
        cpu_ticks: u64,
    }
    let ship_args = |traces: &Path, robot: usize| -> Vec<String> {
        [
            "ship",
            "--dir",
            traces.to_str().unwrap(),
            "--to",
            "s3://fleet/soak",
            "--robot",
            &format!("robot-{robot:03}"),
            "--endpoint",
            &endpoint,
            "--interval-secs",
            "2",
            "--attempts",
            "8",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let start_shipper = |traces: &Path, robot: usize| {
        let a = ship_args(traces, robot);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        Proc::start(
            &format!("ship {robot}"),
            &a,
            &[
                ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY),
                ("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY),
                ("RUST_LOG", "warn"),
            ],
        )
    };
    let ticks = |p: &Proc| -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", p.child.id())).unwrap_or_default();
        let f: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    };
    let synthetic = std::env::var("SOAK_FEED").is_ok_and(|v| v == "synthetic");
    let export_dir = dir.path().join("export");
    if !synthetic {
        export(&export_dir, 0);
    }
    let mut fleet = Vec::new();
    let mut feeders = Vec::new();
    let mut servers = Vec::new();
    let stop = tokio_util::sync::CancellationToken::new();
    for r in 0..robots {
        let traces = dir.path().join(format!("robot-{r:03}"));
        let sock = dir.path().join(format!("r{r}.sock"));
        let rec = recorder(&traces, &sock, &["--max-file-mb", "1"]).await;
        let shipper = start_shipper(&traces, r);
        if synthetic {
            let stop = stop.clone();
            let sock = sock.clone();
            feeders.push(tokio::spawn(async move {
                // One session per robot, 20 Act records a second of 7x50 actions.
                let (tx, rx) = mpsc::channel(64);
                let task = tokio::spawn(open_session(sock, rx));
                tx.send(start(&format!("soak-session-{r:04}")))
                    .await
                    .unwrap();
                let mut seq = 0;
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                while !stop.is_cancelled() {
                    tick.tick().await;
                    tx.send(act(seq, 350)).await.unwrap();
                    seq += 1;
                }
                tx.send(end(seq)).await.unwrap();
                drop(tx);
                task.await.unwrap()
            }));
        } else {
            // A real server per robot, recording through this robot's recorder.
            let listen = format!("unix://{}", dir.path().join(format!("s{r}.sock")).display());
            let recorder_uri = format!("unix://{}", sock.display());
            let server = Proc::start(
                &format!("serve {r}"),
                &[
                    "serve",
                    export_dir.to_str().unwrap(),
                    "--listen",
                    &listen,
                    "--recorder",
                    &recorder_uri,
                    "--workers",
                    "1",
                ],
                &[("RUST_LOG", "warn")],
            );
            wait_healthy(&listen, &server).await;
            servers.push((listen, server));
        }
        fleet.push(Robot {
            traces,
            sock,
            _recorder: rec,
            shipper: Some(shipper),
            cpu_ticks: 0,
        });
    }
    // The load tool, one process per server: one client each, for the whole soak; then it
    // stops its server with SIGTERM (the session's footer written) and checks the books
    // against the robot's trace folder.
    let mut loads = Vec::new();
    for (r, (listen, server)) in servers.iter().enumerate() {
        let out = dir.path().join(format!("load-{r:03}.out"));
        let child = Command::new(BIN)
            .args([
                "bench",
                "load",
                "--target",
                listen,
                "--clients",
                "1",
                "--secs",
                &secs.to_string(),
                "--warmup-secs",
                "0",
                "--server-pid",
                &server.child.id().to_string(),
                "--trace-dir",
                fleet[r].traces.to_str().unwrap(),
            ])
            .env("TMPDIR", dir.path())
            .stdout(std::process::Stdio::from(
                std::fs::File::create(&out).unwrap(),
            ))
            .stderr(std::process::Stdio::from(
                std::fs::File::create(out.with_extension("err")).unwrap(),
            ))
            .spawn()
            .unwrap();
        loads.push((child, out));
    }
    let t0 = std::time::Instant::now();
    let mut victim = 0;
    let mut next_kill = 20;
    let mut next_s3 = 45;
    let (mut kills, mut s3_restarts) = (0, 0);
    while t0.elapsed().as_secs() < secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let el = t0.elapsed().as_secs();
        if el >= next_kill {
            next_kill += 20;
            let r = &mut fleet[victim % robots];
            let p = r.shipper.take().unwrap();
            r.cpu_ticks += ticks(&p);
            p.signal(libc::SIGKILL);
            drop(p);
            r.shipper = Some(start_shipper(&r.traces, victim % robots));
            victim += 7;
            kills += 1;
        }
        if el >= next_s3 {
            next_s3 += 45;
            s3.kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
            s3.restart();
            s3_restarts += 1;
        }
    }
    stop.cancel();
    let mut records = 0;
    for f in feeders {
        records += timeout(f).await.unwrap().records_written;
    }
    // Every load run ends, its books balanced and its server stopped; then the recorders
    // say what they wrote.
    let mut acts_answered = 0u64;
    for (r, (mut child, out)) in loads.into_iter().enumerate() {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("load {r} did not finish: {}", read_to_string(&out));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let stdout = read_to_string(&out);
        assert!(
            st.success(),
            "load {r}: {st}\n{stdout}\n{}",
            read_to_string(&out.with_extension("err"))
        );
        if let Some(at) = stdout.find(" OK in") {
            let n: String = stdout[..at]
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect();
            acts_answered += n
                .chars()
                .rev()
                .collect::<String>()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    for (_, server) in &mut servers {
        assert!(
            server.wait_exit(Duration::from_secs(20)).is_some(),
            "{} still running",
            server.name
        );
    }
    if !synthetic {
        for r in &fleet {
            let mut st = recorder_status(&r.sock).await.unwrap();
            let deadline = std::time::Instant::now() + TIMEOUT;
            while !st.sessions.is_empty() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                st = recorder_status(&r.sock).await.unwrap();
            }
            assert!(st.sessions.is_empty(), "a session still open: {st:?}");
            records += st.records_written;
        }
    }
    // Stop the daemons (their CPU counted), then one last pass per robot straight to the
    // server.
    let mut cpu_ticks = 0;
    for r in &mut fleet {
        let mut p = r.shipper.take().unwrap();
        cpu_ticks += r.cpu_ticks + ticks(&p);
        p.signal(libc::SIGTERM);
        p.wait_exit(Duration::from_secs(10));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let store = s3::bucket(&s3.endpoint());
    let before_final = s3::objects(&store, "soak").await;
    let shipped_during: u64 = before_final
        .iter()
        .filter(|(k, _)| !k.contains("/_manifest/"))
        .map(|(_, (size, _))| size)
        .sum();
    for (i, r) in fleet.iter().enumerate() {
        let mut a = ship_args(&r.traces, i);
        a[8] = s3.endpoint();
        a.push("--once".into());
        let out = run_bounded(
            Command::new(BIN)
                .args(&a)
                .env("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY)
                .env("RUST_LOG", "warn"),
        );
        assert!(out.status.success(), "robot {i}: {}", text(&out));
    }
    // The bucket against the folders.
    let objects = s3::objects(&store, "soak").await;
    let (mut files, mut bytes, mut manifest_records) = (0u64, 0u64, 0u64);
    let mut expect = BTreeMap::new();
    let mut soak_model: Option<String> = None;
    for (i, r) in fleet.iter().enumerate() {
        for path in trace_files(&r.traces) {
            // Every robot serves the same export: one model hash, the synthetic one or
            // the reference export's.
            let model = reflex_recorder::TraceReader::open(&path)
                .unwrap()
                .header()
                .model_hash
                .clone();
            if synthetic {
                assert_eq!(model, MODEL);
            }
            assert_eq!(model, *soak_model.get_or_insert_with(|| model.clone()));
            let (size, sha, key) = local_file_of(&path, "soak", &format!("robot-{i:03}"), &model);
            expect.insert(key, (size, sha));
            files += 1;
            bytes += size;
        }
    }
    let mut data = BTreeMap::new();
    for (k, v) in &objects {
        if k.contains("/_manifest/") {
            let line = s3::manifest(&store, k).await;
            manifest_records += line["records"].as_u64().unwrap();
        } else {
            data.insert(k.clone(), v.clone());
        }
    }
    let lost = expect.keys().filter(|k| !data.contains_key(*k)).count();
    let extra = data.keys().filter(|k| !expect.contains_key(*k)).count();
    let differ = expect
        .iter()
        .filter(|(k, v)| data.get(*k).is_some_and(|d| d != *v))
        .count();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = cpu_ticks as f64 / hz;
    println!(
        "fleet soak ({}): {robots} robots, {elapsed:.0} s: {files} files, {bytes} bytes, {records} records \
         written; {} bytes shipped during the run ({:.2} MB/s); shipper CPU {cpu:.1} s ({:.3} CPU s per MB shipped); \
         manifests count {manifest_records} records; faults: {} proxy faults, {} S3 server restarts, {} shippers killed -9; \
         lost {lost}, duplicated/extra {extra}, partial/different {differ}",
        if synthetic {
            "synthetic records into the recorder sockets".to_string()
        } else {
            format!("real servers driven by reflex bench load, {acts_answered} Acts answered")
        },
        shipped_during,
        shipped_during as f64 / 1e6 / elapsed,
        cpu / (shipped_during as f64 / 1e6).max(1e-9),
        proxy.faults_done.load(std::sync::atomic::Ordering::SeqCst),
        s3_restarts,
        kills,
    );
    assert_eq!((lost, extra, differ), (0, 0, 0));
    assert_eq!(
        manifest_records, records,
        "records in the bucket = records written"
    );
}

/// Retention and shipping do not fight: with the shipper's state in the folder, the
/// recorder's --max-total-mb keeps every closed file not shipped yet (and says so), and
/// deletes shipped ones once they are verified in the bucket.
#[tokio::test(flavor = "multi_thread")]
async fn retention_keeps_unshipped_files_over_the_cap_and_deletes_shipped_ones() {
    let dir = tempfile::tempdir().unwrap();
    let traces = dir.path().join("traces");
    let sock = dir.path().join("recorder.sock");
    std::fs::create_dir_all(&traces).unwrap();
    // Shipping is on before anything is recorded.
    reflex_recorder::shipped::ShipState::default()
        .save(&traces)
        .unwrap();
    let rec = recorder(&traces, &sock, &["--max-total-mb", "1"]).await;
    let s3 = S3Server::start(&dir.path().join("s3"));
    let mut w = World {
        dir,
        traces,
        sock,
        _recorder: rec,
        s3,
        written: BTreeMap::new(),
    };
    // Three files of ~0.6 MB each: 1.8 MB against a 1 MB cap.
    for i in 0..3 {
        w.record(&format!("session-k{i:02}x"), 250, 350).await;
    }
    assert_eq!(trace_files(&w.traces).len(), 3, "nothing deleted unshipped");
    w._recorder.wait_for_log("record-held-back");
    let expect = w.local();
    let out = w.ship_once(&w.s3.endpoint(), &[], (s3::ACCESS_KEY, s3::SECRET_KEY));
    assert!(out.status.success(), "{}", text(&out));
    w.assert_bucket(&expect).await;
    // The next closed file triggers a retention pass: shipped files go, oldest first,
    // down to the cap; the new, unshipped one stays.
    w.record("session-k99x", 10, 350).await;
    let left = trace_files(&w.traces);
    assert!(left.len() < 4, "{left:?}");
    assert!(
        left.iter()
            .any(|p| p.to_string_lossy().contains("session-k99x")),
        "{left:?}"
    );
    let total: u64 = left.iter().map(|p| p.metadata().unwrap().len()).sum();
    assert!(total <= 1 << 20, "{total} bytes left");
}
