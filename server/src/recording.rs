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
//!
//! A record carries the call's images in canonical form, bytes included
//! (`reflex_proto::images::canonical_request`), whatever `--record-images` says: only the
//! recorder redacts, by the session's image mode, so there is one place that decides what
//! reaches the disk. [`build_record`] names every field of `ActRecord` (no `..Default`): a
//! field added to the proto fails to compile there until it is decided.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reflex_engine::policy::ActOutput;
use reflex_proto::images::canonical_request;
use reflex_proto::time::UtcTime;
use reflex_proto::v1::{self as pb, record_event::Event, recorder_client::RecorderClient};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::error::ServiceError;

/// What image data a trace keeps (`--record-images`): the one definition, in the image
/// contract; the recorder applies it.
pub use reflex_proto::images::ImageMode;

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
    /// As the call's answer has it (`total_ms` only for a failed call).
    pub latency: pb::Latency,
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

/// Calls refused for want of a place in the queue (counted with recording on or off).
#[derive(Debug, Default)]
pub struct Refusals(AtomicU64);

impl Refusals {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Per-session sequence numbers and (when on) the recorder hand-off.
pub struct Recording {
    session_id: String,
    // seq assignment and the queue hand-off happen under one lock so the
    // recorder receives records in seq order.
    next_seq: Arc<Mutex<u64>>,
    sink: Option<Sink>,
    recorder_uri: Option<String>,
    refused: Arc<Refusals>,
}

struct Sink {
    tx: mpsc::Sender<pb::ActRecord>,
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
            refused: Arc::default(),
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
        session.started_at = UtcTime::now().rfc3339_millis();
        let (tx, rx) = mpsc::channel(opts.queue.max(1));
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        let next_seq = Arc::new(Mutex::new(0));
        let refused = Arc::new(Refusals::default());
        let uplink = Uplink {
            rx,
            session,
            refused: refused.clone(),
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
            counters,
            stop,
            done: tokio::sync::Mutex::new(Some(task)),
        };
        Recording {
            session_id,
            next_seq,
            sink: Some(sink),
            recorder_uri: uri,
            refused,
        }
    }

    /// Counts a call refused before any work (no place in the queue): it gets no seq and
    /// no record; the session's count goes into every `SessionEnd` (the trace footer's
    /// `refused_requests`), so the books read: written + dropped + lost = seqs issued, and
    /// seqs issued + refused = calls answered.
    pub fn refused(&self) {
        self.refused.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The session's refusals so far.
    pub fn refusals(&self) -> Arc<Refusals> {
        self.refused.clone()
    }

    /// The recorder this session streams to (a shared daemon or the private child).
    pub fn recorder_uri(&self) -> Option<&str> {
        self.recorder_uri.as_deref()
    }

    /// This server session's id (also the trace file name's last part).
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// The hand-off's counters while recording is on (the metrics read them).
    pub fn counters(&self) -> Option<Arc<Counters>> {
        self.sink.as_ref().map(|s| s.counters.clone())
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
            .map(|_| build_record(&event()));
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

/// Builds the recorder's view of a call: the request with canonical images (every image
/// named and hashed, bytes kept; the recorder redacts), the outcome. Its `seq` is set when
/// the call gets one.
fn build_record(ev: &ActEvent<'_>) -> pb::ActRecord {
    let out = ev.result.as_ref().ok().map(|(out, _)| out);
    // The policy hashed every image it ran: those hashes are not computed again.
    let known = out.map_or(&[][..], |o| o.image_sha256.as_slice());
    let request = canonical_request(ev.request, ev.cameras, known);
    let (actions, num_actions, denoise, cache, noise_seed) = match out {
        Some(out) => (
            out.actions.clone(),
            (out.actions.len() / ev.action_dim.max(1) as usize) as u32,
            Some(pb::Denoise {
                steps_used: out.steps_used,
                steps_configured: ev.steps_configured,
                adaptive: false,
            }),
            out.cache.as_str().to_string(),
            out.noise_seed,
        ),
        // A failed call drew no noise: the seed it asked for, if any.
        None => (
            Vec::new(),
            0,
            None,
            String::new(),
            ev.request.noise_seed.unwrap_or_default(),
        ),
    };
    let error = ev.result.as_ref().err().map(|e| pb::ActError {
        code: e.slug().as_str().into(),
        message: e.public_message(),
    });
    // Every field by name, no `..Default::default()`: a field added to `ActRecord` is a
    // compile error here until it is decided, instead of recording as zero.
    pb::ActRecord {
        seq: 0,
        chunk_id: ev.chunk_id,
        timestamp: UtcTime::from_system(ev.timestamp).rfc3339_millis(),
        request: Some(request),
        actions,
        num_actions,
        action_dim: ev.action_dim,
        latency: Some(ev.latency),
        denoise,
        cache,
        mode: ev.mode.into(),
        noise_seed,
        error,
    }
}

/// The background task that owns the recorder connection.
struct Uplink {
    rx: mpsc::Receiver<pb::ActRecord>,
    session: pb::SessionStart,
    refused: Arc<Refusals>,
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
            ended_at: UtcTime::now().rfc3339_millis(),
            refused_requests: self.refused.get(),
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
                let mut cmd = std::process::Command::new(&exe);
                cmd.arg("recorder")
                    .arg("--dir")
                    .arg(&dir)
                    .arg("--listen")
                    .arg(&listen);
                // Its own process group (a terminal's Ctrl-C reaches only the server,
                // which ends the session before stopping the child) and SIGTERM if the
                // server dies, even by SIGKILL: no orphans.
                reflex_systemd::child::supervise(&mut cmd);
                let spawned = tokio::process::Command::from(cmd)
                    .kill_on_drop(true)
                    .spawn();
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
                        // SIGTERM first: the recorder closes its files with footers.
                        let _ = reflex_systemd::child::stop(&mut child, Duration::from_secs(5)).await;
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
    format!("{:016x}", reflex_engine::policy::os_random_u64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use reflex_engine::policy::{CacheStatus, StageTimes};
    use reflex_proto::images::sha256_hex;

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
            latency: pb::Latency {
                total_ms: 1.0,
                ..Default::default()
            },
            mode: "cpu",
            action_dim: 7,
            steps_configured: 10,
        }
    }

    /// The per-mode promises of the former server-side stripping are now the recorder's
    /// (`reflex_recorder::trace` tests `canonical_records_are_redacted_by_the_session_mode`).
    #[test]
    fn records_carry_canonical_images_for_the_recorder_to_redact() {
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
        let rec = build_record(&event(&req, &res, &cams));
        let r = rec.request.unwrap();
        assert_eq!(r.images[0].camera, "base");
        assert_eq!(r.images[0].data, b"JPEGBYTES");
        assert_eq!(r.images[0].sha256, "aa".repeat(32));
        assert_eq!(r.image_sha256, "aa".repeat(32));
        assert!(r.image_b64.is_empty());
        assert_eq!(
            (rec.noise_seed, rec.num_actions, rec.cache.as_str()),
            (9, 2, "miss")
        );
        assert_eq!(rec.latency.unwrap().total_ms, 1.0);
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
        let rec = build_record(&event(&req, &res, &cams));
        assert_eq!(rec.error.unwrap().code, "worker-lost");
        assert!(rec.actions.is_empty());
        assert_eq!(rec.request.unwrap().images[0].sha256, sha256_hex(b"x"));
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
