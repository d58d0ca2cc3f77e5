//! The daemon over real Unix sockets, with real files in temp dirs; every fault happens.

use super::*;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Instant;

use hyper_util::rt::TokioIo;
use reflex_proto::v1::recorder_client::RecorderClient;
use reflex_proto::v1::{ActRecord, SessionEnd};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::reader::TraceReader;
use crate::trace::{Footer, Record, RequestRecord};
use crate::writer::{TraceWriter, WriterOptions};

const T: Duration = Duration::from_secs(20);

/// A running daemon in a temp dir; cancelled on drop.
struct Daemon {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    socket: PathBuf,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), DaemonError>>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Daemon {
    async fn start(tweak: impl FnOnce(&mut RecorderConfig)) -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("traces");
        Self::start_in(tmp, dir, tweak).await
    }

    async fn start_in(
        tmp: tempfile::TempDir,
        dir: PathBuf,
        tweak: impl FnOnce(&mut RecorderConfig),
    ) -> Daemon {
        let socket = tmp.path().join("run/recorder.sock");
        let mut config = RecorderConfig::new(&dir);
        tweak(&mut config);
        let listener = bind(&socket).unwrap();
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(serve_with(listener, config, shutdown.clone(), move || {
            let _ = ready_tx.send(());
        }));
        timeout(ready_rx).await.unwrap();
        Daemon {
            _tmp: tmp,
            dir,
            socket,
            shutdown,
            task: Some(task),
        }
    }

    async fn client(&self) -> RecorderClient<Channel> {
        connect(&self.socket).await
    }

    async fn stop(&mut self) {
        self.shutdown.cancel();
        timeout(self.task.take().unwrap()).await.unwrap().unwrap();
    }

    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = match fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }

    async fn status(&self) -> RecorderStatus {
        timeout(self.client().await.status(StatusRequest {}))
            .await
            .unwrap()
            .into_inner()
    }
}

async fn timeout<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

async fn channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap()
}

async fn connect(path: &Path) -> RecorderClient<Channel> {
    RecorderClient::new(channel(path).await).max_encoding_message_size(usize::MAX)
}

fn start_event(session_id: &str) -> RecordEvent {
    RecordEvent {
        event: Some(Event::Start(SessionStart {
            session_id: session_id.into(),
            reflex_version: "0.1.0".into(),
            model_hash: "7a8b3c1d9f2e4a55".into(),
            config_hash: "e12f44c7b1a93802".into(),
            image_mode: "hash_only".into(),
            mode: "cpu".into(),
            ..Default::default()
        })),
    }
}

fn act(seq: u64) -> ActRecord {
    let mut a = crate::trace::tests::sample_act(seq, b"image-bytes");
    a.actions = (0..350)
        .map(|i| ((seq * 350 + i) as f32 * 0.37).sin())
        .collect();
    a.num_actions = 50;
    a
}

fn act_event(seq: u64) -> RecordEvent {
    RecordEvent {
        event: Some(Event::Act(act(seq))),
    }
}

fn end_event(reason: &str, total: u64, dropped: u64) -> RecordEvent {
    RecordEvent {
        event: Some(Event::End(SessionEnd {
            reason: reason.into(),
            total_requests: total,
            dropped_requests: dropped,
            ended_at: String::new(),
            refused_requests: 0,
        })),
    }
}

/// Header, requests, footer and truncation of one file.
fn read_trace(
    path: &Path,
) -> (
    crate::trace::Header,
    Vec<RequestRecord>,
    Option<Footer>,
    bool,
) {
    let mut r = TraceReader::open(path).unwrap();
    let mut reqs = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        if let Record::Request(q) = rec {
            reqs.push(*q);
        }
    }
    (
        r.header().clone(),
        reqs,
        r.footer().cloned(),
        r.truncation().is_some(),
    )
}

/// A session the test drives event by event.
struct Live {
    tx: mpsc::Sender<RecordEvent>,
    call: tokio::task::JoinHandle<Result<RecordSummary, Status>>,
}

async fn open(client: &mut RecorderClient<Channel>, session_id: &str) -> Live {
    let (tx, rx) = mpsc::channel(16);
    tx.send(start_event(session_id)).await.unwrap();
    let mut client = client.clone();
    let call = tokio::spawn(async move {
        client
            .record(ReceiverStream::new(rx))
            .await
            .map(|r| r.into_inner())
    });
    Live { tx, call }
}

async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_streams_write_two_files() {
    let d = Daemon::start(|_| {}).await;
    let run = |id: &'static str, n: u64| {
        let socket = d.socket.clone();
        tokio::spawn(async move {
            let mut c = connect(&socket).await;
            let mut events = vec![start_event(id)];
            events.extend((0..n).map(act_event));
            events.push(end_event("shutdown", n, 0));
            c.record(tokio_stream::iter(events))
                .await
                .unwrap()
                .into_inner()
        })
    };
    let (a, b) = (run("server-a-0001", 40), run("server-b-0002", 60));
    let (a, b) = (timeout(a).await.unwrap(), timeout(b).await.unwrap());
    assert_eq!((a.records_written, b.records_written), (40, 60));
    assert_ne!(a.file, b.file);
    assert_eq!(d.files(), {
        let mut v = vec![a.file.clone(), b.file.clone()];
        v.sort();
        v
    });
    for (summary, n, id) in [(&a, 40, "server-a-0001"), (&b, 60, "server-b-0002")] {
        let path = d.dir.join(&summary.file);
        assert!(
            summary.file.ends_with(&format!("-7a8b3c1d-{id}.jsonl.gz")),
            "{}",
            summary.file
        );
        assert_eq!(summary.bytes_written, fs::metadata(&path).unwrap().len());
        let (h, reqs, footer, truncated) = read_trace(&path);
        assert_eq!(h.session_id, id);
        assert_eq!(
            reqs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (0..n).collect::<Vec<_>>()
        );
        assert_eq!(
            reqs[3],
            RequestRecord::from_act(act(3), crate::ImageMode::HashOnly)
        );
        let f = footer.unwrap();
        assert_eq!(
            (f.ended_reason.as_str(), f.total_requests, f.records_written),
            ("shutdown", n, Some(n))
        );
        assert!(!truncated);
        assert_eq!(mode(&path), 0o640);
    }
    assert_eq!(mode(&d.dir), 0o750);
    assert!(
        fs::symlink_metadata(&d.socket)
            .unwrap()
            .file_type()
            .is_socket()
    );
    assert_eq!(mode(&d.socket), 0o660);
    let st = d.status().await;
    assert_eq!(
        (st.sessions_total, st.records_written, st.degraded),
        (2, 100, false)
    );
    assert!(st.sessions.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_client_gets_client_lost_footer_within_a_second() {
    let d = Daemon::start(|_| {}).await;
    let mut c = d.client().await;
    // (a) the stream ends without SessionEnd; (b) the call is torn down mid-stream.
    for (id, abort) in [("ended-0001", false), ("killed-0002", true)] {
        let live = open(&mut c, id).await;
        for seq in 5..15 {
            live.tx.send(act_event(seq)).await.unwrap();
        }
        let file = loop {
            let st = d.status().await;
            if let Some(s) = st
                .sessions
                .iter()
                .find(|s| s.session_id == id && s.records_written == 10)
            {
                break s.file.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let t0 = Instant::now();
        if abort {
            live.call.abort();
            drop(live.tx);
        } else {
            drop(live.tx);
        }
        let path = d.dir.join(&file);
        eventually("footer written", Duration::from_secs(1), || {
            TraceReader::open(&path)
                .map(|mut r| r.by_ref().flatten().count() == 11 && r.footer().is_some())
                .unwrap_or(false)
        })
        .await;
        let (h, reqs, footer, _) = read_trace(&path);
        let f = footer.unwrap();
        assert_eq!(f.ended_reason, "client_lost", "{id}");
        // No SessionEnd: the numbers come from the seqs (first_seq 0, last 14).
        assert_eq!(h.first_seq, 0);
        assert_eq!(
            (f.total_requests, f.dropped_requests, f.records_written),
            (15, Some(5), Some(10))
        );
        assert_eq!(reqs.len(), 10);
        println!("{id}: footer within {:?}", t0.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_continues_seqs_across_files() {
    let d = Daemon::start(|c| c.max_file_bytes = Some(40_000)).await;
    let mut c = d.client().await;
    let mut events = vec![start_event("rotating-0001")];
    events.extend((0..400).map(act_event));
    events.push(end_event("model_reload", 400, 0));
    let summary = timeout(c.record(tokio_stream::iter(events)))
        .await
        .unwrap()
        .into_inner();
    let files = d.files();
    assert!(files.len() >= 4, "{files:?}");
    assert_eq!(summary.file, *files.last().unwrap());
    assert_eq!(summary.records_written, 400);
    let mut next = 0;
    for (i, name) in files.iter().enumerate() {
        let (h, reqs, footer, truncated) = read_trace(&d.dir.join(name));
        assert!(!truncated);
        assert_eq!(h.first_seq, next, "{name}");
        assert!(!reqs.is_empty());
        for r in &reqs {
            assert_eq!(r.seq, next);
            next += 1;
        }
        let f = footer.unwrap();
        if i + 1 < files.len() {
            assert_eq!(f.ended_reason, "rotated");
            assert_eq!(
                (f.total_requests, f.dropped_requests),
                (reqs.len() as u64, Some(0))
            );
        } else {
            assert_eq!(f.ended_reason, "model_reload");
            assert_eq!(f.total_requests, 400, "the server's session totals");
        }
        assert_eq!(f.records_written, Some(reqs.len() as u64));
    }
    assert_eq!(next, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_total_deletes_oldest_closed_files_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("traces");
    fs::create_dir(&dir).unwrap();
    let old = |i: u32| format!("2020010{i}-000000-7a8b3c1d-oldsession.jsonl");
    for i in 1..=5 {
        // Closed plain traces (the footer on the last line), 100 kB each.
        let mut text = Vec::new();
        crate::trace::encode_line(&crate::trace::Header::default(), &mut text).unwrap();
        text.resize(100_000, b' ');
        text.push(b'\n');
        crate::trace::encode_line(&Footer::default(), &mut text).unwrap();
        fs::write(dir.join(old(i)), text).unwrap();
    }
    fs::write(dir.join("notes.txt"), vec![b'x'; 500_000]).unwrap();
    let d = Daemon::start_in(tmp, dir, |c| c.max_total_bytes = Some(250_000)).await;
    // At start-up: the three oldest go, the foreign file stays.
    assert_eq!(d.files(), vec![old(4), old(5), "notes.txt".to_string()]);

    // A cap below anything: closed files go as sessions close, an open one never does.
    d.shutdown.cancel();
    let tmp2 = tempfile::tempdir().unwrap();
    let dir2 = tmp2.path().join("traces");
    let d = Daemon::start_in(tmp2, dir2, |c| c.max_total_bytes = Some(1)).await;
    let mut c = d.client().await;
    let open_one = open(&mut c, "stays-open-0001").await;
    open_one.tx.send(act_event(0)).await.unwrap();
    eventually("open file exists", T, || d.files().len() == 1).await;
    let open_file = d.files()[0].clone();
    for id in ["closes-0001", "closes-0002"] {
        let events = vec![start_event(id), act_event(0), end_event("shutdown", 1, 0)];
        timeout(c.record(tokio_stream::iter(events))).await.unwrap();
        assert_eq!(
            d.files(),
            vec![open_file.clone()],
            "closed {id} deleted, open file kept"
        );
    }
    open_one.tx.send(end_event("shutdown", 1, 0)).await.unwrap();
    timeout(open_one.call).await.unwrap().unwrap();
    assert!(d.files().is_empty(), "closed now, over the cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_error_degrades_that_session_only() {
    let d = Daemon::start(|c| c.fail_sessions = vec!["faulty-0001".into()]).await;
    let mut c = d.client().await;
    let faulty = open(&mut c, "faulty-0001").await;
    let healthy = open(&mut c, "healthy-0002").await;
    for seq in 0..300 {
        faulty.tx.send(act_event(seq)).await.unwrap();
        healthy.tx.send(act_event(seq)).await.unwrap();
    }
    let st = loop {
        let st = d.status().await;
        if st.degraded {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        st.degraded_reason.contains("faulty-0001"),
        "{}",
        st.degraded_reason
    );
    assert!(
        st.degraded_reason.contains("No space left"),
        "{}",
        st.degraded_reason
    );
    let by_id = |id: &str| {
        st.sessions
            .iter()
            .find(|s| s.session_id == id)
            .unwrap()
            .clone()
    };
    assert!(by_id("faulty-0001").degraded);
    assert!(!by_id("healthy-0002").degraded);
    // The faulty stream is still consumed; both calls end normally.
    for seq in 300..400 {
        faulty.tx.send(act_event(seq)).await.unwrap();
    }
    faulty.tx.send(end_event("shutdown", 400, 0)).await.unwrap();
    healthy
        .tx
        .send(end_event("shutdown", 300, 0))
        .await
        .unwrap();
    let f = timeout(faulty.call).await.unwrap().unwrap();
    let h = timeout(healthy.call).await.unwrap().unwrap();
    assert!(f.records_written < 400);
    assert_eq!(h.records_written, 300);
    let (_, reqs, footer, _) = read_trace(&d.dir.join(&h.file));
    assert_eq!(
        (reqs.len(), footer.unwrap().ended_reason.as_str()),
        (300, "shutdown")
    );
    let st = d.status().await;
    assert!(st.degraded);
    assert!(st.dropped_requests >= 400 - f.records_written, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_on_a_real_tiny_tmpfs() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED disk_full_on_a_real_tiny_tmpfs: needs root to mount a tmpfs");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("tiny");
    fs::create_dir(&mnt).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mnt)
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        println!("SKIPPED disk_full_on_a_real_tiny_tmpfs: mount -t tmpfs failed ({status:?})");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let d = Daemon::start_in(tmp, mnt.join("traces"), |_| {}).await;
    let mut c = d.client().await;
    let mut events = vec![start_event("fills-disk-0001")];
    events.extend((0..400).map(act_event));
    events.push(end_event("shutdown", 400, 0));
    let summary = timeout(c.record(tokio_stream::iter(events)))
        .await
        .unwrap()
        .into_inner();
    assert!(summary.records_written < 400, "{summary:?}");
    let st = d.status().await;
    assert!(st.degraded, "{st:?}");
    assert!(
        st.degraded_reason.contains("No space left on device"),
        "{}",
        st.degraded_reason
    );
    // Still serving: a status call and a new (degraded) session both answer.
    let events = vec![
        start_event("after-full-0002"),
        act_event(0),
        end_event("shutdown", 1, 0),
    ];
    timeout(c.record(tokio_stream::iter(events))).await.unwrap();
    // What reached the disk reads back up to the cut.
    let (_, reqs, _, _) = read_trace(&d.dir.join(&summary.file));
    assert_eq!(
        reqs.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (0..reqs.len() as u64).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_refused_and_the_daemon_keeps_serving() {
    let d = Daemon::start(|_| {}).await;
    let mut c = d.client().await;
    let refused = |events: Vec<RecordEvent>| {
        let mut c = c.clone();
        async move {
            timeout(c.record(tokio_stream::iter(events)))
                .await
                .unwrap_err()
        }
    };
    let e = refused(vec![act_event(0), end_event("", 1, 0)]).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("first message must be SessionStart"),
        "{e:?}"
    );
    let e = refused(vec![]).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    for bad in [
        "../../etc/x",
        "/etc/passwd-0001",
        "ok-looking\0-id",
        "a b c d e f g h",
    ] {
        let e = refused(vec![start_event(bad), act_event(0)]).await;
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
        assert!(e.message().contains("session_id"), "{e:?}");
    }
    let mut bad_hash = start_event("good-session-01");
    if let Some(Event::Start(s)) = &mut bad_hash.event {
        s.model_hash = "../../../../tmp/".into();
    }
    assert_eq!(
        refused(vec![bad_hash]).await.code(),
        tonic::Code::InvalidArgument
    );
    let mut bad_mode = start_event("good-session-02");
    if let Some(Event::Start(s)) = &mut bad_mode.event {
        s.image_mode = "raw".into();
    }
    assert_eq!(
        refused(vec![bad_mode]).await.code(),
        tonic::Code::InvalidArgument
    );

    // 40 MiB: over the 32 MiB limit, as the first message and in the middle of a session.
    let mut huge = start_event("huge-session-01");
    if let Some(Event::Start(s)) = &mut huge.event {
        s.export_dir = "x".repeat(40 << 20);
    }
    let e = refused(vec![huge]).await;
    assert!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e:?}"
    );
    assert!(d.files().is_empty(), "nothing written: {:?}", d.files());
    let mut big_act = act(1);
    big_act.request.as_mut().unwrap().images[0].data = vec![7u8; 40 << 20];
    let events = vec![
        start_event("huge-session-02"),
        act_event(0),
        RecordEvent {
            event: Some(Event::Act(big_act)),
        },
    ];
    let _ = timeout(c.record(tokio_stream::iter(events))).await;
    eventually("session closed", T, || d.files().len() == 1).await;
    let path = d.dir.join(&d.files()[0]);
    eventually("footer", T, || {
        TraceReader::open(&path)
            .map(|mut r| r.by_ref().flatten().count() == 2)
            .unwrap_or(false)
    })
    .await;
    let (_, reqs, footer, _) = read_trace(&path);
    assert_eq!(
        (reqs.len(), footer.unwrap().ended_reason.as_str()),
        (1, "client_lost")
    );

    // Nothing escaped the directory; the daemon still serves.
    let parent = d.dir.parent().unwrap();
    let mut around: Vec<_> = fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    around.sort();
    assert_eq!(around, vec!["run", "traces"]);
    assert!(!Path::new("/etc/x").exists());
    let events = vec![
        start_event("after-attack-01"),
        act_event(0),
        end_event("shutdown", 1, 0),
    ];
    let ok = timeout(c.record(tokio_stream::iter(events)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.records_written, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_sessions_is_resource_exhausted() {
    let d = Daemon::start(|c| c.max_sessions = 1).await;
    let mut c = d.client().await;
    let first = open(&mut c, "first-session-1").await;
    first.tx.send(act_event(0)).await.unwrap();
    eventually("first open", T, || d.files().len() == 1).await;
    let e = timeout(c.record(tokio_stream::iter(vec![start_event("second-session")])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    drop(first.tx);
    timeout(first.call).await.unwrap().unwrap();
    let events = vec![start_event("third-session-3"), end_event("shutdown", 0, 0)];
    timeout(c.record(tokio_stream::iter(events))).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_repairs_footerless_files_before_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("traces");
    let header = Header::from_start(match &start_event("crashed-0001").event {
        Some(Event::Start(s)) => s,
        _ => unreachable!(),
    })
    .unwrap();
    let mut w = TraceWriter::create(&dir, &header, &WriterOptions::default()).unwrap();
    for seq in 0..20 {
        w.write_request(&RequestRecord::from_act(
            act(seq),
            crate::ImageMode::HashOnly,
        ))
        .unwrap();
    }
    w.flush().unwrap();
    // kill -9: only what was flushed stays.
    let (path, bytes) = (w.path().to_path_buf(), fs::read(w.path()).unwrap());
    drop(w);
    fs::write(&path, bytes).unwrap();
    let d = Daemon::start_in(tmp, dir, |_| {}).await;
    let (_, reqs, footer, truncated) = read_trace(&path);
    assert_eq!(reqs.len(), 20);
    assert!(!truncated);
    let f = footer.unwrap();
    assert_eq!(
        (f.ended_reason.as_str(), f.total_requests, f.records_written),
        ("recorder_lost", 20, Some(20))
    );
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_open_files_with_footer() {
    let mut d = Daemon::start(|_| {}).await;
    let mut c = d.client().await;
    let live = open(&mut c, "open-at-stop-01").await;
    for seq in 0..25 {
        live.tx.send(act_event(seq)).await.unwrap();
    }
    eventually("file", T, || d.files().len() == 1).await;
    let path = d.dir.join(&d.files()[0]);
    eventually("records written", T, || {
        TraceReader::open(&path)
            .map(|r| r.flatten().count() == 25)
            .unwrap_or(false)
    })
    .await;
    d.stop().await;
    let (_, reqs, footer, truncated) = read_trace(&path);
    assert_eq!(reqs.len(), 25);
    assert!(!truncated, "gzip trailer written");
    assert_eq!(footer.unwrap().ended_reason, "shutdown");
    // The server's call got its summary.
    let summary = timeout(live.call).await.unwrap().unwrap();
    assert_eq!(summary.records_written, 25);
}

/// Both reflection versions list the recorder: grpcurl 1.9 and later ask v1, older
/// clients v1alpha.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_v1_and_v1alpha_list_the_recorder() {
    let d = Daemon::start(|_| {}).await;
    macro_rules! listed {
        ($version:ident) => {{
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let mut client = ServerReflectionClient::new(channel(&d.socket).await);
            let ask = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut answers = timeout(client.server_reflection_info(tokio_stream::iter([ask])))
                .await
                .unwrap()
                .into_inner();
            let answer = timeout(answers.message())
                .await
                .unwrap()
                .expect("an answer");
            match answer.message_response {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
                }
                other => panic!("{other:?}"),
            }
        }};
    }
    for names in [listed!(v1), listed!(v1alpha)] {
        assert!(names.iter().any(|n| n == "reflex.v1.Recorder"), "{names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_live_stale_and_not_a_socket() {
    let d = Daemon::start(|_| {}).await;
    assert!(matches!(
        bind(&d.socket),
        Err(DaemonError::AlreadyListening(_))
    ));
    let e = bind(&d.socket).err().unwrap();
    assert!(
        e.to_string()
            .starts_with("another recorder is listening on"),
        "{e}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let stale = tmp.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let l = bind(&stale).unwrap();
    drop(l);
    let file = tmp.path().join("file.sock");
    fs::write(&file, b"not a socket").unwrap();
    assert!(matches!(bind(&file), Err(DaemonError::NotASocket(_))));
    assert_eq!(fs::read(&file).unwrap(), b"not a socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_binds_serves_and_removes_its_socket() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RecorderArgs,
    }
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("sock/recorder.sock");
    let listen = format!("unix://{}", socket.display());
    let dir = tmp.path().join("traces");
    let cli = Cli::try_parse_from([
        "recorder",
        "--dir",
        dir.to_str().unwrap(),
        "--listen",
        &listen,
        "--flush-ms",
        "50",
    ])
    .unwrap();
    let token = CancellationToken::new();
    let task = tokio::spawn(run(cli.args, token.clone()));
    eventually("socket", T, || socket.exists()).await;
    let st = loop {
        // The socket is bound before recovery finishes; retry until the service answers.
        let mut c = connect(&socket).await;
        if let Ok(Ok(st)) =
            tokio::time::timeout(Duration::from_secs(1), c.status(StatusRequest {})).await
        {
            break st.into_inner();
        }
    };
    assert_eq!(st.dir, dir.display().to_string());
    assert_eq!(st.reflex_version, env!("CARGO_PKG_VERSION"));
    token.cancel();
    timeout(task).await.unwrap().unwrap();
    assert!(!socket.exists(), "socket removed");
}

/// Runs a daemon in a child process for `kill_9_loses_at_most_the_flush_interval`
/// (does nothing when run on its own).
#[test]
#[ignore = "helper process: run by kill_9_loses_at_most_the_flush_interval, does nothing on its own"]
fn child_daemon() {
    let (Ok(dir), Ok(socket)) = (
        std::env::var("REFLEX_TEST_CHILD_DIR"),
        std::env::var("REFLEX_TEST_CHILD_SOCKET"),
    ) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = bind(Path::new(&socket)).unwrap();
        // Never cancelled: the parent kills this process.
        serve(listener, RecorderConfig::new(dir), CancellationToken::new())
            .await
            .unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_at_most_the_flush_interval() {
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let (dir, socket) = (tmp.path().join("traces"), tmp.path().join("child.sock"));
    let mut child = Kill(
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "daemon::tests::child_daemon",
                "--ignored",
                "--test-threads=1",
            ])
            .env("REFLEX_TEST_CHILD_DIR", &dir)
            .env("REFLEX_TEST_CHILD_SOCKET", &socket)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("child socket", T, || socket.exists()).await;
    let mut c = connect(&socket).await;
    let live = open(&mut c, "killed-hard-01").await;
    for seq in 0..200 {
        live.tx.send(act_event(seq)).await.unwrap();
    }
    loop {
        let st = timeout(c.status(StatusRequest {}))
            .await
            .unwrap()
            .into_inner();
        if st.records_written == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Longer than the flush interval: the 200 are on their way to the disk.
    tokio::time::sleep(Duration::from_millis(250)).await;
    for seq in 200..205 {
        live.tx.send(act_event(seq)).await.unwrap();
    }
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    let name = fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let path = dir.join(name);
    let (_, reqs, footer, truncated) = read_trace(&path);
    assert!((200..=205).contains(&reqs.len()), "{}", reqs.len());
    assert_eq!(
        reqs.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (0..reqs.len() as u64).collect::<Vec<_>>()
    );
    assert!(footer.is_none());
    assert!(truncated, "no gzip trailer");
    // The next recorder repairs it before serving.
    let survivors = reqs.len();
    let d = Daemon::start_in(tmp, dir, |_| {}).await;
    let (_, reqs, footer, truncated) = read_trace(&path);
    assert_eq!(reqs.len(), survivors);
    assert!(!truncated);
    assert_eq!(footer.unwrap().ended_reason, "recorder_lost");
    drop(d);
}

/// Ingest throughput through the real socket, one session, hash_only (run by hand:
/// `cargo test -p reflex-recorder --release ingest_throughput -- --ignored --nocapture`).
/// The daemon runs on its own one-thread runtime so that its CPU time (runtime thread +
/// the session's writer thread) can be told from the client's.
#[test]
#[ignore = "benchmark: cargo test -p reflex-recorder --release ingest_throughput -- --ignored --nocapture"]
fn ingest_throughput() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("recorder.sock");
    let dir = tmp.path().join("traces");
    let shutdown = CancellationToken::new();
    let daemon = {
        let (socket, dir, shutdown) = (socket.clone(), dir.clone(), shutdown.clone());
        std::thread::Builder::new()
            .name("recorder-rt".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = bind(&socket).unwrap();
                    serve(listener, RecorderConfig::new(dir), shutdown)
                        .await
                        .unwrap();
                });
            })
            .unwrap()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let n = 100_000u64;
    let (summary, secs, cpu) = rt.block_on(async {
        eventually("socket", T, || socket.exists()).await;
        let mut c = connect(&socket).await;
        let events: Vec<RecordEvent> = (0..n).map(act_event).collect();
        let cpu0 = recorder_cpu_secs();
        let t0 = Instant::now();
        let live = open(&mut c, "throughput-0001").await;
        for e in events {
            live.tx.send(e).await.unwrap();
        }
        // Until the writer has written all (while its thread still exists for /proc).
        loop {
            let st = c.status(StatusRequest {}).await.unwrap().into_inner();
            if st.records_written == n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let cpu = recorder_cpu_secs() - cpu0;
        let secs = t0.elapsed().as_secs_f64();
        live.tx.send(end_event("shutdown", n, 0)).await.unwrap();
        drop(live.tx);
        let summary = live.call.await.unwrap().unwrap();
        (summary, secs, cpu)
    });
    shutdown.cancel();
    daemon.join().unwrap();
    assert_eq!(summary.records_written, n);
    println!(
        "ingest: {n} records in {secs:.2} s = {:.0} records/s wall; recorder CPU {:.1} us/record = {:.0} records/s per core; {:.3} MB per 1000 records",
        n as f64 / secs,
        cpu / n as f64 * 1e6,
        n as f64 / cpu,
        summary.bytes_written as f64 / 1e6 / (n as f64 / 1000.0)
    );
}

/// CPU seconds of the daemon's threads (runtime "recorder-rt", writers "rec-…"), from
/// /proc; exited writer threads are not counted, so read it while the session is open.
fn recorder_cpu_secs() -> f64 {
    let ticks = 100.0; // USER_HZ
    let mut total = 0.0;
    for task in fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !(comm.starts_with("recorder-rt") || comm.starts_with("rec-")) {
            continue;
        }
        let stat = fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" of the command name: utime is the 12th, stime the 13th.
        let rest = stat.rsplit(')').next().unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 12 {
            let secs =
                (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / ticks;
            println!("  thread {}: {secs:.2} s", comm.trim());
            total += secs;
        }
    }
    total
}
