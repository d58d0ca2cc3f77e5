//! One Record stream's writer: a thread that owns the session's [`TraceWriter`], fed by a
//! bounded channel from the stream's async task.
//!
//! File I/O (JSON encoding, gzip, write, fsync) never runs on the async runtime. The
//! channel holds at most [`CHANNEL_CAP`] messages *and* at most the session's byte budget
//! (each message carries semaphore permits for its encoded size), so a slow disk makes the
//! stream wait — gRPC flow control then pushes back on the server, whose own bounded queue
//! drops and counts — and nothing is ever buffered without bound.
//!
//! The thread also does the session's disk policy: the timer-driven flush (a `Flush`
//! message every interval, plus a check after each record), rotation at the size cap
//! (footer `rotated`, new header, seq continues), a retention pass after each closed file,
//! and on any write error: one `slug=record-disk-full` error log, degraded state, and from
//! then on only counting (the stream keeps being consumed so the server is never blocked).
//!
//! A session sees of the daemon only [`Shared`]: the settings it writes by, the retention
//! policy, the daemon-wide totals and the degraded flag. The daemon's service, session table
//! and limits are not a session's business (and `session` does not import `daemon`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use reflex_proto::v1::{ActRecord, RecordSummary, SessionEnd};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::args::RecorderConfig;
use crate::clock::UtcTime;
use crate::retention::Retention;
use crate::trace::{Footer, Header, ImageMode, RequestRecord};
use crate::writer::{TraceWriter, WriteError, WriterOptions};

/// Messages queued per session (the byte budget usually binds first).
pub const CHANNEL_CAP: usize = 1024;

/// What the stream task sends to the writer thread.
pub(crate) enum Command {
    /// Records in arrival order; the permit returns their bytes to the session's budget
    /// once they are written.
    Acts(Vec<ActRecord>, OwnedSemaphorePermit),
    /// Timer tick: flush what was written since the last flush.
    Flush,
    /// The session is over.
    End(End),
}

/// How a session ended.
pub(crate) struct End {
    pub reason: String,
    /// `(total_requests, dropped_requests)` as the server reported them.
    pub totals: Option<(u64, u64)>,
    pub ended_at: Option<String>,
    /// The server session's refused calls (no seq, no record), as it reported them.
    pub refused: Option<u64>,
}

impl End {
    pub(crate) fn reason(reason: &str) -> End {
        End {
            reason: reason.to_string(),
            totals: None,
            ended_at: None,
            refused: None,
        }
    }

    pub(crate) fn from_client(end: SessionEnd) -> End {
        End {
            reason: sanitize_reason(&end.reason),
            totals: Some((end.total_requests, end.dropped_requests)),
            ended_at: (!end.ended_at.is_empty()).then_some(end.ended_at),
            refused: Some(end.refused_requests),
        }
    }
}

/// `[a-z_]{1,32}`: lowercased, `-` and spaces become `_`, anything else is dropped;
/// empty means `shutdown`.
pub fn sanitize_reason(reason: &str) -> String {
    let s: String = reason
        .chars()
        .filter_map(|c| match c {
            'a'..='z' | '_' => Some(c),
            'A'..='Z' => Some(c.to_ascii_lowercase()),
            '-' | ' ' => Some('_'),
            _ => None,
        })
        .take(32)
        .collect();
    if s.is_empty() {
        "shutdown".to_string()
    } else {
        s
    }
}

/// What every session shares with the daemon, and all it sees of it. The daemon owns it
/// and reads it for `Status`.
pub(crate) struct Shared {
    /// The settings sessions write by (directory, gzip level, flushes, rotation, cap).
    pub config: RecorderConfig,
    /// The directory's deletion policy and its set of open files.
    pub retention: Retention,
    /// Records written, all sessions together.
    pub records: AtomicU64,
    /// Bytes written, all sessions together.
    pub bytes: AtomicU64,
    /// Drops of sessions that have ended (a live session's are in its [`SessionState`]).
    pub dropped_done: AtomicU64,
    /// Records lost on broken streams, all sessions together (see `Header::lost_requests`).
    pub lost: AtomicU64,
    /// For each session whose stream ended here: the seq after the last one received, so
    /// that a continuing stream's records lost in between can be counted.
    received_through: Mutex<HashMap<String, u64>>,
    /// Why the daemon is degraded: the first write error of any session.
    degraded: Mutex<Option<String>>,
}

impl Shared {
    pub(crate) fn new(config: RecorderConfig) -> Shared {
        Shared {
            retention: Retention::new(config.dir.clone(), config.max_total_bytes),
            config,
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            dropped_done: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            received_through: Mutex::new(HashMap::new()),
            degraded: Mutex::new(None),
        }
    }

    /// Marks the daemon degraded (sticky; the first reason is kept).
    pub(crate) fn set_degraded(&self, reason: String) {
        lock(&self.degraded).get_or_insert(reason);
    }

    /// Why the daemon is degraded, if it is.
    pub(crate) fn degraded(&self) -> Option<String> {
        lock(&self.degraded).clone()
    }

    /// Records of session `header.session_id` lost between its previous stream and this
    /// one, which starts at `header.first_seq`: the seqs after the last one this recorder
    /// received of it (noted when that stream ended, or read from the session's newest file
    /// in the folder after a restart) and before `first_seq`. `None` when unknown.
    pub(crate) fn lost_before(&self, header: &Header) -> Option<u64> {
        if header.first_seq == 0 {
            return None;
        }
        let sid = &header.session_id;
        let noted = lock(&self.received_through).get(sid).copied();
        let next = noted.or_else(|| next_seq_in_folder(&self.config.dir, sid));
        match next {
            Some(next) => Some(header.first_seq.saturating_sub(next)),
            None => {
                tracing::info!(session_id = %sid, first_seq = header.first_seq, "a continuing session with no earlier file here: records lost on its broken stream are unknown");
                None
            }
        }
    }

    fn note_received(&self, session_id: &str, next: u64) {
        let mut m = lock(&self.received_through);
        // A note per ended session; a long-lived daemon forgets the oldest (by any order:
        // after a restart the folder answers the same question).
        if m.len() >= 65_536 && !m.contains_key(session_id) {
            m.clear();
        }
        m.insert(session_id.to_string(), next);
    }

    /// One retention pass; a failure is logged, never fatal.
    pub(crate) fn enforce_retention(&self) {
        if let Err(e) = self.retention.enforce() {
            tracing::warn!(dir = %self.config.dir.display(), error = %e, "retention pass failed");
        }
    }
}

/// Live numbers of one session, read by `Status`.
pub(crate) struct SessionState {
    pub session_id: String,
    /// Records lost on the broken stream before this one (`Header::lost_requests`).
    pub lost: u64,
    pub model_hash: String,
    pub file: Mutex<String>,
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub dropped: AtomicU64,
    pub degraded: AtomicBool,
}

/// The stream task's end of a session.
pub(crate) struct SessionHandle {
    pub tx: mpsc::Sender<Command>,
    pub done: oneshot::Receiver<RecordSummary>,
    pub state: Arc<SessionState>,
}

/// Starts the writer thread of a session whose header has been validated.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    header: Header,
    gzip: bool,
    shutdown: CancellationToken,
) -> std::io::Result<SessionHandle> {
    let mut header = header;
    header.lost_requests = shared.lost_before(&header);
    if let Some(n) = header.lost_requests.filter(|n| *n > 0) {
        shared.lost.fetch_add(n, Ordering::Relaxed);
        tracing::warn!(session_id = %header.session_id, lost = n, slug = "record-lost", "records handed to the session's broken stream never arrived; counted in the new file's header (lost_requests)");
    }
    let state = Arc::new(SessionState {
        lost: header.lost_requests.unwrap_or(0),
        session_id: header.session_id.clone(),
        model_hash: header.model_hash.clone(),
        file: Mutex::new(String::new()),
        records: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        degraded: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::channel(CHANNEL_CAP);
    let (done_tx, done) = oneshot::channel();
    let opts = WriterOptions {
        gzip,
        level: shared.config.gzip_level,
    };
    let mut worker = Worker {
        mode: header.redaction.image,
        session_first_seq: header.first_seq,
        header,
        opts,
        shared,
        state: state.clone(),
        writer: None,
        failed: false,
        last_file: String::new(),
        written: 0,
        received: 0,
        max_seq: None,
        bytes_closed: 0,
        bytes_reported: 0,
        bytes_at_retention: 0,
        last_flush: Instant::now(),
    };
    let name = format!(
        "rec-{}",
        worker.header.session_id.chars().take(8).collect::<String>()
    );
    std::thread::Builder::new().name(name).spawn(move || {
        let summary = worker.run(rx, &shutdown);
        // The stream task may be gone (shutdown deadline); the summary then has no reader.
        let _ = done_tx.send(summary);
    })?;
    Ok(SessionHandle { tx, done, state })
}

struct Worker {
    shared: Arc<Shared>,
    state: Arc<SessionState>,
    /// Template for the headers of rotated files.
    header: Header,
    mode: ImageMode,
    opts: WriterOptions,
    writer: Option<TraceWriter>,
    failed: bool,
    last_file: String,
    session_first_seq: u64,
    written: u64,
    received: u64,
    max_seq: Option<u64>,
    /// Sizes of this session's closed files.
    bytes_closed: u64,
    /// Bytes already added to the daemon-wide total.
    bytes_reported: u64,
    bytes_at_retention: u64,
    last_flush: Instant,
}

impl Worker {
    fn run(
        &mut self,
        mut rx: mpsc::Receiver<Command>,
        shutdown: &CancellationToken,
    ) -> RecordSummary {
        self.open_file();
        let end = loop {
            match rx.blocking_recv() {
                Some(Command::Acts(acts, _permit)) => {
                    acts.into_iter().for_each(|act| self.on_act(act))
                }
                Some(Command::Flush) => self.flush(),
                Some(Command::End(end)) => break end,
                // The stream task went away without a word: the server vanished, or the
                // daemon is past its shutdown deadline.
                None => {
                    break End::reason(if shutdown.is_cancelled() {
                        "shutdown"
                    } else {
                        "client_lost"
                    });
                }
            }
        };
        self.finish(end)
    }

    fn on_act(&mut self, act: ActRecord) {
        self.received += 1;
        self.max_seq = Some(self.max_seq.map_or(act.seq, |s| s.max(act.seq)));
        if let Some(w) = self.writer.as_mut() {
            let record = RequestRecord::from_act(act, self.mode);
            match w.write_request(&record) {
                Ok(()) => {
                    self.written += 1;
                    self.state.records.fetch_add(1, Ordering::Relaxed);
                    self.shared.records.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => self.fail(e),
            }
        }
        self.update_numbers();
        let max_file = self.shared.config.max_file_bytes;
        if let (Some(max), Some(w)) = (max_file, self.writer.as_ref())
            && w.bytes_written() >= max
        {
            self.rotate();
        }
        if self.last_flush.elapsed() >= self.shared.config.flush_interval {
            self.flush();
        }
    }

    fn flush(&mut self) {
        self.last_flush = Instant::now();
        if let Some(w) = self.writer.as_mut()
            && let Err(e) = w.flush()
        {
            self.fail(e);
        }
        self.update_numbers();
        if let Some(cap) = self.shared.config.max_total_bytes {
            // Between closes, a long session still lets old files go now and then.
            let session_bytes =
                self.bytes_closed + self.writer.as_ref().map_or(0, TraceWriter::bytes_written);
            if session_bytes - self.bytes_at_retention >= (cap / 16).max(1 << 20) {
                self.bytes_at_retention = session_bytes;
                self.shared.enforce_retention();
            }
        }
    }

    fn update_numbers(&mut self) {
        let bytes = self.bytes_closed + self.writer.as_ref().map_or(0, TraceWriter::bytes_written);
        self.shared
            .bytes
            .fetch_add(bytes.saturating_sub(self.bytes_reported), Ordering::Relaxed);
        self.bytes_reported = self.bytes_reported.max(bytes);
        self.state.bytes.store(bytes, Ordering::Relaxed);
        self.state
            .dropped
            .store(self.computed_dropped(), Ordering::Relaxed);
    }

    /// Calls the session skipped (seq gaps) or could not write.
    fn computed_dropped(&self) -> u64 {
        let expected = self
            .max_seq
            .map_or(0, |m| (m + 1).saturating_sub(self.session_first_seq))
            .max(self.received);
        expected - self.written
    }

    fn open_file(&mut self) {
        let created = {
            // Hold the open-file set while creating, so that a retention pass never sees
            // the new file unclaimed.
            let mut open = self.shared.retention.lock_open();
            let created = TraceWriter::create(&self.shared.config.dir, &self.header, &self.opts);
            if let Ok(w) = &created {
                open.insert(w.file_name().to_string());
            }
            created
        };
        match created {
            Ok(w) => {
                // Only the stream's first file says what was lost before it.
                self.header.lost_requests = None;
                tracing::info!(session_id = %self.state.session_id, file = %w.file_name(), "trace file opened");
                self.last_file = w.file_name().to_string();
                *lock(&self.state.file) = self.last_file.clone();
                self.writer = Some(w);
                #[cfg(test)]
                self.inject_fault();
            }
            Err(e) => self.fail(e),
        }
        self.last_flush = Instant::now();
    }

    #[cfg(test)]
    fn inject_fault(&mut self) {
        if self
            .shared
            .config
            .fail_sessions
            .contains(&self.state.session_id)
            && let Some(w) = self.writer.as_mut()
        {
            let full = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .expect("/dev/full");
            w.redirect(full);
        }
    }

    fn rotate(&mut self) {
        let Some(w) = self.writer.take() else { return };
        let next_first = w.last_seq().map_or(self.header.first_seq, |s| s + 1);
        let (total, dropped) = w.seq_totals();
        let footer = Footer {
            ended_at: UtcTime::now().rfc3339_millis(),
            total_requests: total,
            dropped_requests: Some(dropped),
            ended_reason: "rotated".into(),
            records_written: None,
            refused_requests: None,
        };
        if self.close(w, &footer) {
            tracing::info!(session_id = %self.state.session_id, file = %self.last_file, "trace file rotated");
            self.header.first_seq = next_first;
            self.open_file();
            self.shared.enforce_retention();
        }
    }

    /// Writes the footer and closes; false (and degraded) on a write error.
    fn close(&mut self, w: TraceWriter, footer: &Footer) -> bool {
        let name = w.file_name().to_string();
        let result = w.finish(footer);
        self.shared.retention.lock_open().remove(&name);
        match result {
            Ok(closed) => {
                self.bytes_closed += closed.bytes;
                self.update_numbers();
                true
            }
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    fn finish(&mut self, end: End) -> RecordSummary {
        // For Status: what the server dropped, or what never reached the file, if more.
        let dropped = match end.totals {
            Some((_, dropped)) => dropped.max(self.computed_dropped()),
            None => self.computed_dropped(),
        };
        if let Some(w) = self.writer.take() {
            let (total, dropped) = match end.totals {
                Some((total, dropped)) if total > 0 || dropped > 0 => (total, dropped),
                // A server that sent no numbers (or a lost one): what the seqs say.
                _ => w.seq_totals(),
            };
            let footer = Footer {
                ended_at: end
                    .ended_at
                    .clone()
                    .unwrap_or_else(|| UtcTime::now().rfc3339_millis()),
                total_requests: total,
                dropped_requests: Some(dropped),
                ended_reason: end.reason.clone(),
                records_written: None,
                refused_requests: end.refused,
            };
            if self.close(w, &footer) {
                tracing::info!(
                    session_id = %self.state.session_id,
                    file = %self.last_file,
                    records = self.written,
                    reason = %end.reason,
                    "trace file closed"
                );
            }
            self.shared.enforce_retention();
        }
        self.update_numbers();
        self.shared.note_received(
            &self.state.session_id,
            self.max_seq.map_or(self.session_first_seq, |s| s + 1),
        );
        self.shared
            .dropped_done
            .fetch_add(dropped, Ordering::Relaxed);
        RecordSummary {
            file: self.last_file.clone(),
            records_written: self.written,
            bytes_written: self.bytes_closed.max(self.bytes_reported),
        }
    }

    /// The one place a write error lands: log once, mark degraded, stop writing.
    fn fail(&mut self, e: WriteError) {
        if let Some(w) = self.writer.take() {
            // The file stays as it is (no footer): start-up recovery repairs it.
            self.shared.retention.lock_open().remove(w.file_name());
            self.bytes_closed += w.bytes_written();
        }
        if !self.failed {
            self.failed = true;
            tracing::error!(
                slug = "record-disk-full",
                session_id = %self.state.session_id,
                file = %self.last_file,
                error = %e,
                "trace write failed; recording stopped for this session"
            );
            self.state.degraded.store(true, Ordering::Relaxed);
            self.shared
                .set_degraded(format!("session {}: {e}", self.state.session_id));
        }
    }
}

/// A poisoned lock here only means another thread panicked while holding plain data;
/// the data is still usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The seq after the last request in the newest trace file of `session_id` in `dir` (its
/// `first_seq` if it holds none); `None` when there is no such file or it cannot be read.
fn next_seq_in_folder(dir: &std::path::Path, session_id: &str) -> Option<u64> {
    let newest = crate::retention::trace_files(dir)
        .ok()?
        .into_iter()
        .filter(|f| {
            f.name
                .strip_suffix(".jsonl.gz")
                .or_else(|| f.name.strip_suffix(".jsonl"))
                .is_some_and(|stem| stem.len() > 25 && &stem[25..] == session_id)
        })
        .max_by(|a, b| a.age_key().cmp(&b.age_key()))?;
    let mut reader = crate::reader::TraceReader::open(dir.join(&newest.name)).ok()?;
    let mut next = reader.header().first_seq;
    // A cut or damaged tail ends the scan: what was read is what the file holds.
    while let Ok(Some(record)) = reader.next_record() {
        if let crate::trace::Record::Request(r) = record {
            next = next.max(r.seq + 1);
        }
    }
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_sanitized() {
        assert_eq!(sanitize_reason("shutdown"), "shutdown");
        assert_eq!(sanitize_reason(""), "shutdown");
        assert_eq!(sanitize_reason("Model-Reload now"), "model_reload_now");
        assert_eq!(sanitize_reason("../../etc/passwd\n{\"x\":1}"), "etcpasswdx");
        assert_eq!(sanitize_reason(&"a".repeat(100)).len(), 32);
        assert_eq!(sanitize_reason("1234"), "shutdown");
    }
}
