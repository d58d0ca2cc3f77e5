//! Recording benchmarks, side by side in one run:
//! - `reflex bench record`: Act latency with recording off / hash_only / full
//!   (a recorder daemon running in-process on a Unix socket), calls
//!   interleaved across servers so noise hits all alike; and the trace bytes
//!   per 1000 calls for every image mode, gzipped and plain.
//! - `reflex bench ingest`: records/s the recorder sustains through its real
//!   socket for 1 and 4 concurrent sessions.

use std::path::Path;
use std::time::{Duration, Instant};

use reflex_proto::images::ImageMode;
use reflex_proto::v1::{
    self as pb, policy_client::PolicyClient, record_event::Event, recorder_client::RecorderClient,
};
use reflex_server::serve::{ListenAddr, ServeArgs};
use tokio_util::sync::CancellationToken;

use crate::latency::{Summary, ms_since};
use crate::scene::{Scene, request};

#[derive(Debug, clap::Args)]
pub struct RecordBench {
    /// Act calls per server.
    #[arg(long, default_value_t = 1000)]
    pub calls: usize,
}

#[derive(Debug, clap::Args)]
pub struct IngestBench {
    /// Records per session.
    #[arg(long, default_value_t = 20_000)]
    pub records: usize,
}

struct Variant {
    name: &'static str,
    mode: Option<ImageMode>,
    gzip: bool,
}

const VARIANTS: [Variant; 7] = [
    Variant {
        name: "off",
        mode: None,
        gzip: true,
    },
    Variant {
        name: "hash_only",
        mode: Some(ImageMode::HashOnly),
        gzip: true,
    },
    Variant {
        name: "full",
        mode: Some(ImageMode::Full),
        gzip: true,
    },
    Variant {
        name: "none",
        mode: Some(ImageMode::None),
        gzip: true,
    },
    Variant {
        name: "hash_only plain",
        mode: Some(ImageMode::HashOnly),
        gzip: false,
    },
    Variant {
        name: "full plain",
        mode: Some(ImageMode::Full),
        gzip: false,
    },
    Variant {
        name: "none plain",
        mode: Some(ImageMode::None),
        gzip: false,
    },
];

async fn start_recorder(
    work: &Path,
    stop: &CancellationToken,
) -> anyhow::Result<(String, std::path::PathBuf)> {
    let dir = work.join("traces");
    let sock = work.join("recorder.sock");
    let listener = reflex_recorder::bind(&sock)?;
    let cfg = reflex_recorder::RecorderConfig::new(dir.clone());
    let token = stop.clone();
    tokio::spawn(async move {
        if let Err(e) = reflex_recorder::serve(listener, cfg, token).await {
            tracing::error!(error = %e, "bench recorder failed");
        }
    });
    Ok((format!("unix://{}", sock.display()), dir))
}

pub async fn record(args: RecordBench) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("reflex-bench-record-")
        .tempdir()?;
    let export = work.path().join("export");
    reflex_engine::export::write_reference_export(&export, 0)?;
    let rec_stop = CancellationToken::new();
    let (recorder_uri, trace_dir) = start_recorder(work.path(), &rec_stop).await?;

    let mut servers = vec![];
    for (i, v) in VARIANTS.iter().enumerate() {
        let sock = work.path().join(format!("policy{i}.sock"));
        let stop = CancellationToken::new();
        let mut sa = ServeArgs {
            workers: Some(1),
            ..ServeArgs::new(export.clone(), vec![ListenAddr::Unix(sock.clone())])
        };
        if let Some(mode) = v.mode {
            sa.recorder = Some(recorder_uri.clone());
            sa.record_images = mode;
            sa.record_no_gzip = !v.gzip;
        }
        let running = reflex_server::serve::start(sa, stop.clone()).await?;
        let client =
            PolicyClient::new(reflex_proto::connect(&format!("unix://{}", sock.display())).await?);
        let session = running.service.info().session_id.clone();
        servers.push((running, stop, client, session, Summary::default()));
    }
    // Give the uplinks a moment to open their sessions before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The demo's robot: moving frames with pauses, two cameras, fresh seeds.
    let scene = Scene::new();
    let reqs: Vec<pb::ActRequest> = (0..args.calls)
        .map(|i| request(&scene.tick(i), None))
        .collect();
    let warmup = 20;
    for (i, req) in reqs.iter().take(warmup).chain(reqs.iter()).enumerate() {
        for (_, _, client, _, lat) in servers.iter_mut() {
            let t = Instant::now();
            client.act(req.clone()).await?;
            if i >= warmup {
                lat.push(ms_since(t));
            }
        }
    }
    let mut sessions = vec![];
    for (running, stop, _, session, lat) in servers {
        stop.cancel();
        running.wait().await?;
        sessions.push((session, lat));
    }
    rec_stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let calls_recorded = (args.calls + warmup) as f64;
    let base = &sessions[0].1;
    println!(
        "reflex bench record: reference model, {} calls per server (+{warmup} warm-up), recorder daemon in-process",
        args.calls
    );
    println!(
        "{:<16} {:>9} {:>9} {:>10} {:>10} {:>14}",
        "recording", "p50 ms", "p99 ms", "p50 ratio", "p99 ratio", "MB/1000 calls"
    );
    for (v, (session, lat)) in VARIANTS.iter().zip(&sessions) {
        let size = std::fs::read_dir(&trace_dir)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(session.as_str()))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum::<u64>();
        let per_1000 = if v.mode.is_some() {
            format!("{:.2}", size as f64 / calls_recorded * 1000.0 / 1e6)
        } else {
            "-".into()
        };
        println!(
            "{:<16} {:>9.3} {:>9.3} {:>10.3} {:>10.3} {:>14}",
            v.name,
            lat.pct(50.0),
            lat.pct(99.0),
            lat.pct(50.0) / base.pct(50.0),
            lat.pct(99.0) / base.pct(99.0),
            per_1000
        );
    }
    println!(
        "seed's figures per 1000 calls (gzipped): full ≈ 40 MB, hash_only ≈ 0.9 MB, none ≈ 0.7 MB; plain: 45 / 2.8 / 2.1 MB"
    );
    Ok(())
}

pub async fn ingest(args: IngestBench) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("reflex-bench-ingest-")
        .tempdir()?;
    let export = work.path().join("export");
    reflex_engine::export::write_reference_export(&export, 0)?;
    // One real Act gives realistic actions and images.
    let policy = reflex_engine::policy::Policy::load(&export, &Default::default())?;
    let scene = Scene::new();
    let req = request(&scene.tick(5), Some(1));
    let input = reflex_server::service::to_input(&req, &policy.config().cameras)?;
    let out = policy.act(&input)?;
    let model_hash = policy.model_hash().to_string();

    println!(
        "reflex bench ingest: {} records per session through the recorder's Unix socket",
        args.records
    );
    println!(
        "{:<10} {:>9} {:>12} {:>10} {:>22}",
        "images", "sessions", "records/s", "MB/s in", "records per CPU-second"
    );
    for mode in [ImageMode::HashOnly, ImageMode::Full] {
        for sessions in [1usize, 4] {
            let stop = CancellationToken::new();
            let sub = work.path().join(format!("{}-{sessions}", mode.as_str()));
            std::fs::create_dir_all(&sub)?;
            let (uri, _) = start_recorder(&sub, &stop).await?;
            let record = pb::ActRecord {
                // As the server sends it: canonical images, bytes included (the recorder
                // redacts by the session's mode).
                request: Some(reflex_proto::images::canonical_request(
                    &req,
                    &policy.config().cameras,
                    &out.image_sha256,
                )),
                actions: out.actions.clone(),
                num_actions: 50,
                action_dim: 7,
                latency: Some(pb::Latency {
                    total_ms: 3.2,
                    decode_ms: 0.8,
                    prefix_ms: 1.9,
                    denoise_ms: 0.5,
                    ..Default::default()
                }),
                denoise: Some(pb::Denoise {
                    steps_used: 10,
                    steps_configured: 10,
                    adaptive: false,
                }),
                cache: "miss".into(),
                mode: "cpu".into(),
                noise_seed: 1,
                timestamp: reflex_proto::time::UtcTime::now().rfc3339_millis(),
                ..Default::default()
            };
            let bytes_per = prost::Message::encoded_len(&record) as f64;
            let cpu0 = cpu_seconds();
            let t = Instant::now();
            let mut tasks = vec![];
            for s in 0..sessions {
                let (uri, record, n, hash) = (
                    uri.clone(),
                    record.clone(),
                    args.records,
                    model_hash.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut c = RecorderClient::new(reflex_proto::connect(&uri).await?)
                        .max_encoding_message_size(64 << 20);
                    let start = pb::SessionStart {
                        session_id: format!("bench{s:011x}"),
                        model_hash: hash,
                        image_mode: mode.as_str().into(),
                        started_at: reflex_proto::time::UtcTime::now().rfc3339_millis(),
                        ..Default::default()
                    };
                    let events = std::iter::once(pb::RecordEvent {
                        event: Some(Event::Start(start)),
                    })
                    .chain((0..n as u64).map(move |seq| pb::RecordEvent {
                        event: Some(Event::Act(pb::ActRecord {
                            seq,
                            ..record.clone()
                        })),
                    }))
                    .chain(std::iter::once(pb::RecordEvent {
                        event: Some(Event::End(pb::SessionEnd {
                            reason: "shutdown".into(),
                            total_requests: n as u64,
                            ..Default::default()
                        })),
                    }));
                    let summary = c.record(tokio_stream::iter(events)).await?.into_inner();
                    anyhow::ensure!(
                        summary.records_written == n as u64,
                        "wrote {} of {n}",
                        summary.records_written
                    );
                    Ok::<_, anyhow::Error>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            let secs = t.elapsed().as_secs_f64();
            let cpu = cpu_seconds() - cpu0;
            let n = (sessions * args.records) as f64;
            // CPU of the whole process: the sending clients are included, so
            // this understates what the recorder alone does per core.
            println!(
                "{:<10} {:>9} {:>12.0} {:>10.1} {:>22.0}",
                mode.as_str(),
                sessions,
                n / secs,
                n * bytes_per / secs / 1e6,
                n / cpu
            );
            stop.cancel();
        }
    }
    Ok(())
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we hand it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
