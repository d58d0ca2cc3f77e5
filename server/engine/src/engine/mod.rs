//! Engines run the two graphs of an export; the policy drives them.
//!
//! The contract an engine keeps (and a GPU engine must keep too): inputs and
//! outputs are flat row-major f32/i64 slices in the shapes of the export's
//! graphs; the same inputs give the same outputs bit for bit on one machine.
//! `denoise` runs the whole Euler loop so an engine can capture it as one unit
//! (a CUDA graph); the default drives `expert_step` from the host.

pub mod cpu;
pub mod cuda;
pub mod graph;
pub mod onnxruntime;

use std::collections::BTreeMap;

/// Hardware facts for trace headers and ModelInfo.
pub fn cpu_hardware() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("arch".into(), std::env::consts::ARCH.into());
    m.insert("os".into(), std::env::consts::OS.into());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    m.insert("cpus".into(), cpus.to_string());
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo")
        && let Some(line) = info.lines().find(|l| l.starts_with("model name"))
        && let Some((_, name)) = line.split_once(':')
    {
        m.insert("cpu".into(), name.trim().to_string());
    }
    m
}

/// Failure inside an engine. The message says which graph and why.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("loading {graph} failed: {message}")]
    Load { graph: String, message: String },
    #[error("running {graph} failed: {message}")]
    Run {
        graph: &'static str,
        message: String,
    },
    #[error("engine {engine} is not available: {reason}")]
    Unavailable {
        engine: &'static str,
        reason: String,
    },
}

/// Which engine to run, from `--engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// tract on the CPU.
    #[default]
    Cpu,
    /// The GPU executor (cuBLAS + NVRTC kernels, CUDA graphs); fails at start
    /// without a GPU and its libraries.
    Cuda,
    /// `cuda` where it loads, else `cpu` with one log line saying why.
    Auto,
    /// onnxruntime's CPU provider, its library loaded at run time (`--ort-lib`,
    /// `ORT_DYLIB_PATH`): real VLA exports only ([`onnxruntime`]).
    Ort,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(EngineKind::Cpu),
            "cuda" => Ok(EngineKind::Cuda),
            "auto" => Ok(EngineKind::Auto),
            "ort" => Ok(EngineKind::Ort),
            other => Err(format!(
                "unknown engine {other:?} (one of: cpu, cuda, auto, ort)"
            )),
        }
    }
}

/// Shapes an engine needs to know; taken from the export's config.
#[derive(Debug, Clone)]
pub struct Shapes {
    pub cameras: usize,
    pub height: usize,
    pub width: usize,
    pub tokens: usize,
    pub prefix_dim: usize,
    pub state_dim: usize,
    pub chunk: usize,
    pub action_dim: usize,
}

impl Shapes {
    /// The shapes an export's config declares.
    pub fn of(cfg: &crate::config::ExportConfig) -> Shapes {
        Shapes {
            cameras: cfg.cameras.len(),
            height: cfg.image.height as usize,
            width: cfg.image.width as usize,
            tokens: cfg.instruction.max_tokens,
            prefix_dim: cfg.prefix_dim,
            state_dim: cfg.state_dim,
            chunk: cfg.chunk_size,
            action_dim: cfg.action_dim,
        }
    }
}

/// Per-channel normalisation of camera frames, `p·scale + offset`; an absent
/// camera is `blank` everywhere.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PixelNorm {
    pub scale: [f32; 3],
    pub offset: [f32; 3],
    pub blank: [f32; 3],
}

impl PixelNorm {
    /// One HWC RGB u8 frame → its CHW f32 planes.
    pub fn apply(&self, hwc: &[u8], out: &mut [f32]) {
        let plane = out.len() / 3;
        debug_assert_eq!(hwc.len(), plane * 3);
        for c in 0..3 {
            let dst = &mut out[c * plane..(c + 1) * plane];
            for (d, px) in dst.iter_mut().zip(hwc.chunks_exact(3)) {
                *d = px[c] as f32 * self.scale[c] + self.offset[c];
            }
        }
    }

    /// The planes of an absent camera.
    pub fn fill_blank(&self, out: &mut [f32]) {
        let plane = out.len() / 3;
        for c in 0..3 {
            out[c * plane..(c + 1) * plane].fill(self.blank[c]);
        }
    }
}

/// The prefix's camera input before normalisation: one `H·W·3` HWC RGB frame
/// per camera slot (zeros for an absent one) and which slots are present.
pub struct Frames<'a> {
    pub hwc: &'a [u8],
    pub present: &'a [bool],
}

impl Frames<'_> {
    /// `[cameras, 3, H, W]` normalised floats, what [`Engine::prefix`] takes.
    pub fn to_pixels(&self, norm: &PixelNorm) -> Vec<f32> {
        let cams = self.present.len().max(1);
        let per = self.hwc.len() / cams;
        let mut pixels = vec![0.0f32; self.hwc.len()];
        for (slot, out) in pixels.chunks_exact_mut(per).enumerate() {
            if self.present[slot] {
                norm.apply(&self.hwc[slot * per..(slot + 1) * per], out);
            } else {
                norm.fill_blank(out);
            }
        }
        pixels
    }
}

pub trait Engine: Send + Sync {
    /// Name reported as `mode` in responses and traces ("cpu", "cuda").
    fn mode(&self) -> &'static str;

    /// Facts for the trace header's `hardware` block.
    fn hardware(&self) -> BTreeMap<String, String>;

    /// `pixels [cameras,3,H,W]` + `tokens [1,T]` → `prefix [1,D]`.
    fn prefix(&self, pixels: &[f32], tokens: &[i64]) -> Result<Vec<f32>, EngineError>;

    /// The prefix from raw frames. The default normalises on the host; a GPU
    /// engine uploads the bytes (a quarter of the floats) and normalises there.
    fn prefix_frames(
        &self,
        frames: &Frames<'_>,
        norm: &PixelNorm,
        tokens: &[i64],
    ) -> Result<Vec<f32>, EngineError> {
        self.prefix(&frames.to_pixels(norm), tokens)
    }

    /// One flow-matching step: velocity at (`x_t`, `t`).
    fn expert_step(
        &self,
        x: &[f32],
        t: f32,
        prefix: &[f32],
        state: &[f32],
    ) -> Result<Vec<f32>, EngineError>;

    /// Integrates from `noise` (t=0) to t=1 in `steps` Euler steps.
    fn denoise(
        &self,
        noise: Vec<f32>,
        prefix: &[f32],
        state: &[f32],
        steps: u32,
    ) -> Result<Vec<f32>, EngineError> {
        euler(noise, steps, |x, t| self.expert_step(x, t, prefix, state))
    }
}

/// x ← x + dt·v(x, t) at t = k/steps, k = 0..steps. Shared by every engine
/// that steps from the host, so all of them integrate identically.
pub fn euler(
    mut x: Vec<f32>,
    steps: u32,
    mut velocity: impl FnMut(&[f32], f32) -> Result<Vec<f32>, EngineError>,
) -> Result<Vec<f32>, EngineError> {
    let dt = 1.0 / steps as f32;
    for k in 0..steps {
        let t = k as f32 * dt;
        let v = velocity(&x, t)?;
        for (xi, vi) in x.iter_mut().zip(&v) {
            *xi += dt * vi;
        }
    }
    Ok(x)
}

/// (cosine similarity, max |a − b|) of two outputs, in f64: how engines are compared with
/// each other and with outside runtimes.
pub fn cos_and_max_abs(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut dot, mut na, mut nb, mut max) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
        max = max.max((x - y).abs());
    }
    (dot / (na.sqrt() * nb.sqrt()).max(f64::MIN_POSITIVE), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euler_integrates_a_constant_velocity_exactly() {
        let x = euler(vec![0.0, 1.0], 4, |_, _| Ok(vec![1.0, -2.0])).unwrap();
        assert_eq!(x, vec![1.0, -1.0]);
    }

    #[test]
    fn euler_passes_the_step_times() {
        let mut seen = vec![];
        euler(vec![0.0], 5, |_, t| {
            seen.push(t);
            Ok(vec![0.0])
        })
        .unwrap();
        assert_eq!(seen, vec![0.0, 0.2, 0.4, 0.6, 0.8]);
    }
}
