//! `reflex_config.json`: what an export directory holds and how to hash it.
//!
//! `config_hash` = first 16 hex of SHA-256 over the canonical config JSON
//! (keys sorted, compact). `model_hash` = first 16 hex of SHA-256 over every
//! file the model reads, taken in sorted relative-path order, each fed as
//! `path bytes, 0x00, u64-LE length, file bytes` so no two layouts collide.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Name of the config file inside an export directory.
pub const CONFIG_FILE: &str = "reflex_config.json";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("export directory {0} has no {CONFIG_FILE}")]
    Missing(PathBuf),
    // `error`, not `source`: the message already says it, and a chained source is printed
    // a second time by `{:#}` (anyhow) in the command's error line.
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a valid reflex config: {error}")]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Always "reflex-export".
    pub format: String,
    pub format_version: u32,
    pub model_type: String,
    pub export_kind: String,
    /// Camera names; the first is the primary camera and is required.
    pub cameras: Vec<String>,
    pub image: ImageConfig,
    pub instruction: InstructionConfig,
    pub state_dim: usize,
    pub action_dim: usize,
    pub chunk_size: usize,
    pub prefix_dim: usize,
    pub denoise: DenoiseConfig,
    pub normalization: Normalization,
    pub graphs: Graphs,
    /// Weight seed the reference export was generated from (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_seed: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    pub height: u32,
    pub width: u32,
    /// Per-channel (RGB) mean and std applied to pixel/255.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// "resize": any input size is resized; "exact": other sizes are refused.
    pub resize: ResizePolicy,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ResizePolicy {
    Resize,
    Exact,
    /// Centred black padding to a square, then resized (lerobot's `resize_with_pad`).
    PadSquare,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstructionConfig {
    /// Only "word-hash-v1" today (see `tokenizer`).
    pub tokenizer: String,
    pub vocab_size: u32,
    pub max_tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DenoiseConfig {
    pub steps: u32,
    /// Only "euler" today.
    pub method: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Normalization {
    pub state: Stats,
    pub actions: Stats,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Graphs {
    /// images + instruction tokens → prefix features.
    pub prefix: String,
    /// (x_t, t, prefix, state) → velocity, called once per denoise step.
    pub expert: String,
}

impl ExportConfig {
    /// Reads and validates `DIR/reflex_config.json`.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join(CONFIG_FILE);
        let bytes = std::fs::read(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ConfigError::Missing(dir.to_path_buf())
            } else {
                ConfigError::Read {
                    path: path.clone(),
                    error: source,
                }
            }
        })?;
        // A seed-tool config never parses (it has no `format`); only then is it read again
        // to say what it is.
        let cfg: ExportConfig =
            serde_json::from_slice(&bytes).map_err(|error| match seed_tool_export(&bytes) {
                Some(message) => ConfigError::Invalid {
                    path: path.clone(),
                    message,
                },
                None => ConfigError::Parse {
                    path: path.clone(),
                    error,
                },
            })?;
        cfg.validate()
            .map_err(|message| ConfigError::Invalid { path, message })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.format != "reflex-export" || self.format_version != 1 {
            return Err(format!(
                "unsupported export format {:?} v{} (this build reads reflex-export v1)",
                self.format, self.format_version
            ));
        }
        if self.cameras.is_empty() || self.cameras.len() > 8 {
            return Err("`cameras` must list 1 to 8 camera names".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.cameras {
            if c.is_empty() || !seen.insert(c) {
                return Err(format!(
                    "camera names must be non-empty and unique (got {c:?})"
                ));
            }
        }
        let dims_ok = |n: usize| (1..=4096).contains(&n);
        if !(dims_ok(self.state_dim) && dims_ok(self.action_dim) && dims_ok(self.chunk_size)) {
            return Err("state_dim, action_dim and chunk_size must be within 1..=4096".into());
        }
        if !(1..=4096).contains(&self.image.height) || !(1..=4096).contains(&self.image.width) {
            return Err("image height and width must be within 1..=4096".into());
        }
        if self.denoise.method != "euler" || !(1..=1000).contains(&self.denoise.steps) {
            return Err("denoise must be {method: \"euler\", steps: 1..=1000}".into());
        }
        if self.instruction.tokenizer != crate::tokenizer::WORD_HASH_V1 {
            return Err(format!(
                "unknown tokenizer {:?}",
                self.instruction.tokenizer
            ));
        }
        if self.instruction.vocab_size < 3 || self.instruction.max_tokens == 0 {
            return Err("instruction needs vocab_size >= 3 and max_tokens >= 1".into());
        }
        let n = &self.normalization;
        for (what, s, len) in [
            ("state", &n.state, self.state_dim),
            ("actions", &n.actions, self.action_dim),
        ] {
            if s.mean.len() != len || s.std.len() != len {
                return Err(format!("normalization.{what} needs {len} means and stds"));
            }
            if s.std.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(format!("normalization.{what}.std must be finite and > 0"));
            }
        }
        for g in [&self.graphs.prefix, &self.graphs.expert] {
            // Graph names are file names inside the export, never paths out of it.
            if g.is_empty() || g.contains('/') || g.contains('\\') || g.starts_with('.') {
                return Err(format!("graph file name {g:?} must be a plain file name"));
            }
        }
        Ok(())
    }

    /// Canonical JSON: keys sorted (serde_json's default map is a BTreeMap), compact.
    pub fn canonical_json(&self) -> String {
        let value = serde_json::to_value(self).expect("config serialises to JSON");
        value.to_string()
    }

    /// First 16 hex of SHA-256 of the canonical config JSON.
    pub fn config_hash(&self) -> String {
        hex16(&Sha256::digest(self.canonical_json().as_bytes()))
    }

    /// Relative paths of every file the model reads.
    pub fn model_files(&self) -> Vec<String> {
        let mut files = vec![
            CONFIG_FILE.to_string(),
            self.graphs.prefix.clone(),
            self.graphs.expert.clone(),
        ];
        files.sort();
        files.dedup();
        files
    }
}

/// When `bytes` is the `reflex_config.json` of an export written by the seed tool
/// (reflex-vla: no `format`, an `export_kind` or a `model_type` of its own), says so in
/// words a user can act on, instead of a parse error about its first unknown field.
fn seed_tool_export(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let o = v.as_object()?;
    if o.contains_key("format") {
        return None;
    }
    let text = |k: &str| o.get(k).and_then(|v| v.as_str());
    let model_type = text("model_type");
    let seed_type = matches!(
        model_type,
        Some("pi0" | "pi05" | "pi05_decomposed" | "smolvla" | "smolvla_native")
    );
    if !seed_type && text("export_kind").is_none() {
        return None;
    }
    Some(format!(
        "this is an export of the seed tool reflex-vla (model_type {}, export_kind {}), not \
         reflex-export v1: `reflex serve` reads it (mapped onto reflex-export v2), this \
         reference-format reader does not",
        model_type.map_or("none".to_string(), |t| format!("{t:?}")),
        text("export_kind").map_or("none (the SmolVLA four-graph layout)".to_string(), |k| {
            format!("{k:?}")
        }),
    ))
}

/// `model_hash` of an export directory (see the module doc for the layout).
pub fn model_hash(dir: &Path, files: &[String]) -> Result<String, ConfigError> {
    let mut sorted: Vec<&String> = files.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for rel in sorted {
        let path = dir.join(rel);
        let bytes = std::fs::read(&path).map_err(|error| ConfigError::Read { path, error })?;
        // A side file from outside the export (`--tokenizer`) counts by its name and bytes,
        // not by where it lies.
        let label = match Path::new(rel.as_str()) {
            p if p.is_absolute() => p
                .file_name()
                .map_or(rel.as_str(), |n| n.to_str().unwrap_or(rel)),
            _ => rel.as_str(),
        };
        h.update(label.as_bytes());
        h.update([0u8]);
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(hex16(&h.finalize()))
}

/// Lowercase hex of all bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn hex16(digest: &[u8]) -> String {
    hex(&digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_and_complete() {
        assert_eq!(hex(&[0x00, 0xab, 0x0f, 0xff]), "00ab0fff");
    }

    #[test]
    fn model_hash_depends_on_names_and_bytes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"xy").unwrap();
        std::fs::write(d.path().join("b"), b"z").unwrap();
        let files = vec!["b".to_string(), "a".to_string()];
        let h1 = model_hash(d.path(), &files).unwrap();
        assert_eq!(h1.len(), 16);
        // Order of the list does not matter; sorting is part of the definition.
        let h2 = model_hash(d.path(), &["a".to_string(), "b".to_string()]).unwrap();
        assert_eq!(h1, h2);
        // Moving a byte from one file to the other changes the hash.
        std::fs::write(d.path().join("a"), b"x").unwrap();
        std::fs::write(d.path().join("b"), b"yz").unwrap();
        assert_ne!(h1, model_hash(d.path(), &files).unwrap());
        // Expected value computed independently of model_hash().
        let mut h = Sha256::new();
        for (name, bytes) in [("a", &b"x"[..]), ("b", &b"yz"[..])] {
            h.update(name.as_bytes());
            h.update([0u8]);
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        assert_eq!(
            model_hash(d.path(), &files).unwrap(),
            hex(&h.finalize()[..8])
        );
    }
}
