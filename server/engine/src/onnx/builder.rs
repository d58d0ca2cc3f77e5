//! [`GraphBuilder`]: writes ONNX graphs node by node through `tract_onnx::pb`, the way our
//! exports (the reference model, the seed-layout fixtures) are made without torch.
//!
//! Value names are generated (`{op}_{n}`); weights are initializers whose bytes go in
//! `raw_data`, and [`write_model`] can move the large ones into one external data file
//! (`data_location = EXTERNAL`, `location`/`offset`/`length`), as `torch.onnx.export`
//! does for models over 2 GiB and the seed tool does for every export.

use std::collections::HashSet;
use std::path::Path;

use prost::Message;
use tract_onnx::pb;

pub const F32: i32 = pb::tensor_proto::DataType::Float as i32;
pub const F64: i32 = pb::tensor_proto::DataType::Double as i32;
pub const I64: i32 = pb::tensor_proto::DataType::Int64 as i32;
pub const BOOL: i32 = pb::tensor_proto::DataType::Bool as i32;

/// Builds one ONNX graph. Initializer names are unique: adding a parameter twice under one
/// name (a weight an unrolled loop uses every step) stores it once.
pub struct GraphBuilder {
    graph: pb::GraphProto,
    initializers: HashSet<String>,
    next: usize,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            graph: pb::GraphProto {
                name: name.into(),
                ..Default::default()
            },
            initializers: HashSet::new(),
            next: 0,
        }
    }

    pub fn value_info(name: &str, elem: i32, dims: &[i64]) -> pb::ValueInfoProto {
        use pb::tensor_shape_proto::{Dimension, dimension::Value};
        let shape = pb::TensorShapeProto {
            dim: dims
                .iter()
                .map(|d| Dimension {
                    value: Some(Value::DimValue(*d)),
                    ..Default::default()
                })
                .collect(),
        };
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: elem,
                    shape: Some(shape),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub fn input(&mut self, name: &str, elem: i32, dims: &[i64]) -> String {
        self.graph.input.push(Self::value_info(name, elem, dims));
        name.into()
    }

    /// Declares `value` as the graph output `name` (through an Identity, so any value,
    /// an input included, can be an output under any name).
    pub fn output(&mut self, value: &str, name: &str, elem: i32, dims: &[i64]) {
        self.node_named("Identity", &[value], vec![], name);
        self.graph.output.push(Self::value_info(name, elem, dims));
    }

    /// Marks dims of the graph input or output `name` symbolic (`dim_param`), as
    /// `torch.onnx.export(dynamic_axes=…)` writes them: `(axis, "batch")`, `(axis, "seq")`.
    pub fn symbolic(&mut self, name: &str, dims: &[(usize, &str)]) {
        use pb::tensor_shape_proto::dimension::Value;
        let g = &mut self.graph;
        for vi in g.input.iter_mut().chain(g.output.iter_mut()) {
            if vi.name != name {
                continue;
            }
            let Some(pb::type_proto::Value::TensorType(t)) =
                vi.r#type.as_mut().and_then(|t| t.value.as_mut())
            else {
                continue;
            };
            let shape = t.shape.as_mut().expect("value_info writes a shape");
            for (axis, param) in dims {
                shape.dim[*axis].value = Some(Value::DimParam((*param).into()));
            }
        }
    }

    /// A fresh number for generated names.
    pub fn fresh(&mut self) -> usize {
        self.next += 1;
        self.next
    }

    fn initializer(&mut self, name: &str, dims: &[i64], data_type: i32, raw: Vec<u8>) -> String {
        if self.initializers.insert(name.to_string()) {
            self.graph.initializer.push(pb::TensorProto {
                name: name.into(),
                dims: dims.to_vec(),
                data_type,
                raw_data: raw,
                ..Default::default()
            });
        }
        name.into()
    }

    /// An f32 initializer; `dims` empty for a scalar.
    pub fn f32s(&mut self, name: &str, dims: &[i64], data: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<i64>() as usize, data.len());
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, dims, F32, raw)
    }

    /// An f32 parameter made by `make` only the first time `name` is used.
    pub fn param(&mut self, name: &str, dims: &[i64], make: impl FnOnce() -> Vec<f32>) -> String {
        if self.initializers.contains(name) {
            return name.into();
        }
        self.f32s(name, dims, &make())
    }

    pub fn f64s(&mut self, name: &str, dims: &[i64], data: &[f64]) -> String {
        debug_assert_eq!(dims.iter().product::<i64>() as usize, data.len());
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, dims, F64, raw)
    }

    /// A 1-D int64 initializer (shapes, axes, starts and ends).
    pub fn i64s(&mut self, name: &str, data: &[i64]) -> String {
        self.i64_tensor(name, &[data.len() as i64], data)
    }

    pub fn i64_tensor(&mut self, name: &str, dims: &[i64], data: &[i64]) -> String {
        let t = super::i64_tensor(name, dims, data);
        self.initializer(name, dims, I64, t.raw_data)
    }

    pub fn bools(&mut self, name: &str, dims: &[i64], data: &[bool]) -> String {
        debug_assert_eq!(dims.iter().product::<i64>() as usize, data.len());
        let raw = data.iter().map(|b| *b as u8).collect();
        self.initializer(name, dims, BOOL, raw)
    }

    /// An anonymous constant: a generated name, rank 0 when `dims` is empty.
    pub fn konst(&mut self, dims: &[i64], data: &[f32]) -> String {
        let n = self.fresh();
        self.f32s(&format!("const_{n}"), dims, data)
    }

    /// An anonymous int64 constant, 1-D.
    pub fn ints(&mut self, data: &[i64]) -> String {
        let n = self.fresh();
        self.i64s(&format!("const_{n}"), data)
    }

    /// An anonymous rank-0 int64 constant (an axis, a position), as torch.onnx writes them.
    pub fn int0(&mut self, v: i64) -> String {
        let n = self.fresh();
        self.i64_tensor(&format!("const_{n}"), &[], &[v])
    }

    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<pb::AttributeProto>) -> String {
        let n = self.fresh();
        let out = format!("{}_{n}", op.to_lowercase());
        self.node_named(op, inputs, attrs, &out);
        out
    }

    pub fn node_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
        out: &str,
    ) {
        self.graph.node.push(pb::NodeProto {
            op_type: op.into(),
            name: format!("{op}:{out}"),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            attribute: attrs,
            ..Default::default()
        });
    }

    /// A node with `outputs` outputs (Split), named after the node.
    pub fn node_outputs(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
        outputs: usize,
    ) -> Vec<String> {
        let n = self.fresh();
        let names: Vec<String> = (0..outputs)
            .map(|k| format!("{}_{n}_{k}", op.to_lowercase()))
            .collect();
        self.graph.node.push(pb::NodeProto {
            op_type: op.into(),
            name: format!("{op}:{}_{n}", op.to_lowercase()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: names.clone(),
            attribute: attrs,
            ..Default::default()
        });
        names
    }

    pub fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let n = self.fresh();
        let s = self.i64s(&format!("shape_{n}"), shape);
        self.node("Reshape", &[x, &s], vec![])
    }

    pub fn transpose(&mut self, x: &str, perm: &[i64]) -> String {
        self.node("Transpose", &[x], vec![ints("perm", perm)])
    }

    pub fn unsqueeze(&mut self, x: &str, axes: &[i64]) -> String {
        let a = self.ints(axes);
        self.node("Unsqueeze", &[x, &a], vec![])
    }

    /// `x[start:end]` along `axis`.
    pub fn slice(&mut self, x: &str, axis: i64, start: i64, end: i64) -> String {
        let s = self.ints(&[start]);
        let e = self.ints(&[end]);
        let a = self.ints(&[axis]);
        self.node("Slice", &[x, &s, &e, &a], vec![])
    }

    pub fn cast(&mut self, x: &str, to: i32) -> String {
        self.node("Cast", &[x], vec![int("to", to as i64)])
    }

    pub fn concat(&mut self, xs: &[&str], axis: i64) -> String {
        self.node("Concat", xs, vec![int("axis", axis)])
    }

    pub fn expand(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.ints(shape);
        self.node("Expand", &[x, &s], vec![])
    }

    pub fn binary(&mut self, op: &str, a: &str, b: &str) -> String {
        self.node(op, &[a, b], vec![])
    }

    /// Patch embedding as ViTs export it: a Conv whose kernel and stride are the patch, the
    /// grid flattened into tokens. `x` [B,3,H,W] → [B, tokens, width], `[B, width, tokens]`
    /// given as `dims`.
    pub fn patch_embed(
        &mut self,
        x: &str,
        (kernel, bias): (&str, &str),
        patch: i64,
        [batch, width, tokens]: [i64; 3],
    ) -> String {
        let conv = self.node(
            "Conv",
            &[x, kernel, bias],
            vec![
                ints("kernel_shape", &[patch, patch]),
                ints("strides", &[patch, patch]),
            ],
        );
        let flat = self.reshape(&conv, &[batch, width, tokens]);
        self.transpose(&flat, &[0, 2, 1])
    }

    pub fn layer_norm(&mut self, x: &str, gamma: &str, beta: &str) -> String {
        self.node(
            "LayerNormalization",
            &[x, gamma, beta],
            vec![int("axis", -1), float("epsilon", 1e-5)],
        )
    }

    /// Exact GELU, x·½·(1 + erf(x/√2)), as exporters write it for opsets before 20.
    pub fn gelu(&mut self, x: &str) -> String {
        let n = self.fresh();
        let sqrt2 = self.f32s(&format!("gelu_{n}.sqrt2"), &[], &[std::f32::consts::SQRT_2]);
        let one = self.f32s(&format!("gelu_{n}.one"), &[], &[1.0]);
        let half = self.f32s(&format!("gelu_{n}.half"), &[], &[0.5]);
        let scaled = self.node("Div", &[x, &sqrt2], vec![]);
        let erf = self.node("Erf", &[&scaled], vec![]);
        let shifted = self.node("Add", &[&erf, &one], vec![]);
        let gated = self.node("Mul", &[x, &shifted], vec![]);
        self.node("Mul", &[&gated, &half], vec![])
    }

    /// GELU with the tanh approximation, written out as torch.onnx exports
    /// `gelu(approximate="tanh")` before opset 20: ½x(1 + tanh(√(2/π)(x + 0.044715x³))).
    pub fn gelu_tanh(&mut self, x: &str) -> String {
        let three = self.konst(&[], &[3.0]);
        let c = self.konst(&[], &[0.044715]);
        let k = self.konst(&[], &[(2.0f32 / std::f32::consts::PI).sqrt()]);
        let one = self.konst(&[], &[1.0]);
        let half = self.konst(&[], &[0.5]);
        let cube = self.node("Pow", &[x, &three], vec![]);
        let cube = self.binary("Mul", &cube, &c);
        let inner = self.binary("Add", x, &cube);
        let inner = self.binary("Mul", &inner, &k);
        let th = self.node("Tanh", &[&inner], vec![]);
        let th = self.binary("Add", &th, &one);
        let hx = self.binary("Mul", x, &half);
        self.binary("Mul", &hx, &th)
    }

    pub fn model(self, opset: i64) -> pb::ModelProto {
        pb::ModelProto {
            ir_version: 9,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            producer_name: "reflex".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(self.graph),
            ..Default::default()
        }
    }
}

fn attribute(
    name: &str,
    kind: pb::attribute_proto::AttributeType,
    set: impl FnOnce(&mut pb::AttributeProto),
) -> pb::AttributeProto {
    let mut a = pb::AttributeProto {
        name: name.into(),
        r#type: kind as i32,
        ..Default::default()
    };
    set(&mut a);
    a
}

pub fn int(name: &str, v: i64) -> pb::AttributeProto {
    attribute(name, pb::attribute_proto::AttributeType::Int, |a| a.i = v)
}

pub fn float(name: &str, v: f32) -> pb::AttributeProto {
    attribute(name, pb::attribute_proto::AttributeType::Float, |a| a.f = v)
}

pub fn ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    attribute(name, pb::attribute_proto::AttributeType::Ints, |a| {
        a.ints = v.to_vec()
    })
}

/// Initializers of at least this many bytes go to the external data file (torch.onnx's
/// `size_threshold` default); small constants stay inline, as in the seed's exports.
pub const EXTERNAL_THRESHOLD: usize = 1024;

/// Offsets in the data file are multiples of this, so a reader may map tensors aligned.
const EXTERNAL_ALIGN: usize = 64;

/// Writes `model` as `dir/name`. With `data_file` set, every initializer of at least
/// [`EXTERNAL_THRESHOLD`] bytes moves to `dir/data_file` and the graph keeps its
/// `location`/`offset`/`length`. Both files are written beside their final names and renamed,
/// the data first, so a reader never sees a graph whose data is not there yet.
pub fn write_model(
    dir: &Path,
    name: &str,
    mut model: pb::ModelProto,
    data_file: Option<&str>,
) -> std::io::Result<()> {
    if let (Some(data_file), Some(graph)) = (data_file, model.graph.as_mut()) {
        let mut blob: Vec<u8> = Vec::new();
        for t in &mut graph.initializer {
            if t.raw_data.len() < EXTERNAL_THRESHOLD {
                continue;
            }
            blob.resize(blob.len().next_multiple_of(EXTERNAL_ALIGN), 0);
            let offset = blob.len();
            let raw = std::mem::take(&mut t.raw_data);
            blob.extend_from_slice(&raw);
            let entry = |key: &str, value: String| pb::StringStringEntryProto {
                key: key.into(),
                value,
            };
            t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
            t.external_data = vec![
                entry("location", data_file.into()),
                entry("offset", offset.to_string()),
                entry("length", raw.len().to_string()),
            ];
        }
        write_atomic(&dir.join(data_file), &blob)?;
    }
    write_atomic(&dir.join(name), &model.encode_to_vec())
}

/// A reader never sees a half-written file: write beside it, then rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_initializers_move_to_the_data_file_small_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = GraphBuilder::new("t");
        let x = g.input("x", F32, &[1, 512]);
        let big = g.f32s("big", &[1, 512], &vec![0.5; 512]);
        let small = g.konst(&[], &[2.0]);
        let again = g.param("big", &[1, 512], || unreachable!("stored once"));
        assert_eq!(again, big);
        let y = g.binary("Mul", &x, &big);
        let y = g.binary("Mul", &y, &small);
        g.output(&y, "y", F32, &[1, 512]);
        write_model(dir.path(), "m.onnx", g.model(19), Some("m.onnx.data")).unwrap();

        let bytes = std::fs::read(dir.path().join("m.onnx")).unwrap();
        let m = pb::ModelProto::decode(bytes.as_slice()).unwrap();
        let graph = m.graph.unwrap();
        assert_eq!(graph.initializer.len(), 2);
        let big = graph.initializer.iter().find(|t| t.name == "big").unwrap();
        assert!(big.raw_data.is_empty());
        assert_eq!(
            big.data_location,
            Some(pb::tensor_proto::DataLocation::External as i32)
        );
        let kv: Vec<_> = big
            .external_data
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            kv,
            [
                ("location", "m.onnx.data"),
                ("offset", "0"),
                ("length", "2048")
            ]
        );
        let data = std::fs::read(dir.path().join("m.onnx.data")).unwrap();
        assert_eq!(data.len(), 2048);
        assert_eq!(&data[..4], &0.5f32.to_le_bytes());
        let small = graph.initializer.iter().find(|t| t.name != "big").unwrap();
        assert_eq!(small.raw_data, 2.0f32.to_le_bytes());
        assert!(small.external_data.is_empty());
    }
}
