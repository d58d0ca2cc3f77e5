//! What a replay tells: the per-request results and the summary, as text lines on
//! stdout (the format of the seed's product page) and as the JSON report of `--output`
//! (schema: `replayer/REPORT.md`; keep the two in step).
//!
//! **stdout carries the report only.** Errors go to stderr; the progress bar
//! ([`crate::progress`]) goes to stderr and only when stderr is a terminal.

use std::io::{self, Write};
use std::path::Path;

use reflex_recorder::{Header, Truncation};
use serde::Serialize;

use crate::args::{Diffs, FailOn, ReplayArgs};
use crate::diff::{self, ActionsDiff, CacheDiff, ErrorDiff, LatencyDiff};
use crate::inspection::Inspection;
use crate::progress::Progress;
use crate::target::TargetInfo;

/// The result of one request record.
#[derive(Debug, Clone, Serialize)]
pub struct RequestResult {
    pub seq: u64,
    /// 1-based line of the record in the trace.
    pub line: u64,
    pub status: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actions: Option<ActionsDiff>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencyDiff>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheDiff>,
    /// Present when the call failed on either side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDiff>,
    /// SHA-256 (or a reason) of each image that could not be found; not replayed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_images: Vec<String>,
    /// The target answered UNAVAILABLE where the recorded call did not fail that way: it
    /// is gone or going, and the replay stops sending.
    #[serde(skip)]
    pub unavailable: bool,
}

/// What happened to a request record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Sent and answered (an answer or the error the recorded call also had).
    Replayed,
    /// Succeeded when recorded, failed on the target.
    TargetError,
    /// Not sent: images could not be resolved.
    NotReplayed,
}

impl RequestResult {
    /// A record whose images were not found.
    pub fn unresolved(seq: u64, line: u64, missing: Vec<String>) -> RequestResult {
        RequestResult {
            seq,
            line,
            status: Outcome::NotReplayed,
            actions: None,
            latency: None,
            cache: None,
            error: None,
            missing_images: missing,
            unavailable: false,
        }
    }

    /// The text line of this result (without `\n`).
    pub fn text(&self) -> String {
        let mut s = format!("seq={:>2}", self.seq);
        if self.status == Outcome::NotReplayed {
            let shown: Vec<String> = self
                .missing_images
                .iter()
                .take(3)
                .map(|m| {
                    if reflex_recorder::trace::is_sha256_hex(m) {
                        format!("sha256 {}…", &m[..12])
                    } else {
                        m.clone()
                    }
                })
                .collect();
            let more = self.missing_images.len().saturating_sub(shown.len());
            s.push_str(&format!(
                " images: {} not found ({}{}) [NOT REPLAYED]",
                self.missing_images.len(),
                shown.join(", "),
                if more > 0 {
                    format!(", {more} more")
                } else {
                    String::new()
                }
            ));
            return s;
        }
        if let Some(a) = &self.actions {
            match (a.cos, a.max_abs) {
                (Some(cos), Some(max)) => s.push_str(&format!(
                    " actions: cos={cos:.6} max_abs={} {}",
                    sci(max),
                    verdict(a.pass)
                )),
                _ => s.push_str(&format!(
                    " actions: {} {}",
                    a.note.as_deref().unwrap_or("-"),
                    verdict(a.pass)
                )),
            }
        }
        if let Some(l) = &self.latency {
            match (l.replayed_ms, l.delta_pct) {
                (Some(r), Some(d)) => s.push_str(&format!(
                    " latency: {} ({d:+.1}%) {}",
                    ms_pair(l.recorded_ms, r),
                    verdict(l.pass)
                )),
                _ => s.push_str(&format!(
                    " latency: {}→- {}",
                    ms(l.recorded_ms),
                    verdict(l.pass)
                )),
            }
        }
        if let Some(c) = &self.cache {
            s.push_str(&format!(
                " cache: {}→{} {}",
                c.recorded,
                c.replayed.as_deref().unwrap_or("-"),
                verdict(c.pass)
            ));
        }
        if let Some(e) = &self.error {
            let rec = e.recorded.as_ref().map_or("ok".to_string(), |r| {
                if r.slug.is_empty() {
                    "error".to_string()
                } else {
                    r.slug.clone()
                }
            });
            let rep = e.replayed.as_ref().map_or("ok".to_string(), |r| {
                format!("{} \"{}\"", r.code, one_line(&r.message, 120))
            });
            s.push_str(&format!(" error: {rec}→{rep} {}", verdict(e.pass)));
        }
        s
    }
}

/// `[PASS]` / `[FAIL]`.
fn verdict(pass: bool) -> &'static str {
    if pass { "[PASS]" } else { "[FAIL]" }
}

/// `2.09e-07`, as C's `%.2e` prints it (Rust's `{:e}` writes `2.09e-7`).
pub fn sci(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let s = format!("{x:.2e}");
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = match e.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', e),
            };
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// `3.12→3.20ms`, `98→101ms`: both with the precision the larger one needs for three
/// significant digits (our calls take milliseconds, the seed's a hundred).
pub fn ms_pair(a: f64, b: f64) -> String {
    let d = ms_decimals(a.abs().max(b.abs()));
    format!("{a:.d$}→{b:.d$}ms")
}

/// One milliseconds value with the same rule as [`ms_pair`].
pub fn ms(a: f64) -> String {
    let d = ms_decimals(a.abs());
    format!("{a:.d$}ms")
}

fn ms_decimals(big: f64) -> usize {
    if big >= 100.0 {
        0
    } else if big >= 10.0 {
        1
    } else if big >= 0.1 {
        2
    } else {
        3
    }
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

/// pass / fail / total of one kind of diff.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub pass: u64,
    pub fail: u64,
    pub total: u64,
}

impl Tally {
    fn add(&mut self, pass: bool) {
        self.total += 1;
        if pass {
            self.pass += 1;
        } else {
            self.fail += 1;
        }
    }
}

/// Why a replay ended before the trace (or `--n`) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// SIGINT/SIGTERM.
    Interrupted,
    /// A line after the header could not be read (exit 1).
    TraceError,
    /// The target answered UNAVAILABLE or went away (exit 2).
    TargetUnavailable,
}

/// The thresholds in force, as the report states them.
#[derive(Debug, Clone, Serialize)]
pub struct Thresholds {
    pub actions_min_cos: f64,
    pub actions_max_abs: f64,
    pub latency_pct: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            actions_min_cos: diff::MIN_COS,
            actions_max_abs: diff::MAX_ABS,
            latency_pct: diff::LATENCY_PCT,
        }
    }
}

/// Where the trace ended early.
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

/// Counts over the results of a replay.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Request records taken from the trace (within `--n`).
    pub records: u64,
    /// Sent and answered.
    pub replayed: u64,
    /// Replayed records that succeeded when recorded, so were diffed.
    pub diffed: u64,
    /// Not sent (images not found).
    pub not_replayed: u64,
    /// Succeeded when recorded, failed on the target.
    pub target_errors: u64,
    /// `null` when that diff was not computed.
    pub actions: Option<Tally>,
    pub latency: Option<Tally>,
    pub cache: Option<Tally>,
    /// Calls that failed when recorded: the replay must fail the same way.
    pub errors: Tally,
    pub thresholds: Thresholds,
    pub stopped: Option<Stop>,
    pub truncation: Option<TruncationInfo>,
    pub fail_on: Option<&'static str>,
    pub fail_on_triggered: bool,
}

impl Summary {
    pub fn new(diffs: Diffs, fail_on: Option<FailOn>) -> Summary {
        Summary {
            actions: diffs.actions.then(Tally::default),
            latency: diffs.latency.then(Tally::default),
            cache: diffs.cache.then(Tally::default),
            fail_on: fail_on.map(FailOn::as_str),
            ..Default::default()
        }
    }

    pub fn add(&mut self, r: &RequestResult) {
        self.records += 1;
        match r.status {
            Outcome::NotReplayed => {
                self.not_replayed += 1;
                return;
            }
            Outcome::TargetError => self.target_errors += 1,
            Outcome::Replayed => {}
        }
        self.replayed += 1;
        let recorded_failure = r.error.as_ref().is_some_and(|e| e.recorded.is_some());
        if recorded_failure {
            if let Some(e) = &r.error {
                self.errors.add(e.pass);
            }
            return;
        }
        self.diffed += 1;
        for (tally, pass) in [
            (&mut self.actions, r.actions.as_ref().map(|a| a.pass)),
            (&mut self.latency, r.latency.as_ref().map(|l| l.pass)),
            (&mut self.cache, r.cache.as_ref().map(|c| c.pass)),
        ] {
            if let (Some(t), Some(p)) = (tally.as_mut(), pass) {
                t.add(p);
            }
        }
    }

    /// Whether `--fail-on` fires. A recorded failure replayed differently counts for
    /// `actions` (the outcome of a call is what its actions diff stands for), `all` and `any`.
    pub fn fail_on_fires(&self, fail_on: Option<FailOn>) -> bool {
        let failed = |t: &Option<Tally>| t.is_some_and(|t| t.fail > 0);
        let errors = self.errors.fail > 0;
        match fail_on {
            None => false,
            Some(FailOn::Actions) => failed(&self.actions) || errors,
            Some(FailOn::Latency) => failed(&self.latency),
            Some(FailOn::Cache) => failed(&self.cache),
            Some(FailOn::All | FailOn::Any) => {
                failed(&self.actions) || failed(&self.latency) || failed(&self.cache) || errors
            }
        }
    }

    /// The `Summary:` block.
    pub fn text(&self) -> Vec<String> {
        let mut out = vec![
            "Summary:".to_string(),
            format!("replayed: {}", self.replayed),
            format!("diffed: {}", self.diffed),
        ];
        let t = &self.thresholds;
        if let Some(a) = self.actions {
            out.push(format!(
                "actions: {}/{} pass (cos≥{}, max_abs<{})",
                a.pass,
                a.total,
                t.actions_min_cos,
                short_sci(t.actions_max_abs)
            ));
        }
        if let Some(l) = self.latency {
            out.push(format!(
                "latency: {}/{} pass (within ±{}% of recorded total_ms)",
                l.pass, l.total, t.latency_pct
            ));
        }
        if let Some(c) = self.cache {
            out.push(format!("cache: {}/{} pass (status match)", c.pass, c.total));
        }
        if self.errors.total > 0 {
            out.push(format!(
                "errors: {}/{} pass (calls that failed when recorded fail alike: same gRPC code class)",
                self.errors.pass, self.errors.total
            ));
        }
        if self.target_errors > 0 {
            out.push(format!(
                "target errors: {} (calls that succeeded when recorded failed on the target)",
                self.target_errors
            ));
        }
        if self.not_replayed > 0 {
            out.push(format!(
                "not replayed: {} (images not found)",
                self.not_replayed
            ));
        }
        match self.stopped {
            None => {}
            Some(Stop::Interrupted) => {
                out.push("stopped: interrupted; the counts cover what was replayed".into())
            }
            Some(Stop::TraceError) => {
                out.push("stopped: the trace could not be read further (see the error)".into())
            }
            Some(Stop::TargetUnavailable) => {
                out.push("stopped: the target became unavailable".into())
            }
        }
        if let Some(f) = self.fail_on
            && self.fail_on_triggered
        {
            out.push(format!("fail-on {f}: triggered"));
        }
        out
    }
}

/// `1e-3` for 0.001.
fn short_sci(x: f64) -> String {
    format!("{x:e}")
}

/// The `--n=…, --diff=…` part of the "Replaying requests" line.
pub fn run_label(args: &ReplayArgs) -> String {
    let n = if args.n == 0 {
        "all".to_string()
    } else {
        args.n.to_string()
    };
    let mut s = format!("--n={n}, --diff={}", args.diffs().label());
    if args.concurrency > 1 {
        s.push_str(&format!(", --concurrency={}", args.concurrency));
    }
    s
}

/// The header block, as in the seed.
pub fn header_text(h: &Header) -> Vec<String> {
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    vec![
        format!("reflex_version: {}", or_dash(&h.reflex_version)),
        format!("model_hash: {}", or_dash(&h.model_hash)),
        format!("config_hash: {}", or_dash(&h.config_hash)),
        format!("model_type: {}", or_dash(&h.model_type)),
        format!("export_kind: {}", or_dash(&h.export_kind)),
        format!("embodiment: {}", or_dash(&h.embodiment)),
    ]
}

/// The options a run was given, as the report states them.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub diff: String,
    /// `null`: all records.
    pub n: Option<u64>,
    pub fail_on: Option<&'static str>,
    pub concurrency: u16,
    pub image_dir: Option<String>,
    pub no_replay: bool,
}

/// The JSON report of `--output`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Schema of this document; bumped on incompatible changes.
    pub report_version: u32,
    pub trace: String,
    /// The trace's header record as read; `null` when the trace could not be opened.
    pub header: Option<Header>,
    /// `null` with `--no-replay` or when no target was reached.
    pub target: Option<TargetInfo>,
    pub options: Options,
    /// `null` with `--no-replay`.
    pub summary: Option<Summary>,
    /// `--no-replay` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inspection: Option<Inspection>,
    /// One entry per request record, in seq order.
    pub requests: Vec<RequestResult>,
    pub warnings: Vec<String>,
    /// The error that decided the exit code, if one did.
    pub error: Option<String>,
    pub exit_code: u8,
}

impl Report {
    pub fn new(args: &ReplayArgs) -> Report {
        Report {
            report_version: 1,
            trace: args.trace.display().to_string(),
            header: None,
            target: None,
            options: Options {
                diff: args.diffs().label(),
                n: (args.n > 0).then_some(args.n),
                fail_on: args.fail_on.map(FailOn::as_str),
                concurrency: args.concurrency,
                image_dir: args.image_dir.as_ref().map(|p| p.display().to_string()),
                no_replay: args.no_replay,
            },
            summary: None,
            inspection: None,
            requests: Vec::new(),
            warnings: Vec::new(),
            error: None,
            exit_code: 0,
        }
    }

    /// Writes the report beside `path` and renames it into place, so a reader never sees
    /// half a report.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let mut text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        text.push(b'\n');
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);
        std::fs::write(&tmp, &text)?;
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

/// Where the text goes: stdout lines (the report), stderr for errors, and the progress
/// bar kept out of both streams' way.
pub struct Console {
    out: Box<dyn Write + Send>,
    err: Box<dyn Write + Send>,
    pub progress: Progress,
    out_is_terminal: bool,
}

impl Console {
    /// The process's stdout and stderr.
    pub fn stdio() -> Console {
        use std::io::IsTerminal;
        Console {
            out: Box::new(io::stdout()),
            err: Box::new(io::stderr()),
            progress: Progress::for_stderr(),
            out_is_terminal: io::stdout().is_terminal(),
        }
    }

    /// Given writers, no progress bar (tests).
    pub fn new(out: Box<dyn Write + Send>, err: Box<dyn Write + Send>) -> Console {
        Console {
            out,
            err,
            progress: Progress::off(),
            out_is_terminal: false,
        }
    }

    /// One report line on stdout. A broken pipe (`| head`) is not worth failing over.
    pub fn line(&mut self, s: &str) {
        let out = &mut self.out;
        if self.out_is_terminal {
            self.progress.suspend(|| writeln!(out, "{s}"))
        } else {
            writeln!(out, "{s}")
        }
        .unwrap_or(());
    }

    /// A warning: part of the report, so on stdout.
    pub fn warn(&mut self, s: &str) {
        self.line(&format!("warning: {s}"));
    }

    /// The error that ends the run, on stderr.
    pub fn error(&mut self, s: &str) {
        let _ = self.out.flush();
        let err = &mut self.err;
        self.progress.suspend(|| {
            let _ = writeln!(err, "error: {s}");
        });
    }

    pub fn flush(&mut self) {
        let _ = self.out.flush();
        let _ = self.err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(sci(0.0), "0.00e+00");
        assert_eq!(sci(2.09e-7), "2.09e-07");
        assert_eq!(sci(1.5e12), "1.50e+12");
        assert_eq!(ms_pair(98.0, 101.0), "98→101ms");
        assert_eq!(ms_pair(3.123, 3.2), "3.12→3.20ms");
        assert_eq!(ms_pair(12.34, 9.0), "12.3→9.0ms");
        assert_eq!(ms(0.0123), "0.012ms");
        assert_eq!(short_sci(1e-3), "1e-3");
    }

    #[test]
    fn lines_look_like_the_seed() {
        let r = RequestResult {
            seq: 0,
            line: 2,
            status: Outcome::Replayed,
            actions: Some(ActionsDiff::compare(
                &[1.0, 2.0],
                (1, 2),
                &[1.0, 2.0],
                (1, 2),
            )),
            latency: LatencyDiff::compare(98.0, Some(101.0)),
            cache: CacheDiff::compare("hit", Some("hit")),
            error: None,
            missing_images: vec![],
            unavailable: false,
        };
        assert_eq!(
            r.text(),
            "seq= 0 actions: cos=1.000000 max_abs=0.00e+00 [PASS] latency: 98→101ms (+3.1%) [PASS] cache: hit→hit [PASS]"
        );
        let mut s = Summary::new(Diffs::ALL, None);
        s.add(&r);
        let text = s.text().join("\n");
        assert!(
            text.contains("actions: 1/1 pass (cos≥0.999, max_abs<1e-3)"),
            "{text}"
        );
        assert!(text.contains("latency: 1/1 pass (within ±5% of recorded total_ms)"));
        assert!(text.contains("cache: 1/1 pass (status match)"));
        let u = RequestResult::unresolved(7, 9, vec!["ab".repeat(32)]);
        assert_eq!(
            u.text(),
            "seq= 7 images: 1 not found (sha256 abababababab…) [NOT REPLAYED]"
        );
    }
}
