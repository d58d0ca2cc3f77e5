//! Real VLA exports (format_version 2, and the seed tool's layouts mapped onto it) on the
//! cpu engine: graphs addressed by input and output *names*, the prefix held as an opaque
//! list of tensors, the expert baked or stepped, HuggingFace tokenizers, lerobot stats.
//!
//! Load ([`VlaModel::load`]): each graph is read, prepared for tract and planned once; its
//! inputs' names, dtypes and shapes are read from the graph and checked against the contract
//! (every input named and fed, image `[1, 3, H, W]`, tokens `[1, T]`, noise
//! `[1, chunk, width]`, the robot's state and action widths within the graph's); the tokenizer's
//! vocabulary is checked against the token embedding the tokens input indexes. One error,
//! naming the file and the input or node, stops the start.
//!
//! One call: frames and instruction → the prefix graph → [`Prefix`] (the tensors the expert
//! takes by name: every layer's KV cache, pad masks; `Arc`s, never copied) → the expert with
//! the noise (baked) or the Euler loop over it (per step) → the first `actions.dim` columns of
//! each row, de-normalised. A monolithic export runs its one graph with everything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::config::{ImageConfig, ResizePolicy, hex};
use crate::contract::{
    Absent, Channels, EmbedMask, ExpertMode, ExportV2, Normalization, Range, StatsV2, TimeDirection,
};
use crate::engine::graph::{Precision, Program, reference::HostValue};
use crate::engine::onnxruntime::OrtGraph;
use crate::engine::{EngineError, PixelNorm, cpu::Plan};

/// What runs a real export's graphs: tract (embedded, the default), onnxruntime (`--engine
/// ort`, [`crate::engine::onnxruntime`]), or the cuda engine's compiled programs
/// ([`crate::engine::graph`]) on the GPU or, to check them without one, on the CPU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Backend {
    #[default]
    Tract,
    /// The library file and its intra-op threads.
    Ort { lib: PathBuf, threads: usize },
    /// The cuda engine's programs run by the CPU reference executor: the same compiled
    /// program the GPU runs (host island, buffers, fused maps, cuBLAS's column-major
    /// arguments, the half precision's roundings), slowly. For tests and for `reflex
    /// inspect`.
    Reference { precision: Precision },
    /// The cuda executor ([`crate::engine::cuda::CudaProgram`]); `graphs`: replay each
    /// graph's launches as one captured CUDA graph; `precision`: `--precision`.
    Cuda { graphs: bool, precision: Precision },
}

impl Backend {
    /// `tract`, `onnxruntime`, `reference` or `cuda`: ModelInfo's `hardware.engine`, logs,
    /// benches.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Tract => "tract",
            Backend::Ort { .. } => "onnxruntime",
            Backend::Reference { .. } => "reference",
            Backend::Cuda { .. } => "cuda",
        }
    }
}

enum Exec {
    Tract(Plan),
    Ort(OrtGraph),
    /// A compiled program and what runs it.
    Program(Box<dyn RunProgram>),
}

/// Tensors a program executor keeps between graphs: a prefix's handoff (every layer's KV
/// cache, the masks), on the device for cuda (one allocation, freed when the last holder
/// drops it: a prefix-cache entry is a device allocation). Opaque to the runtime.
pub trait Kept: Send + Sync {
    /// A copy on the host, in order (for comparing engines).
    fn to_host(&self) -> Result<Vec<HostValue>, String>;
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Program inputs taken from kept tensors: `names[i]` is the i-th kept tensor.
pub struct KeptFeed<'a> {
    pub tensors: &'a dyn Kept,
    pub names: &'a [&'a str],
}

impl KeptFeed<'_> {
    /// The kept tensor feeding input `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| *n == name)
    }

    /// The kept tensors as the executor's own type `T`, or `mismatch` when another executor
    /// kept them.
    pub fn held<T: 'static>(&self, mismatch: &str) -> Result<&T, String> {
        self.tensors
            .as_any()
            .downcast_ref::<T>()
            .ok_or_else(|| mismatch.to_string())
    }
}

/// Runs one compiled graph program: inputs by name ([`Program::feeds`]) from the host
/// (`feed`) or from tensors the executor kept (`kept`, which wins), outputs in the program's
/// order.
pub trait RunProgram: Send + Sync {
    fn run(
        &self,
        feed: &dyn Fn(&str) -> Option<HostValue>,
        kept: Option<&KeptFeed<'_>>,
    ) -> Result<Vec<HostValue>, String>;
    /// Runs and keeps the outputs `keep` (indices, in that order) on the executor instead of
    /// bringing them to the host: the prefix graph's handoff stays on the device.
    fn run_kept(
        &self,
        feed: &dyn Fn(&str) -> Option<HostValue>,
        keep: &[usize],
    ) -> Result<Box<dyn Kept>, String>;
    /// The compiled program (for `reflex inspect`'s plan).
    fn program(&self) -> &Program;
    /// A per-step expert's whole Euler loop in one go on the executor
    /// ([`crate::engine::graph::DeviceLoop`]: step k at `times[k]`, then x ← x + dt·v), its
    /// (x, t, v) ports named; `feed` and `kept` give every other input. `None`: the executor
    /// has no loop of its own, and the runtime steps from the host.
    fn denoise(
        &self,
        _ports: (&str, &str, &str),
        _x0: &[f32],
        _times: &[f32],
        _dt: f32,
        _feed: &dyn Fn(&str) -> Option<HostValue>,
        _kept: Option<&KeptFeed<'_>>,
    ) -> Option<Result<Vec<f32>, String>> {
        None
    }
}

/// The CPU reference executor as a [`RunProgram`].
struct ReferenceRun(Program);

/// What the reference executor keeps: host values (its "device" is the host).
struct HostKept(Vec<HostValue>);

impl Kept for HostKept {
    fn to_host(&self) -> Result<Vec<HostValue>, String> {
        Ok(self.0.clone())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// `feed` with the inputs `kept` names taken from the host-kept tensors.
fn with_host_kept<'a>(
    feed: &'a dyn Fn(&str) -> Option<HostValue>,
    kept: Option<&'a KeptFeed<'a>>,
) -> Result<impl Fn(&str) -> Option<HostValue> + 'a, String> {
    let held = kept
        .map(|k| {
            Ok::<_, String>((
                k,
                k.held::<HostKept>("these tensors were kept by another executor")?,
            ))
        })
        .transpose()?;
    Ok(move |name: &str| match held {
        Some((k, h)) => match k.index(name) {
            Some(i) => h.0.get(i).cloned(),
            None => feed(name),
        },
        None => feed(name),
    })
}

impl RunProgram for ReferenceRun {
    fn run(
        &self,
        feed: &dyn Fn(&str) -> Option<HostValue>,
        kept: Option<&KeptFeed<'_>>,
    ) -> Result<Vec<HostValue>, String> {
        let feed = with_host_kept(feed, kept)?;
        crate::engine::graph::reference::run_program(&self.0, &feed)
    }
    fn run_kept(
        &self,
        feed: &dyn Fn(&str) -> Option<HostValue>,
        keep: &[usize],
    ) -> Result<Box<dyn Kept>, String> {
        let mut out: Vec<Option<HostValue>> = self.run(feed, None)?.into_iter().map(Some).collect();
        let kept = keep
            .iter()
            .map(|&i| {
                out.get_mut(i)
                    .and_then(Option::take)
                    .ok_or_else(|| format!("no output {i} to keep (or kept twice)"))
            })
            .collect::<Result<_, String>>()?;
        Ok(Box::new(HostKept(kept)))
    }
    fn program(&self) -> &Program {
        &self.0
    }
    fn denoise(
        &self,
        ports: (&str, &str, &str),
        x0: &[f32],
        times: &[f32],
        dt: f32,
        feed: &dyn Fn(&str) -> Option<HostValue>,
        kept: Option<&KeptFeed<'_>>,
    ) -> Option<Result<Vec<f32>, String>> {
        use crate::engine::graph::{DeviceLoop, reference::run_loop};
        Some(with_host_kept(feed, kept).and_then(|feed| {
            DeviceLoop::new(&self.0, ports, times, dt)
                .and_then(|l| run_loop(&self.0, &l, x0, &feed))
        }))
    }
}

/// The tract type of an ONNX element type a program port declares.
fn datum_of(elem: i32) -> DatumType {
    match elem {
        7 => DatumType::I64,
        9 => DatumType::Bool,
        11 => DatumType::F64,
        _ => DatumType::F32,
    }
}

/// The ONNX element type each graph output declares (by name), where it declares one.
fn declared_outputs(proto: &pb::ModelProto) -> BTreeMap<String, i32> {
    proto
        .graph
        .iter()
        .flat_map(|g| &g.output)
        .filter_map(|o| Some((o.name.clone(), crate::onnx::tensor_type(o)?.elem_type)))
        .collect()
}

/// A graph input as the program executor takes it.
fn host_value(v: &TValue, dt: DatumType) -> Result<HostValue, String> {
    fn plain<T: Datum + Copy>(v: &TValue) -> Result<Vec<T>, String> {
        let t = v.cast_to::<T>().map_err(|e| format!("{e:#}"))?;
        Ok(t.try_as_plain_ram()
            .map_err(|e| format!("{e:#}"))?
            .as_slice::<T>()
            .map_err(|e| format!("{e:#}"))?
            .to_vec())
    }
    Ok(match dt {
        DatumType::I64 => HostValue::I64(plain::<i64>(v)?),
        DatumType::Bool => HostValue::Bool(plain::<bool>(v)?),
        DatumType::F64 => HostValue::F64(plain::<f64>(v)?),
        _ => HostValue::F32(plain::<f32>(v)?),
    })
}

/// A program output as the graph declares it (`dt`, `shape`).
fn tvalue_of(v: HostValue, dt: DatumType, shape: &[usize]) -> Result<TValue, TractError> {
    let t = match v {
        HostValue::F32(v) => Tensor::from_shape(shape, &v)?,
        HostValue::F64(v) => Tensor::from_shape(shape, &v)?,
        HostValue::I64(v) => Tensor::from_shape(shape, &v)?,
        HostValue::Bool(v) => Tensor::from_shape(shape, &v)?,
    };
    Ok(if t.datum_type() == dt {
        t
    } else {
        t.cast_to_dt(dt)?.into_owned()
    }
    .into_tvalue())
}

/// lerobot's normaliser epsilon (`(x − mean)/(std + eps)`).
const EPS: f32 = 1e-8;

/// One graph input as the graph declares it.
#[derive(Debug, Clone)]
pub struct Port {
    pub name: String,
    pub dt: DatumType,
    pub shape: Vec<usize>,
}

impl Port {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
    fn describe(&self) -> String {
        format!("{} {:?}{:?}", self.name, self.dt, self.shape)
    }
}

/// A graph planned by tract or loaded into onnxruntime, with its inputs and outputs by name.
pub struct Graph {
    pub file: String,
    exec: Exec,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
}

/// What the ONNX protobuf says beyond what tract keeps: the files holding external data and,
/// per graph input, the rows of an embedding table it indexes (`Gather(table, input)`).
#[derive(Debug, Default)]
struct ProtoFacts {
    external: Vec<String>,
    gather_rows: BTreeMap<String, i64>,
}

fn proto_facts(proto: &pb::ModelProto) -> ProtoFacts {
    let mut f = ProtoFacts::default();
    let Some(g) = proto.graph.as_ref() else {
        return f;
    };
    for t in &g.initializer {
        if let Some(e) = t.external_data.iter().find(|e| e.key == "location")
            && !f.external.contains(&e.value)
        {
            f.external.push(e.value.clone());
        }
    }
    for n in g.node.iter().filter(|n| n.op_type == "Gather") {
        if let (Some(table), Some(idx)) = (n.input.first(), n.input.get(1))
            && let Some(t) = g.initializer.iter().find(|t| &t.name == table)
            && let Some(rows) = t.dims.first()
        {
            f.gather_rows.insert(idx.clone(), *rows);
        }
    }
    f
}

fn ports(model: &TypedModel, outlets: &[OutletId], inputs: bool) -> Result<Vec<Port>, String> {
    outlets
        .iter()
        .map(|o| {
            let name = if inputs {
                model.node(o.node).name.clone()
            } else {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            };
            let fact = model.outlet_fact(*o).map_err(|e| format!("{e:#}"))?;
            let shape = fact
                .shape
                .as_concrete()
                .ok_or_else(|| {
                    format!(
                        "{name} has a symbolic shape {:?}: exports must be static",
                        fact.shape
                    )
                })?
                .to_vec();
            Ok(Port {
                name,
                dt: fact.datum_type,
                shape,
            })
        })
        .collect()
}

/// What the runtime feeds a graph input, per axis (`None`: the graph's own dim).
type Want<'a> = &'a dyn Fn(&str, usize) -> Vec<Option<usize>>;

/// Axis 0 is the batch, fed 1; the other axes are the graph's own.
fn batch_one(_: &str, rank: usize) -> Vec<Option<usize>> {
    (0..rank).map(|a| (a == 0).then_some(1)).collect()
}

impl Graph {
    /// Loads `file`; its symbolic input dims are pinned to what `want` says
    /// ([`crate::onnx::pin_symbols`]).
    fn load(
        dir: &Path,
        file: &str,
        backend: &Backend,
        want: Want,
    ) -> Result<(Graph, ProtoFacts), EngineError> {
        let path = dir.join(file);
        let err = |message: String| EngineError::Load {
            graph: path.display().to_string(),
            message,
        };
        if let Backend::Ort { lib, threads } = backend {
            // The protobuf alone (its weights stay in their .data files) for the facts;
            // onnxruntime reads the graph itself.
            let bytes = std::fs::read(&path).map_err(|e| err(e.to_string()))?;
            let mut proto = <pb::ModelProto as prost::Message>::decode(bytes.as_slice())
                .map_err(|e| err(format!("not an ONNX model: {e}")))?;
            let facts = proto_facts(&proto);
            let symbols = crate::onnx::pin_symbols(&mut proto, want).map_err(err)?;
            drop(proto);
            let g = OrtGraph::load(&path, lib, *threads, &symbols)?;
            let port = |p: &crate::engine::onnxruntime::OrtPort| Port {
                name: p.name.clone(),
                dt: p.dt,
                shape: p.shape.clone(),
            };
            let (inputs, outputs) = (
                g.inputs.iter().map(port).collect(),
                g.outputs.iter().map(port).collect(),
            );
            return Ok((
                Graph {
                    file: file.to_string(),
                    exec: Exec::Ort(g),
                    inputs,
                    outputs,
                },
                facts,
            ));
        }
        if let Backend::Reference { precision } | Backend::Cuda { precision, .. } = backend {
            // The cuda engine's compiler, on the graph with its symbols pinned as tract's.
            let mut proto = crate::engine::graph::read_model(&path)?;
            let facts = proto_facts(&proto);
            crate::onnx::pin_symbols(&mut proto, want).map_err(err)?;
            let declared = declared_outputs(&proto);
            let program = crate::engine::graph::compile_model_at(proto, &path, *precision)?;
            let inputs = program
                .feeds()
                .into_iter()
                .map(|f| Port {
                    name: f.name,
                    dt: datum_of(f.elem),
                    shape: f.shape,
                })
                .collect();
            let outputs = program
                .outputs
                .iter()
                .map(|o| Port {
                    name: o.name.clone(),
                    dt: declared.get(&o.name).map_or(
                        match o.dtype {
                            crate::engine::graph::DType::F32 => DatumType::F32,
                            crate::engine::graph::DType::I64 => DatumType::I64,
                            crate::engine::graph::DType::Bool => DatumType::Bool,
                        },
                        |&e| datum_of(e),
                    ),
                    shape: o.shape.clone(),
                })
                .collect();
            let run: Box<dyn RunProgram> = match backend {
                Backend::Cuda { graphs, .. } => {
                    Box::new(crate::engine::cuda::CudaProgram::load(program, *graphs)?)
                }
                _ => Box::new(ReferenceRun(program)),
            };
            return Ok((
                Graph {
                    file: file.to_string(),
                    exec: Exec::Program(run),
                    inputs,
                    outputs,
                },
                facts,
            ));
        }
        let (plan, facts) = crate::engine::cpu::load_graph_edit(&path, |proto| {
            crate::onnx::pin_symbols(proto, want)?;
            Ok(proto_facts(proto))
        })?;
        let model = plan.model();
        let inputs = ports(
            model,
            model.input_outlets().map_err(|e| err(format!("{e:#}")))?,
            true,
        )
        .map_err(err)?;
        let outputs = ports(
            model,
            model.output_outlets().map_err(|e| err(format!("{e:#}")))?,
            false,
        )
        .map_err(err)?;
        Ok((
            Graph {
                file: file.to_string(),
                exec: Exec::Tract(plan),
                inputs,
                outputs,
            },
            facts,
        ))
    }

    /// Input (or output) `name` with its index; else a load error naming `path` and listing
    /// the graph's inputs (outputs).
    fn port(&self, path: &Path, name: &str, output: bool) -> Result<(usize, Port), EngineError> {
        let (ports, side) = if output {
            (&self.outputs, "output")
        } else {
            (&self.inputs, "input")
        };
        ports
            .iter()
            .position(|p| p.name == name)
            .map(|ix| (ix, ports[ix].clone()))
            .ok_or_else(|| {
                load_err(
                    path,
                    format!(
                        "the config names {side} {name:?}, which the graph does not have (its {side}s: {})",
                        ports.iter().map(Port::describe).collect::<Vec<_>>().join(", ")
                    ),
                )
            })
    }

    fn input(&self, name: &str) -> Option<&Port> {
        self.inputs.iter().find(|p| p.name == name)
    }

    fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|p| p.name == name)
    }

    /// A per-step expert's whole loop on its executor, when that has one
    /// ([`RunProgram::denoise`]).
    fn run_loop(
        &self,
        ports: (&str, &str, &str),
        x0: &[f32],
        times: &[f32],
        dt: f32,
        feed: &BTreeMap<&str, TValue>,
        kept: Option<&KeptFeed<'_>>,
    ) -> Option<Result<Vec<f32>, EngineError>> {
        let Exec::Program(run) = &self.exec else {
            return None;
        };
        let r = run.denoise(ports, x0, times, dt, &self.host_feed(feed), kept)?;
        Some(r.map_err(|m| self.run_err(m)))
    }

    /// Runs on the program executor and keeps the outputs `keep` there (the prefix's handoff
    /// on the device); `None` for tract and onnxruntime, which hand every output back.
    fn run_kept(
        &self,
        feed: &BTreeMap<&str, TValue>,
        keep: &[usize],
    ) -> Option<Result<Box<dyn Kept>, EngineError>> {
        let Exec::Program(run) = &self.exec else {
            return None;
        };
        Some(
            run.run_kept(&self.host_feed(feed), keep)
                .map_err(|m| self.run_err(m)),
        )
    }

    /// Bytes output `ix` takes where this graph's executor keeps it: a compiled program holds
    /// bools in float32 buffers; tract and onnxruntime in the declared type.
    fn kept_bytes(&self, ix: usize) -> usize {
        match &self.exec {
            Exec::Program(run) => {
                let p = run.program();
                p.port_bytes(&p.outputs[ix])
            }
            _ => self.outputs[ix].len() * self.outputs[ix].dt.size_of(),
        }
    }

    /// A run failure of this graph, named.
    fn run_err(&self, message: String) -> EngineError {
        EngineError::Run {
            graph: "vla",
            message: format!("{}: {message}", self.file),
        }
    }

    /// `feed` as a program executor takes it: each input in the type this graph declares.
    fn host_feed<'a>(
        &'a self,
        feed: &'a BTreeMap<&str, TValue>,
    ) -> impl Fn(&str) -> Option<HostValue> + 'a {
        move |name| {
            let p = self.input(name)?;
            feed.get(name).and_then(|v| host_value(v, p.dt).ok())
        }
    }

    /// Runs with inputs by name; every input must be in `feed`.
    fn run(&self, feed: &BTreeMap<&str, TValue>) -> Result<TVec<TValue>, EngineError> {
        self.run_with(feed, None)
    }

    /// Runs with inputs by name, some of them (on a program executor) from kept tensors.
    fn run_with(
        &self,
        feed: &BTreeMap<&str, TValue>,
        kept: Option<&KeptFeed<'_>>,
    ) -> Result<TVec<TValue>, EngineError> {
        let err = |message: String| self.run_err(message);
        if kept.is_some() && !matches!(self.exec, Exec::Program(_)) {
            return Err(err(
                "kept tensors fed to a graph that runs on tract or onnxruntime".into(),
            ));
        }
        // tract and onnxruntime take every input in the graph's own type, in order.
        let inputs = || -> Result<TVec<TValue>, EngineError> {
            let mut inputs = TVec::with_capacity(self.inputs.len());
            for p in &self.inputs {
                let v = feed
                    .get(p.name.as_str())
                    .ok_or_else(|| err(format!("no value for input {}", p.name)))?;
                inputs.push(if v.datum_type() == p.dt {
                    v.clone()
                } else {
                    v.cast_to_dt(p.dt)
                        .map_err(|e| err(format!("{e:#}")))?
                        .into_owned()
                        .into_tvalue()
                });
            }
            Ok(inputs)
        };
        match &self.exec {
            Exec::Tract(plan) => plan.run(inputs()?).map_err(|e| err(format!("{e:#}"))),
            Exec::Ort(g) => g.run(&inputs()?).map_err(err),
            Exec::Program(run) => run
                .run(&self.host_feed(feed), kept)
                .map_err(err)?
                .into_iter()
                .zip(&self.outputs)
                .map(|(v, p)| tvalue_of(v, p.dt, &p.shape).map_err(|e| err(format!("{e:#}"))))
                .collect(),
        }
    }
}

/// A tract failure while building or reading a tensor of the vla runtime.
fn tract_err(e: TractError) -> EngineError {
    EngineError::Run {
        graph: "vla",
        message: format!("{e:#}"),
    }
}

/// A graph's input, made from host values of the contract's kinds (f32, i64, bool).
fn value<T: Datum + Copy>(shape: &[usize], data: &[T]) -> Result<TValue, EngineError> {
    Tensor::from_shape(shape, data)
        .map(IntoTValue::into_tvalue)
        .map_err(tract_err)
}

fn to_f32(v: &TValue, what: &str) -> Result<Vec<f32>, EngineError> {
    let err = |e: TractError| EngineError::Run {
        graph: "vla",
        message: format!("{what}: {e:#}"),
    };
    let t = v.cast_to::<f32>().map_err(err)?;
    Ok(t.try_as_plain_ram()
        .map_err(err)?
        .as_slice::<f32>()
        .map_err(err)?
        .to_vec())
}

/// Per-dimension normalisation of state (in) or actions (out).
#[derive(Debug, Clone, PartialEq)]
pub enum Norm {
    None,
    MeanStd { mean: Vec<f32>, std: Vec<f32> },
    Quantile { q01: Vec<f32>, q99: Vec<f32> },
}

impl Norm {
    pub fn normalize(&self, i: usize, x: f32) -> f32 {
        match self {
            Norm::None => x,
            Norm::MeanStd { mean, std } => (x - mean[i]) / (std[i] + EPS),
            Norm::Quantile { q01, q99 } => {
                let d = q99[i] - q01[i];
                let d = if d == 0.0 { EPS } else { d };
                (x - q01[i]) / d * 2.0 - 1.0
            }
        }
    }

    pub fn denormalize(&self, i: usize, x: f32) -> f32 {
        match self {
            Norm::None => x,
            Norm::MeanStd { mean, std } => x * std[i] + mean[i],
            Norm::Quantile { q01, q99 } => {
                let d = q99[i] - q01[i];
                let d = if d == 0.0 { EPS } else { d };
                (x + 1.0) / 2.0 * d + q01[i]
            }
        }
    }
}

/// Every f32/f64/f16/bf16 tensor of a safetensors file, as f32 vectors by name.
pub fn read_stats_file(path: &Path) -> Result<BTreeMap<String, Vec<f32>>, String> {
    use safetensors::Dtype;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{} is not a safetensors file: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            _ => continue,
        };
        out.insert(name, values);
    }
    Ok(out)
}

/// The prefix of one observation: the tensors the expert takes from the prefix graph, in the
/// order of [`VlaModel::handoff`]. Opaque to the server; shared, never copied.
pub struct Prefix {
    /// On the host, or (program executors) the handoff kept by the executor — on the device
    /// for cuda, so the expert reads the KV cache without a host copy.
    tensors: PrefixTensors,
    bytes: usize,
}

enum PrefixTensors {
    /// Handoff then made, in order.
    Host(Vec<TValue>),
    /// The handoff kept by the prefix graph's executor; the made tensors (an assembled
    /// prefix's length and mask, made on the host) beside it.
    Kept {
        kept: Box<dyn Kept>,
        made: Vec<TValue>,
    },
}

impl Prefix {
    /// Bytes of its tensors (what the prefix cache counts).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Its tensors as f32 (bools 0/1), in order: for comparing engines. A kept prefix is
    /// copied back from the device.
    pub fn to_f32(&self) -> Result<Vec<Vec<f32>>, EngineError> {
        match &self.tensors {
            PrefixTensors::Host(t) => t.iter().map(|t| to_f32(t, "prefix")).collect(),
            PrefixTensors::Kept { kept, made } => {
                let mut out: Vec<Vec<f32>> = kept
                    .to_host()
                    .map_err(|message| EngineError::Run {
                        graph: "prefix",
                        message,
                    })?
                    .iter()
                    .map(HostValue::to_f32)
                    .collect();
                for t in made {
                    out.push(to_f32(t, "prefix")?);
                }
                Ok(out)
            }
        }
    }
}

/// One graph input as raw little-endian bytes.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub name: String,
    /// `float32`, `int64` or `bool` (one byte each).
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Host-side inputs of one observation, decoded and checked by the policy.
pub struct Observation<'a> {
    /// One `H·W·3` HWC RGB frame per camera slot (zeros for an absent one).
    pub hwc: &'a [u8],
    pub present: &'a [bool],
    pub instruction: &'a str,
    /// The state as [`VlaModel::state_values`] gives it: an assembled prefix's last token
    /// ([`VlaModel::prefix_takes_state`]); ignored otherwise.
    pub state: Option<&'a [f32]>,
}

/// The embedding stage of an assembled prefix (contract `embed`): the per-piece graphs, the
/// state projection and the sizes read from them.
struct Embedder {
    image: Graph,
    image_out: usize,
    text: Graph,
    text_out: usize,
    /// Image tokens per camera (N), embedding width (D), prefix length (L).
    per_camera: usize,
    hidden: usize,
    len: usize,
    height: usize,
    width: usize,
    /// `[D, W]` row-major and `[D]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
    state_width: usize,
}

impl Embedder {
    fn load(
        dir: &Path,
        spec: &ExportV2,
        load: &mut dyn FnMut(&str, Want) -> Result<Graph, EngineError>,
        files: &mut Vec<PathBuf>,
    ) -> Result<Embedder, EngineError> {
        let e = spec.embed.as_ref().expect("called with an embed block");
        let tokens = e.tokens;
        let image_in = e.image.input.clone();
        let image = load(&e.image.graph, &|name: &str, rank: usize| {
            if name == image_in && rank == 4 {
                vec![Some(1), Some(3), None, None]
            } else {
                batch_one(name, rank)
            }
        })?;
        let text_in = e.text.input.clone();
        let text = load(&e.text.graph, &|name: &str, rank: usize| {
            if name == text_in && rank == 2 {
                vec![Some(1), Some(tokens)]
            } else {
                batch_one(name, rank)
            }
        })?;
        let image_path = dir.join(&image.file);
        let text_path = dir.join(&text.file);
        let (_, pin) = image.port(&image_path, &e.image.input, false)?;
        let (height, width) = match pin.shape.as_slice() {
            [1, 3, h, w] => (*h, *w),
            _ => {
                return Err(load_err(
                    &image_path,
                    format!("input {} is not [1, 3, H, W]", pin.describe()),
                ));
            }
        };
        let (image_out, pout) = image.port(&image_path, &e.image.output, true)?;
        let (per_camera, hidden) = match pout.shape.as_slice() {
            [1, n, d] => (*n, *d),
            _ => {
                return Err(load_err(
                    &image_path,
                    format!("output {} is not [1, N, D]", pout.describe()),
                ));
            }
        };
        let (_, tin) = text.port(&text_path, &e.text.input, false)?;
        if tin.shape != [1, tokens] {
            return Err(load_err(
                &text_path,
                format!("input {} is not [1, {tokens}]", tin.describe()),
            ));
        }
        let (text_out, tout) = text.port(&text_path, &e.text.output, true)?;
        if tout.shape != [1, tokens, hidden] {
            return Err(load_err(
                &text_path,
                format!(
                    "output {} is not [1, {tokens}, {hidden}] (the image embeddings' width)",
                    tout.describe()
                ),
            ));
        }
        let weight_path = side_file(dir, &e.state_weight);
        let weight = crate::npy::read_f32(&weight_path).map_err(|m| load_err(&weight_path, m))?;
        let state_width = match weight.shape.as_slice() {
            [d, w] if *d == hidden => *w,
            other => {
                return Err(load_err(
                    &weight_path,
                    format!("the state projection is {other:?}, not [{hidden}, state width]"),
                ));
            }
        };
        files.push(PathBuf::from(&e.state_weight));
        let bias = match &e.state_bias {
            Some(b) => {
                let path = side_file(dir, b);
                let a = crate::npy::read_f32(&path).map_err(|m| load_err(&path, m))?;
                if a.shape != [hidden] {
                    return Err(load_err(
                        &path,
                        format!("the state bias is {:?}, not [{hidden}]", a.shape),
                    ));
                }
                files.push(PathBuf::from(b));
                a.data
            }
            None => vec![0.0; hidden],
        };
        Ok(Embedder {
            image,
            image_out,
            text,
            text_out,
            per_camera,
            hidden,
            len: spec.cameras.len() * per_camera + tokens + 1,
            height,
            width,
            weight: weight.data,
            bias,
            state_width,
        })
    }
}

/// A real VLA export, loaded.
pub struct VlaModel {
    pub spec: ExportV2,
    embed: Option<Embedder>,
    prefix: Option<Graph>,
    expert: Graph,
    tokenizer: tokenizers::Tokenizer,
    pub tokenizer_hash: String,
    pub stats_source: String,
    state_norm: Norm,
    action_norm: Norm,
    pixel: PixelNorm,
    /// How the policy decodes and fits this export's frames.
    pub image: ImageConfig,
    pub height: usize,
    pub width: usize,
    pub tokens: usize,
    pub chunk: usize,
    /// The graphs' padded action width (the noise's width).
    pub action_width: usize,
    state_width: Option<usize>,
    /// Prefix outputs the expert takes, by name, in the prefix graph's output order.
    handoff: Vec<(usize, String)>,
    /// Expert inputs an assembled prefix makes beside them (its length, its mask), after
    /// the handoff in a [`Prefix`].
    made: Vec<String>,
    prefix_bytes: usize,
    /// Every file read, relative to the export or absolute, for `model_hash`.
    pub files: Vec<PathBuf>,
    /// What runs the graphs: `tract` or `onnxruntime` ([`Backend::name`]).
    pub engine: &'static str,
}

fn load_err(file: &Path, message: impl Into<String>) -> EngineError {
    EngineError::Load {
        graph: file.display().to_string(),
        message: message.into(),
    }
}

/// Resolves a side file of the contract: relative to the export (`tokenizer.json`,
/// `tokenizer/tokenizer.json`), or an absolute path given by a flag.
fn side_file(dir: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(name)
    }
}

impl VlaModel {
    pub fn load(dir: &Path, spec: ExportV2) -> Result<VlaModel, EngineError> {
        VlaModel::load_with(dir, spec, &Backend::Tract)
    }

    /// [`VlaModel::load`] on `backend`.
    pub fn load_with(
        dir: &Path,
        spec: ExportV2,
        backend: &Backend,
    ) -> Result<VlaModel, EngineError> {
        let config_path = dir.join(crate::config::CONFIG_FILE);
        spec.validate().map_err(|m| load_err(&config_path, m))?;
        let mut files = vec![PathBuf::from(crate::config::CONFIG_FILE)];
        let mut gathers = BTreeMap::new();
        let mut graph_files = vec![];
        let mut load = |file: &str, want: Want| -> Result<Graph, EngineError> {
            let (g, facts) = Graph::load(dir, file, backend, want)?;
            graph_files.push(PathBuf::from(file));
            graph_files.extend(facts.external.iter().map(PathBuf::from));
            gathers.extend(facts.gather_rows);
            Ok(g)
        };
        let mut side_files = vec![];
        let embed = match &spec.embed {
            Some(_) => Some(Embedder::load(dir, &spec, &mut load, &mut side_files)?),
            None => None,
        };
        let e_spec = spec.embed.as_ref();
        let prefix_want = |name: &str, rank: usize| match (&embed, e_spec) {
            (Some(em), Some(e)) if name == e.embeds_input => {
                vec![Some(1), Some(em.len), Some(em.hidden)]
            }
            (Some(em), Some(e)) if name == e.mask_input => vec![Some(1), Some(em.len)],
            _ => batch_one(name, rank),
        };
        let prefix = spec
            .graphs
            .prefix
            .as_deref()
            .map(|f| load(f, &prefix_want))
            .transpose()?;
        let expert_want = |name: &str, rank: usize| {
            // The prefix's outputs as they are; the prefix mask as long as the prefix.
            if let Some(o) = prefix
                .as_ref()
                .and_then(|p| p.outputs.iter().find(|o| o.name == name))
            {
                return o.shape.iter().map(|d| Some(*d)).collect();
            }
            match (&embed, e_spec) {
                (Some(em), Some(e)) if e.kv_mask_input.as_deref() == Some(name) => {
                    vec![Some(1), Some(em.len)]
                }
                _ => batch_one(name, rank),
            }
        };
        let expert = load(&spec.graphs.expert, &expert_want)?;
        files.extend(graph_files);
        files.extend(side_files);
        // The graph that takes the observation: the prefix, or the whole model.
        let obs = prefix.as_ref().unwrap_or(&expert);
        let obs_path = dir.join(&obs.file);
        let exp_path = dir.join(&expert.file);
        let input = |g: &Graph, path: &Path, name: &str| -> Result<Port, EngineError> {
            g.port(path, name, false).map(|(_, p)| p)
        };

        // Cameras: [1, 3, H, W], all the same size; masks bool [1]. (An assembled prefix: the
        // image graph's, read by the embedder.)
        let mut hw = embed.as_ref().map(|e| (e.height, e.width));
        let mut known: Vec<String> = vec![];
        if let Some(e) = e_spec {
            known.push(e.embeds_input.clone());
            known.push(e.mask_input.clone());
        }
        for c in spec.cameras.iter().filter(|_| embed.is_none()) {
            let p = input(obs, &obs_path, &c.input)?;
            match p.shape.as_slice() {
                [1, 3, h, w] if hw.is_none_or(|s| s == (*h, *w)) => hw = Some((*h, *w)),
                _ => {
                    return Err(load_err(
                        &obs_path,
                        format!(
                            "camera {:?}: input {} is not [1, 3, H, W] like the others",
                            c.name,
                            p.describe()
                        ),
                    ));
                }
            }
            known.push(c.input.clone());
            if let Some(m) = &c.mask {
                let p = input(obs, &obs_path, m)?;
                if p.len() != 1 {
                    return Err(load_err(
                        &obs_path,
                        format!("mask {} is not one value", p.describe()),
                    ));
                }
                known.push(m.clone());
            }
        }
        let (height, width) = hw.expect("validate: at least one camera");

        // Instruction: tokens [1, T] (and the mask [1, T]); the tokenizer's ids must index the
        // embedding.
        let ins = &spec.instruction;
        let tokens = match e_spec {
            Some(e) => e.tokens,
            None => {
                let tok_port = input(obs, &obs_path, &ins.tokens_input)?;
                known.push(ins.tokens_input.clone());
                match tok_port.shape.as_slice() {
                    [1, t] => *t,
                    _ => {
                        return Err(load_err(
                            &obs_path,
                            format!("tokens {} is not [1, T]", tok_port.describe()),
                        ));
                    }
                }
            }
        };
        if let Some(m) = ins.mask_input.as_ref().filter(|_| embed.is_none()) {
            let p = input(obs, &obs_path, m)?;
            if p.shape != [1, tokens] {
                return Err(load_err(
                    &obs_path,
                    format!("token mask {} is not [1, {tokens}]", p.describe()),
                ));
            }
            known.push(m.clone());
        }
        let tok_path = side_file(dir, &ins.tokenizer);
        let tok_bytes = std::fs::read(&tok_path)
            .map_err(|e| load_err(&tok_path, format!("cannot read the tokenizer: {e}")))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&tok_bytes)
            .map_err(|e| load_err(&tok_path, format!("not a HuggingFace tokenizer.json: {e}")))?;
        let vocab = tokenizer.get_vocab_size(true);
        if let Some(rows) = gathers.get(&ins.tokens_input)
            && vocab as i64 > *rows
        {
            return Err(load_err(
                &tok_path,
                format!(
                    "the tokenizer's vocabulary ({vocab} ids) exceeds the token embedding {} indexes ({rows} rows)",
                    ins.tokens_input
                ),
            ));
        }
        files.push(tok_path.clone());
        let tokenizer_hash = hex(&Sha256::digest(&tok_bytes)[..8]);

        // The expert's inputs: the prefix hand-off, then noise / x_t, t / state.
        let exp_graph = &expert;
        let d = &spec.denoise;
        let (x_name, chunk, action_width) = {
            let name = match d.expert {
                ExpertMode::Baked => d.noise_input.clone(),
                ExpertMode::PerStep => d.x_input.clone(),
            }
            .expect("validate: the expert's inputs are named");
            let p = input(exp_graph, &exp_path, &name)?;
            match p.shape.as_slice() {
                [1, c, w] => (name, *c, *w),
                _ => {
                    return Err(load_err(
                        &exp_path,
                        format!("{} is not [1, chunk, width]", p.describe()),
                    ));
                }
            }
        };
        let out_name = match d.expert {
            ExpertMode::Baked => d.actions_output.clone(),
            ExpertMode::PerStep => d.velocity_output.clone(),
        }
        .expect("validate: the expert's output is named");
        match exp_graph.outputs.iter().find(|p| p.name == out_name) {
            Some(p) if p.len() == chunk * action_width => {}
            Some(p) => {
                return Err(load_err(
                    &exp_path,
                    format!(
                        "output {} is not [1, {chunk}, {action_width}]",
                        p.describe()
                    ),
                ));
            }
            None => {
                return Err(load_err(
                    &exp_path,
                    format!("the config names output {out_name:?}, which the graph does not have"),
                ));
            }
        }
        if spec.actions.dim > action_width {
            return Err(load_err(
                &config_path,
                format!(
                    "actions.dim {} exceeds the graph's action width {action_width}",
                    spec.actions.dim
                ),
            ));
        }
        let mut exp_known = vec![x_name];
        if let Some(t) = d
            .t_input
            .clone()
            .filter(|_| d.expert == ExpertMode::PerStep)
        {
            input(exp_graph, &exp_path, &t)?;
            exp_known.push(t);
        }
        // Inputs an assembled prefix makes, and the action positions.
        let mut made = vec![];
        let mut made_bytes = 0;
        let fixed_input = |name: &str, dt: DatumType, shape: &[usize]| -> Result<(), EngineError> {
            let p = input(exp_graph, &exp_path, name)?;
            if p.dt != dt || p.shape != shape {
                return Err(load_err(
                    &exp_path,
                    format!("input {} is not {dt:?}{shape:?}", p.describe()),
                ));
            }
            Ok(())
        };
        if let Some(pos) = &d.positions_input {
            fixed_input(pos, DatumType::I64, &[1, chunk])?;
            exp_known.push(pos.clone());
        }
        if let (Some(e), Some(em)) = (e_spec, &embed) {
            if let Some(off) = &e.offset_input {
                fixed_input(off, DatumType::I64, &[1, 1])?;
                made.push(off.clone());
                made_bytes += 8;
            }
            if let Some(m) = &e.kv_mask_input {
                fixed_input(m, DatumType::Bool, &[1, em.len])?;
                made.push(m.clone());
                made_bytes += em.len;
            }
            exp_known.extend(made.iter().cloned());
        }
        let state_width = match &spec.state.input {
            None => embed.as_ref().map(|e| e.state_width),
            Some(name) => {
                // The state goes to the graph that takes it: the expert (or the whole model).
                let (g, path) = if exp_graph.input(name).is_some() || prefix.is_none() {
                    (exp_graph, &exp_path)
                } else {
                    (obs, &obs_path)
                };
                let p = input(g, path, name)?;
                let w = match p.shape.as_slice() {
                    [1, w] => *w,
                    _ => {
                        return Err(load_err(
                            path,
                            format!("state {} is not [1, width]", p.describe()),
                        ));
                    }
                };
                if spec.state.dim > w {
                    return Err(load_err(
                        &config_path,
                        format!(
                            "state.dim {} exceeds the graph's state width {w}",
                            spec.state.dim
                        ),
                    ));
                }
                if std::ptr::eq(g, exp_graph) {
                    exp_known.push(name.clone());
                } else {
                    known.push(name.clone());
                }
                Some(w)
            }
        };
        let mut handoff = vec![];
        let mut prefix_bytes = made_bytes;
        if let Some(p) = &prefix {
            for i in &exp_graph.inputs {
                if exp_known.contains(&i.name) {
                    continue;
                }
                let Some(ix) = p.output_index(&i.name) else {
                    return Err(load_err(
                        &exp_path,
                        format!(
                            "input {} is neither an output of {} nor named by the config",
                            i.describe(),
                            p.file
                        ),
                    ));
                };
                let out = &p.outputs[ix];
                if out.shape != i.shape {
                    return Err(load_err(
                        &exp_path,
                        format!(
                            "input {} does not match the prefix's output {}",
                            i.describe(),
                            out.describe()
                        ),
                    ));
                }
                prefix_bytes += p.kept_bytes(ix);
                handoff.push((ix, i.name.clone()));
            }
            for i in &p.inputs {
                if !known.contains(&i.name) {
                    return Err(load_err(
                        &obs_path,
                        format!("input {} is not named by the config", i.describe()),
                    ));
                }
            }
        } else {
            for i in &exp_graph.inputs {
                if !known.contains(&i.name) && !exp_known.contains(&i.name) {
                    return Err(load_err(
                        &exp_path,
                        format!("input {} is not named by the config", i.describe()),
                    ));
                }
            }
        }

        // Stats.
        let (state_norm, action_norm, stats_source) =
            resolve_stats(dir, &spec, state_width.is_some(), &mut files)?;
        let image = image_config(&spec, height, width);
        // An absent camera is the contract's fill value, not the reference format's grey.
        let pixel = PixelNorm {
            blank: [spec.image.absent_fill; 3],
            ..crate::preprocess::pixel_norm(&image)
        };
        Ok(VlaModel {
            engine: backend.name(),
            embed,
            made,
            prefix,
            expert,
            tokenizer,
            tokenizer_hash,
            stats_source,
            state_norm,
            action_norm,
            pixel,
            image,
            height,
            width,
            tokens,
            chunk,
            action_width,
            state_width,
            handoff,
            prefix_bytes,
            files,
            spec,
        })
    }

    /// Each graph's compiled program by file name, in load order (embedding graphs, prefix,
    /// expert), when the backend compiles ([`Backend::Reference`], [`Backend::Cuda`]).
    pub fn programs(&self) -> Vec<(&str, &Program)> {
        let embed = self.embed.iter().flat_map(|e| [&e.image, &e.text]);
        embed
            .chain(&self.prefix)
            .chain(std::iter::once(&self.expert))
            .filter_map(|g| match &g.exec {
                Exec::Program(r) => Some((g.file.as_str(), r.program())),
                _ => None,
            })
            .collect()
    }

    /// Bytes of one [`Prefix`] (0 for a monolithic export: nothing is cached).
    pub fn prefix_bytes(&self) -> usize {
        self.prefix_bytes
    }

    /// Where a [`Prefix`] lives: `device` when the cuda engine keeps it in GPU memory, else
    /// `host`.
    pub fn prefix_location(&self) -> &'static str {
        if self.engine == "cuda" && self.prefix.is_some() {
            "device"
        } else {
            "host"
        }
    }

    pub fn is_monolithic(&self) -> bool {
        self.prefix.is_none()
    }

    /// Tokenizes an instruction: template, special tokens, truncated and right-padded to the
    /// graph's length; the mask is true for real tokens.
    pub fn tokenize(&self, instruction: &str) -> Result<(Vec<i64>, Vec<bool>), EngineError> {
        let ins = &self.spec.instruction;
        let cleaned;
        let instruction = if ins.clean {
            cleaned = instruction.trim().replace(['_', '\n'], " ");
            cleaned.as_str()
        } else {
            instruction
        };
        let text = ins.template.replace("{instruction}", instruction);
        let enc = self
            .tokenizer
            .encode(text, ins.add_special_tokens)
            .map_err(|e| EngineError::Run {
                graph: "tokenizer",
                message: e.to_string(),
            })?;
        let mut ids: Vec<i64> = enc
            .get_ids()
            .iter()
            .take(self.tokens)
            .map(|&i| i as i64)
            .collect();
        let mut mask = vec![true; ids.len()];
        ids.resize(self.tokens, ins.pad_id as i64);
        mask.resize(self.tokens, false);
        Ok((ids, mask))
    }

    /// The robot's state, normalised and zero-padded to the graph's width.
    pub fn state_values(&self, state: &[f32]) -> Option<Vec<f32>> {
        let w = self.state_width?;
        let mut out = vec![0.0; w];
        for (i, s) in state.iter().enumerate().take(w) {
            out[i] = self.state_norm.normalize(i, *s);
        }
        Some(out)
    }

    /// Whether a state value stays finite once normalised (the policy refuses it otherwise).
    pub fn state_is_finite(&self, i: usize, s: f32) -> bool {
        self.state_width.is_none() || self.state_norm.normalize(i, s).is_finite()
    }

    /// Camera `slot`'s planes `[3, H, W]`, normalised, and whether it counts as present
    /// (an absent camera is filled, or gets the primary frame under `copy_primary`).
    fn camera_planes(&self, obs: &Observation<'_>, slot: usize) -> (Vec<f32>, bool) {
        let (h, w) = (self.height, self.width);
        let per = h * w * 3;
        let primary = &obs.hwc[..per];
        let mut planes = vec![0.0f32; per];
        let present = obs.present.get(slot).copied().unwrap_or(false);
        let (frame, on) = match (present, self.spec.image.absent) {
            (true, _) => (Some(&obs.hwc[slot * per..(slot + 1) * per]), true),
            (false, Absent::CopyPrimary) => (Some(primary), true),
            (false, Absent::Fill) => (None, false),
        };
        match frame {
            Some(f) => self.pixel.apply(f, &mut planes),
            None => self.pixel.fill_blank(&mut planes),
        }
        if self.spec.image.channels == Channels::Bgr {
            let plane = h * w;
            let (r, rest) = planes.split_at_mut(plane);
            r.swap_with_slice(&mut rest[plane..]);
        }
        (planes, on)
    }

    /// The observation's graph inputs: camera planes and masks, tokens and mask.
    fn observation_feed<'a>(
        &'a self,
        obs: &Observation<'_>,
    ) -> Result<BTreeMap<&'a str, TValue>, EngineError> {
        if self.embed.is_some() {
            return Err(EngineError::Run {
                graph: "vla",
                message: "an assembled prefix (embed) has no single observation feed".into(),
            });
        }
        let mut feed = BTreeMap::new();
        let (h, w) = (self.height, self.width);
        for (slot, cam) in self.spec.cameras.iter().enumerate() {
            let (planes, on) = self.camera_planes(obs, slot);
            feed.insert(cam.input.as_str(), value(&[1, 3, h, w], &planes)?);
            if let Some(m) = &cam.mask {
                feed.insert(m.as_str(), value(&[1], &[on])?);
            }
        }
        let (ids, mask) = self.tokenize(obs.instruction)?;
        let ins = &self.spec.instruction;
        feed.insert(ins.tokens_input.as_str(), value(&[1, self.tokens], &ids)?);
        if let Some(m) = &ins.mask_input {
            feed.insert(m.as_str(), value(&[1, self.tokens], &mask)?);
        }
        Ok(feed)
    }

    /// The observation's graph inputs as raw little-endian tensors (`float32`, `int64`,
    /// `bool` one byte each): what `reflex bench engines --export` hands onnxruntime so that
    /// both runtimes see the same bytes.
    pub fn observation_raw(&self, obs: &Observation<'_>) -> Result<Vec<RawTensor>, EngineError> {
        let feed = self.observation_feed(obs)?;
        let mut out = vec![];
        for (name, v) in feed {
            let view = v.try_as_plain_ram().map_err(tract_err)?;
            let (dtype, bytes): (&'static str, Vec<u8>) = match v.datum_type() {
                DatumType::F32 => (
                    "float32",
                    view.as_slice::<f32>()
                        .map_err(tract_err)?
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect(),
                ),
                DatumType::I64 => (
                    "int64",
                    view.as_slice::<i64>()
                        .map_err(tract_err)?
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect(),
                ),
                DatumType::Bool => (
                    "bool",
                    view.as_slice::<bool>()
                        .map_err(tract_err)?
                        .iter()
                        .map(|b| *b as u8)
                        .collect(),
                ),
                other => {
                    return Err(EngineError::Run {
                        graph: "vla",
                        message: format!("input {name} is {other:?}"),
                    });
                }
            };
            out.push(RawTensor {
                name: name.to_string(),
                dtype,
                shape: v.shape().to_vec(),
                bytes,
            });
        }
        Ok(out)
    }

    /// Runs the prefix graph on one observation (decomposed exports).
    pub fn prefix(&self, obs: &Observation<'_>) -> Result<Prefix, EngineError> {
        let g = self.prefix.as_ref().ok_or_else(|| EngineError::Run {
            graph: "prefix",
            message: "a monolithic export has no prefix graph".into(),
        })?;
        let (feed, made) = match &self.embed {
            Some(e) => self.assemble(e, obs)?,
            None => (self.observation_feed(obs)?, vec![]),
        };
        let keep: Vec<usize> = self.handoff.iter().map(|(ix, _)| *ix).collect();
        if let Some(kept) = g.run_kept(&feed, &keep) {
            return Ok(Prefix {
                tensors: PrefixTensors::Kept { kept: kept?, made },
                bytes: self.prefix_bytes,
            });
        }
        let out = g.run(&feed)?;
        Ok(Prefix {
            tensors: PrefixTensors::Host(
                self.handoff
                    .iter()
                    .map(|(ix, _)| out[*ix].clone())
                    .chain(made)
                    .collect(),
            ),
            bytes: self.prefix_bytes,
        })
    }

    /// Whether the state is part of the prefix (an assembled prefix's last token): the
    /// prefix cache then keys on it too.
    pub fn prefix_takes_state(&self) -> bool {
        self.embed.is_some()
    }

    /// An assembled prefix (contract `embed`): each camera through the image graph, the
    /// tokens through the text graph, both × scale, the state projected; the prefix graph's
    /// feed, and the expert inputs made beside it (the length, the mask) in `made` order.
    fn assemble<'a>(
        &'a self,
        e: &Embedder,
        obs: &Observation<'_>,
    ) -> Result<(BTreeMap<&'a str, TValue>, Vec<TValue>), EngineError> {
        let spec = self.spec.embed.as_ref().expect("an embedder has its spec");
        let scale = spec.scale;
        let (d, n, l) = (e.hidden, e.per_camera, e.len);
        let mut embeds = Vec::with_capacity(l * d);
        let mut valid = Vec::with_capacity(l);
        for slot in 0..self.spec.cameras.len() {
            let (planes, on) = self.camera_planes(obs, slot);
            let mut feed = BTreeMap::new();
            feed.insert(
                spec.image.input.as_str(),
                value(&[1, 3, e.height, e.width], &planes)?,
            );
            let out = e.image.run(&feed)?;
            let emb = to_f32(&out[e.image_out], "image embeddings")?;
            embeds.extend(emb.iter().map(|x| x * scale));
            valid.extend(std::iter::repeat_n(on, n));
        }
        let (ids, real) = self.tokenize(obs.instruction)?;
        let mut feed = BTreeMap::new();
        feed.insert(spec.text.input.as_str(), value(&[1, ids.len()], &ids)?);
        let out = e.text.run(&feed)?;
        let emb = to_f32(&out[e.text_out], "text embeddings")?;
        embeds.extend(emb.iter().map(|x| x * scale));
        valid.extend(real);
        // The state token: state · Wᵀ + b, W [D, width].
        let zeros = vec![0.0; e.state_width];
        let state = obs.state.unwrap_or(&zeros);
        for (row, b) in e.weight.chunks_exact(e.state_width).zip(&e.bias) {
            let dot: f32 = row.iter().zip(state).map(|(w, s)| w * s).sum();
            embeds.push(dot + b);
        }
        valid.push(true);
        let (mask, kv): (Vec<i64>, Vec<bool>) = match spec.mask {
            EmbedMask::Seed => (
                (0..l).map(|i| i64::from(i + 1 == l)).collect(),
                vec![true; l],
            ),
            EmbedMask::Valid => (valid.iter().map(|v| i64::from(*v)).collect(), valid),
        };
        let mut feed = BTreeMap::new();
        feed.insert(spec.embeds_input.as_str(), value(&[1, l, d], &embeds)?);
        feed.insert(spec.mask_input.as_str(), value(&[1, l], &mask)?);
        let mut made = vec![];
        if spec.offset_input.is_some() {
            made.push(value(&[1, 1], &[l as i64])?);
        }
        if spec.kv_mask_input.is_some() {
            made.push(value(&[1, l], &kv)?);
        }
        Ok((feed, made))
    }

    /// A prefix of zeros in the right shapes (the watchdog's liveness probe).
    pub fn zero_prefix(&self) -> Result<Prefix, EngineError> {
        let mut tensors = vec![];
        for name in self.handoff.iter().map(|(_, n)| n).chain(&self.made) {
            let p = self.expert.input(name).expect("checked at load");
            let t = Tensor::zero_dt(p.dt, &p.shape).map_err(|e| EngineError::Run {
                graph: "expert",
                message: format!("{e:#}"),
            })?;
            tensors.push(t.into_tvalue());
        }
        Ok(Prefix {
            tensors: PrefixTensors::Host(tensors),
            bytes: self.prefix_bytes,
        })
    }

    fn noise_shape(&self) -> [usize; 3] {
        [1, self.chunk, self.action_width]
    }

    /// Integrates the expert from `noise` (chunk × action_width): the graph's loop (baked) or
    /// ours (per step), over the prefix. Returns the graph-width actions, normalised.
    pub fn denoise(
        &self,
        prefix: &Prefix,
        noise: &[f32],
        state: Option<&[f32]>,
    ) -> Result<Vec<f32>, EngineError> {
        let d = &self.spec.denoise;
        let mut feed: BTreeMap<&str, TValue> = BTreeMap::new();
        let handoff: Vec<&str> = self.handoff.iter().map(|(_, n)| n.as_str()).collect();
        let kept = match &prefix.tensors {
            PrefixTensors::Host(tensors) => {
                let names = handoff
                    .iter()
                    .copied()
                    .chain(self.made.iter().map(String::as_str));
                for (name, t) in names.zip(tensors) {
                    feed.insert(name, t.clone());
                }
                None
            }
            PrefixTensors::Kept { kept, made } => {
                for (name, t) in self.made.iter().zip(made) {
                    feed.insert(name.as_str(), t.clone());
                }
                Some(KeptFeed {
                    tensors: kept.as_ref(),
                    names: &handoff,
                })
            }
        };
        let kept = kept.as_ref();
        if let Some(pos) = &d.positions_input {
            let positions: Vec<i64> = (0..self.chunk as i64).collect();
            feed.insert(pos.as_str(), value(&[1, self.chunk], &positions)?);
        }
        if let (Some(name), Some(s)) = (&self.spec.state.input, state) {
            feed.insert(name.as_str(), value(&[1, s.len()], s)?);
        }
        let shape = self.noise_shape();
        match d.expert {
            ExpertMode::Baked => {
                let name = d.noise_input.as_deref().expect("validated");
                feed.insert(name, value(&shape, noise)?);
                let out = self.expert.run_with(&feed, kept)?;
                let ix = self
                    .expert
                    .output_index(d.actions_output.as_deref().expect("validated"))
                    .expect("checked at load");
                to_f32(&out[ix], "actions")
            }
            ExpertMode::PerStep => {
                let x_name = d.x_input.as_deref().expect("validated");
                let t_name = d.t_input.as_deref().expect("validated");
                let t_port = self.expert.input(t_name).expect("checked at load").clone();
                let v_ix = self
                    .expert
                    .output_index(d.velocity_output.as_deref().expect("validated"))
                    .expect("checked at load");
                let n = d.steps;
                // Step k at t₀ + k·dt in f64, fed as f32; x moves by dt in f32 (the seed
                // runtime's `time_val = 1.0 + step * dt`, `x_t + dt * v_t`).
                let (t0, dt) = match d.time {
                    TimeDirection::OneToZero => (1.0f64, -1.0 / n as f64),
                    TimeDirection::ZeroToOne => (0.0f64, 1.0 / n as f64),
                };
                let dt32 = dt as f32;
                let times: Vec<f32> = (0..n).map(|k| (t0 + k as f64 * dt) as f32).collect();
                let v_name = d.velocity_output.as_deref().expect("validated");
                if let Some(r) =
                    self.expert
                        .run_loop((x_name, t_name, v_name), noise, &times, dt32, &feed, kept)
                {
                    // The executor's own loop (the cuda engine's programs): the same times
                    // and update, one graph for the whole loop.
                    return r;
                }
                let mut x = noise.to_vec();
                for k in 0..n {
                    let t = (t0 + k as f64 * dt) as f32;
                    feed.insert(x_name, value(&shape, &x)?);
                    feed.insert(t_name, value(&t_port.shape, &vec![t; t_port.len()])?);
                    let out = self.expert.run_with(&feed, kept)?;
                    let v = to_f32(&out[v_ix], "velocity")?;
                    for (xi, vi) in x.iter_mut().zip(&v) {
                        *xi += dt32 * vi;
                    }
                }
                Ok(x)
            }
        }
    }

    /// A monolithic export's one graph: observation, state and noise → actions.
    pub fn run_monolithic(
        &self,
        obs: &Observation<'_>,
        noise: &[f32],
        state: Option<&[f32]>,
    ) -> Result<Vec<f32>, EngineError> {
        let d = &self.spec.denoise;
        let mut feed = self.observation_feed(obs)?;
        if let (Some(name), Some(s)) = (&self.spec.state.input, state) {
            feed.insert(name.as_str(), value(&[1, s.len()], s)?);
        }
        feed.insert(
            d.noise_input.as_deref().expect("validated"),
            value(&self.noise_shape(), noise)?,
        );
        let out = self.expert.run(&feed)?;
        let ix = self
            .expert
            .output_index(d.actions_output.as_deref().expect("validated"))
            .expect("checked at load");
        to_f32(&out[ix], "actions")
    }

    /// Graph-width normalised actions → the robot's `actions.dim` columns, de-normalised.
    pub fn robot_actions(&self, graph: &[f32]) -> Vec<f32> {
        let dim = self.spec.actions.dim;
        let mut out = Vec::with_capacity(self.chunk * dim);
        for row in graph.chunks_exact(self.action_width) {
            for (j, a) in row[..dim].iter().enumerate() {
                out.push(self.action_norm.denormalize(j, *a));
            }
        }
        out
    }

    /// What describes this export beyond its shapes: the trace header's and ModelInfo's
    /// `export` facts.
    pub fn facts(&self) -> BTreeMap<String, String> {
        let s = &self.spec;
        let mut m = BTreeMap::new();
        m.insert(
            "format".into(),
            format!("reflex-export v{}", s.format_version),
        );
        m.insert(
            "expert".into(),
            match s.denoise.expert {
                ExpertMode::Baked => "baked".into(),
                ExpertMode::PerStep => "per_step".into(),
            },
        );
        m.insert("tokenizer".into(), s.instruction.tokenizer.clone());
        m.insert("tokenizer_hash".into(), self.tokenizer_hash.clone());
        m.insert("stats_source".into(), self.stats_source.clone());
        m.insert(
            "image_range".into(),
            format!("{:?}", s.image.range).to_lowercase(),
        );
        m.insert(
            "image_resize".into(),
            serde_json::to_value(s.image.resize)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        );
        m.insert(
            "noise".into(),
            serde_json::to_value(s.noise)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        );
        m.insert("noise_width".into(), self.action_width.to_string());
        m.insert("tokens".into(), self.tokens.to_string());
        if let (Some(e), Some(es)) = (&s.embed, &self.embed) {
            m.insert(
                "prefix_assembly".into(),
                format!(
                    "{} per camera + {} + state projection ({}), L={}, mask {}",
                    e.image.graph,
                    e.text.graph,
                    e.state_weight,
                    es.len,
                    serde_json::to_value(e.mask)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ),
            );
        }
        m
    }
}

/// How frames are decoded, fitted and normalised for this export: the contract's range as
/// the mean and std that [`crate::preprocess`] applies to every export.
fn image_config(spec: &ExportV2, height: usize, width: usize) -> ImageConfig {
    let img = &spec.image;
    let (mean, std) = match img.range {
        Range::Unit => ([0.0; 3], [1.0; 3]),
        Range::Signed => ([0.5; 3], [0.5; 3]),
        Range::MeanStd => (img.mean.unwrap_or([0.0; 3]), img.std.unwrap_or([1.0; 3])),
    };
    ImageConfig {
        height: height as u32,
        width: width as u32,
        mean,
        std,
        resize: match img.resize {
            crate::contract::Resize::Stretch => ResizePolicy::Resize,
            crate::contract::Resize::PadSquare => ResizePolicy::PadSquare,
            crate::contract::Resize::Exact => ResizePolicy::Exact,
        },
    }
}

fn resolve_stats(
    dir: &Path,
    spec: &ExportV2,
    takes_state: bool,
    files: &mut Vec<PathBuf>,
) -> Result<(Norm, Norm, String), EngineError> {
    let config_path = dir.join(crate::config::CONFIG_FILE);
    let state_mode = if takes_state {
        spec.state.normalization
    } else {
        Normalization::None
    };
    let action_mode = spec.actions.normalization;
    let (vectors, source): (BTreeMap<String, Vec<f32>>, String) = match &spec.stats {
        None => (BTreeMap::new(), "none".into()),
        Some(StatsV2::File { file }) => {
            let path = side_file(dir, file);
            let v = read_stats_file(&path).map_err(|m| load_err(&path, m))?;
            files.push(path.clone());
            (v, file.clone())
        }
        Some(StatsV2::Inline { state, actions }) => {
            let mut v = BTreeMap::new();
            for (key, s) in [("observation.state", state), ("action", actions)] {
                for (k, vals) in [
                    ("mean", &s.mean),
                    ("std", &s.std),
                    ("q01", &s.q01),
                    ("q99", &s.q99),
                ] {
                    if let Some(vals) = vals {
                        v.insert(format!("{key}.{k}"), vals.clone());
                    }
                }
            }
            (v, "inline".into())
        }
    };
    let norm = |key: &str, mode: Normalization, dim: usize| -> Result<Norm, EngineError> {
        let get = |k: &str| -> Result<Vec<f32>, EngineError> {
            let v = vectors.get(&format!("{key}.{k}")).ok_or_else(|| {
                load_err(
                    &config_path,
                    format!(
                        "stats ({source}) have no {key}.{k}, which {mode:?} normalisation needs"
                    ),
                )
            })?;
            if v.len() < dim || v.iter().any(|x| !x.is_finite()) {
                return Err(load_err(
                    &config_path,
                    format!(
                        "stats {key}.{k} ({source}) need {dim} finite values, have {}",
                        v.len()
                    ),
                ));
            }
            Ok(v[..dim].to_vec())
        };
        Ok(match mode {
            Normalization::None => Norm::None,
            Normalization::MeanStd => Norm::MeanStd {
                mean: get("mean")?,
                std: get("std")?,
            },
            Normalization::Quantile => Norm::Quantile {
                q01: get("q01")?,
                q99: get("q99")?,
            },
        })
    };
    Ok((
        norm("observation.state", state_mode, spec.state.dim)?,
        norm("action", action_mode, spec.actions.dim)?,
        source,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self, Kind, assets, pi05};
    use crate::policy::{ActInput, CacheStatus, FrameInput, Policy, PolicyOptions};

    fn png(shade: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(x * 8) as u8 ^ shade, (y * 8) as u8, shade])
        });
        crate::preprocess::encode_png(&img)
    }

    fn input(noise: Option<Vec<f32>>, seed: Option<u64>) -> ActInput {
        input_n(3, noise, seed)
    }

    /// [`input`] for a model of `cameras` cameras.
    fn input_n(cameras: usize, noise: Option<Vec<f32>>, seed: Option<u64>) -> ActInput {
        let frame = |index: usize, shade: u8| {
            Some(FrameInput {
                index,
                data: png(shade),
                expect_sha256: None,
                sha_field: String::new(),
            })
        };
        ActInput {
            frames: [frame(0, 40), frame(1, 200), None]
                .into_iter()
                .take(cameras)
                .collect(),
            instruction: "pick up the red block".into(),
            state: vec![0.1, 0.2, 0.0, -1.8, 0.0, 2.0, 0.8, 0.04],
            noise_seed: seed,
            noise,
        }
    }

    fn opts(cache_entries: usize) -> PolicyOptions {
        PolicyOptions {
            cache_entries,
            ..Default::default()
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn every_seed_fixture_serves_and_a_native_v2_config_gives_the_same_bits() {
        for kind in Kind::ALL.into_iter().filter(|k| k.variant().is_some()) {
            let d = tempfile::tempdir().unwrap();
            fixtures::write(kind, d.path(), 3).unwrap();
            let p = Policy::load(d.path(), &opts(8)).unwrap();
            let f = p.config();
            assert_eq!(f.cameras, kind.cameras(), "{kind}");
            let cams = f.cameras.len();
            let input = |noise, seed| input_n(cams, noise, seed);
            assert_eq!(
                (f.state_dim, f.action_dim),
                (assets::ROBOT_STATE_DIM, assets::ROBOT_ACTION_DIM)
            );
            assert_eq!(
                (f.chunk_size, f.noise_width),
                (pi05::CHUNK as usize, pi05::ACTION_WIDTH as usize)
            );
            assert_eq!(f.export["source"], "reflex-vla");
            // Seed 11's noise as this export draws it: ChaCha8, or numpy's RandomState for a
            // seed monolithic export with its quirks kept.
            let n = f.chunk_size * f.noise_width;
            let noise = if kind.monolithic() {
                crate::seed::numpy_legacy_randn(11, n)
            } else {
                crate::policy::gaussian_noise(11, n)
            };
            let a = p.act(&input(Some(noise.clone()), None)).unwrap();
            assert_eq!(a.actions.len(), 50 * assets::ROBOT_ACTION_DIM);
            assert!(a.actions.iter().all(|v| v.is_finite()));
            // The explicit noise is the draw of seed 11: the same bits as asking for seed 11.
            let b = p.act(&input(None, Some(11))).unwrap();
            assert_eq!(bits(&a.actions), bits(&b.actions), "{kind}");
            assert_eq!(b.noise_seed, 11);
            let c = p.act(&input(None, Some(12))).unwrap();
            assert_ne!(bits(&a.actions), bits(&c.actions), "{kind}");
            if kind.monolithic() {
                assert_eq!(b.cache, CacheStatus::Disabled);
                // The seed's monolithic servers replay one noise: seed 0 for every call.
                assert_eq!(p.act(&input(None, None)).unwrap().noise_seed, 0);
            } else {
                assert_eq!((a.cache, b.cache), (CacheStatus::Miss, CacheStatus::Hit));
                assert!(p.cache_capacity().unwrap().entry_bytes > 2 * 2 * 64 * 16 * 4);
                // The state is the four-graph prefix's last token: another state is another
                // prefix (a miss, other actions); elsewhere it is not part of the prefix.
                let mut moved = input(None, Some(11));
                moved.state[0] += 0.5;
                let m = p.act(&moved).unwrap();
                if kind == Kind::SmolvlaFourGraph {
                    assert_eq!(m.cache, CacheStatus::Miss);
                    assert_ne!(bits(&m.actions), bits(&a.actions));
                } else {
                    assert_eq!(m.cache, CacheStatus::Hit, "{kind}");
                }
            }
            // The calls above proved the engine: the probe skips the whole-loop run; the
            // next one, with no call between, runs it.
            assert_eq!(p.probe().unwrap(), crate::policy::Probed::ProvenByCalls);
            assert_eq!(p.probe().unwrap(), crate::policy::Probed::Ran);
            assert_eq!(p.probe().unwrap(), crate::policy::Probed::Ran);

            // The same export described by a native format_version 2 config.
            let cfg: serde_json::Value = serde_json::from_slice(
                &std::fs::read(d.path().join("reflex_config.json")).unwrap(),
            )
            .unwrap();
            let mut spec = crate::seed::map(d.path(), &cfg, &Default::default())
                .unwrap()
                .spec;
            spec.instruction.tokenizer = assets::TOKENIZER_FILE.into();
            spec.stats = Some(StatsV2::File {
                file: assets::STATS_FILE.into(),
            });
            std::fs::write(
                d.path().join("reflex_config.json"),
                serde_json::to_vec_pretty(&spec).unwrap(),
            )
            .unwrap();
            let v2 = Policy::load(d.path(), &opts(0)).unwrap();
            assert_eq!(v2.config().export["format"], "reflex-export v2");
            assert!(!v2.config().export.contains_key("source"));
            let again = v2.act(&input(None, Some(11))).unwrap();
            assert_eq!(bits(&a.actions), bits(&again.actions), "{kind} as v2");
        }
    }

    /// The cuda engine's path for every real-export kind, without a GPU: each graph compiled
    /// by [`crate::engine::graph`] (symbols pinned as for tract, the per-step expert's
    /// float64 time embedding cut out for the host) and run by the CPU reference executor,
    /// under the same runtime (prefix list-of-tensors, the per-step Euler loop, the
    /// four-graph assembly). The prefix tensors and the actions agree with tract's on the
    /// same observation and noise (cos ≥ 0.99999, max |Δ| ≤ 1e-4 of the largest value), and
    /// repeats are bit-identical.
    #[test]
    fn every_real_export_kind_runs_on_the_cuda_program_path_and_agrees_with_tract() {
        let agree = |what: &str, ours: &[f32], theirs: &[f32]| {
            assert_eq!(ours.len(), theirs.len(), "{what}");
            let (cos, max_abs) = crate::engine::cos_and_max_abs(ours, theirs);
            let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
            assert!(
                cos >= 0.99999 && max_abs <= 1e-4 * scale as f64,
                "{what}: cos {cos}, max_abs {max_abs}"
            );
        };
        for kind in Kind::ALL.into_iter().filter(|k| k.variant().is_some()) {
            let d = tempfile::tempdir().unwrap();
            fixtures::write(kind, d.path(), 5).unwrap();
            let load = |b: &Backend| {
                crate::policy::load_vla_model(d.path(), &Default::default(), b)
                    .unwrap_or_else(|e| panic!("{kind} on {}: {e}", b.name()))
            };
            let (tract, ours) = (
                load(&Backend::Tract),
                load(&Backend::Reference {
                    precision: Precision::F32,
                }),
            );
            assert_eq!(ours.engine, "reference");
            let cams = ours.spec.cameras.len();
            let frame = vec![0u8; ours.height * ours.width * 3];
            let mut hwc = vec![];
            for c in 0..cams {
                hwc.extend(
                    frame
                        .iter()
                        .enumerate()
                        .map(|(i, _)| ((i * 7 + c * 31) % 251) as u8),
                );
            }
            let present: Vec<bool> = (0..cams).map(|c| c < 2).collect();
            let state = ours.state_values(&[0.1, 0.2, 0.0, -1.8, 0.0, 2.0, 0.8, 0.04]);
            let obs = Observation {
                hwc: &hwc,
                present: &present,
                instruction: "pick up the red block",
                state: state.as_deref(),
            };
            let noise = crate::policy::gaussian_noise(3, ours.chunk * ours.action_width);
            let run = |m: &VlaModel| -> (Vec<Vec<f32>>, Vec<f32>) {
                let (p, actions) = model_act(m, &obs, &noise, state.as_deref());
                let Some(p) = p else {
                    return (vec![], actions);
                };
                if m.engine == "reference" {
                    // The programs' prefix stays with their executor (the device, for cuda);
                    // fed from the host instead, the expert gives the same bits.
                    assert!(matches!(p.tensors, PrefixTensors::Kept { .. }), "{kind}");
                    let host = on_host(m, &p);
                    let again = m.denoise(&host, &noise, state.as_deref()).unwrap();
                    assert_eq!(bits(&actions), bits(&again), "{kind}: kept vs host prefix");
                }
                (p.to_f32().unwrap(), actions)
            };
            let (their_prefix, theirs) = run(&tract);
            let (our_prefix, actions) = run(&ours);
            assert_eq!(our_prefix.len(), their_prefix.len(), "{kind}");
            for (i, (o, t)) in our_prefix.iter().zip(&their_prefix).enumerate() {
                agree(&format!("{kind} prefix tensor {i}"), o, t);
            }
            agree(&format!("{kind} actions"), &actions, &theirs);
            let (_, again) = run(&ours);
            assert_eq!(bits(&actions), bits(&again), "{kind}: repeats differ");
        }
    }

    /// `--precision f16|bf16`: every kind's programs at half precision (the reference executor
    /// rounds every half store as the device does) against tract in f32: cos ≥ 0.999 for the
    /// actions and each prefix tensor, repeats bit-identical, and not the f32 bits (the half
    /// path really ran).
    #[test]
    fn every_real_export_kind_in_half_precision_is_within_its_bound_of_f32() {
        for kind in Kind::ALL.into_iter().filter(|k| k.variant().is_some()) {
            let d = tempfile::tempdir().unwrap();
            fixtures::write(kind, d.path(), 5).unwrap();
            let load = |b: &Backend| {
                crate::policy::load_vla_model(d.path(), &Default::default(), b)
                    .unwrap_or_else(|e| panic!("{kind} on {}: {e}", b.name()))
            };
            let cams = load(&Backend::Tract).spec.cameras.len();
            let run = |m: &VlaModel| -> (Vec<Vec<f32>>, Vec<f32>) {
                let hwc: Vec<u8> = (0..m.height * m.width * 3 * cams)
                    .map(|i| ((i * 13) % 251) as u8)
                    .collect();
                let present = vec![true; cams];
                let state = m.state_values(&[0.3, -0.2, 0.0, -1.8, 0.5, 2.0, 0.8, 0.04]);
                let obs = Observation {
                    hwc: &hwc,
                    present: &present,
                    instruction: "stack the cups",
                    state: state.as_deref(),
                };
                let noise = crate::policy::gaussian_noise(9, m.chunk * m.action_width);
                let (p, a) = model_act(m, &obs, &noise, state.as_deref());
                (p.map_or(vec![], |p| p.to_f32().unwrap()), a)
            };
            let (f32_prefix, f32_actions) = run(&load(&Backend::Tract));
            let f32_ours = run(&load(&Backend::Reference {
                precision: Precision::F32,
            }))
            .1;
            for precision in [Precision::F16, Precision::BF16] {
                let m = load(&Backend::Reference { precision });
                let programs = m.programs();
                assert!(
                    programs.iter().all(|(_, p)| p.precision == precision),
                    "{kind}"
                );
                assert!(
                    programs.iter().map(|(_, p)| p.half_gemms).sum::<usize>() > 0,
                    "{kind} {precision}: no GEMM in half"
                );
                let (prefix, actions) = run(&m);
                let check = |what: String, ours: &[f32], theirs: &[f32]| {
                    let (cos, _) = crate::engine::cos_and_max_abs(ours, theirs);
                    assert!(cos >= 0.999, "{what}: cos {cos}");
                };
                check(
                    format!("{kind} {precision} actions"),
                    &actions,
                    &f32_actions,
                );
                for (i, (o, t)) in prefix.iter().zip(&f32_prefix).enumerate() {
                    check(format!("{kind} {precision} prefix tensor {i}"), o, t);
                }
                assert_ne!(
                    bits(&actions),
                    bits(&f32_ours),
                    "{kind} {precision}: f32 bits"
                );
                assert_eq!(
                    bits(&actions),
                    bits(&run(&m).1),
                    "{kind} {precision}: repeats"
                );
            }
        }
    }

    /// One Act at the model level: the prefix (none for a monolithic export) and the actions.
    fn model_act(
        m: &VlaModel,
        obs: &Observation<'_>,
        noise: &[f32],
        state: Option<&[f32]>,
    ) -> (Option<Prefix>, Vec<f32>) {
        if m.is_monolithic() {
            return (None, m.run_monolithic(obs, noise, state).unwrap());
        }
        let p = m.prefix(obs).unwrap();
        let a = m.denoise(&p, noise, state).unwrap();
        (Some(p), a)
    }

    /// A kept prefix's tensors brought to the host, as tract's prefix holds them.
    fn on_host(m: &VlaModel, p: &Prefix) -> Prefix {
        let PrefixTensors::Kept { kept, made } = &p.tensors else {
            panic!("not a kept prefix")
        };
        let mut tensors = vec![];
        for ((_, name), v) in m.handoff.iter().zip(kept.to_host().unwrap()) {
            let port = m.expert.input(name).unwrap();
            tensors.push(tvalue_of(v, port.dt, &port.shape).unwrap());
        }
        tensors.extend(made.iter().cloned());
        Prefix {
            tensors: PrefixTensors::Host(tensors),
            bytes: p.bytes,
        }
    }

    /// Rewrites `file` in `dir` so that graph input `input` is f16 (a Cast to f32 inside the
    /// graph) or graph output `output` is f16 (a Cast from f32): how a half-precision export
    /// presents its inputs and outputs.
    fn halve(dir: &Path, file: &str, inputs: &[&str], outputs: &[&str]) {
        use crate::onnx::builder::F32;
        use prost::Message;
        const F16: i32 = pb::tensor_proto::DataType::Float16 as i32;
        let path = dir.join(file);
        let mut m = pb::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
        let g = m.graph.as_mut().unwrap();
        let set_type = |vi: &mut pb::ValueInfoProto| {
            if let Some(pb::type_proto::Value::TensorType(t)) =
                vi.r#type.as_mut().and_then(|t| t.value.as_mut())
            {
                t.elem_type = F16;
            }
        };
        let cast = |from: &str, to: &str, dt: i32| pb::NodeProto {
            op_type: "Cast".into(),
            name: format!("halve:{to}"),
            input: vec![from.into()],
            output: vec![to.into()],
            attribute: vec![crate::onnx::builder::int("to", dt as i64)],
            ..Default::default()
        };
        for name in inputs {
            let inner = format!("{name}.f32");
            for n in g.node.iter_mut() {
                for i in n.input.iter_mut().filter(|i| i.as_str() == *name) {
                    *i = inner.clone();
                }
            }
            g.node.insert(0, cast(name, &inner, F32));
            set_type(g.input.iter_mut().find(|i| i.name == *name).unwrap());
        }
        for name in outputs {
            let inner = format!("{name}.f32");
            for n in g.node.iter_mut() {
                for o in n.output.iter_mut().filter(|o| o.as_str() == *name) {
                    *o = inner.clone();
                }
            }
            g.node.push(cast(&inner, name, F16));
            set_type(g.output.iter_mut().find(|o| o.name == *name).unwrap());
        }
        std::fs::write(&path, m.encode_to_vec()).unwrap();
    }

    #[test]
    fn f16_graph_inputs_and_outputs_are_fed_and_read_as_the_contract_says() {
        let d = tempfile::tempdir().unwrap();
        fixtures::write(Kind::Pi05PerStep, d.path(), 3).unwrap();
        let f32_policy = Policy::load(d.path(), &opts(0)).unwrap();
        let reference = f32_policy.act(&input(None, Some(4))).unwrap().actions;
        drop(f32_policy);
        // Images in, the prefix's KV out, the step's x_t in and velocity out: all f16.
        let cams: Vec<String> = pi05::CAMERAS.iter().map(|c| format!("img_{c}")).collect();
        let cams: Vec<&str> = cams.iter().map(String::as_str).collect();
        let kv = pi05::past_kv_names();
        let kv: Vec<&str> = kv.iter().map(String::as_str).collect();
        halve(d.path(), pi05::PREFIX_ONNX, &cams, &kv);
        halve(
            d.path(),
            pi05::EXPERT_ONNX,
            &[&["x_t"][..], &kv[..]].concat(),
            &["v_t"],
        );
        let model = VlaModel::load(
            d.path(),
            crate::seed::map(
                d.path(),
                &serde_json::from_slice(
                    &std::fs::read(d.path().join("reflex_config.json")).unwrap(),
                )
                .unwrap(),
                &Default::default(),
            )
            .unwrap()
            .spec,
        )
        .unwrap();
        assert_eq!(model.prefix.as_ref().unwrap().inputs[0].dt, DatumType::F16);
        assert_eq!(model.expert.outputs[0].dt, DatumType::F16);
        drop(model);
        let half = Policy::load(d.path(), &opts(0)).unwrap();
        let a = half.act(&input(None, Some(4))).unwrap().actions;
        let b = half.act(&input(None, Some(4))).unwrap().actions;
        assert_eq!(bits(&a), bits(&b), "f16 graphs are deterministic too");
        let (cos, max_abs) = crate::engine::cos_and_max_abs(&a, &reference);
        // f16 carries 11 significant bits: close to the f32 graphs, not equal.
        assert!(cos > 0.999 && max_abs < 0.05, "cos {cos} max_abs {max_abs}");
        assert_ne!(bits(&a), bits(&reference), "the f16 casts took effect");

        // onnxruntime takes and gives the same f16 tensors (`--engine ort`).
        let lib = crate::engine::onnxruntime::python_library()
            .expect("the onnxruntime wheel deploy/ci-setup.sh installs");
        let ort = Policy::load(
            d.path(),
            &PolicyOptions {
                engine: crate::EngineKind::Ort,
                ort_lib: Some(lib),
                ort_threads: 1,
                ..opts(0)
            },
        )
        .unwrap();
        let o = ort.act(&input(None, Some(4))).unwrap().actions;
        let (cos, max_abs) = crate::engine::cos_and_max_abs(&o, &a);
        assert!(
            cos > 0.99999 && max_abs < 1e-3,
            "ort vs tract on f16: cos {cos} max_abs {max_abs}"
        );
    }

    #[test]
    fn an_export_that_does_not_match_its_config_fails_naming_the_file_and_the_input() {
        let d = tempfile::tempdir().unwrap();
        fixtures::write(Kind::Pi05, d.path(), 0).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join("reflex_config.json")).unwrap())
                .unwrap();
        let spec = crate::seed::map(d.path(), &cfg, &Default::default())
            .unwrap()
            .spec;
        let load_err = |spec: ExportV2| match VlaModel::load(d.path(), spec) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        };

        let mut s = spec.clone();
        s.cameras[0].input = "img_front".into();
        let e = load_err(s);
        assert!(
            e.contains("vlm_prefix.onnx") && e.contains("\"img_front\"") && e.contains("img_base"),
            "{e}"
        );

        let mut s = spec.clone();
        s.cameras.pop();
        let e = load_err(s);
        assert!(
            e.contains("vlm_prefix.onnx")
                && e.contains("img_wrist_r")
                && e.contains("not named by the config"),
            "{e}"
        );

        let mut s = spec.clone();
        s.actions.dim = 33;
        assert!(load_err(s).contains("actions.dim 33 exceeds the graph's action width 32"));

        let mut s = spec.clone();
        s.graphs.expert = "nothing.onnx".into();
        assert!(load_err(s).contains("nothing.onnx"));

        // A tokenizer whose ids exceed the embedding the tokens index.
        let mut tok = assets::tokenizer_json();
        let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
        for i in 0..pi05::VOCAB {
            vocab.insert(format!("word{i}"), serde_json::json!(100 + i));
        }
        std::fs::write(d.path().join("big.json"), tok.to_string()).unwrap();
        let mut s = spec.clone();
        s.instruction.tokenizer = "big.json".into();
        let e = load_err(s);
        assert!(
            e.contains("big.json") && e.contains("exceeds the token embedding lang_tokens"),
            "{e}"
        );
    }

    #[test]
    fn tokens_follow_the_template_with_bos_and_right_padding() {
        let d = tempfile::tempdir().unwrap();
        fixtures::write(Kind::Pi05, d.path(), 0).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.path().join("reflex_config.json")).unwrap())
                .unwrap();
        let spec = crate::seed::map(d.path(), &cfg, &Default::default())
            .unwrap()
            .spec;
        let m = VlaModel::load(d.path(), spec).unwrap();
        let (ids, mask) = m.tokenize("pick up the red block").unwrap();
        // <bos> task : pick up the red block ; action :  — then <pad>.
        assert_eq!(&ids[..11], &[2, 4, 5, 8, 9, 10, 11, 14, 6, 7, 5]);
        assert!(ids[11..].iter().all(|&i| i == 0));
        assert_eq!(mask.iter().filter(|&&m| m).count(), 11);
        assert_eq!(ids.len(), pi05::TOKENS as usize);
        // Longer than the graph: truncated on the right, all real.
        let (ids, mask) = m.tokenize(&"red ".repeat(40)).unwrap();
        assert_eq!(ids.len(), 16);
        assert!(mask.iter().all(|&m| m));
    }

    #[test]
    fn quantile_and_mean_std_normalisation_round_trip() {
        let q = Norm::Quantile {
            q01: vec![-2.0],
            q99: vec![2.0],
        };
        assert_eq!(q.normalize(0, 2.0), 1.0);
        assert_eq!(q.normalize(0, -2.0), -1.0);
        assert_eq!(q.denormalize(0, 0.5), 1.0);
        let m = Norm::MeanStd {
            mean: vec![1.0],
            std: vec![2.0],
        };
        assert!((m.denormalize(0, m.normalize(0, 5.0)) - 5.0).abs() < 1e-5);
    }
}
