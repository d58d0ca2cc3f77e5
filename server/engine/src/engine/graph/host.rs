//! The host's share of a program: float64 arithmetic on a run-time scalar.
//!
//! The seed tool's per-step expert embeds its time input as lerobot does: `Cast(t → f64)`,
//! a multiply by float64 frequencies, Sin/Cos, Concat, `Cast → f32`. The device program
//! has no float64 kernels. The graph says double, so the host computes it in double:
//! [`split`] cuts that island out of the graph. It takes the float64 nodes whose run-time
//! inputs are scalars, the nodes that feed them, and the Casts that bring them back to
//! float32. Its float32 results become inputs of the device program. [`HostIsland::eval`]
//! computes them for one value of the scalar.
//!
//! For the denoise loop the step times are known at load, so an executor can compute every
//! step's embedding once and keep the table on the device.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;

use super::{DType, Program, reference};

/// A run-time scalar graph input the island reads (the expert's `t`).
#[derive(Debug, Clone)]
pub struct HostInput {
    pub name: String,
    pub shape: Vec<usize>,
    /// The ONNX element type the graph declares (float32, float64, int64).
    pub elem: i32,
}

/// Nodes of a graph computed on the host, per call, in the graph's own precision.
#[derive(Debug, Clone)]
pub struct HostIsland {
    /// The island as a model of its own: its nodes in graph order, the initializers they
    /// read, [`HostIsland::inputs`] as graph inputs, and one output per handed-over value.
    model: pb::ModelProto,
    pub inputs: Vec<HostInput>,
    /// The device program's inputs the island fills, in order, with their shapes.
    pub outputs: Vec<(String, Vec<usize>)>,
    /// How many of the graph's nodes run here.
    pub nodes: usize,
}

impl HostIsland {
    /// The island's outputs (float32, as the device program takes them) for one value of
    /// each input, in [`HostIsland::inputs`] order.
    pub fn eval(&self, values: &[&[f64]]) -> Result<Vec<Vec<f32>>, String> {
        let (p, mem) = self.run(values)?;
        p.outputs
            .iter()
            .map(|o| match p.buffers[o.buf].dtype {
                DType::I64 => Err(format!("host value {} is int64", o.name)),
                _ => Ok(mem.f[o.buf].clone()),
            })
            .collect()
    }

    fn run(&self, values: &[&[f64]]) -> Result<(Program, reference::Memory), String> {
        if values.len() != self.inputs.len() {
            return Err(format!(
                "the host island takes {} inputs, got {}",
                self.inputs.len(),
                values.len()
            ));
        }
        let mut m = self.model.clone();
        let g = m.graph.as_mut().expect("built with a graph");
        g.input.clear();
        for (input, v) in self.inputs.iter().zip(values) {
            let n: usize = input.shape.iter().product();
            if v.len() != n {
                return Err(format!("{} takes {n} values, got {}", input.name, v.len()));
            }
            g.initializer.push(constant(input, v)?);
        }
        // Every value is known now: the compiler folds the float64 work in double and
        // leaves at most a few fills.
        let p = super::lower(&m, "host", super::DOT_MACS)?;
        let mut mem = reference::Memory::new(&p);
        reference::run_ops(&p.ops, &mut mem);
        Ok((p, mem))
    }
}

/// `v` as an initializer named after `input`, in its element type.
fn constant(input: &HostInput, v: &[f64]) -> Result<pb::TensorProto, String> {
    let mut t = pb::TensorProto {
        name: input.name.clone(),
        dims: input.shape.iter().map(|&d| d as i64).collect(),
        data_type: input.elem,
        ..Default::default()
    };
    match input.elem {
        1 => t.float_data = v.iter().map(|&x| x as f32).collect(),
        11 => t.double_data = v.to_vec(),
        7 => t.int64_data = v.iter().map(|&x| x as i64).collect(),
        other => {
            return Err(format!(
                "{} has ONNX data type {other}; a host input is float32, float64 or int64",
                input.name
            ));
        }
    }
    Ok(t)
}

#[derive(Clone, Copy, Default)]
struct Fact {
    /// The value is float64.
    f64: bool,
    /// Known on the host before the program runs: initializers, constants, scalar inputs,
    /// and what only they feed.
    host: bool,
    /// Depends on a graph input (else it is folded at load anyway).
    run: bool,
}

fn elem_of(v: &pb::ValueInfoProto) -> Option<(i32, Option<Vec<usize>>)> {
    let t = crate::onnx::tensor_type(v)?;
    let dims = t.shape.as_ref().and_then(|s| {
        s.dim
            .iter()
            .map(|d| match d.value {
                Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if n >= 0 => {
                    Some(n as usize)
                }
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
    });
    Some((t.elem_type, dims))
}

/// Operators whose output is never float64 whatever their inputs.
const NOT_FLOAT: &[&str] = &[
    "Shape",
    "Size",
    "Equal",
    "Less",
    "LessOrEqual",
    "Greater",
    "GreaterOrEqual",
    "And",
    "Or",
    "Not",
    "ArgMax",
    "ArgMin",
];

/// Cuts the host island out of `model`: the device program's graph (the island's results
/// its inputs, dead nodes dropped) and the island. `None` when the graph computes no
/// float64 value from a run-time scalar, or when float64 would cross to the device (the
/// compiler then names the node).
pub(super) fn split(
    model: &pb::ModelProto,
) -> Result<Option<(pb::ModelProto, HostIsland)>, String> {
    let Some(g) = model.graph.as_ref() else {
        return Ok(None);
    };
    let mut facts: HashMap<&str, Fact> = HashMap::new();
    for t in &g.initializer {
        facts.insert(
            &t.name,
            Fact {
                f64: t.data_type == 11,
                host: true,
                run: false,
            },
        );
    }
    let mut graph_inputs: HashMap<&str, (i32, Vec<usize>)> = HashMap::new();
    let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    for v in g.input.iter().filter(|v| !inits.contains(v.name.as_str())) {
        let (elem, dims) = elem_of(v).unwrap_or((0, None));
        let scalar = dims
            .as_ref()
            .is_some_and(|d| d.iter().product::<usize>() <= 1);
        if let Some(d) = dims.filter(|_| scalar) {
            graph_inputs.insert(&v.name, (elem, d));
        }
        facts.insert(
            &v.name,
            Fact {
                f64: elem == 11,
                host: scalar,
                run: true,
            },
        );
    }
    let mut producer: HashMap<&str, usize> = HashMap::new();
    let mut seeds = vec![];
    for (ix, n) in g.node.iter().enumerate() {
        let ins: Vec<Fact> = n
            .input
            .iter()
            .filter(|i| !i.is_empty())
            .map(|i| facts.get(i.as_str()).copied().unwrap_or_default())
            .collect();
        let first = ins.first().copied().unwrap_or_default();
        let host = ins.iter().all(|f| f.host);
        let run = ins.iter().any(|f| f.run);
        let to = n
            .attribute
            .iter()
            .find(|a| a.name == "to")
            .map(|a| a.i)
            .unwrap_or(0);
        let f64 = match n.op_type.as_str() {
            "Cast" => to == 11,
            "Constant" => n
                .attribute
                .iter()
                .any(|a| a.name == "value" && a.t.as_ref().is_some_and(|t| t.data_type == 11)),
            "Where" => ins.get(1).is_some_and(|f| f.f64),
            op if NOT_FLOAT.contains(&op) => false,
            _ => first.f64,
        };
        let brings_back = n.op_type == "Cast" && to != 11 && first.f64;
        if host && run && (f64 || brings_back) {
            seeds.push(ix);
        }
        for o in &n.output {
            facts.insert(o, Fact { f64, host, run });
            producer.insert(o, ix);
        }
    }
    if seeds.is_empty() {
        return Ok(None);
    }
    // The seeds and every node feeding them (host values all, by construction).
    let mut island: HashSet<usize> = HashSet::new();
    let mut stack = seeds;
    while let Some(ix) = stack.pop() {
        if island.insert(ix) {
            stack.extend(
                g.node[ix]
                    .input
                    .iter()
                    .filter_map(|i| producer.get(i.as_str()).copied()),
            );
        }
    }
    // Island values the rest of the graph reads: handed over. Constant-only island nodes
    // stay in the graph as well when it reads them (they fold at load there too).
    let moved = |ix: usize| island.contains(&ix) && facts[g.node[ix].output[0].as_str()].run;
    let mut read: HashSet<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    for (ix, n) in g.node.iter().enumerate() {
        if !moved(ix) {
            read.extend(n.input.iter().map(String::as_str));
        }
    }
    let mut cuts: Vec<&str> = vec![];
    for (_, n) in g.node.iter().enumerate().filter(|(ix, _)| moved(*ix)) {
        for o in n.output.iter().filter(|o| read.contains(o.as_str())) {
            if facts[o.as_str()].f64 {
                return Ok(None);
            }
            cuts.push(o);
        }
    }

    // The island as a model.
    let mut order: Vec<usize> = island.iter().copied().collect();
    order.sort_unstable();
    let nodes: Vec<pb::NodeProto> = order.iter().map(|&ix| g.node[ix].clone()).collect();
    let names: HashSet<&str> = order
        .iter()
        .flat_map(|&ix| g.node[ix].input.iter().map(String::as_str))
        .collect();
    let inputs: Vec<HostInput> = g
        .input
        .iter()
        .filter(|v| names.contains(v.name.as_str()))
        .filter_map(|v| {
            graph_inputs
                .get(v.name.as_str())
                .map(|(elem, shape)| HostInput {
                    name: v.name.clone(),
                    shape: shape.clone(),
                    elem: *elem,
                })
        })
        .collect();
    let host_graph = pb::GraphProto {
        name: format!("{}.host", g.name),
        node: nodes,
        initializer: g
            .initializer
            .iter()
            .filter(|t| names.contains(t.name.as_str()))
            .cloned()
            .collect(),
        input: g
            .input
            .iter()
            .filter(|v| inputs.iter().any(|i| i.name == v.name))
            .cloned()
            .collect(),
        output: cuts
            .iter()
            .map(|c| pb::ValueInfoProto {
                name: c.to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut island_model = model.clone();
    island_model.graph = Some(host_graph);
    let mut host = HostIsland {
        model: island_model,
        inputs,
        outputs: vec![],
        nodes: order.iter().filter(|&&ix| moved(ix)).count(),
    };
    // One evaluation at zero gives the handed-over shapes (and checks the island lowers).
    let zeros: Vec<Vec<f64>> = host
        .inputs
        .iter()
        .map(|i| vec![0.0; i.shape.iter().product()])
        .collect();
    let refs: Vec<&[f64]> = zeros.iter().map(Vec::as_slice).collect();
    let (p, _) = host.run(&refs)?;
    for o in &p.outputs {
        if p.buffers[o.buf].dtype == DType::I64 {
            return Ok(None);
        }
        host.outputs.push((o.name.clone(), o.shape.clone()));
    }

    // The device's graph: the island's results are inputs; what only fed the island goes.
    let mut main = g.clone();
    main.node = g
        .node
        .iter()
        .enumerate()
        .filter(|(ix, _)| !moved(*ix))
        .map(|(_, n)| n.clone())
        .collect();
    let mut needed: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    let mut kept = vec![];
    for n in main.node.iter().rev() {
        if n.output.iter().any(|o| needed.contains(o)) {
            needed.extend(n.input.iter().cloned());
            kept.push(n.clone());
        }
    }
    kept.reverse();
    main.node = kept;
    main.input.retain(|v| needed.contains(&v.name));
    main.initializer.retain(|t| needed.contains(&t.name));
    for (name, shape) in &host.outputs {
        main.input
            .push(crate::onnx::builder::GraphBuilder::value_info(
                name,
                1,
                &shape.iter().map(|&d| d as i64).collect::<Vec<_>>(),
            ));
    }
    let mut main_model = model.clone();
    main_model.graph = Some(main);
    Ok(Some((main_model, host)))
}
