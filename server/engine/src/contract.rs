//! reflex-export **format_version 2**: the general export contract for flow-matching VLAs.
//!
//! A v2 `reflex_config.json` describes a decomposed or monolithic export by the *names* of
//! its graphs' inputs and outputs, so a pi0, pi0.5 or SmolVLA export of any size serves
//! without code changes. Shapes and dtypes are read from the graphs at load and checked
//! against what the config says ([`crate::vla`]); the seed tool's own configs are mapped onto
//! this contract by [`crate::seed`].
//!
//! ```json
//! {
//!   "format": "reflex-export", "format_version": 2,
//!   "model_type": "pi05", "export_kind": "decomposed",
//!   "graphs": {"prefix": "vlm_prefix.onnx", "expert": "expert_denoise.onnx"},
//!   "cameras": [
//!     {"name": "base", "input": "img_base", "mask": "mask_base"},
//!     {"name": "wrist_l", "input": "img_wrist_l", "mask": "mask_wrist_l"}],
//!   "image": {"resize": "pad_square", "range": "unit", "absent": "fill", "absent_fill": -1.0},
//!   "instruction": {"tokenizer": "tokenizer.json", "template": "Task: {instruction};\nAction: ",
//!                   "tokens_input": "lang_tokens", "mask_input": "lang_masks", "pad_id": 0},
//!   "state": {"dim": 8, "input": null, "normalization": "mean_std"},
//!   "actions": {"dim": 7, "normalization": "mean_std"},
//!   "stats": {"file": "policy_preprocessor_step_2_normalizer_processor.safetensors"},
//!   "denoise": {"expert": "baked", "steps": 10, "time": "one_to_zero",
//!               "noise_input": "noise", "actions_output": "actions"},
//!   "noise": "per_call"
//! }
//! ```
//!
//! - **graphs**: `prefix` (absent for a monolithic export) runs once per new observation; every
//!   one of its outputs that the expert graph takes as an input (by name: the KV cache of every
//!   layer, pad masks) is handed over as an opaque list of tensors, never reshaped or copied by
//!   the server. External `*.data` files are loaded beside their graph and covered by
//!   `model_hash`.
//! - **cameras**: in request order (the first is the primary camera, required); `input` is the
//!   graph input taking `[1, 3, H, W]`, `mask` an optional bool input saying whether the camera
//!   was present. H and W are read from the graph.
//! - **image**: `resize` `stretch` (any size, resized to H×W), `pad_square` (centred black pad to
//!   a square, then resized: what lerobot and the seed tool do), or `exact`; `range` `unit`
//!   ([0, 1]), `signed` ([−1, 1]) or `mean_std` (with `mean`/`std` per channel, on [0, 1]);
//!   `channels` `rgb` or `bgr`; an absent camera is `fill`ed with `absent_fill` (mask off) or
//!   gets a `copy_primary` of the primary frame (mask on).
//! - **instruction**: a HuggingFace `tokenizer.json` (in the export, or given with
//!   `--tokenizer`), the `template` with `{instruction}` in it, special tokens (BOS) as the
//!   tokenizer's post-processor adds them, truncated and right-padded with `pad_id` to the
//!   graph's token length; `mask_input` gets true for real tokens.
//! - **state**: the robot's `dim`; when the graph takes one (`input`), normalised and padded
//!   with zeros to the graph's width. **actions**: the robot's `dim`, sliced from the graph's
//!   padded width and de-normalised. `normalization`: `mean_std` (`(x − mean)/(std + 1e-8)`),
//!   `quantile` (q01/q99 to [−1, 1], as lerobot trains pi0.5) or `none`. **stats**: lerobot's
//!   normaliser safetensors (`observation.state.*`, `action.*`) by `file`, or inline JSON
//!   (`{"state": {"mean": […], "std": […]}, "actions": {…}}`, `q01`/`q99` for quantile).
//! - **denoise**: the expert `baked` (the Euler loop in the graph: `noise_input` →
//!   `actions_output`) or `per_step` (`x_input`, `t_input` → `velocity_output`; the server runs
//!   the loop); `steps`; `time` `one_to_zero` (t = 1 → 0, dt = −1/N: pi0/pi0.5) or
//!   `zero_to_one`; step k runs at `t = t₀ + k·dt` (computed in f64, fed as f32, as the seed
//!   runtime's loop) and updates `x ← x + dt·v` in f32.
//! - **embed** (optional): the prefix graph takes embeddings the server assembles, as the
//!   seed tool's SmolVLA four-graph export needs: each camera through an image graph, the
//!   tokens through a text graph (`tokens` long), the state through a linear projection
//!   (`.npy` weight `[D, W]`, bias `[D]`), `[images·scale, text·scale, state]` into
//!   `embeds_input` with `mask_input` (`seed`: 0 for images and text, 1 for the state, as
//!   the seed runtime feeds it; `valid`: 1 for present cameras, real tokens and the state);
//!   the expert gets the prefix length (`offset_input`), the prefix mask (`kv_mask_input`,
//!   all true under `seed`) and the action positions (`denoise.positions_input`). Symbolic
//!   graph axes (`batch`, `seq`) are pinned at load to 1 and to these lengths.
//! - **noise**: `per_call` (drawn from the call's seed, as for every reflex export) or `fixed`
//!   (numpy's `RandomState(seed).randn`, seed 0 when the call sends none: the seed tool's
//!   monolithic servers' one noise for every call). A request may carry its own `noise`
//!   tensor instead.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// `format_version` of this contract.
pub const FORMAT_VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportV2 {
    /// Always "reflex-export".
    pub format: String,
    pub format_version: u32,
    pub model_type: String,
    /// "decomposed" (prefix + expert graphs) or "monolithic" (one graph).
    pub export_kind: String,
    pub graphs: GraphsV2,
    pub cameras: Vec<CameraV2>,
    #[serde(default)]
    pub image: ImageV2,
    pub instruction: InstructionV2,
    pub state: StateV2,
    pub actions: ActionsV2,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<StatsV2>,
    pub denoise: DenoiseV2,
    #[serde(default)]
    pub noise: NoisePolicy,
    /// The prefix graph's input embeddings assembled by the server from per-piece graphs
    /// (the seed tool's SmolVLA four-graph export); absent when the prefix graph takes the
    /// images and tokens itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed: Option<EmbedV2>,
}

/// One graph of the embedding stage: its input and output by name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmbedGraphV2 {
    pub graph: String,
    pub input: String,
    pub output: String,
}

/// The prefix mask rule of an assembled prefix.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum EmbedMask {
    /// What the seed runtime feeds: the prefix graph's mask 0 for every image and text
    /// token and 1 for the state token; the expert's KV mask true everywhere.
    Seed,
    /// 1 (true) for the tokens of present cameras, real (unpadded) text tokens and the
    /// state token, in both masks.
    #[default]
    Valid,
}

/// How the server assembles the prefix graph's input (`graphs.prefix` then takes
/// `embeds_input` f32 `[1, L, D]` and `mask_input` i64 `[1, L]`):
/// `[image(camera₁)·scale, …, text(tokens)·scale, state·Wᵀ + b]`, L = cameras·N + T + 1.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmbedV2 {
    /// One camera `[1, 3, H, W]` → `[1, N, D]`, run once per camera.
    pub image: EmbedGraphV2,
    /// Token ids i64 `[1, T]` → `[1, T, D]`.
    pub text: EmbedGraphV2,
    /// T, the instruction's token length (the text graph's is symbolic).
    pub tokens: usize,
    /// The state token's projection: `.npy` f32 `[D, W]` (W the padded state width) and an
    /// optional bias f32 `[D]`.
    pub state_weight: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_bias: Option<String>,
    /// Factor on the image and text embeddings (the seed runtime's √hidden).
    pub scale: f32,
    pub embeds_input: String,
    pub mask_input: String,
    #[serde(default)]
    pub mask: EmbedMask,
    /// Expert input i64 `[1, 1]` the server fills with L.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset_input: Option<String>,
    /// Expert input bool `[1, L]`: the prefix positions the expert may attend to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_mask_input: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GraphsV2 {
    /// Images + instruction → the prefix tensors; absent for a monolithic export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The expert (decomposed) or the whole model (monolithic).
    pub expert: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CameraV2 {
    pub name: String,
    /// Graph input `[1, 3, H, W]`.
    pub input: String,
    /// Graph input bool `[1]`: the camera was present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    #[default]
    Stretch,
    PadSquare,
    Exact,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Range {
    #[default]
    Unit,
    Signed,
    MeanStd,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Channels {
    #[default]
    Rgb,
    Bgr,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Absent {
    #[default]
    Fill,
    CopyPrimary,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageV2 {
    #[serde(default)]
    pub resize: Resize,
    #[serde(default)]
    pub range: Range,
    /// Per channel, on [0, 1], for `range: mean_std`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<[f32; 3]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<[f32; 3]>,
    #[serde(default)]
    pub channels: Channels,
    #[serde(default)]
    pub absent: Absent,
    /// Value of every pixel of an absent camera with `absent: fill`.
    #[serde(default = "minus_one")]
    pub absent_fill: f32,
}

fn minus_one() -> f32 {
    -1.0
}

impl Default for ImageV2 {
    fn default() -> Self {
        ImageV2 {
            resize: Resize::default(),
            range: Range::default(),
            mean: None,
            std: None,
            channels: Channels::default(),
            absent: Absent::default(),
            absent_fill: minus_one(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstructionV2 {
    /// A HuggingFace `tokenizer.json`: a file name inside the export, or a path given by
    /// `--tokenizer` (the seed mapping fills it in).
    pub tokenizer: String,
    /// Contains `{instruction}`; `"{instruction}"` feeds the instruction as is.
    #[serde(default = "plain_template")]
    pub template: String,
    /// Add the tokenizer's special tokens (BOS) as its post-processor says.
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
    /// Graph input i64 `[1, T]`.
    pub tokens_input: String,
    /// Graph input bool `[1, T]`: true for real tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_input: Option<String>,
    #[serde(default)]
    pub pad_id: u32,
    /// Clean the instruction first as lerobot's pi0.5 processor and the seed runtime do:
    /// trim, `_` and newlines to spaces.
    #[serde(default)]
    pub clean: bool,
}

fn plain_template() -> String {
    "{instruction}".into()
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    #[default]
    MeanStd,
    Quantile,
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StateV2 {
    /// The robot's state width (what a request's `state` holds).
    pub dim: usize,
    /// Graph input f32 `[1, W]`, W ≥ dim; absent when the model takes no state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    #[serde(default)]
    pub normalization: Normalization,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActionsV2 {
    /// The robot's action width, ≤ the graph's padded width.
    pub dim: usize,
    #[serde(default)]
    pub normalization: Normalization,
}

/// Where the normaliser statistics come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum StatsV2 {
    /// lerobot's normaliser safetensors: a file name inside the export, or a `--stats` path.
    File { file: String },
    Inline {
        state: StatsVectors,
        actions: StatsVectors,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct StatsVectors {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q01: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q99: Option<Vec<f32>>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExpertMode {
    /// The Euler loop is inside the graph: `noise` in, `actions` out.
    Baked,
    /// One step per call: `x_t`, `t` in, the velocity out; the server runs the loop.
    PerStep,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimeDirection {
    /// t = 1 → 0 (pi0, pi0.5 as lerobot and openpi train them).
    #[default]
    OneToZero,
    ZeroToOne,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DenoiseV2 {
    pub expert: ExpertMode,
    /// Euler steps (for `baked`: the steps unrolled in the graph, as reported).
    pub steps: u32,
    #[serde(default)]
    pub time: TimeDirection,
    /// Only "euler".
    #[serde(default = "euler")]
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_input: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions_output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_input: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t_input: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub velocity_output: Option<String>,
    /// Expert input i64 `[1, chunk]` the server fills with the action positions 0..chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions_input: Option<String>,
}

fn euler() -> String {
    "euler".into()
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum NoisePolicy {
    /// From the call's seed (fresh, or the request's `noise_seed`).
    #[default]
    PerCall,
    /// The seed tool's monolithic servers: numpy's `RandomState(seed).randn`, seed 0 for every
    /// call that brings no `noise_seed` — one fixed noise for every call, the seed runtime's
    /// very numbers (`seed::numpy_legacy_randn`). Seeds are below 2³², as numpy's.
    Fixed,
}

/// A plain file name inside the export directory, never a path out of it.
pub fn plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('/')
        && !name.contains('\\')
        && !name.starts_with('.')
        && Path::new(name).file_name().is_some()
}

impl ExportV2 {
    /// Checks what needs no graph: names, sizes, the pieces each mode needs.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != "reflex-export" || self.format_version != FORMAT_VERSION {
            return Err(format!(
                "unsupported export format {:?} v{}",
                self.format, self.format_version
            ));
        }
        match (self.export_kind.as_str(), &self.graphs.prefix) {
            ("decomposed", Some(_)) | ("monolithic", None) => {}
            ("decomposed", None) => return Err("a decomposed export needs graphs.prefix".into()),
            ("monolithic", Some(_)) => {
                return Err("a monolithic export has no graphs.prefix".into());
            }
            (k, _) => {
                return Err(format!(
                    "export_kind {k:?} is not one of: decomposed, monolithic"
                ));
            }
        }
        for g in self.graphs.prefix.iter().chain([&self.graphs.expert]) {
            if !plain_file_name(g) {
                return Err(format!("graph file name {g:?} must be a plain file name"));
            }
        }
        if self.cameras.is_empty() || self.cameras.len() > 8 {
            return Err("`cameras` must list 1 to 8 cameras".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.cameras {
            if c.name.is_empty() || !seen.insert(&c.name) {
                return Err(format!(
                    "camera names must be non-empty and unique (got {:?})",
                    c.name
                ));
            }
        }
        if self.image.range == Range::MeanStd {
            match (&self.image.mean, &self.image.std) {
                (Some(_), Some(s)) if s.iter().all(|v| v.is_finite() && *v > 0.0) => {}
                _ => {
                    return Err(
                        "image.range mean_std needs image.mean and image.std (std > 0)".into(),
                    );
                }
            }
        }
        if !self.image.absent_fill.is_finite() {
            return Err("image.absent_fill must be finite".into());
        }
        if !self.instruction.template.contains("{instruction}") {
            return Err("instruction.template must contain {instruction}".into());
        }
        let dims_ok = |n: usize| (1..=4096).contains(&n);
        if !(dims_ok(self.state.dim) && dims_ok(self.actions.dim)) {
            return Err("state.dim and actions.dim must be within 1..=4096".into());
        }
        let d = &self.denoise;
        if d.method != "euler" || !(1..=1000).contains(&d.steps) {
            return Err("denoise must be method \"euler\" with steps 1..=1000".into());
        }
        let need = |v: &Option<String>, what: &str| -> Result<(), String> {
            v.as_ref()
                .map(|_| ())
                .ok_or_else(|| format!("denoise.expert {:?} needs denoise.{what}", d.expert))
        };
        match d.expert {
            ExpertMode::Baked => {
                need(&d.noise_input, "noise_input")?;
                need(&d.actions_output, "actions_output")?;
            }
            ExpertMode::PerStep => {
                if self.export_kind == "monolithic" {
                    return Err(
                        "a monolithic export has the loop in its graph (expert baked)".into(),
                    );
                }
                need(&d.x_input, "x_input")?;
                need(&d.t_input, "t_input")?;
                need(&d.velocity_output, "velocity_output")?;
            }
        }
        if let Some(e) = &self.embed {
            if self.export_kind != "decomposed" {
                return Err(
                    "`embed` assembles a prefix graph's input: export_kind decomposed".into(),
                );
            }
            for f in [&e.image.graph, &e.text.graph, &e.state_weight]
                .into_iter()
                .chain(e.state_bias.as_ref())
            {
                if !plain_file_name(f) {
                    return Err(format!("embed file name {f:?} must be a plain file name"));
                }
            }
            if self
                .cameras
                .iter()
                .any(|c| c.mask.is_some() || c.input != e.image.input)
            {
                return Err(format!(
                    "with `embed`, every camera's input is the image graph's ({:?}) and has no mask: the prefix mask covers absent cameras",
                    e.image.input
                ));
            }
            if e.tokens == 0 || e.tokens > 4096 || !e.scale.is_finite() {
                return Err("embed.tokens must be 1..=4096 and embed.scale finite".into());
            }
            if self.state.input.is_some() {
                return Err(
                    "with `embed` the state is the prefix's last token: state.input must be absent"
                        .into(),
                );
            }
        }
        let takes_state = self.state.input.is_some() || self.embed.is_some();
        let uses_stats = self.actions.normalization != Normalization::None
            || (takes_state && self.state.normalization != Normalization::None);
        if uses_stats && self.stats.is_none() {
            return Err(
                "normalization is on but `stats` is missing (a file or inline vectors)".into(),
            );
        }
        Ok(())
    }
}
