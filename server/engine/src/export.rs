//! The reference export: a small decomposed VLA written by our own code.
//!
//! Layout of an export directory (what `reflex serve` loads):
//! - `reflex_config.json` ([`crate::config::ExportConfig`]),
//! - `prefix.onnx`: `pixels f32[C,3,H,W]` + `tokens i64[1,T]` → `prefix f32[1,D]`.
//!   A patch-embedding convolution (32×32 patches, stride 32), token embeddings
//!   (Gather), learned positions, one pre-norm transformer block (LayerNorm,
//!   4-head softmax attention, GELU MLP), a final LayerNorm and mean pooling —
//!   the shape of a VLA's vision-language prefix, small enough for one CPU core.
//! - `expert.onnx`: `x_t f32[1,A,d]`, `t f32[1,1]`, `prefix f32[1,D]`,
//!   `state f32[1,S]` → `velocity f32[1,A,d]`, called once per flow-matching
//!   step. The expert works in a smooth temporal basis (the first K DCT-II
//!   vectors over the chunk, weighted toward low frequencies): it projects
//!   `x_t` onto the basis, runs a 3-layer GELU MLP over
//!   `[projection, sin/cos(t), prefix, state]` to predict the clean chunk's
//!   basis coefficients, and returns `(x̂₁ − x_t)/(1 − t)`. Euler integration
//!   from t=0 therefore lands exactly on a smooth chunk x̂₁ at t=1, as real
//!   flow-matching policies produce smooth trajectories.
//!
//! Weights come from ChaCha8 seeded with `--seed`; the same seed writes the
//! same bytes on every machine, another seed gives another model of the same
//! shapes. ONNX opset 18 (LayerNormalization; GELU written out with Erf as
//! exporters do before opset 20; ReduceMean with an axes input).

use std::path::Path;

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use tract_onnx::pb;

use crate::config::*;
use crate::onnx::builder::{F32, GraphBuilder, I64, int, write_atomic, write_model};

/// Shapes of the reference model.
pub const CAMERAS: [&str; 2] = ["base", "wrist"];
pub const IMAGE_SIZE: u32 = 224;
pub const PATCH: i64 = 32;
pub const DIM: usize = 64;
pub const HEADS: usize = 4;
pub const MLP_HIDDEN: usize = 256;
pub const VOCAB: u32 = 1024;
pub const MAX_TOKENS: usize = 16;
pub const STATE_DIM: usize = 8;
pub const ACTION_DIM: usize = 7;
pub const CHUNK: usize = 50;
pub const BASIS: usize = 8;
pub const TIME_FREQS: usize = 16;
pub const EXPERT_HIDDEN: usize = 256;
pub const DENOISE_STEPS: u32 = 10;

/// Default weight seed of the built-in reference model.
pub const DEFAULT_SEED: u64 = 0;

/// Writes the reference export into `dir` (created if missing) and returns its config.
pub fn write_reference_export(dir: &Path, seed: u64) -> std::io::Result<ExportConfig> {
    std::fs::create_dir_all(dir)?;
    let cfg = reference_config(seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let prefix = prefix_graph(&mut rng);
    let expert = expert_graph(&mut rng);
    write_model(dir, &cfg.graphs.prefix, prefix, None)?;
    write_model(dir, &cfg.graphs.expert, expert, None)?;
    let json = serde_json::to_string_pretty(&cfg).map_err(std::io::Error::other)?;
    write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())?;
    Ok(cfg)
}

pub fn reference_config(seed: u64) -> ExportConfig {
    ExportConfig {
        format: "reflex-export".into(),
        format_version: 1,
        model_type: "reflex-reference-vla".into(),
        export_kind: "decomposed".into(),
        cameras: CAMERAS.iter().map(|s| s.to_string()).collect(),
        image: ImageConfig {
            height: IMAGE_SIZE,
            width: IMAGE_SIZE,
            mean: [0.5, 0.5, 0.5],
            std: [0.5, 0.5, 0.5],
            resize: ResizePolicy::Resize,
        },
        instruction: InstructionConfig {
            tokenizer: crate::tokenizer::WORD_HASH_V1.into(),
            vocab_size: VOCAB,
            max_tokens: MAX_TOKENS,
        },
        state_dim: STATE_DIM,
        action_dim: ACTION_DIM,
        chunk_size: CHUNK,
        prefix_dim: DIM,
        denoise: DenoiseConfig {
            steps: DENOISE_STEPS,
            method: "euler".into(),
        },
        normalization: Normalization {
            // A Franka-like arm: 7 joints + gripper width in the state,
            // 6 end-effector deltas + gripper command in the actions.
            state: Stats {
                mean: vec![0.0, 0.2, 0.0, -1.8, 0.0, 2.0, 0.8, 0.04],
                std: vec![0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.02],
            },
            actions: Stats {
                mean: vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5],
                std: vec![0.05, 0.05, 0.05, 0.1, 0.1, 0.1, 0.5],
            },
        },
        graphs: Graphs {
            prefix: "prefix.onnx".into(),
            expert: "expert.onnx".into(),
        },
        weight_seed: Some(seed),
    }
}

/// Uniform in [-1, 1) from 24 random bits (exact in f32).
fn uniform(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
}

/// `n` values uniform in ±sqrt(3/fan_in)·gain: unit-variance outputs for unit-variance inputs.
fn weights(rng: &mut ChaCha8Rng, n: usize, fan_in: usize, gain: f32) -> Vec<f32> {
    let a = (3.0 / fan_in as f32).sqrt() * gain;
    (0..n).map(|_| uniform(rng) * a).collect()
}

/// Orthonormal DCT-II basis, `CHUNK × BASIS`, row-major.
fn dct_basis() -> Vec<f32> {
    let n = CHUNK as f64;
    let mut b = Vec::with_capacity(CHUNK * BASIS);
    for i in 0..CHUNK {
        for k in 0..BASIS {
            let scale = if k == 0 {
                (1.0 / n).sqrt()
            } else {
                (2.0 / n).sqrt()
            };
            let v = scale * (std::f64::consts::PI * k as f64 * (i as f64 + 0.5) / n).cos();
            b.push(v as f32);
        }
    }
    b
}

/// LayerNorm with unit gain and zero bias, named after the block it belongs to.
fn layer_norm(g: &mut GraphBuilder, x: &str, prefix: &str, dim: usize) -> String {
    let gamma = g.f32s(&format!("{prefix}.gamma"), &[dim as i64], &vec![1.0; dim]);
    let beta = g.f32s(&format!("{prefix}.beta"), &[dim as i64], &vec![0.0; dim]);
    g.layer_norm(x, &gamma, &beta)
}

/// The reference export's opset.
const OPSET: i64 = 18;

fn prefix_graph(rng: &mut ChaCha8Rng) -> pb::ModelProto {
    let cams = CAMERAS.len() as i64;
    let size = IMAGE_SIZE as i64;
    let grid = size / PATCH;
    let patches = grid * grid;
    let (d, t) = (DIM as i64, MAX_TOKENS as i64);
    let n = cams * patches + t;
    let head_dim = d / HEADS as i64;
    let mut g = GraphBuilder::new("reflex_reference_prefix");

    let pixels = g.input("pixels", F32, &[cams, 3, size, size]);
    let tokens = g.input("tokens", I64, &[1, t]);

    // Patch embedding: one conv whose kernel is the patch, stride the patch.
    let fan = 3 * (PATCH * PATCH) as usize;
    let w = g.f32s(
        "patch.weight",
        &[d, 3, PATCH, PATCH],
        &weights(rng, DIM * fan, fan, 1.0),
    );
    let b = g.f32s("patch.bias", &[d], &weights(rng, DIM, DIM, 0.1));
    let img = g.patch_embed(&pixels, (&w, &b), PATCH, [cams, d, patches]);
    let img = g.reshape(&img, &[1, cams * patches, d]);

    let emb = g.f32s(
        "tokens.embedding",
        &[VOCAB as i64, d],
        &weights(rng, VOCAB as usize * DIM, 3, 1.0),
    );
    let txt = g.node("Gather", &[&emb, &tokens], vec![int("axis", 0)]);
    let seq = g.node("Concat", &[&img, &txt], vec![int("axis", 1)]);
    let pos = g.f32s(
        "position",
        &[1, n, d],
        &weights(rng, (n * d) as usize, 3, 0.5),
    );
    let h0 = g.node("Add", &[&seq, &pos], vec![]);

    // Pre-norm attention block.
    let ln1 = layer_norm(&mut g, &h0, "block.ln1", DIM);
    let mut proj = |g: &mut GraphBuilder, name: &str, x: &str| {
        let w = g.f32s(name, &[d, d], &weights(rng, DIM * DIM, DIM, 1.0));
        g.node("MatMul", &[x, &w], vec![])
    };
    let q = proj(&mut g, "block.attn.q", &ln1);
    let k = proj(&mut g, "block.attn.k", &ln1);
    let v = proj(&mut g, "block.attn.v", &ln1);
    let split = [1, n, HEADS as i64, head_dim];
    let q = g.reshape(&q, &split);
    let q = g.transpose(&q, &[0, 2, 1, 3]);
    let k = g.reshape(&k, &split);
    let kt = g.transpose(&k, &[0, 2, 3, 1]);
    let v = g.reshape(&v, &split);
    let v = g.transpose(&v, &[0, 2, 1, 3]);
    let scores = g.node("MatMul", &[&q, &kt], vec![]);
    let scale = g.f32s("block.attn.scale", &[], &[1.0 / (head_dim as f32).sqrt()]);
    let scores = g.node("Mul", &[&scores, &scale], vec![]);
    let probs = g.node("Softmax", &[&scores], vec![int("axis", -1)]);
    let ctx = g.node("MatMul", &[&probs, &v], vec![]);
    let ctx = g.transpose(&ctx, &[0, 2, 1, 3]);
    let ctx = g.reshape(&ctx, &[1, n, d]);
    let o = proj(&mut g, "block.attn.o", &ctx);
    let h1 = g.node("Add", &[&h0, &o], vec![]);

    let ln2 = layer_norm(&mut g, &h1, "block.ln2", DIM);
    let hid = MLP_HIDDEN as i64;
    let w1 = g.f32s(
        "block.mlp.w1",
        &[d, hid],
        &weights(rng, DIM * MLP_HIDDEN, DIM, 1.0),
    );
    let b1 = g.f32s(
        "block.mlp.b1",
        &[hid],
        &weights(rng, MLP_HIDDEN, MLP_HIDDEN, 0.1),
    );
    let w2 = g.f32s(
        "block.mlp.w2",
        &[hid, d],
        &weights(rng, MLP_HIDDEN * DIM, MLP_HIDDEN, 1.0),
    );
    let b2 = g.f32s("block.mlp.b2", &[d], &weights(rng, DIM, DIM, 0.1));
    let m = g.node("MatMul", &[&ln2, &w1], vec![]);
    let m = g.node("Add", &[&m, &b1], vec![]);
    let m = g.gelu(&m);
    let m = g.node("MatMul", &[&m, &w2], vec![]);
    let m = g.node("Add", &[&m, &b2], vec![]);
    let h2 = g.node("Add", &[&h1, &m], vec![]);

    let lnf = layer_norm(&mut g, &h2, "final.ln", DIM);
    let axes = g.i64s("pool.axes", &[1]);
    let pooled = g.node("ReduceMean", &[&lnf, &axes], vec![int("keepdims", 0)]);
    g.output(&pooled, "prefix", F32, &[1, d]);
    g.model(OPSET)
}

fn expert_graph(rng: &mut ChaCha8Rng) -> pb::ModelProto {
    let (a, ad, k) = (CHUNK as i64, ACTION_DIM as i64, BASIS as i64);
    let mut g = GraphBuilder::new("reflex_reference_expert");
    let x = g.input("x_t", F32, &[1, a, ad]);
    let t = g.input("t", F32, &[1, 1]);
    let prefix = g.input("prefix", F32, &[1, DIM as i64]);
    let state = g.input("state", F32, &[1, STATE_DIM as i64]);

    let basis = dct_basis();
    // Analysis: orthonormal basis transposed (BASIS × CHUNK).
    let mut bt = vec![0.0f32; BASIS * CHUNK];
    for i in 0..CHUNK {
        for kk in 0..BASIS {
            bt[kk * CHUNK + i] = basis[i * BASIS + kk];
        }
    }
    // Synthesis: scaled so unit coefficients give unit-scale actions, with
    // high frequencies damped (smooth chunks).
    let synth: Vec<f32> = basis
        .iter()
        .enumerate()
        .map(|(idx, b)| b * (CHUNK as f32).sqrt() / (1.0 + (idx % BASIS) as f32))
        .collect();
    let bt = g.f32s("basis.analysis", &[k, a], &bt);
    let bs = g.f32s("basis.synthesis", &[a, k], &synth);

    let coeffs = g.node("MatMul", &[&bt, &x], vec![]);
    let coeffs = g.reshape(&coeffs, &[1, k * ad]);
    let freqs: Vec<f32> = (0..TIME_FREQS)
        .map(|j| std::f32::consts::PI * (j as f32 + 1.0) / 2.0)
        .collect();
    let freqs = g.f32s("time.freqs", &[1, TIME_FREQS as i64], &freqs);
    let phase = g.node("Mul", &[&t, &freqs], vec![]);
    let sin = g.node("Sin", &[&phase], vec![]);
    let cos = g.node("Cos", &[&phase], vec![]);
    let feat = g.node(
        "Concat",
        &[&coeffs, &sin, &cos, &prefix, &state],
        vec![int("axis", 1)],
    );

    let f_in = BASIS * ACTION_DIM + 2 * TIME_FREQS + DIM + STATE_DIM;
    let hid = EXPERT_HIDDEN;
    let out = BASIS * ACTION_DIM;
    let layers = [(f_in, hid, 1.0), (hid, hid, 1.0), (hid, out, 0.8)];
    let mut h = feat;
    for (i, (fi, fo, gain)) in layers.into_iter().enumerate() {
        let w = g.f32s(
            &format!("mlp.{i}.weight"),
            &[fi as i64, fo as i64],
            &weights(rng, fi * fo, fi, gain),
        );
        let b = g.f32s(
            &format!("mlp.{i}.bias"),
            &[fo as i64],
            &weights(rng, fo, fo, 0.1),
        );
        h = g.node("Gemm", &[&h, &w, &b], vec![]);
        if i + 1 < layers.len() {
            h = g.gelu(&h);
        }
    }
    let c = g.reshape(&h, &[1, k, ad]);
    let clean = g.node("MatMul", &[&bs, &c], vec![]);
    let diff = g.node("Sub", &[&clean, &x], vec![]);
    let one = g.f32s("one", &[1, 1], &[1.0]);
    let remaining = g.node("Sub", &[&one, &t], vec![]);
    let velocity = g.node("Div", &[&diff, &remaining], vec![]);
    g.output(&velocity, "velocity", F32, &[1, a, ad]);
    g.model(OPSET)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::path::Path;

    // The config parser's tests live here: they start from the reference config, and
    // `config` must not import `export` (which imports it).
    fn write_config(
        dir: &Path,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> Result<ExportConfig, ConfigError> {
        let mut v = serde_json::to_value(reference_config(0)).unwrap();
        edit(&mut v);
        std::fs::write(dir.join(CONFIG_FILE), v.to_string()).unwrap();
        ExportConfig::load(dir)
    }

    #[test]
    fn config_parses_and_bad_configs_say_what_is_wrong() {
        let d = tempfile::tempdir().unwrap();
        let ok = write_config(d.path(), |_| {}).unwrap();
        assert_eq!(ok.cameras, vec!["base", "wrist"]);
        // The canonical form sorts keys and is compact, so the hash ignores formatting.
        assert!(ok.canonical_json().starts_with("{\"action_dim\":7,"));
        assert_eq!(
            ok.config_hash(),
            hex(&Sha256::digest(ok.canonical_json().as_bytes()))[..16]
        );
        let err = |edit: fn(&mut serde_json::Value)| {
            write_config(d.path(), edit).unwrap_err().to_string()
        };
        assert!(
            err(|v| v["graphs"]["prefix"] = "../../etc/passwd".into()).contains("plain file name")
        );
        assert!(err(|v| v["state_dim"] = 9.into()).contains("normalization.state needs 9"));
        assert!(err(|v| v["format_version"] = 2.into()).contains("unsupported export format"));
        assert!(err(|v| v["cameras"] = serde_json::json!(["a", "a"])).contains("unique"));
        assert!(err(|v| v["surprise"] = 1.into()).contains("unknown field"));
        let missing = tempfile::tempdir().unwrap();
        assert!(matches!(
            ExportConfig::load(missing.path()),
            Err(ConfigError::Missing(_))
        ));
    }

    #[test]
    fn a_seed_tool_export_is_named_as_such_not_as_a_parse_error() {
        for (kind, words) in [
            (
                crate::fixtures::Kind::Pi05,
                "model_type \"pi05_decomposed\", export_kind \"decomposed\"",
            ),
            (
                crate::fixtures::Kind::Pi05Monolithic,
                "model_type \"pi05\", export_kind \"monolithic\"",
            ),
        ] {
            let d = tempfile::tempdir().unwrap();
            crate::fixtures::write(kind, d.path(), 0).unwrap();
            let e = ExportConfig::load(d.path()).unwrap_err().to_string();
            assert!(
                e.contains("seed tool reflex-vla") && e.contains(words),
                "{e}"
            );
            assert!(
                e.contains(CONFIG_FILE) && !e.contains("unknown field"),
                "{e}"
            );
        }
        // Without an export_kind (the SmolVLA four-graph layout) it is still recognised.
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(CONFIG_FILE), r#"{"model_type": "smolvla"}"#).unwrap();
        let e = ExportConfig::load(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("export_kind none (the SmolVLA four-graph layout)"),
            "{e}"
        );
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_model() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let c = tempfile::tempdir().unwrap();
        let ca = write_reference_export(a.path(), 0).unwrap();
        write_reference_export(b.path(), 0).unwrap();
        let cc = write_reference_export(c.path(), 1).unwrap();
        let files = ca.model_files();
        let ha = model_hash(a.path(), &files).unwrap();
        assert_eq!(ha, model_hash(b.path(), &files).unwrap());
        assert_ne!(ha, model_hash(c.path(), &files).unwrap());
        // The weight seed is part of the config, so the config hash moves too.
        assert_ne!(ca.config_hash(), cc.config_hash());
        assert_eq!(ExportConfig::load(a.path()).unwrap(), ca);
    }

    #[test]
    fn dct_basis_is_orthonormal() {
        let b = dct_basis();
        for p in 0..BASIS {
            for q in 0..BASIS {
                let dot: f32 = (0..CHUNK)
                    .map(|i| b[i * BASIS + p] * b[i * BASIS + q])
                    .sum();
                let want = if p == q { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-5, "<b{p}, b{q}> = {dot}");
            }
        }
    }
}
