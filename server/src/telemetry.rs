//! Observability for operators: OpenTelemetry traces and metrics over
//! OTLP/gRPC, a Prometheus text endpoint, and the W3C trace-context hand-over
//! between callers, this server and `reflex replay`.
//!
//! # Design
//! **Off by default, free when off.** Nothing here is built unless an OTLP
//! endpoint (`--otel-endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`) or
//! `--metrics-listen` is given. The Act path holds an [`ActTelemetry`] of two
//! `Option`s: with both `None` a call creates no span, formats no attribute and
//! touches no instrument (the `tracing` macros are not even reached).
//!
//! **Traces** go through `tracing` and `tracing-opentelemetry`. The subscriber
//! is built once in `main`, before any flag is acted on, so it carries an
//! empty slot ([`layer`]) that [`Telemetry::start`] fills with the OTel layer.
//! A `reload` layer was the rejected alternative: it hides the layer from
//! `downcast`, which `OpenTelemetrySpanExt` (set a parent, read the context)
//! relies on. The slot is filled at most once per process. Spans for OTel use
//! the target [`SPAN_TARGET`]; the log output leaves that target out, so the
//! terminal does not repeat every attribute on every line.
//!
//! One `act` span per call ([`ActTelemetry::act_span`]) with the `gen_ai.*`
//! and `reflex.*` attributes of the spec; the stages the policy timed on its
//! worker thread (`queue`, `decode` or `cache_hit`, `prefix`, `denoise`,
//! `postprocess`) become child spans with their measured start and end, built
//! straight on the SDK tracer after the call (a `tracing` span cannot be
//! back-dated), and only for sampled traces. `reflex.record.seq` is the seq the
//! recording hand-off assigned, so one call can be found by seq in the trace
//! file and in the tracing backend. Failures carry `error.type` (the
//! [`ServiceError::slug`]) and an error status. An incoming `traceparent`
//! (gRPC metadata) makes the `act` span a child of the caller's span; sampling
//! is parent-based, so the caller's decision holds.
//!
//! **Metrics** are OpenTelemetry instruments with up to two readers: a
//! periodic OTLP exporter (with an endpoint) and the Prometheus exporter (with
//! `--metrics-listen`), scraped at `GET /metrics` on a small hyper endpoint.
//! Per call: the latency histogram and a request counter by status, and
//! atomics for cache hits and misses and for calls waiting for a worker. Read
//! at collection time: the cache hit ratio, the inference queue depth, the
//! recording hand-off's counters (queued, delivered, dropped; telemetry
//! reads the hand-off's atomics, [`Counters`], and knows nothing of the
//! service) and, when recording, the recorder's own `Recorder/Status` (bytes
//! written, records, drops, the disk-degraded flag) — the shared daemon's
//! (`--recorder`) or the private child's (`--record DIR` alone) — polled every
//! few seconds off the Act path.
//!
//! **Configuration** ([`TelemetryConfig::resolve`]): flags (and their
//! `REFLEX_*` variables) win over the standard `OTEL_*` variables:
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME` (default `reflex`),
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, `OTEL_SDK_DISABLED`,
//! `OTEL_TRACES_EXPORTER=none`; the SDK itself reads the `OTEL_BSP_*`,
//! `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_EXPORTER_OTLP_HEADERS` and
//! `OTEL_RESOURCE_ATTRIBUTES` ones. The exporter speaks OTLP over gRPC through
//! the workspace's tonic, without TLS: point it at a local collector.

use std::any::TypeId;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, Status as OtelStatus, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use reflex_proto::v1 as pb;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{Filtered, Targets};
use tracing_subscriber::registry::Registry;

use reflex_engine::policy::{ActOutput, CacheStatus};

use crate::error::ServiceError;
use crate::recording::Counters;

/// The `tracing` target of every span meant for OpenTelemetry.
pub const SPAN_TARGET: &str = "reflex::otel";

/// How often a shared recorder's `Status` is read for the metrics.
const RECORDER_POLL: Duration = Duration::from_secs(5);

/// Upper bounds of the Act latency histogram, in seconds (1 ms … 10 s).
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 10.0,
];

/// Concurrent scrapes served; more are closed at once (Prometheus scrapes one at a time).
const MAX_SCRAPE_CONNECTIONS: usize = 16;

// ---------------------------------------------------------------------------
// Configuration

/// What telemetry a process runs, resolved from flags and the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector for traces and metrics; `None`: no OTLP at all.
    pub endpoint: Option<String>,
    /// Fraction of new traces sampled (a caller's `traceparent` decides for its own).
    pub sample: f64,
    /// Where the Prometheus endpoint listens; `None`: no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// `service.name` of the resource.
    pub service_name: String,
}

impl TelemetryConfig {
    /// Everything off.
    pub fn off() -> Self {
        TelemetryConfig {
            endpoint: None,
            sample: 1.0,
            metrics_listen: None,
            service_name: "reflex".into(),
        }
    }

    /// Flags first (clap has already folded in their `REFLEX_*` variables),
    /// then the standard `OTEL_*` variables, read through `env`.
    pub fn resolve(
        endpoint: Option<&str>,
        sample: Option<f64>,
        metrics_listen: Option<SocketAddr>,
        default_service: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let set = |k: &str| {
            env(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let sdk_disabled = set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let traces_none =
            set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
        let endpoint = match endpoint.map(str::trim).filter(|e| !e.is_empty()) {
            Some(e) => Some(e.to_string()),
            None if sdk_disabled || traces_none => None,
            None => set("OTEL_EXPORTER_OTLP_ENDPOINT"),
        };
        let sample = sample.unwrap_or_else(|| {
            sample_from_env(set("OTEL_TRACES_SAMPLER"), set("OTEL_TRACES_SAMPLER_ARG"))
        });
        // OTEL_SERVICE_NAME, then a `service.name` in OTEL_RESOURCE_ATTRIBUTES, then ours.
        let service_name = set("OTEL_SERVICE_NAME")
            .or_else(|| {
                let attrs = set("OTEL_RESOURCE_ATTRIBUTES")?;
                attrs.split(',').find_map(|kv| {
                    Some(kv.split_once('=')?)
                        .filter(|(k, _)| k.trim() == "service.name")
                        .map(|(_, v)| v.trim().to_string())
                })
            })
            .unwrap_or_else(|| default_service.to_string());
        TelemetryConfig {
            endpoint,
            sample,
            metrics_listen,
            service_name,
        }
    }

    /// The standard variables only (for `reflex replay`, which has no flags for this).
    pub fn from_env(default_service: &str) -> Self {
        Self::resolve(None, None, None, default_service, |k| std::env::var(k).ok())
    }

    pub fn tracing(&self) -> bool {
        self.endpoint.is_some()
    }

    pub fn metrics(&self) -> bool {
        self.endpoint.is_some() || self.metrics_listen.is_some()
    }
}

/// `OTEL_TRACES_SAMPLER[_ARG]` as a ratio. Sampling here is always
/// parent-based, so `traceidratio` and `parentbased_traceidratio` read alike.
fn sample_from_env(sampler: Option<String>, arg: Option<String>) -> f64 {
    let ratio = || match arg.as_deref().map(str::parse::<f64>) {
        None => 1.0,
        Some(Ok(r)) if (0.0..=1.0).contains(&r) => r,
        Some(_) => {
            tracing::warn!(
                value = arg.as_deref().unwrap_or(""),
                "OTEL_TRACES_SAMPLER_ARG is not a ratio in 0..=1; sampling every trace"
            );
            1.0
        }
    };
    match sampler.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None | Some("traceidratio" | "parentbased_traceidratio") => ratio(),
        Some("always_on" | "parentbased_always_on") => 1.0,
        Some("always_off" | "parentbased_always_off") => 0.0,
        Some(other) => {
            tracing::warn!(
                sampler = other,
                "OTEL_TRACES_SAMPLER not supported here; sampling every trace"
            );
            1.0
        }
    }
}

/// clap parser for `--otel-sample`.
pub fn parse_sample(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "{s:?} is not a sampling ratio: give a number from 0 to 1 (1 = every call, 0.01 = one in a hundred)"
        )),
    }
}

/// clap parser for `--otel-endpoint`.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URI: {e}"))?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some() => Ok(s.to_string()),
        Some("https") => Err(format!(
            "{s:?}: this build exports OTLP without TLS; send to a local collector over http:// and let it forward"
        )),
        _ => Err(format!(
            "{s:?}: give the collector's OTLP/gRPC address as http://HOST:PORT (usually port 4317)"
        )),
    }
}

// ---------------------------------------------------------------------------
// The subscriber's slot for the OpenTelemetry layer

type OtelLayer = OpenTelemetryLayer<Registry, SdkTracer>;

// Filled at most once per process, by the first `Telemetry::start` that traces.
static OTEL_LAYER: OnceLock<OtelLayer> = OnceLock::new();
static SLOT_INSTALLED: AtomicBool = AtomicBool::new(false);

/// The layer `main` puts first on the registry: empty until tracing starts,
/// then the OpenTelemetry layer. It sees the `reflex*` targets at INFO and
/// above, whatever `RUST_LOG` says (that filters the log output only).
pub fn layer() -> Filtered<OtelSlot, Targets, Registry> {
    SLOT_INSTALLED.store(true, Ordering::Relaxed);
    OtelSlot(()).with_filter(Targets::new().with_target("reflex", tracing::Level::INFO))
}

/// `filter` with the OpenTelemetry spans left out of the log output.
pub fn without_spans(filter: tracing_subscriber::EnvFilter) -> tracing_subscriber::EnvFilter {
    // Cannot fail: a target name and a level.
    filter.add_directive(
        format!("{SPAN_TARGET}=off")
            .parse()
            .expect("a valid directive"),
    )
}

/// See [`layer`].
pub struct OtelSlot(());

macro_rules! forward {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        fn $name(&self, $($arg: $ty),*, ctx: tracing_subscriber::layer::Context<'_, Registry>) {
            if let Some(l) = OTEL_LAYER.get() {
                l.$name($($arg),*, ctx);
            }
        }
    )*};
}

impl Layer<Registry> for OtelSlot {
    forward! {
        on_new_span(attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id);
        on_record(id: &tracing::span::Id, values: &tracing::span::Record<'_>);
        on_follows_from(id: &tracing::span::Id, follows: &tracing::span::Id);
        on_event(event: &tracing::Event<'_>);
        on_enter(id: &tracing::span::Id);
        on_exit(id: &tracing::span::Id);
        on_close(id: tracing::span::Id);
        on_id_change(old: &tracing::span::Id, new: &tracing::span::Id);
    }

    // SAFETY: the pointer comes from the inner layer, which lives in a static
    // `OnceLock` that is never reset, so it is valid for as long as `self` is.
    unsafe fn downcast_raw(&self, id: TypeId) -> Option<*const ()> {
        if id == TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        // SAFETY: forwarded under the inner layer's own contract.
        unsafe { OTEL_LAYER.get()?.downcast_raw(id) }
    }
}

// ---------------------------------------------------------------------------
// The running pipeline

/// The process's one tracer, and what it was built for.
struct ProcessTracer {
    tracer: SdkTracer,
    endpoint: String,
    sample: f64,
}

static PROCESS_TRACER: OnceLock<ProcessTracer> = OnceLock::new();

/// The tracer the slot's layer uses, built by the first caller (which gets
/// the provider, to shut it down) and shared with later ones: `reflex replay`
/// traces its calls and may run a server in the same process.
fn process_tracer(
    cfg: &TelemetryConfig,
    endpoint: &str,
    resource: &Resource,
) -> anyhow::Result<(SdkTracer, Option<SdkTracerProvider>)> {
    // Held while building, so two starts cannot both build a pipeline.
    static BUILDING: Mutex<()> = Mutex::new(());
    let _building = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = PROCESS_TRACER.get() {
        if p.endpoint != endpoint || p.sample != cfg.sample {
            tracing::warn!(endpoint = %p.endpoint, sample = p.sample, "tracing was already started in this process; its endpoint and sampling stay");
        }
        return Ok((p.tracer.clone(), None));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| format!("cannot set up the OTLP trace exporter for {endpoint}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sample,
        ))))
        .with_resource(resource.clone())
        .build();
    let tracer = provider.tracer("reflex");
    if !SLOT_INSTALLED.load(Ordering::Relaxed) {
        tracing::warn!("the log subscriber has no OpenTelemetry slot; spans will not be exported");
    }
    // Only the attributes we set: no thread, target, source location or
    // busy/idle timings (the last costs two clock reads per poll).
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer.clone())
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false);
    // Cannot be set already: both statics are set only here, under the lock.
    let _ = OTEL_LAYER.set(layer);
    let _ = PROCESS_TRACER.set(ProcessTracer {
        tracer: tracer.clone(),
        endpoint: endpoint.to_string(),
        sample: cfg.sample,
    });
    tracing::info!(endpoint, sample = cfg.sample, service = %cfg.service_name, "tracing to OTLP");
    Ok((tracer, Some(provider)))
}

/// The telemetry of one process: providers, the scrape endpoint, the
/// recorder poll. Dropping it without [`Telemetry::shutdown`] loses what the
/// exporters have not sent yet.
pub struct Telemetry {
    act: ActTelemetry,
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
    meter: Option<Meter>,
    /// The bound address of the Prometheus endpoint (port 0 resolved).
    pub metrics_addr: Option<SocketAddr>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Telemetry {
    pub fn off() -> Self {
        Telemetry {
            act: ActTelemetry::default(),
            tracer_provider: None,
            meter_provider: None,
            meter: None,
            metrics_addr: None,
            stop: CancellationToken::new(),
            tasks: JoinSet::new(),
        }
    }

    /// Builds what `cfg` asks for. Needs the tokio runtime (the exporter's
    /// channel and the endpoint run on it); fails on an endpoint that does not
    /// parse or a metrics address that cannot be bound.
    pub async fn start(cfg: &TelemetryConfig) -> anyhow::Result<Self> {
        let mut t = Telemetry::off();
        // Tracing implies metrics (over the same OTLP endpoint).
        if !cfg.metrics() {
            return Ok(t);
        }
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .build();
        if let Some(endpoint) = &cfg.endpoint {
            let (tracer, provider) = process_tracer(cfg, endpoint, &resource)?;
            t.act.tracer = Some(tracer);
            t.tracer_provider = provider;
        }
        if cfg.metrics() {
            let mut builder = SdkMeterProvider::builder().with_resource(resource);
            let mut registry = None;
            if let Some(endpoint) = &cfg.endpoint {
                let exporter = opentelemetry_otlp::MetricExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .build()
                    .with_context(|| {
                        format!("cannot set up the OTLP metric exporter for {endpoint}")
                    })?;
                builder = builder.with_reader(PeriodicReader::builder(exporter).build());
            }
            if cfg.metrics_listen.is_some() {
                let r = prometheus::Registry::new();
                let exporter = opentelemetry_prometheus::exporter()
                    .with_registry(r.clone())
                    .scope_info_enabled(false)
                    .build()
                    .context("cannot set up the Prometheus exporter")?;
                builder = builder.with_reader(exporter);
                registry = Some(r);
            }
            let provider = builder.build();
            let meter = provider.meter("reflex");
            t.act.metrics = Some(Arc::new(ActMetrics::new(&meter)));
            if let (Some(addr), Some(registry)) = (cfg.metrics_listen, registry) {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr}"))?;
                let bound = listener.local_addr()?;
                t.tasks
                    .spawn(serve_metrics(listener, registry, t.stop.clone()));
                t.metrics_addr = Some(bound);
                tracing::info!(metrics = %format!("http://{bound}/metrics"), "serving Prometheus metrics");
            }
            t.meter = Some(meter);
            t.meter_provider = Some(provider);
        }
        Ok(t)
    }

    /// Tracing only, configured by the standard `OTEL_*` variables (for
    /// `reflex replay`); off, with a warning, if the pipeline cannot be built.
    pub async fn tracing_from_env(service_name: &str) -> Self {
        let cfg = TelemetryConfig::from_env(service_name);
        let mut t = Telemetry::off();
        let Some(endpoint) = &cfg.endpoint else {
            return t;
        };
        // No metrics: a replay has no instruments worth a reader.
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .build();
        match process_tracer(&cfg, endpoint, &resource) {
            Ok((tracer, provider)) => {
                t.act.tracer = Some(tracer);
                t.tracer_provider = provider;
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "tracing is off"),
        }
        t
    }

    /// The hook `reflex replay` traces its calls through; `None` when tracing is off.
    pub fn call_tracer(&self) -> Option<Arc<dyn reflex_proto::CallTracer>> {
        self.act
            .tracer
            .is_some()
            .then(|| Arc::new(ReplayTracer) as Arc<dyn reflex_proto::CallTracer>)
    }

    /// What the Act path needs (cheap to clone).
    pub fn act(&self) -> ActTelemetry {
        self.act.clone()
    }

    /// Registers the instruments read at collection time: the Act path's
    /// queue and cache ratio, the recording hand-off's `counters` (when
    /// recording is on), and, with `recorder` (a shared daemon's URI), that
    /// daemon's status, polled in the background.
    pub fn observe(&mut self, counters: Option<Arc<Counters>>, recorder: Option<String>) {
        let (Some(meter), Some(m)) = (&self.meter, &self.act.metrics) else {
            return;
        };
        let m2 = m.clone();
        meter
            .i64_observable_gauge("reflex.act.queue.depth")
            .with_description("Act calls waiting for an inference worker")
            .with_callback(move |o| o.observe(m2.waiting.load(Ordering::Relaxed), &[]))
            .build();
        let m2 = m.clone();
        meter
            .u64_observable_counter("reflex.cache.lookups")
            .with_description("Prefix cache lookups by result")
            .with_callback(move |o| {
                o.observe(
                    m2.cache_hits.load(Ordering::Relaxed),
                    &[KeyValue::new("result", "hit")],
                );
                o.observe(
                    m2.cache_misses.load(Ordering::Relaxed),
                    &[KeyValue::new("result", "miss")],
                );
            })
            .build();
        let m2 = m.clone();
        meter
            .f64_observable_gauge("reflex.cache.hit_ratio")
            .with_description(
                "Prefix cache hits / lookups since the server started (0 before the first lookup)",
            )
            .with_callback(move |o| o.observe(m2.hit_ratio(), &[]))
            .build();
        if let Some(counters) = counters {
            type Read = fn(&Counters) -> &AtomicU64;
            let instruments: [(&'static str, &'static str, Read); 3] = [
                (
                    "reflex.record.queued",
                    "Records handed to the recorder queue",
                    |c| &c.queued,
                ),
                (
                    "reflex.record.delivered",
                    "Records written into a recorder stream",
                    |c| &c.delivered,
                ),
                (
                    "reflex.record.dropped",
                    "Records dropped because the recorder was slow or away (queue full)",
                    |c| &c.dropped,
                ),
            ];
            for (name, help, read) in instruments {
                let c = counters.clone();
                meter
                    .u64_observable_counter(name)
                    .with_description(help)
                    .with_callback(move |o| o.observe(read(&c).load(Ordering::Relaxed), &[]))
                    .build();
            }
        }
        if let Some(uri) = recorder {
            let status = Arc::new(RecorderSeen::default());
            observe_recorder(meter, &status);
            self.tasks
                .spawn(poll_recorder(uri, status, self.stop.clone()));
        }
    }

    /// Stops the endpoint and the poll, then flushes and closes the exporters
    /// (bounded: an unreachable collector costs at most a few seconds).
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let (traces, metrics) = (self.tracer_provider.take(), self.meter_provider.take());
        if traces.is_none() && metrics.is_none() {
            return;
        }
        // The SDK's shutdown blocks on its export threads, which need the
        // runtime's reactor for the gRPC channel: keep it off the async workers.
        let flush = tokio::task::spawn_blocking(move || {
            if let Some(p) = traces
                && let Err(e) = p.shutdown_with_timeout(Duration::from_secs(3))
            {
                tracing::warn!(error = %e, "could not flush the last spans");
            }
            if let Some(p) = metrics
                && let Err(e) = p.shutdown_with_timeout(Duration::from_secs(3))
            {
                tracing::debug!(error = %e, "could not flush the last metrics");
            }
        });
        if tokio::time::timeout(Duration::from_secs(8), flush)
            .await
            .is_err()
        {
            tracing::warn!("telemetry exporters did not shut down in 8 s");
        }
    }
}

// ---------------------------------------------------------------------------
// The Act path

/// The Act path's view of telemetry: `None` everywhere when off.
#[derive(Clone, Default)]
pub struct ActTelemetry {
    tracer: Option<SdkTracer>,
    metrics: Option<Arc<ActMetrics>>,
}

/// A started `act` span and the wall-clock time it began.
pub struct ActSpan {
    pub span: Span,
    started: SystemTime,
}

impl ActTelemetry {
    pub fn tracing(&self) -> bool {
        self.tracer.is_some()
    }

    pub fn metrics(&self) -> Option<&Arc<ActMetrics>> {
        self.metrics.as_ref()
    }

    /// The caller's trace context from `traceparent`/`tracestate` metadata;
    /// `None` when tracing is off or the caller sent none.
    pub fn parent(&self, metadata: &MetadataMap) -> Option<Context> {
        self.tracer.as_ref()?;
        metadata.get("traceparent")?;
        Some(TraceContextPropagator::new().extract(&MetadataCarrier(metadata)))
    }

    /// The `act` span of one call, a child of `parent` when given; `None` when
    /// tracing is off.
    pub fn act_span(&self, info: &pb::ModelInfo, parent: Option<Context>) -> Option<ActSpan> {
        self.tracer.as_ref()?;
        let started = SystemTime::now();
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "act",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "reflex.v1.Policy",
            rpc.method = "Act",
            gen_ai.operation.name = "act",
            gen_ai.request.model = info.model_type.as_str(),
            gen_ai.action.embodiment = info.embodiment.as_str(),
            gen_ai.action.chunk_size = i64::from(info.chunk_size),
            gen_ai.action.denoise_steps = tracing::field::Empty,
            reflex.inference_mode = info.mode.as_str(),
            reflex.model.hash = info.model_hash.as_str(),
            reflex.session_id = info.session_id.as_str(),
            reflex.record.seq = tracing::field::Empty,
            reflex.record.recorded = tracing::field::Empty,
            reflex.cache.status = tracing::field::Empty,
            reflex.inference_ms = tracing::field::Empty,
            reflex.total_ms = tracing::field::Empty,
            reflex.queue_ms = tracing::field::Empty,
            reflex.noise_seed = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        if let Some(cx) = parent {
            // Fails only for a span the layer never saw (no subscriber): nothing to continue then.
            let _ = span.set_parent(cx);
        }
        Some(ActSpan { span, started })
    }

    /// Records the outcome on the `act` span and adds the stage spans.
    pub fn finish_act_span(
        &self,
        act: &ActSpan,
        seq: Option<u64>,
        recorded: bool,
        result: &Result<(ActOutput, f64), ServiceError>,
        total_ms: f64,
        configured_steps: u32,
    ) {
        let Some(tracer) = &self.tracer else { return };
        let span = &act.span;
        // Integers as i64: the OTel layer would write a u64 as text. A seq
        // never reaches 2^63; a noise seed may, so it stays text on purpose.
        // A refusal has no seq (it is counted, not recorded).
        if let Some(seq) = seq {
            span.record("reflex.record.seq", seq as i64);
        }
        span.record("reflex.record.recorded", recorded);
        span.record("reflex.total_ms", total_ms);
        match result {
            Ok((out, queue_ms)) => {
                let t = &out.times;
                span.record("reflex.cache.status", out.cache.as_str());
                span.record(
                    "reflex.inference_ms",
                    t.decode_ms + t.prefix_ms + t.denoise_ms + t.postprocess_ms,
                );
                span.record("reflex.queue_ms", *queue_ms);
                span.record("gen_ai.action.denoise_steps", i64::from(out.steps_used));
                span.record("reflex.noise_seed", out.noise_seed);
                let cx = span.context();
                if cx.span().span_context().is_sampled() {
                    stage_spans(tracer, &cx, act.started, *queue_ms, out);
                }
            }
            Err(e) => {
                span.record("gen_ai.action.denoise_steps", i64::from(configured_steps));
                span.record("error.type", e.slug().as_str());
                span.set_status(OtelStatus::error(e.to_string()));
            }
        }
    }
}

/// The policy's stage timings as child spans, laid end to end from the start
/// of the call (they ran back to back on one worker).
fn stage_spans(
    tracer: &SdkTracer,
    parent: &Context,
    started: SystemTime,
    queue_ms: f64,
    out: &ActOutput,
) {
    let t = &out.times;
    let (first, second) = match out.cache {
        CacheStatus::Hit => ("cache_hit", None),
        CacheStatus::Miss | CacheStatus::Disabled => ("decode", Some(("prefix", t.prefix_ms))),
    };
    let stages = [
        Some(("queue", queue_ms)),
        Some((first, t.decode_ms)),
        second,
        Some(("denoise", t.denoise_ms)),
        Some(("postprocess", t.postprocess_ms)),
    ];
    let mut at = started;
    for (name, ms) in stages.into_iter().flatten() {
        let end = at + Duration::from_secs_f64(ms.max(0.0) / 1e3);
        let mut s = tracer
            .span_builder(name)
            .with_start_time(at)
            .with_attributes([KeyValue::new("reflex.stage_ms", ms)])
            .start_with_context(tracer, parent);
        s.end_with_timestamp(end);
        at = end;
    }
}

/// Instruments updated on every call (when metrics are on).
pub struct ActMetrics {
    duration: Histogram<f64>,
    requests: Counter<u64>,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    waiting: AtomicI64,
}

impl ActMetrics {
    fn new(meter: &Meter) -> Self {
        ActMetrics {
            duration: meter
                .f64_histogram("reflex.act.duration")
                .with_unit("s")
                .with_description("Act latency in the server, arrival to answer, by status (ok or the error slug)")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            requests: meter
                .u64_counter("reflex.act.requests")
                .with_description("Act calls by status (ok or the error slug)")
                .build(),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            waiting: AtomicI64::new(0),
        }
    }

    /// One finished call.
    pub fn record(&self, total_ms: f64, result: &Result<(ActOutput, f64), ServiceError>) {
        let status = match result {
            Ok((out, _)) => {
                match out.cache {
                    CacheStatus::Hit => self.cache_hits.fetch_add(1, Ordering::Relaxed),
                    CacheStatus::Miss => self.cache_misses.fetch_add(1, Ordering::Relaxed),
                    CacheStatus::Disabled => 0,
                };
                "ok"
            }
            Err(e) => e.slug().as_str(),
        };
        let attrs = [KeyValue::new("status", status)];
        self.duration.record(total_ms / 1e3, &attrs);
        self.requests.add(1, &attrs);
    }

    /// Counts a call as waiting for a worker until the guard is dropped
    /// (when the job starts, or with the job if it never runs).
    pub fn waiting(self: &Arc<Self>) -> WaitingGuard {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        WaitingGuard(self.clone())
    }

    fn hit_ratio(&self) -> f64 {
        let (h, m) = (
            self.cache_hits.load(Ordering::Relaxed),
            self.cache_misses.load(Ordering::Relaxed),
        );
        if h + m == 0 {
            0.0
        } else {
            h as f64 / (h + m) as f64
        }
    }
}

/// See [`ActMetrics::waiting`].
pub struct WaitingGuard(Arc<ActMetrics>);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Trace context on gRPC metadata

struct MetadataCarrier<'a>(&'a MetadataMap);

impl Extractor for MetadataCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Writes `span`'s trace context as `traceparent` into outgoing metadata, so
/// the server's `act` span becomes its child. Nothing when `span` is not traced.
pub fn inject(span: &Span, metadata: &mut MetadataMap) {
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
    }
}

/// The client-side span of one replayed call: `replay.act` with the record's
/// `seq`, so the replay sits beside the original call in the tracing backend.
/// A disabled span when tracing is off. Pair it with [`inject`].
pub fn replay_span(seq: u64) -> Span {
    if OTEL_LAYER.get().is_none() {
        return Span::none();
    }
    tracing::info_span!(
        target: SPAN_TARGET,
        "replay.act",
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = "reflex.v1.Policy",
        rpc.method = "Act",
        reflex.record.seq = seq as i64,
        error.type = tracing::field::Empty,
    )
}

/// Marks a replayed call (or any span from here) failed.
pub fn fail_span(span: &Span, slug: &'static str, message: &str) {
    if span.is_disabled() {
        return;
    }
    span.record("error.type", slug);
    span.set_status(OtelStatus::error(message.to_string()));
}

/// [`replay_span`], [`inject`] and [`fail_span`] behind the hook `reflex replay` traces
/// its calls through ([`reflex_proto::CallTracer`]): the replayer links no OpenTelemetry.
pub struct ReplayTracer;

impl reflex_proto::CallTracer for ReplayTracer {
    fn start(&self, seq: u64) -> Box<dyn reflex_proto::CallSpan> {
        Box::new(ReplayCallSpan(replay_span(seq)))
    }
}

/// Ends (and is exported) when dropped, like the span it holds.
struct ReplayCallSpan(Span);

impl reflex_proto::CallSpan for ReplayCallSpan {
    fn inject(&self, metadata: &mut MetadataMap) {
        inject(&self.0, metadata);
    }

    fn fail(&self, slug: &'static str, message: &str) {
        fail_span(&self.0, slug, message);
    }
}

// ---------------------------------------------------------------------------
// The Prometheus endpoint

/// Serves `registry` at `http://ADDR/metrics` until `stop`, for a process other than the
/// server that keeps its own registry (`reflex ship`). Returns the bound address.
pub async fn spawn_metrics_endpoint(
    addr: std::net::SocketAddr,
    registry: prometheus::Registry,
    stop: CancellationToken,
) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve_metrics(listener, registry, stop));
    tracing::info!(metrics = %format!("http://{bound}/metrics"), "serving Prometheus metrics");
    Ok(bound)
}

async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: prometheus::Registry,
    stop: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let io = match accepted {
                    Ok((io, _)) => io,
                    Err(e) => {
                        // E.g. out of file descriptors: wait instead of spinning.
                        tracing::warn!(error = %e, "metrics endpoint cannot accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if conns.len() >= MAX_SCRAPE_CONNECTIONS {
                    continue;
                }
                let registry = registry.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let resp = scrape(&registry, &req);
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "metrics connection ended");
                    }
                });
            }
        }
    }
    conns.abort_all();
}

fn scrape<B>(
    registry: &prometheus::Registry,
    req: &http::Request<B>,
) -> http::Response<http_body_util::Full<hyper::body::Bytes>> {
    let reply = |code: u16, ctype: &str, body: String| {
        let mut r = http::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body)));
        *r.status_mut() =
            http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        if let Ok(v) = http::HeaderValue::from_str(ctype) {
            r.headers_mut().insert(http::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return reply(405, "text/plain", "only GET\n".into());
    }
    if req.uri().path() != "/metrics" {
        return reply(404, "text/plain", "the metrics are at /metrics\n".into());
    }
    match prometheus::TextEncoder::new().encode_to_string(&registry.gather()) {
        Ok(text) => reply(200, prometheus::TEXT_FORMAT, text),
        Err(e) => reply(
            500,
            "text/plain",
            format!("cannot encode the metrics: {e}\n"),
        ),
    }
}

// ---------------------------------------------------------------------------
// A shared recorder's status

/// The last `Recorder/Status` answer, for the observable instruments.
#[derive(Default)]
struct RecorderSeen {
    up: AtomicBool,
    last: Mutex<Option<pb::RecorderStatus>>,
}

fn observe_recorder(meter: &Meter, seen: &Arc<RecorderSeen>) {
    let s = seen.clone();
    meter
        .i64_observable_gauge("reflex.recorder.up")
        .with_description("1 when the last Status call to the shared recorder succeeded")
        .with_callback(move |o| o.observe(i64::from(s.up.load(Ordering::Relaxed)), &[]))
        .build();
    let s = seen.clone();
    meter
        .i64_observable_gauge("reflex.recorder.degraded")
        .with_description(
            "1 once the shared recorder hit a write error (disk full included); see its log for slug=record-disk-full",
        )
        .with_callback(move |o| {
            if let Some(st) = s.last.lock().ok().and_then(|l| l.clone()) {
                o.observe(i64::from(st.degraded), &[]);
            }
        })
        .build();
    type Read = fn(&pb::RecorderStatus) -> u64;
    let totals: [(&'static str, &'static str, &'static str, Read); 3] = [
        (
            "reflex.recorder.written",
            "By",
            "Trace bytes the shared recorder has written (all sessions)",
            |s| s.bytes_written,
        ),
        (
            "reflex.recorder.records",
            "",
            "Records the shared recorder has written (all sessions)",
            |s| s.records_written,
        ),
        (
            "reflex.recorder.dropped",
            "",
            "Records the shared recorder reports as dropped (all sessions)",
            |s| s.dropped_requests,
        ),
    ];
    for (name, unit, help, read) in totals {
        let s = seen.clone();
        let mut b = meter.u64_observable_counter(name).with_description(help);
        if !unit.is_empty() {
            b = b.with_unit(unit);
        }
        b.with_callback(move |o| {
            if let Some(st) = s.last.lock().ok().and_then(|l| l.clone()) {
                o.observe(read(&st), &[]);
            }
        })
        .build();
    }
}

async fn poll_recorder(uri: String, seen: Arc<RecorderSeen>, stop: CancellationToken) {
    let mut client = None;
    loop {
        if client.is_none() {
            client = match reflex_proto::connect(&uri).await {
                Ok(ch) => Some(pb::recorder_client::RecorderClient::new(ch)),
                Err(e) => {
                    tracing::debug!(error = %e, %uri, "recorder status: not reachable");
                    None
                }
            };
        }
        let answer = match client.as_mut() {
            Some(c) => {
                tokio::time::timeout(Duration::from_secs(2), c.status(pb::StatusRequest {})).await
            }
            None => Ok(Err(tonic::Status::unavailable("not connected"))),
        };
        match answer {
            Ok(Ok(r)) => {
                seen.up.store(true, Ordering::Relaxed);
                if let Ok(mut l) = seen.last.lock() {
                    *l = Some(r.into_inner());
                }
            }
            _ => {
                seen.up.store(false, Ordering::Relaxed);
                client = None;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RECORDER_POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn off_unless_an_endpoint_or_a_metrics_address_is_given() {
        let c = TelemetryConfig::resolve(None, None, None, "reflex", env(&[]));
        assert_eq!(c, TelemetryConfig::off());
        assert!(!c.tracing() && !c.metrics());
        let c = TelemetryConfig::resolve(
            None,
            None,
            Some("127.0.0.1:0".parse().unwrap()),
            "reflex",
            env(&[]),
        );
        assert!(!c.tracing() && c.metrics());
    }

    #[test]
    fn flags_win_over_the_standard_variables() {
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_SERVICE_NAME", "arm-7"),
        ];
        let c = TelemetryConfig::resolve(None, None, None, "reflex", env(&vars));
        assert_eq!(c.endpoint.as_deref(), Some("http://collector:4317"));
        assert_eq!((c.sample, c.service_name.as_str()), (0.25, "arm-7"));
        let named = [(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=lab, service.name=arm-9",
        )];
        assert_eq!(
            TelemetryConfig::resolve(None, None, None, "reflex", env(&named)).service_name,
            "arm-9"
        );
        let c = TelemetryConfig::resolve(
            Some("http://127.0.0.1:4317"),
            Some(0.01),
            None,
            "reflex",
            env(&vars),
        );
        assert_eq!(
            (c.endpoint.as_deref(), c.sample),
            (Some("http://127.0.0.1:4317"), 0.01)
        );
    }

    #[test]
    fn the_standard_switches_turn_the_environment_endpoint_off() {
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let vars = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"), off];
            assert_eq!(
                TelemetryConfig::resolve(None, None, None, "r", env(&vars)).endpoint,
                None,
                "{off:?}"
            );
            // An explicit flag is still obeyed.
            assert!(
                TelemetryConfig::resolve(Some("http://c:4317"), None, None, "r", env(&vars))
                    .tracing()
            );
        }
    }

    #[test]
    fn sampler_variables_map_to_a_ratio() {
        let s = |sampler: Option<&str>, arg: Option<&str>| {
            sample_from_env(sampler.map(Into::into), arg.map(Into::into))
        };
        assert_eq!(s(None, None), 1.0);
        assert_eq!(s(None, Some("0.5")), 0.5);
        assert_eq!(s(Some("parentbased_traceidratio"), Some("0.1")), 0.1);
        assert_eq!(s(Some("always_off"), Some("0.1")), 0.0);
        assert_eq!(
            s(Some("traceidratio"), Some("7")),
            1.0,
            "out of range falls back to every trace"
        );
    }

    #[test]
    fn flag_values_are_checked_while_parsing() {
        assert_eq!(parse_sample("0.01"), Ok(0.01));
        assert!(parse_sample("1.5").unwrap_err().contains("from 0 to 1"));
        assert!(parse_sample("x").is_err());
        assert!(parse_endpoint("http://127.0.0.1:4317").is_ok());
        assert!(
            parse_endpoint("https://collector:4317")
                .unwrap_err()
                .contains("without TLS")
        );
        assert!(
            parse_endpoint("127.0.0.1:4317")
                .unwrap_err()
                .contains("http://HOST:PORT")
        );
    }

    #[test]
    fn traceparent_round_trips_through_metadata() {
        let t = ActTelemetry {
            tracer: Some(SdkTracerProvider::builder().build().tracer("t")),
            metrics: None,
        };
        let mut md = MetadataMap::new();
        assert!(t.parent(&md).is_none(), "no traceparent, no parent");
        md.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let cx = t.parent(&md).unwrap();
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        let mut out = MetadataMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(&mut out));
        assert_eq!(
            out.get("traceparent").unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert!(
            ActTelemetry::default().parent(&md).is_none(),
            "tracing off reads nothing"
        );
    }

    #[tokio::test]
    async fn the_endpoint_serves_the_registry_as_prometheus_text() {
        let cfg = TelemetryConfig {
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            ..TelemetryConfig::off()
        };
        let t = Telemetry::start(&cfg).await.unwrap();
        let m = t.act().metrics.clone().unwrap();
        m.record(12.0, &Err(ServiceError::WorkerLost));
        let addr = t.metrics_addr.unwrap();
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let text = get("/metrics").await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.contains("reflex_act_requests_total{status=\"worker-lost\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "reflex_act_duration_seconds_bucket{status=\"worker-lost\",le=\"0.02\"} 1"
            ),
            "{text}"
        );
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        t.shutdown().await;
    }

    #[test]
    fn the_waiting_gauge_counts_until_the_guard_drops() {
        let provider = SdkMeterProvider::builder().build();
        let m = Arc::new(ActMetrics::new(&provider.meter("t")));
        let a = m.waiting();
        let b = m.waiting();
        assert_eq!(m.waiting.load(Ordering::Relaxed), 2);
        drop((a, b));
        assert_eq!(m.waiting.load(Ordering::Relaxed), 0);
    }
}
