//! `reflex demo`: the main job on the built-in reference model.
//!
//! Writes the reference export to the user's cache folder, serves it on a
//! Unix socket in a temporary folder, drives Act calls the way a robot's
//! control loop does (two cameras, changing state, one instruction, pauses
//! where frames repeat), prints a latency and cache summary, stops cleanly.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use reflex_proto::v1::{self as pb, policy_client::PolicyClient};
use reflex_server::serve::{ListenAddr, ServeArgs};
use tokio_util::sync::CancellationToken;

use crate::bench::{Summary, ms_since};
use crate::scene::{Scene, Tick};

pub const INSTRUCTION: &str = "pick up the red cup";

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Act calls to make.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub calls: u32,
    /// Where the reference export is written (default: $XDG_CACHE_HOME/reflex or ~/.cache/reflex).
    #[arg(long, value_name = "DIR")]
    pub export_dir: Option<PathBuf>,
    /// Where the recorder writes the demo's trace (default: the cache folder's demo-traces).
    #[arg(long, value_name = "DIR")]
    pub trace_dir: Option<PathBuf>,
    /// Image data kept in the trace: full, hash_only or none.
    #[arg(long, value_name = "MODE", default_value = "full")]
    pub record_images: reflex_server::recording::ImageMode,
}

/// The user's cache folder for reflex.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("reflex")
}

/// The Act request a robot sends at `tick`.
pub fn request(tick: &Tick, noise_seed: Option<u64>) -> pb::ActRequest {
    pb::ActRequest {
        images: vec![
            pb::Image {
                camera: "base".into(),
                data: tick.base_jpeg.clone(),
                sha256: String::new(),
            },
            pb::Image {
                camera: "wrist".into(),
                data: tick.wrist_jpeg.clone(),
                sha256: String::new(),
            },
        ],
        instruction: INSTRUCTION.into(),
        state: tick.state.clone(),
        episode_id: "demo-episode-1".into(),
        noise_seed,
        ..Default::default()
    }
}

pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let export_dir = args
        .export_dir
        .unwrap_or_else(|| cache_dir().join("reference-export-seed0"));
    reflex_server::export::write_reference_export(&export_dir, reflex_server::export::DEFAULT_SEED)
        .with_context(|| {
            format!(
                "cannot write the reference export to {}",
                export_dir.display()
            )
        })?;
    let trace_dir = args
        .trace_dir
        .unwrap_or_else(|| cache_dir().join("demo-traces"));
    let work = tempfile::Builder::new().prefix("reflex-demo-").tempdir()?;
    let socket = work.path().join("policy.sock");

    // The recorder daemon, as on a robot: its own socket, owns the trace folder.
    let recorder_stop = CancellationToken::new();
    let recorder_sock = work.path().join("recorder.sock");
    let listener = reflex_recorder::bind(&recorder_sock)?;
    let recorder = tokio::spawn(reflex_recorder::serve(
        listener,
        reflex_recorder::RecorderConfig::new(trace_dir.clone()),
        recorder_stop.clone(),
    ));

    let server_stop = CancellationToken::new();
    let serve_args = ServeArgs {
        embodiment: "franka-sim".into(),
        recorder: Some(format!("unix://{}", recorder_sock.display())),
        record_images: args.record_images,
        ..ServeArgs::new(export_dir.clone(), vec![ListenAddr::Unix(socket.clone())])
    };
    let running = reflex_server::serve::start(serve_args, server_stop.clone()).await?;
    let target = format!("unix://{}", socket.display());
    let mut client = PolicyClient::new(reflex_proto::connect(&target).await?);
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await?
        .into_inner();

    println!(
        "reflex demo: reference model {} (model_hash {}, engine {})",
        info.model_type, info.model_hash, info.mode
    );
    println!("  export:  {}", export_dir.display());
    println!("  serving: {target}");
    println!(
        "  driving {} Act calls: cameras {}, state {}, chunks {}×{}, instruction {INSTRUCTION:?}",
        args.calls,
        info.cameras.join("+"),
        info.state_dim,
        info.chunk_size,
        info.action_dim
    );

    let scene = Scene::new();
    let mut rtt = Summary::default();
    let mut stages = [Summary::default(), Summary::default(), Summary::default()];
    let (mut hits, mut misses, mut failed, mut still) = (0u32, 0u32, 0u32, 0u32);
    let started = Instant::now();
    for i in 0..args.calls as usize {
        if shutdown.is_cancelled() {
            println!("  interrupted after {i} calls");
            break;
        }
        let tick = scene.tick(i);
        still += tick.still as u32;
        let req = request(&tick, None);
        let t = Instant::now();
        match client.act(req).await {
            Ok(resp) => {
                rtt.push(ms_since(t));
                let r = resp.into_inner();
                let l = r.latency.unwrap_or_default();
                stages[0].push(l.decode_ms);
                stages[1].push(l.prefix_ms);
                stages[2].push(l.denoise_ms);
                match r.cache.as_str() {
                    "hit" => hits += 1,
                    _ => misses += 1,
                }
            }
            Err(status) => {
                failed += 1;
                tracing::warn!(%status, "act failed");
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    println!(
        "  calls:    {} ok, {failed} failed, {:.0} calls/s",
        rtt.len(),
        rtt.len() as f64 / wall
    );
    println!(
        "  latency:  p50 {:.2} ms, p99 {:.2} ms (client round trip)",
        rtt.pct(50.0),
        rtt.pct(99.0)
    );
    println!(
        "  stages:   decode {:.2} ms, prefix {:.2} ms (misses), denoise {:.2} ms (p50)",
        stages[0].pct(50.0),
        stages[1].nonzero().pct(50.0),
        stages[2].pct(50.0)
    );
    let total = (hits + misses).max(1);
    println!(
        "  cache:    {hits} hit, {misses} miss ({:.0}% hits; the arm stood still for {still} ticks and sent repeated frames)",
        100.0 * hits as f64 / total as f64
    );

    server_stop.cancel();
    running.wait().await?;
    recorder_stop.cancel();
    recorder.await??;
    let trace = find_trace(&trace_dir, &info.session_id)?;
    let size = std::fs::metadata(&trace)?.len();
    println!(
        "  trace:    {} ({:.1} KB, images {})",
        trace.display(),
        size as f64 / 1024.0,
        args.record_images.as_str()
    );
    println!("  stopped cleanly");

    // Replay the trace against the same model: recorded seeds go back in, so
    // the actions must come out bit for bit; latency and cache are diffed too.
    println!(
        "replaying the trace against the same model (reflex replay {} --model {} --diff all):",
        trace.display(),
        export_dir.display()
    );
    let mut replay_args = reflex_replayer::ReplayArgs::new(trace.clone());
    replay_args.model = Some(export_dir.clone());
    replay_args.diff = reflex_replayer::args::DiffMode::All;
    if args.record_images != reflex_server::recording::ImageMode::Full {
        replay_args.no_replay = true;
        println!("  (images were not recorded in full: the trace is summarised, not replayed)");
    }
    let buf = SharedBuf::default();
    let (exit, _) = reflex_replayer::run_with(
        &replay_args,
        &shutdown,
        Box::new(buf.clone()),
        Box::new(std::io::stderr()),
    )
    .await;
    let text = buf.text();
    let summary = text.split_once("Summary:").map(|(_, s)| s).unwrap_or(&text);
    for line in summary.lines().filter(|l| !l.trim().is_empty()) {
        println!("  {}", line.trim());
    }
    for line in text.lines().filter(|l| l.starts_with("warning:")) {
        println!("  {line}");
    }
    anyhow::ensure!(failed == 0, "{failed} Act calls failed");
    anyhow::ensure!(
        exit == reflex_replayer::Exit::Passed,
        "replay ended with exit code {}",
        exit as u8
    );
    Ok(())
}

/// A writer the replay prints into, read back for the demo's summary.
#[derive(Clone, Default)]
struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().map(|b| b.clone()).unwrap_or_default()).into_owned()
    }
}

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The trace file the recorder made for `session_id` (names end in the session id).
fn find_trace(dir: &std::path::Path, session_id: &str) -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(session_id))
        })
        .collect();
    found.sort();
    found
        .pop()
        .with_context(|| format!("no trace for session {session_id} in {}", dir.display()))
}
