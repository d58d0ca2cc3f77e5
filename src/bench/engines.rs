//! `reflex bench engines`: the reference model on `cpu`, `cuda` (CUDA graphs)
//! and `cuda` launching kernel by kernel, side by side in one run, and the
//! GPU acceptance checks:
//! - every request's actions on cuda vs cpu: cos ≥ 0.9999 and max_abs ≤ 1e-3;
//! - the same request and seed again: bit-identical actions, per engine;
//! - graphs on vs off: bit-identical (the same kernels, replayed).
//!
//! Three latencies per engine, interleaved call by call: the engine alone
//! (prefix + 10-step denoise on prepared tensors), `Policy::act` (image
//! decode and preprocessing included, cache off) and an Act over the Unix
//! socket of an in-process server. Exits non-zero when a check fails.
//!
//! Without a GPU (no driver or CUDA libraries) it measures cpu alone, says in one line why
//! cuda is not there, and exits 0; `--require-gpu` (deploy/gpu-check.sh) makes that an error.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use reflex_engine::engine::{
    Engine, EngineError, EngineKind, Frames, Shapes, cos_and_max_abs, cpu::CpuEngine,
    cuda::CudaEngine,
};
use reflex_proto::v1::{self as pb, policy_client::PolicyClient};
use reflex_server::serve::{ListenAddr, ServeArgs};
use reflex_server::service::to_input;
use tokio_util::sync::CancellationToken;

use crate::latency::{Summary, ms_since};
use crate::scene::{Scene, request};

#[derive(Debug, clap::Args)]
pub struct EnginesBench {
    /// Measured calls per engine and path (after the warm-up).
    #[arg(long, default_value_t = 300)]
    pub calls: usize,
    /// Warm-up calls per engine and path, not measured (captures the graphs).
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// Compare only the CPU with itself (no GPU needed; for trying the command).
    #[arg(long, conflicts_with = "require_gpu")]
    pub cpu_only: bool,
    /// Fail when cuda is not available, instead of measuring cpu alone (for the GPU acceptance run).
    #[arg(long)]
    pub require_gpu: bool,
    /// A real VLA export (the seed tool's layouts or reflex-export v2): our cpu engine vs
    /// onnxruntime's CPU provider on its graphs, side by side (e.g. from `reflex export-demo
    /// --kind pi05 --scale smolvla-size DIR`). `--calls` and `--warmup` apply.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["cpu_only", "require_gpu"])]
    pub export: Option<std::path::PathBuf>,
    /// With --export: onnxruntime's intra-op threads, in its Python worker and in our `ort`
    /// engine (tract runs each call on one thread).
    #[arg(long, default_value_t = 1, requires = "export")]
    pub ort_threads: usize,
    /// With --export: which of our engines runs. `tract` (the embedded cpu engine) or `ort`
    /// (our onnxruntime engine, `reflex serve --engine ort`) against onnxruntime's Python
    /// worker; `cuda` (needs a GPU: graphs on and off) or `reference` (the same compiled
    /// programs on the CPU reference executor, slow) against tract, with the parity,
    /// repeat and graphs-on-vs-off checks.
    #[arg(long, value_name = "ENGINE", default_value = "tract", requires = "export",
          value_parser = ["tract", "ort", "cuda", "reference"])]
    pub export_engine: String,
    /// With --export-engine ort: the libonnxruntime.so.* to load; default `ORT_DYLIB_PATH`,
    /// else the one of the Python onnxruntime package the worker uses.
    #[arg(long, value_name = "PATH", requires = "export")]
    pub ort_lib: Option<std::path::PathBuf>,
    /// With --export-engine cuda|reference: the precisions to run, side by side (e.g.
    /// `f32,bf16`). f32 is held to cos ≥ 0.9999 and max |Δ| ≤ 1e-3 of scale against tract;
    /// f16 and bf16 to cos ≥ 0.999.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "f32",
        requires = "export"
    )]
    pub precision: Vec<reflex_engine::engine::graph::Precision>,
    /// With --export-engine cuda|reference: a baseline's figures to print beside ours, with
    /// the ratio (the JSON `deploy/torch_baseline.py --json` writes: PyTorch eager and with
    /// CUDA graphs on the same graphs and GPU). Repeatable.
    #[arg(long, value_name = "FILE", requires = "export")]
    pub baseline_json: Vec<std::path::PathBuf>,
}

struct Variant {
    name: &'static str,
    engine: Box<dyn Engine>,
    running: reflex_server::serve::Running,
    stop: CancellationToken,
    client: PolicyClient<tonic::transport::Channel>,
    policy: Arc<reflex_engine::policy::Policy>,
    engine_ms: Summary,
    prefix_ms: Summary,
    denoise_ms: Summary,
    act_ms: Summary,
    unix_ms: Summary,
    /// Actions per request index, from the first measured round.
    actions: Vec<Option<Vec<f32>>>,
    repeat_mismatch: usize,
}

pub async fn run(args: EnginesBench) -> anyhow::Result<()> {
    if let Some(export) = args.export.clone() {
        if matches!(args.export_engine.as_str(), "cuda" | "reference") {
            return tokio::task::spawn_blocking(move || {
                super::programs::run(
                    &export,
                    super::programs::Options {
                        calls: args.calls,
                        warmup: args.warmup,
                        engine: &args.export_engine,
                        precisions: &args.precision,
                        baselines: &args.baseline_json,
                    },
                )
            })
            .await?;
        }
        return tokio::task::spawn_blocking(move || {
            super::exports::run(
                &export,
                args.calls,
                args.warmup,
                args.ort_threads,
                (args.export_engine == "ort").then_some(args.ort_lib),
            )
        })
        .await?;
    }
    let work = tempfile::Builder::new().prefix("reflex-bench-").tempdir()?;
    let export = work.path().join("export");
    let cfg = reflex_engine::export::write_reference_export(&export, 0)?;
    let (pp, ep) = (
        export.join(&cfg.graphs.prefix),
        export.join(&cfg.graphs.expert),
    );
    let shapes = Shapes::of(&cfg);

    use reflex_engine::engine::cuda::Staging;
    let specs: Vec<(&'static str, EngineKind, bool, Staging)> = if args.cpu_only {
        vec![
            ("cpu", EngineKind::Cpu, true, Staging::Cached),
            ("cpu (again)", EngineKind::Cpu, true, Staging::Cached),
        ]
    } else {
        vec![
            ("cpu", EngineKind::Cpu, true, Staging::Cached),
            ("cuda + graphs", EngineKind::Cuda, true, Staging::Cached),
            ("cuda, no graphs", EngineKind::Cuda, false, Staging::Cached),
            (
                "cuda + graphs, WC*",
                EngineKind::Cuda,
                true,
                Staging::WriteCombined,
            ),
        ]
    };
    let scene = Scene::new();
    let reqs: Vec<pb::ActRequest> = (0..16)
        .map(|i| request(&scene.tick(i * 3), Some(1000 + i as u64)))
        .collect();

    let mut variants = vec![];
    let mut cuda_missing = false;
    for (i, (name, kind, graphs, staging)) in specs.into_iter().enumerate() {
        let t = Instant::now();
        let engine: Box<dyn Engine> = match kind {
            EngineKind::Cuda if cuda_missing => continue,
            EngineKind::Cuda => match CudaEngine::load_with(&pp, &ep, graphs, staging) {
                Ok(engine) => Box::new(engine),
                // No driver or libraries: a machine without a GPU, not a failed check.
                Err(e @ EngineError::Unavailable { .. }) if !args.require_gpu => {
                    println!("cuda: not measured, {e}");
                    cuda_missing = true;
                    continue;
                }
                Err(e) => return Err(e).context(format!("{name} engine")),
            },
            _ => Box::new(CpuEngine::load(&pp, &ep, shapes.clone())?),
        };
        let socket = work.path().join(format!("policy-{i}.sock"));
        let serve_args = ServeArgs {
            workers: Some(1),
            cache_entries: 0,
            engine: kind,
            cuda_graphs: graphs,
            ..ServeArgs::new(export.clone(), vec![ListenAddr::Unix(socket.clone())])
        };
        let stop = CancellationToken::new();
        let running = reflex_server::serve::start(serve_args, stop.clone()).await?;
        let policy = running.service.policy().clone();
        let client = PolicyClient::new(
            reflex_proto::connect(&format!("unix://{}", socket.display())).await?,
        );
        eprintln!("{name}: loaded in {:.1} s", t.elapsed().as_secs_f64());
        variants.push(Variant {
            name,
            engine,
            running,
            stop,
            client,
            policy,
            engine_ms: Summary::default(),
            prefix_ms: Summary::default(),
            denoise_ms: Summary::default(),
            act_ms: Summary::default(),
            unix_ms: Summary::default(),
            actions: vec![None; reqs.len()],
            repeat_mismatch: 0,
        });
    }

    // Engine-only inputs: preprocessing-shaped tensors from a fixed seed.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut uniform = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_u32() >> 8) as f32 / (1 << 23) as f32 - 1.0)
            .collect()
    };
    let frame_bytes: Vec<u8> = (0..shapes.cameras * 3 * shapes.height * shapes.width)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let present = vec![true; shapes.cameras];
    let frames = Frames {
        hwc: &frame_bytes,
        present: &present,
    };
    let norm = reflex_engine::preprocess::pixel_norm(&cfg.image);
    let state = uniform(shapes.state_dim);
    let noise = uniform(shapes.chunk * shapes.action_dim);
    let tokens: Vec<i64> = (0..shapes.tokens as i64)
        .map(|i| (i * 37 + 5) % 1024)
        .collect();
    let steps = cfg.denoise.steps;

    let cams = cfg.cameras.clone();
    let inputs: Vec<_> = reqs
        .iter()
        .map(|r| to_input(r, &cams))
        .collect::<Result<_, _>>()?;
    for i in 0..args.warmup + args.calls {
        let k = i % reqs.len();
        let measured = i >= args.warmup;
        for v in variants.iter_mut() {
            let t = Instant::now();
            let prefix = v.engine.prefix_frames(&frames, &norm, &tokens)?;
            let pm = ms_since(t);
            let t1 = Instant::now();
            v.engine.denoise(noise.clone(), &prefix, &state, steps)?;
            let dm = ms_since(t1);
            let e = ms_since(t);

            let p = Arc::clone(&v.policy);
            let input = inputs[k].clone();
            let (a, out) = tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                p.act(&input).map(|o| (ms_since(t), o.actions))
            })
            .await??;

            let t = Instant::now();
            let r = v.client.act(reqs[k].clone()).await?.into_inner();
            let u = ms_since(t);
            if r.actions != out {
                v.repeat_mismatch += 1;
            }
            match &v.actions[k] {
                None => v.actions[k] = Some(out),
                Some(first) if *first != out => v.repeat_mismatch += 1,
                Some(_) => {}
            }
            if measured {
                v.engine_ms.push(e);
                v.prefix_ms.push(pm);
                v.denoise_ms.push(dm);
                v.act_ms.push(a);
                v.unix_ms.push(u);
            }
        }
    }

    println!(
        "reflex bench engines: reference model, {} calls per engine and path, 1 worker, cache off, \
         {steps} denoise steps",
        args.calls
    );
    for v in &variants {
        let hw = v.policy.hardware();
        let pick = |k: &str| hw.get(k).cloned().unwrap_or_default();
        if v.policy.mode() == "cuda" {
            println!(
                "{}: gpu {} ({}), driver {}, CUDA driver API {}, nvrtc {}, cuBLAS {}",
                v.name,
                pick("gpu"),
                pick("gpu_arch"),
                pick("nvidia_driver"),
                pick("cuda_driver_api"),
                pick("nvrtc"),
                pick("cublas")
            );
        }
    }
    println!(
        "{:<18} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "engine", "eng p50", "eng p99", "act p50", "act p99", "unix p50", "unix p99"
    );
    for v in &variants {
        println!(
            "{:<18} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
            v.name,
            v.engine_ms.pct(50.0),
            v.engine_ms.pct(99.0),
            v.act_ms.pct(50.0),
            v.act_ms.pct(99.0),
            v.unix_ms.pct(50.0),
            v.unix_ms.pct(99.0)
        );
    }
    if variants.iter().any(|v| v.name.ends_with('*')) {
        println!(
            "* write-combined input staging in the engine-only columns; its server runs the default"
        );
    }
    println!("engine-only split, p50 ms: prefix (images → features) | denoise ({steps} steps)");
    for v in &variants {
        println!(
            "{:<18} {:>10.3} | {:>10.3}",
            v.name,
            v.prefix_ms.pct(50.0),
            v.denoise_ms.pct(50.0)
        );
    }
    let base = variants[0].engine_ms.pct(50.0);
    for v in &variants[1..] {
        println!(
            "engine-only p50 ratio {} / {}: {:.3} ({:.1}× faster)",
            v.name,
            variants[0].name,
            v.engine_ms.pct(50.0) / base,
            base / v.engine_ms.pct(50.0)
        );
    }

    // Checks.
    let mut failed = vec![];
    // Frames normalised on the device = normalised on the host, bit for bit (one camera
    // absent, so the blank value is covered too).
    let mut some = present.clone();
    some[shapes.cameras - 1] = false;
    let partial = Frames {
        hwc: &frame_bytes,
        present: &some,
    };
    for v in &variants {
        let on_device = v.engine.prefix_frames(&partial, &norm, &tokens)?;
        let on_host = v.engine.prefix(&partial.to_pixels(&norm), &tokens)?;
        let same = on_device == on_host;
        println!(
            "check frames: {} — prefix from bytes = prefix from host-normalised floats: {}",
            v.name,
            if same { "PASS" } else { "FAIL" }
        );
        if !same {
            failed.push(format!("{}: frames path differs", v.name));
        }
    }
    for v in &variants {
        if v.repeat_mismatch > 0 {
            failed.push(format!(
                "{}: {} repeated calls were not bit-identical",
                v.name, v.repeat_mismatch
            ));
        }
        println!(
            "check repeat: {} — {} calls, same request+seed → identical bits: {}",
            v.name,
            args.warmup + args.calls,
            if v.repeat_mismatch == 0 {
                "PASS"
            } else {
                "FAIL"
            }
        );
    }
    let cpu = &variants[0];
    for v in &variants[1..] {
        let (mut worst_cos, mut worst_abs) = (1.0f64, 0.0f64);
        let mut compared = 0;
        for (a, b) in v.actions.iter().zip(&cpu.actions) {
            let (Some(a), Some(b)) = (a, b) else { continue };
            compared += 1;
            let (c, m) = cos_and_max_abs(a, b);
            worst_cos = worst_cos.min(c);
            worst_abs = worst_abs.max(m);
        }
        let ok = compared > 0 && worst_cos >= 0.9999 && worst_abs <= 1e-3;
        println!(
            "check vs cpu: {} — {} requests, worst cos {:.7}, worst max_abs {:.2e}: {}",
            v.name,
            compared,
            worst_cos,
            worst_abs,
            if ok { "PASS" } else { "FAIL" }
        );
        if !ok {
            failed.push(format!("{} differs from cpu", v.name));
        }
    }
    if variants.len() >= 3 {
        let same = variants[2..]
            .iter()
            .all(|v| v.actions == variants[1].actions);
        println!(
            "check graphs on vs off (and staging): identical bits on all {} requests: {}",
            reqs.len(),
            if same { "PASS" } else { "FAIL" }
        );
        if !same {
            failed.push("graph replay differs from op-by-op launches".into());
        }
    }
    for v in variants {
        v.stop.cancel();
        v.running.wait().await?;
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}
