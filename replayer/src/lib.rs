//! reflex-replayer: replays a reflex trace against a `reflex.v1.Policy` server and diffs
//! actions, latency and cache (`reflex replay`).
//!
//! Input to output: the trace is read through the recorder's reader
//! ([`reflex_recorder::TraceReader`], the only way in); each request record becomes the
//! `ActRequest` it was, with the recorded `noise_seed` (so the same model replays
//! bit-exactly) and its image bytes (from the trace, or from `--image-dir` by SHA-256);
//! the target — a server at `--target`, or a private `reflex serve` child for `--model` —
//! answers; each answer is diffed against the recorded response; one line per request and
//! a summary go to stdout, a JSON report to `--output`.
//!
//! **Invariants.** This crate never parses trace lines itself (the schema lives in
//! `reflex_recorder::trace`). It links no server, model runtime or tracing SDK: it
//! depends on `reflex-proto` (the wire, and the [`CallTracer`] hook its caller may fill),
//! the recorder's trace reader, and `reflex-systemd`'s child-process plumbing
//! (`replayer/tests/dependencies.rs` checks it). stdout carries the report only; errors
//! and the progress bar go to stderr. Lines print in seq order whatever `--concurrency` is.
//!
//! Modules (an arrow is "imports"; none imports one that imports it back):
//! - [`args`]: the `reflex replay` flags ([`ReplayArgs`]) → `diff`.
//! - [`replay`]: one run, from the header to the exit code; the feed and the in-flight
//!   queue → every module below.
//! - [`fleet`]: several traces and/or several targets: the trace list, the scheduler
//!   with failover from dead targets, the merged report → `replay`, `report`, `target`.
//! - [`diff`]: [`diff::Kind`], the one list of diffs, the comparisons and their
//!   thresholds, the per-kind results and tallies → `format`.
//! - [`images`]: recorded request → `ActRequest` with image bytes; the `--image-dir` index.
//! - [`target`]: the server driven: `--target URI` or the private server of `--model DIR`
//!   → `private_server`, `diff`.
//! - [`private_server`]: the `reflex serve` child of `--model`.
//! - [`report`]: text lines, summary, the JSON report (schema in the README, "Replay
//!   report"), the console → `args`, `diff`, `format`, `inspection`, `progress`, `target`.
//! - [`inspection`]: `--no-replay`, a summary of the trace without a model → `format`, `images`.
//! - [`format`]: numbers and verdicts as the console shows them.
//! - [`progress`]: the progress bar (stderr, terminals only).

pub mod args;
pub mod diff;
pub mod fleet;
pub mod format;
pub mod images;
pub mod inspection;
pub mod private_server;
pub mod progress;
pub mod replay;
pub mod report;
pub mod target;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use args::ReplayArgs;
pub use reflex_proto::CallTracer;
pub use replay::ReplayError;
pub use report::Report;

/// Exit codes of `reflex replay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every diff passed, failing diffs without `--fail-on` included (as in the seed), or
    /// `--no-replay` is done.
    Passed = 0,
    /// The trace could not be read (missing, no header, unknown `schema_version`, a damaged
    /// line in the middle), it holds no images to send (`hash_only` without `--image-dir`,
    /// `none`, or not one record's images under `--image-dir`), or `--image-dir`/`--output`
    /// cannot be used.
    TraceError = 1,
    /// The target could not be reached or the `--model` folder not loaded; or the target
    /// failed a call that succeeded when recorded; or it became unavailable mid-replay.
    TargetFailed = 2,
    /// `--fail-on MODE` fired.
    FailOn = 3,
}

/// Runs a replay, printing the report to stdout (errors to stderr); returns the exit code.
/// With a `tracer` (the `reflex` binary passes its OpenTelemetry one when `OTEL_*` asks
/// for tracing), each replayed call is a span the target's `act` span continues.
pub async fn run(
    args: ReplayArgs,
    shutdown: CancellationToken,
    tracer: Option<Arc<dyn CallTracer>>,
) -> Exit {
    let mut console = report::Console::stdio();
    replay::execute(&args, &shutdown, &mut console, tracer)
        .await
        .0
}

/// [`run`] with the text going to the given writers instead; also returns the report.
pub async fn run_with(
    args: &ReplayArgs,
    shutdown: &CancellationToken,
    out: Box<dyn std::io::Write + Send>,
    err: Box<dyn std::io::Write + Send>,
) -> (Exit, Report) {
    let mut console = report::Console::new(out, err);
    replay::execute(args, shutdown, &mut console, None).await
}
