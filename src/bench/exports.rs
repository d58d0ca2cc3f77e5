//! `reflex bench engines --export DIR`: a real VLA export (the seed tool's layouts, or
//! reflex-export v2) on our cpu engine (tract) and on onnxruntime's CPU provider, side by
//! side in one run, on the same graphs and the same input bytes, at the same thread count.
//!
//! Our side runs `VlaModel` directly (prefix graph, then the expert: the baked loop or our
//! Euler loop; a monolithic graph in one run), one thread per call as the server runs it.
//! onnxruntime runs in a Python worker (`ort_worker.py`, written beside the inputs at run
//! time) with `intra_op_num_threads` = `--ort-threads` (default 1: equal threads). Calls
//! alternate between the two, order flipped every call. Printed: load time, p50/p99 of the
//! prefix, of the denoise and of the whole Act, peak RSS against the size of the weights, the
//! ratios, and the two runtimes' actions compared (cos, max |Δ|). Generate a real-scale export
//! first: `reflex export-demo --kind pi05 --scale smolvla-size DIR`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use reflex_engine::engine::cos_and_max_abs;
use reflex_engine::vla::{Observation, VlaModel};

use crate::latency::{Summary, ms_since};

const WORKER: &str = include_str!("ort_worker.py");

#[derive(Default)]
struct Side {
    load_s: f64,
    prefix: Summary,
    denoise: Summary,
    act: Summary,
    peak_rss_kib: u64,
}

/// Bytes of the export's graphs and their external data.
fn weights_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.ends_with(".onnx") || n.ends_with(".onnx.data")
                })
                .filter_map(|e| e.metadata().ok().map(|m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}

/// A `kB` field of this process's /proc status.
fn self_status_kib(field: &str) -> u64 {
    super::load::proc_status_kib(std::process::id(), field).unwrap_or(0)
}

/// Frames at the model's size: a pattern per camera, the first two present.
fn frames(m: &VlaModel) -> (Vec<u8>, Vec<bool>) {
    let cams = m.spec.cameras.len();
    let per = m.height * m.width * 3;
    let mut hwc = vec![0u8; per * cams];
    for (c, frame) in hwc.chunks_exact_mut(per).enumerate() {
        for (i, px) in frame.iter_mut().enumerate() {
            *px = ((i * 7 + c * 31) % 251) as u8;
        }
    }
    let present = (0..cams).map(|c| c < 2).collect();
    (hwc, present)
}

struct Worker {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Worker {
    fn ask(&mut self, cmd: &str) -> anyhow::Result<serde_json::Value> {
        let stdin = self.child.stdin.as_mut().context("worker stdin")?;
        writeln!(stdin, "{cmd}")?;
        stdin.flush()?;
        self.read()
    }

    fn read(&mut self) -> anyhow::Result<serde_json::Value> {
        let mut line = String::new();
        if self.out.read_line(&mut line)? == 0 {
            bail!("the onnxruntime worker ended (see its stderr above)");
        }
        Ok(serde_json::from_str(&line)?)
    }
}

/// `ort`: `None` runs our tract engine; `Some(lib)` our onnxruntime engine (`lib`, else
/// `ORT_DYLIB_PATH`, else the Python package's: `onnxruntime::python_library`).
pub fn run(
    export: &Path,
    calls: usize,
    warmup: usize,
    ort_threads: usize,
    ort: Option<Option<PathBuf>>,
) -> anyhow::Result<()> {
    let backend = match ort {
        None => reflex_engine::vla::Backend::Tract,
        Some(lib) => reflex_engine::vla::Backend::Ort {
            lib: match lib.or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from)) {
                Some(l) => l,
                None => reflex_engine::engine::onnxruntime::python_library()
                    .map_err(|e| anyhow::anyhow!("{e}; or give --ort-lib"))?,
            },
            threads: ort_threads,
        },
    };
    let ours_name = match &backend {
        reflex_engine::vla::Backend::Tract => "reflex cpu (tract)".to_string(),
        reflex_engine::vla::Backend::Ort { threads, .. } => format!("reflex ort ({threads} thr)"),
        reflex_engine::vla::Backend::Reference { .. } => "reflex reference executor".to_string(),
        reflex_engine::vla::Backend::Cuda { .. } => "reflex cuda".to_string(),
    };
    let work = tempfile::Builder::new()
        .prefix("reflex-bench-export-")
        .tempdir()?;
    let weights = weights_bytes(export);
    println!(
        "export {}: {:.2} GB of graphs and weights; {calls} measured calls per runtime after {warmup} warm-up",
        export.display(),
        weights as f64 / 1e9
    );

    // Ours.
    let rss0 = self_status_kib("VmRSS");
    let t0 = Instant::now();
    let model = reflex_engine::policy::load_vla_model(export, &Default::default(), &backend)
        .with_context(|| format!("loading {}", export.display()))?;
    let mut ours = Side {
        load_s: t0.elapsed().as_secs_f64(),
        ..Default::default()
    };
    let (hwc, present) = frames(&model);
    let noise = reflex_engine::policy::gaussian_noise(7, model.chunk * model.action_width);
    let state = model.state_values(&vec![0.1; model.spec.state.dim]);
    let obs = Observation {
        hwc: &hwc,
        present: &present,
        instruction: "pick up the red block and put it in the bowl",
        state: state.as_deref(),
    };

    // The same bytes for onnxruntime.
    let mut tensors = serde_json::Map::new();
    let mut raw = model.observation_raw(&obs)?;
    raw.push(reflex_engine::vla::RawTensor {
        name: model
            .spec
            .denoise
            .noise_input
            .clone()
            .unwrap_or_else(|| "noise".into()),
        dtype: "float32",
        shape: vec![1, model.chunk, model.action_width],
        bytes: noise.iter().flat_map(|x| x.to_le_bytes()).collect(),
    });
    if let (Some(name), Some(s)) = (&model.spec.state.input, &state) {
        raw.push(reflex_engine::vla::RawTensor {
            name: name.clone(),
            dtype: "float32",
            shape: vec![1, s.len()],
            bytes: s.iter().flat_map(|x| x.to_le_bytes()).collect(),
        });
    }
    for t in &raw {
        let file = format!("{}.bin", t.name);
        std::fs::write(work.path().join(&file), &t.bytes)?;
        tensors.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "file": file}),
        );
    }
    let inputs: PathBuf = work.path().join("inputs.json");
    std::fs::write(
        &inputs,
        serde_json::json!({ "tensors": tensors }).to_string(),
    )?;
    let script = work.path().join("ort_worker.py");
    std::fs::write(&script, WORKER)?;
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(export)
        .arg(&inputs)
        .arg(ort_threads.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting python3 with onnxruntime (deploy/ci-setup.sh installs it)")?;
    let out = BufReader::new(child.stdout.take().context("worker stdout")?);
    let mut worker = Worker { child, out };
    let hello = worker.read()?;
    let mut ort = Side {
        load_s: hello["load_s"].as_f64().unwrap_or(f64::NAN),
        ..Default::default()
    };

    let run_ours = |side: Option<&mut Side>| -> anyhow::Result<Vec<f32>> {
        let t0 = Instant::now();
        let (actions, prefix_ms) = if model.is_monolithic() {
            (model.run_monolithic(&obs, &noise, state.as_deref())?, 0.0)
        } else {
            let p = model.prefix(&obs)?;
            let prefix_ms = ms_since(t0);
            (model.denoise(&p, &noise, state.as_deref())?, prefix_ms)
        };
        let act_ms = ms_since(t0);
        if let Some(side) = side {
            side.prefix.push(prefix_ms);
            side.denoise.push(act_ms - prefix_ms);
            side.act.push(act_ms);
        }
        Ok(actions)
    };

    // The two runtimes agree before either is timed.
    let a = run_ours(None)?;
    let b: Vec<f32> = worker.ask("actions")?["actions"]
        .as_array()
        .context("worker actions")?
        .iter()
        .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
        .collect();
    let (cos, max_abs) = cos_and_max_abs(&a, &b);
    println!("actions, ours vs onnxruntime: cos {cos:.9}, max |Δ| {max_abs:.2e}");

    for _ in 0..warmup {
        run_ours(None)?;
        worker.ask("act")?;
    }
    for i in 0..calls {
        let mut ort_call = |ort: &mut Side| -> anyhow::Result<()> {
            let r = worker.ask("act")?;
            ort.prefix.push(r["prefix_ms"].as_f64().unwrap_or(f64::NAN));
            ort.denoise
                .push(r["denoise_ms"].as_f64().unwrap_or(f64::NAN));
            ort.act.push(r["act_ms"].as_f64().unwrap_or(f64::NAN));
            Ok(())
        };
        if i % 2 == 0 {
            run_ours(Some(&mut ours))?;
            ort_call(&mut ort)?;
        } else {
            ort_call(&mut ort)?;
            run_ours(Some(&mut ours))?;
        }
    }
    ort.peak_rss_kib = worker.ask("quit")?["peak_rss_kib"].as_u64().unwrap_or(0);
    let _ = worker.child.wait();
    ours.peak_rss_kib = self_status_kib("VmHWM").saturating_sub(rss0);

    let gb = |kib: u64| kib as f64 * 1024.0 / 1e9;
    println!(
        "{:<24}{:>8}{:>22}{:>22}{:>22}{:>12}{:>10}",
        "runtime (1 call at a time)",
        "load s",
        "prefix p50/p99 ms",
        "denoise p50/p99 ms",
        "Act p50/p99 ms",
        "peak GB",
        "/weights"
    );
    for (name, s) in [
        (ours_name.as_str(), &ours),
        (&*format!("onnxruntime cpu ({ort_threads} thr)"), &ort),
    ] {
        println!(
            "{:<24}{:>8.2}{:>22}{:>22}{:>22}{:>12.2}{:>10.2}",
            name,
            s.load_s,
            format!("{:.1} / {:.1}", s.prefix.pct(50.0), s.prefix.pct(99.0)),
            format!("{:.1} / {:.1}", s.denoise.pct(50.0), s.denoise.pct(99.0)),
            format!("{:.1} / {:.1}", s.act.pct(50.0), s.act.pct(99.0)),
            gb(s.peak_rss_kib),
            gb(s.peak_rss_kib) / (weights as f64 / 1e9),
        );
    }
    println!(
        "ratio ours / onnxruntime, p50: prefix {:.2}x, denoise {:.2}x, Act {:.2}x; load {:.2}x; peak RSS {:.2}x",
        ours.prefix.pct(50.0) / ort.prefix.pct(50.0),
        ours.denoise.pct(50.0) / ort.denoise.pct(50.0),
        ours.act.pct(50.0) / ort.act.pct(50.0),
        ours.load_s / ort.load_s,
        ours.peak_rss_kib as f64 / ort.peak_rss_kib.max(1) as f64,
    );
    println!(
        "ours: {ours_name}, as `reflex serve` runs each call (its --workers run calls in parallel); peak RSS is the process's VmHWM above its start, onnxruntime's its worker's ru_maxrss"
    );
    Ok(())
}
