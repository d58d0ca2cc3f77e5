//! `reflex bench telemetry`: Act latency with telemetry off, tracing at sample
//! ratio 1.0 and 0.01, and tracing plus Prometheus metrics, side by side in
//! one run. Tracing is set up once per process, so each variant is a real
//! `reflex serve` child of this binary on its own Unix socket, all exporting
//! to one in-process OTLP receiver; calls are interleaved round by round (the
//! starting variant rotates) so machine noise hits all alike. A process keeps
//! a speed of its own (where its buffers and threads land), so the run is
//! repeated in `--trials` with fresh processes and the samples pooled; the
//! per-trial p50 range shows that spread, and a second "off" server shows
//! the spread between two identical servers: the noise band the other rows
//! are read against. `--baseline-bin` adds a server from another build (e.g.
//! one without the feature) with the same flags as "off".

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use reflex_proto::v1::{self as pb, policy_client::PolicyClient};
use tokio_util::sync::CancellationToken;

use crate::latency::{Summary, ms_since};
use crate::scene::{Scene, request};

#[derive(Debug, clap::Args)]
pub struct TelemetryBench {
    /// Measured calls per server and trial (after the warm-up).
    #[arg(long, default_value_t = 300)]
    pub calls: usize,
    /// Rounds with fresh server processes; the samples are pooled.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub trials: u32,
    /// Warm-up calls per server, not measured.
    #[arg(long, default_value_t = 50)]
    pub warmup: usize,
    /// Another `reflex` binary to run with telemetry off as the baseline (a build without the feature).
    #[arg(long, value_name = "PATH")]
    pub baseline_bin: Option<PathBuf>,
}

struct Variant {
    name: String,
    bin: PathBuf,
    /// Extra `serve` flags; `{otlp}` is replaced by the receiver's address.
    flags: Vec<&'static str>,
}

pub async fn run(args: TelemetryBench) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("reflex-bench-telemetry-")
        .tempdir()?;
    let export = work.path().join("export");
    reflex_engine::export::write_reference_export(&export, 0)?;
    let (otlp, sink, sink_stop) = start_sink().await?;
    let me = std::env::current_exe()?;

    let mut variants = vec![];
    if let Some(bin) = &args.baseline_bin {
        variants.push(Variant {
            name: "baseline build".into(),
            bin: bin.clone(),
            flags: vec![],
        });
    }
    let v = |name: &str, flags: Vec<&'static str>| Variant {
        name: name.into(),
        bin: me.clone(),
        flags,
    };
    variants.extend([
        v("off", vec![]),
        v("off (2nd server)", vec![]),
        v(
            "trace 1.0",
            vec!["--otel-endpoint", "{otlp}", "--otel-sample", "1"],
        ),
        v(
            "trace 0.01",
            vec!["--otel-endpoint", "{otlp}", "--otel-sample", "0.01"],
        ),
        v(
            "trace 1.0 + prometheus",
            vec![
                "--otel-endpoint",
                "{otlp}",
                "--otel-sample",
                "1",
                "--metrics-listen",
                "127.0.0.1:0",
            ],
        ),
    ]);

    let scene = Scene::new();
    let reqs: Vec<pb::ActRequest> = (0..16)
        .map(|i| request(&scene.tick(i * 3), Some(i as u64)))
        .collect();
    let n = variants.len();
    let mut results = vec![Summary::default(); n];
    let mut trial_p50s: Vec<Vec<f64>> = vec![vec![]; n];
    for trial in 0..args.trials {
        let mut servers = vec![];
        for (i, v) in variants.iter().enumerate() {
            let sock = work.path().join(format!("t{trial}-s{i}.sock"));
            let child = spawn_server(
                &v.bin,
                &export,
                &sock,
                &v.flags,
                &otlp,
                &format!("bench-{i}"),
            )?;
            let client = PolicyClient::new(connect_when_up(&sock).await?);
            servers.push((child, client, Summary::default()));
        }
        for round in 0..args.warmup + args.calls {
            let req = &reqs[round % reqs.len()];
            for k in 0..n {
                let j = (round + k) % n;
                let (_, client, lat) = &mut servers[j];
                let t = Instant::now();
                client.act(req.clone()).await?;
                if round >= args.warmup {
                    let ms = ms_since(t);
                    lat.push(ms);
                    results[j].push(ms);
                }
            }
        }
        // SIGTERM: each server flushes its last spans before it exits.
        for (i, (mut child, _, lat)) in servers.into_iter().enumerate() {
            if let Some(pid) = child.id() {
                // SAFETY: a plain kill(2) on our own child's pid.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                child.kill().await?;
            }
            trial_p50s[i].push(lat.pct(50.0));
        }
    }
    sink_stop.cancel();

    let spans = sink.lock().map(|s| s.clone()).unwrap_or_default();
    let base = &results[variants.iter().position(|v| v.name == "off").unwrap_or(0)];
    println!(
        "reflex bench telemetry: reference model, {} trials × {} calls per server (+{} warm-up each), 1 worker, cache off, \
         Unix socket, OTLP receiver in-process",
        args.trials, args.calls, args.warmup
    );
    println!(
        "{:<24} {:>9} {:>9} {:>10} {:>10} {:>17} {:>14}",
        "telemetry",
        "p50 ms",
        "p99 ms",
        "p50 ratio",
        "p99 ratio",
        "trial p50 range",
        "spans exported"
    );
    for (i, (v, lat)) in variants.iter().zip(&results).enumerate() {
        let exported = spans
            .iter()
            .find(|(s, _)| *s == format!("bench-{i}"))
            .map(|(_, n)| *n)
            .unwrap_or(0);
        let (lo, hi) = trial_p50s[i]
            .iter()
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), &p| {
                (lo.min(p), hi.max(p))
            });
        println!(
            "{:<24} {:>9.3} {:>9.3} {:>10.3} {:>10.3} {:>17} {:>14}",
            v.name,
            lat.pct(50.0),
            lat.pct(99.0),
            lat.pct(50.0) / base.pct(50.0),
            lat.pct(99.0) / base.pct(99.0),
            format!("{lo:.3}–{hi:.3}"),
            exported
        );
    }
    println!(
        "{} Act calls per server in all; a sampled call exports 6 spans (act + queue, decode, prefix, denoise, postprocess)",
        (args.calls + args.warmup) * args.trials as usize
    );
    Ok(())
}

fn spawn_server(
    bin: &Path,
    export: &Path,
    sock: &Path,
    flags: &[&str],
    otlp: &str,
    service: &str,
) -> anyhow::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("serve")
        .arg(export)
        .arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .args(["--workers", "1", "--cache-entries", "0"])
        .args(flags.iter().map(|f| if *f == "{otlp}" { otlp } else { f }))
        .env("RUST_LOG", "warn")
        .env("OTEL_SERVICE_NAME", service)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    Ok(cmd.spawn()?)
}

/// Connects once the server answers GetModelInfo (it loads the model first).
async fn connect_when_up(sock: &Path) -> anyhow::Result<tonic::transport::Channel> {
    let target = format!("unix://{}", sock.display());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ch) = reflex_proto::connect(&target).await
            && PolicyClient::new(ch.clone())
                .get_model_info(pb::GetModelInfoRequest {})
                .await
                .is_ok()
        {
            return Ok(ch);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the server on {target} did not come up in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Spans received per `service.name`.
type Received = Arc<Mutex<Vec<(String, usize)>>>;

/// An OTLP/gRPC receiver that counts spans by service and accepts metrics.
#[derive(Clone, Default)]
struct Sink(Received);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if let Ok(mut seen) = self.0.lock() {
            for rs in req.into_inner().resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(s) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                let n: usize = rs.scope_spans.iter().map(|s| s.spans.len()).sum();
                match seen.iter_mut().find(|(s, _)| *s == service) {
                    Some((_, c)) => *c += n,
                    None => seen.push((service, n)),
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        _req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_sink() -> anyhow::Result<(String, Received, CancellationToken)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let sink = Sink::default();
    let stop = CancellationToken::new();
    let router = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink.clone()))
        .add_service(MetricsServiceServer::new(sink.clone()));
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let token = stop.clone();
    tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "bench OTLP receiver failed");
        }
    });
    Ok((endpoint, sink.0, stop))
}
