//! `reflex`: one binary, thin. Parses the command line, sets up logging and
//! signals, and hands off to the crates. Exit codes: 0 success, 1 error
//! (`reflex replay` documents its own 1/2/3), 64 usage error (EX_USAGE).
//!
//! Modules: [`demo`] (`reflex demo`), [`bench`] (`reflex bench`, one module per suite),
//! [`scene`] (the synthetic robot both drive the server with) and [`latency`] (samples and
//! percentiles); `scene` and `latency` import neither `demo` nor `bench`.

mod bench;
mod demo;
mod latency;
mod scene;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::builder::TypedValueParser;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "reflex",
    version,
    about = "gRPC inference server for robot policies, with a sidecar trace recorder and a replayer",
    long_about = "gRPC inference server for robot policies (vision-language-action models).\n\n\
                  Start with `reflex demo`: it writes the built-in reference model, serves it, drives \
                  Act calls like a robot would and prints what happened.",
    after_help = "Exit codes: 0 success, 1 error, 64 usage error (an unknown flag, a bad value); \
                  `reflex replay --help` adds its own."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up and matched once: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve one export over gRPC (reflex.v1.Policy, health, reflection).
    Serve(reflex_server::serve::ServeArgs),
    /// The recorder daemon: owns trace files and the disk policy; servers stream every Act to it.
    Recorder(reflex_recorder::RecorderArgs),
    /// Replay a trace against a server or an export and diff actions, latency and cache.
    ///
    /// Exit codes: 0 all passed (or --no-replay done), 1 trace file error, 2 target failed,
    /// 3 --fail-on triggered, 64 usage error.
    Replay(reflex_replayer::ReplayArgs),
    /// Write a demo export into DIR: our reference model, or a tiny pi0.5 in the seed tool's layouts.
    ExportDemo(ExportDemoArgs),
    /// The main job on the built-in reference model: serve it and drive it like a robot.
    Demo(demo::DemoArgs),
    /// Measure Act latency: engine-only, Unix socket and TCP, side by side in one run.
    Bench(bench::BenchArgs),
    /// Look at traces (ls, show) and export them to MCAP (Foxglove), LeRobotDataset v3 or Parquet.
    Trace(reflex_tracetools::TraceArgs),
    /// Ship closed traces to S3-compatible object storage, verified, resumable, never twice.
    Ship(reflex_ship::ShipArgs),
    /// Fleet analysis: index shipped traces into a partitioned Parquet dataset; SQL and reports over it.
    Fleet(reflex_fleet::FleetArgs),
    /// What an export becomes on the cuda engine, learned without a GPU: every graph's
    /// operators checked, then compiled into the plan (kernels, launches, device memory).
    ///
    /// Every node whose operator the cuda engine lacks is listed by name. Exit codes: 0 the
    /// export runs on the engine, 1 it does not (or cannot be read), 64 usage error.
    Inspect(InspectArgs),
}

#[derive(clap::Args)]
struct InspectArgs {
    /// The export folder (reflex_config.json and its graphs; the seed tool's layouts too).
    export: PathBuf,
    /// The engine to inspect for; only cuda has a compiler of its own (cpu and ort run any
    /// export that loads).
    #[arg(long, default_value = "cuda", value_parser = ["cuda"])]
    engine: String,
    /// The precision to plan for (`serve --precision`): f16 and bf16 store the GEMMs'
    /// weights and activations in 2 bytes, which the device memory figures show.
    #[arg(long, value_name = "f32|f16|bf16", default_value = "f32")]
    precision: reflex_engine::engine::graph::Precision,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
#[command(after_help = export_kinds_help())]
struct ExportDemoArgs {
    /// Directory to write (created if missing; existing model files are replaced).
    dir: PathBuf,
    /// Which export to write (see the list below).
    #[arg(long, default_value = "reference", value_parser = clap::builder::PossibleValuesParser::new(
        reflex_engine::fixtures::Kind::ALL.map(|k| k.as_str())
    ).map(|s| s.parse::<reflex_engine::fixtures::Kind>().expect("a listed kind parses")))]
    kind: reflex_engine::fixtures::Kind,
    /// Weight seed; another seed gives another model with the same shapes.
    #[arg(long, default_value_t = reflex_engine::export::DEFAULT_SEED)]
    seed: u64,
    /// Sizes of a pi05 kind: `tiny` (what CI runs), `smolvla-size` (~430M parameters, 1.7 GB)
    /// or `pi05-widths` (pi0.5's widths with fewer layers, ~1.2B parameters, 4.6 GB). Written
    /// at bench time, never committed.
    #[arg(long, default_value = "tiny")]
    scale: reflex_engine::fixtures::pi05::Scale,
}

/// `--help`'s list of kinds, one line each, from the one list of kinds.
fn export_kinds_help() -> String {
    let mut s = String::from("Kinds:\n");
    for k in reflex_engine::fixtures::Kind::ALL {
        s.push_str(&format!("  {:<16} {}\n", k.as_str(), k.help()));
    }
    s.push_str(
        "\nWeights are deterministic from --seed (ChaCha8), never downloaded. The pi0.5 kinds \
         are small (32-pixel images, 16 tokens, 2 layers) with the seed tool's tensor names \
         and dtypes; `reflex serve` serves every kind on the cpu engine (and ort), and \
         `reflex inspect DIR --engine cuda` says what the cuda engine lacks for them.",
    );
    s
}

fn main() -> ExitCode {
    // Capture systemd's NOTIFY_SOCKET/LISTEN_FDS/WATCHDOG_* and remove them from
    // the environment, so a private recorder child does not inherit them.
    // SAFETY: first thing in main; no other thread exists yet.
    unsafe { reflex_server::systemd::take_environment() };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let Command::Trace(args) = &cli.command
        && let Err(e) = args.validate()
    {
        return usage_error(e);
    }
    // The demo and benches print their own report; their logs default to warnings.
    let quiet = matches!(cli.command, Command::Demo(_) | Command::Bench(_));
    init_logging(if quiet { "warn" } else { "info" });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    let shutdown = shutdown_on_signals()?;
    match command {
        Command::Serve(args) => {
            let running = reflex_server::serve::start(args, shutdown).await?;
            running.wait().await?;
        }
        Command::Recorder(args) => reflex_recorder::run(args, shutdown).await?,
        Command::Replay(args) => {
            // Tracing follows the standard OTEL_* variables (off when unset); the replayer
            // gets it through a hook and links no OpenTelemetry of its own.
            let telemetry =
                reflex_server::telemetry::Telemetry::tracing_from_env("reflex-replay").await;
            let code = reflex_replayer::run(args, shutdown, telemetry.call_tracer()).await;
            telemetry.shutdown().await;
            return Ok(ExitCode::from(code as u8));
        }
        Command::ExportDemo(a) => {
            let written =
                reflex_engine::fixtures::write_scaled(a.kind, &a.dir, a.seed, a.scale.dims())
                    .with_context(|| {
                        format!("writing the {} export to {}", a.kind, a.dir.display())
                    })?;
            let hash = reflex_engine::config::model_hash(&a.dir, &written.model_files)?;
            println!(
                "wrote the {} export to {} (seed {}, model_hash {hash}): {}",
                a.kind,
                a.dir.display(),
                a.seed,
                written.files.join(", ")
            );
        }
        Command::Demo(args) => demo::run(args, shutdown).await?,
        Command::Bench(args) => bench::run(args).await?,
        Command::Ship(args) => {
            let metrics = reflex_ship::metrics::Metrics::default();
            if let Some(addr) = args.metrics_listen {
                reflex_server::telemetry::spawn_metrics_endpoint(
                    addr,
                    metrics.registry(),
                    shutdown.clone(),
                )
                .await?;
            }
            reflex_ship::run(args, shutdown, metrics).await?;
        }
        Command::Fleet(args) => {
            let code = reflex_fleet::run(args).await?;
            if code != 0 {
                return Ok(ExitCode::from(code as u8));
            }
        }
        Command::Inspect(a) => {
            let dir = a.export.clone();
            let precision = a.precision;
            let report = tokio::task::spawn_blocking(move || {
                reflex_engine::inspect::inspect_cuda(&dir, &Default::default(), precision)
            })
            .await?
            .with_context(|| format!("reading the export in {}", a.export.display()))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", reflex_engine::inspect::render(&report));
            }
            if !report.runs {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Trace(args) => {
            // Reading and writing files only: off the async runtime, which has nothing else to do.
            tokio::task::spawn_blocking(move || reflex_tracetools::run(args)).await??;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// EX_USAGE (sysexits.h): the command line was wrong. Not clap's 2, which `reflex replay`
/// already means as "the target failed".
const EX_USAGE: u8 = 64;

/// Prints clap's message; `--help` and `--version` exit 0, anything else is a usage error.
fn usage_error(e: clap::Error) -> ExitCode {
    // Printing can only fail on a closed stdout/stderr; the exit code still tells.
    let _ = e.print();
    if e.use_stderr() {
        ExitCode::from(EX_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

/// SIGTERM and SIGINT cancel one token; every long-running task races it.
fn shutdown_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "stopping"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "stopping"),
        }
        t.cancel();
    });
    Ok(token)
}

/// Logs to stderr, filtered by RUST_LOG (default `default_level`). Under
/// journald (JOURNAL_STREAM set) no timestamps and no colour: journald adds its own.
/// Beside the log sits the OpenTelemetry slot, empty until `serve` (or `replay`)
/// starts tracing; RUST_LOG does not filter what it exports.
fn init_logging(default_level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(!journald && std::io::stderr().is_terminal())
        .with_target(false);
    let fmt = if journald {
        fmt.without_time().boxed()
    } else {
        fmt.boxed()
    };
    tracing_subscriber::registry()
        .with(reflex_server::telemetry::layer())
        .with(fmt.with_filter(reflex_server::telemetry::without_spans(filter)))
        .init();
}
