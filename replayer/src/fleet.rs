//! A fleet run: the records of one or more traces spread over one or more targets, with
//! failover when a target dies, merged into one report (`reflex replay T1 T2 DIR
//! --target A --target B`). One trace file against one target stays on the classic path
//! of [`crate::replay`]; [`crate::args::ReplayArgs::is_fleet`] decides.
//!
//! **Sources.** [`trace_files`] turns the TRACE arguments into the list of files: a file
//! is itself, a folder is every `*.jsonl` / `*.jsonl.gz` under it, recursively; the whole
//! list is sorted by path and deduplicated, so a run is the same whatever order the
//! folders list in. It is the one place that knows where traces come from (an object
//! store prefix would be a new arm there).
//!
//! **The feed.** The files are read one after another, each through the classic feed
//! ([`crate::replay::Feed`], the recorder's reader off the runtime), tagged with the
//! index of their file; `--n` bounds the records of the whole run.
//!
//! **Scheduling.** One loop on one task owns every piece of state: a queue of records to
//! send (records taken back from a dead target go to its front), and per target its
//! calls in flight (at most `--concurrency`). Calls run as tasks in one `JoinSet` and
//! hand their record back with the answer, so the loop can send it again.
//!
//! **A target dies** when a call to it fails in the transport (the status was made on the
//! client: connection refused or reset, the process gone) or answers UNAVAILABLE where
//! the recorded call did not fail that way. From then on it gets nothing; each of its
//! calls that fails after that goes back to the front of the queue (`failed_over`) and a
//! surviving target replays it. A call that fails as recorded (the recorded error
//! replayed) is an ordinary diffed record, and a server-made error on a call that
//! succeeded when recorded is a target error (exit 2), as in the classic path: neither
//! kills a target. Every record has one result: a failed-over record's failed attempt is
//! not reported.
//!
//! **Determinism.** Each record carries its noise seed, so which target answers does not
//! change the actions; lines print as answers come, and the report's `requests` are
//! sorted by (trace, seq) so two runs of the same traces give the same list.
//!
//! **Exit codes** as in [`crate::replay`]; every target dead with records left is exit 2
//! and the report's `error` names each target and why it died.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reflex_proto::v1::policy_client::PolicyClient;
use reflex_proto::v1::{ActRequest, ActResponse};
use reflex_proto::{AuthChannel, CallTracer};
use reflex_recorder::{Header, ReadError, RequestRecord, TraceReader};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::Exit;
use crate::args::ReplayArgs;
use crate::diff::ErrorClass;
use crate::images::ImageIndex;
use crate::progress::Unit;
use crate::replay::{
    Feed, FeedMsg, Item, ReplayError, blocking, call, check_images, check_output, compare, dash,
    image_index,
};
use crate::report::{Console, Report, RequestResult, Stop, Summary, TargetEntry, TraceEntry};
use crate::target::{Target, TargetError};

/// The trace files named by the TRACE arguments, sorted by path, without duplicates.
///
/// A file argument is taken as is (even without a trace extension: the reader decides);
/// a folder gives every `*.jsonl` / `*.jsonl.gz` under it, recursively. A folder holding
/// none is an error, so a typo in a CI path cannot pass as an empty run.
pub fn trace_files(args: &[PathBuf]) -> Result<Vec<PathBuf>, ReplayError> {
    let mut out = Vec::new();
    for arg in args {
        if arg.is_dir() {
            let before = out.len();
            walk(arg, &mut out)?;
            if out.len() == before {
                return Err(ReplayError::TraceSource {
                    path: arg.clone(),
                    reason:
                        "no *.jsonl or *.jsonl.gz trace files in this folder (searched recursively)"
                            .into(),
                });
            }
        } else {
            out.push(arg.clone());
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn is_trace_name(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".jsonl") || n.ends_with(".jsonl.gz"))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ReplayError> {
    let fail = |e: std::io::Error| ReplayError::TraceSource {
        path: dir.to_path_buf(),
        reason: format!("cannot list the folder: {e}"),
    };
    for entry in std::fs::read_dir(dir).map_err(fail)? {
        let path = entry.map_err(fail)?.path();
        // file_type() of the entry would not follow a symlink to a folder; metadata does.
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.is_file() && is_trace_name(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Whether a failed call says its target is gone, not that the call failed: a status
/// made on the client (it carries the transport error as its source: refused, reset,
/// the peer gone), or UNAVAILABLE where the recorded call did not fail that way.
pub fn is_transport_failure(status: &tonic::Status, record: &RequestRecord) -> bool {
    let recorded = record
        .error
        .as_ref()
        .and_then(|e| ErrorClass::of_slug(&e.slug));
    let unavailable = status.code() == tonic::Code::Unavailable
        && recorded != Some(ErrorClass::of(tonic::Code::Unavailable));
    unavailable || std::error::Error::source(status).is_some()
}

/// A record on its way to a target.
struct Job {
    trace: usize,
    line: u64,
    record: Box<RequestRecord>,
    request: ActRequest,
}

/// What a call task hands back.
struct Done {
    target: usize,
    job: Job,
    res: Result<ActResponse, tonic::Status>,
    elapsed: Duration,
}

/// A target and what the run knows of it.
struct Slot {
    uri: String,
    client: Option<PolicyClient<AuthChannel>>,
    entry: TargetEntry,
    in_flight: usize,
    latencies_ms: Vec<f64>,
}

impl Slot {
    fn alive(&self) -> bool {
        self.client.is_some() && !self.entry.dead
    }
}

/// What the feed of several files sends: a message of the classic feed, tagged with its
/// file.
struct Tagged {
    trace: usize,
    msg: FeedMsg,
}

/// Reads `files` one after another through the classic feed; `n` bounds the whole run.
fn start_feed(
    files: Vec<PathBuf>,
    index: Option<Arc<ImageIndex>>,
    n: u64,
    depth: usize,
) -> mpsc::Receiver<Tagged> {
    let (tx, rx) = mpsc::channel(depth);
    tokio::spawn(async move {
        let mut taken = 0u64;
        for (trace, path) in files.into_iter().enumerate() {
            if n > 0 && taken >= n {
                break;
            }
            let opened = blocking(move || TraceReader::open(&path)).await;
            let reader = match opened {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    let _ = tx
                        .send(Tagged {
                            trace,
                            msg: FeedMsg::Failed(e),
                        })
                        .await;
                    return;
                }
                // The blocking pool is gone: the runtime is shutting down.
                Err(_) => return,
            };
            let left = if n > 0 { n - taken } else { 0 };
            let mut feed = Feed::start(reader, index.clone(), left, depth);
            while let Some(msg) = feed.rx.recv().await {
                let last = matches!(msg, FeedMsg::End { .. } | FeedMsg::Failed(_));
                if matches!(msg, FeedMsg::Item(_)) {
                    taken += 1;
                }
                let failed = matches!(msg, FeedMsg::Failed(_));
                if tx.send(Tagged { trace, msg }).await.is_err() {
                    return;
                }
                if failed {
                    return;
                }
                if last {
                    break;
                }
            }
        }
        // Dropping `tx` ends the run's input.
    });
    rx
}

/// Opens each file for its header (exit 1 on the first that cannot be read).
async fn headers(files: &[PathBuf]) -> Result<Vec<Header>, ReplayError> {
    let files = files.to_vec();
    blocking(move || {
        files
            .iter()
            .map(|p| TraceReader::open(p).map(|r| r.header().clone()))
            .collect::<Result<Vec<_>, ReadError>>()
    })
    .await?
    .map_err(ReplayError::from)
}

/// Connects every `--target` (or starts the private server of `--model`). A target that
/// cannot be reached is dead from the start; none reachable is exit 2.
async fn connect_all(
    args: &ReplayArgs,
    shutdown: &CancellationToken,
    con: &mut Console,
) -> Result<(Vec<Slot>, Option<Target>), ReplayError> {
    if let Some(dir) = &args.model {
        con.line(&format!("Loading target model: {}", dir.display()));
        let bin = match &args.serve_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe().map_err(|e| TargetError::Model {
                dir: dir.clone(),
                reason: format!("cannot find the reflex binary to serve it: {e}"),
            })?,
        };
        let t = Target::start_private(&bin, dir.clone(), usize::from(args.concurrency), shutdown)
            .await?;
        let slot = slot(t.info.uri.clone(), Some(&t), None);
        return Ok((vec![slot], Some(t)));
    }
    let uris = args.target_uris();
    if uris.is_empty() {
        return Err(TargetError::Missing.into());
    }
    let opts = args
        .connect_options()
        .map_err(|e| TargetError::Unreachable {
            target: uris.join(","),
            reason: e.to_string(),
        })?;
    let mut set = JoinSet::new();
    for (i, uri) in uris.iter().enumerate() {
        let (uri, opts) = (uri.clone(), opts.clone());
        set.spawn(async move { (i, Target::connect(&uri, &opts).await) });
    }
    let mut connected: Vec<Option<Result<Target, TargetError>>> =
        (0..uris.len()).map(|_| None).collect();
    loop {
        tokio::select! {
            r = set.join_next() => match r {
                Some(Ok((i, t))) => connected[i] = Some(t),
                Some(Err(e)) => return Err(ReplayError::Internal(format!("a connect task failed: {e}"))),
                None => break,
            },
            _ = shutdown.cancelled() => return Err(TargetError::Interrupted.into()),
        }
    }
    let mut slots = Vec::new();
    for (uri, t) in uris.iter().zip(connected) {
        match t {
            Some(Ok(t)) => {
                con.line(&format!("Target: {uri}"));
                slots.push(slot(uri.clone(), Some(&t), None));
            }
            Some(Err(e)) => {
                let msg = format!("target {uri} is dead from the start: {e}");
                con.warn(&msg);
                slots.push(slot(uri.clone(), None, Some(e.to_string())));
            }
            None => unreachable!("every connect task answered"),
        }
    }
    if !slots.iter().any(Slot::alive) {
        let why: Vec<String> = slots.iter().filter_map(|s| s.entry.error.clone()).collect();
        return Err(TargetError::Unreachable {
            target: uris.join(","),
            reason: format!("no target could be reached: {}", why.join("; ")),
        }
        .into());
    }
    Ok((slots, None))
}

fn slot(uri: String, t: Option<&Target>, error: Option<String>) -> Slot {
    Slot {
        entry: TargetEntry {
            uri: uri.clone(),
            info: t.map(|t| t.info.clone()),
            replayed: 0,
            failed_over_from: 0,
            dead: t.is_none(),
            error,
            latency_p50_ms: None,
            latency_p99_ms: None,
        },
        uri,
        client: t.map(|t| t.client.clone()),
        in_flight: 0,
        latencies_ms: Vec::new(),
    }
}

/// The `q` quantile (nearest rank) of `v`, sorted here.
fn quantile(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// A fleet run, from the trace list to the exit code (see the module docs).
pub async fn drive(
    args: &ReplayArgs,
    shutdown: &CancellationToken,
    con: &mut Console,
    report: &mut Report,
    tracer: Option<Arc<dyn CallTracer>>,
) -> Result<Exit, ReplayError> {
    check_output(args)?;
    let files = trace_files(&args.trace_args())?;
    if args.no_replay {
        return Err(ReplayError::TraceSource {
            path: args.trace.clone(),
            reason: format!(
                "--no-replay reads one trace file; this names {} (run it once per file)",
                files.len()
            ),
        });
    }
    con.line(&format!("Replay: {} trace files", files.len()));
    let headers = headers(&files).await?;
    for (i, (path, h)) in files.iter().zip(&headers).enumerate() {
        con.line(&format!(
            "Trace {i}: {} (model_hash {}, session {})",
            path.display(),
            dash(&h.model_hash),
            dash(&h.session_id)
        ));
        report.traces.push(TraceEntry {
            path: path.display().to_string(),
            model_hash: h.model_hash.clone(),
            session_id: h.session_id.clone(),
            records: 0,
        });
    }
    let header = headers[0].clone();
    for l in crate::report::header_text(&header) {
        con.line(&l);
    }
    report.header = Some(header.clone());
    for (path, h) in files.iter().zip(&headers) {
        if h.model_hash != header.model_hash {
            let msg = format!(
                "{}: model_hash {} is not the first trace's {}; replaying on",
                path.display(),
                dash(&h.model_hash),
                dash(&header.model_hash)
            );
            con.warn(&msg);
            report.warnings.push(msg);
        }
    }

    let index = image_index(args, con, report).await?;
    let concurrency = usize::from(args.concurrency);
    let depth = 2 * concurrency * args.target_uris().len().max(1) + 16;
    let mut feed = start_feed(files.clone(), index.clone(), args.n, depth);
    // The first message decides whether these traces can be replayed at all (as in the
    // classic path: before any target is dialed).
    let first = match feed.recv().await {
        Some(Tagged {
            msg: FeedMsg::Failed(e),
            ..
        }) => return Err(e.into()),
        other => other,
    };
    if let Some(Tagged { trace, msg }) = &first {
        check_images(&files[*trace], &headers[*trace], index.is_some(), Some(msg))?;
    }

    let (mut slots, private) = connect_all(args, shutdown, con).await?;
    for s in &mut slots {
        let Some(info) = s.entry.info.as_mut() else {
            continue;
        };
        info.model_hash_matches =
            !info.model_hash.is_empty() && info.model_hash == header.model_hash;
        if !info.model_hash_matches {
            let msg = format!(
                "target {}: model_hash {} is not the trace's {}; actions are compared across models",
                s.uri,
                dash(&info.model_hash),
                dash(&header.model_hash)
            );
            con.warn(&msg);
            report.warnings.push(msg);
        }
    }
    report.target = slots.iter().find_map(|s| s.entry.info.clone());

    con.line(&format!(
        "Replaying requests ({}, {} targets):",
        crate::report::run_label(args),
        slots.len()
    ));
    let diffs = args.diffs();
    let mut summary = Summary::new(diffs, args.fail_on);
    summary.failed_over = Some(0);
    summary.dead_targets = Some(0);
    // Where each file starts in the bytes of the whole run, for the progress bar.
    let mut offsets = Vec::with_capacity(files.len());
    let mut total = 0u64;
    for f in &files {
        offsets.push(total);
        total += std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
    }
    if args.n > 0 {
        con.progress.start(args.n, Unit::Records);
    } else {
        con.progress.start(total, Unit::Bytes);
    }

    let several = files.len() > 1;
    let labels: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut calls: JoinSet<Done> = JoinSet::new();
    let mut next = first;
    let mut input_done = false;
    let mut stop: Option<Stop> = None;
    let mut trace_error: Option<ReadError> = None;
    let mut unconditioned = 0u64;
    let mut bytes_done = 0u64;
    let mut announced_all_dead = false;

    loop {
        // Send while a live target has room and there is something to send.
        while stop.is_none() {
            if shutdown.is_cancelled() {
                stop = Some(Stop::Interrupted);
                break;
            }
            let Some(t) = (0..slots.len())
                .filter(|&i| slots[i].alive() && slots[i].in_flight < concurrency)
                .min_by_key(|&i| slots[i].in_flight)
            else {
                break;
            };
            let job = if let Some(job) = queue.pop_front() {
                job
            } else if input_done {
                break;
            } else {
                let msg = match next.take() {
                    Some(m) => Some(m),
                    None => tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => {
                            stop = Some(Stop::Interrupted);
                            break;
                        }
                        m = feed.recv() => m,
                    },
                };
                let Some(Tagged { trace, msg }) = msg else {
                    input_done = true;
                    break;
                };
                match msg {
                    FeedMsg::Item(item) => {
                        let Item {
                            line,
                            file_bytes,
                            record,
                            request,
                        } = *item;
                        bytes_done = offsets[trace] + file_bytes;
                        report.traces[trace].records += 1;
                        if record
                            .vlm_conditioning
                            .as_deref()
                            .is_some_and(|v| v != "real")
                        {
                            unconditioned += 1;
                        }
                        match request {
                            Ok(request) => Job {
                                trace,
                                line,
                                record,
                                request,
                            },
                            Err(u) => {
                                let mut r = RequestResult::unresolved(record.seq, line, u.missing);
                                r.trace_index = trace;
                                r.trace = several.then(|| labels[trace].clone());
                                emit(con, &mut summary, report, r, None, bytes_done, several);
                                continue;
                            }
                        }
                    }
                    FeedMsg::Header(h) => {
                        if h.model_hash != headers[trace].model_hash {
                            let msg = format!(
                                "{}: another header in the trace (model_hash {}); replaying on",
                                labels[trace],
                                dash(&h.model_hash)
                            );
                            con.warn(&msg);
                            report.warnings.push(msg);
                        }
                        continue;
                    }
                    FeedMsg::End { truncation, footer } => {
                        if let Some(t) = truncation {
                            let msg = format!(
                                "{}: trace truncated ({t}), as a crash leaves it; replayed the records before line {}",
                                labels[trace], t.line
                            );
                            con.warn(&msg);
                            report.warnings.push(msg);
                        }
                        if let Some(f) = footer
                            && let Some(dropped) = f.dropped_requests.filter(|&d| d > 0)
                        {
                            let msg = format!(
                                "{}: the recording dropped {dropped} of {} calls (footer): they are not in the trace",
                                labels[trace], f.total_requests
                            );
                            con.warn(&msg);
                            report.warnings.push(msg);
                        }
                        continue;
                    }
                    FeedMsg::Failed(e) => {
                        input_done = true;
                        stop = Some(Stop::TraceError);
                        trace_error = Some(e);
                        break;
                    }
                }
            };
            let client = slots[t].client.clone().expect("a live target has a client");
            slots[t].in_flight += 1;
            let (diffs_tracer, req) = (tracer.clone(), job.request.clone());
            calls.spawn(async move {
                let started = Instant::now();
                let res = call(client, req, job.record.seq, diffs_tracer.as_deref()).await;
                Done {
                    target: t,
                    job,
                    res,
                    elapsed: started.elapsed(),
                }
            });
        }

        // Wait for the next answer; none in flight means the run is over.
        let joined = if stop == Some(Stop::Interrupted) || stop.is_some() {
            calls.join_next().await
        } else {
            tokio::select! {
                r = calls.join_next() => r,
                _ = shutdown.cancelled() => {
                    // Stop sending; what is in flight still gets answered (the call
                    // timeout bounds it).
                    stop = Some(Stop::Interrupted);
                    continue;
                }
            }
        };
        let Some(joined) = joined else {
            if !queue.is_empty() || !input_done {
                // Nothing in flight and nothing could be sent: every target is dead.
                if stop.is_none() && !slots.iter().any(Slot::alive) {
                    stop = Some(Stop::AllTargetsDead);
                }
            }
            break;
        };
        let Done {
            target: t,
            job,
            res,
            elapsed,
        } = joined.map_err(|e| ReplayError::Internal(format!("a replay task failed: {e}")))?;
        slots[t].in_flight -= 1;
        if let Err(s) = &res
            && is_transport_failure(s, &job.record)
        {
            if !slots[t].entry.dead {
                slots[t].entry.dead = true;
                slots[t].entry.error = Some(format!(
                    "{} ({}) at seq {} of {}",
                    reflex_proto::error_chain(s),
                    crate::diff::code_name(s.code()),
                    job.record.seq,
                    labels[job.trace]
                ));
                summary.dead_targets = Some(summary.dead_targets.unwrap_or(0) + 1);
                let msg = format!(
                    "target {} died: {}; its unfinished records go to the other targets",
                    slots[t].uri,
                    slots[t].entry.error.as_deref().unwrap_or("")
                );
                tracing::warn!(slug = "replay-target-dead", target = %slots[t].uri, "{msg}");
                con.warn(&msg);
                report.warnings.push(msg);
            }
            slots[t].entry.failed_over_from += 1;
            summary.failed_over = Some(summary.failed_over.unwrap_or(0) + 1);
            queue.push_front(job);
            if !announced_all_dead && !slots.iter().any(Slot::alive) {
                announced_all_dead = true;
                if stop.is_none() {
                    stop = Some(Stop::AllTargetsDead);
                }
            }
            continue;
        }
        slots[t].entry.replayed += 1;
        slots[t].latencies_ms.push(elapsed.as_secs_f64() * 1000.0);
        let mut r = compare(&job.record, job.line, res, diffs);
        r.trace_index = job.trace;
        r.trace = several.then(|| labels[job.trace].clone());
        emit(con, &mut summary, report, r, Some(t), bytes_done, several);
    }
    con.progress.finish();
    drop(feed);
    if let Some(p) = private {
        p.stop().await;
    }

    let left = queue.len();
    for s in &mut slots {
        s.entry.latency_p50_ms = quantile(&mut s.latencies_ms, 0.50);
        s.entry.latency_p99_ms = quantile(&mut s.latencies_ms, 0.99);
        con.line(&format!(
            "Target {}: replayed {} failed_over_from {}{}",
            s.uri,
            s.entry.replayed,
            s.entry.failed_over_from,
            match &s.entry.error {
                Some(e) if s.entry.dead => format!(" DEAD: {e}"),
                _ => String::new(),
            }
        ));
    }
    report.targets = slots.iter().map(|s| s.entry.clone()).collect();
    report.sort_requests();
    if unconditioned > 0 {
        let msg = format!(
            "{unconditioned} records say vlm_conditioning is not \"real\": their recorded actions did not \
             come from the images and instruction, so their action diffs compare with a stub"
        );
        con.warn(&msg);
        report.warnings.push(msg);
    }
    summary.stopped = stop;
    summary.fail_on_triggered = summary.fail_on_fires(args.fail_on);
    for l in summary.text() {
        con.line(&l);
    }
    let exit = if let Some(e) = trace_error {
        report.summary = Some(summary);
        return Err(e.into());
    } else if summary.not_replayed > 0 && summary.replayed == 0 && stop.is_none() {
        let n = summary.not_replayed;
        report.summary = Some(summary);
        return Err(ReplayError::ImagesUnavailable {
            path: args.trace.clone(),
            what: format!(
                "the images of none of their {n} records were found under --image-dir; \
                 give the folder with the original image files, or use --no-replay"
            ),
        });
    } else if summary.target_errors > 0 || stop == Some(Stop::AllTargetsDead) {
        let mut why = Vec::new();
        if summary.target_errors > 0 {
            why.push(format!(
                "{} calls that succeeded when recorded failed on a target",
                summary.target_errors
            ));
        }
        if stop == Some(Stop::AllTargetsDead) {
            let dead: Vec<String> = slots
                .iter()
                .map(|s| format!("{}: {}", s.uri, s.entry.error.as_deref().unwrap_or("?")))
                .collect();
            why.push(format!(
                "every target died ({}); {} records were not replayed{}",
                dead.join("; "),
                left,
                if input_done {
                    ""
                } else {
                    ", nor the rest of the traces"
                }
            ));
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

/// Prints, counts and keeps one result.
fn emit(
    con: &mut Console,
    summary: &mut Summary,
    report: &mut Report,
    r: RequestResult,
    target: Option<usize>,
    bytes_done: u64,
    several: bool,
) {
    let mut line = String::new();
    if several {
        line.push_str(&format!("trace={} ", r.trace_index));
    }
    line.push_str(&r.text());
    if let Some(t) = target {
        line.push_str(&format!(" target={t}"));
    }
    con.line(&line);
    summary.add(&r);
    let records = summary.records;
    con.progress
        .update(records, bytes_done, || format!("seq={}", r.seq));
    report.push(r);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_list_traces_recursively_in_path_order() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("b/deep")).unwrap();
        std::fs::create_dir_all(root.join("a")).unwrap();
        for f in [
            "b/deep/2.jsonl.gz",
            "a/1.jsonl",
            "b/0.jsonl",
            "a/notes.txt",
            "a/x.json",
        ] {
            std::fs::write(root.join(f), b"").unwrap();
        }
        let got = trace_files(&[root.to_path_buf(), root.join("a/1.jsonl")]).unwrap();
        let want: Vec<PathBuf> = ["a/1.jsonl", "b/0.jsonl", "b/deep/2.jsonl.gz"]
            .iter()
            .map(|f| root.join(f))
            .collect();
        assert_eq!(got, want, "sorted, recursive, deduplicated, traces only");
        std::fs::create_dir_all(root.join("empty")).unwrap();
        let e = trace_files(&[root.join("empty")]).unwrap_err();
        assert!(e.to_string().contains("no *.jsonl"), "{e}");
        assert_eq!(e.exit(), Exit::TraceError);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.5), Some(50.0));
        assert_eq!(quantile(&mut v, 0.99), Some(99.0));
        assert_eq!(quantile(&mut [], 0.5), None);
        assert_eq!(quantile(&mut [7.0], 0.99), Some(7.0));
    }

    #[test]
    fn a_server_status_is_not_a_dead_target() {
        let rec = RequestRecord {
            seq: 3,
            ..Default::default()
        };
        assert!(!is_transport_failure(
            &tonic::Status::invalid_argument("bad state"),
            &rec
        ));
        assert!(is_transport_failure(
            &tonic::Status::unavailable("gone"),
            &rec
        ));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(is_transport_failure(
            &tonic::Status::from_error(Box::new(io)),
            &rec
        ));
    }
}
