//! `reflex demo`: the main job on the built-in reference model.
//!
//! Writes the reference export to the user's cache folder, serves it on a
//! Unix socket in a temporary folder, drives Act calls the way a robot's
//! control loop does (two cameras, changing state, one instruction, pauses
//! where frames repeat), prints a latency and cache summary, stops cleanly,
//! then replays the trace against the same model and prints the `reflex
//! replay` command that does it again. The recorder (in-process) keeps the
//! cache's `demo-traces` under a cap; a hash_only run keeps the frames it sent
//! in `demo-frames`, which that command's `--image-dir` resolves.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use reflex_proto::images::ImageMode;
use reflex_proto::v1::{self as pb, policy_client::PolicyClient};
use reflex_server::serve::{ListenAddr, ServeArgs};
use tokio_util::sync::CancellationToken;

use crate::latency::{Summary, ms_since};
use crate::scene::{INSTRUCTION, Scene, request};

/// How much of the default trace folder the demo keeps, in MiB: every run adds a trace, and
/// the recorder deletes the oldest beyond this (its own `--max-total-mb` policy). About 20
/// runs of the default 300 calls with full images, thousands with hash_only.
const DEFAULT_TRACE_CAP_MB: u64 = 256;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Act calls to make.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub calls: u32,
    /// Where the reference export is written (default: $XDG_CACHE_HOME/reflex or ~/.cache/reflex).
    #[arg(long = "model", alias = "export-dir", value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Where the recorder writes the demo's trace (default: the cache folder's demo-traces).
    #[arg(long, value_name = "DIR")]
    pub trace_dir: Option<PathBuf>,
    /// Keep the trace folder under N MiB: the recorder deletes the oldest closed traces
    /// beyond it. Default: 256 for the default folder, no bound for a --trace-dir of yours.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub max_total_mb: Option<u64>,
    /// Image data kept in the trace: full, hash_only or none.
    #[arg(long, value_name = "MODE", default_value = "full")]
    pub record_images: ImageMode,
}

/// The user's cache folder for reflex.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("reflex")
}

pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let export_dir = args
        .model
        .unwrap_or_else(|| cache_dir().join("reference-export-seed0"));
    reflex_engine::export::write_reference_export(&export_dir, reflex_engine::export::DEFAULT_SEED)
        .with_context(|| {
            format!(
                "cannot write the reference export to {}",
                export_dir.display()
            )
        })?;
    // Every run adds a trace; in the default folder the recorder keeps the newest within a
    // cap. A folder the user named is bounded only when they ask (it may hold other traces).
    let (trace_dir, cap_mb) = match args.trace_dir {
        Some(dir) => (dir, args.max_total_mb),
        None => (
            cache_dir().join("demo-traces"),
            Some(args.max_total_mb.unwrap_or(DEFAULT_TRACE_CAP_MB)),
        ),
    };
    // A hash_only trace keeps only the images' SHA-256: the frames go to a folder the replay
    // resolves them from (--image-dir). Named by their hash, the same frames are written once
    // however often the demo runs, so the folder is bounded by the longest run's frames.
    let frames_dir =
        (args.record_images == ImageMode::HashOnly).then(|| cache_dir().join("demo-frames"));
    if let Some(dir) = &frames_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let work = tempfile::Builder::new().prefix("reflex-demo-").tempdir()?;
    let socket = work.path().join("policy.sock");

    // The recorder daemon, as on a robot: its own socket, owns the trace folder.
    let recorder_stop = CancellationToken::new();
    let recorder_sock = work.path().join("recorder.sock");
    let listener = reflex_recorder::bind(&recorder_sock)?;
    let recorder_config = reflex_recorder::RecorderConfig {
        max_total_bytes: cap_mb.map(|mb| mb * 1024 * 1024),
        ..reflex_recorder::RecorderConfig::new(trace_dir.clone())
    };
    let recorder = tokio::spawn(reflex_recorder::serve(
        listener,
        recorder_config,
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
        if let Some(dir) = &frames_dir {
            save_frames(dir, &req)?;
        }
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
    let trace = find_trace(&trace_dir, &info.session_id).with_context(|| match cap_mb {
        Some(mb) => format!("the demo's trace is gone: was it over --max-total-mb {mb}?"),
        None => "the demo's trace is missing".into(),
    })?;
    let size = std::fs::metadata(&trace)?.len();
    println!(
        "  trace:    {} ({:.1} KB, images {})",
        trace.display(),
        size as f64 / 1024.0,
        args.record_images.as_str()
    );
    if let Some(mb) = cap_mb {
        println!(
            "  traces:   {} keeps at most {mb} MiB; the recorder deletes the oldest beyond it (--max-total-mb)",
            trace_dir.display()
        );
    }
    println!("  stopped cleanly");

    // Replay the trace against the same model: recorded seeds go back in, so the actions
    // must come out bit for bit; latency and cache are diffed too. A hash_only trace needs
    // the frames (--image-dir); one without images can only be summarised (--no-replay).
    let mut replay_args = reflex_replayer::ReplayArgs::new(trace.clone());
    let mut command = format!("reflex replay {}", shell_word(&trace));
    if args.record_images == ImageMode::None {
        replay_args.no_replay = true;
        command.push_str(" --no-replay");
        println!("summarising the trace (images were not recorded, so it cannot be replayed):");
    } else {
        replay_args.model = Some(export_dir.clone());
        replay_args.diff = reflex_replayer::args::DiffMode::All;
        command.push_str(&format!(" --model {}", shell_word(&export_dir)));
        if let Some(dir) = &frames_dir {
            replay_args.image_dir = Some(dir.clone());
            command.push_str(&format!(" --image-dir {}", shell_word(dir)));
        }
        command.push_str(" --diff all");
        println!("replaying the trace against the same model:");
    }
    println!("  $ {command}");
    let buf = SharedBuf::default();
    let (exit, report) = reflex_replayer::run_with(
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
    // The report's documented JSON (README, "Replay report"), not the replayer's types.
    let report = serde_json::to_value(&report).unwrap_or_default();
    let latency_failed = report["summary"]["latency"]["fail"].as_u64().unwrap_or(0);
    if latency_failed > 0 {
        println!(
            "  note: latency passes only within ±5 % of the recorded time, and a call of a few ms \
             varies more than that on a busy machine, so most latency diffs fail there: noise, \
             not an error (actions and cache are what must match)"
        );
    }
    anyhow::ensure!(failed == 0, "{failed} Act calls failed");
    anyhow::ensure!(
        exit == reflex_replayer::Exit::Passed,
        "replay ended with exit code {}",
        exit as u8
    );
    Ok(())
}

/// Writes each image of `req` to `dir` as `<sha256>.jpg`, unless it is there already.
fn save_frames(dir: &Path, req: &pb::ActRequest) -> anyhow::Result<()> {
    use sha2::Digest;
    for image in &req.images {
        let path = dir.join(format!(
            "{}.jpg",
            reflex_engine::config::hex(&sha2::Sha256::digest(&image.data))
        ));
        if !path.exists() {
            std::fs::write(&path, &image.data)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(())
}

/// `path` as one shell word: as is when it holds only safe characters, else single-quoted.
fn shell_word(path: &Path) -> String {
    let s = path.display().to_string();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:@,".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
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
