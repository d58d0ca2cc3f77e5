//! One replay run, from the trace's header to the exit code.
//!
//! Order of work: open the trace (header; exit 1 if it cannot be read) → print the header
//! block → `--no-replay` stops here with [`crate::inspection`] → index `--image-dir` →
//! start the feed → look at the first request record: a trace without images stops here
//! (exit 1), before any model is loaded → connect the target or load the model (exit 2)
//! → replay → summary → stop the private server → write `--output`.
//!
//! **The feed.** A blocking task reads records through the recorder's reader (the only
//! way this crate reads a trace), resolves images and builds each `ActRequest`, and hands
//! them over a bounded channel: file reading, base64, SHA-256 and image files never run
//! on the async runtime, and the reader stays at most a few records ahead.
//!
//! **In flight.** Up to `--concurrency` calls run as tasks; their handles wait in a queue
//! in seq order and the front one is awaited, so lines print in seq order whatever order
//! the answers come in.
//!
//! **Stopping early.** SIGINT/SIGTERM (the shutdown token): no new call is sent, the ones
//! in flight are answered and printed, then the summary. A line after the header that
//! cannot be read (damage, not a crash-cut tail): the same, then exit 1. The target
//! answering UNAVAILABLE (gone, or shutting down) where the recorded call did not fail
//! that way: the same, then exit 2. A crash-cut tail is a warning, not an error.
//!
//! **Exit codes,** most serious first: 1 the trace could not be read (or has no images
//! to send, none of them were found under `--image-dir`, or `--image-dir`/`--output` is
//! unusable); 2 the target could not be reached or
//! loaded, went away, or failed a call that succeeded when recorded; 3 `--fail-on`
//! fired; 0 otherwise (failing diffs without `--fail-on` included, as in the seed).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use reflex_proto::v1::policy_client::PolicyClient;
use reflex_proto::v1::{ActRequest, ActResponse};
use reflex_proto::{AuthChannel, CallTracer};
use reflex_recorder::trace::ImageMode;
use reflex_recorder::{Footer, Header, ReadError, Record, RequestRecord, TraceReader, Truncation};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Exit;
use crate::args::ReplayArgs;
use crate::diff::{ErrorClass, ErrorDiff, KindSet, RecordedError};
use crate::images::{self, ImageIndex, IndexError, Kept, Unresolved};
use crate::inspection::{self, TruncationInfo};
use crate::progress::Unit;
use crate::report::{Console, Outcome, Report, RequestResult, Stop, Summary};
use crate::target::{Target, TargetError};

/// One call may take this long before it counts as a target error.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a run ended with exit 1 or 2 (the boundary error of this crate).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Names the line twice on purpose: `FILE:LINE:` is for editors, "line N of the
    /// trace" for people (serde's own "at line 1 column 20" is about the JSON of one line).
    #[error("{}{source}", line_prefix(.source))]
    Trace {
        #[from]
        source: ReadError,
    },
    #[error(transparent)]
    ImageDir(#[from] IndexError),
    #[error("{}: {what}", path.display())]
    ImagesUnavailable { path: PathBuf, what: String },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("--output {}: {reason}", path.display())]
    Output { path: PathBuf, reason: String },
    /// A TRACE argument that names no trace (a folder without any, or one not readable).
    #[error("{}: {reason}", path.display())]
    TraceSource { path: PathBuf, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ReplayError {
    /// The exit code this error stands for.
    pub fn exit(&self) -> Exit {
        match self {
            ReplayError::Trace { .. }
            | ReplayError::ImageDir(_)
            | ReplayError::ImagesUnavailable { .. }
            | ReplayError::Output { .. }
            | ReplayError::TraceSource { .. }
            | ReplayError::Internal(_) => Exit::TraceError,
            ReplayError::Target(_) => Exit::TargetFailed,
        }
    }
}

fn line_prefix(e: &ReadError) -> String {
    match e.line() {
        0 => String::new(),
        n => format!("line {n} of the trace: "),
    }
}

/// Runs one replay, printing to `con`; returns the exit code and the report. With a
/// `tracer`, each call is a span whose context goes to the target (`traceparent`).
pub async fn execute(
    args: &ReplayArgs,
    shutdown: &CancellationToken,
    con: &mut Console,
    tracer: Option<Arc<dyn CallTracer>>,
) -> (Exit, Report) {
    let mut report = Report::new(args);
    let result = if args.is_fleet() {
        crate::fleet::drive(args, shutdown, con, &mut report, tracer).await
    } else {
        drive(args, shutdown, con, &mut report, tracer).await
    };
    let mut exit = match result {
        Ok(exit) => exit,
        Err(e) => {
            let text = e.to_string();
            con.error(&text);
            report.error = Some(text);
            e.exit()
        }
    };
    if let Some(path) = &args.output {
        report.exit_code = exit as u8;
        if let Err(e) = report.write(path) {
            con.error(&format!("cannot write --output {}: {e}", path.display()));
            // CI reads the report: a run that passed without it has not passed.
            if exit == Exit::Passed {
                exit = Exit::TraceError;
            }
        }
    }
    con.flush();
    (exit, report)
}

async fn drive(
    args: &ReplayArgs,
    shutdown: &CancellationToken,
    con: &mut Console,
    report: &mut Report,
    tracer: Option<Arc<dyn CallTracer>>,
) -> Result<Exit, ReplayError> {
    check_output(args)?;
    con.line(&format!("Replay: {}", args.trace.display()));
    let path = args.trace.clone();
    let reader = blocking(move || TraceReader::open(&path)).await??;
    let header = reader.header().clone();
    for l in crate::report::header_text(&header) {
        con.line(&l);
    }
    report.header = Some(header.clone());

    if args.no_replay {
        return inspect(reader, args, shutdown, con, report).await;
    }
    let uris = args.target_uris();
    if uris.is_empty() && args.model.is_none() {
        return Err(TargetError::Missing.into());
    }

    let index = image_index(args, con, report).await?;

    let file_len = std::fs::metadata(&args.trace).map(|m| m.len()).unwrap_or(0);
    let feed_depth = 2 * usize::from(args.concurrency) + 16;
    let mut feed = Feed::start(reader, index.clone(), args.n, feed_depth);
    // The first message decides whether this trace can be replayed at all.
    let first = match feed.rx.recv().await {
        // Damage before the first request: nothing to replay, no model to load.
        Some(FeedMsg::Failed(e)) => return Err(e.into()),
        other => other,
    };
    check_images(&args.trace, &header, index.is_some(), first.as_ref())?;

    let concurrency = usize::from(args.concurrency);
    let target = match (uris.first(), &args.model) {
        (Some(uri), _) => {
            con.line(&format!("Target: {uri}"));
            let opts = args
                .connect_options()
                .map_err(|e| TargetError::Unreachable {
                    target: uri.clone(),
                    reason: e.to_string(),
                })?;
            tokio::select! {
                t = Target::connect(uri, &opts) => t?,
                _ = shutdown.cancelled() => return Err(TargetError::Interrupted.into()),
            }
        }
        (None, Some(dir)) => {
            con.line(&format!("Loading target model: {}", dir.display()));
            let bin = match &args.serve_bin {
                Some(b) => b.clone(),
                None => std::env::current_exe().map_err(|e| TargetError::Model {
                    dir: dir.clone(),
                    reason: format!("cannot find the reflex binary to serve it: {e}"),
                })?,
            };
            Target::start_private(&bin, dir.clone(), concurrency, shutdown).await?
        }
        (None, None) => return Err(TargetError::Missing.into()),
    };
    let mut info = target.info.clone();
    info.model_hash_matches = !info.model_hash.is_empty() && info.model_hash == header.model_hash;
    con.line(&format!(
        "Target model: model_hash {} mode {}{}",
        dash(&info.model_hash),
        dash(&info.mode),
        if target.is_private() {
            format!(" (private server on {})", info.uri)
        } else {
            String::new()
        }
    ));
    if !info.model_hash_matches {
        tracing::warn!(
            slug = "replay-model-mismatch",
            trace = %dash(&header.model_hash),
            target = %dash(&info.model_hash),
            "the target's model_hash is not the trace's"
        );
        let msg = if info.model_hash.is_empty() {
            "the target does not say its model_hash (no GetModelInfo); cannot check it is the traced model".to_string()
        } else {
            format!(
                "MODEL HASH DIFFERS: trace {} vs target {}: the target runs a different model; \
                 actions are compared across models",
                dash(&header.model_hash),
                info.model_hash
            )
        };
        con.warn(&msg);
        report.warnings.push(msg);
    }
    report.target = Some(info);

    con.line(&format!(
        "Replaying requests ({}):",
        crate::report::run_label(args)
    ));
    let diffs = args.diffs();
    let mut summary = Summary::new(diffs, args.fail_on);
    if args.n > 0 {
        con.progress.start(args.n, Unit::Records);
    } else {
        con.progress.start(file_len, Unit::Bytes);
    }
    let mut run = Run {
        client: target.client.clone(),
        diffs,
        tracer,
        concurrency,
        pending: VecDeque::new(),
        in_flight: 0,
        stop: None,
        input_done: false,
        trace_error: None,
        truncation: None,
        footer: None,
        last_file_bytes: 0,
        unconditioned: 0,
    };
    let mut next = first;
    loop {
        run.fill(&mut feed, &mut next, shutdown, con, report, &header)
            .await;
        let Some(result) = run.next_result(shutdown).await else {
            break;
        };
        if result.unavailable && run.stop.is_none() {
            run.stop = Some(Stop::TargetUnavailable);
        }
        con.line(&result.text());
        summary.add(&result);
        let (records, bytes) = (summary.records, run.last_file_bytes);
        con.progress
            .update(records, bytes, || format!("seq={}", result.seq));
        report.push(result);
    }
    con.progress.finish();
    // The feed stops as soon as its channel is gone.
    drop(feed);
    target.stop().await;

    if let Some(t) = &run.truncation {
        let msg = format!(
            "trace truncated ({t}), as a crash leaves it; replayed the records before line {}",
            t.line
        );
        con.warn(&msg);
        report.warnings.push(msg);
    }
    if run.unconditioned > 0 {
        let msg = format!(
            "{} records say vlm_conditioning is not \"real\": their recorded actions did not \
             come from the images and instruction, so their action diffs compare with a stub",
            run.unconditioned
        );
        con.warn(&msg);
        report.warnings.push(msg);
    }
    if let Some(f) = &run.footer {
        con.line(&format!(
            "Footer: total_requests={} dropped_requests={}",
            f.total_requests,
            crate::format::count_or_unknown(f.dropped_requests)
        ));
    }
    if let Some(f) = &run.footer
        && let Some(dropped) = f.dropped_requests.filter(|&d| d > 0)
    {
        let msg = format!(
            "the recording dropped {dropped} of {} calls (footer): they are not in the trace",
            f.total_requests
        );
        con.warn(&msg);
        report.warnings.push(msg);
    }
    summary.stopped = run.stop;
    summary.truncation = run.truncation.as_ref().map(TruncationInfo::from);
    summary.fail_on_triggered = summary.fail_on_fires(args.fail_on);
    for l in summary.text() {
        con.line(&l);
    }
    let exit = if let Some(e) = run.trace_error {
        report.summary = Some(summary);
        return Err(e.into());
    } else if summary.not_replayed > 0 && summary.replayed == 0 && run.stop.is_none() {
        // A wrong --image-dir must not pass a CI run that replayed nothing.
        let n = summary.not_replayed;
        report.summary = Some(summary);
        return Err(ReplayError::ImagesUnavailable {
            path: args.trace.clone(),
            what: format!(
                "the images of none of its {n} records were found under --image-dir; \
                 give the folder with the original image files, or use --no-replay"
            ),
        });
    } else if summary.target_errors > 0 || run.stop == Some(Stop::TargetUnavailable) {
        // Exit 2 without a thrown error: the report still says why.
        let mut why = Vec::new();
        if summary.target_errors > 0 {
            why.push(format!(
                "{} calls that succeeded when recorded failed on the target",
                summary.target_errors
            ));
        }
        if run.stop == Some(Stop::TargetUnavailable) {
            why.push("the target became unavailable mid-replay".to_string());
        }
        report.error = Some(why.join("; "));
        Exit::TargetFailed
    } else if summary.fail_on_triggered {
        Exit::FailOn
    } else {
        Exit::Passed
    };
    report.summary = Some(summary);
    Ok(exit)
}

/// Indexes `--image-dir`, if given, printing what was found.
pub(crate) async fn image_index(
    args: &ReplayArgs,
    con: &mut Console,
    report: &mut Report,
) -> Result<Option<Arc<ImageIndex>>, ReplayError> {
    Ok(match &args.image_dir {
        None => None,
        Some(dir) => {
            let d = dir.clone();
            let index = blocking(move || ImageIndex::build(&d)).await??;
            let mut line = format!(
                "Images: {} distinct files indexed from {}",
                index.len(),
                dir.display()
            );
            if index.skipped_large > 0 {
                line.push_str(&format!(
                    " ({} larger than {} MiB skipped)",
                    index.skipped_large,
                    images::MAX_IMAGE_BYTES >> 20
                ));
            }
            con.line(&line);
            if index.unreadable > 0 {
                let msg = format!(
                    "{} entries under --image-dir could not be read",
                    index.unreadable
                );
                con.warn(&msg);
                report.warnings.push(msg);
            }
            Some(Arc::new(index))
        }
    })
}

/// `--no-replay`.
async fn inspect(
    mut reader: TraceReader,
    args: &ReplayArgs,
    shutdown: &CancellationToken,
    con: &mut Console,
    report: &mut Report,
) -> Result<Exit, ReplayError> {
    let n_label = if args.n == 0 {
        "all".to_string()
    } else {
        args.n.to_string()
    };
    con.line(&format!("Reading trace (--no-replay, --n={n_label}):"));
    let (n, stop) = (args.n, shutdown.clone());
    let (ins, err) = blocking(move || inspection::scan(&mut reader, n, &stop)).await?;
    if let Some(t) = &ins.truncation {
        let msg = format!("trace truncated ({}), as a crash leaves it", t.reason);
        con.warn(&msg);
        report.warnings.push(msg);
    }
    for l in ins.text() {
        con.line(&l);
    }
    report.inspection = Some(ins);
    match err {
        Some(e) => Err(e.into()),
        None => Ok(Exit::Passed),
    }
}

/// Fails early on an `--output` that cannot be written, rather than after a long replay.
pub(crate) fn check_output(args: &ReplayArgs) -> Result<(), ReplayError> {
    let Some(path) = &args.output else {
        return Ok(());
    };
    let fail = |reason: &str| ReplayError::Output {
        path: path.clone(),
        reason: reason.to_string(),
    };
    if path.file_name().is_none() || path.is_dir() {
        return Err(fail("is not a file path"));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !parent.is_dir() {
        return Err(fail("its folder does not exist"));
    }
    Ok(())
}

/// Stops a trace that has nothing to send before any model is loaded.
pub(crate) fn check_images(
    path: &std::path::Path,
    header: &Header,
    have_index: bool,
    first: Option<&FeedMsg>,
) -> Result<(), ReplayError> {
    let unavailable = |what: &str| ReplayError::ImagesUnavailable {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    let first = match first {
        Some(FeedMsg::Item(item)) => Some(&item.record),
        _ => None,
    };
    let kept = first.map(|r| images::kept(r));
    if header.redaction.image == ImageMode::None || kept == Some(Kept::Nothing) {
        return Err(unavailable(
            "this trace keeps no images, not even their hashes (recorded with --record-images none), \
             so it cannot be replayed against a model (--image-dir needs the hashes); \
             use --no-replay to inspect it",
        ));
    }
    if kept == Some(Kept::Hashes) && !have_index {
        return Err(unavailable(
            "this trace keeps only the SHA-256 of its images (recorded with --record-images hash_only); \
             give --image-dir DIR with the original image files to replay it, \
             or use --no-replay to inspect it without a model",
        ));
    }
    Ok(())
}

pub(crate) fn dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// Runs blocking work off the runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ReplayError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ReplayError::Internal(format!("a blocking task failed: {e}")))
}

/// What the feed sends.
pub(crate) enum FeedMsg {
    Item(Box<Item>),
    /// A header after the first line (files concatenated or rotated).
    Header(Box<Header>),
    /// The end of the file, or of `--n` (then neither field is known).
    End {
        truncation: Option<Truncation>,
        footer: Option<Footer>,
    },
    Failed(ReadError),
}

/// One request record, ready to send (or known to be unsendable).
pub(crate) struct Item {
    pub(crate) line: u64,
    pub(crate) file_bytes: u64,
    pub(crate) record: Box<RequestRecord>,
    pub(crate) request: Result<ActRequest, Unresolved>,
}

pub(crate) struct Feed {
    pub(crate) rx: mpsc::Receiver<FeedMsg>,
}

impl Feed {
    pub(crate) fn start(
        mut reader: TraceReader,
        index: Option<Arc<ImageIndex>>,
        n: u64,
        depth: usize,
    ) -> Feed {
        let (tx, rx) = mpsc::channel(depth);
        tokio::task::spawn_blocking(move || {
            let mut taken = 0u64;
            loop {
                if n > 0 && taken >= n {
                    let _ = tx.blocking_send(FeedMsg::End {
                        truncation: None,
                        footer: None,
                    });
                    return;
                }
                let msg = match reader.next_record() {
                    Ok(Some(Record::Request(record))) => {
                        taken += 1;
                        let request = images::request_for(&record, index.as_deref());
                        FeedMsg::Item(Box::new(Item {
                            line: reader.line_number(),
                            file_bytes: reader.file_bytes_read(),
                            record,
                            request,
                        }))
                    }
                    Ok(Some(Record::Header(h))) => FeedMsg::Header(h),
                    Ok(Some(Record::Footer(_))) => continue,
                    Ok(None) => {
                        let _ = tx.blocking_send(FeedMsg::End {
                            truncation: reader.truncation().cloned(),
                            footer: reader.footer().cloned(),
                        });
                        return;
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(FeedMsg::Failed(e));
                        return;
                    }
                };
                // The replay stopped listening: stop reading.
                if tx.blocking_send(msg).is_err() {
                    return;
                }
            }
        });
        Feed { rx }
    }
}

/// A result to print: ready now, or a call still running.
enum Pending {
    Ready(Box<RequestResult>),
    Call(JoinHandle<RequestResult>, u64, u64),
}

/// The state of the replay loop.
struct Run {
    client: PolicyClient<AuthChannel>,
    diffs: KindSet,
    tracer: Option<Arc<dyn CallTracer>>,
    concurrency: usize,
    pending: VecDeque<Pending>,
    in_flight: usize,
    stop: Option<Stop>,
    input_done: bool,
    trace_error: Option<ReadError>,
    truncation: Option<Truncation>,
    footer: Option<Footer>,
    last_file_bytes: u64,
    /// Records whose `vlm_conditioning` (the seed tool's field) is not `"real"`.
    unconditioned: u64,
}

impl Run {
    /// Takes records from the feed until `concurrency` calls are in flight (or the feed
    /// ends, or the run stops).
    async fn fill(
        &mut self,
        feed: &mut Feed,
        next: &mut Option<FeedMsg>,
        shutdown: &CancellationToken,
        con: &mut Console,
        report: &mut Report,
        header: &Header,
    ) {
        // Ready results count against the queue too, so unsendable records cannot pile up.
        while self.stop.is_none()
            && !self.input_done
            && self.in_flight < self.concurrency
            && self.pending.len() < self.concurrency + 64
        {
            if shutdown.is_cancelled() {
                self.stop = Some(Stop::Interrupted);
                break;
            }
            let msg = match next.take() {
                Some(m) => Some(m),
                None => tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        self.stop = Some(Stop::Interrupted);
                        break;
                    }
                    m = feed.rx.recv() => m,
                },
            };
            match msg {
                // The feed task is gone without saying why (it cannot panic short of a bug).
                None => {
                    self.input_done = true;
                }
                Some(FeedMsg::Item(item)) => {
                    let Item {
                        line,
                        file_bytes,
                        record,
                        request,
                    } = *item;
                    let seq = record.seq;
                    if record
                        .vlm_conditioning
                        .as_deref()
                        .is_some_and(|v| v != "real")
                    {
                        self.unconditioned += 1;
                    }
                    match request {
                        Ok(req) => {
                            let client = self.client.clone();
                            let diffs = self.diffs;
                            let tracer = self.tracer.clone();
                            let handle = tokio::spawn(async move {
                                let res = call(client, req, seq, tracer.as_deref()).await;
                                compare(&record, line, res, diffs)
                            });
                            self.pending.push_back(Pending::Call(handle, seq, line));
                            self.in_flight += 1;
                        }
                        Err(u) => self.pending.push_back(Pending::Ready(Box::new(
                            RequestResult::unresolved(seq, line, u.missing),
                        ))),
                    }
                    self.last_file_bytes = file_bytes;
                }
                Some(FeedMsg::Header(h)) => {
                    if h.model_hash != header.model_hash {
                        let msg = format!(
                            "another header in the trace (model_hash {} instead of {}); replaying on",
                            dash(&h.model_hash),
                            dash(&header.model_hash)
                        );
                        con.warn(&msg);
                        report.warnings.push(msg);
                    }
                }
                Some(FeedMsg::End { truncation, footer }) => {
                    self.input_done = true;
                    self.truncation = truncation;
                    self.footer = footer;
                }
                Some(FeedMsg::Failed(e)) => {
                    self.input_done = true;
                    self.stop = Some(Stop::TraceError);
                    self.trace_error = Some(e);
                }
            }
        }
    }

    /// The next result in seq order; `None` when nothing is left.
    async fn next_result(&mut self, shutdown: &CancellationToken) -> Option<RequestResult> {
        let front = self.pending.pop_front()?;
        let (mut handle, seq, line) = match front {
            Pending::Ready(r) => return Some(*r),
            Pending::Call(h, seq, line) => (h, seq, line),
        };
        self.in_flight -= 1;
        let joined = if self.stop.is_none() {
            tokio::select! {
                r = &mut handle => r,
                _ = shutdown.cancelled() => {
                    // Stop sending; what is in flight still gets answered (CALL_TIMEOUT bounds it).
                    self.stop = Some(Stop::Interrupted);
                    handle.await
                }
            }
        } else {
            handle.await
        };
        Some(joined.unwrap_or_else(|e| {
            let status = tonic::Status::internal(format!("the replay task failed: {e}"));
            let mut r = RequestResult::unresolved(seq, line, Vec::new());
            r.status = Outcome::TargetError;
            r.error = ErrorDiff::compare(None, Some(&status));
            r
        }))
    }
}

/// One Act on the target.
pub(crate) async fn call(
    mut client: PolicyClient<AuthChannel>,
    req: ActRequest,
    seq: u64,
    tracer: Option<&dyn CallTracer>,
) -> Result<ActResponse, tonic::Status> {
    // With tracing on, each replayed call is a span whose context goes to the target as
    // `traceparent`: the replay shows up beside the original run. It ends when dropped,
    // after the answer.
    let span = tracer.map(|t| t.start(seq));
    let mut request = tonic::Request::new(req);
    request.set_timeout(CALL_TIMEOUT);
    if let Some(span) = &span {
        span.inject(request.metadata_mut());
    }
    let res = client.act(request).await.map(tonic::Response::into_inner);
    if let (Err(s), Some(span)) = (&res, &span) {
        span.fail("target-error", s.message());
    }
    res
}

/// The diffs of one record against the target's answer.
pub(crate) fn compare(
    record: &RequestRecord,
    line: u64,
    res: Result<ActResponse, tonic::Status>,
    kinds: KindSet,
) -> RequestResult {
    let recorded_error = record.error.as_ref().map(|e| RecordedError {
        slug: e.slug.clone(),
        message: e.message.clone(),
    });
    let mut out = RequestResult::unresolved(record.seq, line, Vec::new());
    out.status = Outcome::Replayed;
    let recorded_class = recorded_error
        .as_ref()
        .and_then(|e| ErrorClass::of_slug(&e.slug));
    if let Err(s) = &res {
        out.unavailable = s.code() == tonic::Code::Unavailable
            && recorded_class != Some(ErrorClass::of(tonic::Code::Unavailable));
    }
    if recorded_error.is_some() {
        out.error = ErrorDiff::compare(recorded_error, res.as_ref().err());
        return out;
    }
    out.diffs = kinds
        .iter()
        .filter_map(|k| k.compare(record, res.as_ref()))
        .collect();
    if let Err(s) = &res {
        out.status = Outcome::TargetError;
        out.error = ErrorDiff::compare(None, Some(s));
    }
    out
}
