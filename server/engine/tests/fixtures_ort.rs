//! The seed-layout fixtures (`reflex export-demo --kind pi05|pi05-per-step|pi05-monolithic|pi0|smolvla`)
//! checked against a reference no one here wrote: onnxruntime runs each fixture
//! (`tests/fixtures/run_ort.py`, the seed tool's flow) on deterministic inputs; the test
//! asserts the seed's tensor names, dtypes and shapes as onnxruntime reads them, that the
//! actions are finite and non-trivial, that HuggingFace `tokenizers` and `safetensors`
//! read the tokenizer and the stats, and that our cpu engine (tract, after
//! `onnx::rewrite::prepare`) computes the same prefix KV and actions:
//! cos ≥ 0.99999 and max |Δ| ≤ 1e-4.
//!
//! Needs python3 with onnxruntime, tokenizers and safetensors (`deploy/ci-setup.sh`); without
//! them the test fails and says so.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use reflex_engine::engine::cos_and_max_abs;
use reflex_engine::engine::cpu::{Plan, load_graph};
use reflex_engine::fixtures::{Kind, assets, pi05};
use serde_json::{Value, json};
use tract_onnx::prelude::*;

/// A host tensor in one of the three dtypes the seed's graphs use.
#[derive(Debug, Clone, PartialEq)]
enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

#[derive(Debug, Clone)]
struct HostTensor {
    shape: Vec<usize>,
    data: Data,
}

impl HostTensor {
    fn dtype(&self) -> &'static str {
        match self.data {
            Data::F32(_) => "float32",
            Data::I64(_) => "int64",
            Data::Bool(_) => "bool",
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match &self.data {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::Bool(v) => v.iter().map(|b| *b as u8).collect(),
        }
    }

    fn read(dtype: &str, shape: Vec<usize>, bytes: &[u8]) -> HostTensor {
        let data = match dtype {
            "float32" => Data::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            ),
            "int64" => Data::I64(
                bytes
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            ),
            "bool" => Data::Bool(bytes.iter().map(|b| *b != 0).collect()),
            other => panic!("unexpected dtype {other}"),
        };
        HostTensor { shape, data }
    }

    fn to_tract(&self) -> TValue {
        let t = match &self.data {
            Data::F32(v) => Tensor::from_shape(&self.shape, v),
            Data::I64(v) => Tensor::from_shape(&self.shape, v),
            Data::Bool(v) => Tensor::from_shape(&self.shape, v),
        };
        t.unwrap().into_tvalue()
    }

    fn from_tract(t: &TValue) -> HostTensor {
        let shape = t.shape().to_vec();
        let plain = t.try_as_plain_ram().unwrap();
        let data = match t.datum_type() {
            DatumType::F32 => Data::F32(plain.as_slice::<f32>().unwrap().to_vec()),
            DatumType::I64 => Data::I64(plain.as_slice::<i64>().unwrap().to_vec()),
            DatumType::Bool => Data::Bool(plain.as_slice::<bool>().unwrap().to_vec()),
            other => panic!("unexpected output type {other:?}"),
        };
        HostTensor { shape, data }
    }

    fn f32s(&self) -> &[f32] {
        match &self.data {
            Data::F32(v) => v,
            other => panic!("not f32: {other:?}"),
        }
    }
}

type Tensors = BTreeMap<String, HostTensor>;

/// Deterministic inputs: two cameras with patterns, the third absent (−1, mask off, as the
/// seed's server fills it), a BOS-led prompt right-padded with 0, ChaCha8 Gaussian noise;
/// a state for the variants that take one. Cameras and image size are the variant's.
fn inputs(v: pi05::Variant) -> Tensors {
    let s = v.dims(pi05::Dims::TINY).image as usize;
    let plane = s * s;
    let image = |phase: f32| -> Vec<f32> {
        (0..3 * plane)
            .map(|i| {
                let (c, y, x) = (i / plane, (i % plane) / s, i % s);
                (0.5 + 0.5 * ((x as f32 * 0.3 + y as f32 * 0.2 + c as f32 + phase).sin()))
                    .clamp(0.0, 1.0)
            })
            .collect()
    };
    let img = |v: Vec<f32>| HostTensor {
        shape: vec![1, 3, s, s],
        data: Data::F32(v),
    };
    let flag = |b: bool| HostTensor {
        shape: vec![1],
        data: Data::Bool(vec![b]),
    };
    let t = pi05::TOKENS as usize;
    let real = 10;
    let tokens: Vec<i64> = (0..t)
        .map(|i| match i {
            0 => assets::BOS as i64,
            i if i < real => 4 + (i as i64 * 7) % 36,
            _ => assets::PAD as i64,
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut unit = || (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
    let n = (pi05::CHUNK * pi05::ACTION_WIDTH) as usize;
    let noise: Vec<f32> = (0..n)
        .map(|_| {
            // Box–Muller; 1 − u keeps the log's argument in (0, 1].
            let (u1, u2) = (1.0 - unit(), unit());
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    let [c0, c1, c2] = v.cameras();
    let mut values = BTreeMap::from([
        (format!("img_{c0}"), img(image(0.0))),
        (format!("img_{c1}"), img(image(1.7))),
        (format!("img_{c2}"), img(vec![-1.0; 3 * plane])),
        (format!("mask_{c0}"), flag(true)),
        (format!("mask_{c1}"), flag(true)),
        (format!("mask_{c2}"), flag(false)),
        (
            "lang_tokens".into(),
            HostTensor {
                shape: vec![1, t],
                data: Data::I64(tokens),
            },
        ),
        (
            "lang_masks".into(),
            HostTensor {
                shape: vec![1, t],
                data: Data::Bool((0..t).map(|i| i < real).collect()),
            },
        ),
        (
            "noise".into(),
            HostTensor {
                shape: vec![1, pi05::CHUNK as usize, pi05::ACTION_WIDTH as usize],
                data: Data::F32(noise),
            },
        ),
    ]);
    if v.takes_state() {
        let w = pi05::STATE_WIDTH as usize;
        let state = (0..w)
            .map(|i| if i < 8 { (i as f32 * 0.9).sin() } else { 0.0 })
            .collect();
        values.insert(
            "state".into(),
            HostTensor {
                shape: vec![1, w],
                data: Data::F32(state),
            },
        );
    }
    values
}

fn write_inputs(dir: &Path, tensors: &Tensors) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut spec = serde_json::Map::new();
    for (name, t) in tensors {
        let file = format!("{name}.bin");
        std::fs::write(dir.join(&file), t.bytes()).unwrap();
        spec.insert(
            name.clone(),
            json!({"dtype": t.dtype(), "shape": t.shape, "file": file}),
        );
    }
    let path = dir.join("inputs.json");
    std::fs::write(&path, json!({ "tensors": spec }).to_string()).unwrap();
    path
}

/// Runs tests/fixtures/run_ort.py; returns its manifest and tensors.
fn onnxruntime(fixture: &Path, inputs_json: &Path, out: &Path) -> (Value, Tensors) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/run_ort.py");
    let run = Command::new("python3")
        .arg(&script)
        .arg(fixture)
        .arg(inputs_json)
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("cannot start python3 ({e}); run deploy/ci-setup.sh"));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "run_ort.py failed (onnxruntime, tokenizers and safetensors come from deploy/ci-setup.sh):\n{stderr}"
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.join("outputs.json")).unwrap()).unwrap();
    let tensors = manifest["tensors"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            let shape = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let bytes = std::fs::read(out.join(t["file"].as_str().unwrap())).unwrap();
            (
                name.clone(),
                HostTensor::read(t["dtype"].as_str().unwrap(), shape, &bytes),
            )
        })
        .collect();
    (manifest, tensors)
}

/// Runs a tract plan with inputs by name; returns its outputs by name.
fn run_tract(plan: &Plan, values: &Tensors) -> Tensors {
    let model = plan.model();
    let inputs: TVec<TValue> = model
        .input_outlets()
        .unwrap()
        .iter()
        .map(|o| {
            let name = &model.node(o.node).name;
            values
                .get(name)
                .unwrap_or_else(|| panic!("no value for input {name}"))
                .to_tract()
        })
        .collect();
    let outputs = plan.run(inputs).unwrap();
    model
        .output_outlets()
        .unwrap()
        .iter()
        .zip(outputs.iter())
        .map(|(o, v)| {
            let name = model
                .outlet_label(*o)
                .map(str::to_string)
                .unwrap_or_else(|| model.node(o.node).name.clone());
            (name, HostTensor::from_tract(v))
        })
        .collect()
}

fn assert_close(what: &str, ours: &HostTensor, theirs: &HostTensor) -> (f64, f64) {
    assert_eq!(ours.shape, theirs.shape, "{what}: shape");
    let (cos, max) = cos_and_max_abs(ours.f32s(), theirs.f32s());
    eprintln!("{what}: cos {cos:.9}, max_abs {max:.3e}");
    assert!(
        cos >= 0.99999 && max <= 1e-4,
        "{what}: tract vs onnxruntime cos {cos}, max_abs {max}"
    );
    (cos, max)
}

/// The seed's names, onnxruntime types and shapes of a graph's inputs or outputs.
fn io(manifest: &Value, graph: &str, side: &str) -> Vec<(String, String, Vec<i64>)> {
    manifest["graphs"][graph][side]
        .as_array()
        .unwrap_or_else(|| panic!("no {side} for {graph} in {manifest}"))
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["type"].as_str().unwrap().to_string(),
                v["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_i64().unwrap())
                    .collect(),
            )
        })
        .collect()
}

/// The seed exporters' prefix inputs in their order (`state` last, for pi0 and SmolVLA).
fn prefix_inputs_layout(variant: pi05::Variant) -> Vec<(String, String, Vec<i64>)> {
    let s = variant.dims(pi05::Dims::TINY).image;
    let t = pi05::TOKENS;
    let mut v = vec![];
    for c in variant.cameras() {
        v.push((format!("img_{c}"), "tensor(float)".into(), vec![1, 3, s, s]));
    }
    for c in variant.cameras() {
        v.push((format!("mask_{c}"), "tensor(bool)".into(), vec![1]));
    }
    v.push(("lang_tokens".into(), "tensor(int64)".into(), vec![1, t]));
    v.push(("lang_masks".into(), "tensor(bool)".into(), vec![1, t]));
    if variant.takes_state() {
        v.push((
            "state".into(),
            "tensor(float)".into(),
            vec![1, pi05::STATE_WIDTH],
        ));
    }
    v
}

fn kv_layout() -> Vec<(String, String, Vec<i64>)> {
    let mut v: Vec<_> = pi05::past_kv_names()
        .into_iter()
        .map(|n| {
            (
                n,
                "tensor(float)".to_string(),
                vec![1, 1, pi05::PREFIX, pi05::HEAD_DIM],
            )
        })
        .collect();
    v.push((
        "prefix_pad_masks".into(),
        "tensor(bool)".into(),
        vec![1, pi05::PREFIX],
    ));
    v
}

fn action_layout(name: &str) -> (String, String, Vec<i64>) {
    (
        name.into(),
        "tensor(float)".into(),
        vec![1, pi05::CHUNK, pi05::ACTION_WIDTH],
    )
}

/// The seed layout (seed-exports.md) as onnxruntime reads the graphs.
fn assert_seed_layout(kind: Kind, manifest: &Value) {
    match kind {
        Kind::Pi05 | Kind::Pi05PerStep => {
            assert_eq!(
                io(manifest, pi05::PREFIX_ONNX, "inputs"),
                prefix_inputs_layout(pi05::Variant::Pi05)
            );
            assert_eq!(io(manifest, pi05::PREFIX_ONNX, "outputs"), kv_layout());
            let mut expert_in = kv_layout();
            let outputs = if kind == Kind::Pi05 {
                expert_in.push(action_layout("noise"));
                vec![action_layout("actions")]
            } else {
                expert_in.push(action_layout("x_t"));
                expert_in.push(("t".into(), "tensor(float)".into(), vec![1]));
                vec![action_layout("v_t")]
            };
            assert_eq!(io(manifest, pi05::EXPERT_ONNX, "inputs"), expert_in);
            assert_eq!(io(manifest, pi05::EXPERT_ONNX, "outputs"), outputs);
        }
        Kind::Pi05Monolithic | Kind::Pi0 | Kind::Smolvla => {
            let mut inputs = prefix_inputs_layout(kind.variant().unwrap());
            inputs.push(action_layout("noise"));
            assert_eq!(io(manifest, pi05::MONOLITHIC_ONNX, "inputs"), inputs);
            assert_eq!(
                io(manifest, pi05::MONOLITHIC_ONNX, "outputs"),
                vec![action_layout("actions")]
            );
        }
        Kind::SmolvlaFourGraph => unreachable!("its own test: smolvla_four_graph_layout_*"),
        Kind::Reference => unreachable!("not a seed layout"),
    }
}

/// The files beside the graphs: config as the seed writes it, weights external, the
/// tokenizer and stats as HuggingFace's readers see them.
fn assert_folder(kind: Kind, dir: &Path, manifest: &Value) {
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.join(assets::SEED_CONFIG)).unwrap()).unwrap();
    assert_eq!(cfg["num_denoising_steps"], pi05::STEPS);
    assert_eq!(cfg["action_dim"], 32);
    if kind.monolithic() {
        assert_eq!(cfg["export_kind"], "monolithic");
        assert_eq!(cfg["model_type"], kind.variant().unwrap().model_type());
    } else {
        assert_eq!(cfg["export_kind"], "decomposed");
        assert_eq!(cfg["model_type"], "pi05_decomposed");
        let d = &cfg["decomposed"];
        assert_eq!(d["per_step_expert"], kind == Kind::Pi05PerStep);
        assert_eq!(d["past_kv_tensor_names"], json!(pi05::past_kv_names()));
        assert_eq!(d["kv_heads"], 1);
        assert_eq!(d["head_dim"], pi05::HEAD_DIM);
    }
    // The weight matrices live in the .data files (onnxruntime found them there); what
    // stays inline is the graph and its small constants.
    for g in kind.graphs() {
        let data = std::fs::metadata(dir.join(format!("{g}.data")))
            .unwrap()
            .len();
        assert!(data > 100_000, "{g}: only {data} bytes external");
    }
    let tok = &manifest["tokenizer"];
    assert_eq!(tok["vocab_size"], assets::tokenizer_vocab_size());
    let ids: Vec<i64> = tok["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    // "<bos> task : pick up the red block ; action :"
    assert_eq!(ids.len(), 11, "{tok}");
    assert_eq!(ids[0], assets::BOS as i64);
    assert!(!ids.contains(&3), "no word of the prompt is unknown: {tok}");
    let stats = &manifest["stats"];
    assert_eq!(
        stats["observation.state.mean"]["shape"],
        json!([assets::ROBOT_STATE_DIM])
    );
    assert_eq!(
        stats["action.std"]["shape"],
        json!([assets::ROBOT_ACTION_DIM])
    );
    assert_eq!(stats["action.std"]["dtype"], "float32");
}

/// Actions look like a policy's output: finite, spread, not the noise they started from.
fn assert_actions_plausible(actions: &HostTensor, noise: &HostTensor) {
    let a = actions.f32s();
    assert!(a.iter().all(|v| v.is_finite()), "non-finite actions");
    let mean = a.iter().sum::<f32>() / a.len() as f32;
    let var = a.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / a.len() as f32;
    assert!(var > 1e-3, "actions are nearly constant (variance {var})");
    let (cos, _) = cos_and_max_abs(a, noise.f32s());
    assert!(cos < 0.99, "actions are the noise (cos {cos})");
}

/// The Euler loop of the seed's runtime, in f32: t from 1, dt = −1/N.
fn tract_per_step(expert: &Plan, context: &Tensors, noise: &HostTensor) -> HostTensor {
    let mut x = noise.clone();
    let dt = -1.0f32 / pi05::STEPS as f32;
    let mut t = 1.0f32;
    for _ in 0..pi05::STEPS {
        let mut values = context.clone();
        values.insert("x_t".into(), x.clone());
        values.insert(
            "t".into(),
            HostTensor {
                shape: vec![1],
                data: Data::F32(vec![t]),
            },
        );
        let v = run_tract(expert, &values).remove("v_t").unwrap();
        let next: Vec<f32> = x
            .f32s()
            .iter()
            .zip(v.f32s())
            .map(|(xi, vi)| xi + dt * vi)
            .collect();
        x.data = Data::F32(next);
        t += dt;
    }
    x
}

fn check(kind: Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("export");
    reflex_engine::fixtures::write(kind, &dir, 3).unwrap();
    let values = inputs(kind.variant().unwrap());
    let inputs_json = write_inputs(&tmp.path().join("inputs"), &values);
    let (manifest, theirs) = onnxruntime(&dir, &inputs_json, &tmp.path().join("ort"));
    assert_seed_layout(kind, &manifest);
    assert_folder(kind, &dir, &manifest);
    let actions = &theirs["actions"];
    assert_actions_plausible(actions, &values["noise"]);

    let ours_actions = if kind.monolithic() {
        let model = load_graph(&dir.join(pi05::MONOLITHIC_ONNX)).unwrap();
        run_tract(&model, &values).remove("actions").unwrap()
    } else {
        let prefix = load_graph(&dir.join(pi05::PREFIX_ONNX)).unwrap();
        let expert = load_graph(&dir.join(pi05::EXPERT_ONNX)).unwrap();
        let kv = run_tract(&prefix, &values);
        let mut context = Tensors::new();
        for name in pi05::past_kv_names() {
            assert_close(&format!("{kind} {name}"), &kv[&name], &theirs[&name]);
            context.insert(name.clone(), kv[&name].clone());
        }
        let pad = &kv["prefix_pad_masks"];
        assert_eq!(pad.data, theirs["prefix_pad_masks"].data);
        let real = match &pad.data {
            Data::Bool(v) => v.iter().filter(|b| **b).count(),
            _ => unreachable!(),
        };
        // Two cameras of 16 tokens and 10 text tokens are real.
        assert_eq!(real, 2 * pi05::IMAGE_TOKENS as usize + 10);
        context.insert("prefix_pad_masks".into(), pad.clone());
        if kind == Kind::Pi05 {
            let mut v = context;
            v.insert("noise".into(), values["noise"].clone());
            run_tract(&expert, &v).remove("actions").unwrap()
        } else {
            tract_per_step(&expert, &context, &values["noise"])
        }
    };
    assert_close(&format!("{kind} actions"), &ours_actions, actions);
}

#[test]
fn pi05_baked_loop_matches_onnxruntime() {
    check(Kind::Pi05);
}

#[test]
fn pi05_per_step_matches_onnxruntime() {
    check(Kind::Pi05PerStep);
}

#[test]
fn pi05_monolithic_matches_onnxruntime() {
    check(Kind::Pi05Monolithic);
}

#[test]
fn pi0_monolithic_matches_onnxruntime() {
    check(Kind::Pi0);
}

#[test]
fn smolvla_monolithic_matches_onnxruntime() {
    check(Kind::Smolvla);
}

/// The seed's SmolVLA four-graph layout as onnxruntime reads it: names, types, the symbolic
/// `batch`/`seq` axes of its `dynamic_axes`, the state projection as numpy loads it. (Its
/// actions against onnxruntime and the seed's own runtime: `tests/real_exports.rs`.)
#[test]
fn smolvla_four_graph_layout_is_the_seeds_as_onnxruntime_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("export");
    reflex_engine::fixtures::write(Kind::SmolvlaFourGraph, &dir, 3).unwrap();
    let script = r#"
import json, sys
from pathlib import Path
import numpy as np, onnxruntime as ort
d = Path(sys.argv[1])
io = lambda xs: [[a.name, a.type, list(a.shape)] for a in xs]
out = {}
for g in ["vision_encoder.onnx", "text_embedder.onnx", "decoder_prefill.onnx", "expert_stack.onnx"]:
    s = ort.InferenceSession(str(d / g), providers=["CPUExecutionProvider"])
    out[g] = {"inputs": io(s.get_inputs()), "outputs": io(s.get_outputs())}
for f in ["state_proj_weight.npy", "state_proj_bias.npy"]:
    a = np.load(d / f, allow_pickle=False)
    out[f] = [str(a.dtype), list(a.shape)]
print(json.dumps(out))
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, dir.to_str().unwrap()])
        .output()
        .expect("python3 (deploy/ci-setup.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (w, layers, kv) = (pi05::WIDTH, pi05::LAYERS, pi05::HEAD_DIM);
    let f = "tensor(float)";
    let per_layer = json!([layers, "batch", "seq", kv]);
    // The encoder's patch reshapes are written for one image, so onnxruntime infers the
    // output's batch as 1 where the seed's says "batch" (both runtimes feed one image).
    assert_eq!(
        got["vision_encoder.onnx"],
        json!({"inputs": [["pixel_values", f, ["batch", 3, 512, 512]]],
               "outputs": [["image_embeds", f, [1, 64, w]]]})
    );
    assert_eq!(
        got["text_embedder.onnx"],
        json!({"inputs": [["input_ids", "tensor(int64)", ["batch", "seq"]]],
               "outputs": [["text_embeds", f, ["batch", "seq", w]]]})
    );
    assert_eq!(
        got["decoder_prefill.onnx"],
        json!({"inputs": [["inputs_embeds", f, ["batch", "seq", w]],
                          ["attention_mask", "tensor(int64)", ["batch", "seq"]]],
               "outputs": [["vlm_k", f, per_layer], ["vlm_v", f, per_layer]]})
    );
    assert_eq!(
        got["expert_stack.onnx"],
        json!({"inputs": [["noisy_actions", f, ["batch", 50, 32]],
                          ["timestep", f, ["batch"]],
                          ["position_ids", "tensor(int64)", ["batch", 50]],
                          ["vlm_k", f, per_layer], ["vlm_v", f, per_layer],
                          ["prefix_offset", "tensor(int64)", ["batch", 1]],
                          ["kv_mask", "tensor(bool)", ["batch", "seq"]]],
               "outputs": [["velocity", f, ["batch", 50, 32]]]})
    );
    assert_eq!(got["state_proj_weight.npy"], json!(["float32", [w, 32]]));
    assert_eq!(got["state_proj_bias.npy"], json!(["float32", [w]]));
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.join(assets::SEED_CONFIG)).unwrap()).unwrap();
    assert!(cfg.get("export_kind").is_none() && cfg.get("model_type").is_none());
    assert_eq!(cfg["vlm_kv_dim"], kv);
    assert_eq!(cfg["vlm_hidden_size"], w);
    assert_eq!(cfg["decoder_prefill_onnx"], "decoder_prefill.onnx");
}
