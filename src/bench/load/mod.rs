//! `reflex bench load`: K robots at once against a real `reflex serve` with
//! recording on, for a fixed time; then the books are checked.
//!
//! By default this binary starts its own children, as on a robot: a
//! `reflex recorder` process (so its memory is measured apart from the
//! server's) and `reflex serve --recorder` on a Unix socket in a temporary
//! folder. Each client is one robot: its own connection, Act calls back to
//! back, frames from the synthetic [`Scene`]. A robot that moves sends a new
//! camera frame every tick (every frame here gets a JPEG comment with the
//! client, the tick and a per-run nonce: new bytes, same pixels) and one that
//! stands still sends the same bytes again, so the prefix cache sees what it
//! would see on a fleet: misses while the arm moves, hits while it pauses
//! (about a quarter of the ticks), and no robot ever hits another's entries.
//! A RESOURCE_EXHAUSTED refusal (the server's queue is full) is expected
//! under overload; the client backs off `--busy-backoff-ms` before its next
//! call, as a robot's retry policy would, instead of spinning on refusals.
//!
//! **The books.** Every Act that reaches the server's handler and gets a place in its
//! queue gets the next `seq` of the session, whatever its outcome: OK answers and answered
//! errors alike. A call refused for want of a place (RESOURCE_EXHAUSTED, answered before
//! any work) gets no seq and no record; the server counts it, and the session's count is
//! the footer's `refused_requests`. Each record is either handed to the recorder or counted
//! as dropped (`server/src/recording.rs`); records handed to a stream that broke are counted
//! by the recorder in the next file's header (`lost_requests`). After a graceful stop
//! (SIGTERM: the server drains, ends the session, the recorder writes the footer) the trace
//! must therefore say, exactly:
//!
//! ```text
//! request records written + dropped_requests + lost_requests
//!     = seqs issued (footer: first_seq + total_requests)
//! seqs issued + refused_requests
//!     = Acts the server answered (client side: OK + statuses that came from the server)
//! ```
//!
//! and every OK answer that said `recorded: true` has its `seq` in the trace,
//! every one that said `recorded: false` does not. Transport failures (the
//! call never reached a handler) are counted apart and are not in the books.
//!
//! Modules: [`sweep`] (the runs, the table, the exit decision), [`run`] (one run, managed
//! or `--target`), [`clients`] (the robots), [`books`] (the book check), [`children`]
//! (the processes), [`watch`] (memory and CPU), [`report`] (text and JSON).

mod books;
mod children;
mod clients;
mod report;
mod run;
mod sweep;
mod watch;
pub(super) use watch::proc_status_kib;

use std::path::PathBuf;

use reflex_proto::images::ImageMode;

use super::CacheMode;

pub use sweep::run;

/// K concurrent clients against a real server with recording on; throughput, latency
/// percentiles, errors by code, peak RSS, and the book check.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadBench {
    /// Concurrent clients, each with its own connection (one robot each).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub clients: u32,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 20.0, value_parser = positive_secs)]
    pub secs: f64,
    /// Seconds of load before measuring starts (those calls are in the books, not in the numbers).
    #[arg(long, default_value_t = 2.0, value_parser = non_negative_secs)]
    pub warmup_secs: f64,
    /// Several client counts in one go, e.g. 1,8,32,128: a fresh server per count, one table.
    #[arg(long, value_name = "K,K,...", value_delimiter = ',', num_args = 1.., value_parser = clap::value_parser!(u32).range(1..=4096), conflicts_with = "clients")]
    pub sweep: Vec<u32>,
    /// Export directory to serve (default: the reference export, written to a temp folder).
    #[arg(long, value_name = "DIR", conflicts_with = "target")]
    pub model: Option<PathBuf>,
    /// Inference workers of the server (passed to `reflex serve --workers`; default: its own).
    #[arg(long, value_name = "N", conflicts_with = "target", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,
    /// Calls allowed to wait for a worker (`reflex serve --queue-depth`; default: its own, 32).
    #[arg(long, alias = "queue", value_name = "N", conflicts_with = "target")]
    pub queue_depth: Option<usize>,
    /// Image data the trace keeps: full, hash_only or none.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "hash_only",
        conflicts_with = "target"
    )]
    pub record_images: ImageMode,
    /// Prefix cache: on (the server's default size; scene frames give it a robot's hit rate) or off.
    #[arg(
        long,
        value_name = "on|off",
        default_value = "on",
        conflicts_with = "target"
    )]
    pub cache: CacheMode,
    /// Clients connect over TCP loopback instead of the Unix socket.
    #[arg(long, conflicts_with = "target")]
    pub tcp: bool,
    /// After a RESOURCE_EXHAUSTED refusal a client waits this long before its next call.
    #[arg(long, value_name = "MS", default_value_t = 10)]
    pub busy_backoff_ms: u64,
    /// Kill the recorder with SIGKILL this many seconds into each run (warm-up included) and
    /// start it again at once on the same socket and folder: the books must still balance
    /// (the records lost with it are counted by the restarted recorder).
    #[arg(long, value_name = "SECS", conflicts_with = "target", value_parser = positive_secs)]
    pub kill_recorder_at: Option<f64>,
    /// Also write the results as JSON to PATH.
    #[arg(long, alias = "json", value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Load an already running server at URI (unix:///path.sock or 127.0.0.1:PORT) instead of starting one.
    #[arg(long, value_name = "URI")]
    pub target: Option<String>,
    /// With --target: the server's pid, for its peak RSS.
    #[arg(long, value_name = "PID", requires = "target")]
    pub server_pid: Option<u32>,
    /// With --target: the recorder's pid, for its peak RSS.
    #[arg(long, value_name = "PID", requires = "target")]
    pub recorder_pid: Option<u32>,
    /// With --target: the recorder's trace folder, for the book check. The server at
    /// --server-pid is then sent SIGTERM after the run, so that its session's footer is written.
    #[arg(long, alias = "record-dir", value_name = "DIR", requires_all = ["target", "server_pid"], conflicts_with = "sweep")]
    pub trace_dir: Option<PathBuf>,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 86400]")),
    }
}

fn non_negative_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=3_600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in [0, 3600]")),
    }
}
