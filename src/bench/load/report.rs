//! What a load run prints: its paragraph, the sweep's table, and the JSON of `--output`.

use std::collections::BTreeMap;

use reflex_proto::v1 as pb;

use super::books::BookOutcome;
use super::clients::{Load, codes};
use super::watch::Rss;
use super::{CacheMode, LoadBench};
use crate::latency::Summary;

pub(super) struct RunResult {
    pub(super) clients: u32,
    info: pb::ModelInfo,
    measured_secs: f64,
    interrupted: bool,
    pub(super) ok_all: u64,
    ok_measured: u64,
    latency: Summary,
    hits: u64,
    misses: u64,
    pub(super) server_errors_all: BTreeMap<&'static str, u64>,
    server_errors_measured: BTreeMap<&'static str, u64>,
    transport_errors: BTreeMap<&'static str, u64>,
    /// [server, recorder]; None where not measured.
    rss: [Option<Rss>; 2],
    pub(super) books: BookOutcome,
    trace_bytes: Option<u64>,
    backoff_ms: u64,
    cpu: [Option<f64>; 3],
}

impl RunResult {
    pub(super) fn new(
        clients: u32,
        args: &LoadBench,
        info: pb::ModelInfo,
        load: Load,
        rss: [Option<Rss>; 2],
        books: BookOutcome,
        trace_bytes: Option<u64>,
    ) -> RunResult {
        let mut latency = Summary::default();
        for ms in &load.tally.latency {
            latency.push(*ms);
        }
        let cpu = load.cpu;
        let t = load.tally;
        RunResult {
            clients,
            info,
            measured_secs: load.measured_secs,
            interrupted: load.interrupted,
            ok_all: t.ok_all,
            ok_measured: t.ok_measured,
            latency,
            hits: t.hits,
            misses: t.misses,
            server_errors_all: t.server_errors_all,
            server_errors_measured: t.server_errors_measured,
            transport_errors: t.transport_errors,
            rss,
            books,
            trace_bytes,
            backoff_ms: args.busy_backoff_ms,
            cpu,
        }
    }

    fn throughput(&self) -> f64 {
        if self.measured_secs > 0.0 {
            self.ok_measured as f64 / self.measured_secs
        } else {
            0.0
        }
    }

    fn hit_pct(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| 100.0 * self.hits as f64 / n as f64)
    }

    fn busy(&self) -> u64 {
        self.server_errors_measured
            .get("RESOURCE_EXHAUSTED")
            .copied()
            .unwrap_or(0)
    }

    fn other_errors(&self) -> u64 {
        self.server_errors_measured
            .iter()
            .filter(|(c, _)| **c != "RESOURCE_EXHAUSTED")
            .map(|(_, n)| n)
            .sum::<u64>()
            + self.transport_errors.values().sum::<u64>()
    }

    pub(super) fn describe(&self, args: &LoadBench) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!(
            "{} clients{} — model {} (model_hash {}, engine {}), session {}",
            self.clients,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            },
            self.info.model_type,
            self.info.model_hash,
            self.info.mode,
            self.info.session_id
        ));
        line(format!(
            "  calls:        {} OK in {:.1} s measured ({} more in warm-up): {:.1} calls/s",
            self.ok_measured,
            self.measured_secs,
            self.ok_all - self.ok_measured,
            self.throughput()
        ));
        line(format!(
            "  latency:      p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms (client round trip of OK calls)",
            self.latency.pct(50.0),
            self.latency.pct(99.0),
            self.latency.pct(99.9)
        ));
        let busy = self.busy();
        let mut others = self.server_errors_measured.clone();
        others.remove("RESOURCE_EXHAUSTED");
        line(format!(
            "  errors:       RESOURCE_EXHAUSTED {busy} (queue full: expected under overload; the client waits {} ms and calls again); other answered errors: {}; transport: {}",
            self.backoff_ms,
            codes(&others),
            codes(&self.transport_errors)
        ));
        let off = args.target.is_none() && args.cache == CacheMode::Off;
        line(match self.hit_pct() {
            _ if off => format!(
                "  cache:        off (--cache-entries 0): {} hits, {} misses",
                self.hits, self.misses
            ),
            Some(p) => format!(
                "  cache:        {p:.0}% hits ({} of {} OK calls; scene frames repeat only while the arm pauses)",
                self.hits,
                self.hits + self.misses
            ),
            None => {
                "  cache:        no hit or miss in the answers (the server's cache is off)".into()
            }
        });
        let cores = |c: Option<f64>| c.map_or("-".to_string(), |c| format!("{c:.2}"));
        line(format!(
            "  cpu:          server {}, recorder {}, clients (this process) {} cores of {} (measured window)",
            cores(self.cpu[0]),
            cores(self.cpu[1]),
            cores(self.cpu[2]),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ));
        for (who, rss) in ["server", "recorder"].iter().zip(&self.rss) {
            line(match rss {
                Some(r) => format!(
                    "  {:<14}peak {} (VmHWM at the end of the load), sampled max {:.1} MiB",
                    format!("{who} RSS:"),
                    r.hwm_kib.map_or("unknown".into(), |k| format!(
                        "{:.1} MiB",
                        k as f64 / 1024.0
                    )),
                    r.sampled_max_kib as f64 / 1024.0
                ),
                None => format!(
                    "  {:<14}skipped (give --{who}-pid with --target)",
                    format!("{who} RSS:")
                ),
            });
        }
        if let Some(b) = self.trace_bytes {
            let images = match &args.target {
                Some(_) => String::new(),
                None => format!(", images {}", args.record_images.as_str()),
            };
            line(format!(
                "  trace:        {:.1} KB on disk ({:.2} KB per answered call{images})",
                b as f64 / 1024.0,
                b as f64
                    / 1024.0
                    / (self.ok_all + self.server_errors_all.values().sum::<u64>()).max(1) as f64,
            ));
        }
        match &self.books {
            BookOutcome::Pass { line: l, notes } => {
                line(format!("  {l}"));
                for n in notes {
                    line(format!("         {n}"));
                }
            }
            BookOutcome::Fail(why) => line(format!("  books: FAIL ({why})")),
            BookOutcome::Skipped(why) => line(format!("  books: skipped ({why})")),
        }
        s.trim_end().to_string()
    }

    pub(super) fn json(&self) -> serde_json::Value {
        let rss = |r: &Option<Rss>| {
            r.map(|r| {
                serde_json::json!({
                    "peak_kib": r.hwm_kib,
                    "sampled_max_kib": r.sampled_max_kib,
                })
            })
        };
        let (books, books_detail) = match &self.books {
            BookOutcome::Pass { line, notes } => ("pass", serde_json::json!([line, notes])),
            BookOutcome::Fail(why) => ("fail", serde_json::json!(why)),
            BookOutcome::Skipped(why) => ("skipped", serde_json::json!(why)),
        };
        let pct = |p: f64| {
            let v = self.latency.pct(p);
            v.is_finite().then_some(v)
        };
        serde_json::json!({
            "clients": self.clients,
            "interrupted": self.interrupted,
            "model_hash": self.info.model_hash,
            "mode": self.info.mode,
            "session_id": self.info.session_id,
            "measured_secs": self.measured_secs,
            "ok": self.ok_measured,
            "ok_including_warmup": self.ok_all,
            "throughput_per_s": self.throughput(),
            "latency_ms": {"p50": pct(50.0), "p99": pct(99.0), "p999": pct(99.9)},
            "errors": self.server_errors_measured,
            "errors_including_warmup": self.server_errors_all,
            "transport_errors": self.transport_errors,
            "cache": {"hits": self.hits, "misses": self.misses, "hit_pct": self.hit_pct()},
            "server_rss": rss(&self.rss[0]),
            "recorder_rss": rss(&self.rss[1]),
            "trace_bytes": self.trace_bytes,
            "cpu_cores": {"server": self.cpu[0], "recorder": self.cpu[1], "clients": self.cpu[2]},
            "books": books,
            "books_detail": books_detail,
        })
    }
}

pub(super) fn table(results: &[RunResult]) -> String {
    let mut out = format!(
        "{:>7} {:>9} {:>9} {:>9} {:>9} {:>8} {:>10} {:>6} {:>6} {:>9} {:>10} {:>12} {:>6}\n",
        "clients",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "OK",
        "RES_EXH",
        "other",
        "hit %",
        "srv cpu",
        "server MiB",
        "recorder MiB",
        "books"
    );
    let mib = |r: &Option<Rss>| r.map_or("-".to_string(), |r| format!("{:.1}", r.peak_mib()));
    for r in results {
        out.push_str(&format!(
            "{:>7} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>10} {:>6} {:>6} {:>9} {:>10} {:>12} {:>6}\n",
            r.clients,
            r.throughput(),
            r.latency.pct(50.0),
            r.latency.pct(99.0),
            r.latency.pct(99.9),
            r.ok_measured,
            r.busy(),
            r.other_errors(),
            r.hit_pct().map_or("-".into(), |p| format!("{p:.0}")),
            r.cpu[0].map_or("-".into(), |c| format!("{c:.2}")),
            mib(&r.rss[0]),
            mib(&r.rss[1]),
            match r.books {
                BookOutcome::Pass { .. } => "PASS",
                BookOutcome::Fail(_) => "FAIL",
                BookOutcome::Skipped(_) => "skip",
            }
        ));
    }
    out.trim_end().to_string()
}
