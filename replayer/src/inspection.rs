//! `--no-replay`: reads a trace through and summarises it without a model — records and
//! seqs, time span, cache statuses, errors, recorded latency percentiles, what the trace
//! keeps of its images, the footer and any truncation.
//!
//! It imports nothing of the report (the report holds an [`Inspection`], not the other way
//! round). It runs on the calling thread, straight off the reader (the reader inflates gzip on a
//! helper thread of its own), and keeps one `f64` per record for the percentiles.

use std::collections::BTreeMap;
use std::time::Instant;

use reflex_recorder::{ReadError, Record, TraceReader, Truncation};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::format::ms;
use crate::images::{self, Kept};

/// What `--no-replay` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Inspection {
    /// Request records read (within `--n`).
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Seqs skipped between consecutive records (calls the server could not hand to the
    /// recorder, or records lost in a crash).
    pub seq_gaps: u64,
    /// `timestamp` of the first and last record.
    pub first_timestamp: Option<String>,
    pub last_timestamp: Option<String>,
    /// Seconds between them; `null` when a timestamp does not parse.
    pub span_s: Option<f64>,
    pub cache: CacheCounts,
    pub errors: ErrorCounts,
    /// Recorded `latency.total_ms` of the calls that succeeded.
    pub latency_ms: Option<Percentiles>,
    pub images: ImageCounts,
    pub footer: Option<reflex_recorder::Footer>,
    pub truncation: Option<TruncationInfo>,
    /// Header records after the first line (concatenated or rotated files).
    pub extra_headers: u64,
    /// Whether `--n` stopped the reading before the end of the file.
    pub limited: bool,
    /// Whether SIGINT stopped the reading.
    pub interrupted: bool,
    /// Decoded JSON bytes and file bytes read, and the time it took.
    pub json_bytes: u64,
    pub file_bytes: u64,
    pub read_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CacheCounts {
    pub hit: u64,
    pub miss: u64,
    /// "n/a" or anything else.
    pub other: u64,
    /// Records without a cache status (traces of the seed's tool).
    pub absent: u64,
    /// hit / (hit + miss); `null` without either.
    pub hit_ratio: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ErrorCounts {
    pub total: u64,
    /// Count per `error.slug` (empty slug as "").
    pub by_slug: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// Records by what they keep of their images.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImageCounts {
    pub bytes: u64,
    pub hashes_only: u64,
    pub none: u64,
}

/// Where the trace ended early (a crash-cut tail), as `--no-replay` and the summary of a
/// replay report it.
#[derive(Debug, Clone, Serialize)]
pub struct TruncationInfo {
    /// First line missing or cut.
    pub line: u64,
    pub reason: String,
}

impl From<&Truncation> for TruncationInfo {
    fn from(t: &Truncation) -> Self {
        TruncationInfo {
            line: t.line,
            reason: t.to_string(),
        }
    }
}

/// Reads up to `n` request records (0: all). An error after the header comes back with
/// what was read before it.
pub fn scan(
    reader: &mut TraceReader,
    n: u64,
    stop: &CancellationToken,
) -> (Inspection, Option<ReadError>) {
    let t0 = Instant::now();
    let mut ins = Inspection::default();
    let mut latencies: Vec<f64> = Vec::new();
    let mut error = None;
    loop {
        if n > 0 && ins.records >= n {
            ins.limited = true;
            break;
        }
        // Checking the token costs an atomic load; every 4096 records is plenty.
        if ins.records % 4096 == 0 && stop.is_cancelled() {
            ins.interrupted = true;
            break;
        }
        let record = match reader.next_record() {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                error = Some(e);
                break;
            }
        };
        let r = match record {
            Record::Request(r) => r,
            Record::Header(_) => {
                ins.extra_headers += 1;
                continue;
            }
            Record::Footer(_) => continue,
        };
        ins.records += 1;
        if let Some(last) = ins.last_seq
            && r.seq > last + 1
        {
            ins.seq_gaps += r.seq - last - 1;
        }
        ins.first_seq.get_or_insert(r.seq);
        ins.last_seq = Some(r.seq);
        if !r.timestamp.is_empty() {
            if ins.first_timestamp.is_none() {
                ins.first_timestamp = Some(r.timestamp.clone());
            }
            // Only the last one is kept: a String per record would be most of the cost.
            match &mut ins.last_timestamp {
                Some(t) => {
                    t.clear();
                    t.push_str(&r.timestamp);
                }
                None => ins.last_timestamp = Some(r.timestamp.clone()),
            }
        }
        match r.cache.as_ref().map(|c| c.status.as_str()) {
            Some("hit") => ins.cache.hit += 1,
            Some("miss") => ins.cache.miss += 1,
            Some("") | None => ins.cache.absent += 1,
            Some(_) => ins.cache.other += 1,
        }
        match &r.error {
            Some(e) => {
                ins.errors.total += 1;
                *ins.errors.by_slug.entry(e.slug.clone()).or_default() += 1;
            }
            None if r.latency.total_ms.is_finite() && r.latency.total_ms > 0.0 => {
                latencies.push(r.latency.total_ms)
            }
            None => {}
        }
        match images::kept(&r) {
            Kept::Bytes => ins.images.bytes += 1,
            Kept::Hashes => ins.images.hashes_only += 1,
            Kept::Nothing => ins.images.none += 1,
        }
    }
    let c = &mut ins.cache;
    c.hit_ratio = (c.hit + c.miss > 0).then(|| c.hit as f64 / (c.hit + c.miss) as f64);
    ins.latency_ms = percentiles(&mut latencies);
    if let (Some(a), Some(b)) = (&ins.first_timestamp, &ins.last_timestamp) {
        ins.span_s = unix_seconds(b)
            .zip(unix_seconds(a))
            .map(|(b, a)| ((b - a) * 1000.0).round() / 1000.0);
    }
    ins.footer = reader.footer().cloned();
    ins.truncation = reader.truncation().map(TruncationInfo::from);
    ins.json_bytes = reader.bytes_read();
    ins.file_bytes = reader.file_bytes_read();
    ins.read_s = t0.elapsed().as_secs_f64();
    (ins, error)
}

/// Nearest-rank percentiles.
fn percentiles(v: &mut [f64]) -> Option<Percentiles> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable_by(f64::total_cmp);
    let rank = |p: f64| v[(((p / 100.0) * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Some(Percentiles {
        p50: rank(50.0),
        p99: rank(99.0),
        max: v[v.len() - 1],
    })
}

/// Seconds since the Unix epoch of an RFC 3339 time (`2026-04-24T17:13:05.412Z`,
/// `...+02:00`); `None` if it is not one.
pub fn unix_seconds(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut frac = 0.0;
    if b.get(i) == Some(&b'.') {
        let start = i;
        i += 1;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        frac = s.get(start..i)?.parse::<f64>().ok()?;
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' => 0,
        sign @ (b'+' | b'-') => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            let o = oh * 3600 + om * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + sec - offset) as f64 + frac)
}

impl Inspection {
    /// The `Summary:` block of `--no-replay`.
    pub fn text(&self) -> Vec<String> {
        let mut out = vec!["Summary:".to_string()];
        let seqs = match (self.first_seq, self.last_seq) {
            (Some(a), Some(b)) => format!(" (seq {a}–{b}, {} missing)", self.seq_gaps),
            _ => String::new(),
        };
        out.push(format!("records: {}{seqs}", self.records));
        if let (Some(a), Some(b)) = (&self.first_timestamp, &self.last_timestamp) {
            let span = self
                .span_s
                .map_or(String::new(), |s| format!(" ({s:.3} s)"));
            out.push(format!("time span: {a} → {b}{span}"));
        }
        let c = &self.cache;
        let ratio = c
            .hit_ratio
            .map_or("-".to_string(), |r| format!("{:.1}%", r * 100.0));
        let mut cache = format!(
            "cache: {} hit, {} miss, {} other (hit ratio {ratio})",
            c.hit, c.miss, c.other
        );
        if c.absent > 0 {
            cache.push_str(&format!(", {} without status", c.absent));
        }
        out.push(cache);
        if self.errors.total == 0 {
            out.push("errors: 0".into());
        } else {
            let by: Vec<String> = self
                .errors
                .by_slug
                .iter()
                .map(|(slug, n)| {
                    let slug = if slug.is_empty() { "(no slug)" } else { slug };
                    format!("{slug}: {n}")
                })
                .collect();
            out.push(format!("errors: {} ({})", self.errors.total, by.join(", ")));
        }
        match &self.latency_ms {
            Some(p) => out.push(format!(
                "latency (recorded total_ms): p50 {}, p99 {}, max {}",
                ms(p.p50),
                ms(p.p99),
                ms(p.max)
            )),
            None => out.push("latency (recorded total_ms): -".into()),
        }
        let i = &self.images;
        let mut images = Vec::new();
        if i.bytes > 0 {
            images.push(format!("{} with bytes", i.bytes));
        }
        if i.hashes_only > 0 {
            images.push(format!(
                "{} with hashes only (replay needs --image-dir)",
                i.hashes_only
            ));
        }
        if i.none > 0 {
            images.push(format!("{} without images (cannot be replayed)", i.none));
        }
        if !images.is_empty() {
            out.push(format!("images: {}", images.join(", ")));
        }
        match &self.footer {
            Some(f) => out.push(format!(
                "footer: ended_reason={} total_requests={} dropped_requests={}",
                if f.ended_reason.is_empty() {
                    "-"
                } else {
                    &f.ended_reason
                },
                f.total_requests,
                crate::format::count_or_unknown(f.dropped_requests)
            )),
            None if self.limited || self.interrupted => {}
            None => out.push("footer: none (the writer did not finish the file)".into()),
        }
        match &self.truncation {
            Some(t) => out.push(format!("truncation: {}", t.reason)),
            None if self.limited => {
                out.push(format!("truncation: not checked (--n={})", self.records))
            }
            None => out.push("truncation: none".into()),
        }
        if self.extra_headers > 0 {
            out.push(format!("extra headers: {}", self.extra_headers));
        }
        if self.interrupted {
            out.push("stopped: interrupted; the counts cover what was read".into());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(
            unix_seconds("2026-04-24T17:13:05.412Z"),
            Some(1_777_050_785.412)
        );
        assert_eq!(
            unix_seconds("2026-04-24T19:13:05.412+02:00"),
            unix_seconds("2026-04-24T17:13:05.412Z")
        );
        assert_eq!(unix_seconds("yesterday"), None);
        assert_eq!(unix_seconds("2026-13-24T17:13:05Z"), None);
    }

    #[test]
    fn nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let p = percentiles(&mut v).unwrap();
        assert_eq!((p.p50, p.p99, p.max), (50.0, 99.0, 100.0));
        assert!(percentiles(&mut []).is_none());
    }
}
