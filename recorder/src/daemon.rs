//! The recorder daemon: the `reflex.v1.Recorder` service on a Unix socket.
//!
//! [`RecorderService`] only translates between the wire and the domain: it checks the first
//! message of a `Record` stream (`SessionStart`, validated before anything touches the
//! disk), hands the session to its writer thread ([`crate::session`]) and forwards events
//! with backpressure. Domain errors become a gRPC `Status` in one place
//! (`RecordError`'s `From` impl).
//!
//! The socket is bound by [`reflex_listen::bind_unix`] and served through
//! [`reflex_listen::unix_incoming`], as the model server's are: grpcurl, grpcio and grpc-java
//! send the socket path as `:authority`, which h2 alone refuses. Server reflection (v1 and
//! v1alpha) lists `reflex.v1.Recorder`, so `grpcurl` needs no `.proto` file.
//!
//! Limits: message size (`--max-message-mb`), concurrent sessions (`--max-sessions`,
//! RESOURCE_EXHAUSTED beyond), per-session buffer (bytes and messages), time to send
//! `SessionStart`.
//!
//! Order of work in [`serve_with`]: create the directory, repair footer-less files
//! ([`crate::recovery`]) and apply retention — all before the first stream is accepted —
//! then serve. Shutdown, when the token is cancelled: stop accepting; every open session
//! writes its footer (`shutdown`), the gzip trailer and fsyncs; the streams are answered;
//! then `serve` returns. If that takes longer than the drain deadline, `serve` returns
//! anyway and the files left without footer are repaired at the next start.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use prost::Message as _;
use reflex_proto::v1::recorder_server::{Recorder, RecorderServer};
use reflex_proto::v1::{
    RecordEvent, RecordSummary, RecorderStatus, SessionStart, SessionStatus, StatusRequest,
    record_event::Event,
};
use reflex_systemd::State as Notice;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::args::{RecorderArgs, RecorderConfig};
use crate::recovery;
use crate::session::{self, Command, End, SessionHandle, SessionState, Shared, lock};
use crate::trace::{Header, StartError};
use crate::writer::{self, WriteError};

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("another recorder is listening on {}", .0.display())]
    AlreadyListening(PathBuf),
    #[error("{} exists and is not a socket; not replacing it", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot listen on {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    /// Any other failure to bind `--listen` (its folder, its mode).
    #[error(transparent)]
    Socket(reflex_listen::BindError),
    #[error(transparent)]
    Dir(#[from] WriteError),
    #[error("start-up recovery of {} failed: {source}", path.display())]
    Recovery { path: PathBuf, source: io::Error },
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("recorder gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("recorder task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<reflex_listen::BindError> for DaemonError {
    fn from(e: reflex_listen::BindError) -> DaemonError {
        use reflex_listen::BindError;
        match e {
            BindError::InUse(path) => DaemonError::AlreadyListening(path),
            BindError::NotASocket(path) => DaemonError::NotASocket(path),
            e @ BindError::Io { .. } => DaemonError::Socket(e),
        }
    }
}

/// Daemon-wide state: what the sessions share ([`Shared`]), and the session table and slots
/// that are the service's alone.
struct State {
    shared: Arc<Shared>,
    sessions_total: AtomicU64,
    sessions: Mutex<BTreeMap<u64, Arc<SessionState>>>,
    slots: Arc<Semaphore>,
}

impl State {
    fn new(config: RecorderConfig) -> State {
        State {
            slots: Arc::new(Semaphore::new(config.max_sessions)),
            shared: Arc::new(Shared::new(config)),
            sessions_total: AtomicU64::new(0),
            sessions: Mutex::new(BTreeMap::new()),
        }
    }

    fn config(&self) -> &RecorderConfig {
        &self.shared.config
    }
}

/// Why a Record stream was refused or ended early (the client's view).
#[derive(Debug, thiserror::Error)]
enum RecordError {
    #[error("too many recording sessions (max {0})")]
    TooManySessions(usize),
    #[error("the stream ended before SessionStart")]
    NoStart,
    #[error("no SessionStart within {0:?}")]
    StartTimeout(Duration),
    #[error("the first message must be SessionStart")]
    FirstNotStart,
    #[error("invalid SessionStart: {0}")]
    BadStart(#[from] StartError),
    #[error("invalid SessionStart: {0}")]
    BadName(WriteError),
    #[error("the recorder is shutting down")]
    ShuttingDown,
    #[error("cannot start the session's writer: {0}")]
    Internal(io::Error),
    #[error(transparent)]
    Stream(Status),
}

/// The one place domain errors become gRPC statuses.
impl From<RecordError> for Status {
    fn from(e: RecordError) -> Status {
        let msg = e.to_string();
        match e {
            RecordError::TooManySessions(_) => Status::resource_exhausted(msg),
            RecordError::NoStart
            | RecordError::FirstNotStart
            | RecordError::BadStart(_)
            | RecordError::BadName(_) => Status::invalid_argument(msg),
            RecordError::StartTimeout(_) => Status::deadline_exceeded(msg),
            RecordError::ShuttingDown => Status::unavailable(msg),
            RecordError::Internal(_) => Status::internal("cannot start the session's writer"),
            RecordError::Stream(status) => status,
        }
    }
}

/// `reflex.v1.Recorder`.
pub struct RecorderService {
    state: Arc<State>,
    shutdown: CancellationToken,
}

impl RecorderService {
    /// A server whose stream broke may reconnect before this side has seen the break: the
    /// old stream of the session is then still being written. Its end is waited for (up to
    /// 3 s), so that what it received is known when the new stream counts what was lost.
    async fn await_earlier_stream(&self, session_id: &str) {
        let live = || {
            lock(&self.state.sessions)
                .values()
                .any(|s| s.session_id == session_id)
        };
        let until = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        while live() && tokio::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

#[tonic::async_trait]
impl Recorder for RecorderService {
    async fn record(
        &self,
        request: Request<Streaming<RecordEvent>>,
    ) -> Result<Response<RecordSummary>, Status> {
        let max = self.state.config().max_sessions;
        let _slot = self
            .state
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| RecordError::TooManySessions(max))?;
        let mut stream = request.into_inner();
        let start = self.first_message(&mut stream).await?;
        let header = validate_start(&start)?;
        if header.first_seq > 0 {
            self.await_earlier_stream(&header.session_id).await;
        }
        let session = session::spawn(
            self.state.shared.clone(),
            header,
            !start.no_gzip,
            self.shutdown.clone(),
        )
        .map_err(RecordError::Internal)?;
        let id = self.state.sessions_total.fetch_add(1, Ordering::Relaxed);
        lock(&self.state.sessions).insert(id, session.state.clone());
        tracing::info!(session_id = %start.session_id, model_hash = %start.model_hash, "session started");
        let summary = self.pump(&mut stream, session).await;
        lock(&self.state.sessions).remove(&id);
        Ok(Response::new(summary))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<RecorderStatus>, Status> {
        let state = &self.state;
        let sessions: Vec<SessionStatus> = lock(&state.sessions)
            .values()
            .map(|s| SessionStatus {
                session_id: s.session_id.clone(),
                file: lock(&s.file).clone(),
                records_written: s.records.load(Ordering::Relaxed),
                bytes_written: s.bytes.load(Ordering::Relaxed),
                dropped_requests: s.dropped.load(Ordering::Relaxed),
                degraded: s.degraded.load(Ordering::Relaxed),
                model_hash: s.model_hash.clone(),
                lost_requests: s.lost,
            })
            .collect();
        let live_dropped: u64 = sessions.iter().map(|s| s.dropped_requests).sum();
        let shared = &state.shared;
        let degraded_reason = shared.degraded().unwrap_or_default();
        Ok(Response::new(RecorderStatus {
            dir: shared.config.dir.display().to_string(),
            sessions,
            sessions_total: state.sessions_total.load(Ordering::Relaxed),
            records_written: shared.records.load(Ordering::Relaxed),
            bytes_written: shared.bytes.load(Ordering::Relaxed),
            dropped_requests: shared.dropped_done.load(Ordering::Relaxed) + live_dropped,
            degraded: !degraded_reason.is_empty(),
            degraded_reason,
            reflex_version: env!("CARGO_PKG_VERSION").to_string(),
            lost_requests: shared.lost.load(Ordering::Relaxed),
        }))
    }
}

/// Everything in a `SessionStart` that could reach a path or the header is checked here,
/// before a file exists.
fn validate_start(start: &SessionStart) -> Result<Header, RecordError> {
    writer::check_session_id(&start.session_id).map_err(RecordError::BadName)?;
    writer::check_model_hash(&start.model_hash).map_err(RecordError::BadName)?;
    Ok(Header::from_start(start)?)
}

impl RecorderService {
    async fn first_message(
        &self,
        stream: &mut Streaming<RecordEvent>,
    ) -> Result<SessionStart, RecordError> {
        let timeout = self.state.config().start_timeout;
        let msg = tokio::select! {
            msg = stream.message() => msg.map_err(RecordError::Stream)?,
            _ = tokio::time::sleep(timeout) => return Err(RecordError::StartTimeout(timeout)),
            _ = self.shutdown.cancelled() => return Err(RecordError::ShuttingDown),
        };
        match msg {
            Some(RecordEvent {
                event: Some(Event::Start(start)),
            }) => Ok(start),
            Some(_) => Err(RecordError::FirstNotStart),
            None => Err(RecordError::NoStart),
        }
    }

    /// Forwards the stream to the writer thread until it ends; returns the summary once
    /// the file is closed.
    async fn pump(
        &self,
        stream: &mut Streaming<RecordEvent>,
        session: SessionHandle,
    ) -> RecordSummary {
        let SessionHandle { tx, done, state } = session;
        let budget_total = self
            .state
            .config()
            .session_buffer_bytes
            .clamp(1, Semaphore::MAX_PERMITS);
        let budget = Arc::new(Semaphore::new(budget_total));
        let mut tick = tokio::time::interval(self.state.config().flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            let first = tokio::select! {
                _ = self.shutdown.cancelled() => break End::reason("shutdown"),
                _ = tick.tick() => {
                    // A full queue means the writer is busy and checks the clock itself.
                    let _ = tx.try_send(Command::Flush);
                    continue;
                }
                msg = stream.message() => msg,
            };
            // Take what has already arrived along with the first message: one queue
            // operation (and at most one wake-up of the writer) per batch, not per record.
            let mut batch = Vec::new();
            let mut cost = 0usize;
            let mut ending = None;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Ok(Some(RecordEvent {
                        event: Some(Event::Act(act)),
                    })) => {
                        cost += act.encoded_len();
                        batch.push(act);
                        if batch.len() < MAX_BATCH && cost < budget_total / 4 {
                            next = now_or_never(stream.message());
                        }
                    }
                    Ok(Some(RecordEvent {
                        event: Some(Event::End(end)),
                    })) => ending = Some(End::from_client(end)),
                    Ok(Some(RecordEvent {
                        event: Some(Event::Start(_)),
                    })) => {
                        tracing::warn!(session_id = %state.session_id, "second SessionStart ignored");
                    }
                    Ok(Some(RecordEvent { event: None })) => {}
                    Ok(None) => ending = Some(End::reason("client_lost")),
                    Err(status) => {
                        tracing::info!(session_id = %state.session_id, error = %status, "record stream lost");
                        ending = Some(End::reason("client_lost"));
                    }
                }
            }
            if !batch.is_empty() {
                let cost = cost.clamp(1, budget_total) as u32;
                // Waiting for budget or queue room is the backpressure: the stream is not
                // read meanwhile, so gRPC flow control holds the server back.
                let permit = tokio::select! {
                    p = budget.clone().acquire_many_owned(cost) => p,
                    _ = self.shutdown.cancelled() => break End::reason("shutdown"),
                };
                // The budget semaphore is never closed.
                let Ok(permit) = permit else {
                    break End::reason("shutdown");
                };
                tokio::select! {
                    sent = tx.send(Command::Acts(batch, permit)) => {
                        if sent.is_err() {
                            break End::reason("client_lost");
                        }
                    }
                    _ = self.shutdown.cancelled() => break End::reason("shutdown"),
                }
            }
            if let Some(end) = ending {
                break end;
            }
        };
        tracing::info!(session_id = %state.session_id, reason = %end.reason, "session ending");
        // The writer drains what is queued before it sees End; it never stops receiving.
        let _ = tx.send(Command::End(end)).await;
        drop(tx);
        done.await.unwrap_or_default()
    }
}

/// Records forwarded to the writer in one queue message, at most.
const MAX_BATCH: usize = 64;

/// Polls a future once: its output if it is ready now. `Streaming::message` keeps its state
/// in the stream, so dropping it pending loses nothing.
fn now_or_never<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// Binds the recorder's Unix socket at `path` ([`reflex_listen::bind_unix`]): creates the
/// parent directory (0750) if missing, replaces a stale socket file, refuses a live one and
/// anything that is not a socket, and sets mode 0660.
pub fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    Ok(reflex_listen::bind_unix(path)?)
}

/// Serves `reflex.v1.Recorder` on an already-bound listener until `shutdown` is cancelled.
pub async fn serve(
    listener: UnixListener,
    config: RecorderConfig,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    serve_with(listener, config, shutdown, || {}).await
}

/// [`serve`] for a listener handed over as a std socket (socket activation).
pub async fn serve_std(
    listener: std::os::unix::net::UnixListener,
    config: RecorderConfig,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let bind_err = |source| DaemonError::Bind {
        path: PathBuf::from("(inherited socket)"),
        source,
    };
    listener.set_nonblocking(true).map_err(bind_err)?;
    serve(
        UnixListener::from_std(listener).map_err(bind_err)?,
        config,
        shutdown,
    )
    .await
}

/// [`serve`], calling `ready` once recovery is done and streams are accepted (for
/// readiness notification).
pub async fn serve_with(
    listener: UnixListener,
    config: RecorderConfig,
    shutdown: CancellationToken,
    ready: impl FnOnce() + Send,
) -> Result<(), DaemonError> {
    let state = Arc::new(State::new(config));
    let prep = state.shared.clone();
    tokio::task::spawn_blocking(move || -> Result<(), DaemonError> {
        let dir = &prep.config.dir;
        writer::ensure_dir(dir)?;
        let report = recovery::recover_dir(dir, prep.config.gzip_level).map_err(|source| {
            DaemonError::Recovery {
                path: dir.clone(),
                source,
            }
        })?;
        if !report.repaired.is_empty() || !report.left_alone.is_empty() {
            tracing::info!(
                repaired = report.repaired.len(),
                left_alone = report.left_alone.len(),
                "start-up recovery done"
            );
        }
        prep.enforce_retention();
        Ok(())
    })
    .await??;

    let service = RecorderService {
        state: state.clone(),
        shutdown: shutdown.clone(),
    };
    let max_message = state.config().max_message_bytes;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(reflex_proto::FILE_DESCRIPTOR_SET)
        .with_service_name("reflex.v1.Recorder")
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(reflex_proto::FILE_DESCRIPTOR_SET)
        .with_service_name("reflex.v1.Recorder")
        .build_v1alpha()?;
    let server = tonic::transport::Server::builder()
        .add_service(RecorderServer::new(service).max_decoding_message_size(max_message))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            reflex_listen::unix_incoming(listener),
            shutdown.clone().cancelled_owned(),
        );
    tracing::info!(dir = %state.config().dir.display(), "recorder ready");
    ready();
    let drain = state.config().drain_deadline;
    tokio::select! {
        served = server => served?,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(drain).await } => {
            tracing::warn!(open = lock(&state.sessions).len(), "shutdown deadline passed; open files are left to start-up recovery");
        }
    }
    Ok(())
}

/// `reflex recorder`: serves on the socket systemd passed (socket activation) or else binds
/// `--listen`, until `shutdown`; then removes the socket file it bound itself.
///
/// Under systemd (`Type=notify`) it says READY=1 once recovery is done and streams are
/// accepted, and STOPPING=1 when shutdown begins. An inherited socket belongs to systemd:
/// it is neither replaced nor removed, so servers can connect while the recorder restarts.
pub async fn run(args: RecorderArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = args.config();
    let (listener, owned_path, socket) = match inherited_listener()? {
        Some((l, name)) => {
            tracing::info!(fd_name = %name, "using the socket passed by the service manager; --listen is ignored");
            let at = l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()));
            (
                l,
                None,
                at.unwrap_or_else(|| format!("inherited socket {name}")),
            )
        }
        None => {
            let path = args.listen.path().to_path_buf();
            (bind(&path)?, Some(path.clone()), path.display().to_string())
        }
    };
    tracing::info!(socket = %socket, dir = %config.dir.display(), "recorder listening");
    let stopping = shutdown.clone();
    let notice = tokio::spawn(async move {
        stopping.cancelled().await;
        notify(&[
            Notice::Stopping,
            Notice::Status("stopping: closing trace files"),
        ]);
    });
    let status = format!("recording into {} from {socket}", config.dir.display());
    let ready = move || notify(&[Notice::Ready, Notice::Status(&status)]);
    let cancelled = shutdown.clone();
    let served = serve_with(listener, config, shutdown, ready).await;
    if cancelled.is_cancelled() {
        // Shutdown began: STOPPING=1 goes out even when serving ended before the notice task
        // ran (an idle recorder stops at once; aborting here lost the notice).
        let _ = notice.await;
    } else {
        notice.abort();
    }
    if let Some(path) = owned_path {
        let _ = fs::remove_file(path);
    }
    served.with_context(|| format!("recorder on {socket}"))
}

/// The listening Unix socket passed by socket activation (`LISTEN_FDS`), with its name.
/// One descriptor is used as is; of several, the one named `recorder`
/// (`FileDescriptorName=recorder`).
fn inherited_listener() -> anyhow::Result<Option<(UnixListener, String)>> {
    let mut fds = reflex_systemd::listen_fds().context("socket activation")?;
    let fd = match fds.len() {
        0 => return Ok(None),
        1 => fds.remove(0),
        _ => {
            let names: Vec<String> = fds.iter().map(|f| f.name.clone()).collect();
            let at = names.iter().position(|n| n == "recorder").ok_or_else(|| {
                anyhow::anyhow!(
                    "socket activation passed {} sockets ({}) and none is named \"recorder\"; \
                     set FileDescriptorName=recorder in the .socket unit",
                    names.len(),
                    names.join(", ")
                )
            })?;
            fds.swap_remove(at)
        }
    };
    let name = fd.name.clone();
    let std_listener = fd.into_unix_listener().context("socket activation")?;
    std_listener
        .set_nonblocking(true)
        .context("socket activation")?;
    Ok(Some((
        UnixListener::from_std(std_listener).context("socket activation")?,
        name,
    )))
}

fn notify(states: &[Notice<'_>]) {
    if let Err(e) = reflex_systemd::notify(states) {
        tracing::warn!(error = %e, slug = "systemd-notify-failed", "cannot notify the service manager");
    }
}

#[cfg(test)]
mod tests;
