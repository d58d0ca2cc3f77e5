//! `reflex bench fleet`: a synthetic fleet's traces, written by the real recorder (in
//! process, through its socket, one recorder per robot folder `robot=<ID>/`), then `reflex
//! fleet index` and every built-in `reflex fleet query` report run as child processes of
//! this binary: wall time, CPU time and peak RSS of each (wait4's rusage).
//!
//! The traffic: `--robots` robots × `--sessions` sessions × `--records` Acts, one camera
//! recorded in full (a real JPEG, as robots record), sessions spread over 7 days, two
//! models (every robot switches from A to B halfway through its sessions and replays the
//! same episodes, so the drift report has pairs), one call in 50 a recorded error, cache
//! hits and misses, latencies that vary per robot.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use reflex_proto::v1::{self as pb, record_event::Event, recorder_client::RecorderClient};
use tokio_util::sync::CancellationToken;

use crate::scene::{Scene, request};

#[derive(Debug, clap::Args)]
pub struct FleetBench {
    /// Robots (one recorder folder each).
    #[arg(long, default_value_t = 200)]
    pub robots: usize,
    /// Sessions (trace files) per robot.
    #[arg(long, default_value_t = 50)]
    pub sessions: usize,
    /// Acts per session.
    #[arg(long, default_value_t = 40)]
    pub records: usize,
    /// Work folder (kept); default a temporary one, removed at the end.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Use the traces already in --dir (skip writing them).
    #[arg(long, requires = "dir")]
    pub reuse: bool,
}

pub async fn run(args: FleetBench) -> anyhow::Result<()> {
    let tmp;
    let work = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("reflex-bench-fleet-")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let traces = work.join("traces");
    let dataset = work.join("dataset");
    if !args.reuse {
        let t = Instant::now();
        write_traces(&args, &traces).await?;
        let bytes = du(&traces);
        println!(
            "wrote {} robots × {} sessions × {} Acts through the real recorder: {:.2} GB of traces in {:.0} s",
            args.robots,
            args.sessions,
            args.records,
            bytes as f64 / 1e9,
            t.elapsed().as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&dataset);
    let exe = std::env::current_exe()?;
    let trace_bytes = du(&traces);
    println!(
        "reflex bench fleet: {:.2} GB of traces in {}",
        trace_bytes as f64 / 1e9,
        traces.display()
    );
    println!(
        "{:<34} {:>9} {:>9} {:>12} {:>10}",
        "step", "wall s", "CPU s", "peak RSS MB", "MB/s in"
    );
    let index = |label: &str| -> anyhow::Result<()> {
        let m = measure(
            Command::new(&exe)
                .args(["fleet", "index"])
                .arg(&traces)
                .arg("--to")
                .arg(&dataset),
        )?;
        println!(
            "{:<34} {:>9.1} {:>9.1} {:>12.0} {:>10.1}",
            label,
            m.wall,
            m.cpu,
            m.max_rss_mb,
            trace_bytes as f64 / 1e6 / m.wall
        );
        println!("  {}", m.stdout.trim());
        Ok(())
    };
    index("fleet index (all new)")?;
    index("fleet index (again: nothing new)")?;
    let models = model_pair(&exe, &dataset)?;
    for report in ["summary", "latency", "cache", "errors", "drift"] {
        let mut cmd = Command::new(&exe);
        cmd.args(["fleet", "query"])
            .arg(&dataset)
            .args(["--report", report, "--format", "csv"]);
        if report == "drift" {
            cmd.args(["--models", &models]);
        }
        let m = measure(&mut cmd)?;
        println!(
            "{:<34} {:>9.2} {:>9.2} {:>12.0} {:>10}  ({} rows)",
            format!("fleet query --report {report}"),
            m.wall,
            m.cpu,
            m.max_rss_mb,
            "",
            m.stdout.lines().count().saturating_sub(1)
        );
    }
    println!("dataset: {:.1} MB of Parquet", du(&dataset) as f64 / 1e6);
    Ok(())
}

/// The two model hashes of the dataset, most Acts first: "A,B".
fn model_pair(exe: &Path, dataset: &Path) -> anyhow::Result<String> {
    let out = Command::new(exe)
        .args(["fleet", "query"])
        .arg(dataset)
        .args([
            "--format",
            "csv",
            "--sql",
            "SELECT model_hash FROM acts GROUP BY model_hash ORDER BY min(timestamp) LIMIT 2",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let hashes: Vec<&str> = text.lines().skip(1).collect();
    anyhow::ensure!(hashes.len() == 2, "expected two models, got {hashes:?}");
    Ok(hashes.join(","))
}

struct Measured {
    wall: f64,
    cpu: f64,
    max_rss_mb: f64,
    stdout: String,
}

/// Runs `cmd` to completion: wall time, user+system CPU and peak RSS of the child.
fn measure(cmd: &mut Command) -> anyhow::Result<Measured> {
    use std::io::Read;
    let t = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout)?;
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr)?;
    let mut status = 0;
    // SAFETY: wait4 writes only the status and the rusage we hand it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    anyhow::ensure!(r == pid, "wait4 failed");
    let wall = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed:\n{stderr}"
    );
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Measured {
        wall,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        max_rss_mb: ru.ru_maxrss as f64 / 1024.0,
        stdout,
    })
}

fn du(dir: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => n += e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => {}
            }
        }
    }
    n
}

/// Every robot's sessions through its own in-process recorder (two robots at a time).
async fn write_traces(args: &FleetBench, traces: &Path) -> anyhow::Result<()> {
    let scene = Scene::new();
    // Real JPEGs of the synthetic scene, a few frames to cycle through.
    let frames: Vec<pb::ActRequest> = (0..8).map(|i| request(&scene.tick(i), None)).collect();
    let frames = std::sync::Arc::new(frames);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(2));
    let mut tasks = Vec::new();
    for r in 0..args.robots {
        let permit = sem.clone().acquire_owned().await?;
        let dir = traces.join(format!("robot=r{r:03}"));
        let frames = frames.clone();
        let (sessions, records) = (args.sessions, args.records);
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            robot(r, &dir, sessions, records, &frames).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn robot(
    r: usize,
    dir: &Path,
    sessions: usize,
    records: usize,
    frames: &[pb::ActRequest],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let sock = dir.with_extension("sock");
    let stop = CancellationToken::new();
    let listener = reflex_recorder::bind(&sock)?;
    let cfg = reflex_recorder::RecorderConfig::new(dir.to_path_buf());
    let token = stop.clone();
    let server = tokio::spawn(async move { reflex_recorder::serve(listener, cfg, token).await });
    let uri = format!("unix://{}", sock.display());
    let mut c =
        RecorderClient::new(reflex_proto::connect(&uri).await?).max_encoding_message_size(64 << 20);
    for s in 0..sessions {
        // The first half on model A, the second on B, replaying the same episodes.
        let (model, half) = if s < sessions / 2 {
            ("a0a0a0a0a0a0a0a0", s)
        } else {
            ("b1b1b1b1b1b1b1b1", s - sessions / 2)
        };
        let day = 20 + (s * 7 / sessions.max(1));
        let start = pb::SessionStart {
            session_id: format!("r{r:03}s{s:03}"),
            model_hash: model.into(),
            image_mode: "full".into(),
            embodiment: "franka".into(),
            mode: "cpu".into(),
            started_at: format!("2026-11-{day:02}T{:02}:00:00.000Z", s % 24),
            ..Default::default()
        };
        let acts: Vec<pb::RecordEvent> = (0..records)
            .map(|i| {
                let seq = i as u64;
                let k = (r * 7919 + half * 104_729 + i * 31) as u64;
                let mut req = frames[i % frames.len()].clone();
                req.episode_id = format!("ep-r{r:03}-{half:03}-{}", i / 10);
                let failed = k % 50 == 7;
                let base =
                    2.0 + (r % 10) as f64 * 0.1 + if model.starts_with('b') { 0.5 } else { 0.0 };
                let jitter = (k % 97) as f64 / 97.0;
                let actions: Vec<f32> = (0..350)
                    .map(|j| {
                        let x = ((k + j as u64 * 2_654_435_761) % 10_007) as f32 / 10_007.0;
                        x + if model.starts_with('b') { 0.01 } else { 0.0 }
                    })
                    .collect();
                pb::RecordEvent {
                    event: Some(Event::Act(pb::ActRecord {
                        seq,
                        chunk_id: (i % 10) as u64,
                        timestamp: format!(
                            "2026-11-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
                            s % 24,
                            (i / 60) % 60,
                            i % 60,
                            (k % 1000)
                        ),
                        request: Some(req),
                        actions: if failed { vec![] } else { actions },
                        num_actions: if failed { 0 } else { 50 },
                        action_dim: if failed { 0 } else { 7 },
                        latency: Some(pb::Latency {
                            total_ms: base + jitter * 3.0,
                            queue_ms: jitter * 0.5,
                            decode_ms: 0.6 + jitter * 0.2,
                            prefix_ms: if i % 10 == 0 { 1.5 } else { 0.0 },
                            denoise_ms: base - 1.0 + jitter,
                            postprocess_ms: 0.05,
                        }),
                        denoise: (!failed).then_some(pb::Denoise {
                            steps_used: 10,
                            steps_configured: 10,
                            adaptive: false,
                        }),
                        cache: if failed {
                            String::new()
                        } else if i % 10 == 0 {
                            "miss".into()
                        } else {
                            "hit".into()
                        },
                        mode: "cpu".into(),
                        noise_seed: k,
                        error: failed.then(|| pb::ActError {
                            code: "invalid-argument".into(),
                            message: "state has 3 values, expected 8".into(),
                        }),
                    })),
                }
            })
            .collect();
        let events = std::iter::once(pb::RecordEvent {
            event: Some(Event::Start(start)),
        })
        .chain(acts)
        .chain(std::iter::once(pb::RecordEvent {
            event: Some(Event::End(pb::SessionEnd {
                reason: "shutdown".into(),
                total_requests: records as u64,
                ..Default::default()
            })),
        }));
        let summary = c.record(tokio_stream::iter(events)).await?.into_inner();
        anyhow::ensure!(
            summary.records_written == records as u64,
            "robot {r} session {s}: wrote {} of {records}",
            summary.records_written
        );
    }
    drop(c);
    stop.cancel();
    server.await??;
    let _ = std::fs::remove_file(&sock);
    Ok(())
}
