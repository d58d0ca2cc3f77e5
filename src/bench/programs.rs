//! `reflex bench engines --export DIR --export-engine cuda|reference`: a real export on the
//! cpu engine (tract) and on the cuda engine's compiled programs, side by side in one run,
//! with the acceptance checks of issue 14 item 8:
//! - every request's actions (and, for a decomposed export, every prefix tensor) against
//!   tract's: cos ≥ 0.9999 and max |Δ| ≤ 1e-3 of the largest value;
//! - the same request again: bit-identical, per engine;
//! - cuda with CUDA graphs vs launching op by op: bit-identical.
//!
//! `cuda` needs a GPU and fails without one (the GPU script runs it); `reference` runs the
//! same programs on the CPU reference executor (slow; CI runs it on the tiny fixtures, so
//! the harness and its checks are tested where no GPU is). Calls are interleaved engine by
//! engine; latencies are model-level (prefix, denoise, both), medians and p99 with the
//! ratio to tract. Exits non-zero when a check fails.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use reflex_engine::engine::cos_and_max_abs;
use reflex_engine::vla::{Backend, Observation, VlaModel};

use crate::latency::{Summary, ms_since};

/// Distinct requests, cycled: other frames, instruction and noise each.
const REQUESTS: usize = 4;

/// One Act's prefix tensors (as f32) and actions.
type Outputs = (Vec<Vec<f32>>, Vec<f32>);

struct Side {
    name: &'static str,
    model: VlaModel,
    load_s: f64,
    prefix: Summary,
    denoise: Summary,
    act: Summary,
    /// Per request: the prefix tensors and the actions of its first run.
    first: Vec<Option<Outputs>>,
    repeat_mismatch: usize,
}

struct Request {
    hwc: Vec<u8>,
    present: Vec<bool>,
    instruction: String,
    state: Option<Vec<f32>>,
    noise: Vec<f32>,
}

fn requests(m: &VlaModel) -> Vec<Request> {
    let cams = m.spec.cameras.len();
    let per = m.height * m.width * 3;
    (0..REQUESTS)
        .map(|r| Request {
            hwc: (0..per * cams)
                .map(|i| ((i * 7 + r * 53 + i / per * 31) % 251) as u8)
                .collect(),
            present: (0..cams).map(|c| c < 2 || r % 2 == 1).collect(),
            instruction: [
                "pick up the red block",
                "open the drawer",
                "fold the towel",
                "stack the cups",
            ][r % 4]
                .to_string(),
            state: m.state_values(
                &(0..m.spec.state.dim)
                    .map(|i| 0.1 * (i + r) as f32)
                    .collect::<Vec<_>>(),
            ),
            noise: reflex_engine::policy::gaussian_noise(100 + r as u64, m.chunk * m.action_width),
        })
        .collect()
}

/// One Act at the model level: (prefix tensors as f32, actions), timed into `side` when
/// `measure`.
fn act(side: &mut Side, req: &Request, measure: bool) -> anyhow::Result<Outputs> {
    let obs = Observation {
        hwc: &req.hwc,
        present: &req.present,
        instruction: &req.instruction,
        state: req.state.as_deref(),
    };
    let m = &side.model;
    let t0 = Instant::now();
    let (tensors, actions, prefix_ms) = if m.is_monolithic() {
        let a = m.run_monolithic(&obs, &req.noise, req.state.as_deref())?;
        (vec![], a, 0.0)
    } else {
        let p = m.prefix(&obs)?;
        let prefix_ms = ms_since(t0);
        let a = m.denoise(&p, &req.noise, req.state.as_deref())?;
        (p.to_f32()?, a, prefix_ms)
    };
    let act_ms = ms_since(t0);
    if measure {
        side.prefix.push(prefix_ms);
        side.denoise.push(act_ms - prefix_ms);
        side.act.push(act_ms);
    }
    Ok((tensors, actions))
}

pub fn run(export: &Path, calls: usize, warmup: usize, engine: &str) -> anyhow::Result<()> {
    let variants: Vec<(&'static str, Backend)> = match engine {
        "cuda" => vec![
            ("cpu (tract)", Backend::Tract),
            ("cuda + graphs", Backend::Cuda { graphs: true }),
            ("cuda, no graphs", Backend::Cuda { graphs: false }),
        ],
        "reference" => vec![
            ("cpu (tract)", Backend::Tract),
            ("reference executor", Backend::Reference),
        ],
        other => bail!("--export-engine {other}: this comparison takes cuda or reference"),
    };
    let mut sides = vec![];
    for (name, backend) in variants {
        let t0 = Instant::now();
        let model = reflex_engine::policy::load_vla_model(export, &Default::default(), &backend)
            .with_context(|| format!("loading {} on {name}", export.display()))?;
        sides.push(Side {
            name,
            model,
            load_s: t0.elapsed().as_secs_f64(),
            prefix: Summary::default(),
            denoise: Summary::default(),
            act: Summary::default(),
            first: vec![None; REQUESTS],
            repeat_mismatch: 0,
        });
    }
    let reqs = requests(&sides[0].model);
    println!(
        "export {}: {} on {}; {REQUESTS} distinct requests, {warmup} warm-up and {calls} measured calls per engine, interleaved",
        export.display(),
        sides[0].model.spec.model_type,
        sides.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
    );
    for i in 0..warmup + calls {
        let r = i % REQUESTS;
        // Rotate which engine goes first, so none always runs on a cold cache.
        let n = sides.len();
        for k in 0..n {
            let side = &mut sides[(i + k) % n];
            let out = act(side, &reqs[r], i >= warmup)?;
            match &side.first[r] {
                None => side.first[r] = Some(out),
                Some((t, a)) => {
                    let same = |x: &[f32], y: &[f32]| {
                        x.len() == y.len()
                            && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits())
                    };
                    if !(same(a, &out.1)
                        && t.len() == out.0.len()
                        && t.iter().zip(&out.0).all(|(x, y)| same(x, y)))
                    {
                        side.repeat_mismatch += 1;
                    }
                }
            }
        }
    }

    let mut failures = vec![];
    println!(
        "{:<22}{:>8}{:>20}{:>20}{:>20}{:>12}",
        "engine",
        "load s",
        "prefix p50/p99 ms",
        "denoise p50/p99 ms",
        "act p50/p99 ms",
        "act vs cpu"
    );
    let base = sides[0].act.pct(50.0);
    for s in &sides {
        let pp = |x: &Summary| format!("{:.3} / {:.3}", x.pct(50.0), x.pct(99.0));
        println!(
            "{:<22}{:>8.2}{:>20}{:>20}{:>20}{:>11.2}x",
            s.name,
            s.load_s,
            pp(&s.prefix),
            pp(&s.denoise),
            pp(&s.act),
            base / s.act.pct(50.0)
        );
    }
    for s in &sides {
        if s.repeat_mismatch > 0 {
            failures.push(format!(
                "{}: {} repeated calls differ from the first (must be bit-identical)",
                s.name, s.repeat_mismatch
            ));
        }
    }
    // Parity with tract, request by request, prefix tensor by tensor.
    for s in &sides[1..] {
        let (mut worst_cos, mut worst_rel) = (1.0f64, 0.0f64);
        for r in 0..REQUESTS {
            let (Some((bt, ba)), Some((ot, oa))) = (&sides[0].first[r], &s.first[r]) else {
                continue;
            };
            let mut pairs: Vec<(String, &Vec<f32>, &Vec<f32>)> =
                vec![(format!("request {r} actions"), oa, ba)];
            for (i, (o, b)) in ot.iter().zip(bt).enumerate() {
                pairs.push((format!("request {r} prefix tensor {i}"), o, b));
            }
            for (what, o, b) in pairs {
                let (cos, max_abs) = cos_and_max_abs(o, b);
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0) as f64;
                worst_cos = worst_cos.min(cos);
                worst_rel = worst_rel.max(max_abs / scale);
                if o.len() != b.len() || cos < 0.9999 || max_abs > 1e-3 * scale {
                    failures.push(format!(
                        "{} vs cpu, {what}: cos {cos:.7}, max |Δ| {max_abs:.3e} (scale {scale:.3})",
                        s.name
                    ));
                }
            }
        }
        println!(
            "{} vs cpu (tract): worst cos {worst_cos:.9}, worst max |Δ|/scale {worst_rel:.3e} over {REQUESTS} requests (bound: cos ≥ 0.9999, ≤ 1e-3)",
            s.name
        );
    }
    // CUDA graphs replay the same kernels: on = off, bit for bit.
    if let (Some(on), Some(off)) = (
        sides.iter().find(|s| s.name == "cuda + graphs"),
        sides.iter().find(|s| s.name == "cuda, no graphs"),
    ) {
        let same = (0..REQUESTS).all(|r| match (&on.first[r], &off.first[r]) {
            (Some((_, a)), Some((_, b))) => {
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
            _ => true,
        });
        println!(
            "cuda graphs on vs off: {}",
            if same { "bit-identical" } else { "DIFFER" }
        );
        if !same {
            failures.push("cuda with CUDA graphs differs from cuda launching op by op".into());
        }
    }
    for s in &sides {
        println!(
            "{}: repeats {}",
            s.name,
            if s.repeat_mismatch == 0 {
                "bit-identical"
            } else {
                "DIFFER"
            }
        );
    }
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        bail!("{} check(s) failed", failures.len());
    }
    println!("ALL CHECKS PASSED");
    Ok(())
}
