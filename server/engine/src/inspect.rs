//! `reflex inspect EXPORT --engine cuda`: what the cuda engine makes of an export, learned
//! on any machine (no GPU, no CUDA library): every graph of the export is read as
//! [`crate::policy::Policy::load`] reads it, each node checked against the operators the
//! program compiler lowers ([`SUPPORTED_OPS`]), and a graph whose operators are all
//! covered is compiled ([`graph::compile`], external data read) into the plan the GPU
//! would run: kernels and launches, fusions, device memory for weights, activations and
//! one prefix-cache entry. Unsupported operators are listed with their nodes, all of them,
//! so a user learns before deploying whether an export runs on the GPU.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::engine::graph::{self, DType, Op, Program, SUPPORTED_OPS};
use crate::policy::{LoadError, export_graphs};
use crate::seed::SeedOptions;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub export: String,
    pub format: String,
    pub model_type: String,
    pub export_kind: String,
    pub engine: &'static str,
    /// Euler steps of one Act, and whether the server runs them (a per-step expert).
    pub steps: u32,
    pub per_step: bool,
    /// True when every graph compiled.
    pub compiles: bool,
    /// True when `reflex serve --engine cuda` loads this export: every graph compiles (a
    /// real export loaded as `serve` loads it). v1 runs on `CudaEngine` (the denoise loop
    /// one CUDA graph); v2 and the seed tool's layouts on `CudaProgram`, one graph run at a
    /// time with host copies between them.
    pub runs: bool,
    pub graphs: Vec<GraphReport>,
    /// Device bytes of one prefix-cache entry (the prefix graph's outputs); absent for a
    /// monolithic export or when the prefix graph did not compile.
    pub prefix_entry_bytes: Option<u64>,
    /// Weights of every compiled graph, in device bytes.
    pub weight_bytes: u64,
    /// Kernel launches of one Act when every graph compiled: the prefix (each camera through
    /// an image embedding graph) and the denoise loop (unrolled on the device for v1; a
    /// per-step expert of a real export runs once per step).
    pub launches_per_act: Option<usize>,
    /// Graph runs of one Act, each one CUDA graph replay with `--cuda-graphs` on.
    pub graph_runs_per_act: Option<usize>,
    /// Why the export does not load for the cuda engine although every graph's operators
    /// are covered (a contract check, a graph that does not compile).
    pub load_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GraphReport {
    /// "embed image", "embed text", "prefix", "expert" or "model" (monolithic).
    pub role: String,
    pub file: String,
    pub nodes: usize,
    /// Node count per ONNX operator.
    pub operators: BTreeMap<String, usize>,
    /// Every node whose operator the cuda engine does not lower.
    pub unsupported: Vec<Unsupported>,
    /// Why the graph did not compile although its operators are covered (an attribute, a
    /// data type, a symbolic dimension), or why it could not be read.
    pub error: Option<String>,
    pub plan: Option<Plan>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Unsupported {
    pub node: String,
    pub op: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Kernel launches of one run of the graph (a map or a reduction is one kernel, a
    /// product one cuBLAS call).
    pub launches: usize,
    pub maps: usize,
    pub gemms: usize,
    pub reductions: usize,
    /// ONNX nodes that got no launch of their own: fused into a map, read as a view, or
    /// computed at load.
    pub nodes_without_launch: usize,
    /// Exact-GELU five-node patterns fused into one function.
    pub fused_gelu: usize,
    /// RMSNorm statistics `mean(x·x)` read as one row reduction (the square not written).
    pub fused_square_means: usize,
    /// Attention and projection fusions ([`graph::Fusions`]).
    pub fusions: graph::Fusions,
    pub weight_bytes: u64,
    pub activation_bytes: u64,
    /// `f32`, `f16` or `bf16` (`--precision`), and in half: the GEMMs on half operands and
    /// the f32 → half copies made for operands that stay f32 elsewhere.
    pub precision: &'static str,
    pub half_gemms: usize,
    pub half_copies: usize,
    pub inputs: Vec<PortInfo>,
    pub outputs: Vec<PortInfo>,
    /// Float64 work on a run-time scalar done on the host each call (the per-step expert's
    /// time embedding, [`graph::host`]): its node count and the values it hands over.
    pub host: Option<HostPlan>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostPlan {
    pub nodes: usize,
    /// The scalar inputs it reads.
    pub reads: Vec<String>,
    /// The device inputs it fills.
    pub fills: Vec<PortInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PortInfo {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::I64 => "i64",
        DType::Bool => "bool",
    }
}

/// The plan of a compiled program.
pub fn plan(p: &Program) -> Plan {
    let (mut maps, mut gemms, mut reductions) = (0, 0, 0);
    for op in &p.ops {
        match op {
            Op::Map { .. } | Op::Fill { .. } | Op::Step { .. } => maps += 1,
            Op::Gemm(_) => gemms += 1,
            Op::LayerNorm { .. } | Op::Softmax { .. } | Op::SoftmaxOf { .. } | Op::Axis { .. } => {
                reductions += 1
            }
        }
    }
    let bytes = |b: &graph::Buffer| b.bytes(p.precision) as u64;
    let port = |q: &graph::Port| PortInfo {
        name: q.name.clone(),
        dtype: dtype_name(q.dtype),
        shape: q.shape.clone(),
        bytes: p.port_bytes(q) as u64,
    };
    Plan {
        launches: p.launches(),
        maps,
        gemms,
        reductions,
        nodes_without_launch: p.nodes.saturating_sub(p.launches()),
        fused_gelu: p.fused_gelu,
        fused_square_means: p.fused_square_means,
        fusions: p.fusions.clone(),
        weight_bytes: p
            .buffers
            .iter()
            .filter(|b| b.init.is_some())
            .map(bytes)
            .sum(),
        activation_bytes: p
            .buffers
            .iter()
            .filter(|b| b.init.is_none())
            .map(bytes)
            .sum(),
        precision: p.precision.name(),
        half_gemms: p.half_gemms,
        half_copies: p.half_copies,
        inputs: p.inputs.iter().map(port).collect(),
        outputs: p.outputs.iter().map(port).collect(),
        host: p.host.as_ref().map(|h| HostPlan {
            nodes: h.nodes,
            reads: h.inputs.iter().map(|i| i.name.clone()).collect(),
            fills: h
                .outputs
                .iter()
                .filter_map(|(name, _)| p.input(name).map(port))
                .collect(),
        }),
    }
}

/// Reads and checks one ONNX file and, with `compile` and every operator covered, compiles
/// it on its own (symbolic dimensions unpinned).
pub fn inspect_graph(
    role: &str,
    path: &Path,
    compile: bool,
    precision: graph::Precision,
) -> (GraphReport, Option<Program>) {
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut report = GraphReport {
        role: role.to_string(),
        file: file.clone(),
        nodes: 0,
        operators: BTreeMap::new(),
        unsupported: vec![],
        error: None,
        plan: None,
    };
    let model = match graph::read_model(path) {
        Ok(m) => m,
        Err(e) => {
            report.error = Some(e.to_string());
            return (report, None);
        }
    };
    let Some(g) = model.graph.as_ref() else {
        report.error = Some(format!("{}: the model has no graph", path.display()));
        return (report, None);
    };
    report.nodes = g.node.len();
    for n in &g.node {
        *report.operators.entry(n.op_type.clone()).or_default() += 1;
        if !SUPPORTED_OPS.contains(&n.op_type.as_str()) {
            report.unsupported.push(Unsupported {
                node: n.name.clone(),
                op: n.op_type.clone(),
            });
        }
    }
    if !report.unsupported.is_empty() || !compile {
        return (report, None);
    }
    // Every operator is covered: compile it for real (external data read from beside it).
    match graph::compile_model_at(model, path, precision) {
        Ok(p) => {
            report.plan = Some(plan(&p));
            (report, Some(p))
        }
        Err(e) => {
            report.error = Some(e.to_string());
            (report, None)
        }
    }
}

/// Inspects every graph of the export in `dir` for the cuda engine.
pub fn inspect_cuda(
    dir: &Path,
    seed: &SeedOptions,
    precision: graph::Precision,
) -> Result<Report, LoadError> {
    let eg = export_graphs(dir, seed)?;
    // Every graph's operators first; then, for a real export, the whole export loaded the
    // way `serve --engine cuda` loads it (the contract's checks, symbolic dimensions
    // pinned to the config's shapes, the host island cut out), on the CPU reference
    // executor instead of the GPU. Where that fails, each graph is compiled on its own so
    // the report names the one that does not compile.
    let mut graphs = vec![];
    let mut programs: BTreeMap<String, Program> = BTreeMap::new();
    for (role, path) in &eg.graphs {
        let (r, p) = inspect_graph(role, path, eg.v1, precision);
        if let Some(p) = p {
            programs.insert(role.clone(), p);
        }
        graphs.push(r);
    }
    let covered = graphs
        .iter()
        .all(|g| g.unsupported.is_empty() && g.error.is_none());
    let mut load_error = None;
    if covered && !eg.v1 {
        match crate::policy::load_vla_model(
            dir,
            seed,
            &crate::vla::Backend::Reference { precision },
        ) {
            Ok(m) => {
                for (file, p) in m.programs() {
                    let Some(((role, _), g)) = eg
                        .graphs
                        .iter()
                        .zip(graphs.iter_mut())
                        .find(|((_, path), _)| path.file_name().is_some_and(|f| f == file))
                    else {
                        continue;
                    };
                    g.plan = Some(plan(p));
                    programs.insert(role.clone(), p.clone());
                }
            }
            Err(e) => {
                load_error = Some(e.to_string());
                for ((role, path), g) in eg.graphs.iter().zip(graphs.iter_mut()) {
                    let (r, p) = inspect_graph(role, path, true, precision);
                    *g = r;
                    if let Some(p) = p {
                        programs.insert(role.clone(), p);
                    }
                }
            }
        }
    }
    let compiles = graphs.iter().all(|g| g.plan.is_some()) && load_error.is_none();
    // v1 on the reference executor path (`CudaEngine`), everything else on `CudaProgram`.
    let runs = compiles;
    let prefix_entry_bytes = graphs
        .iter()
        .find(|g| g.role == "prefix")
        .and_then(|g| g.plan.as_ref())
        .map(|p| p.outputs.iter().map(|o| o.bytes).sum());
    let weight_bytes = graphs
        .iter()
        .filter_map(|g| g.plan.as_ref())
        .map(|p| p.weight_bytes)
        .sum();
    let l = |role: &str| programs.get(role).map_or(0, Program::launches);
    let has = |role: &str| programs.contains_key(role) as usize;
    let (launches_per_act, graph_runs_per_act) = if !compiles {
        (None, None)
    } else if eg.v1 {
        let denoise = programs
            .get("expert")
            .and_then(|e| graph::denoise_ops(e, eg.steps).ok())
            .map_or(0, |ops| ops.len());
        (Some(l("prefix") + denoise), Some(2))
    } else {
        // A per-step expert runs as one device loop (`graph::DeviceLoop`): its launches
        // each step, then the Euler update; one graph run for the whole loop.
        let (expert_runs, updates) = if eg.per_step {
            (eg.steps as usize, eg.steps as usize)
        } else {
            (1, 0)
        };
        (
            Some(
                l("embed image") * eg.cameras
                    + l("embed text")
                    + l("prefix")
                    + l("expert") * expert_runs
                    + updates * has("expert")
                    + l("model"),
            ),
            Some(
                has("embed image") * eg.cameras
                    + has("embed text")
                    + has("prefix")
                    + has("expert")
                    + has("model"),
            ),
        )
    };
    Ok(Report {
        export: dir.display().to_string(),
        format: eg.format,
        model_type: eg.model_type,
        export_kind: eg.export_kind,
        engine: "cuda",
        steps: eg.steps,
        per_step: eg.per_step,
        compiles,
        runs,
        graphs,
        prefix_entry_bytes,
        weight_bytes,
        launches_per_act,
        graph_runs_per_act,
        load_error,
    })
}

/// Bytes for people: B, KiB, MiB, GiB with three significant digits.
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", units[u])
    } else if v >= 10.0 {
        format!("{v:.1} {}", units[u])
    } else {
        format!("{v:.2} {}", units[u])
    }
}

/// "1 node", "2 nodes", "3 launches".
fn plural(n: usize, one: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else if one.ends_with("ch") {
        format!("{n} {one}es")
    } else if let Some(stem) = one.strip_suffix('y') {
        format!("{n} {stem}ies")
    } else {
        format!("{n} {one}s")
    }
}

fn ports(ps: &[PortInfo]) -> String {
    ps.iter()
        .map(|p| {
            let dims: Vec<String> = p.shape.iter().map(usize::to_string).collect();
            format!("{} {}[{}]", p.name, p.dtype, dims.join(","))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The report as text: the verdict first, then each graph.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let loop_kind = if r.per_step {
        "per-step expert, the server runs the loop"
    } else {
        "the loop baked into the graph"
    };
    let _ = writeln!(
        s,
        "export {} ({}: {}, {}; {} denoise steps, {loop_kind})",
        r.export, r.format, r.model_type, r.export_kind, r.steps
    );
    let failing = r.graphs.iter().filter(|g| g.plan.is_none()).count();
    if r.runs {
        let _ = writeln!(
            s,
            "engine cuda: RUNS: every graph compiles to kernels ({})",
            plural(r.graphs.len(), "graph")
        );
    } else if let Some(e) = r.load_error.as_ref().filter(|_| failing == 0) {
        let _ = writeln!(
            s,
            "engine cuda: DOES NOT RUN: every graph compiles on its own, but the export does not load: {e}"
        );
    } else {
        let _ = writeln!(
            s,
            "engine cuda: DOES NOT RUN: {failing} of {} graphs cannot be compiled (below); serve this export with --engine cpu or ort",
            r.graphs.len()
        );
    }
    for g in &r.graphs {
        let _ = writeln!(s, "\n{} graph {} ({} nodes)", g.role, g.file, g.nodes);
        let ops: Vec<String> = g
            .operators
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if !ops.is_empty() {
            let _ = writeln!(s, "  operators: {}", ops.join(", "));
        }
        if !g.unsupported.is_empty() {
            let mut by_op: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for u in &g.unsupported {
                by_op.entry(&u.op).or_default().push(&u.node);
            }
            let _ = writeln!(
                s,
                "  unsupported by the cuda engine: {} of {}",
                plural(g.unsupported.len(), "node"),
                plural(by_op.len(), "operator")
            );
            for (op, nodes) in &by_op {
                let named: Vec<&str> = nodes
                    .iter()
                    .map(|n| if n.is_empty() { "(unnamed)" } else { n })
                    .collect();
                // The JSON report lists every node; the text names the first few.
                const SHOWN: usize = 6;
                let more = named.len().saturating_sub(SHOWN);
                let mut line = named[..named.len().min(SHOWN)].join(", ");
                if more > 0 {
                    let _ = write!(line, ", … and {more} more (--json lists all)");
                }
                let _ = writeln!(s, "    {op} ×{}: {line}", nodes.len());
            }
        }
        if let Some(e) = &g.error {
            let _ = writeln!(s, "  not compiled: {e}");
        }
        if let Some(p) = &g.plan {
            let _ = writeln!(
                s,
                "  plan: {} ({}, {}, {}); {} without a launch of their own (fused, views, load-time constants; {} fused, {} RMSNorm squares read in their mean)",
                plural(p.launches, "launch"),
                plural(p.maps, "map"),
                plural(p.gemms, "gemm"),
                plural(p.reductions, "row reduction"),
                plural(p.nodes_without_launch, "node"),
                plural(p.fused_gelu, "GELU pattern"),
                p.fused_square_means
            );
            let f = &p.fusions;
            let _ = writeln!(
                s,
                "  fused: {} merged into a sibling's GEMM (Q/K/V, gate/up), {} with its scale as alpha, {} computing scores + mask as they read them, {} writing a transposed layout, {} of a split concatenation read in place",
                plural(f.merged_gemms, "product"),
                plural(f.scaled_gemms, "product"),
                plural(f.fused_softmax_inputs, "softmax kernel"),
                plural(f.transposed_outputs, "GEMM"),
                plural(f.split_parts, "piece"),
            );
            let _ = writeln!(
                s,
                "  device memory: weights {}, activations {}",
                human_bytes(p.weight_bytes),
                human_bytes(p.activation_bytes)
            );
            if p.precision != "f32" {
                let _ = writeln!(
                    s,
                    "  precision {}: {} of {} on half operands (tensor cores, f32 accumulation), {} of an f32 operand to half",
                    p.precision,
                    p.half_gemms,
                    plural(p.gemms, "gemm"),
                    plural(p.half_copies, "copy"),
                );
            }
            let _ = writeln!(s, "  inputs: {}", ports(&p.inputs));
            let _ = writeln!(s, "  outputs: {}", ports(&p.outputs));
            if let Some(h) = &p.host {
                let _ = writeln!(
                    s,
                    "  on the host: {} of float64 work on {} (a time embedding), computed in double each call; it fills {}",
                    plural(h.nodes, "node"),
                    h.reads.join(", "),
                    ports(&h.fills)
                );
            }
        }
    }
    s.push('\n');
    if let Some(b) = r.prefix_entry_bytes {
        let _ = writeln!(
            s,
            "one prefix-cache entry on the device: {} (the prefix graph's outputs)",
            human_bytes(b)
        );
    }
    if r.compiles {
        let _ = writeln!(s, "weights on the device: {}", human_bytes(r.weight_bytes));
    }
    if let (Some(n), Some(g)) = (r.launches_per_act, r.graph_runs_per_act) {
        let _ = writeln!(
            s,
            "launches per Act: {n} in {} (one CUDA graph replay each)",
            plural(g, "graph run")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_export_runs_and_its_plan_adds_up() {
        let dir = tempfile::tempdir().unwrap();
        crate::export::write_reference_export(dir.path(), 3).unwrap();
        let r = inspect_cuda(dir.path(), &SeedOptions::default(), Default::default()).unwrap();
        assert!(r.runs, "{}", render(&r));
        assert_eq!(r.graphs.len(), 2);
        let prefix = graph::compile_file(&dir.path().join("prefix.onnx")).unwrap();
        let expert = graph::compile_file(&dir.path().join("expert.onnx")).unwrap();
        let p = r.graphs[0].plan.as_ref().unwrap();
        assert_eq!(p.launches, prefix.ops.len());
        assert_eq!(p.maps + p.gemms + p.reductions, p.launches);
        let weights: u64 = prefix
            .buffers
            .iter()
            .chain(&expert.buffers)
            .filter_map(|b| b.init.as_ref())
            .map(|v| 4 * v.len() as u64)
            .sum();
        assert_eq!(r.weight_bytes, weights);
        let out: usize = prefix
            .outputs
            .iter()
            .map(|o| o.shape.iter().product::<usize>())
            .sum();
        assert_eq!(r.prefix_entry_bytes, Some(4 * out as u64));
        let loop_ops = graph::denoise_ops(&expert, r.steps).unwrap().len();
        assert_eq!(r.launches_per_act, Some(prefix.ops.len() + loop_ops));
        assert!(r.graphs.iter().all(|g| g.unsupported.is_empty()));
        let text = render(&r);
        assert!(text.contains("engine cuda: RUNS"), "{text}");
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(5 << 30), "5.00 GiB");
        assert_eq!(human_bytes(300 << 20), "300 MiB");
    }
}
