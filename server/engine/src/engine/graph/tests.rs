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
        };
        let mut mem = Memory {
            f: vec![a.clone(), b.clone(), vec![0.0; batch * m * n]],
            i: vec![vec![]; 3],
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
