//! `reflex serve`: binds the listeners, serves Policy + Health + reflection,
//! and shuts down in order.
//!
//! Start-up order: load the model, bind every listener, health → SERVING,
//! start accepting, then tell systemd READY=1 and start the watchdog
//! ([`crate::systemd`]).
//!
//! Shutdown order (SIGTERM/SIGINT cancel one token): STOPPING=1 and the
//! watchdog stops, health → NOT_SERVING, stop accepting, let in-flight calls
//! finish (bounded by `--drain-ms`), end the recording session, return. The
//! caller exits 0.
//!
//! Access control ([`crate::auth`]) is decided per listener, before the model loads:
//! each listener gets its own router. TCP listeners carry TLS (`--tls-cert`/`--tls-key`)
//! and the bearer-token interceptor on Policy and reflection (`--auth-token-file`);
//! Health is always open. Unix listeners get neither: the socket's mode and folder
//! decide who connects. A non-loopback TCP address needs a token, or `--insecure`.
//! `--http-listen` (the seed tool's HTTP API, [`crate::frontend::http`]) and
//! `--openpi-listen` (openpi's websocket protocol, [`crate::frontend::openpi`]) are TCP
//! listeners under the same rules, with the same token and certificate; they stop accepting
//! and drain with the others.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use reflex_proto::v1::policy_server::PolicyServer;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::{Server, ServerTlsConfig};

use crate::auth::{AuthToken, BearerAuth};
use crate::recording::{ImageMode, RecordOptions, RecordTarget, Recording};
use crate::service::{PolicyHandle, PolicyService, ServiceOptions};
use crate::telemetry::{Telemetry, TelemetryConfig};
use reflex_engine::engine::EngineKind;
use reflex_engine::policy::{Policy, PolicyOptions};
use reflex_proto::v1 as pb;

/// Where a listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    /// `127.0.0.1:50051`, `tcp://[::1]:50051`, `unix:///run/reflex/x.sock`, `unix:rel.sock`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if rest.is_empty() {
                return Err(format!("{s:?}: a unix listener needs a socket path"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(rest)));
        }
        let hostport = s.strip_prefix("tcp://").unwrap_or(s);
        hostport.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
            format!("{s:?} is not a listen address (use 127.0.0.1:PORT, [::1]:PORT or unix:///path/to.sock)")
        })
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "tcp://{a}"),
            ListenAddr::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// Run the inference server for one export.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Export directory (reflex_config.json + ONNX graphs), e.g. from `reflex export-demo`.
    #[arg(long = "model", value_name = "DIR", env = "REFLEX_EXPORT_DIR")]
    #[arg(required_unless_present = "export_dir")]
    pub model: Option<PathBuf>,

    /// The export directory as the first argument (the same as --model; it wins over it).
    #[arg(value_name = "EXPORT_DIR")]
    pub export_dir: Option<PathBuf>,

    /// Address to serve on; repeat for several. TCP `127.0.0.1:50051` or `unix:///run/reflex/NAME.sock`.
    ///
    /// Loopback by default. A non-loopback TCP address needs --auth-token-file (or --insecure).
    /// Port 0 picks a free port (the log says which).
    #[arg(
        long = "listen",
        value_name = "URI",
        env = "REFLEX_LISTEN",
        value_delimiter = ',',
        default_value = "127.0.0.1:50051"
    )]
    pub listen: Vec<ListenAddr>,

    /// Allow listening on a non-loopback TCP address without --auth-token-file: anyone who
    /// reaches the port may call.
    #[arg(long, env = "REFLEX_INSECURE")]
    pub insecure: bool,

    /// File holding the bearer token TCP clients must send as `authorization: Bearer TOKEN`.
    ///
    /// One token (surrounding whitespace ignored), e.g. from `openssl rand -hex 32`. The file must
    /// not be readable by other users: chmod 600, or systemd's LoadCredential=. Checked on
    /// Policy and reflection; Health stays open. Unix sockets are not token-checked: their
    /// file permissions decide who connects.
    #[arg(long, value_name = "FILE", env = "REFLEX_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// TLS certificate chain (PEM) for the TCP listeners; needs --tls-key.
    #[arg(
        long,
        value_name = "PEM",
        env = "REFLEX_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) for the TCP listeners; needs --tls-cert. Must not be readable by other users.
    #[arg(
        long,
        value_name = "PEM",
        env = "REFLEX_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Concurrent calls (HTTP/2 streams) per connection; a client that opens more waits.
    #[arg(long, value_name = "N", env = "REFLEX_MAX_STREAMS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_streams: u32,

    /// Engine that runs the model: cpu (tract), cuda (NVIDIA GPU: cuBLAS + NVRTC kernels,
    /// CUDA graphs; needs the driver and the CUDA 13 libcublas/libnvrtc, and refuses to start
    /// without them), auto (cuda where it loads, else cpu with one log line saying why) or ort
    /// (onnxruntime's CPU provider, loaded at run time from --ort-lib / ORT_DYLIB_PATH; real
    /// VLA exports only — faster than tract on transformer-sized graphs, see the README).
    #[arg(
        long,
        value_name = "ENGINE",
        env = "REFLEX_ENGINE",
        default_value = "cpu"
    )]
    pub engine: EngineKind,

    /// With the cuda engine: replay the prefix and the whole denoise loop as CUDA graphs
    /// (on, the default) or launch kernel by kernel (off; for comparison, same results).
    #[arg(
        long,
        value_name = "on|off",
        env = "REFLEX_CUDA_GRAPHS",
        default_value = "on",
        value_parser = parse_on_off,
        // A bool field defaults to a switch that takes no value: `--cuda-graphs off` would
        // be refused. Set takes the value; a bare `--cuda-graphs` still means on.
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "on"
    )]
    pub cuda_graphs: bool,

    /// With --engine cuda (or auto) on a real export: how weights and activations are stored.
    /// f16 and bf16 halve the GPU memory of weights and run the big matrix products on tensor
    /// cores (accumulating in f32); norms, softmax, masks, positions and the denoise loop's
    /// state stay f32. Actions differ from f32 within cos ≥ 0.999. The cpu engine computes
    /// in f32 only (a half precision with --engine cpu is refused; auto falling back to cpu
    /// says so in its log line).
    #[arg(
        long,
        value_name = "f32|f16|bf16",
        env = "REFLEX_PRECISION",
        default_value = "f32"
    )]
    pub precision: reflex_engine::engine::graph::Precision,

    /// Inference worker threads (each runs one call at a time). Default: CPU cores, at most 4.
    #[arg(long, value_name = "N", env = "REFLEX_WORKERS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,

    /// Calls allowed to wait for a worker; beyond this Act answers RESOURCE_EXHAUSTED.
    #[arg(
        long,
        value_name = "N",
        env = "REFLEX_QUEUE_DEPTH",
        default_value_t = 32
    )]
    pub queue_depth: usize,

    /// Places of the queue one connection may hold (its fair share): a client flooding one
    /// connection with concurrent calls gets RESOURCE_EXHAUSTED beyond it while other
    /// connections still find places. Default: a quarter of --queue-depth, at least 1.
    #[arg(long, value_name = "N", env = "REFLEX_QUEUE_PER_CONNECTION")]
    pub queue_per_connection: Option<usize>,

    /// Prefix cache entries (image hashes + instruction → prefix features); 0 disables it.
    #[arg(
        long,
        value_name = "N",
        env = "REFLEX_CACHE_ENTRIES",
        default_value_t = 1024
    )]
    pub cache_entries: usize,

    /// The prefix cache's bound in MiB: at most this much memory for cached prefixes (GPU
    /// memory with `--engine cuda` on a real export, whose prefixes stay on the device). A
    /// pi0.5 prefix (every layer's KV cache) is tens of MB, so this, not --cache-entries,
    /// usually sets how many are kept; the start-up log states the worst case.
    #[arg(
        long,
        value_name = "MIB",
        env = "REFLEX_CACHE_MB",
        default_value_t = 2048
    )]
    pub cache_mb: usize,

    /// A HuggingFace tokenizer.json for an export that lacks one (a seed-tool export); by
    /// default `tokenizer.json` or `tokenizer/tokenizer.json` beside the graphs.
    #[arg(long, value_name = "FILE", env = "REFLEX_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,

    /// lerobot's normaliser statistics (`policy_preprocessor_step_*_normalizer_processor.safetensors`)
    /// for an export that lacks them; by default the first `policy_*processor*.safetensors`
    /// beside the graphs.
    #[arg(long, value_name = "FILE", env = "REFLEX_STATS")]
    pub stats: Option<PathBuf>,

    /// For a seed-tool (reflex-vla) export: `keep` reproduces the seed runtime's actions,
    /// quirks included (pi0.5 images in [0,1]; monolithic: one fixed noise, the primary image
    /// copied to absent cameras, no normalisation); `fix` does what lerobot trains for. The
    /// start-up log says which is in force.
    #[arg(
        long,
        value_name = "keep|fix",
        env = "REFLEX_SEED_QUIRKS",
        default_value = "keep"
    )]
    pub seed_quirks: reflex_engine::seed::SeedQuirks,

    /// With --engine ort: the onnxruntime library to load (a libonnxruntime.so.*; the
    /// `onnxruntime` wheel on PyPI ships one in onnxruntime/capi/).
    #[arg(long, value_name = "PATH", env = "ORT_DYLIB_PATH")]
    pub ort_lib: Option<PathBuf>,

    /// With --engine ort: onnxruntime's intra-op threads per call (tract runs a call on one).
    #[arg(long, value_name = "N", env = "REFLEX_ORT_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub ort_threads: u32,

    /// Largest Act request accepted, in MiB; larger ones get INVALID_ARGUMENT.
    #[arg(long, value_name = "MIB", env = "REFLEX_MAX_MESSAGE_MB", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_message_mb: u32,

    /// Robot embodiment recorded in traces and ModelInfo (e.g. franka).
    #[arg(
        long,
        value_name = "NAME",
        env = "REFLEX_EMBODIMENT",
        default_value = "unknown"
    )]
    pub embodiment: String,

    /// How long shutdown waits for in-flight calls, in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        env = "REFLEX_DRAIN_MS",
        default_value_t = 5000
    )]
    pub drain_ms: u64,

    /// Record every Act call into trace files in DIR (created if missing).
    ///
    /// Without --recorder the server runs and supervises a private `reflex recorder` child for
    /// DIR. `--record DIR` (the seed's and the SPEC's spelling) works too.
    #[arg(long = "trace-dir", alias = "record")]
    #[arg(value_name = "DIR", env = "REFLEX_RECORD")]
    pub record: Option<PathBuf>,

    /// Record through a shared recorder daemon at URI, e.g. unix:///run/reflex/recorder.sock.
    ///
    /// The daemon owns the trace folder and the disk policy; --record is then not needed.
    #[arg(long, value_name = "URI", env = "REFLEX_RECORDER")]
    pub recorder: Option<String>,

    /// What image data traces keep: full (encoded bytes), hash_only (SHA-256) or none.
    #[arg(
        long,
        value_name = "MODE",
        env = "REFLEX_RECORD_IMAGES",
        default_value = "hash_only"
    )]
    pub record_images: ImageMode,

    /// Write plain .jsonl traces instead of .jsonl.gz (handy for grep during development).
    #[arg(long, env = "REFLEX_RECORD_NO_GZIP")]
    pub record_no_gzip: bool,

    /// Records that may wait for a slow or absent recorder before new ones are dropped (and counted).
    #[arg(long, value_name = "N", env = "REFLEX_RECORD_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub record_queue: u32,

    /// Send OpenTelemetry spans and metrics over OTLP/gRPC to this collector, e.g. http://127.0.0.1:4317.
    ///
    /// Off by default. Without the flag, OTEL_EXPORTER_OTLP_ENDPOINT turns it on; OTEL_SERVICE_NAME
    /// names the service (default reflex). No TLS: use a local collector.
    #[arg(long, value_name = "URI", env = "REFLEX_OTEL_ENDPOINT", value_parser = crate::telemetry::parse_endpoint)]
    pub otel_endpoint: Option<String>,

    /// Fraction of calls traced, 0 to 1 (default 1, or OTEL_TRACES_SAMPLER_ARG). A caller's traceparent decides for its own calls.
    #[arg(long, value_name = "RATIO", env = "REFLEX_OTEL_SAMPLE", value_parser = crate::telemetry::parse_sample)]
    pub otel_sample: Option<f64>,

    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464. Off by default.
    #[arg(long, value_name = "ADDR", env = "REFLEX_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Also serve the seed tool's HTTP API (POST /act, GET /health, GET /config) on ADDR, e.g. 127.0.0.1:8000.
    ///
    /// For robots running reflex-vla's client (`ReflexClient`). Same rules as a TCP gRPC
    /// listener: loopback unless --auth-token-file (sent as `X-Reflex-Key` or
    /// `Authorization: Bearer`) or --insecure; the same queue, records and metrics.
    #[arg(long, value_name = "ADDR", env = "REFLEX_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,

    /// Also serve openpi's websocket policy protocol on ADDR, e.g. 127.0.0.1:8000.
    ///
    /// For robots running openpi-client (`WebsocketClientPolicy(host, port, api_key=…)`, and
    /// `ActionChunkBroker` over it): msgpack observations with numpy arrays in, action chunks
    /// out; errors as a text frame and close 1011, as openpi's server does. Observation keys
    /// map onto the model by --openpi-preset and --openpi-map; `noise_seed` (an integer) is
    /// the call's seed. Same rules as a TCP gRPC listener: loopback unless --auth-token-file
    /// (sent as `Authorization: Api-Key TOKEN`) or --insecure; TLS (wss://) with --tls-cert;
    /// the same queue, records and metrics.
    #[arg(long, value_name = "ADDR", env = "REFLEX_OPENPI_LISTEN")]
    pub openpi_listen: Option<SocketAddr>,

    /// The observation keys of one of openpi's example robots, for --openpi-listen.
    ///
    /// Each preset's keys, below, are cameras (in the model's camera order); state
    /// (concatenated); prompt (the instruction). libero, the default, fits the reference model
    /// of `reflex export-demo`. Nested dicts are read as paths (`images/cam_high`); camera keys
    /// beyond the model's cameras are checked, not used. The first camera and the state are
    /// required; a key the mapping does not name is refused, naming it.
    #[arg(
        long,
        value_name = "PRESET",
        env = "REFLEX_OPENPI_PRESET",
        default_value = "libero"
    )]
    pub openpi_preset: crate::frontend::openpi::mapping::Preset,

    /// Replace one role of --openpi-preset: `camera=KEY` (repeat, in the model's camera
    /// order; replaces all the preset's cameras), `state=KEY[,KEY…]` (concatenated),
    /// `prompt=KEY`; `state=` / `prompt=` map none.
    #[arg(long, value_name = "ROLE=KEY")]
    pub openpi_map: Vec<crate::frontend::openpi::mapping::MapEntry>,
}

impl ServeArgs {
    /// Defaults for an in-process server on the given listeners (demo, tests).
    pub fn new(export_dir: PathBuf, listen: Vec<ListenAddr>) -> Self {
        ServeArgs {
            model: Some(export_dir),
            export_dir: None,
            listen,
            insecure: false,
            auth_token_file: None,
            tls_cert: None,
            tls_key: None,
            max_streams: 256,
            engine: EngineKind::Cpu,
            cuda_graphs: true,
            precision: Default::default(),
            workers: None,
            queue_depth: 32,
            queue_per_connection: None,
            cache_entries: 1024,
            cache_mb: 2048,
            tokenizer: None,
            stats: None,
            seed_quirks: Default::default(),
            ort_lib: None,
            ort_threads: 1,
            max_message_mb: 8,
            embodiment: "unknown".into(),
            drain_ms: 5000,
            record: None,
            recorder: None,
            record_images: ImageMode::HashOnly,
            record_no_gzip: false,
            record_queue: 1024,
            otel_endpoint: None,
            otel_sample: None,
            metrics_listen: None,
            http_listen: None,
            openpi_listen: None,
            openpi_preset: Default::default(),
            openpi_map: Vec::new(),
        }
    }
}

/// A started server.
pub struct Running {
    /// Bound addresses (port 0 resolved).
    pub listening: Vec<ListenAddr>,
    pub service: Arc<PolicyService>,
    /// The Prometheus endpoint's address (port 0 resolved), with `--metrics-listen`.
    pub metrics: Option<SocketAddr>,
    /// The seed tool's HTTP API's address (port 0 resolved), with `--http-listen`.
    pub http: Option<SocketAddr>,
    /// openpi's websocket protocol's address (port 0 resolved), with `--openpi-listen`.
    pub openpi: Option<SocketAddr>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the server has shut down (after the token is cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task failed")?
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        other => Err(format!("{other:?}: expected on or off")),
    }
}

/// Loads the model, binds every listener, and starts serving.
pub async fn start(args: ServeArgs, shutdown: CancellationToken) -> anyhow::Result<Running> {
    // Before the model loads: a missing token or a bad key should fail in milliseconds.
    let access = Access::resolve(&args)?;
    let openpi_keys =
        crate::frontend::openpi::mapping::Keys::new(args.openpi_preset, &args.openpi_map)
            .map_err(anyhow::Error::msg)?;
    let dir = args
        .export_dir
        .clone()
        .or_else(|| args.model.clone())
        .context("no export directory: give --model DIR")?;
    if args.precision != Default::default()
        && matches!(args.engine, EngineKind::Cpu | EngineKind::Ort)
    {
        anyhow::bail!(
            "--precision {} needs --engine cuda (or auto): the {} engine computes in f32",
            args.precision,
            if args.engine == EngineKind::Cpu {
                "cpu"
            } else {
                "ort"
            }
        );
    }
    let popts = PolicyOptions {
        engine: args.engine,
        cuda_graphs: args.cuda_graphs,
        precision: args.precision,
        cache_entries: args.cache_entries,
        cache_max_bytes: args.cache_mb.saturating_mul(1 << 20),
        seed: reflex_engine::seed::SeedOptions {
            tokenizer: args.tokenizer.clone(),
            stats: args.stats.clone(),
            quirks: args.seed_quirks,
        },
        ort_lib: args.ort_lib.clone(),
        ort_threads: args.ort_threads as usize,
    };
    let t0 = std::time::Instant::now();
    // Loading optimises the graphs: seconds of CPU, kept off the runtime.
    let load_dir = dir.clone();
    let policy = tokio::task::spawn_blocking(move || Policy::load(&load_dir, &popts))
        .await
        .context("model loading task failed")?
        .with_context(|| format!("cannot load the model in {}", dir.display()))?;
    tracing::info!(
        model_hash = policy.model_hash(),
        config_hash = policy.config_hash(),
        mode = policy.mode(),
        load_ms = t0.elapsed().as_millis() as u64,
        "model loaded"
    );
    if let Some(c) = policy.cache_capacity() {
        tracing::info!(
            entries = c.entries,
            entry_bytes = c.entry_bytes,
            max_bytes = c.max_bytes,
            location = c.location,
            limited_by = if c.limited_by_bytes {
                "--cache-mb"
            } else {
                "--cache-entries"
            },
            "prefix cache bounded (worst case: every entry in use)"
        );
    }
    let recording = recording_for(&args, &policy);
    let workers = args.workers.map(usize::from).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4)
    });
    let max_message_bytes = args.max_message_mb as usize * 1024 * 1024;
    let sopts = ServiceOptions {
        workers,
        queue_depth: args.queue_depth,
        queue_per_connection: args
            .queue_per_connection
            .unwrap_or(args.queue_depth / 4)
            .max(1),
        max_message_bytes,
        embodiment: args.embodiment.clone(),
        session_id: recording.session_id().to_string(),
    };
    let tcfg = TelemetryConfig::resolve(
        args.otel_endpoint.as_deref(),
        args.otel_sample,
        args.metrics_listen,
        "reflex",
        |k| std::env::var(k).ok(),
    );
    let mut telemetry = Telemetry::start(&tcfg).await?;
    let service = Arc::new(
        PolicyService::new(Arc::new(policy), &sopts, recording).with_telemetry(telemetry.act()),
    );
    // Only a shared daemon's socket is known here; see `telemetry` on the private child.
    // The recorder's own gauges (bytes, degraded) come from its Status, shared daemon or private child.
    telemetry.observe(
        service.recording().counters(),
        service.recording().recorder_uri().map(String::from),
    );
    let metrics = telemetry.metrics_addr;

    // Bind everything before serving anything: a bad address fails the start.
    let mut bound = Vec::new();
    for l in &args.listen {
        bound.push(bind(l).await?);
    }
    let listening: Vec<ListenAddr> = bound.iter().map(|b| b.addr.clone()).collect();
    let http_listener = match args.http_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on --http-listen {a}"))?,
        ),
        None => None,
    };
    let http = match &http_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let openpi_listener = match args.openpi_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on --openpi-listen {a}"))?,
        ),
        None => None,
    };
    let openpi = match &openpi_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };

    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<PolicyServer<PolicyHandle>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(reflex_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("reflex.v1.Policy")
        .with_service_name("grpc.health.v1.Health")
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(reflex_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("reflex.v1.Policy")
        .with_service_name("grpc.health.v1.Health")
        .build_v1alpha()?;
    // The transport refuses messages far over the limit before decoding them;
    // those up to 4× the limit decode and get a clear INVALID_ARGUMENT.
    use crate::budget::BudgetLayer;
    use tower::layer::util::{Identity, Stack};
    let policy_svc = PolicyServer::new(PolicyHandle(service.clone()))
        .max_decoding_message_size(max_message_bytes.saturating_mul(4))
        .max_encoding_message_size(max_message_bytes.saturating_mul(4));

    // One router per listener. TCP: TLS if configured, the token on everything but
    // Health. Unix: neither (file permissions guard the socket). A closure, because the
    // reflection services' types cannot be named.
    // Unfinished request messages: one decoding limit per connection, four across all
    // of them (a full-size message always fits; partial ones cannot pile up).
    let decoding_limit = max_message_bytes.saturating_mul(4);
    let budget = crate::budget::BudgetLayer::new(crate::budget::Limits {
        per_connection: decoding_limit,
        total: decoding_limit.saturating_mul(4),
    });
    let router_for = |tcp: bool| -> anyhow::Result<Router<Stack<BudgetLayer, Identity>>> {
        let mut builder = Server::builder()
            .layer(budget.clone())
            .max_concurrent_streams(Some(args.max_streams))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)));
        if tcp && let Some(tls) = &access.tls {
            builder = builder
                .tls_config(tls.clone())
                .context("cannot set up TLS")?;
        }
        let router = builder.add_service(health_svc.clone());
        Ok(match access.token.as_ref().filter(|_| tcp) {
            Some(t) => {
                let guard = |service| BearerAuth::new(t.clone(), service);
                router
                    .add_service(InterceptedService::new(
                        reflection_v1.clone(),
                        guard("grpc.reflection.v1.ServerReflection"),
                    ))
                    .add_service(InterceptedService::new(
                        reflection_v1alpha.clone(),
                        guard("grpc.reflection.v1alpha.ServerReflection"),
                    ))
                    .add_service(InterceptedService::new(
                        policy_svc.clone(),
                        guard("reflex.v1.Policy"),
                    ))
            }
            None => router
                .add_service(reflection_v1.clone())
                .add_service(reflection_v1alpha.clone())
                .add_service(policy_svc.clone()),
        })
    };

    let stop_accepting = CancellationToken::new();
    let mut listeners = JoinSet::new();
    let mut described = Vec::new();
    for b in bound {
        let tcp = matches!(b.listener, Bound::Tcp(_));
        let router = router_for(tcp)?;
        described.push(access.describe(&b.addr, tcp));
        let stop = stop_accepting.clone();
        let addr = b.addr.clone();
        listeners.spawn(async move {
            let res = match b.listener {
                Bound::Tcp(l) => {
                    let incoming = TcpIncoming::from(l).with_nodelay(Some(true));
                    router
                        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                        .await
                }
                Bound::Unix(l) => {
                    // Python grpcio, grpc-java and grpcurl -unix send the socket
                    // path as :authority, which h2 refuses; the adapter rewrites it.
                    let incoming = reflex_listen::unix_incoming(l);
                    router
                        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                        .await
                }
            };
            if let ListenAddr::Unix(p) = &addr {
                let _ = std::fs::remove_file(p);
            }
            res.with_context(|| format!("listener {addr} failed"))
        });
    }
    if let (Some(l), Some(addr)) = (http_listener, http) {
        let fe = Arc::new(crate::frontend::http::HttpFrontend::new(
            access.front_end(&service),
            max_message_bytes,
        ));
        let stop = stop_accepting.clone();
        listeners.spawn(async move {
            crate::frontend::serve(fe, l, stop).await;
            Ok(())
        });
        tracing::info!(
            listen = %format!(
                "{}://{addr}",
                if access.http_tls.is_some() { "https" } else { "http" }
            ),
            tls = access.http_tls.is_some(),
            auth = if access.token.is_some() { "token" } else { "none" },
            "serving the seed tool's HTTP API"
        );
    }
    if let (Some(l), Some(addr)) = (openpi_listener, openpi) {
        let mapping =
            crate::frontend::openpi::mapping::Mapping::new(openpi_keys, &service.info().cameras);
        if !mapping.unused_cameras().is_empty() {
            tracing::info!(
                keys = mapping.unused_cameras().join(", "),
                cameras = service.info().cameras.len(),
                "openpi camera keys beyond the model's cameras are checked and not used"
            );
        }
        let keys = mapping.describe();
        let fe = Arc::new(crate::frontend::openpi::OpenpiFrontend::new(
            access.front_end(&service),
            mapping,
            max_message_bytes,
        ));
        let stop = stop_accepting.clone();
        listeners.spawn(async move {
            crate::frontend::serve(fe, l, stop).await;
            Ok(())
        });
        tracing::info!(
            listen = %format!(
                "{}://{addr}",
                if access.http_tls.is_some() { "wss" } else { "ws" }
            ),
            tls = access.http_tls.is_some(),
            auth = if access.token.is_some() { "token" } else { "none" },
            keys,
            "serving openpi's websocket policy protocol"
        );
    }
    for d in &described {
        tracing::info!(
            listen = %d.addr,
            tls = d.tls,
            auth = %d.auth,
            max_streams = args.max_streams,
            "serving"
        );
    }
    let on: Vec<String> = described.iter().map(ToString::to_string).collect();
    crate::systemd::ready(&format!(
        "serving model {} ({}) on {}",
        service.policy().model_hash(),
        service.policy().mode(),
        on.join(", ")
    ));
    crate::systemd::spawn_watchdog(service.clone(), stop_accepting.clone());

    let drain = Duration::from_millis(args.drain_ms);
    let svc = service.clone();
    let task = tokio::spawn(async move {
        let failed = tokio::select! {
            _ = shutdown.cancelled() => None,
            // A listener that ends on its own has failed: take the server down.
            Some(res) = listeners.join_next() => Some(res),
        };
        tracing::info!("shutting down");
        crate::systemd::stopping();
        health.set_not_serving::<PolicyServer<PolicyHandle>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        stop_accepting.cancel();
        let drained = tokio::time::timeout(drain, async {
            while listeners.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                drain_ms = drain.as_millis() as u64,
                "in-flight calls did not finish in time"
            );
            listeners.abort_all();
        }
        svc.recording().finish("shutdown").await;
        // Last: the spans of the drained calls go out before the exporters close.
        telemetry.shutdown().await;
        tracing::info!("stopped");
        match failed {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(e)) => Err(anyhow::anyhow!("listener task panicked: {e}")),
            _ => Ok(()),
        }
    });
    Ok(Running {
        listening,
        service,
        metrics,
        http,
        openpi,
        task,
    })
}

/// What guards the TCP listeners, from `--auth-token-file`, `--tls-cert`/`--tls-key` and
/// `--insecure`.
struct Access {
    token: Option<Arc<AuthToken>>,
    tls: Option<ServerTlsConfig>,
    /// The same certificate for `--http-listen` and `--openpi-listen` (HTTP/1.1).
    http_tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl Access {
    /// Applies the loopback rule, then reads the token and the TLS files.
    fn resolve(args: &ServeArgs) -> anyhow::Result<Access> {
        // --http-listen and --openpi-listen are TCP listeners like any other: the same rules.
        let tcp: Vec<SocketAddr> = args
            .listen
            .iter()
            .filter_map(|l| match l {
                ListenAddr::Tcp(a) => Some(*a),
                ListenAddr::Unix(_) => None,
            })
            .chain(args.http_listen)
            .chain(args.openpi_listen)
            .collect();
        let exposed: Vec<SocketAddr> = tcp
            .iter()
            .copied()
            .filter(|a| !a.ip().is_loopback())
            .collect();
        if let Some(a) = exposed.first()
            && args.auth_token_file.is_none()
            && !args.insecure
        {
            bail!(
                "refusing to listen on {a}: it is not a loopback address and no --auth-token-file is set; \
                 give the server a token with --auth-token-file FILE (clients send `authorization: Bearer TOKEN`), \
                 listen on a Unix socket or 127.0.0.1, or pass --insecure if the network is trusted"
            );
        }
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(crate::auth::load_tls(cert, key)?),
            (None, None) => None,
            _ => bail!("--tls-cert and --tls-key go together: give both or neither"),
        };
        let token = match &args.auth_token_file {
            Some(path) => Some(Arc::new(AuthToken::load(path)?)),
            None => None,
        };
        for a in &exposed {
            match (&token, &tls) {
                (None, _) => tracing::warn!(
                    listen = %a,
                    "--insecure: serving a non-loopback address without authentication"
                ),
                (Some(_), None) => tracing::warn!(
                    listen = %a,
                    "the bearer token travels in clear text on a non-loopback address; add --tls-cert and --tls-key"
                ),
                (Some(_), Some(_)) => {}
            }
        }
        if tcp.is_empty() && (token.is_some() || tls.is_some()) {
            tracing::warn!(
                "--auth-token-file and --tls-* apply to TCP listeners only, and there is none: \
                 Unix sockets are guarded by their file permissions"
            );
        }
        let front_ends = args.http_listen.is_some() || args.openpi_listen.is_some();
        let http_tls = match (front_ends, &args.tls_cert, &args.tls_key) {
            (true, Some(cert), Some(key)) => {
                Some(crate::auth::load_rustls(cert, key, &[b"http/1.1"])?)
            }
            _ => None,
        };
        Ok(Access {
            token,
            tls,
            http_tls,
        })
    }

    /// What a front-end's listener shares with the others: the Act seam, the token, and
    /// the certificate.
    fn front_end(&self, service: &Arc<PolicyService>) -> crate::frontend::Shared {
        crate::frontend::Shared::new(service.clone(), self.token.clone(), self.http_tls.clone())
    }

    fn describe(&self, addr: &ListenAddr, tcp: bool) -> ListenerAccess {
        ListenerAccess {
            addr: addr.clone(),
            tls: tcp && self.tls.is_some(),
            auth: match (tcp, &self.token) {
                (false, _) => "socket-permissions",
                (true, Some(_)) => "token",
                (true, None) => "none",
            },
        }
    }
}

/// One listener and what guards it, for the log and systemd's status line.
struct ListenerAccess {
    addr: ListenAddr,
    tls: bool,
    auth: &'static str,
}

impl std::fmt::Display for ListenerAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tls = if self.tls { "tls, " } else { "" };
        write!(f, "{} ({tls}auth: {})", self.addr, self.auth)
    }
}

/// The recording session this server's flags ask for.
fn recording_for(args: &ServeArgs, policy: &Policy) -> Recording {
    let target = match (&args.recorder, &args.record) {
        (Some(uri), dir) => {
            if dir.is_some() {
                tracing::warn!(
                    "--record DIR is ignored with --recorder: the shared recorder owns its folder"
                );
            }
            RecordTarget::Daemon(uri.clone())
        }
        (None, Some(dir)) => RecordTarget::Private(dir.clone()),
        (None, None) => return Recording::off(),
    };
    let cfg = policy.config();
    let session = pb::SessionStart {
        reflex_version: env!("CARGO_PKG_VERSION").into(),
        model_hash: policy.model_hash().into(),
        config_hash: policy.config_hash().into(),
        export_dir: std::fs::canonicalize(policy.export_dir())
            .unwrap_or_else(|_| policy.export_dir().to_path_buf())
            .display()
            .to_string(),
        model_type: cfg.model_type.clone(),
        export_kind: cfg.export_kind.clone(),
        embodiment: args.embodiment.clone(),
        mode: policy.mode().into(),
        hardware: policy.hardware().into_iter().collect(),
        export: cfg.export.clone().into_iter().collect(),
        ..Default::default()
    };
    let opts = RecordOptions {
        target,
        image_mode: args.record_images,
        no_gzip: args.record_no_gzip,
        queue: args.record_queue as usize,
    };
    tracing::info!(target = ?opts.target, images = opts.image_mode.as_str(), "recording on");
    Recording::start(opts, session)
}

enum Bound {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

struct BoundListener {
    addr: ListenAddr,
    listener: Bound,
}

async fn bind(addr: &ListenAddr) -> anyhow::Result<BoundListener> {
    match addr {
        ListenAddr::Tcp(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a}"))?;
            let local = l.local_addr()?;
            Ok(BoundListener {
                addr: ListenAddr::Tcp(local),
                listener: Bound::Tcp(l),
            })
        }
        ListenAddr::Unix(p) => {
            let l = reflex_listen::bind_unix(p)?;
            Ok(BoundListener {
                addr: addr.clone(),
                listener: Bound::Unix(l),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "127.0.0.1:5".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:5".parse().unwrap())
        );
        assert_eq!(
            "tcp://[::1]:7".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("[::1]:7".parse().unwrap())
        );
        assert_eq!(
            "unix:///run/x.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
        assert_eq!(
            "unix:a.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("a.sock".into())
        );
        assert!(
            "localhost"
                .parse::<ListenAddr>()
                .unwrap_err()
                .contains("not a listen address")
        );
        assert!("unix://".parse::<ListenAddr>().is_err());
    }

    async fn start_err(args: ServeArgs) -> String {
        format!(
            "{:#}",
            start(args, CancellationToken::new()).await.err().unwrap()
        )
    }

    #[tokio::test]
    async fn non_loopback_tcp_needs_a_token_or_insecure() {
        let args = ServeArgs::new("/nonexistent".into(), vec!["0.0.0.0:0".parse().unwrap()]);
        let err = start_err(args.clone()).await;
        assert!(
            err.contains("not a loopback address")
                && err.contains("--auth-token-file")
                && err.contains("--insecure"),
            "{err}"
        );
        // With a token (or --insecure) the access check passes; the start then fails on
        // the missing model, which shows it got that far.
        let d = tempfile::tempdir().unwrap();
        let token = d.path().join("token");
        std::fs::write(&token, "0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let with_token = ServeArgs {
            auth_token_file: Some(token),
            ..args.clone()
        };
        let err = start_err(with_token).await;
        assert!(err.contains("cannot load the model"), "{err}");
        let insecure = ServeArgs {
            insecure: true,
            ..args
        };
        let err = start_err(insecure).await;
        assert!(err.contains("cannot load the model"), "{err}");
    }

    #[tokio::test]
    async fn tls_is_both_files_or_neither_and_checked_before_loading() {
        let args = ServeArgs {
            tls_cert: Some("/nonexistent/cert.pem".into()),
            ..ServeArgs::new("/nonexistent".into(), vec!["127.0.0.1:0".parse().unwrap()])
        };
        let err = start_err(args.clone()).await;
        assert!(
            err.contains("--tls-cert and --tls-key go together"),
            "{err}"
        );
        let both = ServeArgs {
            tls_key: Some("/nonexistent/key.pem".into()),
            ..args
        };
        let err = start_err(both).await;
        assert!(
            err.contains("cannot read --tls-cert /nonexistent/cert.pem"),
            "{err}"
        );
    }

    #[test]
    fn access_flags_parse_with_their_defaults() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: ServeArgs,
        }
        let a = Cli::try_parse_from(["serve", "x"]).unwrap().args;
        assert_eq!(
            (a.max_streams, a.auth_token_file, a.tls_cert, a.insecure),
            (256, None, None, false)
        );
        assert!(Cli::try_parse_from(["serve", "x", "--max-streams", "0"]).is_err());
        let e = Cli::try_parse_from(["serve", "x", "--tls-key", "k.pem"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--tls-cert"), "{e}");
        let a = Cli::try_parse_from([
            "serve",
            "x",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--auth-token-file",
            "t",
            "--max-streams",
            "8",
        ])
        .unwrap()
        .args;
        assert_eq!(a.max_streams, 8);
        assert_eq!(a.auth_token_file.as_deref(), Some(Path::new("t")));
    }
}
