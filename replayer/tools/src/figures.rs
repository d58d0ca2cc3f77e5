//! `reflex trace show TRACE`: the header, then figures over the whole trace — latency
//! percentiles per stage, cache hit rate, errors by slug, action ranges per dimension, and
//! the Act rate over time. One streaming pass; memory grows by 24 bytes per Act (the
//! latency samples, kept as f32 for exact percentiles) plus one counter per second of
//! trace, nothing else.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;

use crate::TraceToolError;
use crate::input::{ReadNote, for_each_act};
use crate::progress::Progress;

/// The latency stages, in the order of `TraceLatency`.
pub const STAGES: [&str; 6] = [
    "total",
    "queue",
    "decode",
    "prefix",
    "denoise",
    "postprocess",
];

/// Everything `show` prints after the header.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    pub acts: u64,
    pub errors_by_slug: BTreeMap<String, u64>,
    pub cache: BTreeMap<String, u64>,
    /// Per stage: p50, p90, p99, max (ms).
    pub latency_ms: BTreeMap<String, [f64; 4]>,
    /// Per action dimension: (min, max) over every step of every chunk.
    pub action_range: Vec<(f32, f32)>,
    /// (seconds since the first Act, Acts per second) per bucket.
    pub rate: Vec<(f64, f64)>,
    pub first: Option<String>,
    pub last: Option<String>,
}

/// Reads `path` and computes its figures.
pub fn compute(path: &PathBuf) -> Result<(Figures, ReadNote), TraceToolError> {
    let mut f = Figures::default();
    let mut lat: [Vec<f32>; 6] = Default::default();
    let mut per_second: BTreeMap<i64, u64> = BTreeMap::new();
    let mut progress = Progress::new(
        "show",
        crate::input::total_bytes(std::slice::from_ref(path)),
    );
    let mut notes = for_each_act(std::slice::from_ref(path), &mut progress, |act| {
        let r = act.record;
        f.acts += 1;
        if f.first.is_none() {
            f.first = Some(r.timestamp.clone());
        }
        f.last = Some(r.timestamp.clone());
        if let Some(e) = &r.error {
            *f.errors_by_slug.entry(e.slug.clone()).or_default() += 1;
        }
        let status = r.cache.as_ref().map_or("n/a", |c| c.status.as_str());
        *f.cache.entry(status.to_string()).or_default() += 1;
        let l = &r.latency;
        for (v, x) in lat.iter_mut().zip([
            l.total_ms,
            l.queue_ms,
            l.decode_ms,
            l.prefix_ms,
            l.denoise_ms,
            l.postprocess_ms,
        ]) {
            v.push(x as f32);
        }
        let dim = r.response.action_dim as usize;
        if dim > 0 {
            if f.action_range.len() < dim {
                f.action_range
                    .resize(dim, (f32::INFINITY, f32::NEG_INFINITY));
            }
            for row in r.response.actions.chunks(dim) {
                for (range, &v) in f.action_range.iter_mut().zip(row) {
                    range.0 = range.0.min(v);
                    range.1 = range.1.max(v);
                }
            }
        }
        if let Some(ns) = crate::time::unix_nanos(&r.timestamp) {
            *per_second.entry((ns / 1_000_000_000) as i64).or_default() += 1;
        }
        Ok(())
    })?;
    for (name, mut v) in STAGES.iter().zip(lat) {
        if v.is_empty() {
            continue;
        }
        v.sort_by(f32::total_cmp);
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize] as f64;
        f.latency_ms
            .insert((*name).into(), [q(0.5), q(0.9), q(0.99), q(1.0)]);
    }
    f.rate = rate_buckets(&per_second, 20);
    Ok((f, notes.remove(0)))
}

/// Acts per second in at most `n` equal buckets from the first to the last second.
fn rate_buckets(per_second: &BTreeMap<i64, u64>, n: i64) -> Vec<(f64, f64)> {
    let (Some((&first, _)), Some((&last, _))) =
        (per_second.first_key_value(), per_second.last_key_value())
    else {
        return vec![];
    };
    let span = last - first + 1;
    let width = (span + n - 1) / n;
    let mut buckets = vec![0u64; ((span + width - 1) / width) as usize];
    for (s, c) in per_second {
        buckets[((s - first) / width) as usize] += c;
    }
    let len = buckets.len();
    buckets
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            // The last bucket may be shorter than the others.
            let secs = if i + 1 == len {
                span - width * i as i64
            } else {
                width
            };
            ((i as i64 * width) as f64, c as f64 / secs as f64)
        })
        .collect()
}

/// Prints the header and the figures.
pub fn print(note: &ReadNote, f: &Figures, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "trace {}", note.path.display())?;
    let header = serde_json::to_value(&note.header).unwrap_or_default();
    if let serde_json::Value::Object(o) = header {
        for (k, v) in o {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            writeln!(out, "  {k:<16} {v}")?;
        }
    }
    writeln!(out, "  {:<16} {}", "bytes", note.file_bytes)?;
    match (&note.footer, &note.truncation) {
        (Some(ft), _) => writeln!(
            out,
            "  {:<16} {} (total_requests {}, dropped {})",
            "ended",
            ft.ended_reason,
            ft.total_requests,
            ft.dropped_requests
                .map_or_else(|| "unknown".to_string(), |n| n.to_string())
        )?,
        (None, Some(t)) => writeln!(
            out,
            "  {:<16} cut by a crash: {t}; read up to the last whole record",
            "ended"
        )?,
        (None, None) => writeln!(out, "  {:<16} no footer (still recording?)", "ended")?,
    }
    writeln!(
        out,
        "acts: {} ({} to {})",
        f.acts,
        f.first.as_deref().unwrap_or("-"),
        f.last.as_deref().unwrap_or("-")
    )?;
    let errors: u64 = f.errors_by_slug.values().sum();
    writeln!(out, "errors: {errors}")?;
    for (slug, n) in &f.errors_by_slug {
        writeln!(out, "  {slug:<28} {n}")?;
    }
    let hits = f.cache.get("hit").copied().unwrap_or(0);
    let looked = hits + f.cache.get("miss").copied().unwrap_or(0);
    write!(out, "cache:")?;
    for (s, n) in &f.cache {
        write!(out, " {s} {n}")?;
    }
    if looked > 0 {
        writeln!(
            out,
            " (hit rate {:.1}%)",
            100.0 * hits as f64 / looked as f64
        )?;
    } else {
        writeln!(out)?;
    }
    writeln!(
        out,
        "latency (ms):  {:>12} {:>10} {:>10} {:>10} {:>10}",
        "stage", "p50", "p90", "p99", "max"
    )?;
    for stage in STAGES {
        if let Some(q) = f.latency_ms.get(stage) {
            writeln!(
                out,
                "               {stage:>12} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
                q[0], q[1], q[2], q[3]
            )?;
        }
    }
    writeln!(out, "action range per dimension:")?;
    for (i, (lo, hi)) in f.action_range.iter().enumerate() {
        writeln!(out, "  dim {i:<3} [{lo:+.6}, {hi:+.6}]")?;
    }
    writeln!(
        out,
        "act rate over time (seconds from the first act: acts/s):"
    )?;
    for (t, r) in &f.rate {
        writeln!(out, "  +{t:<8.0} {r:>8.2}")?;
    }
    Ok(())
}
