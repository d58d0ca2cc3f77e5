//! reflex-engine: the model runtime — from an export folder and a validated request to
//! actions. It knows nothing of gRPC, sockets or async runtimes; `reflex-server` wraps it.
//!
//! Modules:
//! - [`config`]: `reflex_config.json` (the export contract), `model_hash`/`config_hash`.
//! - [`onnx`]: ONNX protobuf below the engines — `builder` (how our exports and fixtures
//!   write graphs, external data included) and `rewrite` (`prepare`: the torch.onnx
//!   patterns tract cannot run, rewritten exactly before tract parses a graph).
//! - [`export`]: the reference export, written as ONNX through `tract_onnx::pb`.
//! - [`fixtures`]: `reflex export-demo --kind`: the reference export and tiny pi0.5 exports
//!   in the seed tool's layouts, with a tokenizer.json and lerobot stats.
//! - [`npy`]: numpy's `.npy` f32 arrays (the seed's SmolVLA state projection).
//! - [`tokenizer`]: instruction → token ids (`word-hash-v1` for the reference model).
//! - [`preprocess`]: bounded JPEG/PNG decode, resize, normalise.
//! - [`engine`]: the [`Engine`] trait and its implementations: `cpu` (tract), `graph` (the
//!   ONNX → kernel-program compiler and its CPU reference executor), `cuda` (the GPU executor).
//! - [`contract`]: reflex-export format_version 2, the general contract for real VLA exports;
//!   [`seed`]: the seed tool's (reflex-vla) configs mapped onto it; [`vla`]: such an export on
//!   the cpu engine (graphs by input/output name, the prefix as opaque tensors, HuggingFace
//!   tokenizers, lerobot stats).
//! - [`policy`]: one Act from validated input to actions: prefix cache, noise, Euler loop,
//!   de-normalisation.
//! - [`inspect`]: `reflex inspect EXPORT --engine cuda`: every graph checked against the
//!   cuda compiler's operators and compiled into its plan, without a GPU.
//!
//! **Invariant:** an engine's results depend only on its inputs — same request and seed,
//! same bits.

pub mod config;
pub mod contract;
pub mod engine;
pub mod export;
pub mod fixtures;
pub mod inspect;
pub mod npy;
pub mod onnx;
pub mod policy;
pub mod preprocess;
pub mod seed;
pub mod tokenizer;
pub mod vla;

pub use engine::{Engine, EngineError, EngineKind};
pub use policy::Policy;
