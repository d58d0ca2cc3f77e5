use super::reference::{Memory, run_ops};
use super::*;
use crate::engine::cpu::CpuEngine;
use crate::engine::{Engine, Shapes};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

struct Fixture {
    _dir: tempfile::TempDir,
    prefix: Program,
    expert: Program,
    cpu: CpuEngine,
    shapes: Shapes,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::export::write_reference_export(dir.path(), 0).unwrap();
    let (pp, ep) = (
        dir.path().join(&cfg.graphs.prefix),
        dir.path().join(&cfg.graphs.expert),
    );
    let shapes = Shapes::of(&cfg);
    Fixture {
        prefix: compile_file(&pp).unwrap(),
        expert: compile_file(&ep).unwrap(),
        cpu: CpuEngine::load(&pp, &ep, shapes.clone()).unwrap(),
        shapes,
        _dir: dir,
    }
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.next_u32() >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0) * scale)
        .collect()
}

fn set_input(p: &Program, m: &mut Memory, name: &str, data: &[f32]) {
    let port = p.input(name).unwrap();
    m.f[port.buf][..data.len()].copy_from_slice(data);
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn the_prefix_program_agrees_with_tract() {
    let f = fixture();
    let s = &f.shapes;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let pixels = uniform(&mut rng, s.cameras * 3 * s.height * s.width, 2.0);
    let tokens: Vec<i64> = (0..s.tokens).map(|i| (i as i64 * 37 + 5) % 1024).collect();
    let want = f.cpu.prefix(&pixels, &tokens).unwrap();

    let mut m = Memory::new(&f.prefix);
    set_input(&f.prefix, &mut m, "pixels", &pixels);
    let tok = f.prefix.input("tokens").unwrap();
    assert_eq!(tok.dtype, DType::I64);
    m.i[tok.buf].copy_from_slice(&tokens);
    run_ops(&f.prefix.ops, &mut m);
    let got = &m.f[f.prefix.outputs[0].buf];
    let d = max_abs(got, &want);
    assert!(d < 1e-4, "prefix differs from tract by {d}");
    assert!(
        want.iter().any(|v| v.abs() > 0.1),
        "a degenerate prefix proves nothing"
    );
}

#[test]
fn the_expert_program_and_its_denoise_loop_agree_with_tract() {
    let f = fixture();
    let s = &f.shapes;
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let x = uniform(&mut rng, s.chunk * s.action_dim, 1.0);
    let prefix = uniform(&mut rng, s.prefix_dim, 1.0);
    let state = uniform(&mut rng, s.state_dim, 1.0);

    // One step at t = 0.3.
    let want = f.cpu.expert_step(&x, 0.3, &prefix, &state).unwrap();
    let mut m = Memory::new(&f.expert);
    set_input(&f.expert, &mut m, "x_t", &x);
    set_input(&f.expert, &mut m, "t", &[0.3]);
    set_input(&f.expert, &mut m, "prefix", &prefix);
    set_input(&f.expert, &mut m, "state", &state);
    run_ops(&f.expert.ops, &mut m);
    let d = max_abs(&m.f[f.expert.outputs[0].buf], &want);
    assert!(d < 1e-4, "velocity differs from tract by {d}");

    // The unrolled loop against the host-stepped one.
    let want = f.cpu.denoise(x.clone(), &prefix, &state, 10).unwrap();
    let mut m = Memory::new(&f.expert);
    set_input(&f.expert, &mut m, "x_t", &x);
    set_input(&f.expert, &mut m, "prefix", &prefix);
    set_input(&f.expert, &mut m, "state", &state);
    run_ops(&denoise_ops(&f.expert, 10).unwrap(), &mut m);
    let got = &m.f[f.expert.input("x_t").unwrap().buf];
    let d = max_abs(got, &want);
    assert!(d < 1e-3, "denoised chunk differs from tract by {d}");
    assert!(max_abs(got, &x) > 0.1, "the loop must move the chunk");
}

#[test]
fn elementwise_chains_and_small_products_are_fused() {
    let f = fixture();
    let gemms = |p: &Program| p.ops.iter().filter(|o| matches!(o, Op::Gemm(_))).count();
    let kinds = |p: &Program| {
        p.ops
            .iter()
            .map(|o| match o {
                Op::Map { shape, .. } => format!("map{shape:?}"),
                Op::Gemm(g) => format!("gemm {}x{}x{}x{}", g.batch, g.m, g.n, g.k),
                other => format!("{other:?}").chars().take(12).collect(),
            })
            .collect::<Vec<_>>()
    };
    eprintln!("expert: {:?}", kinds(&f.expert));
    eprintln!("prefix: {:?}", kinds(&f.prefix));
    // Expert per step: analysis product, features (time embedding + concat), three
    // layers (product + bias + GELU each), synthesis product + velocity. Unfused it
    // was 5 gemms + ~25 maps.
    assert_eq!(
        gemms(&f.expert),
        0,
        "the expert's products are small: fused"
    );
    assert!(
        f.expert.launches() <= 6,
        "expert has {} launches",
        f.expert.launches()
    );
    // The patch-embedding convolution is large: it stays a cuBLAS gemm.
    assert_eq!(gemms(&f.prefix), 1);
    assert!(
        f.prefix.launches() <= 22,
        "prefix has {} launches",
        f.prefix.launches()
    );
    // No map merely applies a unary op to another map's output (that is what fusion removes).
    for p in [&f.prefix, &f.expert] {
        let produced_by_map: Vec<usize> = p
            .ops
            .iter()
            .filter_map(|o| match o {
                Op::Map { out, .. } => Some(*out),
                _ => None,
            })
            .collect();
        for o in &p.ops {
            if let Op::Map {
                expr: Expr::Unary(_, x),
                ..
            } = o
                && let Expr::Load { src, .. } = x.as_ref()
            {
                assert!(
                    !produced_by_map.contains(src),
                    "unfused unary in {}",
                    p.name
                );
            }
        }
    }
}

/// Every transpose combination and batch stride, through the column-major
/// arguments, against a plain row-major product.
#[test]
fn cublas_arguments_compute_the_row_major_product() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (batch, m, n, k) = (3, 4, 5, 6);
    for (a_trans, b_trans, a_batched, b_batched) in [
        (false, false, true, true),
        (true, false, true, false),
        (false, true, false, true),
        (true, true, true, true),
    ] {
        let a = uniform(&mut rng, batch * m * k, 1.0);
        let b = uniform(&mut rng, batch * k * n, 1.0);
        let g = Gemm {
            batch,
            m,
            n,
            k,
            a: 0,
            a_trans,
            a_stride: if a_batched { m * k } else { 0 },
            b: 1,
            b_trans,
            b_stride: if b_batched { k * n } else { 0 },
            c: 2,
            alpha: 0.5,
            c_ld: n,
            c_stride: m * n,
        };
        let mut mem = Memory {
            f: vec![a.clone(), b.clone(), vec![0.0; batch * m * n]],
            i: vec![vec![]; 3],
            half: vec![None; 3],
        };
        run_ops(&[Op::Gemm(g.clone())], &mut mem);
        for bi in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let mut want = 0.0f32;
                    for p in 0..k {
                        let ab = bi * g.a_stride;
                        let bb = bi * g.b_stride;
                        let x = if a_trans {
                            a[ab + p * m + i]
                        } else {
                            a[ab + i * k + p]
                        };
                        let y = if b_trans {
                            b[bb + j * k + p]
                        } else {
                            b[bb + p * n + j]
                        };
                        want += x * y;
                    }
                    let got = mem.f[2][bi * m * n + i * n + j];
                    assert!(
                        (got - 0.5 * want).abs() < 1e-5,
                        "{a_trans} {b_trans}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn an_unsupported_operator_is_named() {
    let mut model = tract_onnx::pb::ModelProto::default();
    let graph = tract_onnx::pb::GraphProto {
        node: vec![tract_onnx::pb::NodeProto {
            op_type: "NonMaxSuppression".into(),
            name: "nms".into(),
            input: vec!["x".into()],
            output: vec!["y".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    model.graph = Some(graph);
    let err = compile(&model, "m.onnx").unwrap_err();
    assert!(
        err.contains("NonMaxSuppression") && err.contains("nms"),
        "{err}"
    );
}

#[test]
fn kernels_are_printed_for_every_map() {
    let f = fixture();
    for (p, tag) in [(&f.prefix, "p"), (&f.expert, "e")] {
        let (kernels, src) = cuda_src::program_source(p, tag);
        for (op, k) in p.ops.iter().zip(&kernels) {
            assert_eq!(matches!(op, Op::Map { .. }), k.is_some());
            if let Some(k) = k {
                assert!(src.contains(&format!("void {}(", k.name)));
            }
        }
        // Constants are spelled as exact bits.
        assert!(!src.contains("inf") || src.contains("__int_as_float"));
    }
}

/// SUPPORTED_OPS, which `reflex inspect` checks exports against, is what `node` lowers:
/// every listed operator gets past the dispatch (it fails later, on its missing inputs),
/// and an operator outside it is refused as unsupported.
#[test]
fn the_supported_operator_list_is_what_the_lowering_accepts() {
    let lowering = || Lowering {
        buffers: vec![],
        ops: vec![],
        values: HashMap::new(),
        uses: HashMap::new(),
        seqs: HashMap::new(),
        dot_macs: DOT_MACS,
        fused_square_means: 0,
        fusions: Fusions::default(),
        siblings: HashMap::new(),
        groups: vec![],
        merged_weights: HashMap::new(),
    };
    let node = |op: &str| pb::NodeProto {
        op_type: op.into(),
        name: format!("n_{op}"),
        output: vec!["y".into()],
        ..Default::default()
    };
    for op in SUPPORTED_OPS {
        let err = lowering().node(&node(op)).unwrap_err();
        assert!(!err.contains("not supported"), "{op}: {err}");
    }
    for op in ["NonMaxSuppression", "Loop", "If", "Einsum"] {
        assert!(!SUPPORTED_OPS.contains(&op));
        let err = lowering().node(&node(op)).unwrap_err();
        assert!(
            err.contains("not supported by the cuda engine"),
            "{op}: {err}"
        );
    }
}

/// Weights in an external data file (torch.onnx's layout, and the pi0.5 fixtures') compile
/// to the same program as inline ones; a location out of the folder or a range past the
/// file's end is refused with the initializer named.
#[test]
fn external_data_compiles_like_inline_weights() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::export::write_reference_export(dir.path(), 5).unwrap();
    let inline = compile_file(&dir.path().join(&cfg.graphs.prefix)).unwrap();
    let bytes = std::fs::read(dir.path().join(&cfg.graphs.prefix)).unwrap();
    let mut model = pb::ModelProto::decode(bytes.as_slice()).unwrap();
    for t in &mut model.graph.as_mut().unwrap().initializer {
        if t.data_type == 1 && t.raw_data.is_empty() {
            t.raw_data = t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect();
            t.float_data.clear();
        }
    }
    let ext = tempfile::tempdir().unwrap();
    crate::onnx::builder::write_model(ext.path(), "prefix.onnx", model, Some("prefix.onnx.data"))
        .unwrap();
    let written = std::fs::read(ext.path().join("prefix.onnx")).unwrap();
    let written = pb::ModelProto::decode(written.as_slice()).unwrap();
    let moved: Vec<&pb::TensorProto> = written
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .filter(|t| !t.external_data.is_empty())
        .collect();
    assert!(!moved.is_empty(), "the fixture must have external data");
    let external = compile_file(&ext.path().join("prefix.onnx")).unwrap();
    assert_eq!(external.ops, inline.ops);
    let inits = |p: &Program| -> Vec<Option<Vec<f32>>> {
        p.buffers.iter().map(|b| b.init.clone()).collect()
    };
    assert_eq!(inits(&external), inits(&inline));

    // A location that leaves the folder, and a range past the end of the file.
    let name = moved[0].name.clone();
    for (key, value, says) in [
        ("location", "../prefix.onnx.data", "not a plain file name"),
        ("length", "999999999", "outside"),
    ] {
        let mut bad = written.clone();
        let t = bad
            .graph
            .as_mut()
            .unwrap()
            .initializer
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap();
        t.external_data
            .iter_mut()
            .find(|e| e.key == key)
            .unwrap()
            .value = value.into();
        std::fs::write(ext.path().join("bad.onnx"), bad.encode_to_vec()).unwrap();
        let err = compile_file(&ext.path().join("bad.onnx"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(says) && err.contains(&name), "{err}");
    }
}

/// A graph of the shape and view operators transformer exports are full of (x f32
/// [2,3,4], y f32 [4] → out f32 [2,2,4]); also compiled by NVRTC in the cuda tests.
pub(crate) fn views_model() -> pb::ModelProto {
    use crate::onnx::builder::{F32, GraphBuilder, int};
    let mut g = GraphBuilder::new("views");
    let x = g.input("x", F32, &[2, 3, 4]);
    let y = g.input("y", F32, &[4]);
    // Shape arithmetic: Shape → Slice → Cast to float, a [2]-vector (3, 4) at load.
    let shp = g.node("Shape", &[&x], vec![]);
    let dims = g.slice(&shp, 0, 1, 3);
    let dims = g.cast(&dims, F32);
    // x[:, 0:3:2, ::-1] through one Slice with negative start/end and steps.
    let (st, en, ax, sp) = (
        g.ints(&[-1, 0]),
        g.ints(&[-5, 3]),
        g.ints(&[2, 1]),
        g.ints(&[-1, 2]),
    );
    let xs = g.node("Slice", &[&x, &st, &en, &ax, &sp], vec![]);
    let two = g.konst(&[], &[2.0]);
    let sq = g.binary("Pow", &xs, &two);
    let one = g.konst(&[], &[1.0]);
    let sq1 = g.binary("Add", &sq, &one);
    let r = g.node("Reciprocal", &[&sq1], vec![]);
    let half = g.konst(&[], &[0.5]);
    let root = g.binary("Pow", &sq1, &half);
    let yu = g.unsqueeze(&y, &[0, 1]);
    let ye = g.expand(&yu, &[2, 2, 4]);
    let m = g.binary("Mul", &r, &ye);
    let z = g.binary("Add", &m, &root);
    let z = g.unsqueeze(&z, &[0]);
    let zero = g.ints(&[0]);
    let z = g.node("Squeeze", &[&z, &zero], vec![]);
    let z = g.cast(&z, F32);
    let dcol = g.unsqueeze(&dims, &[1, 2]);
    let z = g.binary("Add", &z, &dcol);
    let k = pb::AttributeProto {
        name: "value".into(),
        r#type: pb::attribute_proto::AttributeType::Tensor as i32,
        t: Some(pb::TensorProto {
            dims: vec![4],
            data_type: F32,
            float_data: vec![1.5, -2.0, 0.25, 3.0],
            ..Default::default()
        }),
        ..Default::default()
    };
    let k = g.node("Constant", &[], vec![k]);
    let z = g.binary("Mul", &z, &k);
    // Clip with constant bounds, Max/Min of two tensors.
    let (lo, hi) = (g.konst(&[], &[-1.5]), g.konst(&[], &[2.5]));
    let z = g.node("Clip", &[&z, &lo, &hi], vec![]);
    let z = g.binary("Max", &z, &ye);
    // Range at load (0, 1, 2, 3) added along the last axis.
    let (r0, r1, r2) = (g.int0(0), g.int0(4), g.int0(1));
    let ramp = g.node("Range", &[&r0, &r1, &r2], vec![]);
    let ramp = g.cast(&ramp, F32);
    let z = g.binary("Add", &z, &ramp);
    // Split into two outputs along axis 1 of x, and torch's unbind (SplitToSequence
    // without split, keepdims 0) then SequenceAt with a negative position.
    let sizes = g.ints(&[1, 2]);
    let parts = g.node_outputs("Split", &[&x, &sizes], vec![int("axis", 1)], 2);
    let pmin = g.binary("Min", &parts[1], &xs);
    let z = g.binary("Sub", &z, &pmin);
    let seq = g.node(
        "SplitToSequence",
        &[&x],
        vec![int("axis", 1), int("keepdims", 0)],
    );
    let last = g.int0(-1);
    let row = g.node("SequenceAt", &[&seq, &last], vec![]);
    let row = g.unsqueeze(&row, &[1]);
    let z = g.binary("Add", &z, &row);
    let chunks = g.int0(1);
    let seq2 = g.node(
        "SplitToSequence",
        &[&parts[0], &chunks],
        vec![int("axis", 2)],
    );
    let third = g.int0(2);
    let col = g.node("SequenceAt", &[&seq2, &third], vec![]);
    let out = g.binary("Mul", &z, &col);
    g.output(&out, "out", F32, &[2, 2, 4]);
    g.model(17)
}

/// A fixture graph with its external weights inlined (as tract reads it).
fn inlined_model(dir: &Path, file: &str) -> pb::ModelProto {
    let mut model = read_model(&dir.join(file)).unwrap();
    crate::onnx::inline_external(&mut model, dir).unwrap();
    model
}

/// Random feeds for `p`'s callers' inputs, in order, each both as the reference executor's
/// host value and as tract's tensor: f32 uniform in ±1 from `seed`, token ids cycling below
/// 53, masks with the last two positions off, float64 times counting up from 0.3.
fn random_feeds(
    p: &Program,
    seed: u64,
) -> (
    Vec<(String, super::reference::HostValue)>,
    tract_onnx::prelude::TVec<tract_onnx::prelude::TValue>,
) {
    use super::reference::HostValue;
    use tract_onnx::prelude::*;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut feeds = vec![];
    let mut inputs: TVec<TValue> = tvec![];
    for feed in p.feeds() {
        let n: usize = feed.shape.iter().product();
        let (t, v) = match feed.elem {
            7 => {
                let v: Vec<i64> = (0..n as i64).map(|k| 3 + (k * 7) % 50).collect();
                (Tensor::from_shape(&feed.shape, &v), HostValue::I64(v))
            }
            9 => {
                let last = *feed.shape.last().unwrap_or(&1);
                let v: Vec<bool> = (0..n).map(|k| k % last + 2 < last.max(3)).collect();
                (Tensor::from_shape(&feed.shape, &v), HostValue::Bool(v))
            }
            11 => {
                let v: Vec<f64> = (0..n).map(|k| 0.3 + k as f64 * 0.1).collect();
                (Tensor::from_shape(&feed.shape, &v), HostValue::F64(v))
            }
            _ => {
                let v = uniform(&mut rng, n, 1.0);
                (Tensor::from_shape(&feed.shape, &v), HostValue::F32(v))
            }
        };
        inputs.push(t.unwrap().into_tvalue());
        feeds.push((feed.name.clone(), v));
    }
    (feeds, inputs)
}

/// `model` run by tract as the cpu engine runs it (`prepare` first: tract takes the
/// sequence operators and the CumSum of a cast mask only rewritten; the cuda compiler takes
/// the graph as exported), every output as f32.
fn tract_outputs(
    model: &pb::ModelProto,
    inputs: tract_onnx::prelude::TVec<tract_onnx::prelude::TValue>,
) -> Vec<Vec<f32>> {
    use tract_onnx::prelude::*;
    let mut model = model.clone();
    crate::onnx::rewrite::prepare(&mut model).unwrap();
    let plan = tract_onnx::onnx()
        .model_for_proto_model(&model)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    plan.run(inputs)
        .unwrap()
        .iter()
        .map(|t| {
            t.cast_to::<f32>()
                .unwrap()
                .try_as_plain_ram()
                .unwrap()
                .as_slice::<f32>()
                .unwrap()
                .to_vec()
        })
        .collect()
}

/// The shape and view operators — Constant, Shape, Cast, Range, Unsqueeze/Squeeze,
/// Expand, Slice (negative indices and steps, several axes), Split, SplitToSequence and
/// SequenceAt, Pow, Reciprocal, Clip, Max/Min — lowered to loads at affine offsets and fused maps, agreeing with tract on
/// the same graph; the integer shape arithmetic is done at load (no launch for it).
#[test]
fn view_and_shape_operators_agree_with_tract() {
    use tract_onnx::prelude::*;

    let model = views_model();

    let p = compile(&model, "views.onnx").unwrap();
    assert_eq!(p.outputs[0].shape, vec![2, 2, 4]);
    assert!(p.launches() <= 2, "views fuse into the map: {:?}", p.ops);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let xv = uniform(&mut rng, 24, 2.0);
    let yv = uniform(&mut rng, 4, 1.0);
    let mut mem = Memory::new(&p);
    set_input(&p, &mut mem, "x", &xv);
    set_input(&p, &mut mem, "y", &yv);
    run_ops(&p.ops, &mut mem);
    let ours = mem.f[p.outputs[0].buf].clone();
    let xt = tract_ndarray::Array3::from_shape_vec((2, 3, 4), xv).unwrap();
    let yt = tract_ndarray::Array1::from_vec(yv);
    let got = tract_outputs(
        &model,
        tvec!(Tensor::from(xt).into(), Tensor::from(yt).into()),
    );
    let theirs = &got[0];
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(theirs.iter()) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{ours:?}\n{theirs:?}"
        );
    }
}

/// ONNX Slice's index rules: negative indices from the end, clamping, negative steps.
#[test]
fn slice_ranges_follow_the_onnx_rules() {
    assert_eq!(slice_range(0, 3, 1, 5).unwrap(), (0, 3, 1));
    assert_eq!(slice_range(-2, i64::MAX, 1, 5).unwrap(), (3, 2, 1));
    assert_eq!(slice_range(0, 5, 2, 5).unwrap(), (0, 3, 2));
    assert_eq!(slice_range(-1, i64::MIN, -1, 5).unwrap(), (4, 5, -1));
    assert_eq!(slice_range(4, 0, -2, 5).unwrap(), (4, 2, -2));
    assert_eq!(slice_range(3, 1, 1, 5).unwrap(), (3, 0, 1));
    assert!(slice_range(0, 1, 0, 5).is_err());
}

/// The run-time masks of a pi0.5 prefix as torch.onnx writes them: a bool pad mask input,
/// Cast to int64, CumSum (axis a rank-0 int64 initializer) for the positions, the 2-D
/// attention rule (LessOrEqual, And), Where to an additive mask, plus Not/Or/Equal and a
/// ReduceSum of the valid tokens (x f32 [1,8,8], mask bool [1,8]).
pub(crate) fn masks_model() -> pb::ModelProto {
    use crate::onnx::builder::{BOOL, F32, GraphBuilder, I64, int};
    let mut g = GraphBuilder::new("masks");
    let x = g.input("x", F32, &[1, 8, 8]);
    let mask = g.input("mask", BOOL, &[1, 8]);
    let ints = g.cast(&mask, I64);
    let axis = g.int0(1);
    let cum = g.node("CumSum", &[&ints, &axis], vec![]);
    let one = g.ints(&[1]);
    let pos = g.binary("Sub", &cum, &one);
    let keys = g.unsqueeze(&pos, &[1]);
    let queries = g.unsqueeze(&pos, &[2]);
    let causal = g.binary("LessOrEqual", &keys, &queries);
    let pad = g.unsqueeze(&mask, &[1]);
    let allowed = g.binary("And", &causal, &pad);
    let eq = g.binary("Equal", &keys, &queries);
    let not_pad = g.node("Not", &[&pad], vec![]);
    let diag = g.binary("And", &eq, &not_pad);
    let allowed = g.binary("Or", &allowed, &diag);
    let zero = g.konst(&[], &[0.0]);
    let fill = g.konst(&[], &[-1e9]);
    let bias = g.node("Where", &[&allowed, &zero, &fill], vec![]);
    let scores = g.binary("Add", &x, &bias);
    let probs = g.node("Softmax", &[&scores], vec![int("axis", -1)]);
    g.output(&probs, "probs", F32, &[1, 8, 8]);
    let valid = g.cast(&mask, F32);
    let axes = g.ints(&[1]);
    let count = g.node("ReduceSum", &[&valid, &axes], vec![int("keepdims", 1)]);
    g.output(&count, "count", F32, &[1, 1]);
    let posf = g.cast(&pos, F32);
    g.output(&posf, "positions", F32, &[1, 8]);
    g.output(&allowed, "allowed", BOOL, &[1, 8, 8]);
    g.model(17)
}

#[test]
fn run_time_masks_agree_with_tract() {
    use tract_onnx::prelude::*;

    let model = masks_model();
    let p = compile(&model, "masks.onnx").unwrap();
    assert_eq!(p.input("mask").unwrap().dtype, DType::Bool);
    assert!(p.ops.iter().any(|o| matches!(
        o,
        super::Op::Axis {
            kind: AxisKind::CumSum,
            ..
        }
    )));
    assert!(p.ops.iter().any(|o| matches!(
        o,
        super::Op::Axis {
            kind: AxisKind::Sum,
            ..
        }
    )));
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for bits in [
        [true; 8],
        [true, true, false, true, false, false, true, true],
        [false; 8],
    ] {
        let xv = uniform(&mut rng, 64, 3.0);
        let mut mem = Memory::new(&p);
        set_input(&p, &mut mem, "x", &xv);
        // The host stages a bool input as 0/1 floats.
        let as_f: Vec<f32> = bits.iter().map(|&b| b as u8 as f32).collect();
        set_input(&p, &mut mem, "mask", &as_f);
        run_ops(&p.ops, &mut mem);
        let xt = tract_ndarray::Array3::from_shape_vec((1, 8, 8), xv).unwrap();
        let mt = tract_ndarray::Array2::from_shape_vec((1, 8), bits.to_vec()).unwrap();
        let got = tract_outputs(
            &model,
            tvec!(Tensor::from(xt).into(), Tensor::from(mt).into()),
        );
        for (port, theirs) in p.outputs.iter().zip(&got) {
            let ours = &mem.f[port.buf];
            assert_eq!(ours.len(), theirs.len(), "{}", port.name);
            for (a, b) in ours.iter().zip(theirs.iter()) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{} with mask {bits:?}:\n{ours:?}\n{theirs:?}",
                    port.name
                );
            }
        }
    }
}

/// A fixture graph (`reflex export-demo --kind …`: SigLIP-style patches, a Gemma-style
/// decoder with RMSNorm, rotary positions from the pad mask's CumSum, the 2-D attention
/// masks, external weights) compiled by the cuda compiler and run by the CPU reference
/// executor agrees with tract running the same graph (after `prepare`, as the cpu engine
/// runs it), output by output, for two pad masks.
fn fixture_program_agrees_with_tract(kind: crate::fixtures::Kind, file: &str) {
    use tract_onnx::prelude::*;

    let dir = tempfile::tempdir().unwrap();
    crate::fixtures::write(kind, dir.path(), 4).unwrap();
    let path = dir.path().join(file);
    let mut model = read_model(&path).unwrap();
    let p = compile_model(model.clone(), &path).unwrap();
    // tract reads the same weights, inlined.
    crate::onnx::inline_external(&mut model, dir.path()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for valid in [usize::MAX, 5] {
        let mut mem = Memory::new(&p);
        let mut inputs: TVec<TValue> = tvec![];
        for port in &p.inputs {
            let n: usize = port.shape.iter().product();
            let shape = port.shape.clone();
            let t = match port.dtype {
                DType::F32 => {
                    let v = uniform(&mut rng, n, 1.0);
                    set_input(&p, &mut mem, &port.name, &v);
                    Tensor::from_shape(&shape, &v).unwrap()
                }
                DType::I64 => {
                    let v: Vec<i64> = (0..n as i64).map(|k| 3 + (k * 7) % 50).collect();
                    mem.i[port.buf].copy_from_slice(&v);
                    Tensor::from_shape(&shape, &v).unwrap()
                }
                DType::Bool => {
                    let last = *shape.last().unwrap();
                    let v: Vec<bool> = (0..n).map(|k| k % last < valid).collect();
                    let f: Vec<f32> = v.iter().map(|&b| b as u8 as f32).collect();
                    set_input(&p, &mut mem, &port.name, &f);
                    Tensor::from_shape(&shape, &v).unwrap()
                }
            };
            inputs.push(t.into_tvalue());
        }
        run_ops(&p.ops, &mut mem);
        let got = tract_outputs(&model, inputs);
        assert_eq!(got.len(), p.outputs.len());
        for (port, theirs) in p.outputs.iter().zip(&got) {
            let ours: Vec<f32> = if p.buffers[port.buf].dtype == DType::I64 {
                mem.i[port.buf].iter().map(|&x| x as f32).collect()
            } else {
                mem.f[port.buf].clone()
            };
            assert_eq!(ours.len(), theirs.len(), "{}", port.name);
            let (cos, max_abs) = crate::engine::cos_and_max_abs(&ours, theirs);
            let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
            assert!(
                cos >= 0.99999 && max_abs <= 1e-4 * scale as f64,
                "{kind:?} {file} {} (valid {valid}): cos {cos}, max_abs {max_abs}",
                port.name
            );
        }
    }
}

#[test]
fn the_pi05_prefix_fixture_program_agrees_with_tract() {
    fixture_program_agrees_with_tract(crate::fixtures::Kind::Pi05, "vlm_prefix.onnx");
}

/// The baked expert (10 Euler steps, the float64 time embedding folded at load from the
/// loop's constant times, adaRMS split with SplitToSequence, attention over the prefix KV).
#[test]
fn the_pi05_baked_expert_fixture_program_agrees_with_tract() {
    fixture_program_agrees_with_tract(crate::fixtures::Kind::Pi05, "expert_denoise.onnx");
}

/// The seed tool's monolithic layouts: prefix and baked loop in one graph.
#[test]
fn the_monolithic_fixture_programs_agree_with_tract() {
    use crate::fixtures::Kind;
    for kind in [Kind::Pi05Monolithic, Kind::Pi0, Kind::Smolvla] {
        fixture_program_agrees_with_tract(kind, "model.onnx");
    }
}

/// Split and SplitToSequence of a shape vector (int64 known at load) pick their pieces at
/// load: `Reshape(x, Concat(Split(Shape(x), [1, 2])[1], SequenceAt(SplitToSequence(Shape(x)), 0)))`
/// is x [2,3,4] read as [3,4,2], with no launch.
#[test]
fn shape_vectors_are_split_at_load() {
    use crate::onnx::builder::{F32, GraphBuilder, int};
    let mut g = GraphBuilder::new("shape_split");
    let x = g.input("x", F32, &[2, 3, 4]);
    let shp = g.node("Shape", &[&x], vec![]);
    let sizes = g.ints(&[1, 2]);
    let parts = g.node_outputs("Split", &[&shp, &sizes], vec![int("axis", 0)], 2);
    let seq = g.node("SplitToSequence", &[&shp], vec![]);
    let zero = g.int0(0);
    let first = g.node("SequenceAt", &[&seq, &zero], vec![]);
    let spec = g.concat(&[&parts[1], &first], 0);
    let y = g.node("Reshape", &[&x, &spec], vec![]);
    g.output(&y, "y", F32, &[3, 4, 2]);
    let p = compile(&g.model(17), "shape_split.onnx").unwrap();
    assert_eq!(p.outputs[0].shape, vec![3, 4, 2]);
    assert_eq!(p.launches(), 0, "{:?}", p.ops);
    assert_eq!(p.outputs[0].buf, p.inputs[0].buf);
}

/// The per-step pi0.5 expert's whole loop as the device runs it ([`DeviceLoop`]: the host
/// island's float64 time embedding tabled for every step at load, each step's row copied in,
/// the Euler update on the device) gives the same bits as stepping the program from the host
/// (the island evaluated per call, x updated on the host) — and another schedule of times
/// gives other actions.
#[test]
fn the_device_loop_of_a_per_step_expert_is_the_host_loop_bit_for_bit() {
    use super::reference::{HostValue, run_loop, run_program};
    let dir = tempfile::tempdir().unwrap();
    crate::fixtures::write(crate::fixtures::Kind::Pi05PerStep, dir.path(), 2).unwrap();
    let p = compile_file(&dir.path().join("expert_denoise.onnx")).unwrap();
    assert!(
        p.host.is_some(),
        "the time embedding is cut out for the host"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut fixed: HashMap<String, HostValue> = HashMap::new();
    for f in p.feeds() {
        let n: usize = f.shape.iter().product();
        let v = match f.elem {
            9 => HostValue::Bool((0..n).map(|k| k % 7 != 3).collect()),
            7 => HostValue::I64((0..n as i64).collect()),
            _ => HostValue::F32(uniform(&mut rng, n, 1.0)),
        };
        fixed.insert(f.name, v);
    }
    let x0 = uniform(&mut rng, 50 * 32, 1.0);
    let (steps, dt) = (10, -0.1f32);
    let times: Vec<f32> = (0..steps).map(|k| (1.0 - k as f64 * 0.1) as f32).collect();
    // From the host, as `vla::VlaModel::denoise` steps a graph.
    let mut x = x0.clone();
    for &t in &times {
        let out = run_program(&p, &|name| match name {
            "x_t" => Some(HostValue::F32(x.clone())),
            "t" => Some(HostValue::F32(vec![t])),
            other => fixed.get(other).cloned(),
        })
        .unwrap();
        let HostValue::F32(v) = &out[0] else {
            panic!("velocity is f32")
        };
        for (xi, vi) in x.iter_mut().zip(v) {
            *xi += dt * vi;
        }
    }
    let l = DeviceLoop::new(&p, ("x_t", "t", "v_t"), &times, dt).unwrap();
    assert!(l.t.is_none(), "only the host island reads t");
    assert_eq!(l.tables.len(), 1);
    assert_eq!(
        l.tables[0].1.len(),
        steps * l.tables[0].0.shape.iter().product::<usize>()
    );
    let feed = |name: &str| fixed.get(name).cloned();
    let y = run_loop(&p, &l, &x0, &feed).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&y), bits(&x));
    // The schedule matters: times from 0 up give other actions.
    let up: Vec<f32> = times.iter().map(|t| 1.0 - t).collect();
    let l2 = DeviceLoop::new(&p, ("x_t", "t", "v_t"), &up, dt).unwrap();
    assert_ne!(bits(&run_loop(&p, &l2, &x0, &feed).unwrap()), bits(&x));
}

/// Attention scores over one KV head shared by 8 query heads, as exports write them
/// (`MatMul(Q, Expand(Transpose(K)))`) and large enough for cuBLAS: one gemm that reads K
/// where it lies (batch stride 0, the transpose a cuBLAS flag), no broadcast copy of K per
/// head; the result agrees with tract.
#[test]
fn a_shared_kv_head_is_read_in_place_by_the_gemm_not_copied_per_head() {
    use crate::onnx::builder::{F32, GraphBuilder};
    use tract_onnx::prelude::*;
    let mut g = GraphBuilder::new("gqa");
    let q = g.input("q", F32, &[1, 8, 128, 64]);
    let k = g.input("k", F32, &[1, 1, 256, 64]);
    let kt = g.transpose(&k, &[0, 1, 3, 2]);
    let ke = g.expand(&kt, &[1, 8, 64, 256]);
    let s = g.node("MatMul", &[&q, &ke], vec![]);
    g.output(&s, "scores", F32, &[1, 8, 128, 256]);
    let model = g.model(17);
    let p = compile(&model, "gqa.onnx").unwrap();
    assert_eq!(
        p.launches(),
        1,
        "{:?}",
        p.ops.iter().map(std::mem::discriminant).collect::<Vec<_>>()
    );
    let super::Op::Gemm(gemm) = &p.ops[0] else {
        panic!("a gemm")
    };
    assert_eq!(
        (gemm.b, gemm.b_stride, gemm.batch),
        (p.input("k").unwrap().buf, 0, 8)
    );
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (qv, kv) = (
        uniform(&mut rng, 8 * 128 * 64, 1.0),
        uniform(&mut rng, 256 * 64, 1.0),
    );
    let mut mem = Memory::new(&p);
    set_input(&p, &mut mem, "q", &qv);
    set_input(&p, &mut mem, "k", &kv);
    run_ops(&p.ops, &mut mem);
    let theirs = tract_outputs(
        &model,
        tvec![
            Tensor::from_shape(&[1, 8, 128, 64], &qv)
                .unwrap()
                .into_tvalue(),
            Tensor::from_shape(&[1, 1, 256, 64], &kv)
                .unwrap()
                .into_tvalue(),
        ],
    );
    let ours = &mem.f[p.outputs[0].buf];
    let (cos, max_abs) = crate::engine::cos_and_max_abs(ours, &theirs[0]);
    assert!(
        cos >= 0.99999 && max_abs <= 1e-4,
        "cos {cos}, max_abs {max_abs}"
    );
}

/// Activation buffers share memory by liveness: the baked pi0.5 expert's 573 launches write
/// into a few dozen buffers, not one each, and no op reads the buffer it writes. That a
/// shared buffer is never taken over while a later op still reads it is what the fixture
/// parity tests above check, on these programs.
#[test]
fn activation_buffers_are_shared_where_their_lives_do_not_overlap() {
    let dir = tempfile::tempdir().unwrap();
    crate::fixtures::write(crate::fixtures::Kind::Pi05, dir.path(), 1).unwrap();
    let mut p = compile_file(&dir.path().join("expert_denoise.onnx")).unwrap();
    let writes: Vec<usize> = p
        .ops
        .iter_mut()
        .map(|op| {
            let mut out = usize::MAX;
            op.for_each_buf(&mut |b, written| {
                if written {
                    out = *b;
                }
            });
            out
        })
        .collect();
    // No op reads the buffer it writes: a GPU kernel would race on it (the reference
    // executor, which writes a map's output after computing it, would not show it).
    for (i, op) in p.ops.iter_mut().enumerate() {
        op.for_each_buf(&mut |b, written| {
            assert!(
                written || *b != writes[i],
                "op {i} reads its own output buffer {b}"
            );
        });
    }
    let distinct: std::collections::HashSet<usize> = writes.iter().copied().collect();
    assert!(
        distinct.len() * 4 < writes.len(),
        "{} buffers for {} writes",
        distinct.len(),
        writes.len()
    );
}

/// `--precision bf16` on the pi0.5 prefix and baked expert: the deep GEMMs take half operands
/// and nothing else does. Ports, bools and integers, and every buffer a norm, softmax, reduction
/// or shallow GEMM touches stay f32; no GEMM mixes the two; an operand that must stay f32
/// reaches its GEMM through a half copy; half buffers cost 2 bytes.
#[test]
fn half_precision_stores_only_what_maps_and_deep_gemms_touch() {
    let dir = tempfile::tempdir().unwrap();
    crate::fixtures::write(crate::fixtures::Kind::Pi05, dir.path(), 1).unwrap();
    for file in ["vlm_prefix.onnx", "expert_denoise.onnx"] {
        let model = inlined_model(dir.path(), file);
        // Every product a GEMM, as at full size.
        let f32p = compile_with(&model, file, Precision::F32, 0).unwrap();
        let mut p = compile_with(&model, file, Precision::BF16, 0).unwrap();
        assert_eq!(
            (f32p.precision, p.precision),
            (Precision::F32, Precision::BF16)
        );
        assert!(f32p.buffers.iter().all(|b| !b.half) && f32p.half_gemms == 0);
        let deep = p
            .ops
            .iter()
            .filter(|op| matches!(op, Op::Gemm(g) if g.k >= HALF_GEMM_K))
            .count();
        assert!(
            deep > 0 && p.half_gemms == deep,
            "{file}: {deep} deep gemms"
        );
        for port in p.inputs.iter().chain(&p.outputs) {
            assert!(
                !p.buffers[port.buf].half,
                "{file}: port {} in half",
                port.name
            );
        }
        let half: Vec<bool> = p.buffers.iter().map(|b| b.half).collect();
        let mut copies = 0;
        let mut row_outputs_in_half = 0;
        for (i, op) in p.ops.iter_mut().enumerate() {
            match op {
                Op::Gemm(g) => {
                    let deep = g.k >= HALF_GEMM_K;
                    assert_eq!((half[g.a], half[g.b]), (deep, deep), "{file}: op {i}");
                    assert!(deep || !half[g.c], "{file}: op {i}");
                }
                Op::Map { out, expr, .. } => {
                    if let Expr::Load { src, .. } = expr
                        && half[*out]
                        && !half[*src]
                    {
                        copies += 1;
                    }
                }
                // A generated softmax reads its expression as a map does, and may store half.
                Op::SoftmaxOf { out, .. } => {
                    if half[*out] {
                        row_outputs_in_half += 1;
                    }
                }
                other => {
                    // The row kernels may store half; nothing but maps and deep GEMMs reads it.
                    let writes_half = matches!(other, Op::LayerNorm { .. } | Op::Softmax { .. });
                    if writes_half && other.output().is_some_and(|o| half[o]) {
                        row_outputs_in_half += 1;
                    }
                    let shown = format!("{other:?}");
                    other.for_each_buf(&mut |b, written| {
                        assert!(
                            !half[*b] || (written && writes_half),
                            "{file}: op {i} ({shown}) touches a half buffer"
                        )
                    })
                }
            }
        }
        assert!(copies >= p.half_copies, "{file}");
        // Attention's probabilities (softmax) feed P·V without a copy.
        assert!(
            row_outputs_in_half > 0,
            "{file}: no softmax or norm writes half"
        );
        for b in p.buffers.iter().filter(|b| b.half) {
            assert_eq!(b.dtype, DType::F32);
            assert_eq!(b.bytes(Precision::BF16), b.len * 2);
        }
    }
}

/// The half path at the GEMM coverage of a full-size export (every product a GEMM, as
/// products of full-size widths are): each pi0.5 program in bf16 and f16 on the reference
/// executor against tract in f32, cos ≥ 0.999; the weights the deep GEMMs read are stored
/// half (no copy per call), so the weights take well under f32's memory.
#[test]
fn half_precision_programs_with_every_product_a_gemm_agree_with_tract() {
    let dir = tempfile::tempdir().unwrap();
    crate::fixtures::write(crate::fixtures::Kind::Pi05, dir.path(), 2).unwrap();
    for file in ["vlm_prefix.onnx", "expert_denoise.onnx"] {
        let model = inlined_model(dir.path(), file);
        let f32p = compile_with(&model, file, Precision::F32, 0).unwrap();
        let (feeds, inputs) = random_feeds(&f32p, 4);
        let feed = |name: &str| {
            feeds
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let theirs = tract_outputs(&model, inputs);
        let f32_ours = super::reference::run_program(&f32p, &feed).unwrap();
        for precision in [Precision::BF16, Precision::F16] {
            let p = compile_with(&model, file, precision, 0).unwrap();
            let gemms = p
                .ops
                .iter()
                .filter(|op| matches!(op, super::Op::Gemm(_)))
                .count();
            assert!(
                p.half_gemms * 2 > gemms,
                "{file} {precision}: {} of {gemms} gemms in half",
                p.half_gemms
            );
            // No deep GEMM reads its weight through a per-call copy.
            for op in &p.ops {
                if let super::Op::Map {
                    expr: Expr::Load { src, .. },
                    out,
                    ..
                } = op
                {
                    assert!(
                        !(p.buffers[*out].half && p.buffers[*src].init.is_some()),
                        "{file}: a weight copied to half per call"
                    );
                }
            }
            let weights = |p: &Program| -> usize {
                p.buffers
                    .iter()
                    .filter(|b| b.init.is_some())
                    .map(|b| b.bytes(p.precision))
                    .sum()
            };
            assert!(
                weights(&p) * 10 < weights(&f32p) * 7,
                "{file}: weights {} vs {} bytes",
                weights(&p),
                weights(&f32p)
            );
            let ours = super::reference::run_program(&p, &feed).unwrap();
            for (k, (o, t)) in ours.iter().zip(&theirs).enumerate() {
                let o = o.to_f32();
                let (cos, max_abs) = crate::engine::cos_and_max_abs(&o, t);
                eprintln!("{file} {precision} output {k}: cos {cos:.7}, max |Δ| {max_abs:.2e}");
                assert!(cos >= 0.999, "{file} {precision} output {k}: cos {cos}");
                if k == 0 {
                    assert_ne!(
                        o.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        f32_ours[0]
                            .to_f32()
                            .iter()
                            .map(|x| x.to_bits())
                            .collect::<Vec<_>>(),
                        "{file} {precision}: the f32 bits"
                    );
                }
            }
        }
    }
}

/// RMSNorm's `mean(x²)`: the square is read inside the row reduction, not written out by a
/// map first (one launch and one activation fewer per norm); the pi0.5 fixture programs
/// agree with tract through it (the fixture tests above).
#[test]
fn rmsnorm_squares_are_read_in_their_mean() {
    let dir = tempfile::tempdir().unwrap();
    crate::fixtures::write(crate::fixtures::Kind::Pi05, dir.path(), 1).unwrap();
    for file in ["vlm_prefix.onnx", "expert_denoise.onnx"] {
        let p = compile_file(&dir.path().join(file)).unwrap();
        let fused = p
            .ops
            .iter()
            .filter(|op| {
                matches!(
                    op,
                    super::Op::Axis {
                        kind: AxisKind::MeanSquare,
                        inner: 1,
                        ..
                    }
                )
            })
            .count();
        assert!(
            fused > 0 && fused == p.fused_square_means,
            "{file}: {fused}"
        );
        // The squared rows are read from the norm's input itself: a buffer some other op
        // also reads (the `x ·` of x / rms), not a map's private output.
        for op in &p.ops {
            if let super::Op::Axis {
                kind: AxisKind::MeanSquare,
                x,
                ..
            } = op
            {
                let readers = p
                    .ops
                    .iter()
                    .filter(|o| {
                        let mut o = (*o).clone();
                        let mut reads = false;
                        o.for_each_buf(&mut |b, w| reads |= !w && *b == *x);
                        reads
                    })
                    .count();
                assert!(readers >= 2, "{file}: buffer {x} read by {readers}");
            }
        }
    }
}

/// Item 2's transformer fusions at the GEMM coverage of a full-size export (every product a
/// GEMM): the stacked KV cache split back into the graph inputs, Q/K/V and gate/up as one
/// GEMM each, 1/√d as the QKᵀ GEMM's alpha, scores + mask read inside the softmax, P·V
/// written token-major by its GEMM, and the one KV head never copied per query head — each
/// found in the pi0.5 programs, which still agree with tract output by output.
#[test]
fn transformer_fusions_at_gemm_scale_agree_with_tract() {
    for kind in [
        crate::fixtures::Kind::Pi05,
        crate::fixtures::Kind::Pi05PerStep,
    ] {
        let dir = tempfile::tempdir().unwrap();
        crate::fixtures::write(kind, dir.path(), 6).unwrap();
        for file in ["vlm_prefix.onnx", "expert_denoise.onnx"] {
            let model = inlined_model(dir.path(), file);
            let Ok(p) = compile_with(&model, file, Precision::F32, 0) else {
                panic!("{kind:?} {file} does not compile")
            };
            let f = &p.fusions;
            eprintln!("{kind:?} {file}: {f:?}, {} launches", p.launches());
            assert!(f.merged_gemms > 0, "{kind:?} {file}: {f:?}");
            assert!(f.scaled_gemms > 0, "{kind:?} {file}: {f:?}");
            assert!(f.fused_softmax_inputs > 0, "{kind:?} {file}: {f:?}");
            assert!(f.transposed_outputs > 0, "{kind:?} {file}: {f:?}");
            let softmaxes = p
                .ops
                .iter()
                .filter(|op| matches!(op, super::Op::SoftmaxOf { .. }))
                .count();
            assert_eq!(softmaxes, f.fused_softmax_inputs, "{kind:?} {file}");
            if file == "expert_denoise.onnx" {
                // The expert reads the prefix's KV cache in place: no split copies, and every
                // batched product reads its one KV head with batch stride 0.
                assert!(f.split_parts > 0, "{kind:?} {file}: {f:?}");
                for op in &p.ops {
                    if let super::Op::Gemm(g) = op
                        && g.batch > 1
                    {
                        assert_eq!(g.b_stride, 0, "{kind:?} {file}: {g:?}");
                    }
                }
            }
            let (feeds, inputs) = random_feeds(&p, 12);
            let theirs = tract_outputs(&model, inputs);
            let ours = super::reference::run_program(&p, &|name: &str| {
                feeds
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
            })
            .unwrap();
            assert_eq!(ours.len(), theirs.len());
            for (k, (o, t)) in ours.iter().zip(&theirs).enumerate() {
                let o = o.to_f32();
                let (cos, max_abs) = crate::engine::cos_and_max_abs(&o, t);
                let scale = t.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
                assert!(
                    cos >= 0.99999 && max_abs <= 1e-4 * scale as f64,
                    "{kind:?} {file} output {k}: cos {cos}, max |Δ| {max_abs}"
                );
            }
        }
    }
}

/// Strided views reshape without a copy exactly where numpy's would: axes split or merged
/// within one strided run (a column range of a merged projection split into heads), and
/// not across a stride gap.
#[test]
fn strided_views_reshape_in_place_only_where_their_strides_allow() {
    // Columns 960..1088 of a [50, 1088] result, split into 2 heads of 64.
    assert_eq!(
        reshape_view(&[1, 50, 128], &[0, 1088, 1], &[1, 50, 2, 64]),
        Some(vec![0, 1088, 64, 1])
    );
    // Size-1 axes come and go.
    assert_eq!(
        reshape_view(&[50, 64], &[1088, 1], &[1, 50, 1, 64]),
        Some(vec![0, 1088, 0, 1])
    );
    // Merging rows of a column range would cross the gap between rows: a copy.
    assert_eq!(reshape_view(&[50, 64], &[1088, 1], &[3200]), None);
    // A transposed view merges where it is contiguous ([64, 50] read column-major).
    assert_eq!(
        reshape_view(&[2, 32, 50], &[32, 1, 64], &[64, 50]),
        Some(vec![1, 64])
    );
    assert_eq!(reshape_view(&[4, 6], &[6, 1], &[5, 5]), None);
}

/// Rotary embedding costs no launch of its own: `x·cos + rotate_half(x)·sin` is computed in
/// the map that reads each projection's columns (q's, and k's where the expert joins it to
/// the cached keys), the rotated half never stored; the cos/sin tables once per graph.
#[test]
fn rotary_is_applied_inside_the_maps_that_read_the_projections() {
    fn has_rotate_half(e: &Expr) -> bool {
        match e {
            Expr::Select { parts, .. } => {
                parts
                    .iter()
                    .any(|p| matches!(p, Expr::Unary(super::UnOp::Neg, _)))
                    || parts.iter().any(has_rotate_half)
            }
            Expr::Unary(_, x) | Expr::Reshape { expr: x, .. } => has_rotate_half(x),
            Expr::Binary(_, a, b) | Expr::Dot { a, b, .. } => {
                has_rotate_half(a) || has_rotate_half(b)
            }
            Expr::Where(c, a, b) => has_rotate_half(c) || has_rotate_half(a) || has_rotate_half(b),
            _ => false,
        }
    }
    let dir = tempfile::tempdir().unwrap();
    crate::fixtures::write(crate::fixtures::Kind::Pi05PerStep, dir.path(), 6).unwrap();
    let model = inlined_model(dir.path(), "expert_denoise.onnx");
    let p = compile_with(&model, "e.onnx", Precision::F32, 0).unwrap();
    let layers = p
        .ops
        .iter()
        .filter(|op| matches!(op, super::Op::SoftmaxOf { .. }))
        .count();
    assert!(layers > 0);
    let rope_maps: Vec<&Expr> = p
        .ops
        .iter()
        .filter_map(|op| match op {
            super::Op::Map { expr, .. } if has_rotate_half(expr) => Some(expr),
            _ => None,
        })
        .collect();
    // q and k per layer, each in one map, and that map is the whole rotation (a sum of two
    // products), not a stored rotated half.
    assert_eq!(rope_maps.len(), 2 * layers, "{rope_maps:?}");
    for e in rope_maps {
        let root = match e {
            Expr::Reshape { expr, .. } => &**expr,
            e => e,
        };
        let whole = matches!(root, Expr::Binary(BinOp::Add, _, _))
            || matches!(root, Expr::Select { parts, .. }
                if parts.iter().any(|p| matches!(p, Expr::Binary(BinOp::Add, _, _))));
        assert!(whole, "{root:?}");
    }
}
