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
//! **The books.** Every Act that reaches the server's handler gets the next
//! `seq` of the session, whatever its outcome: OK answers and answered
//! errors alike, RESOURCE_EXHAUSTED refusals included (their record carries
//! `error.slug = "queue-full"`). Each record is then either handed to the
//! recorder or counted as dropped (`server/src/recording.rs`). After a
//! graceful stop (SIGTERM: the server drains, ends the session, the recorder
//! writes the footer) the trace must therefore say, exactly:
//!
//! ```text
//! request records written + dropped_requests (+ records lost on a reconnect)
//!     = seqs issued (footer: first_seq + total_requests)
//!     = Acts the server answered (client side: OK + statuses that came from the server)
//! ```
//!
//! and every OK answer that said `recorded: true` has its `seq` in the trace,
//! every one that said `recorded: false` does not. Transport failures (the
//! call never reached a handler) are counted apart and are not in the books.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use reflex_proto::v1::{self as pb, policy_client::PolicyClient};
use reflex_recorder::{Footer, Record, TraceReader};
use reflex_server::recording::ImageMode;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use crate::bench::{Summary, ms_since};
use crate::demo::INSTRUCTION;
use crate::scene::Scene;

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
    #[arg(long, value_name = "N", conflicts_with = "target")]
    pub queue: Option<usize>,
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
    /// Also write the results as JSON to PATH.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
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
    #[arg(long, value_name = "DIR", requires_all = ["target", "server_pid"], conflicts_with = "sweep")]
    pub record_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheMode {
    On,
    Off,
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

pub async fn run(args: LoadBench) -> anyhow::Result<()> {
    // main's signal handler has no way to reach a bench; Ctrl-C ends the load early here,
    // and the children are still stopped gracefully and the books still checked.
    let interrupt = CancellationToken::new();
    let token = interrupt.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            token.cancel();
        }
    });
    let counts = if args.sweep.is_empty() {
        vec![args.clients]
    } else {
        args.sweep.clone()
    };
    let frames = Arc::new(tokio::task::spawn_blocking(Frames::new).await?);
    let work = tempfile::Builder::new().prefix("reflex-load-").tempdir()?;
    let export = match (&args.target, &args.model) {
        (Some(_), _) => None,
        (None, Some(dir)) => Some(dir.clone()),
        (None, None) => {
            let dir = work.path().join("export");
            reflex_server::export::write_reference_export(&dir, 0)?;
            Some(dir)
        }
    };
    println!("{}", preamble(&args, counts.len()));
    let mut results = vec![];
    for (i, &k) in counts.iter().enumerate() {
        if interrupt.is_cancelled() {
            break;
        }
        let res = match &export {
            Some(export) => {
                let dir = work.path().join(format!("run{i}-k{k}"));
                run_managed(&args, export, &dir, k, &frames, &interrupt).await
            }
            None => run_target(&args, k, &frames, &interrupt).await,
        };
        let res = res.with_context(|| format!("load run with {k} clients"))?;
        println!("{}", res.describe(&args));
        results.push(res);
    }
    if results.len() > 1 {
        println!("{}", table(&results));
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "tool": "reflex bench load",
            "reflex_version": env!("CARGO_PKG_VERSION"),
            "machine": machine(),
            "settings": settings_json(&args),
            "interrupted": interrupt.is_cancelled(),
            "runs": results.iter().map(RunResult::json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| match &r.books {
            BookOutcome::Fail(why) => Some(format!("{} clients: {why}", r.clients)),
            _ => None,
        })
        .collect();
    anyhow::ensure!(failed.is_empty(), "books FAIL: {}", failed.join("; "));
    if let Some(r) = results.iter().find(|r| r.ok_all == 0) {
        anyhow::bail!(
            "no Act call succeeded with {} clients (errors: {})",
            r.clients,
            codes(&r.server_errors_all)
        );
    }
    anyhow::ensure!(!interrupt.is_cancelled(), "interrupted");
    Ok(())
}

fn preamble(args: &LoadBench, runs: usize) -> String {
    let m = machine();
    let what = match &args.target {
        Some(t) => format!("target {t}"),
        None => format!(
            "{}, a reflex serve child {} recording {} through a reflex recorder child, workers {}, queue {}, cache {}",
            match &args.model {
                Some(d) => format!("model {}", d.display()),
                None => "reference model".into(),
            },
            if args.tcp {
                "on TCP loopback"
            } else {
                "on a Unix socket"
            },
            args.record_images.as_str(),
            args.workers.map_or("default".into(), |w| w.to_string()),
            args.queue.map_or("default (32)".into(), |q| q.to_string()),
            match args.cache {
                CacheMode::On =>
                    "on (scene frames: new while the arm moves, repeated while it pauses)",
                CacheMode::Off => "off",
            }
        ),
    };
    format!(
        "reflex bench load: {runs} run(s), {} s measured after {} s warm-up each; {what}; \
         busy back-off {} ms\nmachine: {} CPUs, load average {} at start",
        args.secs,
        args.warmup_secs,
        args.busy_backoff_ms,
        m["cpus"],
        m["loadavg"].as_str().unwrap_or("?"),
    )
}

fn machine() -> serde_json::Value {
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg": loadavg,
    })
}

fn settings_json(args: &LoadBench) -> serde_json::Value {
    serde_json::json!({
        "secs": args.secs,
        "warmup_secs": args.warmup_secs,
        "target": args.target,
        "model": args.model.as_ref().map(|p| p.display().to_string()),
        "workers": args.workers,
        "queue": args.queue,
        "record_images": args.record_images.as_str(),
        "cache": matches!(args.cache, CacheMode::On),
        "transport": if args.tcp { "tcp" } else { "unix" },
        "busy_backoff_ms": args.busy_backoff_ms,
    })
}

// ---------------------------------------------------------------------------
// One run against children this tool starts.

async fn run_managed(
    args: &LoadBench,
    export: &Path,
    dir: &Path,
    k: u32,
    frames: &Arc<Frames>,
    interrupt: &CancellationToken,
) -> anyhow::Result<RunResult> {
    std::fs::create_dir_all(dir)?;
    let traces = dir.join("traces");
    let rsock = dir.join("recorder.sock");
    let psock = dir.join("policy.sock");
    let me = std::env::current_exe()?;
    let recorder_uri = format!("unix://{}", rsock.display());

    let mut recorder = Spawned::start(
        "reflex recorder",
        &me,
        &[
            "recorder".as_ref(),
            "--dir".as_ref(),
            traces.as_os_str(),
            "--listen".as_ref(),
            recorder_uri.as_ref(),
        ],
    )?;
    wait_recorder(&recorder_uri, &mut recorder).await?;

    let mut flags: Vec<std::ffi::OsString> = vec![
        "serve".into(),
        export.into(),
        "--listen".into(),
        format!("unix://{}", psock.display()).into(),
        "--recorder".into(),
        recorder_uri.clone().into(),
        "--record-images".into(),
        args.record_images.as_str().into(),
        "--embodiment".into(),
        "load-test".into(),
    ];
    if args.tcp {
        flags.extend(["--listen".into(), "127.0.0.1:0".into()]);
    }
    if let Some(w) = args.workers {
        flags.extend(["--workers".into(), w.to_string().into()]);
    }
    if let Some(q) = args.queue {
        flags.extend(["--queue-depth".into(), q.to_string().into()]);
    }
    if args.cache == CacheMode::Off {
        flags.extend(["--cache-entries".into(), "0".into()]);
    }
    let flag_refs: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
    let mut server = Spawned::start("reflex serve", &me, &flag_refs)?;
    let unix_target = format!("unix://{}", psock.display());
    let info = wait_server(&unix_target, &mut server).await?;
    let target = if args.tcp {
        let line = server.wait_log("listen=tcp://").await?;
        let at = line.find("listen=tcp://").unwrap_or(0) + "listen=tcp://".len();
        line[at..]
            .split_whitespace()
            .next()
            .context("no address after listen=")?
            .to_string()
    } else {
        unix_target
    };

    let pids = [Some(server.pid), Some(recorder.pid)];
    let watch = RssWatch::start(&pids);
    let load = drive(&target, k, args, frames, interrupt, pids).await?;
    // The sampler stops first: a high-water mark read after the last sample is at least
    // every sampled value.
    let sampled = watch.stop().await;
    let hwm = pids.map(|p| p.and_then(|p| proc_status_kib(p, "VmHWM")));

    // SIGTERM, server first: it drains, ends its session (footer), exits; then the recorder
    // closes its files. Both must exit 0.
    let mut problems = vec![];
    let server_exit = server.terminate(Duration::from_secs(30)).await;
    match &server_exit {
        Ok(st) if st.success() => {}
        Ok(st) => problems.push(format!(
            "the server exited with {st} after SIGTERM; its stderr ends:\n{}",
            server.tail()
        )),
        Err(e) => problems.push(format!("{e:#}")),
    }
    match recorder.terminate(Duration::from_secs(30)).await {
        Ok(st) if st.success() => {}
        Ok(st) => problems.push(format!(
            "the recorder exited with {st} after SIGTERM; its stderr ends:\n{}",
            recorder.tail()
        )),
        Err(e) => problems.push(format!("{e:#}")),
    }
    let books = session_files(&traces, &info.session_id).map(|files| {
        let books = Books::check(&files);
        (books, files)
    });
    let outcome = book_outcome(books, &load, true, problems);
    Ok(RunResult::new(
        k,
        args,
        info,
        load,
        [
            Some(Rss {
                hwm_kib: hwm[0],
                sampled_max_kib: sampled[0],
            }),
            Some(Rss {
                hwm_kib: hwm[1],
                sampled_max_kib: sampled[1],
            }),
        ],
        outcome,
        trace_bytes(&traces),
    ))
}

// ---------------------------------------------------------------------------
// One run against a server somebody else started.

async fn run_target(
    args: &LoadBench,
    k: u32,
    frames: &Arc<Frames>,
    interrupt: &CancellationToken,
) -> anyhow::Result<RunResult> {
    let target = args.target.clone().context("--target is required here")?;
    let mut client = PolicyClient::new(
        reflex_proto::connect(&target)
            .await
            .with_context(|| format!("cannot connect to {target}"))?,
    );
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .with_context(|| format!("GetModelInfo on {target} failed"))?
        .into_inner();
    let pids = [args.server_pid, args.recorder_pid];
    let watch = RssWatch::start(&pids);
    let load = drive(&target, k, args, frames, interrupt, pids).await?;
    // The sampler stops first: a high-water mark read after the last sample is at least
    // every sampled value.
    let sampled = watch.stop().await;
    let hwm = pids.map(|p| p.and_then(|p| proc_status_kib(p, "VmHWM")));
    let rss = [0, 1].map(|i| {
        pids[i].map(|_| Rss {
            hwm_kib: hwm[i],
            sampled_max_kib: sampled[i],
        })
    });
    let (outcome, bytes) = match (&args.record_dir, args.server_pid) {
        (Some(dir), Some(pid)) => {
            let mut problems = vec![];
            if let Err(e) = stop_foreign(pid, Duration::from_secs(30)).await {
                problems.push(format!("{e:#}"));
            }
            let books = session_files(dir, &info.session_id).map(|files| {
                let books = Books::check(&files);
                (books, files)
            });
            let bytes = books
                .as_ref()
                .map(|(_, f)| f.iter().map(|f| f.bytes).sum())
                .unwrap_or(0);
            (book_outcome(books, &load, false, problems), Some(bytes))
        }
        _ => (
            BookOutcome::Skipped(
                "needs --record-dir and --server-pid with --target (the server is stopped at the end so its footer is written)"
                    .into(),
            ),
            None,
        ),
    };
    Ok(RunResult::new(k, args, info, load, rss, outcome, bytes))
}

/// SIGTERM to a process that is not our child, then wait until it is gone.
async fn stop_foreign(pid: u32, limit: Duration) -> anyhow::Result<()> {
    // SAFETY: kill(2) with a pid the user named for exactly this purpose (--server-pid).
    if unsafe { libc::kill(pid as i32, libc::SIGTERM) } != 0 {
        anyhow::bail!(
            "cannot signal the server (pid {pid}): {}",
            std::io::Error::last_os_error()
        );
    }
    let deadline = Instant::now() + limit;
    while !exited(pid) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the server (pid {pid}) did not exit within {} s of SIGTERM",
            limit.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Whether `pid` has exited: no such process, or a zombie its parent has not reaped yet.
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

// ---------------------------------------------------------------------------
// The clients.

/// One precomputed scene cycle. Frames are stamped per call (see the module docs).
struct Frames {
    base: Vec<Vec<u8>>,
    wrist: Vec<Vec<u8>>,
    state: Vec<Vec<f32>>,
    /// The camera sees exactly what it saw on the previous tick (the arm stands still).
    repeat: Vec<bool>,
}

/// Two scene cycles (the arm moves 24 ticks, then pauses 8).
const TICKS: usize = 64;

impl Frames {
    fn new() -> Frames {
        let scene = Scene::new();
        let ticks: Vec<_> = (0..TICKS).map(|i| scene.tick(i)).collect();
        let repeat = (0..TICKS)
            .map(|i| {
                let prev = &ticks[(i + TICKS - 1) % TICKS];
                ticks[i].base_jpeg == prev.base_jpeg && ticks[i].wrist_jpeg == prev.wrist_jpeg
            })
            .collect();
        Frames {
            base: ticks.iter().map(|t| t.base_jpeg.clone()).collect(),
            wrist: ticks.iter().map(|t| t.wrist_jpeg.clone()).collect(),
            state: ticks.iter().map(|t| t.state.clone()).collect(),
            repeat,
        }
    }
}

/// `jpeg` with a comment segment (COM, 0xFFFE) right after SOI: other bytes (another
/// SHA-256, so another cache key), the same pixels.
fn stamp(jpeg: &[u8], tag: &str) -> Vec<u8> {
    let tag = &tag.as_bytes()[..tag.len().min(60_000)];
    let mut out = Vec::with_capacity(jpeg.len() + tag.len() + 4);
    out.extend_from_slice(&jpeg[..2.min(jpeg.len())]);
    out.extend_from_slice(&[0xFF, 0xFE]);
    // The segment length counts its own two bytes; the tag is capped above.
    out.extend_from_slice(&((tag.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(tag);
    out.extend_from_slice(jpeg.get(2..).unwrap_or_default());
    out
}

/// What one client saw.
#[derive(Debug, Default)]
struct Tally {
    /// OK answers, warm-up included.
    ok_all: u64,
    ok_measured: u64,
    /// Round trips of the measured OK answers, ms.
    latency: Vec<f64>,
    hits: u64,
    misses: u64,
    /// Statuses the server answered (they reached its handler and got a seq).
    server_errors_all: BTreeMap<&'static str, u64>,
    server_errors_measured: BTreeMap<&'static str, u64>,
    /// Failures that never reached a handler (connection errors): not in the books.
    transport_errors: BTreeMap<&'static str, u64>,
    /// Seqs of OK answers that said recorded: true / false.
    recorded: Vec<u64>,
    unrecorded: Vec<u64>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.ok_all += o.ok_all;
        self.ok_measured += o.ok_measured;
        self.latency.extend(o.latency);
        self.hits += o.hits;
        self.misses += o.misses;
        for (dst, src) in [
            (&mut self.server_errors_all, o.server_errors_all),
            (&mut self.server_errors_measured, o.server_errors_measured),
            (&mut self.transport_errors, o.transport_errors),
        ] {
            for (c, n) in src {
                *dst.entry(c).or_default() += n;
            }
        }
        self.recorded.extend(o.recorded);
        self.unrecorded.extend(o.unrecorded);
    }

    /// Acts the server answered: OK plus statuses from its handler.
    fn answered(&self) -> u64 {
        self.ok_all + self.server_errors_all.values().sum::<u64>()
    }
}

/// The measured load of one run.
struct Load {
    tally: Tally,
    measured_secs: f64,
    interrupted: bool,
    /// CPU cores used over the measured window by [server, recorder, this process (the
    /// clients)]; None where the pid is unknown. On a small machine the clients compete
    /// with the server, and this says by how much.
    cpu: [Option<f64>; 3],
}

async fn drive(
    target: &str,
    k: u32,
    args: &LoadBench,
    frames: &Arc<Frames>,
    interrupt: &CancellationToken,
    pids: [Option<u32>; 2],
) -> anyhow::Result<Load> {
    // Every robot has its connection before the clock starts.
    let mut channels = Vec::with_capacity(k as usize);
    for i in 0..k {
        channels.push(
            reflex_proto::connect(target)
                .await
                .with_context(|| format!("client {i} cannot connect to {target}"))?,
        );
    }
    // Frames never repeat across runs either (a --target server keeps its cache).
    let nonce: Arc<str> = reflex_server::recording::new_session_id().into();
    let start = Instant::now() + Duration::from_secs_f64(args.warmup_secs);
    let end = start + Duration::from_secs_f64(args.secs);
    let backoff = Duration::from_millis(args.busy_backoff_ms);
    let who = [pids[0], pids[1], Some(std::process::id())];
    let stop = interrupt.clone();
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(start.into()).await;
        let (before, t0) = (who.map(|p| p.and_then(cpu_ticks)), Instant::now());
        tokio::select! {
            _ = tokio::time::sleep_until(end.into()) => {}
            _ = stop.cancelled() => {}
        }
        let after = who.map(|p| p.and_then(cpu_ticks));
        let secs = t0.elapsed().as_secs_f64();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        [0, 1, 2].map(|i| match (before[i], after[i]) {
            (Some(a), Some(b)) if secs > 0.0 => Some(b.saturating_sub(a) as f64 / hz / secs),
            _ => None,
        })
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (id, ch) in channels.into_iter().enumerate() {
        let frames = frames.clone();
        let stop = interrupt.clone();
        tasks.spawn(client(
            id,
            PolicyClient::new(ch),
            frames,
            nonce.clone(),
            (start, end),
            backoff,
            stop,
        ));
    }
    let mut tally = Tally::default();
    while let Some(t) = tasks.join_next().await {
        tally.merge(t.context("a client task failed")?);
    }
    let stopped = Instant::now().min(end);
    // The window ends at `end` (or on Ctrl-C), which the clients have reached by now.
    let cpu = if stopped > start {
        cpu.await.context("the CPU sampler failed")?
    } else {
        cpu.abort();
        [None; 3]
    };
    Ok(Load {
        tally,
        measured_secs: stopped.saturating_duration_since(start).as_secs_f64(),
        interrupted: interrupt.is_cancelled(),
        cpu,
    })
}

/// One robot: Act calls back to back until `end`; calls started before `start` are warm-up.
async fn client(
    id: usize,
    mut api: PolicyClient<Channel>,
    frames: Arc<Frames>,
    nonce: Arc<str>,
    (start, end): (Instant, Instant),
    backoff: Duration,
    stop: CancellationToken,
) -> Tally {
    let mut t = Tally::default();
    let mut images: Vec<pb::Image> = vec![];
    // Robots out of phase with each other: not all pausing at once.
    let mut tick = id * 5;
    let episode = format!("load-{id}");
    loop {
        let began = Instant::now();
        if began >= end || stop.is_cancelled() {
            break;
        }
        let f = tick % TICKS;
        if images.is_empty() || !frames.repeat[f] {
            let tag = format!("reflex-load {nonce} robot {id} tick {tick}");
            images = vec![
                pb::Image {
                    camera: "base".into(),
                    data: stamp(&frames.base[f], &tag),
                    sha256: String::new(),
                },
                pb::Image {
                    camera: "wrist".into(),
                    data: stamp(&frames.wrist[f], &tag),
                    sha256: String::new(),
                },
            ];
        }
        let req = pb::ActRequest {
            images: images.clone(),
            instruction: INSTRUCTION.into(),
            state: frames.state[f].clone(),
            episode_id: episode.clone(),
            ..Default::default()
        };
        tick += 1;
        let measured = began >= start;
        let res = api.act(req).await;
        let ms = ms_since(began);
        match res {
            Ok(r) => {
                let r = r.into_inner();
                t.ok_all += 1;
                if r.recorded {
                    t.recorded.push(r.seq);
                } else {
                    t.unrecorded.push(r.seq);
                }
                if measured {
                    t.ok_measured += 1;
                    t.latency.push(ms);
                    match r.cache.as_str() {
                        "hit" => t.hits += 1,
                        "miss" => t.misses += 1,
                        _ => {}
                    }
                }
            }
            Err(status) => {
                let name = code_name(status.code());
                // A status built from a transport error carries it as its source; one the
                // server sent (grpc-status) has none.
                if std::error::Error::source(&status).is_none() {
                    *t.server_errors_all.entry(name).or_default() += 1;
                    if measured {
                        *t.server_errors_measured.entry(name).or_default() += 1;
                    }
                } else {
                    *t.transport_errors.entry(name).or_default() += 1;
                }
                let pause = if status.code() == Code::ResourceExhausted {
                    backoff
                } else {
                    // Not a hot loop on a broken connection or a failing model.
                    Duration::from_millis(20)
                };
                let until = (Instant::now() + pause).min(end);
                tokio::select! {
                    _ = tokio::time::sleep_until(until.into()) => {}
                    _ = stop.cancelled() => {}
                }
            }
        }
    }
    t
}

/// The canonical gRPC name of a status code.
fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn codes(m: &BTreeMap<&'static str, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// The book check.

/// What one trace file of the session holds.
#[derive(Debug, Clone, Default)]
struct FileBooks {
    name: String,
    first_seq: u64,
    seqs: Vec<u64>,
    /// Request records that carry an `error` (answered errors).
    error_records: u64,
    footer: Option<Footer>,
    /// Why the file ends early or could not be read to the end.
    damage: Option<String>,
    bytes: u64,
}

/// Every trace file in `dir` whose header names `session_id`, read through the recorder's reader.
fn session_files(dir: &Path, session_id: &str) -> anyhow::Result<Vec<FileBooks>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list the trace folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.ends_with(".jsonl.gz") || n.ends_with(".jsonl")
        })
        .collect();
    paths.sort();
    let mut out = vec![];
    for path in paths {
        let mut reader = TraceReader::open(&path)?;
        if reader.header().session_id != session_id {
            continue;
        }
        let mut f = FileBooks {
            name: path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into(),
            first_seq: reader.header().first_seq,
            bytes: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
            ..Default::default()
        };
        loop {
            match reader.next_record() {
                Ok(Some(Record::Request(r))) => {
                    f.seqs.push(r.seq);
                    f.error_records += r.error.is_some() as u64;
                }
                Ok(Some(Record::Footer(_))) | Ok(Some(Record::Header(_))) => {}
                Ok(None) => break,
                Err(e) => {
                    f.damage = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(t) = reader.truncation() {
            f.damage = Some(format!("cut: {t}"));
        }
        f.footer = reader.footer().cloned();
        out.push(f);
    }
    Ok(out)
}

/// The server-side books of one session, from its trace files alone.
#[derive(Debug, Default, PartialEq)]
struct Books {
    files: usize,
    /// Distinct seqs with a request record.
    written: u64,
    /// Counted drops: the server's footer numbers for the last stream, seq gaps inside
    /// earlier streams (a stream that ended with the connection).
    dropped: u64,
    /// Seqs handed to a stream that broke before the recorder wrote them: between the last
    /// record of a lost stream and the first seq of the next one.
    lost: u64,
    /// Seqs the session issued: the last stream's first seq + its footer's total_requests.
    issued: u64,
    /// Answered errors among the written records.
    error_records: u64,
    /// Structural problems (no footer, cut file, duplicate seqs...): any one is a FAIL.
    problems: Vec<String>,
}

impl Books {
    fn check(files: &[FileBooks]) -> Books {
        let mut b = Books {
            files: files.len(),
            ..Default::default()
        };
        if files.is_empty() {
            b.problems.push("no trace file for the session".into());
            return b;
        }
        let mut files: Vec<&FileBooks> = files.iter().collect();
        files.sort_by(|x, y| (x.first_seq, &x.name).cmp(&(y.first_seq, &y.name)));
        for f in &files {
            if let Some(d) = &f.damage {
                b.problems.push(format!("{}: {d}", f.name));
            }
            if f.footer.is_none() {
                b.problems.push(format!("{} has no footer", f.name));
            }
        }
        let mut all: Vec<u64> = files.iter().flat_map(|f| f.seqs.iter().copied()).collect();
        all.sort_unstable();
        let before = all.len();
        all.dedup();
        if all.len() != before {
            b.problems
                .push(format!("{} seqs written twice", before - all.len()));
        }
        b.written = all.len() as u64;
        b.error_records = files.iter().map(|f| f.error_records).sum();
        if files[0].first_seq != 0 {
            b.problems.push(format!(
                "the first file starts at seq {}: seqs before it are in no file",
                files[0].first_seq
            ));
        }
        // Streams: a file whose footer says "rotated" continues in the next file.
        let mut streams: Vec<Vec<&FileBooks>> = vec![];
        let mut cur = vec![];
        for f in files {
            cur.push(f);
            if f.footer
                .as_ref()
                .is_none_or(|ft| ft.ended_reason != "rotated")
            {
                streams.push(std::mem::take(&mut cur));
            }
        }
        if !cur.is_empty() {
            b.problems
                .push("the last file says it was rotated, but no file follows it".into());
            streams.push(cur);
        }
        let n = streams.len();
        for (i, s) in streams.iter().enumerate() {
            let first = s[0].first_seq;
            let written: u64 = s.iter().map(|f| f.seqs.len() as u64).sum();
            let covered = s
                .iter()
                .flat_map(|f| f.seqs.iter())
                .max()
                .map_or(first, |m| m + 1);
            if i + 1 < n {
                // Ended with the connection: the recorder wrote this footer, not the server.
                let next = streams[i + 1][0].first_seq;
                b.dropped += (covered - first).saturating_sub(written);
                if next < covered {
                    b.problems.push(format!(
                        "{} overlaps the next stream (next first_seq {next} < {covered})",
                        s[0].name
                    ));
                }
                b.lost += next.saturating_sub(covered);
                continue;
            }
            let last = s[s.len() - 1];
            match &last.footer {
                Some(ft) if ft.ended_reason != "client_lost" && ft.ended_reason != "rotated" => {
                    b.issued = first + ft.total_requests;
                    b.dropped += ft.dropped_requests;
                }
                other => {
                    b.problems.push(format!(
                        "{}: the session has no footer from the server (ended_reason {:?}); it did not end cleanly",
                        last.name,
                        other.as_ref().map(|f| f.ended_reason.as_str())
                    ));
                    b.issued = covered;
                }
            }
        }
        if let Some(&max) = all.last()
            && max >= b.issued
        {
            b.problems.push(format!(
                "seq {max} was written, beyond the {} the footer says were issued",
                b.issued
            ));
        }
        b
    }

    fn balanced(&self) -> bool {
        self.written + self.dropped + self.lost == self.issued
    }

    fn sum_text(&self) -> String {
        let lost = if self.lost > 0 {
            format!(" + lost on reconnect {}", self.lost)
        } else {
            String::new()
        };
        format!(
            "written {} + dropped {}{lost} {} answered {}",
            self.written,
            self.dropped,
            if self.balanced() { "=" } else { "≠" },
            self.issued
        )
    }
}

#[derive(Debug)]
enum BookOutcome {
    Pass { line: String, notes: Vec<String> },
    Fail(String),
    Skipped(String),
}

/// Server books plus the client cross-checks. `exclusive`: this tool was the server's only
/// client (it started it), so the client's count must match the server's exactly.
fn book_outcome(
    books: anyhow::Result<(Books, Vec<FileBooks>)>,
    load: &Load,
    exclusive: bool,
    mut problems: Vec<String>,
) -> BookOutcome {
    let (b, files) = match books {
        Ok(x) => x,
        Err(e) => {
            problems.push(format!("cannot read the traces: {e:#}"));
            return BookOutcome::Fail(problems.join("; "));
        }
    };
    problems.extend(b.problems.iter().cloned());
    if !b.balanced() {
        let (lhs, rhs) = (b.written + b.dropped + b.lost, b.issued);
        problems.push(format!(
            "{} (difference {})",
            b.sum_text(),
            lhs as i128 - rhs as i128
        ));
    }
    let t = &load.tally;
    let answered = t.answered();
    let mut notes = vec![];
    if exclusive {
        if answered != b.issued {
            problems.push(format!(
                "the server issued {} seqs but the clients got {answered} answers (OK {} + errors {})",
                b.issued,
                t.ok_all,
                answered - t.ok_all
            ));
        } else {
            notes.push(format!(
                "clients: OK {} + answered errors {} = {answered} = the footer's total_requests",
                t.ok_all,
                answered - t.ok_all
            ));
        }
    } else if answered > b.issued {
        problems.push(format!(
            "the clients got {answered} answers but the server issued only {} seqs",
            b.issued
        ));
    } else {
        notes.push(format!(
            "clients: {answered} answers of the {} the server issued (not required to be equal: others may call a --target server)",
            b.issued
        ));
    }
    let written: std::collections::HashSet<u64> =
        files.iter().flat_map(|f| f.seqs.iter().copied()).collect();
    let missing = t.recorded.iter().filter(|s| !written.contains(s)).count() as u64;
    let unexpected = t.unrecorded.iter().filter(|s| written.contains(s)).count();
    if missing > b.lost {
        problems.push(format!(
            "{missing} OK answers said recorded: true but their seq is in no trace file"
        ));
    }
    if unexpected > 0 {
        problems.push(format!(
            "{unexpected} OK answers said recorded: false but their seq is in a trace file"
        ));
    }
    notes.push(format!(
        "per seq: {} OK answers said recorded, all in the trace{}; {} said not recorded, none in it; {} error records written",
        t.recorded.len(),
        if missing > 0 {
            format!(" but {missing} lost on a reconnect")
        } else {
            String::new()
        },
        t.unrecorded.len(),
        b.error_records
    ));
    if problems.is_empty() {
        BookOutcome::Pass {
            line: format!("books: PASS ({})", b.sum_text()),
            notes,
        }
    } else {
        BookOutcome::Fail(problems.join("; "))
    }
}

// ---------------------------------------------------------------------------
// Memory.

#[derive(Debug, Clone, Copy)]
struct Rss {
    /// VmHWM (the kernel's peak) read at the end of the load, before the stop.
    hwm_kib: Option<u64>,
    /// Largest VmRSS sampled every 100 ms during the run.
    sampled_max_kib: u64,
}

impl Rss {
    /// The larger of the two: per-CPU RSS counter caching can leave VmHWM a little
    /// below a VmRSS sample.
    fn peak_mib(&self) -> f64 {
        self.hwm_kib.unwrap_or(0).max(self.sampled_max_kib) as f64 / 1024.0
    }
}

/// utime + stime of a process, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces; the
    // state is field 3, so utime (14) and stime (15) are at 11 and 12 here.
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    Some(rest.next()?.parse::<u64>().ok()? + rest.next()?.parse::<u64>().ok()?)
}

/// A `kB` field of /proc/PID/status.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Samples VmRSS of up to two processes every 100 ms and keeps the largest.
struct RssWatch {
    max: Arc<[AtomicU64; 2]>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RssWatch {
    fn start(pids: &[Option<u32>; 2]) -> RssWatch {
        let max = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let stop = CancellationToken::new();
        let (m, s, pids) = (max.clone(), stop.clone(), *pids);
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                for (i, pid) in pids.iter().enumerate() {
                    if let Some(kib) = pid.and_then(|p| proc_status_kib(p, "VmRSS")) {
                        m[i].fetch_max(kib, Ordering::Relaxed);
                    }
                }
                tokio::select! {
                    _ = every.tick() => {}
                    _ = s.cancelled() => return,
                }
            }
        });
        RssWatch { max, stop, task }
    }

    async fn stop(self) -> [u64; 2] {
        self.stop.cancel();
        let _ = self.task.await;
        [0, 1].map(|i| self.max[i].load(Ordering::Relaxed))
    }
}

fn trace_bytes(dir: &Path) -> Option<u64> {
    Some(
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok()?.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum(),
    )
}

// ---------------------------------------------------------------------------
// Child processes.

/// A `reflex` child: its stderr's last lines are kept for error messages; killed on drop.
struct Spawned {
    name: &'static str,
    pid: u32,
    child: tokio::process::Child,
    tail: Arc<Mutex<std::collections::VecDeque<String>>>,
}

const TAIL_LINES: usize = 40;

impl Spawned {
    fn start(name: &'static str, bin: &Path, args: &[&std::ffi::OsStr]) -> anyhow::Result<Spawned> {
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args(args)
            // The children's own flags only: nothing from this shell's REFLEX_*/OTEL_* setup.
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("REFLEX_") || k.starts_with("OTEL_") {
                cmd.env_remove(k.as_ref());
            }
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", bin.display()))?;
        let pid = child.id().context("the child has no pid")?;
        let tail = Arc::new(Mutex::new(std::collections::VecDeque::new()));
        if let Some(err) = child.stderr.take() {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(mut t) = tail.lock() {
                        if t.len() == TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            });
        }
        Ok(Spawned {
            name,
            pid,
            child,
            tail,
        })
    }

    fn tail(&self) -> String {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Fails (with its stderr) if the child has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            anyhow::bail!(
                "{} exited early ({st}); its stderr ends:\n{}",
                self.name,
                self.tail()
            );
        }
        Ok(())
    }

    /// Waits for a stderr line containing `needle` (the kept tail is searched).
    async fn wait_log(&mut self, needle: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self
                .tail
                .lock()
                .ok()
                .and_then(|t| t.iter().find(|l| l.contains(needle)).cloned())
            {
                return Ok(l);
            }
            self.check_alive()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} logged no line with {needle:?} in 30 s; its stderr ends:\n{}",
                self.name,
                self.tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then wait up to `limit` (then SIGKILL and an error).
    async fn terminate(&mut self, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
        if self.child.try_wait()?.is_none() {
            // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
            unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        }
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(st) => Ok(st?),
            Err(_) => {
                let _ = self.child.kill().await;
                anyhow::bail!(
                    "{} did not exit within {} s of SIGTERM; its stderr ends:\n{}",
                    self.name,
                    limit.as_secs(),
                    self.tail()
                )
            }
        }
    }
}

async fn wait_recorder(uri: &str, p: &mut Spawned) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = reflex_proto::connect(uri).await
            && pb::recorder_client::RecorderClient::new(ch)
                .status(pb::StatusRequest {})
                .await
                .is_ok()
        {
            return Ok(());
        }
        p.check_alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the recorder did not answer on {uri} in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the server answers GetModelInfo (it loads and optimises the model first).
async fn wait_server(target: &str, p: &mut Spawned) -> anyhow::Result<pb::ModelInfo> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(ch) = reflex_proto::connect(target).await
            && let Ok(info) = PolicyClient::new(ch)
                .get_model_info(pb::GetModelInfoRequest {})
                .await
        {
            return Ok(info.into_inner());
        }
        p.check_alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the server did not answer on {target} in 120 s; its stderr ends:\n{}",
            p.tail()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------
// Results.

struct RunResult {
    clients: u32,
    info: pb::ModelInfo,
    measured_secs: f64,
    interrupted: bool,
    ok_all: u64,
    ok_measured: u64,
    latency: Summary,
    hits: u64,
    misses: u64,
    server_errors_all: BTreeMap<&'static str, u64>,
    server_errors_measured: BTreeMap<&'static str, u64>,
    transport_errors: BTreeMap<&'static str, u64>,
    /// [server, recorder]; None where not measured.
    rss: [Option<Rss>; 2],
    books: BookOutcome,
    trace_bytes: Option<u64>,
    backoff_ms: u64,
    cpu: [Option<f64>; 3],
}

impl RunResult {
    fn new(
        clients: u32,
        args: &LoadBench,
        info: pb::ModelInfo,
        load: Load,
        rss: [Option<Rss>; 2],
        books: BookOutcome,
        trace_bytes: Option<u64>,
    ) -> RunResult {
        let mut latency = Summary::default();
        for ms in &load.tally.latency {
            latency.push(*ms);
        }
        let cpu = load.cpu;
        let t = load.tally;
        RunResult {
            clients,
            info,
            measured_secs: load.measured_secs,
            interrupted: load.interrupted,
            ok_all: t.ok_all,
            ok_measured: t.ok_measured,
            latency,
            hits: t.hits,
            misses: t.misses,
            server_errors_all: t.server_errors_all,
            server_errors_measured: t.server_errors_measured,
            transport_errors: t.transport_errors,
            rss,
            books,
            trace_bytes,
            backoff_ms: args.busy_backoff_ms,
            cpu,
        }
    }

    fn throughput(&self) -> f64 {
        if self.measured_secs > 0.0 {
            self.ok_measured as f64 / self.measured_secs
        } else {
            0.0
        }
    }

    fn hit_pct(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| 100.0 * self.hits as f64 / n as f64)
    }

    fn busy(&self) -> u64 {
        self.server_errors_measured
            .get("RESOURCE_EXHAUSTED")
            .copied()
            .unwrap_or(0)
    }

    fn other_errors(&self) -> u64 {
        self.server_errors_measured
            .iter()
            .filter(|(c, _)| **c != "RESOURCE_EXHAUSTED")
            .map(|(_, n)| n)
            .sum::<u64>()
            + self.transport_errors.values().sum::<u64>()
    }

    fn describe(&self, args: &LoadBench) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!(
            "{} clients{} — model {} (model_hash {}, engine {}), session {}",
            self.clients,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            },
            self.info.model_type,
            self.info.model_hash,
            self.info.mode,
            self.info.session_id
        ));
        line(format!(
            "  calls:        {} OK in {:.1} s measured ({} more in warm-up): {:.1} calls/s",
            self.ok_measured,
            self.measured_secs,
            self.ok_all - self.ok_measured,
            self.throughput()
        ));
        line(format!(
            "  latency:      p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms (client round trip of OK calls)",
            self.latency.pct(50.0),
            self.latency.pct(99.0),
            self.latency.pct(99.9)
        ));
        let busy = self.busy();
        let mut others = self.server_errors_measured.clone();
        others.remove("RESOURCE_EXHAUSTED");
        line(format!(
            "  errors:       RESOURCE_EXHAUSTED {busy} (queue full: expected under overload; the client waits {} ms and calls again); other answered errors: {}; transport: {}",
            self.backoff_ms,
            codes(&others),
            codes(&self.transport_errors)
        ));
        let off = args.target.is_none() && args.cache == CacheMode::Off;
        line(match self.hit_pct() {
            _ if off => format!(
                "  cache:        off (--cache-entries 0): {} hits, {} misses",
                self.hits, self.misses
            ),
            Some(p) => format!(
                "  cache:        {p:.0}% hits ({} of {} OK calls; scene frames repeat only while the arm pauses)",
                self.hits,
                self.hits + self.misses
            ),
            None => {
                "  cache:        no hit or miss in the answers (the server's cache is off)".into()
            }
        });
        let cores = |c: Option<f64>| c.map_or("-".to_string(), |c| format!("{c:.2}"));
        line(format!(
            "  cpu:          server {}, recorder {}, clients (this process) {} cores of {} (measured window)",
            cores(self.cpu[0]),
            cores(self.cpu[1]),
            cores(self.cpu[2]),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ));
        for (who, rss) in ["server", "recorder"].iter().zip(&self.rss) {
            line(match rss {
                Some(r) => format!(
                    "  {:<14}peak {} (VmHWM at the end of the load), sampled max {:.1} MiB",
                    format!("{who} RSS:"),
                    r.hwm_kib.map_or("unknown".into(), |k| format!(
                        "{:.1} MiB",
                        k as f64 / 1024.0
                    )),
                    r.sampled_max_kib as f64 / 1024.0
                ),
                None => format!(
                    "  {:<14}skipped (give --{who}-pid with --target)",
                    format!("{who} RSS:")
                ),
            });
        }
        if let Some(b) = self.trace_bytes {
            let images = match &args.target {
                Some(_) => String::new(),
                None => format!(", images {}", args.record_images.as_str()),
            };
            line(format!(
                "  trace:        {:.1} KB on disk ({:.2} KB per answered call{images})",
                b as f64 / 1024.0,
                b as f64
                    / 1024.0
                    / (self.ok_all + self.server_errors_all.values().sum::<u64>()).max(1) as f64,
            ));
        }
        match &self.books {
            BookOutcome::Pass { line: l, notes } => {
                line(format!("  {l}"));
                for n in notes {
                    line(format!("         {n}"));
                }
            }
            BookOutcome::Fail(why) => line(format!("  books: FAIL ({why})")),
            BookOutcome::Skipped(why) => line(format!("  books: skipped ({why})")),
        }
        s.trim_end().to_string()
    }

    fn json(&self) -> serde_json::Value {
        let rss = |r: &Option<Rss>| {
            r.map(|r| {
                serde_json::json!({
                    "peak_kib": r.hwm_kib,
                    "sampled_max_kib": r.sampled_max_kib,
                })
            })
        };
        let (books, books_detail) = match &self.books {
            BookOutcome::Pass { line, notes } => ("pass", serde_json::json!([line, notes])),
            BookOutcome::Fail(why) => ("fail", serde_json::json!(why)),
            BookOutcome::Skipped(why) => ("skipped", serde_json::json!(why)),
        };
        let pct = |p: f64| {
            let v = self.latency.pct(p);
            v.is_finite().then_some(v)
        };
        serde_json::json!({
            "clients": self.clients,
            "interrupted": self.interrupted,
            "model_hash": self.info.model_hash,
            "mode": self.info.mode,
            "session_id": self.info.session_id,
            "measured_secs": self.measured_secs,
            "ok": self.ok_measured,
            "ok_including_warmup": self.ok_all,
            "throughput_per_s": self.throughput(),
            "latency_ms": {"p50": pct(50.0), "p99": pct(99.0), "p999": pct(99.9)},
            "errors": self.server_errors_measured,
            "errors_including_warmup": self.server_errors_all,
            "transport_errors": self.transport_errors,
            "cache": {"hits": self.hits, "misses": self.misses, "hit_pct": self.hit_pct()},
            "server_rss": rss(&self.rss[0]),
            "recorder_rss": rss(&self.rss[1]),
            "trace_bytes": self.trace_bytes,
            "cpu_cores": {"server": self.cpu[0], "recorder": self.cpu[1], "clients": self.cpu[2]},
            "books": books,
            "books_detail": books_detail,
        })
    }
}

fn table(results: &[RunResult]) -> String {
    let mut out = format!(
        "{:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>10} {:>6} {:>6} {:>9} {:>10} {:>12} {:>6}\n",
        "clients",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "OK",
        "RES_EXH",
        "other",
        "hit %",
        "srv cpu",
        "server MiB",
        "recorder MiB",
        "books"
    );
    let mib = |r: &Option<Rss>| r.map_or("-".to_string(), |r| format!("{:.1}", r.peak_mib()));
    for r in results {
        out.push_str(&format!(
            "{:>7} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>10} {:>6} {:>6} {:>9} {:>10} {:>12} {:>6}\n",
            r.clients,
            r.throughput(),
            r.latency.pct(50.0),
            r.latency.pct(99.0),
            r.latency.pct(99.9),
            r.ok_measured,
            r.busy(),
            r.other_errors(),
            r.hit_pct().map_or("-".into(), |p| format!("{p:.0}")),
            r.cpu[0].map_or("-".into(), |c| format!("{c:.2}")),
            mib(&r.rss[0]),
            mib(&r.rss[1]),
            match r.books {
                BookOutcome::Pass { .. } => "PASS",
                BookOutcome::Fail(_) => "FAIL",
                BookOutcome::Skipped(_) => "skip",
            }
        ));
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footer(reason: &str, total: u64, dropped: u64) -> Option<Footer> {
        Some(Footer {
            ended_at: String::new(),
            total_requests: total,
            dropped_requests: dropped,
            ended_reason: reason.into(),
            records_written: None,
        })
    }

    fn file(
        name: &str,
        first: u64,
        seqs: impl IntoIterator<Item = u64>,
        f: Option<Footer>,
    ) -> FileBooks {
        FileBooks {
            name: name.into(),
            first_seq: first,
            seqs: seqs.into_iter().collect(),
            footer: f,
            ..Default::default()
        }
    }

    #[test]
    fn one_clean_file_balances_with_its_drops() {
        // seqs 0..10, 3 and 7 dropped by the server's full queue.
        let seqs = (0..10).filter(|s| *s != 3 && *s != 7);
        let b = Books::check(&[file("a", 0, seqs, footer("shutdown", 10, 2))]);
        assert!(b.problems.is_empty(), "{:?}", b.problems);
        assert_eq!((b.written, b.dropped, b.lost, b.issued), (8, 2, 0, 10));
        assert!(b.balanced());
        assert_eq!(b.sum_text(), "written 8 + dropped 2 = answered 10");
    }

    #[test]
    fn a_record_missing_without_a_counted_drop_does_not_balance() {
        let seqs = (0..10).filter(|s| *s != 5);
        let b = Books::check(&[file("a", 0, seqs, footer("shutdown", 10, 0))]);
        assert!(!b.balanced());
        assert!(b.sum_text().contains('≠'));
    }

    #[test]
    fn rotation_and_a_reconnect_are_followed_across_files() {
        // Stream 1: 0..=4 rotated into 5..=9 (6 dropped), the connection broke after 9 was
        // written with 10 and 11 in flight; stream 2 starts at 12, ends at 20 issued.
        let files = [
            file("r1", 0, 0..5, footer("rotated", 5, 0)),
            file(
                "r2",
                5,
                (5..10).filter(|s| *s != 6),
                footer("client_lost", 5, 1),
            ),
            file("s2", 12, 12..20, footer("shutdown", 8, 0)),
        ];
        let b = Books::check(&files);
        assert!(b.problems.is_empty(), "{:?}", b.problems);
        assert_eq!((b.written, b.dropped, b.lost, b.issued), (17, 1, 2, 20));
        assert!(b.balanced());
        assert!(b.sum_text().contains("lost on reconnect 2"));
    }

    #[test]
    fn structural_damage_is_reported() {
        let b = Books::check(&[file("a", 0, [0, 1, 1], None)]);
        assert!(b.problems.iter().any(|p| p.contains("no footer")));
        assert!(b.problems.iter().any(|p| p.contains("written twice")));
        assert!(b.problems.iter().any(|p| p.contains("did not end cleanly")));
        let b = Books::check(&[file("a", 3, [3], footer("shutdown", 1, 0))]);
        assert!(b.problems.iter().any(|p| p.contains("starts at seq 3")));
        let b = Books::check(&[]);
        assert!(!b.problems.is_empty());
    }

    fn load(ok: &[(u64, bool)], errors: u64) -> Load {
        let mut t = Tally::default();
        for &(seq, rec) in ok {
            t.ok_all += 1;
            if rec {
                t.recorded.push(seq)
            } else {
                t.unrecorded.push(seq)
            }
        }
        if errors > 0 {
            t.server_errors_all.insert("RESOURCE_EXHAUSTED", errors);
        }
        Load {
            tally: t,
            measured_secs: 1.0,
            interrupted: false,
            cpu: [None; 3],
        }
    }

    #[test]
    fn client_counts_and_recorded_flags_are_cross_checked() {
        // 4 answered: OK 0, 1 (recorded), OK 2 (dropped), one refusal (seq 3, recorded).
        let files = vec![file("a", 0, [0, 1, 3], footer("shutdown", 4, 1))];
        let good = load(&[(0, true), (1, true), (2, false)], 1);
        let b = Books::check(&files);
        match book_outcome(Ok((b, files.clone())), &good, true, vec![]) {
            BookOutcome::Pass { line, .. } => {
                assert_eq!(line, "books: PASS (written 3 + dropped 1 = answered 4)")
            }
            other => panic!("{other:?}"),
        }
        // One answer the server never booked.
        let extra = load(&[(0, true), (1, true), (2, false), (4, true)], 1);
        let b = Books::check(&files);
        match book_outcome(Ok((b, files.clone())), &extra, true, vec![]) {
            BookOutcome::Fail(why) => {
                assert!(why.contains("issued 4 seqs but the clients got 5"), "{why}");
                assert!(
                    why.contains("recorded: true but their seq is in no trace"),
                    "{why}"
                );
            }
            other => panic!("{other:?}"),
        }
        // A seq the server said it did not record, found in the trace.
        let liar = load(&[(0, true), (1, false), (2, false)], 1);
        let b = Books::check(&files);
        match book_outcome(Ok((b, files.clone())), &liar, true, vec![]) {
            BookOutcome::Fail(why) => assert!(why.contains("recorded: false"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_stamped_frame_decodes_to_the_same_pixels_with_other_bytes() {
        let f = Frames::new();
        let a = stamp(&f.base[3], "robot 1 tick 3");
        let b = stamp(&f.base[3], "robot 2 tick 3");
        assert_ne!(a, b);
        let (x, y, z) = (
            image::load_from_memory(&f.base[3]).unwrap().to_rgb8(),
            image::load_from_memory(&a).unwrap().to_rgb8(),
            image::load_from_memory(&b).unwrap().to_rgb8(),
        );
        assert!(x == y && y == z);
        // A quarter of the ticks repeat the previous frame (the arm pauses).
        let repeats = f.repeat.iter().filter(|r| **r).count();
        assert_eq!(repeats, TICKS / 4, "{:?}", f.repeat);
    }

    #[test]
    fn a_zombie_counts_as_exited() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !exited(pid) {
            assert!(Instant::now() < deadline, "true never exited");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Not reaped yet: /proc still has it, as a zombie.
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        child.wait().unwrap();
        assert!(exited(pid));
        assert!(!exited(std::process::id()));
    }

    #[test]
    fn cpu_ticks_count_up_while_working() {
        let me = std::process::id();
        let before = cpu_ticks(me).unwrap();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(200) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        assert!(cpu_ticks(me).unwrap() > before);
        assert_eq!(cpu_ticks(u32::MAX), None);
    }

    #[test]
    fn proc_status_fields_are_read() {
        let me = std::process::id();
        assert!(proc_status_kib(me, "VmRSS").unwrap() > 0);
        assert!(proc_status_kib(me, "VmHWM").unwrap() >= proc_status_kib(me, "VmRSS").unwrap());
        assert_eq!(proc_status_kib(me, "NoSuchField"), None);
    }
}
