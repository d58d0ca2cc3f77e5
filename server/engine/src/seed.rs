//! The seed tool's exports (reflex-vla 0.11.2), read as they are and mapped onto the
//! general contract ([`crate::contract`], format_version 2) in this one module.
//!
//! Its `reflex_config.json` says the layout (`export_kind` "decomposed" → the pi0.5
//! two-graph export, loop baked in or per step; "monolithic" → one `model.onnx` for pi0,
//! pi0.5 or SmolVLA). What its folder lacks — a `tokenizer.json`, lerobot's normaliser stats —
//! is found beside the graphs (`tokenizer.json`, `tokenizer/tokenizer.json`,
//! `policy_*processor*.safetensors`) or given with `--tokenizer` / `--stats`; a missing piece
//! stops the start with a message naming the file and the flag.
//!
//! Where the seed runtime's behaviour looks like a bug it is a [`SeedQuirks`] setting. `keep`
//! (the default for a seed export) reproduces the seed runtime's actions; `fix` does what
//! lerobot trains the models for. The start-up log says which is in force:
//! - decomposed pi0.5: images fed in [0, 1] (`keep`) or [−1, 1] (`fix`, as lerobot's pi0.5);
//! - monolithic: one fixed noise for every call, the primary image copied into absent
//!   cameras, no normalisation (`keep`); fresh noise per call, absent cameras filled with −1
//!   and masked off, mean/std normalisation from the stats (`fix`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::contract::{
    Absent, ActionsV2, CameraV2, DenoiseV2, EmbedGraphV2, EmbedMask, EmbedV2, ExpertMode, ExportV2,
    FORMAT_VERSION, GraphsV2, ImageV2, InstructionV2, NoisePolicy, Normalization, Range, Resize,
    StateV2, StatsV2, TimeDirection,
};

/// How to treat the seed runtime's questionable behaviour (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeedQuirks {
    /// Reproduce the seed runtime's actions (a drop-in first).
    #[default]
    Keep,
    /// Do what lerobot trains the models for.
    Fix,
}

impl std::str::FromStr for SeedQuirks {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep" => Ok(SeedQuirks::Keep),
            "fix" => Ok(SeedQuirks::Fix),
            other => Err(format!("{other:?}: expected keep or fix")),
        }
    }
}

impl SeedQuirks {
    pub fn as_str(self) -> &'static str {
        match self {
            SeedQuirks::Keep => "keep",
            SeedQuirks::Fix => "fix",
        }
    }
}

/// Files from outside the export (`--tokenizer`, `--stats`) and the quirks setting.
#[derive(Debug, Clone, Default)]
pub struct SeedOptions {
    pub tokenizer: Option<PathBuf>,
    pub stats: Option<PathBuf>,
    pub quirks: SeedQuirks,
}

/// A seed export mapped onto the contract, with the paths of its side files and what the
/// mapping decided (for the start-up log and the trace header).
#[derive(Debug, Clone)]
pub struct Mapped {
    pub spec: ExportV2,
    /// Absolute or export-relative paths of the tokenizer and stats files actually used.
    pub tokenizer_path: PathBuf,
    pub stats_path: Option<PathBuf>,
    /// One line per quirk decision, e.g. "images in [0,1] (seed runtime)".
    pub quirks: Vec<String>,
}

/// The pi0.5 camera slots of the seed's graphs, in its request order: `image` → base,
/// `image_wrist` → left wrist; the right wrist is never sent by its server.
const PI_CAMERAS: [(&str, &str, &str); 3] = [
    ("base", "img_base", "mask_base"),
    ("wrist_l", "img_wrist_l", "mask_wrist_l"),
    ("wrist_r", "img_wrist_r", "mask_wrist_r"),
];

/// Whether `cfg` is a config the seed tool wrote (no `format`; its `export_kind` or one of
/// its `model_type`s).
pub fn is_seed_config(cfg: &Value) -> bool {
    let Some(o) = cfg.as_object() else {
        return false;
    };
    !o.contains_key("format")
        && (o.contains_key("export_kind")
            || (o.contains_key("expert") && o.contains_key("vlm_kv_dim"))
            || matches!(
                o.get("model_type").and_then(Value::as_str),
                Some("pi0" | "pi05" | "pi05_decomposed" | "smolvla" | "smolvla_native")
            ))
}

/// Maps the seed tool's `reflex_config.json` (already parsed) in `dir` onto the contract.
pub fn map(dir: &Path, cfg: &Value, opts: &SeedOptions) -> Result<Mapped, String> {
    let text = |k: &str| cfg.get(k).and_then(Value::as_str);
    let num = |k: &str| cfg.get(k).and_then(Value::as_u64);
    let model_type = text("model_type").unwrap_or("unknown").to_string();
    let export_kind = text("export_kind");
    let steps = num("num_denoising_steps").unwrap_or(10) as u32;
    let quirks = opts.quirks;
    let mut notes = vec![format!("seed quirks: {}", quirks.as_str())];

    let tokenizer_path = find_tokenizer(dir, cfg, opts)?;
    let stats_path = find_stats(dir, opts);
    // Inside the export: named relative to it (the trace header and ModelInfo say
    // `tokenizer.json`, not a temporary folder); from a flag: the absolute path.
    let named = |p: &Path| -> String {
        match p.strip_prefix(dir) {
            Ok(rel) => rel.display().to_string(),
            Err(_) => std::path::absolute(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string(),
        }
    };
    let stats_dims = match &stats_path {
        Some(p) => Some(stats_dims(p)?),
        None => None,
    };

    let spec = match export_kind {
        Some("decomposed") => {
            let dec = cfg
                .get("decomposed")
                .ok_or("export_kind \"decomposed\" without a `decomposed` block")?;
            let dtext = |k: &str| dec.get(k).and_then(Value::as_str);
            let per_step = dec
                .get("per_step_expert")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let takes_state = dec
                .get("expert_takes_state")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                || dtext("variant") == Some("state_out");
            let (state_dim, action_dim) = stats_dims.ok_or_else(|| {
                missing_stats(
                    dir,
                    "the seed's pi0.5 server de-normalises actions with them",
                )
            })?;
            let range = match quirks {
                SeedQuirks::Keep => {
                    notes.push("images fed in [0,1], as the seed runtime does (lerobot trains pi0.5 on [-1,1]; --seed-quirks fix)".into());
                    Range::Unit
                }
                SeedQuirks::Fix => {
                    notes.push("images fed in [-1,1], as lerobot trains pi0.5 (the seed runtime feeds [0,1])".into());
                    Range::Signed
                }
            };
            ExportV2 {
                format: "reflex-export".into(),
                format_version: FORMAT_VERSION,
                model_type: "pi05".into(),
                export_kind: "decomposed".into(),
                graphs: GraphsV2 {
                    prefix: Some(dtext("vlm_prefix_onnx").unwrap_or("vlm_prefix.onnx").into()),
                    expert: dtext("expert_denoise_onnx")
                        .unwrap_or("expert_denoise.onnx")
                        .into(),
                },
                cameras: pi_cameras(true),
                image: ImageV2 {
                    resize: Resize::PadSquare,
                    range,
                    absent: Absent::Fill,
                    absent_fill: -1.0,
                    ..ImageV2::default()
                },
                instruction: InstructionV2 {
                    tokenizer: named(&tokenizer_path),
                    template: "Task: {instruction};\nAction: ".into(),
                    add_special_tokens: true,
                    tokens_input: "lang_tokens".into(),
                    mask_input: Some("lang_masks".into()),
                    pad_id: 0,
                    clean: true,
                },
                state: StateV2 {
                    dim: state_dim,
                    input: takes_state.then(|| "state".into()),
                    normalization: Normalization::MeanStd,
                },
                actions: ActionsV2 {
                    dim: action_dim,
                    normalization: Normalization::MeanStd,
                },
                stats: stats_path
                    .as_ref()
                    .map(|p| StatsV2::File { file: named(p) }),
                denoise: if per_step {
                    per_step_expert(steps, ["x_t", "t", "v_t"], None)
                } else {
                    baked(steps)
                },
                noise: NoisePolicy::PerCall,
                embed: None,
            }
        }
        Some("monolithic") => {
            let smolvla = model_type == "smolvla";
            let takes_state = model_type == "pi0" || smolvla;
            let graph_width = num("action_dim").unwrap_or(32) as usize;
            let max_state = num("max_state_dim").unwrap_or(32) as usize;
            let (state_dim, action_dim, normalization) = unnormalised_unless_fixed(
                dir,
                quirks,
                stats_dims,
                (max_state, graph_width),
                "the seed's monolithic servers",
                &mut notes,
            )?;
            let (absent, noise) = match quirks {
                SeedQuirks::Keep => {
                    notes.push("the primary image is copied into absent cameras and one fixed noise (seed 0) serves every call that sends no noise_seed, as the seed's monolithic servers do".into());
                    (Absent::CopyPrimary, NoisePolicy::Fixed)
                }
                SeedQuirks::Fix => {
                    notes.push(
                        "absent cameras filled with -1 and masked off; fresh noise per call".into(),
                    );
                    (Absent::Fill, NoisePolicy::PerCall)
                }
            };
            ExportV2 {
                format: "reflex-export".into(),
                format_version: FORMAT_VERSION,
                model_type: model_type.clone(),
                export_kind: "monolithic".into(),
                graphs: GraphsV2 {
                    prefix: None,
                    expert: "model.onnx".into(),
                },
                cameras: if smolvla {
                    (1..=3)
                        .map(|i| CameraV2 {
                            name: format!("cam{i}"),
                            input: format!("img_cam{i}"),
                            mask: Some(format!("mask_cam{i}")),
                        })
                        .collect()
                } else {
                    pi_cameras(true)
                },
                image: ImageV2 {
                    resize: Resize::Stretch,
                    range: Range::Signed,
                    absent,
                    absent_fill: -1.0,
                    ..ImageV2::default()
                },
                instruction: InstructionV2 {
                    tokenizer: named(&tokenizer_path),
                    template: "{instruction}".into(),
                    add_special_tokens: true,
                    tokens_input: "lang_tokens".into(),
                    mask_input: Some("lang_masks".into()),
                    pad_id: 0,
                    clean: false,
                },
                state: StateV2 {
                    dim: state_dim,
                    input: takes_state.then(|| "state".into()),
                    normalization,
                },
                actions: ActionsV2 {
                    dim: action_dim,
                    normalization,
                },
                stats: stats_path
                    .as_ref()
                    .map(|p| StatsV2::File { file: named(p) }),
                denoise: baked(steps),
                noise,
                embed: None,
            }
        }
        None => four_graph(
            dir,
            cfg,
            quirks,
            stats_dims,
            &mut notes,
            named(&tokenizer_path),
            stats_path
                .as_ref()
                .map(|p| StatsV2::File { file: named(p) }),
        )?,
        Some(other) => return Err(format!("unknown seed export_kind {other:?}")),
    };
    Ok(Mapped {
        spec,
        tokenizer_path,
        stats_path,
        quirks: notes,
    })
}

/// The seed servers that normalise nothing (monolithic, SmolVLA four-graph): `keep` feeds
/// the raw state and returns the graph's actions (widths from the stats when there are any,
/// else `graph_widths`); `fix` normalises both with the stats' mean/std, which it then needs.
/// Returns (state dim, action dim, normalisation).
fn unnormalised_unless_fixed(
    dir: &Path,
    quirks: SeedQuirks,
    stats_dims: Option<(usize, usize)>,
    graph_widths: (usize, usize),
    server: &str,
    notes: &mut Vec<String>,
) -> Result<(usize, usize, Normalization), String> {
    match (quirks, stats_dims) {
        (SeedQuirks::Keep, dims) => {
            notes.push(format!(
                "no state/action normalisation, as {server} (--seed-quirks fix uses the stats)"
            ));
            let (s, a) = dims.unwrap_or(graph_widths);
            Ok((s, a, Normalization::None))
        }
        (SeedQuirks::Fix, Some((s, a))) => {
            notes.push("state and actions normalised with the stats' mean/std".into());
            Ok((s, a, Normalization::MeanStd))
        }
        (SeedQuirks::Fix, None) => Err(missing_stats(
            dir,
            "--seed-quirks fix normalises state and actions with them",
        )),
    }
}

/// The seed's per-step experts: `[x, t, velocity]` by name (and the action positions the
/// four-graph expert takes), t from 1 to 0; the runtime runs the loop.
fn per_step_expert(steps: u32, [x, t, v]: [&str; 3], positions: Option<&str>) -> DenoiseV2 {
    DenoiseV2 {
        expert: ExpertMode::PerStep,
        steps,
        time: TimeDirection::OneToZero,
        method: "euler".into(),
        noise_input: None,
        actions_output: None,
        x_input: Some(x.into()),
        t_input: Some(t.into()),
        velocity_output: Some(v.into()),
        positions_input: positions.map(Into::into),
    }
}

fn baked(steps: u32) -> DenoiseV2 {
    DenoiseV2 {
        expert: ExpertMode::Baked,
        steps,
        time: TimeDirection::OneToZero,
        method: "euler".into(),
        noise_input: Some("noise".into()),
        actions_output: Some("actions".into()),
        x_input: None,
        t_input: None,
        velocity_output: None,
        positions_input: None,
    }
}

/// The seed tool's older SmolVLA export (no `export_kind`; `reflex/runtime/server.py`'s
/// `ReflexServer` with `vlm_orchestrator.py`): `vision_encoder.onnx` per image,
/// `text_embedder.onnx`, the state through `state_proj_{weight,bias}.npy`, the prefix
/// `[image·s, text·s, state]` (s = √`vlm_hidden_size`) into `decoder_prefill.onnx`, then
/// `expert_stack.onnx` one step per call, t from 1 to 0.
///
/// Its runtime, reproduced under `keep`: one camera (its /act passes one image); the instruction
/// tokenized as is, padded to 32; the prefill mask 0 for image and text, 1 for the state;
/// the expert's `kv_mask` all true; images resized to the graph's size in [−1, 1]; state
/// and actions not normalised. `fix`: three cameras (absent ones filled with −1), the
/// masks true for present cameras, real tokens and the state, mean/std normalisation.
fn four_graph(
    dir: &Path,
    cfg: &Value,
    quirks: SeedQuirks,
    stats_dims: Option<(usize, usize)>,
    notes: &mut Vec<String>,
    tokenizer: String,
    stats: Option<StatsV2>,
) -> Result<ExportV2, String> {
    let text = |k: &str, default: &'static str| -> String {
        cfg.get(k)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let num = |k: &str| cfg.get(k).and_then(Value::as_u64);
    let vision = text("vlm_prefix_onnx", "vision_encoder.onnx");
    let prefill = text("decoder_prefill_onnx", "decoder_prefill.onnx");
    let embedder = text("text_embedder_onnx", "text_embedder.onnx");
    for f in [
        &vision,
        &prefill,
        &embedder,
        &"expert_stack.onnx".to_string(),
    ] {
        if !dir.join(f).is_file() {
            return Err(format!(
                "this seed-tool export (no export_kind: the SmolVLA four-graph layout) has no {}: its runtime would serve noise-only actions without it; export the VLM pipeline too (`reflex export` of a SmolVLA checkpoint writes vision_encoder.onnx, text_embedder.onnx, decoder_prefill.onnx)",
                dir.join(f).display()
            ));
        }
    }
    if !dir.join("state_proj_weight.npy").is_file() {
        return Err(format!(
            "{} is missing: the seed runtime would project the state with random weights; it is written by `reflex export` from the checkpoint's state_proj",
            dir.join("state_proj_weight.npy").display()
        ));
    }
    // The orchestrator's hidden size: vlm_hidden_size, else vlm_kv_dim (its fallback), else 960.
    let hidden = num("vlm_hidden_size")
        .or_else(|| num("vlm_kv_dim"))
        .unwrap_or(960);
    let steps = num("num_denoising_steps").unwrap_or(10) as u32;
    let graph_width = num("action_dim").unwrap_or(32) as usize;
    let (state_dim, action_dim, normalization) = unnormalised_unless_fixed(
        dir,
        quirks,
        stats_dims,
        (32, graph_width),
        "the seed's SmolVLA server",
        notes,
    )?;
    let (cameras, mask) = match quirks {
        SeedQuirks::Keep => {
            notes.push("one camera; prefill mask 0 for images and text and 1 for the state, expert kv_mask all true, as the seed runtime feeds them (--seed-quirks fix masks padding instead)".into());
            (1, EmbedMask::Seed)
        }
        SeedQuirks::Fix => {
            notes.push("three cameras (absent ones filled with -1 and masked off); masks true for present cameras, real tokens and the state".into());
            (3, EmbedMask::Valid)
        }
    };
    Ok(ExportV2 {
        format: "reflex-export".into(),
        format_version: FORMAT_VERSION,
        model_type: "smolvla".into(),
        export_kind: "decomposed".into(),
        graphs: GraphsV2 {
            prefix: Some(prefill),
            expert: "expert_stack.onnx".into(),
        },
        cameras: (1..=cameras)
            .map(|i| CameraV2 {
                name: format!("cam{i}"),
                input: "pixel_values".into(),
                mask: None,
            })
            .collect(),
        image: ImageV2 {
            resize: Resize::Stretch,
            range: Range::Signed,
            absent: Absent::Fill,
            absent_fill: -1.0,
            ..ImageV2::default()
        },
        instruction: InstructionV2 {
            tokenizer,
            template: "{instruction}".into(),
            add_special_tokens: true,
            tokens_input: "input_ids".into(),
            mask_input: None,
            pad_id: 0,
            clean: false,
        },
        state: StateV2 {
            dim: state_dim,
            input: None,
            normalization,
        },
        actions: ActionsV2 {
            dim: action_dim,
            normalization,
        },
        stats,
        denoise: per_step_expert(
            steps,
            ["noisy_actions", "timestep", "velocity"],
            Some("position_ids"),
        ),
        noise: NoisePolicy::PerCall,
        embed: Some(EmbedV2 {
            image: EmbedGraphV2 {
                graph: vision,
                input: "pixel_values".into(),
                output: "image_embeds".into(),
            },
            text: EmbedGraphV2 {
                graph: embedder,
                input: "input_ids".into(),
                output: "text_embeds".into(),
            },
            tokens: 32,
            state_weight: "state_proj_weight.npy".into(),
            state_bias: dir
                .join("state_proj_bias.npy")
                .is_file()
                .then(|| "state_proj_bias.npy".into()),
            scale: (hidden as f32).sqrt(),
            embeds_input: "inputs_embeds".into(),
            mask_input: "attention_mask".into(),
            mask,
            offset_input: Some("prefix_offset".into()),
            kv_mask_input: Some("kv_mask".into()),
        }),
    })
}

fn pi_cameras(masks: bool) -> Vec<CameraV2> {
    PI_CAMERAS
        .iter()
        .map(|(name, input, mask)| CameraV2 {
            name: (*name).into(),
            input: (*input).into(),
            mask: masks.then(|| (*mask).into()),
        })
        .collect()
}

fn find_tokenizer(dir: &Path, cfg: &Value, opts: &SeedOptions) -> Result<PathBuf, String> {
    if let Some(p) = &opts.tokenizer {
        return if p.is_file() {
            Ok(p.clone())
        } else {
            Err(format!("--tokenizer {}: no such file", p.display()))
        };
    }
    let mut candidates = vec![
        dir.join("tokenizer.json"),
        dir.join("tokenizer/tokenizer.json"),
    ];
    // The seed's monolithic exports name their bundled tokenizer folder; only a plain name
    // inside the export is followed.
    if let Some(rel) = cfg.get("tokenizer_path").and_then(Value::as_str)
        && crate::contract::plain_file_name(rel)
    {
        candidates.push(dir.join(rel).join("tokenizer.json"));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        format!(
            "this seed-tool export has no tokenizer: put the model's HuggingFace tokenizer.json at {} or give --tokenizer FILE",
            dir.join("tokenizer.json").display()
        )
    })
}

/// `--stats`, else the first `policy_*processor*.safetensors` beside the graphs (the
/// pre-processor's first: it holds the state's statistics too).
fn find_stats(dir: &Path, opts: &SeedOptions) -> Option<PathBuf> {
    if let Some(p) = &opts.stats {
        return Some(p.clone());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("policy_") && n.contains("processor") && n.ends_with(".safetensors")
            })
        })
        .collect();
    found.sort_by_key(|p| {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        (!name.contains("preprocessor"), name)
    });
    found.into_iter().next()
}

fn missing_stats(dir: &Path, why: &str) -> String {
    format!(
        "this seed-tool export has no normaliser statistics ({why}): put lerobot's policy_preprocessor_step_*_normalizer_processor.safetensors in {} or give --stats FILE",
        dir.display()
    )
}

/// The robot's state and action widths, from the stats' `observation.state.mean` and
/// `action.mean`.
fn stats_dims(path: &Path) -> Result<(usize, usize), String> {
    let stats = crate::vla::read_stats_file(path)?;
    let len = |k: &str| {
        stats
            .get(k)
            .map(Vec::len)
            .ok_or_else(|| format!("{}: no tensor {k:?}", path.display()))
    };
    Ok((len("observation.state.mean")?, len("action.mean")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{self, Kind};

    #[test]
    fn every_seed_fixture_maps_onto_a_valid_contract() {
        for kind in Kind::ALL.into_iter().filter(|k| k.variant().is_some()) {
            let d = tempfile::tempdir().unwrap();
            fixtures::write(kind, d.path(), 0).unwrap();
            let cfg: Value = serde_json::from_slice(
                &std::fs::read(d.path().join("reflex_config.json")).unwrap(),
            )
            .unwrap();
            assert!(is_seed_config(&cfg));
            let m = map(d.path(), &cfg, &SeedOptions::default()).unwrap();
            m.spec.validate().unwrap();
            assert_eq!(m.spec.state.dim, fixtures::assets::ROBOT_STATE_DIM);
            assert_eq!(m.spec.actions.dim, fixtures::assets::ROBOT_ACTION_DIM);
            assert_eq!(
                m.spec.denoise.expert == ExpertMode::PerStep,
                matches!(kind, Kind::Pi05PerStep | Kind::SmolvlaFourGraph)
            );
        }
    }

    #[test]
    fn a_missing_tokenizer_or_stats_names_the_file_and_the_flag() {
        let d = tempfile::tempdir().unwrap();
        fixtures::write(Kind::Pi05, d.path(), 0).unwrap();
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(d.path().join("reflex_config.json")).unwrap())
                .unwrap();
        std::fs::remove_file(d.path().join("tokenizer.json")).unwrap();
        let err = map(d.path(), &cfg, &SeedOptions::default()).unwrap_err();
        assert!(
            err.contains("tokenizer.json") && err.contains("--tokenizer"),
            "{err}"
        );
        let elsewhere = tempfile::tempdir().unwrap();
        let tok = elsewhere.path().join("paligemma.json");
        std::fs::write(&tok, fixtures::assets::tokenizer_json().to_string()).unwrap();
        let opts = SeedOptions {
            tokenizer: Some(tok.clone()),
            ..Default::default()
        };
        assert_eq!(map(d.path(), &cfg, &opts).unwrap().tokenizer_path, tok);
        std::fs::remove_file(d.path().join(fixtures::assets::STATS_FILE)).unwrap();
        let err = map(d.path(), &cfg, &opts).unwrap_err();
        assert!(
            err.contains("normalizer") && err.contains("--stats"),
            "{err}"
        );
    }
}

/// `numpy.random.RandomState(seed).randn(n).astype(float32)`: numpy's legacy MT19937 and its
/// polar Box–Muller (`legacy_gauss`, the second value of each pair first). The seed tool's
/// monolithic servers draw their one fixed noise this way (`RandomState(0)`), so with
/// `--seed-quirks keep` the same noise, and the same actions, come out here.
pub fn numpy_legacy_randn(seed: u32, n: usize) -> Vec<f32> {
    let mut mt = Mt19937::new(seed);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (x1, x2, r2) = loop {
            let x1 = 2.0 * mt.next_f64() - 1.0;
            let x2 = 2.0 * mt.next_f64() - 1.0;
            let r2 = x1 * x1 + x2 * x2;
            if r2 < 1.0 && r2 != 0.0 {
                break (x1, x2, r2);
            }
        };
        let f = (-2.0 * r2.ln() / r2).sqrt();
        out.push((f * x2) as f32);
        out.push((f * x1) as f32);
    }
    out.truncate(n);
    out
}

/// The Mersenne Twister MT19937 (Matsumoto & Nishimura), seeded as numpy's legacy
/// `RandomState(int)` seeds it (`init_genrand`).
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.state[i] = v;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// 53-bit double in [0, 1) (`genrand_res53`).
    fn next_f64(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) / 9_007_199_254_740_992.0
    }
}

#[cfg(test)]
mod numpy_tests {
    #[test]
    fn legacy_randn_is_numpys() {
        // python3 -c "import numpy as np; print(np.random.RandomState(0).randn(6).astype(np.float32))"
        let want = [
            1.7640524f32,
            0.4001572,
            0.978738,
            2.2408931,
            1.867558,
            -0.9772779,
        ];
        let got = super::numpy_legacy_randn(0, 6);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        // RandomState(7).randn(3)
        let got = super::numpy_legacy_randn(7, 3);
        for (g, w) in got.iter().zip([1.6905257f32, -0.465_937_38, 0.032_820_17]) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        // The last three of RandomState(0).randn(1, 50, 32): past several twists of the state.
        let got = super::numpy_legacy_randn(0, 1600);
        for (g, w) in got[1597..]
            .iter()
            .zip([1.4121517f32, -1.3804307, -0.535_914_54])
        {
            assert!((g - w).abs() < 1e-6, "{:?}", &got[1597..]);
        }
    }
}
