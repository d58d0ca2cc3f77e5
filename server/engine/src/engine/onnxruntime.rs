//! The `ort` engine (`--engine ort`): onnxruntime's CPU provider through the `ort` crate,
//! for real VLA exports ([`crate::vla`]). The library is **loaded at run time** — nothing is
//! downloaded or linked at build time: `--ort-lib PATH`, else `ORT_DYLIB_PATH`, naming a
//! `libonnxruntime.so.*` (the `onnxruntime` wheel on PyPI ships one in
//! `onnxruntime/capi/`). Built against onnxruntime's C API 24 (1.24); any newer library
//! serves it.
//!
//! tract stays the embedded default (no library to install, the reference export, the
//! graph rewrites it needs); this engine exists because onnxruntime's CPU kernels are faster
//! on transformer-sized graphs (`reflex bench engines --export DIR` measures both side by
//! side). A graph runs as exported — no rewrite: onnxruntime runs every pattern torch.onnx
//! writes — with onnxruntime's default optimisations, `threads` intra-op threads and one
//! inter-op thread. Inputs are handed to onnxruntime as views of the caller's tensors (no
//! copy); outputs are copied once into tract tensors, the currency of [`crate::vla`].
//!
//! One run at a time per graph: `ort`'s `Session::run` takes `&mut self`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};
use tract_onnx::prelude::*;

use super::EngineError;

/// Where the library is, from the flag or the environment; the error says how to get one.
pub fn library_path(flag: Option<&Path>) -> Result<PathBuf, EngineError> {
    let path = flag
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .ok_or_else(|| EngineError::Unavailable {
            engine: "ort",
            reason: "no onnxruntime library: pass --ort-lib PATH or set ORT_DYLIB_PATH to a libonnxruntime.so.* (`pip install onnxruntime` ships one in site-packages/onnxruntime/capi/)".into(),
        })?;
    if !path.is_file() {
        return Err(EngineError::Unavailable {
            engine: "ort",
            reason: format!(
                "{}: no such file (--ort-lib / ORT_DYLIB_PATH)",
                path.display()
            ),
        });
    }
    Ok(path)
}

/// The libonnxruntime that `python3`'s onnxruntime package (the PyPI wheel) ships in its
/// `capi/` folder: how the bench and the tests find one without a flag.
pub fn python_library() -> Result<PathBuf, String> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so*')))[-1])",
        ])
        .output()
        .map_err(|e| format!("starting python3: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "no libonnxruntime found through python3's onnxruntime package (pip install onnxruntime): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The process's one onnxruntime environment (the library is loaded once; a second call
/// with another path gets the first library).
fn environment(lib: &Path) -> Result<&'static ort::environment::Environment, EngineError> {
    static ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let builder = ort::init_from(lib).map_err(|e| format!("{}: {e}", lib.display()))?;
        builder
            .with_name("reflex")
            .build()
            .map_err(|e| format!("{}: {e}", lib.display()))
    })
    .as_ref()
    .map_err(|reason| EngineError::Unavailable {
        engine: "ort",
        reason: reason.clone(),
    })
}

/// A graph input or output as onnxruntime reads it.
#[derive(Debug, Clone)]
pub struct OrtPort {
    pub name: String,
    pub dt: DatumType,
    pub shape: Vec<usize>,
}

/// One graph in an onnxruntime session.
pub struct OrtGraph {
    session: Mutex<Session>,
    pub inputs: Vec<OrtPort>,
    pub outputs: Vec<OrtPort>,
}

fn datum_type(t: TensorElementType) -> Option<DatumType> {
    Some(match t {
        TensorElementType::Float32 => DatumType::F32,
        TensorElementType::Float16 => DatumType::F16,
        TensorElementType::Float64 => DatumType::F64,
        TensorElementType::Int64 => DatumType::I64,
        TensorElementType::Int32 => DatumType::I32,
        TensorElementType::Bool => DatumType::Bool,
        TensorElementType::Uint8 => DatumType::U8,
        _ => return None,
    })
}

/// A port's shape; a symbolic dim takes its value from `symbols` (the dims pinned at load).
fn port(name: &str, ty: &ValueType, symbols: &BTreeMap<String, usize>) -> Result<OrtPort, String> {
    let ValueType::Tensor {
        ty,
        shape,
        dimension_symbols,
    } = ty
    else {
        return Err(format!("{name} is not a tensor ({ty:?})"));
    };
    let dt = datum_type(*ty).ok_or_else(|| format!("{name}: element type {ty:?} not served"))?;
    let shape = shape
        .iter()
        .zip(dimension_symbols.iter())
        .map(|(d, sym)| usize::try_from(*d).ok().or_else(|| symbols.get(sym).copied()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            format!("{name} has a symbolic shape {shape:?} {dimension_symbols:?} that is not pinned: exports must be static")
        })?;
    Ok(OrtPort {
        name: name.to_string(),
        dt,
        shape,
    })
}

impl OrtGraph {
    /// Loads `path` (its external data beside it) into a session, the symbolic dims in
    /// `symbols` fixed (onnxruntime's free dimension overrides).
    pub fn load(
        path: &Path,
        lib: &Path,
        threads: usize,
        symbols: &BTreeMap<String, usize>,
    ) -> Result<OrtGraph, EngineError> {
        let err = |message: String| EngineError::Load {
            graph: path.display().to_string(),
            message,
        };
        let env = environment(lib)?;
        let session = Session::builder(env)
            .and_then(|b| {
                b.with_optimization_level(GraphOptimizationLevel::All)
                    .map_err(Into::into)
            })
            .and_then(|b| b.with_intra_threads(threads.max(1)).map_err(Into::into))
            .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
            .and_then(|b| {
                symbols.iter().try_fold(b, |b, (name, size)| {
                    b.with_dimension_override(name, *size as i64)
                        .map_err(Into::into)
                })
            })
            .and_then(|mut b| b.commit_from_file(path))
            .map_err(|e| err(format!("onnxruntime: {e}")))?;
        let inputs = session
            .inputs()
            .iter()
            .map(|o| port(o.name(), o.dtype(), symbols))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let outputs = session
            .outputs()
            .iter()
            .map(|o| port(o.name(), o.dtype(), symbols))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        Ok(OrtGraph {
            session: Mutex::new(session),
            inputs,
            outputs,
        })
    }

    /// Runs with `values` in [`OrtGraph::inputs`] order (each of its port's type and shape);
    /// returns the outputs in [`OrtGraph::outputs`] order.
    pub fn run(&self, values: &[TValue]) -> Result<TVec<TValue>, String> {
        let mut feed: Vec<(&str, ort::session::SessionInputValue<'_>)> =
            Vec::with_capacity(values.len());
        for (p, v) in self.inputs.iter().zip(values) {
            let shape = p.shape.clone();
            let value = match p.dt {
                DatumType::F32 => view::<f32>(shape, v)?,
                DatumType::F16 => view::<f16>(shape, v)?,
                DatumType::F64 => view::<f64>(shape, v)?,
                DatumType::I64 => view::<i64>(shape, v)?,
                DatumType::I32 => view::<i32>(shape, v)?,
                DatumType::Bool => view::<bool>(shape, v)?,
                DatumType::U8 => view::<u8>(shape, v)?,
                dt => return Err(format!("{}: {dt:?} inputs are not served", p.name)),
            };
            feed.push((p.name.as_str(), value));
        }
        let mut session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        let outputs = session.run(feed).map_err(|e| format!("onnxruntime: {e}"))?;
        self.outputs
            .iter()
            .map(|p| {
                let v = outputs
                    .get(&p.name)
                    .ok_or_else(|| format!("onnxruntime returned no {}", p.name))?;
                to_tract(p, v).map(IntoTValue::into_tvalue)
            })
            .collect()
    }
}

fn view<'a, T>(
    shape: Vec<usize>,
    v: &'a TValue,
) -> Result<ort::session::SessionInputValue<'a>, String>
where
    T: ort::value::PrimitiveTensorElementType + Datum + std::fmt::Debug + Clone + 'static,
{
    let data = v
        .try_as_plain_ram()
        .and_then(|p| p.as_slice::<T>())
        .map_err(|e| format!("{e:#}"))?;
    TensorRef::from_array_view((shape, data))
        .map(Into::into)
        .map_err(|e| format!("onnxruntime: {e}"))
}

fn to_tract(p: &OrtPort, v: &DynValue) -> Result<Tensor, String> {
    fn copy<T>(p: &OrtPort, v: &DynValue) -> Result<Tensor, String>
    where
        T: ort::value::PrimitiveTensorElementType + Datum + Copy,
    {
        let (shape, data) = v
            .try_extract_tensor::<T>()
            .map_err(|e| format!("{}: {e}", p.name))?;
        let dims: Vec<usize> = shape.iter().map(|d| *d as usize).collect();
        Tensor::from_shape(&dims, data).map_err(|e| format!("{}: {e:#}", p.name))
    }
    match p.dt {
        DatumType::F32 => copy::<f32>(p, v),
        DatumType::F16 => copy::<f16>(p, v),
        DatumType::F64 => copy::<f64>(p, v),
        DatumType::I64 => copy::<i64>(p, v),
        DatumType::I32 => copy::<i32>(p, v),
        DatumType::Bool => copy::<bool>(p, v),
        DatumType::U8 => copy::<u8>(p, v),
        dt => Err(format!("{}: {dt:?} outputs are not served", p.name)),
    }
}
