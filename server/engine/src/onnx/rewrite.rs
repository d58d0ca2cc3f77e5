//! Prepares an exported ONNX graph for tract: [`prepare`] rewrites, in the protobuf and
//! before tract parses it, the patterns torch.onnx emits that tract 0.23 cannot analyse or
//! run, into equivalent operators it runs. Every rewrite is exact and keyed on the pattern,
//! never on node names:
//!
//! - **SequenceAt of SplitToSequence** (torch's `unbind`, `split`, `chunk` taken apart
//!   item by item): tract has no sequence type. When the split sizes and the position are
//!   constants, the item is a `Slice` of the input along the axis (and a `Squeeze` of that
//!   axis for `keepdims = 0` without split); the SplitToSequence goes once nothing else reads
//!   it. A sequence read by anything else is an error naming the node.
//! - **CumSum over a bool mask cast to an integer** (`cumsum(pad_masks, 1)`: torch writes
//!   `Cast(bool → int64)` then `CumSum` with a rank-0 int64 axis): tract 0.23 types that
//!   cast as TDim (its symbolic-dimension integer) and its CumSum refuses TDim ("TDim is not
//!   a number"), at analysis or at the first run. The sum is taken in f64 instead
//!   (`Cast(bool → f64)`, `CumSum`, `Cast(→ int64)`): exact, as every partial sum of 0/1
//!   values is an integer no larger than the axis length, and f64 holds every integer
//!   below 2⁵³. A CumSum over anything else is left as it is.
//! - **Pow by a constant 2 or 3** (Gemma's RMSNorm `x.pow(2)`, GELU-tanh's `x³`): tract runs
//!   `powf` per element (11 % of a SmolVLA-sized Act in a profile); the node becomes
//!   `Mul(x, x)` or `Mul(Mul(x, x), x)` — what onnxruntime's Pow kernel computes for these
//!   exponents, so the rewrite brings us closer to it (`x·x` is the correctly rounded square;
//!   `powf` may differ by an ulp). Any other exponent is left as it is.
//!
//! The rewritten model computes the same tensors (bit for bit, but for Pow as said); `prepare` reports what it
//! changed so the caller can log it. Nodes it adds are named `{node}/reflex_{what}`.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb;

use super::builder::int;

const F64: i32 = pb::tensor_proto::DataType::Double as i32;
const I64: i32 = pb::tensor_proto::DataType::Int64 as i32;
const I32: i32 = pb::tensor_proto::DataType::Int32 as i32;
const BOOL: i32 = pb::tensor_proto::DataType::Bool as i32;

/// What [`prepare`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// SequenceAt nodes replaced by Slice (+ Squeeze).
    pub sequence_items: usize,
    /// SplitToSequence nodes removed.
    pub sequences: usize,
    /// CumSum nodes moved from an integer type to f64.
    pub cumsums: usize,
    /// Pow nodes by a constant 2 or 3 replaced by Mul.
    pub powers: usize,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        *self == Report::default()
    }
}

/// A pattern tract cannot run and [`prepare`] cannot rewrite exactly.
#[derive(Debug, thiserror::Error)]
#[error("node {node:?} ({op}): {reason}")]
pub struct RewriteError {
    pub node: String,
    pub op: String,
    pub reason: String,
}

fn node_name(n: &pb::NodeProto) -> String {
    if n.name.is_empty() {
        n.output.first().cloned().unwrap_or_default()
    } else {
        n.name.clone()
    }
}

fn refuse(n: &pb::NodeProto, reason: impl Into<String>) -> RewriteError {
    RewriteError {
        node: node_name(n),
        op: n.op_type.clone(),
        reason: reason.into(),
    }
}

/// Rewrites `model` in place (see the module doc) and says what changed.
pub fn prepare(model: &mut pb::ModelProto) -> Result<Report, RewriteError> {
    let Some(graph) = model.graph.as_mut() else {
        return Ok(Report::default());
    };
    let mut report = Report::default();
    let consts = Constants::of(graph);
    sequences(graph, &consts, &mut report)?;
    let consts = Constants::of(graph);
    cumsums(graph, &consts, &mut report)?;
    powers(graph, &consts, &mut report);
    Ok(report)
}

/// Integer constants the rewrites read: initializers and `Constant` nodes.
struct Constants {
    ints: HashMap<String, (Vec<i64>, Vec<i64>)>,
    /// Float constants with a single value (any rank), as f64.
    floats: HashMap<String, f64>,
    dtypes: HashMap<String, i32>,
}

impl Constants {
    fn of(graph: &pb::GraphProto) -> Constants {
        let mut c = Constants {
            ints: HashMap::new(),
            floats: HashMap::new(),
            dtypes: HashMap::new(),
        };
        for t in &graph.initializer {
            c.add(&t.name, t);
        }
        for n in &graph.node {
            if n.op_type == "Constant"
                && let (Some(out), Some(t)) = (
                    n.output.first(),
                    n.attribute
                        .iter()
                        .find(|a| a.name == "value")
                        .and_then(|a| a.t.as_ref()),
                )
            {
                c.add(out, t);
            }
        }
        c
    }

    fn add(&mut self, name: &str, t: &pb::TensorProto) {
        self.dtypes.insert(name.to_string(), t.data_type);
        let values = super::int_values(t);
        if let Some(v) = values {
            self.ints.insert(name.to_string(), (t.dims.clone(), v));
        }
        if let Some(v) = super::float_values(t).filter(|v| v.len() == 1) {
            self.floats.insert(name.to_string(), v[0]);
        }
    }

    /// (dims, values) of an integer constant.
    fn get(&self, name: &str) -> Option<&(Vec<i64>, Vec<i64>)> {
        self.ints.get(name)
    }
}

fn attr_i(n: &pb::NodeProto, name: &str, default: i64) -> i64 {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.i)
}

/// How a SplitToSequence cuts its input.
enum Split {
    /// No split input: items of one along the axis, the axis kept or not.
    Ones { keepdims: bool },
    /// A scalar split: items of this size (the last may be shorter).
    Every(i64),
    /// A 1-D split: these sizes.
    Sizes(Vec<i64>),
}

fn sequences(
    graph: &mut pb::GraphProto,
    consts: &Constants,
    report: &mut Report,
) -> Result<(), RewriteError> {
    // Each sequence value → (its input tensor, axis, how it is cut).
    let mut seqs: HashMap<String, (String, i64, Split)> = HashMap::new();
    for n in graph.node.iter().filter(|n| n.op_type == "SplitToSequence") {
        let (Some(input), Some(output)) = (n.input.first(), n.output.first()) else {
            return Err(refuse(n, "it has no input or no output"));
        };
        let axis = attr_i(n, "axis", 0);
        let split = match n.input.get(1).filter(|s| !s.is_empty()) {
            None => Split::Ones {
                keepdims: attr_i(n, "keepdims", 1) != 0,
            },
            Some(s) => match consts.get(s) {
                Some((dims, v)) if dims.is_empty() => Split::Every(v[0]),
                Some((dims, v)) if dims.len() == 1 => Split::Sizes(v.clone()),
                _ => {
                    return Err(refuse(
                        n,
                        format!("its split {s:?} is not a constant scalar or 1-D tensor"),
                    ));
                }
            },
        };
        seqs.insert(output.clone(), (input.clone(), axis, split));
    }
    if seqs.is_empty() {
        return Ok(());
    }
    if let Some(out) = graph.output.iter().find(|o| seqs.contains_key(&o.name)) {
        return Err(RewriteError {
            node: out.name.clone(),
            op: "SplitToSequence".into(),
            reason: "a sequence is a graph output; tract has no sequence type".into(),
        });
    }

    let mut new_inits: Vec<(String, Vec<i64>)> = vec![];
    let mut nodes = Vec::with_capacity(graph.node.len());
    for n in std::mem::take(&mut graph.node) {
        if n.op_type == "SplitToSequence" {
            // Dropped; every reader was checked or rewritten below.
            continue;
        }
        let reads_seq = n.input.iter().any(|i| seqs.contains_key(i));
        if !reads_seq {
            nodes.push(n);
            continue;
        }
        if n.op_type != "SequenceAt" || !seqs.contains_key(&n.input[0]) {
            return Err(refuse(
                &n,
                "reads a SplitToSequence output; only SequenceAt with a constant position is supported",
            ));
        }
        let (input, axis, split) = &seqs[&n.input[0]];
        let position = match n.input.get(1).and_then(|p| consts.get(p)) {
            Some((dims, v)) if dims.iter().product::<i64>() == 1 => v[0],
            _ => return Err(refuse(&n, "its position is not a constant scalar")),
        };
        let (start, end, squeeze) = match split {
            Split::Ones { keepdims } => {
                let end = if position == -1 {
                    i64::MAX
                } else {
                    position + 1
                };
                (position, end, !keepdims)
            }
            Split::Every(size) if *size > 0 && position >= 0 => {
                (position * size, (position + 1) * size, false)
            }
            Split::Every(_) => {
                return Err(refuse(
                    &n,
                    "a negative position or a non-positive scalar split needs the axis length",
                ));
            }
            Split::Sizes(sizes) => {
                let count = sizes.len() as i64;
                let p = if position < 0 {
                    position + count
                } else {
                    position
                };
                if !(0..count).contains(&p) {
                    return Err(refuse(
                        &n,
                        format!("position {position} is outside a sequence of {count} items"),
                    ));
                }
                let start: i64 = sizes[..p as usize].iter().sum();
                (start, start + sizes[p as usize], false)
            }
        };
        let base = format!("{}/reflex_slice", node_name(&n));
        let starts = format!("{base}.starts");
        let ends = format!("{base}.ends");
        let axes = format!("{base}.axes");
        new_inits.push((starts.clone(), vec![start]));
        new_inits.push((ends.clone(), vec![end]));
        new_inits.push((axes.clone(), vec![*axis]));
        let out = n.output[0].clone();
        let sliced = if squeeze {
            format!("{base}.out")
        } else {
            out.clone()
        };
        nodes.push(pb::NodeProto {
            op_type: "Slice".into(),
            name: base.clone(),
            input: vec![input.clone(), starts, ends, axes.clone()],
            output: vec![sliced.clone()],
            ..Default::default()
        });
        if squeeze {
            nodes.push(pb::NodeProto {
                op_type: "Squeeze".into(),
                name: format!("{}/reflex_squeeze", node_name(&n)),
                input: vec![sliced, axes],
                output: vec![out],
                ..Default::default()
            });
        }
        report.sequence_items += 1;
    }
    graph.node = nodes;
    for (name, values) in new_inits {
        graph
            .initializer
            .push(super::i64_tensor(&name, &[values.len() as i64], &values));
    }
    report.sequences += seqs.len();
    Ok(())
}

/// Value names produced by `Cast(bool → integer)`, with the Cast's bool input and type.
fn bool_casts(graph: &pb::GraphProto, bools: &HashSet<String>) -> HashMap<String, (String, i32)> {
    graph
        .node
        .iter()
        .filter(|n| {
            n.op_type == "Cast"
                && matches!(attr_i(n, "to", 0) as i32, I64 | I32)
                && n.input.first().is_some_and(|i| bools.contains(i))
        })
        .map(|n| {
            let to = attr_i(n, "to", 0) as i32;
            (n.output[0].clone(), (n.input[0].clone(), to))
        })
        .collect()
}

/// Names of bool values: bool graph inputs and initializers, Casts to bool, and the
/// outputs of the operators that always yield bool.
fn bool_values(graph: &pb::GraphProto, consts: &Constants) -> HashSet<String> {
    let declared = graph
        .input
        .iter()
        .chain(&graph.value_info)
        .filter(|v| {
            matches!(
                v.r#type.as_ref().and_then(|t| t.value.as_ref()),
                Some(pb::type_proto::Value::TensorType(t)) if t.elem_type == BOOL
            )
        })
        .map(|v| v.name.clone());
    let mut out: HashSet<String> = declared
        .chain(
            consts
                .dtypes
                .iter()
                .filter(|(_, d)| **d == BOOL)
                .map(|(n, _)| n.clone()),
        )
        .collect();
    const BOOL_OPS: [&str; 11] = [
        "And",
        "Or",
        "Xor",
        "Not",
        "Equal",
        "Less",
        "LessOrEqual",
        "Greater",
        "GreaterOrEqual",
        "IsNaN",
        "IsInf",
    ];
    // Graph order is topological, so one pass follows bool through Identity, Expand and the
    // shape-only ops, and through Concat/Where of bools.
    for n in &graph.node {
        let is_bool = match n.op_type.as_str() {
            op if BOOL_OPS.contains(&op) => true,
            "Cast" => attr_i(n, "to", 0) as i32 == BOOL,
            "Identity" | "Expand" | "Reshape" | "Unsqueeze" | "Squeeze" | "Slice" | "Transpose"
            | "Gather" | "Flatten" | "Pad" | "Tile" => {
                n.input.first().is_some_and(|i| out.contains(i))
            }
            "Concat" => n.input.iter().all(|i| out.contains(i)),
            "Where" => n.input.len() == 3 && out.contains(&n.input[1]) && out.contains(&n.input[2]),
            _ => false,
        };
        if is_bool {
            out.extend(n.output.iter().cloned());
        }
    }
    out
}

fn cumsums(
    graph: &mut pb::GraphProto,
    consts: &Constants,
    report: &mut Report,
) -> Result<(), RewriteError> {
    if !graph.node.iter().any(|n| n.op_type == "CumSum") {
        return Ok(());
    }
    let bools = bool_values(graph, consts);
    let casts = bool_casts(graph, &bools);
    let mut nodes = Vec::with_capacity(graph.node.len());
    for n in std::mem::take(&mut graph.node) {
        let Some((mask, int_type)) = (n.op_type == "CumSum")
            .then(|| n.input.first().and_then(|i| casts.get(i)))
            .flatten()
        else {
            nodes.push(n);
            continue;
        };
        let base = format!("{}/reflex_f64", node_name(&n));
        let as_f64 = format!("{base}.in");
        let summed = format!("{base}.sum");
        nodes.push(pb::NodeProto {
            op_type: "Cast".into(),
            name: format!("{base}.cast_in"),
            input: vec![mask.clone()],
            output: vec![as_f64.clone()],
            attribute: vec![int("to", F64 as i64)],
            ..Default::default()
        });
        let mut input = n.input.clone();
        input[0] = as_f64;
        nodes.push(pb::NodeProto {
            op_type: "CumSum".into(),
            name: format!("{base}.cumsum"),
            input,
            output: vec![summed.clone()],
            attribute: n.attribute.clone(),
            ..Default::default()
        });
        nodes.push(pb::NodeProto {
            op_type: "Cast".into(),
            name: format!("{base}.cast_out"),
            input: vec![summed],
            output: n.output.clone(),
            attribute: vec![int("to", *int_type as i64)],
            ..Default::default()
        });
        report.cumsums += 1;
    }
    graph.node = nodes;
    Ok(())
}

/// Pow(x, 2) → Mul(x, x); Pow(x, 3) → Mul(Mul(x, x), x); the exponent a one-value float
/// or integer constant. The output keeps its name, so nothing downstream changes.
fn powers(graph: &mut pb::GraphProto, consts: &Constants, report: &mut Report) {
    if !graph.node.iter().any(|n| n.op_type == "Pow") {
        return;
    }
    let exponent = |name: &str| {
        consts.floats.get(name).copied().or_else(|| {
            consts
                .get(name)
                .filter(|(_, v)| v.len() == 1)
                .map(|(_, v)| v[0] as f64)
        })
    };
    let mut nodes = Vec::with_capacity(graph.node.len());
    for n in std::mem::take(&mut graph.node) {
        let e = (n.op_type == "Pow" && n.input.len() == 2)
            .then(|| exponent(&n.input[1]))
            .flatten();
        let Some(e) = e else {
            nodes.push(n);
            continue;
        };
        // A Pow node has its base: only a node with two inputs got an exponent above (a
        // Constant node, with none, used to be indexed here and panicked).
        let (x, out) = (n.input[0].clone(), n.output.clone());
        let mul = |name: String, a: &str, b: &str, output: Vec<String>| pb::NodeProto {
            op_type: "Mul".into(),
            name,
            input: vec![a.to_string(), b.to_string()],
            output,
            ..Default::default()
        };
        match e {
            2.0 => nodes.push(mul(format!("{}/reflex_square", node_name(&n)), &x, &x, out)),
            3.0 => {
                let base = format!("{}/reflex_cube", node_name(&n));
                let square = format!("{base}.square");
                nodes.push(mul(format!("{base}.mul0"), &x, &x, vec![square.clone()]));
                nodes.push(mul(format!("{base}.mul1"), &square, &x, out));
            }
            _ => {
                nodes.push(n);
                continue;
            }
        }
        report.powers += 1;
    }
    graph.node = nodes;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{F32, GraphBuilder, int as attr_int};
    use tract_onnx::prelude::*;

    fn run(model: &pb::ModelProto, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        tract_onnx::onnx()
            .model_for_proto_model(model)?
            .into_optimized()?
            .into_runnable()?
            .run(inputs)
    }

    /// torch.onnx's `cumsum(mask, 1) - 1` on a bool [1,8] input.
    fn f32s(t: &TValue) -> Vec<f32> {
        t.try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    fn positions_graph() -> pb::ModelProto {
        let mut g = GraphBuilder::new("positions");
        let mask = g.input("mask", BOOL, &[1, 8]);
        let ints = g.cast(&mask, I64);
        let axis = g.int0(1);
        let c = g.node("CumSum", &[&ints, &axis], vec![]);
        let one = g.ints(&[1]);
        let p = g.binary("Sub", &c, &one);
        g.output(&p, "positions", I64, &[1, 8]);
        g.model(19)
    }

    #[test]
    fn cumsum_of_a_cast_bool_mask_runs_exactly_after_prepare() {
        let mask = [true, true, false, true, false, false, true, true];
        let input = || tvec![Tensor::from_shape(&[1, 8], &mask).unwrap().into_tvalue()];
        let mut model = positions_graph();
        // Why the rewrite exists: tract 0.23.9 types the cast as TDim and its CumSum refuses it
        // ("CumSum: TDim is not a number").
        let err = format!("{:#}", run(&model, input()).unwrap_err());
        assert!(err.contains("CumSum"), "{err}");
        let report = prepare(&mut model).unwrap();
        assert_eq!(report.cumsums, 1);
        let out = run(&model, input()).unwrap();
        // tract carries int64 positions as TDim; the values are what matter.
        let got = out[0].cast_to::<i64>().unwrap();
        let got = got.try_as_plain_ram().unwrap();
        let got = got.as_slice::<i64>().unwrap();
        assert_eq!(got, &[0, 1, 1, 2, 2, 2, 3, 4]);
        // A second pass finds nothing left to do.
        assert!(prepare(&mut model).unwrap().is_empty());
    }

    #[test]
    fn pow_by_two_and_three_becomes_mul_and_other_exponents_stay() {
        let mut g = GraphBuilder::new("powers");
        let x = g.input("x", F32, &[5]);
        let two = g.konst(&[], &[2.0]);
        let three = g.konst(&[1], &[3.0]);
        let half = g.konst(&[], &[0.5]);
        let a = g.binary("Pow", &x, &two);
        let b = g.binary("Pow", &x, &three);
        let c = g.binary("Pow", &x, &half);
        g.output(&a, "a", F32, &[5]);
        g.output(&b, "b", F32, &[5]);
        g.output(&c, "c", F32, &[5]);
        let mut model = g.model(19);
        let data = [-1.5f32, 0.3, 2.0, 7.25, 1e-3];
        let input = || tvec![Tensor::from_shape(&[5], &data).unwrap().into_tvalue()];
        let before = run(&model, input()).unwrap();
        let report = prepare(&mut model).unwrap();
        assert_eq!(report.powers, 2);
        let ops: Vec<_> = model
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .map(|n| n.op_type.as_str())
            .collect();
        assert_eq!(ops.iter().filter(|o| **o == "Pow").count(), 1, "{ops:?}");
        let after = run(&model, input()).unwrap();
        // What onnxruntime's Pow computes for these exponents, bit for bit.
        assert_eq!(
            f32s(&after[0]),
            data.iter().map(|v| v * v).collect::<Vec<_>>()
        );
        assert_eq!(
            f32s(&after[1]),
            data.iter().map(|v| v * v * v).collect::<Vec<_>>()
        );
        let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(f32s(&after[2])), bits(f32s(&before[2])));
        for (p, m) in f32s(&before[1]).iter().zip(f32s(&after[1])) {
            assert!((p - m).abs() <= 1e-5 * p.abs().max(1.0), "{p} vs {m}");
        }
        assert!(prepare(&mut model).unwrap().is_empty());
    }

    /// A node without inputs (a Constant) beside a Pow: every pass reads only the nodes it
    /// rewrites (the Pow pass used to index every node's first input and panicked).
    #[test]
    fn a_constant_node_beside_a_pow_is_passed_through() {
        let mut g = GraphBuilder::new("constant");
        let x = g.input("x", F32, &[2]);
        let value = pb::AttributeProto {
            name: "value".into(),
            r#type: pb::attribute_proto::AttributeType::Tensor as i32,
            t: Some(pb::TensorProto {
                dims: vec![],
                data_type: F32,
                float_data: vec![2.0],
                ..Default::default()
            }),
            ..Default::default()
        };
        let k = g.node("Constant", &[], vec![value]);
        let two = g.konst(&[], &[2.0]);
        let sq = g.binary("Pow", &x, &two);
        let y = g.binary("Add", &sq, &k);
        g.output(&y, "y", F32, &[2]);
        let mut model = g.model(17);
        let report = prepare(&mut model).unwrap();
        assert_eq!(report.powers, 1);
        let input = || {
            tvec![
                Tensor::from_shape(&[2], &[3.0f32, -0.5])
                    .unwrap()
                    .into_tvalue()
            ]
        };
        assert_eq!(f32s(&run(&model, input()).unwrap()[0]), vec![11.0, 2.25]);
    }

    #[test]
    fn cumsum_of_other_values_is_left_alone() {
        let mut g = GraphBuilder::new("plain");
        let x = g.input("x", F32, &[4]);
        let axis = g.int0(0);
        let c = g.node("CumSum", &[&x, &axis], vec![]);
        g.output(&c, "y", F32, &[4]);
        let mut model = g.model(19);
        let before = model.clone();
        assert!(prepare(&mut model).unwrap().is_empty());
        assert_eq!(model, before);
    }

    #[test]
    fn sequence_items_become_slices_for_every_split_form() {
        let mut g = GraphBuilder::new("sequences");
        let x = g.input("x", F32, &[2, 6, 3]);
        // 1-D split along axis 1: item 1 is x[:, 2:6].
        let sizes = g.ints(&[2, 4]);
        let seq = g.node("SplitToSequence", &[&x, &sizes], vec![attr_int("axis", 1)]);
        let at = g.int0(1);
        let a = g.node("SequenceAt", &[&seq, &at], vec![]);
        g.output(&a, "a", F32, &[2, 4, 3]);
        // No split, keepdims 0 (torch's unbind): item −1 is x[1].
        let seq = g.node(
            "SplitToSequence",
            &[&x],
            vec![attr_int("axis", 0), attr_int("keepdims", 0)],
        );
        let at = g.int0(-1);
        let b = g.node("SequenceAt", &[&seq, &at], vec![]);
        g.output(&b, "b", F32, &[6, 3]);
        // Scalar split 4 along axis 1: item 1 is the short tail x[:, 4:6].
        let every = g.int0(4);
        let seq = g.node("SplitToSequence", &[&x, &every], vec![attr_int("axis", 1)]);
        let at = g.int0(1);
        let c = g.node("SequenceAt", &[&seq, &at], vec![]);
        g.output(&c, "c", F32, &[2, 2, 3]);
        let mut model = g.model(19);

        let data: Vec<f32> = (0..36).map(|v| v as f32).collect();
        let input = || tvec![Tensor::from_shape(&[2, 6, 3], &data).unwrap().into_tvalue()];
        assert!(run(&model, input()).is_err(), "tract has no sequences");
        let report = prepare(&mut model).unwrap();
        assert_eq!((report.sequences, report.sequence_items), (3, 3));
        assert!(
            model
                .graph
                .as_ref()
                .unwrap()
                .node
                .iter()
                .all(|n| !n.op_type.contains("Sequence"))
        );
        let out = run(&model, input()).unwrap();
        let at = |i: usize, j: usize, k: usize| (i * 18 + j * 3 + k) as f32;
        let want_a: Vec<f32> = (0..2)
            .flat_map(|i| (2..6).flat_map(move |j| (0..3).map(move |k| at(i, j, k))))
            .collect();
        assert_eq!(out[0].shape(), &[2, 4, 3]);
        assert_eq!(f32s(&out[0]), want_a);
        assert_eq!(out[1].shape(), &[6, 3]);
        assert_eq!(
            f32s(&out[1]),
            (18..36).map(|v| v as f32).collect::<Vec<_>>()
        );
        let want_c: Vec<f32> = (0..2)
            .flat_map(|i| (4..6).flat_map(move |j| (0..3).map(move |k| at(i, j, k))))
            .collect();
        assert_eq!(out[2].shape(), &[2, 2, 3]);
        assert_eq!(f32s(&out[2]), want_c);
    }

    #[test]
    fn a_sequence_read_by_anything_but_a_constant_sequence_at_is_refused_by_name() {
        let mut g = GraphBuilder::new("concat");
        let x = g.input("x", F32, &[4, 3]);
        let seq = g.node("SplitToSequence", &[&x], vec![attr_int("axis", 0)]);
        let y = g.node("ConcatFromSequence", &[&seq], vec![attr_int("axis", 0)]);
        g.output(&y, "y", F32, &[4, 3]);
        let err = prepare(&mut g.model(19)).unwrap_err();
        assert_eq!(err.op, "ConcatFromSequence");
        assert!(
            err.to_string()
                .contains("ConcatFromSequence:concatfromsequence_"),
            "{err}"
        );

        let mut g = GraphBuilder::new("dynamic");
        let x = g.input("x", F32, &[4, 3]);
        let i = g.input("i", I64, &[]);
        let seq = g.node("SplitToSequence", &[&x], vec![attr_int("axis", 0)]);
        let y = g.node("SequenceAt", &[&seq, &i], vec![]);
        g.output(&y, "y", F32, &[1, 3]);
        let err = prepare(&mut g.model(19)).unwrap_err();
        assert!(err.reason.contains("not a constant"), "{err}");
    }
}
