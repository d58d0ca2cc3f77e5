//! reflex-replayer: replays a reflex trace against a `reflex.v1.Policy` server and diffs
//! actions, latency and cache (`reflex replay`).
//!
//! Input to output: the trace is read through the recorder's reader
//! ([`reflex_recorder::TraceReader`], the only way in); each request record becomes the
//! `ActRequest` it was, with the recorded `noise_seed` (so the same model replays
//! bit-exactly) and its image bytes (from the trace, or from `--image-dir` by SHA-256);
//! the target — a server at `--target`, or a private in-process server for `--model` —
//! answers; each answer is diffed against the recorded response; one line per request and
//! a summary go to stdout, a JSON report to `--output`.
//!
//! **Invariants.** This crate never parses trace lines itself (the schema lives in
//! `reflex_recorder::trace`). stdout carries the report only; errors and the progress
//! bar go to stderr. Lines print in seq order whatever `--concurrency` is.
//!
//! Modules:
//! - [`args`]: the `reflex replay` flags ([`ReplayArgs`]).
//! - [`replay`]: one run, from the header to the exit code; the feed and the in-flight queue.
//! - [`diff`]: the comparisons and their thresholds.
//! - [`images`]: recorded request → `ActRequest` with image bytes; the `--image-dir` index.
//! - [`target`]: the server driven: `--target URI` or the private server of `--model DIR`.
//! - [`report`]: text lines, summary, the JSON report (schema in the README, "Replay report"), the console.
//! - [`inspection`]: `--no-replay`, a summary of the trace without a model.
//! - [`progress`]: the progress bar (stderr, terminals only).

pub mod args;
pub mod diff;
pub mod images;
pub mod inspection;
pub mod progress;
pub mod replay;
pub mod report;
pub mod target;

#[cfg(test)]
mod tests;

use tokio_util::sync::CancellationToken;

pub use args::ReplayArgs;
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
pub async fn run(args: ReplayArgs, shutdown: CancellationToken) -> Exit {
    let mut console = report::Console::stdio();
    // Tracing follows the standard OTEL_* variables; off when they are unset.
    let telemetry = reflex_server::telemetry::Telemetry::tracing_from_env("reflex-replay").await;
    let exit = replay::execute(&args, &shutdown, &mut console).await.0;
    telemetry.shutdown().await;
    exit
}

/// [`run`] with the text going to the given writers instead; also returns the report.
pub async fn run_with(
    args: &ReplayArgs,
    shutdown: &CancellationToken,
    out: Box<dyn std::io::Write + Send>,
    err: Box<dyn std::io::Write + Send>,
) -> (Exit, Report) {
    let mut console = report::Console::new(out, err);
    replay::execute(args, shutdown, &mut console).await
}
