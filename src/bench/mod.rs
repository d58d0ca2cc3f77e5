//! `reflex bench`: the benchmark suites, one module each. Each starts what it measures (an
//! in-process server, or real `reflex serve` / `reflex recorder` children of this binary),
//! drives it with the synthetic robot of [`crate::scene`] and prints a table.
//!
//! - [`serve`]: the default suite, Act latency engine-only vs Unix socket vs TCP.
//! - [`record`]: recording overhead per image mode, trace bytes, and recorder ingest.
//! - [`telemetry`]: Act latency with tracing and metrics off and on.
//! - [`load`]: K concurrent robots against real children, and the book check.
//! - [`engines`]: cpu vs cuda, and the GPU acceptance checks; with `--export`, a real export
//!   against onnxruntime ([`exports`]) or on the cuda engine's programs ([`programs`]).
//! - [`fleet`]: a synthetic fleet's traces, `reflex fleet index` and every report: time and memory.

mod engines;
mod exports;
mod fleet;
mod load;
mod programs;
mod record;
mod serve;
mod telemetry;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub suite: Option<Suite>,
    #[command(flatten)]
    pub serve: serve::ServeBench,
}

#[derive(Debug, clap::Subcommand)]
pub enum Suite {
    /// Act latency with recording off vs hash_only vs full, and trace bytes per 1000 calls per mode.
    Record(record::RecordBench),
    /// Recorder ingest: records/s through the real socket, 1 and 4 sessions, hash_only and full.
    Ingest(record::IngestBench),
    /// Act latency with telemetry off vs tracing at sample 1.0 and 0.01 (real serve children).
    Telemetry(telemetry::TelemetryBench),
    /// K concurrent clients against a real server with recording on: throughput, p50/p99/p999,
    /// errors by code, peak RSS, and the book check (records written + dropped = Acts answered).
    Load(load::LoadBench),
    /// The reference model on cpu vs cuda (graphs on and off): engine-only, Policy::act and
    /// Act over a Unix socket, plus the GPU checks (cuda vs cpu, repeat bit-identity).
    Engines(engines::EnginesBench),
    /// A synthetic fleet (robots × sessions through the real recorder, full images), then
    /// `reflex fleet index` and every `reflex fleet query` report: wall, CPU, peak RSS.
    Fleet(fleet::FleetBench),
}

/// `--cache on|off`: whether the server's prefix cache is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheMode {
    On,
    Off,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.suite {
        None => serve::run(args.serve).await,
        Some(Suite::Record(a)) => record::record(a).await,
        Some(Suite::Ingest(a)) => record::ingest(a).await,
        Some(Suite::Telemetry(a)) => telemetry::run(a).await,
        Some(Suite::Load(a)) => load::run(a).await,
        Some(Suite::Engines(a)) => engines::run(a).await,
        Some(Suite::Fleet(a)) => fleet::run(a).await,
    }
}
