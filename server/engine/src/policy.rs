//! The policy pipeline around an engine: one Act from validated input to
//! de-normalised actions.
//!
//! Order of work for one call: hash each camera image (SHA-256) → look the
//! prefix up in the cache (key: image hashes + instruction) → on a miss decode,
//! resize and normalise the images, tokenize the instruction and run the
//! prefix graph → draw noise from ChaCha8 seeded with the request's seed (or a
//! fresh one) → Euler-integrate the expert → de-normalise. The same seed and
//! inputs give the same actions bit for bit.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use crate::config::{ConfigError, ExportConfig, ImageConfig, hex, model_hash};
use crate::contract::ExportV2;
use crate::engine::{Engine, EngineError, EngineKind, Shapes, cpu::CpuEngine, cuda::CudaEngine};
use crate::preprocess::{self, ImageError};
use crate::seed::SeedOptions;
use crate::tokenizer;
use crate::vla::{Observation, VlaModel};

/// Longest instruction accepted, in bytes.
pub const MAX_INSTRUCTION_BYTES: usize = 4096;

/// One camera frame as it arrived.
#[derive(Debug, Clone)]
pub struct FrameInput {
    /// Position of this image in the request's `images` list (for messages).
    pub index: usize,
    pub data: Vec<u8>,
    /// Hex SHA-256 the client says `data` has, checked when present.
    pub expect_sha256: Option<String>,
    /// Name of the request field that carried the expected hash.
    pub sha_field: String,
}

/// A request mapped onto the model's cameras; built by the service. Already canonical: the
/// wire's two forms of the primary image (`image_b64`, `images[0]`) are resolved before
/// (by `reflex_proto::images`, which this crate does not depend on), so slot 0 is the
/// primary camera and nothing here knows the wire's forms.
#[derive(Debug, Clone, Default)]
pub struct ActInput {
    /// One slot per configured camera, in config order.
    pub frames: Vec<Option<FrameInput>>,
    pub instruction: String,
    pub state: Vec<f32>,
    pub noise_seed: Option<u64>,
    /// The flow-matching noise itself (chunk × the graph's action width, row-major),
    /// replacing the draw from the seed.
    pub noise: Option<Vec<f32>>,
}

/// Something wrong with the request; each message names the field.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InputError {
    #[error("images is empty: the primary camera {camera:?} image is required")]
    MissingPrimary { camera: String },
    #[error("images has {got} entries; this model has {max} cameras ({cameras})")]
    TooManyImages {
        got: usize,
        max: usize,
        cameras: String,
    },
    #[error("images[{index}].camera {name:?} is not a camera of this model (cameras: {cameras})")]
    UnknownCamera {
        index: usize,
        name: String,
        cameras: String,
    },
    #[error("images[{index}].camera {name:?} appears twice")]
    DuplicateCamera { index: usize, name: String },
    #[error("images[0] must be the primary camera {primary:?}, got {got:?}")]
    PrimaryNotFirst { primary: String, got: String },
    #[error(
        "images[{index}].data is empty (camera {camera:?}); a trace recorded with --record-images hash_only keeps only hashes: replay it with --image-dir"
    )]
    EmptyImage { index: usize, camera: String },
    #[error("images[{index}].data (camera {camera:?}) {source}")]
    BadImage {
        index: usize,
        camera: String,
        source: ImageError,
    },
    #[error("{field} does not match the SHA-256 of the image bytes ({actual})")]
    ShaMismatch { field: String, actual: String },
    #[error("state has {got} values; this model takes {want}")]
    StateLength { got: usize, want: usize },
    #[error("state[{index}] is not a finite number")]
    StateNotFinite { index: usize },
    #[error(
        "state[{index}] is {value:e}, out of this model's range (normalised by its mean and std it is not a finite number)"
    )]
    StateOutOfRange { index: usize, value: f32 },
    #[error(
        "noise has {got} values; this model takes {rows} × {width} (num_actions × the graph's action width)"
    )]
    NoiseLength {
        got: usize,
        rows: usize,
        width: usize,
    },
    #[error(
        "noise_seed {seed} is not below 2^32: this export draws its noise as the seed tool's monolithic servers do (numpy's RandomState)"
    )]
    NoiseSeedTooLarge { seed: u64 },
    #[error(
        "noise drives this model's actions out of range (non-finite); noise holds draws of a standard normal"
    )]
    NoiseOutOfRange,
    #[error("noise[{index}] is not a finite number")]
    NoiseNotFinite { index: usize },
    #[error("instruction is {got} bytes; the limit is {MAX_INSTRUCTION_BYTES}")]
    InstructionTooLong { got: usize },
    #[error("request is {got} bytes; the limit is {limit} bytes (--max-message-mb)")]
    TooLarge { got: usize, limit: usize },
}

/// Why an Act did not produce actions.
#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Disabled,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Disabled => "n/a",
        }
    }
}

/// Per-stage wall time of one call, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimes {
    pub decode_ms: f64,
    pub prefix_ms: f64,
    pub denoise_ms: f64,
    pub postprocess_ms: f64,
}

#[derive(Debug, Clone)]
pub struct ActOutput {
    /// Row-major chunk × action_dim, robot units.
    pub actions: Vec<f32>,
    pub noise_seed: u64,
    pub cache: CacheStatus,
    pub times: StageTimes,
    pub steps_used: u32,
    /// Hex SHA-256 per camera slot (None: camera absent).
    pub image_sha256: Vec<Option<String>>,
}

/// Knobs of the policy that are not part of the export.
#[derive(Debug, Clone)]
pub struct PolicyOptions {
    pub engine: EngineKind,
    /// With the cuda engine: replay the prefix and the denoise loop as CUDA
    /// graphs (default) instead of launching op by op.
    pub cuda_graphs: bool,
    /// With the cuda engine on a real export: how weights and activations are stored
    /// (`--precision f32|f16|bf16`; half runs the GEMMs on tensor cores, accumulating in f32).
    pub precision: crate::engine::graph::Precision,
    /// Prefix cache entries; 0 disables the cache (status "n/a").
    pub cache_entries: usize,
    /// The prefix cache's bound in bytes (device memory where the engine keeps prefixes on
    /// the GPU): the cache holds at most `cache_max_bytes / entry_bytes` entries, fewer than
    /// `cache_entries` when prefixes are big (a pi0.5 KV cache is tens of MB).
    pub cache_max_bytes: usize,
    /// For a seed-tool export: `--tokenizer`, `--stats`, `--seed-quirks`.
    pub seed: SeedOptions,
    /// `--engine ort`: the onnxruntime library (`--ort-lib`; else `ORT_DYLIB_PATH`) and its
    /// intra-op threads.
    pub ort_lib: Option<PathBuf>,
    pub ort_threads: usize,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions {
            engine: EngineKind::Cpu,
            cuda_graphs: true,
            precision: Default::default(),
            cache_entries: 1024,
            cache_max_bytes: DEFAULT_CACHE_BYTES,
            seed: SeedOptions::default(),
            ort_lib: None,
            ort_threads: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

type CacheKey = [u8; 32];

/// Bytes one cache entry costs beside its features, rounded up from what `lru` 0.19
/// allocates: the LRU node (32-byte key, the `Arc<[f32]>` pointer, two links: 64), the
/// `Arc` header (16), the hash table's slot at its load factor (~20) and allocator
/// headers.
const CACHE_ENTRY_OVERHEAD: usize = 160;

/// The prefix cache's default bound in bytes (`--cache-mb 2048`).
pub const DEFAULT_CACHE_BYTES: usize = 2 << 30;

/// The prefix cache's worst case: every entry in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheCapacity {
    pub entries: usize,
    /// One entry: the prefix's tensors (or `prefix_dim` f32 features) plus
    /// [`CACHE_ENTRY_OVERHEAD`] of host bookkeeping.
    pub entry_bytes: usize,
    /// `entries × entry_bytes`: the cache never holds more.
    pub max_bytes: usize,
    /// `device` when the prefixes are kept in GPU memory (the cuda engine on a real
    /// export), else `host`.
    pub location: &'static str,
    /// Whether the byte bound, not the entry count, set `entries`.
    pub limited_by_bytes: bool,
}

/// The prefix cache: at most `opts.cache_entries`, and no more than fit in
/// `opts.cache_max_bytes` at `prefix_bytes` each (plus bookkeeping); `None` when that is zero.
fn prefix_cache(
    opts: &PolicyOptions,
    prefix_bytes: usize,
) -> Option<Mutex<lru::LruCache<CacheKey, Cached>>> {
    let entry = prefix_bytes + CACHE_ENTRY_OVERHEAD;
    let entries = opts.cache_entries.min(opts.cache_max_bytes / entry);
    if entries == 0 && opts.cache_entries > 0 {
        tracing::warn!(
            prefix_bytes,
            cache_max_bytes = opts.cache_max_bytes,
            "one prefix is larger than the prefix cache's byte bound: the cache is off"
        );
    }
    NonZeroUsize::new(entries).map(|n| Mutex::new(lru::LruCache::new(n)))
}
/// One prefix and one denoise on zeros: the first Act then pays no kernel
/// load or graph capture, and a broken device shows at start.
/// One zero observation through a real export's whole model (prefix and denoise, or the
/// monolithic graph): finite actions of the right length, or the error.
fn warm_up_vla(m: &VlaModel) -> Result<(), EngineError> {
    let v = blank_actions(m, true)?;
    if v.len() != m.chunk * m.action_width || v.iter().any(|x| !x.is_finite()) {
        return Err(EngineError::Run {
            graph: "vla",
            message: "warm-up: the actions are not finite".into(),
        });
    }
    Ok(())
}

/// A real export's actions for a blank observation (black frames, the first camera present,
/// no instruction, zero state and noise): the monolithic graph, or the denoise loop over the
/// prefix graph's output (`through_prefix`) or over a zero prefix.
fn blank_actions(m: &VlaModel, through_prefix: bool) -> Result<Vec<f32>, EngineError> {
    let cams = m.spec.cameras.len();
    let hwc = vec![0u8; m.height * m.width * 3 * cams];
    let mut present = vec![false; cams];
    present[0] = true;
    let state = m.state_values(&vec![0.0; m.spec.state.dim]);
    let obs = Observation {
        hwc: &hwc,
        present: &present,
        instruction: "",
        state: state.as_deref(),
    };
    let noise = vec![0.0f32; m.chunk * m.action_width];
    if m.is_monolithic() {
        m.run_monolithic(&obs, &noise, state.as_deref())
    } else if through_prefix {
        m.denoise(&m.prefix(&obs)?, &noise, state.as_deref())
    } else {
        m.denoise(&m.zero_prefix()?, &noise, state.as_deref())
    }
}

fn warm_up(e: &dyn Engine, s: &Shapes, steps: u32) -> Result<(), EngineError> {
    let pixels = vec![0.0; s.cameras * 3 * s.height * s.width];
    let prefix = e.prefix(&pixels, &vec![0; s.tokens])?;
    let x = e.denoise(
        vec![0.0; s.chunk * s.action_dim],
        &prefix,
        &vec![0.0; s.state_dim],
        steps,
    )?;
    if x.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(EngineError::Run {
            graph: "expert",
            message: "the warm-up denoise gave non-finite values".into(),
        })
    }
}

/// What the server, ModelInfo and the trace header know of a loaded export, whatever its
/// format: the request contract (cameras, the robot's state and action widths) and facts.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFacts {
    pub model_type: String,
    pub export_kind: String,
    /// Camera names in request order; the first is the primary camera.
    pub cameras: Vec<String>,
    pub image_height: u32,
    pub image_width: u32,
    /// The robot's state width (a request's `state`).
    pub state_dim: usize,
    /// The robot's action width (columns of the answer).
    pub action_dim: usize,
    pub chunk_size: usize,
    pub denoise_steps: u32,
    pub max_tokens: usize,
    /// Width of one row of the `noise` a request may carry (the graph's padded action width).
    pub noise_width: usize,
    /// The export described: format, tokenizer and its hash, stats source, image range,
    /// noise policy, seed quirks (ModelInfo's and the trace header's `export`).
    pub export: BTreeMap<String, String>,
}

/// The model behind a policy: our reference format (v1, any engine) or a real VLA export
/// (format_version 2 or the seed tool's layouts, the cpu engine).
enum Runtime {
    Reference {
        cfg: Box<ExportConfig>,
        norm: crate::engine::PixelNorm,
        engine: Box<dyn Engine>,
    },
    Vla(Box<VlaModel>),
}

/// One entry of the prefix cache.
#[derive(Clone)]
enum Cached {
    Features(std::sync::Arc<[f32]>),
    Prefix(std::sync::Arc<crate::vla::Prefix>),
}

/// An export's `reflex_config.json`, by format.
// Built once per load and taken apart at once: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Export {
    V1(ExportConfig),
    V2 {
        spec: ExportV2,
        /// The seed mapping's decisions (empty for a native v2 export).
        notes: Vec<String>,
        seed: bool,
    },
}

fn read_export(dir: &Path, opts: &SeedOptions) -> Result<Export, LoadError> {
    let path = dir.join(crate::config::CONFIG_FILE);
    let bytes = std::fs::read(&path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            ConfigError::Missing(dir.to_path_buf())
        } else {
            ConfigError::Read {
                path: path.clone(),
                error,
            }
        }
    })?;
    let invalid = |message: String| ConfigError::Invalid {
        path: path.clone(),
        message,
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|error| ConfigError::Parse {
            path: path.clone(),
            error,
        })?;
    if crate::seed::is_seed_config(&value) {
        let m = crate::seed::map(dir, &value, opts).map_err(invalid)?;
        let mut notes = m.quirks;
        notes.insert(
            0,
            format!(
                "a reflex-vla (seed tool) export: model_type {}, export_kind {}, mapped onto reflex-export v2",
                value["model_type"], value["export_kind"]
            ),
        );
        return Ok(Export::V2 {
            spec: m.spec,
            notes,
            seed: true,
        });
    }
    if value.get("format_version").and_then(|v| v.as_u64()) == Some(2) {
        let spec: ExportV2 =
            serde_json::from_value(value).map_err(|error| ConfigError::Parse { path, error })?;
        return Ok(Export::V2 {
            spec,
            notes: vec![],
            seed: false,
        });
    }
    Ok(Export::V1(ExportConfig::load(dir)?))
}

/// An export's graph files by role, read from its config as [`Policy::load`] reads it (the
/// seed tool's layouts mapped the same way): what `reflex inspect` compiles.
#[derive(Debug, Clone)]
pub struct ExportGraphs {
    /// "reflex-export v1", "reflex-export v2", or "reflex-vla (seed tool)".
    pub format: String,
    /// reflex-export v1: the reference format, the one the cuda executor serves today.
    pub v1: bool,
    pub model_type: String,
    pub export_kind: String,
    /// Euler steps of one Act.
    pub steps: u32,
    /// True when the expert graph is one step (the server runs the loop), false when the
    /// loop is baked into the graph.
    pub per_step: bool,
    /// (role, path): "embed image", "embed text", "prefix", then "expert" — or "model" for
    /// a monolithic export. A prefix graph's outputs are what one prefix-cache entry holds.
    pub graphs: Vec<(String, PathBuf)>,
    /// Camera slots (the image embedding graph runs once per camera).
    pub cameras: usize,
}

pub fn export_graphs(dir: &Path, seed_opts: &SeedOptions) -> Result<ExportGraphs, LoadError> {
    Ok(match read_export(dir, seed_opts)? {
        Export::V1(cfg) => ExportGraphs {
            format: "reflex-export v1".into(),
            v1: true,
            model_type: cfg.model_type.clone(),
            export_kind: cfg.export_kind.clone(),
            steps: cfg.denoise.steps,
            per_step: true,
            graphs: vec![
                ("prefix".into(), dir.join(&cfg.graphs.prefix)),
                ("expert".into(), dir.join(&cfg.graphs.expert)),
            ],
            cameras: cfg.cameras.len(),
        },
        Export::V2 { spec, seed, .. } => {
            let mut graphs = vec![];
            if let Some(e) = &spec.embed {
                graphs.push(("embed image".to_string(), dir.join(&e.image.graph)));
                graphs.push(("embed text".to_string(), dir.join(&e.text.graph)));
            }
            match &spec.graphs.prefix {
                Some(p) => {
                    graphs.push(("prefix".into(), dir.join(p)));
                    graphs.push(("expert".into(), dir.join(&spec.graphs.expert)));
                }
                None => graphs.push(("model".into(), dir.join(&spec.graphs.expert))),
            }
            ExportGraphs {
                format: if seed {
                    "reflex-vla (seed tool)".into()
                } else {
                    "reflex-export v2".into()
                },
                v1: false,
                model_type: spec.model_type.clone(),
                export_kind: spec.export_kind.clone(),
                steps: spec.denoise.steps,
                per_step: spec.denoise.expert == crate::contract::ExpertMode::PerStep,
                cameras: spec.cameras.len(),
                graphs,
            }
        }
    })
}

/// A real VLA export's model alone, without the serving policy around it (benches): the
/// same config reading and seed mapping as [`Policy::load`].
pub fn load_vla_model(
    dir: &Path,
    seed: &SeedOptions,
    backend: &crate::vla::Backend,
) -> Result<VlaModel, LoadError> {
    match read_export(dir, seed)? {
        Export::V2 { spec, .. } => Ok(VlaModel::load_with(dir, spec, backend)?),
        Export::V1(_) => Err(ConfigError::Invalid {
            path: dir.join(crate::config::CONFIG_FILE),
            message: "this is a reflex-export v1 (reference) export, not a real VLA export".into(),
        }
        .into()),
    }
}

pub struct Policy {
    facts: ModelFacts,
    /// How frames are decoded and fitted to the model's size.
    image: ImageConfig,
    runtime: Runtime,
    // A Mutex, not a sharded map: a lookup is a hash probe (~100 ns) beside
    // milliseconds of inference, and LRU order needs exclusive access anyway.
    cache: Option<Mutex<lru::LruCache<CacheKey, Cached>>>,
    /// `--cache-entries`, before the byte bound.
    cache_entries_asked: usize,
    model_hash: String,
    config_hash: String,
    export_dir: PathBuf,
    seed_base: u64,
    seed_counter: AtomicU64,
    /// Acts whose engine run gave finite actions; `probe_mark`, the count the last
    /// [`Policy::probe`] saw (see there).
    engine_ok: AtomicU64,
    probe_mark: AtomicU64,
}

/// What [`Policy::probe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// Ran the engine on zeros.
    Ran,
    /// Skipped: calls have run the engine to finite actions since the last probe.
    ProvenByCalls,
}

impl Policy {
    /// Loads an export directory: config, hashes, engine (graphs optimised once).
    pub fn load(dir: &Path, opts: &PolicyOptions) -> Result<Self, LoadError> {
        match read_export(dir, &opts.seed)? {
            Export::V1(cfg) => Self::load_reference(dir, cfg, opts),
            Export::V2 { spec, notes, seed } => Self::load_vla(dir, spec, notes, seed, opts),
        }
    }

    fn load_reference(
        dir: &Path,
        cfg: ExportConfig,
        opts: &PolicyOptions,
    ) -> Result<Self, LoadError> {
        let model_hash = model_hash(dir, &cfg.model_files())?;
        let config_hash = cfg.config_hash();
        let shapes = Shapes::of(&cfg);
        let (prefix, expert) = (dir.join(&cfg.graphs.prefix), dir.join(&cfg.graphs.expert));
        let steps = cfg.denoise.steps;
        let cuda = || -> Result<CudaEngine, EngineError> {
            let e = CudaEngine::load(&prefix, &expert, opts.cuda_graphs)?;
            // Runs (and captures) both graphs once, so a device that loads but cannot
            // run fails here, at start — and `auto` can still fall back.
            warm_up(&e, &shapes, steps)?;
            Ok(e)
        };
        let engine: Box<dyn Engine> = match opts.engine {
            EngineKind::Ort => {
                return Err(EngineError::Unavailable {
                    engine: "ort",
                    reason: "it runs real VLA exports (reflex-export v2, the seed tool's layouts); this reference export runs on --engine cpu or cuda".into(),
                }
                .into());
            }
            EngineKind::Cpu => Box::new(CpuEngine::load(&prefix, &expert, shapes)?),
            EngineKind::Cuda => Box::new(cuda()?),
            EngineKind::Auto => match cuda() {
                Ok(e) => Box::new(e),
                Err(e) => {
                    tracing::info!("engine auto: running on cpu, because {e}");
                    Box::new(CpuEngine::load(&prefix, &expert, shapes)?)
                }
            },
        };
        let facts = ModelFacts {
            model_type: cfg.model_type.clone(),
            export_kind: cfg.export_kind.clone(),
            cameras: cfg.cameras.clone(),
            image_height: cfg.image.height,
            image_width: cfg.image.width,
            state_dim: cfg.state_dim,
            action_dim: cfg.action_dim,
            chunk_size: cfg.chunk_size,
            denoise_steps: cfg.denoise.steps,
            max_tokens: cfg.instruction.max_tokens,
            noise_width: cfg.action_dim,
            export: BTreeMap::from([
                ("format".to_string(), "reflex-export v1".to_string()),
                ("tokenizer".to_string(), cfg.instruction.tokenizer.clone()),
                ("stats_source".to_string(), "inline".to_string()),
            ]),
        };
        let cache = prefix_cache(opts, cfg.prefix_dim * std::mem::size_of::<f32>());
        let image = cfg.image.clone();
        let runtime = Runtime::Reference {
            norm: preprocess::pixel_norm(&cfg.image),
            cfg: Box::new(cfg),
            engine,
        };
        Ok(Policy::assemble(
            facts,
            image,
            runtime,
            (cache, opts.cache_entries),
            (model_hash, config_hash),
            dir,
        ))
    }

    /// The fields every runtime's load fills alike: a fresh seed base, zeroed counters.
    fn assemble(
        facts: ModelFacts,
        image: ImageConfig,
        runtime: Runtime,
        (cache, cache_entries_asked): (Option<Mutex<lru::LruCache<CacheKey, Cached>>>, usize),
        (model_hash, config_hash): (String, String),
        dir: &Path,
    ) -> Policy {
        Policy {
            facts,
            image,
            runtime,
            cache,
            cache_entries_asked,
            model_hash,
            config_hash,
            export_dir: dir.to_path_buf(),
            seed_base: os_random_u64(),
            seed_counter: AtomicU64::new(0),
            engine_ok: AtomicU64::new(0),
            probe_mark: AtomicU64::new(0),
        }
    }

    fn load_vla(
        dir: &Path,
        spec: ExportV2,
        notes: Vec<String>,
        seed: bool,
        opts: &PolicyOptions,
    ) -> Result<Self, LoadError> {
        for n in &notes {
            tracing::info!("{n}");
        }
        let config_hash = {
            let value = serde_json::to_value(&spec).expect("the contract serialises");
            crate::config::hex(&Sha256::digest(value.to_string().as_bytes())[..8])
        };
        let backend = match opts.engine {
            EngineKind::Ort => crate::vla::Backend::Ort {
                lib: crate::engine::onnxruntime::library_path(opts.ort_lib.as_deref())?,
                threads: opts.ort_threads,
            },
            EngineKind::Cuda | EngineKind::Auto => crate::vla::Backend::Cuda {
                graphs: opts.cuda_graphs,
                precision: opts.precision,
            },
            EngineKind::Cpu => crate::vla::Backend::Tract,
        };
        // The cuda engine compiles every graph, uploads it and runs one zero observation
        // through the whole model at start, so a device that loads but cannot run fails
        // here — and `auto` can still fall back to the cpu.
        let cuda = || -> Result<VlaModel, EngineError> {
            crate::engine::cuda::check_libraries()?;
            let m = VlaModel::load_with(dir, spec.clone(), &backend)?;
            warm_up_vla(&m)?;
            Ok(m)
        };
        let model = match opts.engine {
            EngineKind::Cuda => cuda()?,
            EngineKind::Auto => match cuda() {
                Ok(m) => m,
                Err(e) => {
                    tracing::info!("engine auto: running on cpu, because {e}");
                    VlaModel::load_with(dir, spec, &crate::vla::Backend::Tract)?
                }
            },
            EngineKind::Cpu | EngineKind::Ort => VlaModel::load_with(dir, spec, &backend)?,
        };
        if let crate::vla::Backend::Ort { lib, threads } = &backend {
            tracing::info!(lib = %lib.display(), threads, "engine ort: onnxruntime runs the graphs");
        }
        let files: Vec<String> = model
            .files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let model_hash = model_hash(dir, &files)?;
        let s = &model.spec;
        let mut export = model.facts();
        if seed {
            let quirks = notes
                .iter()
                .find_map(|n| n.strip_prefix("seed quirks: "))
                .unwrap_or("keep");
            export.insert("seed_quirks".into(), quirks.to_string());
            export.insert("source".into(), "reflex-vla".into());
        }
        let facts = ModelFacts {
            model_type: s.model_type.clone(),
            export_kind: s.export_kind.clone(),
            cameras: s.cameras.iter().map(|c| c.name.clone()).collect(),
            image_height: model.height as u32,
            image_width: model.width as u32,
            state_dim: s.state.dim,
            action_dim: s.actions.dim,
            chunk_size: model.chunk,
            denoise_steps: s.denoise.steps,
            max_tokens: model.tokens,
            noise_width: model.action_width,
            export,
        };
        tracing::info!(
            model_type = %facts.model_type,
            export_kind = %facts.export_kind,
            cameras = %facts.cameras.join(","),
            tokenizer_hash = %model.tokenizer_hash,
            stats = %model.stats_source,
            "real VLA export loaded"
        );
        let image = model.image.clone();
        // A monolithic export has no prefix to keep.
        let cache = if model.is_monolithic() {
            None
        } else {
            prefix_cache(opts, model.prefix_bytes())
        };
        Ok(Policy::assemble(
            facts,
            image,
            Runtime::Vla(Box::new(model)),
            (cache, opts.cache_entries),
            (model_hash, config_hash),
            dir,
        ))
    }

    /// The request contract and facts of the export.
    pub fn config(&self) -> &ModelFacts {
        &self.facts
    }
    /// The reference format's config (None for a real VLA export).
    pub fn reference_config(&self) -> Option<&ExportConfig> {
        match &self.runtime {
            Runtime::Reference { cfg, .. } => Some(cfg),
            Runtime::Vla(_) => None,
        }
    }
    pub fn model_hash(&self) -> &str {
        &self.model_hash
    }
    pub fn config_hash(&self) -> &str {
        &self.config_hash
    }
    pub fn export_dir(&self) -> &Path {
        &self.export_dir
    }
    pub fn mode(&self) -> &'static str {
        match &self.runtime {
            Runtime::Reference { engine, .. } => engine.mode(),
            // The engine's name as `--engine` spells it.
            Runtime::Vla(model) if model.engine == "onnxruntime" => "ort",
            Runtime::Vla(model) if model.engine == "cuda" => "cuda",
            Runtime::Vla(_) => "cpu",
        }
    }
    pub fn hardware(&self) -> BTreeMap<String, String> {
        match &self.runtime {
            Runtime::Reference { engine, .. } => engine.hardware(),
            Runtime::Vla(model) => {
                let mut m = crate::engine::cpu_hardware();
                m.insert("engine".into(), model.engine.into());
                m
            }
        }
    }

    /// The prefix cache's bound in entries and bytes; `None` when the cache is off.
    ///
    /// The bound holds because every cached prefix has the size the export declares (see
    /// [`Policy::act`]), and the LRU evicts beyond its entry count.
    pub fn cache_capacity(&self) -> Option<CacheCapacity> {
        let entries = self.cache.as_ref()?.lock().ok()?.cap().get();
        let (features, location) = match &self.runtime {
            Runtime::Reference { cfg, .. } => (cfg.prefix_dim * std::mem::size_of::<f32>(), "host"),
            Runtime::Vla(m) => (m.prefix_bytes(), m.prefix_location()),
        };
        let entry_bytes = features + CACHE_ENTRY_OVERHEAD;
        Some(CacheCapacity {
            entries,
            entry_bytes,
            max_bytes: entries.saturating_mul(entry_bytes),
            location,
            limited_by_bytes: entries < self.cache_entries_asked,
        })
    }

    /// Checks that need no image work: run on the async side before queueing.
    pub fn check_cheap(&self, input: &ActInput) -> Result<(), InputError> {
        let f = &self.facts;
        if input.state.len() != f.state_dim {
            return Err(InputError::StateLength {
                got: input.state.len(),
                want: f.state_dim,
            });
        }
        if let Some(index) = input.state.iter().position(|v| !v.is_finite()) {
            return Err(InputError::StateNotFinite { index });
        }
        // A finite value can still overflow once normalised (3.4e38 with std 0.5), and the
        // model then answers NaN actions: refuse it here, as the input error it is.
        let in_range = |i: usize, s: f32| match &self.runtime {
            Runtime::Reference { cfg, .. } => {
                let st = &cfg.normalization.state;
                ((s - st.mean[i]) / st.std[i]).is_finite()
            }
            Runtime::Vla(m) => m.state_is_finite(i, s),
        };
        if let Some(index) = (0..input.state.len()).find(|&i| !in_range(i, input.state[i])) {
            return Err(InputError::StateOutOfRange {
                index,
                value: input.state[index],
            });
        }
        if let Some(noise) = &input.noise {
            let want = f.chunk_size * f.noise_width;
            if noise.len() != want {
                return Err(InputError::NoiseLength {
                    got: noise.len(),
                    rows: f.chunk_size,
                    width: f.noise_width,
                });
            }
            if let Some(index) = noise.iter().position(|v| !v.is_finite()) {
                return Err(InputError::NoiseNotFinite { index });
            }
        }
        if let Some(seed) = input.noise_seed
            && seed > u32::MAX as u64
            && matches!(&self.runtime, Runtime::Vla(m) if m.spec.noise == crate::contract::NoisePolicy::Fixed)
        {
            return Err(InputError::NoiseSeedTooLarge { seed });
        }
        if input.instruction.len() > MAX_INSTRUCTION_BYTES {
            return Err(InputError::InstructionTooLong {
                got: input.instruction.len(),
            });
        }
        if input.frames.first().is_none_or(|f| f.is_none()) {
            return Err(InputError::MissingPrimary {
                camera: f.cameras[0].clone(),
            });
        }
        Ok(())
    }

    /// The call's noise: the request's own tensor, else drawn from its seed (fresh, or 0 for
    /// an export whose noise policy is `fixed`). Returns the seed the answer reports.
    fn noise(&self, input: &ActInput) -> (u64, Vec<f32>) {
        let fixed = matches!(&self.runtime, Runtime::Vla(m) if m.spec.noise == crate::contract::NoisePolicy::Fixed);
        let seed = match (input.noise_seed, &input.noise, fixed) {
            (Some(s), _, _) => s,
            (None, Some(_), _) | (None, None, true) => 0,
            (None, None, false) => self.fresh_seed(),
        };
        let n = self.facts.chunk_size * self.facts.noise_width;
        let noise = match &input.noise {
            Some(noise) => noise.clone(),
            // `check_cheap` keeps a fixed-policy seed below 2^32.
            None if fixed => crate::seed::numpy_legacy_randn(seed as u32, n),
            None => gaussian_noise(seed, n),
        };
        (seed, noise)
    }

    fn lookup(&self, key: Option<&CacheKey>) -> Option<Cached> {
        self.cache.as_ref()?.lock().ok()?.get(key?).cloned()
    }

    fn store(&self, key: Option<CacheKey>, value: Cached) {
        if let (Some(k), Some(c)) = (key, &self.cache)
            && let Ok(mut c) = c.lock()
        {
            c.put(k, value);
        }
    }

    fn miss_status(&self) -> CacheStatus {
        if self.cache.is_some() {
            CacheStatus::Miss
        } else {
            CacheStatus::Disabled
        }
    }

    /// Runs one Act. Blocking: call it from a worker thread, not the runtime.
    pub fn act(&self, input: &ActInput) -> Result<ActOutput, ActError> {
        self.check_cheap(input)?;
        let t0 = Instant::now();
        let image_sha256 = self.hash_frames(input)?;
        // An assembled prefix holds the state token: the state is part of the key then.
        let keyed_state = match &self.runtime {
            Runtime::Vla(m) if m.prefix_takes_state() => Some(input.state.as_slice()),
            _ => None,
        };
        let key = self
            .cache
            .as_ref()
            .map(|_| cache_key(&image_sha256, &input.instruction, keyed_state));
        let cached = self.lookup(key.as_ref());
        let mut times = StageTimes::default();
        let (noise_seed, noise) = self.noise(input);
        let steps = self.facts.denoise_steps;
        let (actions, cache) = match &self.runtime {
            Runtime::Reference { cfg, norm, engine } => {
                let (prefix, cache) = match cached {
                    Some(Cached::Features(p)) => {
                        times.decode_ms = ms(t0);
                        (p, CacheStatus::Hit)
                    }
                    _ => {
                        let (hwc, present) = self.frames(input)?;
                        let tokens = tokenizer::tokenize(
                            &input.instruction,
                            cfg.instruction.vocab_size,
                            cfg.instruction.max_tokens,
                        );
                        times.decode_ms = ms(t0);
                        let t1 = Instant::now();
                        let frames = crate::engine::Frames {
                            hwc: &hwc,
                            present: &present,
                        };
                        let p: std::sync::Arc<[f32]> =
                            engine.prefix_frames(&frames, norm, &tokens)?.into();
                        times.prefix_ms = ms(t1);
                        // Only features of the configured size are kept: what
                        // `cache_capacity` promises.
                        if p.len() == cfg.prefix_dim {
                            self.store(key, Cached::Features(p.clone()));
                        }
                        (p, self.miss_status())
                    }
                };
                let t2 = Instant::now();
                let stats = &cfg.normalization;
                let state: Vec<f32> = input
                    .state
                    .iter()
                    .zip(stats.state.mean.iter().zip(&stats.state.std))
                    .map(|(s, (m, sd))| (s - m) / sd)
                    .collect();
                let mut actions = engine.denoise(noise, &prefix, &state, steps)?;
                times.denoise_ms = ms(t2);
                let t3 = Instant::now();
                let ad = cfg.action_dim;
                for row in actions.chunks_exact_mut(ad) {
                    for (j, a) in row.iter_mut().enumerate() {
                        *a = *a * stats.actions.std[j] + stats.actions.mean[j];
                    }
                }
                times.postprocess_ms = ms(t3);
                (actions, cache)
            }
            Runtime::Vla(m) => {
                let state = m.state_values(&input.state);
                let (graph_actions, cache) = if m.is_monolithic() {
                    let (hwc, present) = self.frames(input)?;
                    times.decode_ms = ms(t0);
                    let t2 = Instant::now();
                    let obs = Observation {
                        hwc: &hwc,
                        present: &present,
                        instruction: &input.instruction,
                        state: state.as_deref(),
                    };
                    let a = m.run_monolithic(&obs, &noise, state.as_deref())?;
                    times.denoise_ms = ms(t2);
                    (a, CacheStatus::Disabled)
                } else {
                    let (prefix, cache) = match cached {
                        Some(Cached::Prefix(p)) => {
                            times.decode_ms = ms(t0);
                            (p, CacheStatus::Hit)
                        }
                        _ => {
                            let (hwc, present) = self.frames(input)?;
                            times.decode_ms = ms(t0);
                            let t1 = Instant::now();
                            let obs = Observation {
                                hwc: &hwc,
                                present: &present,
                                instruction: &input.instruction,
                                state: state.as_deref(),
                            };
                            let p = std::sync::Arc::new(m.prefix(&obs)?);
                            times.prefix_ms = ms(t1);
                            self.store(key, Cached::Prefix(p.clone()));
                            (p, self.miss_status())
                        }
                    };
                    let t2 = Instant::now();
                    let a = m.denoise(&prefix, &noise, state.as_deref())?;
                    times.denoise_ms = ms(t2);
                    (a, cache)
                };
                let t3 = Instant::now();
                let actions = m.robot_actions(&graph_actions);
                times.postprocess_ms = ms(t3);
                (actions, cache)
            }
        };
        // Never answer a robot with NaN or infinite actions: finite but huge noise can make
        // them (found by fuzz_act_request_any); the request's fault when it brought the noise.
        if actions.iter().any(|a| !a.is_finite()) {
            return Err(match input.noise {
                Some(_) => InputError::NoiseOutOfRange.into(),
                None => EngineError::Run {
                    graph: "expert",
                    message: "the model produced non-finite actions".into(),
                }
                .into(),
            });
        }
        self.engine_ok.fetch_add(1, Ordering::Relaxed);
        Ok(ActOutput {
            actions,
            noise_seed,
            cache,
            times,
            steps_used: steps,
            image_sha256,
        })
    }

    /// A liveness check for the watchdog: the cheapest call that still goes through the
    /// engine (and, for a GPU engine, the device) — one expert step on zeros for the
    /// reference format; the expert (or the one graph) on zeros for a real export. Blocking,
    /// like [`Policy::act`]; it touches neither the cache nor the seed sequence.
    ///
    /// For a real export that probe is a whole denoise (a baked loop or a monolithic graph:
    /// seconds on a CPU at real scale), so it is skipped when calls have run the engine to
    /// finite actions since the previous probe ([`Probed::ProvenByCalls`]): a busy server's
    /// calls prove its engine, an idle one runs the probe. A wedged engine stops the calls
    /// from succeeding, so the next probe runs and hangs, and the watchdog sees it.
    pub fn probe(&self) -> Result<Probed, EngineError> {
        if matches!(self.runtime, Runtime::Vla(_)) {
            let seen = self.engine_ok.load(Ordering::Relaxed);
            if self.probe_mark.swap(seen, Ordering::Relaxed) != seen {
                return Ok(Probed::ProvenByCalls);
            }
        }
        let f = &self.facts;
        let (v, want) = match &self.runtime {
            Runtime::Reference { cfg, engine, .. } => {
                let x = vec![0.0f32; cfg.chunk_size * cfg.action_dim];
                let v = engine.expert_step(
                    &x,
                    0.0,
                    &vec![0.0; cfg.prefix_dim],
                    &vec![0.0; cfg.state_dim],
                )?;
                (v, x.len())
            }
            Runtime::Vla(m) => (blank_actions(m, false)?, f.chunk_size * f.noise_width),
        };
        if v.len() != want || v.iter().any(|f| !f.is_finite()) {
            return Err(EngineError::Run {
                graph: "expert",
                message: format!(
                    "liveness probe: {} values, non-finite or not {want}",
                    v.len()
                ),
            });
        }
        Ok(Probed::Ran)
    }

    fn hash_frames(&self, input: &ActInput) -> Result<Vec<Option<String>>, InputError> {
        let mut out = Vec::with_capacity(input.frames.len());
        for (slot, frame) in input.frames.iter().enumerate() {
            let Some(f) = frame else {
                out.push(None);
                continue;
            };
            if f.data.is_empty() {
                return Err(InputError::EmptyImage {
                    index: f.index,
                    camera: self.facts.cameras[slot].clone(),
                });
            }
            let sha = hex(&Sha256::digest(&f.data));
            if let Some(want) = &f.expect_sha256
                && !want.eq_ignore_ascii_case(&sha)
            {
                return Err(InputError::ShaMismatch {
                    field: f.sha_field.clone(),
                    actual: sha,
                });
            }
            out.push(Some(sha));
        }
        Ok(out)
    }

    /// Each camera slot's decoded frame (HWC RGB at the model's size; zeros when
    /// absent) and which slots are present.
    fn frames(&self, input: &ActInput) -> Result<(Vec<u8>, Vec<bool>), InputError> {
        let img = &self.image;
        let per = 3 * (img.height * img.width) as usize;
        let cams = self.facts.cameras.len();
        let mut hwc = vec![0u8; per * cams];
        let mut present = vec![false; cams];
        for (slot, out) in hwc.chunks_exact_mut(per).enumerate() {
            if let Some(f) = input.frames.get(slot).and_then(|f| f.as_ref()) {
                let rgb = preprocess::decode_rgb(&f.data, img).map_err(|source| {
                    InputError::BadImage {
                        index: f.index,
                        camera: self.facts.cameras[slot].clone(),
                        source,
                    }
                })?;
                out.copy_from_slice(&rgb);
                present[slot] = true;
            }
        }
        Ok((hwc, present))
    }

    /// A fresh seed below 2^53, so it survives any JSON tool (jq reads doubles).
    fn fresh_seed(&self) -> u64 {
        let n = self.seed_counter.fetch_add(1, Ordering::Relaxed);
        splitmix64(self.seed_base.wrapping_add(n)) & ((1u64 << 53) - 1)
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn cache_key(
    image_sha256: &[Option<String>],
    instruction: &str,
    state: Option<&[f32]>,
) -> CacheKey {
    let mut h = Sha256::new();
    for s in image_sha256 {
        match s {
            Some(s) => {
                h.update([1u8]);
                h.update(s.as_bytes());
            }
            None => h.update([0u8]),
        }
    }
    h.update(instruction.as_bytes());
    if let Some(state) = state {
        h.update([2u8]);
        for v in state {
            h.update(v.to_bits().to_le_bytes());
        }
    }
    h.finalize().into()
}

/// `n` standard normal f32 from ChaCha8 seeded with `seed` (Box–Muller).
pub fn gaussian_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // u1 in (0, 1]: never ln(0).
        let u1 = ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let th = std::f64::consts::TAU * u2;
        out.push((r * th.cos()) as f32);
        out.push((r * th.sin()) as f32);
    }
    out.truncate(n);
    out
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64 bits from the OS via std's randomly keyed hasher (no extra dependency).
pub fn os_random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::write_reference_export;
    use crate::preprocess::encode_jpeg;

    fn frame(index: usize, data: Vec<u8>) -> Option<FrameInput> {
        Some(FrameInput {
            index,
            data,
            expect_sha256: None,
            sha_field: "images[0].sha256".into(),
        })
    }

    fn image(shade: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(224, 224, |x, y| {
            image::Rgb([
                (x as u8).wrapping_add(shade),
                (y as u8).wrapping_mul(2),
                shade,
            ])
        });
        encode_jpeg(&img, 90)
    }

    fn input(seed: Option<u64>) -> ActInput {
        ActInput {
            frames: vec![frame(0, image(10)), None],
            instruction: "pick up the red cup".into(),
            state: vec![0.0, 0.2, 0.0, -1.8, 0.0, 2.0, 0.8, 0.04],
            noise_seed: seed,
            noise: None,
        }
    }

    fn policy(seed: u64, cache_entries: usize) -> (tempfile::TempDir, Policy) {
        let dir = tempfile::tempdir().unwrap();
        write_reference_export(dir.path(), seed).unwrap();
        let p = Policy::load(
            dir.path(),
            &PolicyOptions {
                cache_entries,
                ..Default::default()
            },
        )
        .unwrap();
        (dir, p)
    }

    #[test]
    fn same_seed_same_bits_other_seed_other_actions() {
        let (_d, p) = policy(0, 0);
        let a = p.act(&input(Some(7))).unwrap();
        let b = p.act(&input(Some(7))).unwrap();
        let c = p.act(&input(Some(8))).unwrap();
        assert_eq!(a.actions.len(), 50 * 7);
        assert!(a.actions.iter().all(|v| v.is_finite()));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.actions), bits(&b.actions));
        assert_ne!(bits(&a.actions), bits(&c.actions));
        assert_eq!(
            (a.noise_seed, a.steps_used, a.cache),
            (7, 10, CacheStatus::Disabled)
        );
    }

    #[test]
    fn the_liveness_probe_runs_the_engine_and_leaves_no_trace() {
        let (_d, p) = policy(0, 4);
        p.act(&input(None)).unwrap();
        assert_eq!(
            p.probe().unwrap(),
            Probed::Ran,
            "the reference probe always runs: one step"
        );
        let after = p.act(&input(None)).unwrap();
        assert_eq!(
            after.cache,
            CacheStatus::Hit,
            "the probe does not touch the prefix cache"
        );
        assert_eq!(
            p.seed_counter.load(Ordering::Relaxed),
            2,
            "nor the seed sequence"
        );
    }

    #[test]
    fn fresh_seeds_are_returned_and_replay_exactly() {
        let (_d, p) = policy(0, 0);
        let a = p.act(&input(None)).unwrap();
        let b = p.act(&input(None)).unwrap();
        assert_ne!(a.noise_seed, b.noise_seed);
        assert!(a.noise_seed < (1 << 53));
        let again = p.act(&input(Some(a.noise_seed))).unwrap();
        assert_eq!(a.actions, again.actions);
    }

    #[test]
    fn actions_are_smooth_over_the_chunk() {
        let (_d, p) = policy(0, 0);
        let out = p.act(&input(Some(1))).unwrap();
        let std = &p.reference_config().unwrap().normalization.actions.std;
        // Mean step between consecutive rows, in units of each dim's std, is
        // well below the spread of the chunk: a trajectory, not noise.
        for j in 0..7 {
            let col: Vec<f32> = out.actions.chunks(7).map(|r| r[j] / std[j]).collect();
            let step: f32 = col.windows(2).map(|w| (w[1] - w[0]).abs()).sum::<f32>() / 49.0;
            let mean = col.iter().sum::<f32>() / 50.0;
            let spread = (col.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 50.0).sqrt();
            assert!(
                step < 0.3 * spread.max(0.05),
                "dim {j}: step {step}, spread {spread}"
            );
        }
    }

    #[test]
    fn cache_hits_on_same_image_and_instruction_and_gives_same_actions() {
        let (_d, p) = policy(0, 8);
        let a = p.act(&input(Some(3))).unwrap();
        let b = p.act(&input(Some(3))).unwrap();
        assert_eq!((a.cache, b.cache), (CacheStatus::Miss, CacheStatus::Hit));
        assert_eq!(a.actions, b.actions);
        assert_eq!(b.times.prefix_ms, 0.0);
        let mut other = input(Some(3));
        other.instruction = "open the drawer".into();
        assert_eq!(p.act(&other).unwrap().cache, CacheStatus::Miss);
        let mut moved = input(Some(3));
        moved.frames[0] = frame(0, image(11));
        let m = p.act(&moved).unwrap();
        assert_eq!(m.cache, CacheStatus::Miss);
        assert_ne!(m.actions, a.actions);
    }

    #[test]
    fn cache_is_bounded() {
        let (_d, p) = policy(0, 2);
        for shade in [1u8, 2, 3] {
            let mut i = input(Some(1));
            i.frames[0] = frame(0, image(shade));
            p.act(&i).unwrap();
        }
        assert_eq!(p.cache.as_ref().unwrap().lock().unwrap().len(), 2);
        let cap = p.cache_capacity().unwrap();
        assert_eq!(cap.entries, 2);
        assert_eq!(cap.max_bytes, 2 * cap.entry_bytes);
        assert!(cap.entry_bytes > p.reference_config().unwrap().prefix_dim * 4);
        assert_eq!(policy(0, 0).1.cache_capacity(), None);
        let mut first = input(Some(1));
        first.frames[0] = frame(0, image(1));
        assert_eq!(
            p.act(&first).unwrap().cache,
            CacheStatus::Miss,
            "evicted entry"
        );
    }

    #[test]
    fn cache_is_bounded_in_bytes_before_entries() {
        let load = |cache_entries, cache_max_bytes| {
            let dir = tempfile::tempdir().unwrap();
            write_reference_export(dir.path(), 0).unwrap();
            let opts = PolicyOptions {
                cache_entries,
                cache_max_bytes,
                ..Default::default()
            };
            (
                dir.path().to_path_buf(),
                Policy::load(dir.path(), &opts).unwrap(),
                dir,
            )
        };
        let entry = load(1024, DEFAULT_CACHE_BYTES)
            .1
            .cache_capacity()
            .unwrap()
            .entry_bytes;
        // Room for two and a half entries: two, whatever --cache-entries says.
        let (_, p, _d) = load(1024, entry * 5 / 2);
        let cap = p.cache_capacity().unwrap();
        assert_eq!(
            (cap.entries, cap.location, cap.limited_by_bytes),
            (2, "host", true)
        );
        assert!(cap.max_bytes <= entry * 5 / 2);
        for shade in [1u8, 2, 3] {
            let mut i = input(Some(1));
            i.frames[0] = frame(0, image(shade));
            assert_eq!(p.act(&i).unwrap().cache, CacheStatus::Miss);
        }
        assert_eq!(p.cache.as_ref().unwrap().lock().unwrap().len(), 2);
        let mut first = input(Some(1));
        first.frames[0] = frame(0, image(1));
        assert_eq!(p.act(&first).unwrap().cache, CacheStatus::Miss, "evicted");
        // The entry count still bounds when it is the smaller.
        let cap = load(3, entry * 100).1.cache_capacity().unwrap();
        assert_eq!((cap.entries, cap.limited_by_bytes), (3, false));
        // Not even one prefix fits: the cache is off (and the log says why).
        let (_, p, _d) = load(1024, entry - 1);
        assert_eq!(p.cache_capacity(), None);
        assert_eq!(p.act(&input(Some(1))).unwrap().cache, CacheStatus::Disabled);
    }

    #[test]
    fn bad_inputs_name_the_field() {
        let (_d, p) = policy(0, 0);
        let mut i = input(Some(1));
        i.state.pop();
        assert_eq!(
            p.act(&i).unwrap_err().to_string(),
            "state has 7 values; this model takes 8"
        );
        let mut i = input(Some(1));
        i.state[2] = f32::NAN;
        assert!(p.act(&i).unwrap_err().to_string().contains("state[2]"));
        let mut i = input(Some(1));
        i.frames[0] = frame(0, b"not an image".to_vec());
        let msg = p.act(&i).unwrap_err().to_string();
        assert!(
            msg.contains("images[0].data") && msg.contains("JPEG or PNG"),
            "{msg}"
        );
        let mut i = input(Some(1));
        i.frames[0].as_mut().unwrap().expect_sha256 = Some("00".repeat(32));
        assert!(
            p.act(&i)
                .unwrap_err()
                .to_string()
                .contains("images[0].sha256")
        );
        let mut i = input(Some(1));
        i.frames[0] = None;
        assert!(
            p.act(&i)
                .unwrap_err()
                .to_string()
                .contains("primary camera")
        );
    }

    #[test]
    fn noise_is_standard_normal_ish_and_seeded() {
        let a = gaussian_noise(5, 10_001);
        assert_eq!(a.len(), 10_001);
        assert_eq!(a, gaussian_noise(5, 10_001));
        assert_ne!(a, gaussian_noise(6, 10_001));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / a.len() as f32;
        assert!(
            mean.abs() < 0.05 && (var - 1.0).abs() < 0.1,
            "mean {mean} var {var}"
        );
    }
}
