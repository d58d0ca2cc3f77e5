//! The robots: one connection each, Act calls back to back with scene frames stamped per
//! call, and what each of them saw ([`Tally`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use reflex_proto::v1::{self as pb, policy_client::PolicyClient};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use super::LoadBench;
use super::watch::cpu_ticks;
use crate::latency::ms_since;
use crate::scene::{INSTRUCTION, Scene};

/// One precomputed scene cycle. Frames are stamped per call (see the module docs).
pub(super) struct Frames {
    base: Vec<Vec<u8>>,
    wrist: Vec<Vec<u8>>,
    state: Vec<Vec<f32>>,
    /// The camera sees exactly what it saw on the previous tick (the arm stands still).
    repeat: Vec<bool>,
}

/// Two scene cycles (the arm moves 24 ticks, then pauses 8).
pub(super) const TICKS: usize = 64;

impl Frames {
    pub(super) fn new() -> Frames {
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
pub(super) fn stamp(jpeg: &[u8], tag: &str) -> Vec<u8> {
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
pub(super) struct Tally {
    /// OK answers, warm-up included.
    pub(super) ok_all: u64,
    pub(super) ok_measured: u64,
    /// Round trips of the measured OK answers, ms.
    pub(super) latency: Vec<f64>,
    pub(super) hits: u64,
    pub(super) misses: u64,
    /// Statuses the server answered (they reached its handler and got a seq).
    pub(super) server_errors_all: BTreeMap<&'static str, u64>,
    pub(super) server_errors_measured: BTreeMap<&'static str, u64>,
    /// Failures that never reached a handler (connection errors): not in the books.
    pub(super) transport_errors: BTreeMap<&'static str, u64>,
    /// Seqs of OK answers that said recorded: true / false.
    pub(super) recorded: Vec<u64>,
    pub(super) unrecorded: Vec<u64>,
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
    pub(super) fn answered(&self) -> u64 {
        self.ok_all + self.server_errors_all.values().sum::<u64>()
    }
}

/// The measured load of one run.
pub(super) struct Load {
    pub(super) tally: Tally,
    pub(super) measured_secs: f64,
    pub(super) interrupted: bool,
    /// CPU cores used over the measured window by [server, recorder, this process (the
    /// clients)]; None where the pid is unknown. On a small machine the clients compete
    /// with the server, and this says by how much.
    pub(super) cpu: [Option<f64>; 3],
}

pub(super) async fn drive(
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
                let name = reflex_proto::errors::code_name(status.code());
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
                    // A server that says how long to wait (gRPC's retry pushback) is
                    // obeyed, as a client with a gRPC retry policy does; else the back-off.
                    status
                        .metadata()
                        .get("grpc-retry-pushback-ms")
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .map_or(backoff, Duration::from_millis)
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

pub(super) fn codes(m: &BTreeMap<&'static str, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
