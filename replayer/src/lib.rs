//! reflex-replayer: replays a reflex trace against a Policy server and diffs
//! actions, latency and cache. (Being built: see the replay issue.)

use tokio_util::sync::CancellationToken;

/// Flags of `reflex replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Trace file (.jsonl or .jsonl.gz).
    pub trace: std::path::PathBuf,
}

/// Exit codes of `reflex replay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Passed = 0,
    TraceError = 1,
    TargetFailed = 2,
    FailOn = 3,
}

/// Runs a replay, printing the report; returns the exit code.
pub async fn run(_args: ReplayArgs, _shutdown: CancellationToken) -> Exit {
    eprintln!("error: reflex replay is not built yet");
    Exit::TraceError
}
