//! The server's side of recording: sequence numbers and the hand-off of each
//! Act to the recorder daemon.
//!
//! **Invariant:** inference never waits on recording. [`Recording::complete`]
//! assigns the call's `seq` and offers the record to a bounded queue with
//! `try_send`; a full queue drops the record and counts it. One background
//! task (the uplink) owns the connection: it streams `SessionStart`, the
//! records, and `SessionEnd` over `reflex.v1.Recorder/Record`, and when the
//! recorder goes away it reconnects with backoff and starts a new stream (a
//! new file) whose `first_seq` follows the last record it delivered, so the
//! seq gap of an outage reads as drops in that file.
//!
//! Records taken off the queue and written into a stream that then breaks
//! are lost with the connection (at most the stream's small buffer); the
//! recorder's own durability covers what it received.
//!
//! With `--record DIR` and no `--recorder`, the server runs a private
//! `reflex recorder` child for DIR on a socket in a private temp folder and
//! restarts it if it dies.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reflex_proto::v1::{self as pb, record_event::Event, recorder_client::RecorderClient};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::hex;
use crate::policy::ActOutput;
use crate::service::{ServiceError, latency};

/// What image data a trace keeps (`--record-images`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum ImageMode {
    /// The encoded image bytes (base64 in the trace). Large; replayable anywhere.
    Full,
    /// Only the SHA-256 of each image. Replay resolves images with --image-dir.
    #[default]
    HashOnly,
    /// No image fields at all.
    None,
}

impl ImageMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageMode::Full => "full",
            ImageMode::HashOnly => "hash_only",
            ImageMode::None => "none",
        }
    }
}

/// Where records go.
#[derive(Debug, Clone)]
pub enum RecordTarget {
    /// A shared recorder daemon, e.g. `unix:///run/reflex/recorder.sock`.
    Daemon(String),
    /// A private recorder child writing into this folder.
    Private(PathBuf),
}

#[derive(Debug, Clone)]
pub struct RecordOptions {
    pub target: RecordTarget,
    pub image_mode: ImageMode,
    pub no_gzip: bool,
    /// Records that may wait for the recorder before new ones are dropped.
    pub queue: usize,
}

/// One finished Act call, borrowed from the handler.
pub struct ActEvent<'a> {
    pub chunk_id: u64,
    /// When the call arrived; formatted only if a record is built.
    pub timestamp: std::time::SystemTime,
    pub request: &'a pb::ActRequest,
    pub cameras: &'a [String],
    pub result: &'a Result<(ActOutput, f64), ServiceError>,
    pub total_ms: f64,
    pub mode: &'static str,
    pub action_dim: u32,
    pub steps_configured: u32,
}

#[derive(Debug, Default)]
pub struct Counters {
    /// Records handed to the queue.
    pub queued: AtomicU64,
    /// Records dropped because the queue was full (recorder slow or down).
    pub dropped: AtomicU64,
    /// Records written into a recorder stream.
    pub delivered: AtomicU64,
}

/// Per-session sequence numbers and (when on) the recorder hand-off.
pub struct Recording {
    session_id: String,
    // seq assignment and the queue hand-off happen under one lock so the
    // recorder receives records in seq order.
    next_seq: Arc<Mutex<u64>>,
    sink: Option<Sink>,
    recorder_uri: Option<String>,
}

struct Sink {
    tx: mpsc::Sender<pb::ActRecord>,
    image_mode: ImageMode,
    counters: Arc<Counters>,
    stop: CancellationToken,
    done: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Recording {
    pub fn off() -> Self {
        Recording {
            session_id: new_session_id(),
            next_seq: Arc::new(Mutex::new(0)),
            sink: None,
            recorder_uri: None,
        }
    }

    /// Starts the uplink (and a private recorder when asked). Never fails on
    /// an absent recorder: the uplink keeps trying while the server serves.
    pub fn start(opts: RecordOptions, mut session: pb::SessionStart) -> Self {
        let session_id = new_session_id();
        session.session_id = session_id.clone();
        session.image_mode = opts.image_mode.as_str().into();
        session.instruction_mode = "as_is".into();
        session.no_gzip = opts.no_gzip;
        session.started_at = now_rfc3339();
        let (tx, rx) = mpsc::channel(opts.queue.max(1));
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let next_seq = Arc::new(Mutex::new(0));
        let uplink = Uplink {
            rx,
            session,
            counters: counters.clone(),
            next_seq: next_seq.clone(),
            stop: stop.clone(),
            last_delivered: None,
        };
        let (uri, child) = match opts.target {
            RecordTarget::Daemon(uri) => (Some(uri), None),
            RecordTarget::Private(dir) => match PrivateRecorder::start(dir, stop.clone()) {
                Ok(c) => (Some(c.uri.clone()), Some(c)),
                Err(e) => {
                    tracing::error!(error = %e, slug = "record-child-failed", "cannot start the private recorder; recording is off");
                    (None, None)
                }
            },
        };
        let task = tokio::spawn(uplink.run(uri.clone(), child));
        let sink = Sink {
            tx,
            image_mode: opts.image_mode,
            counters,
            stop,
            done: tokio::sync::Mutex::new(Some(task)),
        };
        Recording {
            session_id,
            next_seq,
            sink: Some(sink),
            recorder_uri: uri,
        }
    }

    /// The recorder this session streams to (a shared daemon or the private child).
    pub fn recorder_uri(&self) -> Option<&str> {
        self.recorder_uri.as_deref()
    }

    /// This server session's id (also the trace file name's last part).
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    pub fn counters(&self) -> Option<&Counters> {
        self.sink.as_ref().map(|s| &*s.counters)
    }

    /// Assigns the next seq to a finished call; returns it and whether the
    /// record was handed to the recorder queue.
    pub fn complete<'a>(&self, event: impl FnOnce() -> ActEvent<'a>) -> (u64, bool) {
        // The record (image hashes, clones) is built before the seq lock, so callers do
        // not queue behind each other's hashing; it gets its seq and is sent under the
        // lock, so the queue stays in seq order. A full queue is checked first: a call
        // that will be dropped costs no record.
        let sink = self.sink.as_ref().filter(|s| !s.stop.is_cancelled());
        let record = sink
            .filter(|s| s.tx.capacity() > 0)
            .map(|s| build_record(&event(), s.image_mode));
        let mut next = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
        let seq = *next;
        *next += 1;
        let Some(sink) = sink else {
            return (seq, false);
        };
        let Some(mut record) = record else {
            sink.drop_one(seq);
            return (seq, false);
        };
        record.seq = seq;
        match sink.tx.try_send(record) {
            Ok(()) => {
                sink.counters.queued.fetch_add(1, Ordering::Relaxed);
                (seq, true)
            }
            Err(_) => {
                sink.drop_one(seq);
                (seq, false)
            }
        }
    }

    /// Ends the recording session: the queue is flushed to the recorder, the
    /// footer written with `reason`; bounded by a few seconds.
    pub async fn finish(&self, reason: &str) {
        let Some(sink) = &self.sink else { return };
        if let Ok(mut r) = FINISH_REASON.lock() {
            *r = reason.to_string();
        }
        sink.stop.cancel();
        if let Some(task) = sink.done.lock().await.take()
            && tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
        {
            tracing::warn!("recorder did not confirm the end of the session in 5 s");
        }
    }
}

// The footer reason of the (single) session ending in this process.
static FINISH_REASON: Mutex<String> = Mutex::new(String::new());

impl Sink {
    fn drop_one(&self, seq: u64) {
        let n = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // Logged at warn, but not once per call under a long outage.
        if n.is_power_of_two() {
            tracing::warn!(
                seq,
                dropped_total = n,
                slug = "record-dropped",
                "recorder queue full or recorder down; record dropped"
            );
        }
    }
}

/// Builds the recorder's view of a call, keeping only what `mode` allows;
/// its `seq` is set when the call gets one.
fn build_record(ev: &ActEvent<'_>, mode: ImageMode) -> pb::ActRecord {
    let mut request = pb::ActRequest {
        images: Vec::new(),
        instruction: ev.request.instruction.clone(),
        state: ev.request.state.clone(),
        episode_id: ev.request.episode_id.clone(),
        noise_seed: ev.request.noise_seed,
        image_b64: Vec::new(),
        image_sha256: String::new(),
    };
    if mode != ImageMode::None {
        // Canonical form: every image named and hashed; bytes only in full mode.
        let mut images = ev.request.images.clone();
        if !ev.request.image_b64.is_empty() {
            match images.first_mut() {
                None => images.push(pb::Image {
                    data: ev.request.image_b64.clone(),
                    ..Default::default()
                }),
                Some(f) if f.data.is_empty() => f.data = ev.request.image_b64.clone(),
                Some(_) => {}
            }
        }
        let hashes = ev.result.as_ref().ok().map(|(out, _)| &out.image_sha256);
        for (i, img) in images.iter_mut().enumerate() {
            if img.camera.is_empty()
                && let Some(name) = ev.cameras.get(i)
            {
                img.camera = name.clone();
            }
            let known = hashes.and_then(|h| {
                let slot = ev.cameras.iter().position(|c| *c == img.camera)?;
                h.get(slot)?.clone()
            });
            img.sha256 = match known {
                Some(h) => h,
                None if !img.data.is_empty() => hex(&Sha256::digest(&img.data)),
                None => img.sha256.clone(),
            };
            if mode != ImageMode::Full {
                img.data = Vec::new();
            }
        }
        request.image_sha256 = images.first().map(|i| i.sha256.clone()).unwrap_or_default();
        request.images = images;
    }
    let mut rec = pb::ActRecord {
        chunk_id: ev.chunk_id,
        timestamp: rfc3339_of(ev.timestamp),
        request: Some(request),
        mode: ev.mode.into(),
        action_dim: ev.action_dim,
        ..Default::default()
    };
    match ev.result {
        Ok((out, queue_ms)) => {
            rec.actions = out.actions.clone();
            rec.num_actions = (out.actions.len() / ev.action_dim.max(1) as usize) as u32;
            rec.latency = Some(latency(out, *queue_ms, ev.total_ms));
            rec.denoise = Some(pb::Denoise {
                steps_used: out.steps_used,
                steps_configured: ev.steps_configured,
                adaptive: false,
            });
            rec.cache = out.cache.as_str().into();
            rec.noise_seed = out.noise_seed;
        }
        Err(e) => {
            rec.latency = Some(pb::Latency {
                total_ms: ev.total_ms,
                ..Default::default()
            });
            rec.error = Some(pb::ActError {
                code: e.slug().into(),
                message: crate::service::status_of(e).message().into(),
            });
            rec.noise_seed = ev.request.noise_seed.unwrap_or_default();
        }
    }
    rec
}

/// The background task that owns the recorder connection.
struct Uplink {
    rx: mpsc::Receiver<pb::ActRecord>,
    session: pb::SessionStart,
    counters: Arc<Counters>,
    next_seq: Arc<Mutex<u64>>,
    stop: CancellationToken,
    last_delivered: Option<u64>,
}

enum StreamEnd {
    /// The session ended (stop requested, queue flushed, summary received or timed out).
    Finished,
    /// The recorder went away; reconnect.
    Lost,
}

impl Uplink {
    async fn run(mut self, uri: Option<String>, child: Option<PrivateRecorder>) {
        let Some(uri) = uri else {
            // The private recorder could not start (logged); nothing will take records.
            self.drain_dropping().await;
            return;
        };
        let mut backoff = Duration::from_millis(50);
        let mut connected_once = false;
        loop {
            if self.stop.is_cancelled() && self.rx.is_empty() {
                break;
            }
            let channel = tokio::select! {
                c = reflex_proto::connect(&uri) => c,
                _ = self.stop.cancelled(), if !self.rx.is_empty() => {
                    // Stopping with records queued and no recorder: give it one
                    // last short chance, then count what is left as dropped.
                    match tokio::time::timeout(Duration::from_millis(500), reflex_proto::connect(&uri)).await {
                        Ok(c) => c,
                        Err(_) => { self.drain_dropping().await; break; }
                    }
                }
            };
            let channel = match channel {
                Ok(c) => c,
                Err(e) => {
                    if self.stop.is_cancelled() {
                        self.drain_dropping().await;
                        break;
                    }
                    tracing::debug!(error = %e, %uri, "recorder not reachable");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stop.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(50);
            if connected_once {
                tracing::info!(%uri, "recorder reachable again; starting a new trace file");
            }
            connected_once = true;
            match self.stream(channel).await {
                StreamEnd::Finished => break,
                StreamEnd::Lost => {
                    tracing::warn!(%uri, slug = "recorder-lost", "lost the recorder; records are queued, then dropped, until it returns");
                }
            }
        }
        if let Some(c) = child {
            c.stop().await;
        }
    }

    /// One Record stream: start, records, end.
    async fn stream(&mut self, channel: tonic::transport::Channel) -> StreamEnd {
        let first_seq = self.last_delivered.map(|s| s + 1).unwrap_or(0);
        let start = pb::SessionStart {
            first_seq,
            ..self.session.clone()
        };
        // Small: backpressure belongs in our bounded queue, where it is counted.
        let (tx, rx) = mpsc::channel::<pb::RecordEvent>(16);
        if tx
            .send(pb::RecordEvent {
                event: Some(Event::Start(start)),
            })
            .await
            .is_err()
        {
            return StreamEnd::Lost;
        }
        let mut client = RecorderClient::new(channel).max_encoding_message_size(64 << 20);
        let mut call = tokio::spawn(async move {
            client
                .record(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let mut delivered_here = 0u64;
        loop {
            tokio::select! {
                biased;
                res = &mut call => {
                    tracing::debug!(result = ?res.map(|r| r.map(|_| ())), "record stream ended");
                    return StreamEnd::Lost;
                }
                rec = self.rx.recv() => {
                    let Some(rec) = rec else { break };
                    let seq = rec.seq;
                    if tx.send(pb::RecordEvent { event: Some(Event::Act(rec)) }).await.is_err() {
                        return StreamEnd::Lost;
                    }
                    self.last_delivered = Some(seq);
                    delivered_here += 1;
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                }
                _ = self.stop.cancelled(), if self.rx.is_empty() => break,
            }
        }
        // Session end: every seq is final now (the server drained its calls).
        let next = *self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
        let total = next.saturating_sub(first_seq);
        let reason = FINISH_REASON.lock().map(|r| r.clone()).unwrap_or_default();
        let end = pb::SessionEnd {
            reason: if reason.is_empty() {
                "shutdown".into()
            } else {
                reason
            },
            total_requests: total,
            dropped_requests: total.saturating_sub(delivered_here),
            ended_at: now_rfc3339(),
        };
        if tx
            .send(pb::RecordEvent {
                event: Some(Event::End(end)),
            })
            .await
            .is_err()
        {
            return StreamEnd::Lost;
        }
        drop(tx);
        match tokio::time::timeout(Duration::from_secs(3), call).await {
            Ok(Ok(Ok(summary))) => {
                let s = summary.into_inner();
                tracing::info!(file = %s.file, records = s.records_written, "recording session closed");
            }
            other => {
                tracing::warn!(result = ?other.map(|r| r.map(|r| r.map(|_| ()))), "recorder did not confirm the session end")
            }
        }
        StreamEnd::Finished
    }

    async fn drain_dropping(&mut self) {
        self.rx.close();
        while let Some(rec) = self.rx.recv().await {
            let _ = rec;
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A `reflex recorder` child owned by this server.
struct PrivateRecorder {
    uri: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _socket_dir: tempfile::TempDir,
}

impl PrivateRecorder {
    fn start(dir: PathBuf, stop: CancellationToken) -> std::io::Result<Self> {
        let socket_dir = tempfile::Builder::new()
            .prefix("reflex-recorder-")
            .tempdir()?;
        let socket = socket_dir.path().join("recorder.sock");
        let uri = format!("unix://{}", socket.display());
        let exe = std::env::current_exe()?;
        let child_stop = CancellationToken::new();
        let (listen, cstop) = (uri.clone(), child_stop.clone());
        let task = tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let mut cmd = tokio::process::Command::new(&exe);
                cmd.arg("recorder")
                    .arg("--dir")
                    .arg(&dir)
                    .arg("--listen")
                    .arg(&listen)
                    .kill_on_drop(true);
                // Its own process group: a terminal's Ctrl-C reaches only the
                // server, which ends the session before stopping the child.
                cmd.process_group(0);
                // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
                // The child gets SIGTERM if the server dies (even by SIGKILL): no orphans.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                        Ok(())
                    });
                }
                let spawned = cmd.spawn();
                let mut child = match spawned {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, slug = "record-child-failed", "cannot start the private recorder");
                        return;
                    }
                };
                tracing::info!(pid = child.id(), dir = %dir.display(), "private recorder started");
                let started = std::time::Instant::now();
                tokio::select! {
                    status = child.wait() => {
                        tracing::warn!(?status, slug = "record-child-exited", "private recorder exited; restarting");
                        if started.elapsed() > Duration::from_secs(10) {
                            backoff = Duration::from_millis(100);
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = cstop.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    _ = cstop.cancelled() => {
                        // SIGTERM: the recorder closes its files with footers.
                        if let Some(pid) = child.id() {
                            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                        }
                        if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                            let _ = child.kill().await;
                        }
                        return;
                    }
                }
            }
        });
        let _ = stop;
        Ok(PrivateRecorder {
            uri,
            stop: child_stop,
            task,
            _socket_dir: socket_dir,
        })
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// 16 lowercase hex characters from the OS's randomness.
pub fn new_session_id() -> String {
    format!("{:016x}", crate::policy::os_random_u64())
}

/// Current UTC time as RFC 3339 with milliseconds (`2026-11-26T07:14:54.123Z`).
pub fn now_rfc3339() -> String {
    rfc3339_of(std::time::SystemTime::now())
}

/// `at` as RFC 3339 UTC with milliseconds.
pub fn rfc3339_of(at: std::time::SystemTime) -> String {
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    rfc3339(since.as_secs() as i64, since.subsec_millis())
}

fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{CacheStatus, StageTimes};

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (leap day) 12:34:56.789
        assert_eq!(rfc3339(951_827_696, 789), "2000-02-29T12:34:56.789Z");
        assert_eq!(rfc3339(1_795_676_094, 5), "2026-11-26T06:54:54.005Z");
    }

    fn output() -> ActOutput {
        ActOutput {
            actions: vec![0.5; 14],
            noise_seed: 9,
            cache: CacheStatus::Miss,
            times: StageTimes::default(),
            steps_used: 10,
            image_sha256: vec![Some("aa".repeat(32)), None],
        }
    }

    fn event<'a>(
        req: &'a pb::ActRequest,
        res: &'a Result<(ActOutput, f64), ServiceError>,
        cams: &'a [String],
    ) -> ActEvent<'a> {
        ActEvent {
            chunk_id: 1,
            timestamp: std::time::SystemTime::now(),
            request: req,
            cameras: cams,
            result: res,
            total_ms: 1.0,
            mode: "cpu",
            action_dim: 7,
            steps_configured: 10,
        }
    }

    #[test]
    fn image_modes_keep_what_they_promise() {
        let cams = vec!["base".to_string(), "wrist".to_string()];
        let req = pb::ActRequest {
            images: vec![pb::Image {
                camera: String::new(),
                data: b"JPEGBYTES".to_vec(),
                sha256: String::new(),
            }],
            ..Default::default()
        };
        let res = Ok((output(), 0.1));
        let full = build_record(&event(&req, &res, &cams), ImageMode::Full);
        let r = full.request.unwrap();
        assert_eq!(r.images[0].camera, "base");
        assert_eq!(r.images[0].data, b"JPEGBYTES");
        assert_eq!(r.images[0].sha256, "aa".repeat(32));
        assert_eq!(r.image_sha256, "aa".repeat(32));
        let hashed = build_record(&event(&req, &res, &cams), ImageMode::HashOnly)
            .request
            .unwrap();
        assert!(hashed.images[0].data.is_empty());
        assert_eq!(hashed.images[0].sha256, "aa".repeat(32));
        let none = build_record(&event(&req, &res, &cams), ImageMode::None)
            .request
            .unwrap();
        assert!(
            none.images.is_empty() && none.image_sha256.is_empty() && none.image_b64.is_empty()
        );
    }

    #[test]
    fn failed_calls_are_recorded_with_their_error_and_a_computed_hash() {
        let cams = vec!["base".to_string()];
        let req = pb::ActRequest {
            images: vec![pb::Image {
                camera: "base".into(),
                data: b"x".to_vec(),
                sha256: String::new(),
            }],
            ..Default::default()
        };
        let res: Result<(ActOutput, f64), ServiceError> = Err(ServiceError::WorkerLost);
        let rec = build_record(&event(&req, &res, &cams), ImageMode::HashOnly);
        assert_eq!(rec.error.unwrap().code, "worker-lost");
        assert!(rec.actions.is_empty());
        assert_eq!(
            rec.request.unwrap().images[0].sha256,
            hex(&Sha256::digest(b"x"))
        );
    }

    #[test]
    fn seq_counts_up_when_recording_is_off() {
        let r = Recording::off();
        let req = pb::ActRequest::default();
        let res: Result<(ActOutput, f64), ServiceError> = Err(ServiceError::WorkerLost);
        let cams = vec![];
        assert_eq!(r.complete(|| event(&req, &res, &cams)), (0, false));
        assert_eq!(r.complete(|| event(&req, &res, &cams)), (1, false));
    }
}
