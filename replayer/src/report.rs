//! What a replay tells: the per-request results and the summary, as text lines on
//! stdout (the format of the seed's product page) and as the JSON report of `--output`
//! (schema: README.md, "Replay report"; keep the two in step). Per-kind fields (`actions`,
//! `latency`, `cache`) come from [`crate::diff::Kind`], not from this module.
//!
//! **stdout carries the report only.** Errors go to stderr; the progress bar
//! ([`crate::progress`]) goes to stderr and only when stderr is a terminal.

use std::io::{self, Write};
use std::path::Path;

use reflex_recorder::Header;
use serde::Serialize;

use crate::args::{FailOn, ReplayArgs};
use crate::diff::{Diffs, ErrorDiff, Kind, KindSet, Tallies, Tally, Thresholds};
use crate::format::{one_line, verdict};
use crate::inspection::{Inspection, TruncationInfo};
use crate::progress::Progress;
use crate::target::TargetInfo;

/// The result of one request record.
#[derive(Debug, Clone, Serialize)]
pub struct RequestResult {
    /// The trace file of this record; only in a fleet run of several trace files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    pub seq: u64,
    /// 1-based line of the record in the trace.
    pub line: u64,
    pub status: Outcome,
    /// One field per kind computed (`actions`, `latency`, `cache`), absent otherwise.
    #[serde(flatten)]
    pub diffs: Diffs,
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
    /// The index of the trace file in a fleet run (0 otherwise): the report sorts on it.
    #[serde(skip)]
    pub trace_index: usize,
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
            trace: None,
            seq,
            line,
            status: Outcome::NotReplayed,
            diffs: Diffs::default(),
            error: None,
            missing_images: missing,
            unavailable: false,
            trace_index: 0,
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
        for d in self.diffs.iter() {
            s.push(' ');
            s.push_str(&d.text());
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
    /// Fleet runs: every target died before the records ran out (exit 2).
    AllTargetsDead,
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
    /// One field per [`Kind`] (`actions`, `latency`, `cache`): `null` when that diff was
    /// not computed.
    #[serde(flatten)]
    pub tallies: Tallies,
    /// Calls that failed when recorded: the replay must fail the same way.
    pub errors: Tally,
    pub thresholds: Thresholds,
    pub stopped: Option<Stop>,
    pub truncation: Option<TruncationInfo>,
    pub fail_on: Option<&'static str>,
    pub fail_on_triggered: bool,
    /// Fleet runs only: records taken back from a target that died and sent to another
    /// (a record counts once per move).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_over: Option<u64>,
    /// Fleet runs only: targets that died (or could not be reached at the start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_targets: Option<u64>,
}

impl Summary {
    pub fn new(diffs: KindSet, fail_on: Option<FailOn>) -> Summary {
        Summary {
            tallies: Tallies::new(diffs),
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
        for d in r.diffs.iter() {
            self.tallies.add(d);
        }
    }

    /// The tally of `kind`; `None` when the run does not compute it.
    pub fn tally(&self, kind: Kind) -> Option<Tally> {
        self.tallies.get(kind)
    }

    /// Whether `--fail-on` fires. A recorded failure replayed differently counts for
    /// `actions` (the outcome of a call is what its actions diff stands for), `all` and `any`.
    pub fn fail_on_fires(&self, fail_on: Option<FailOn>) -> bool {
        let failed = |k: Kind| self.tally(k).is_some_and(|t| t.fail > 0);
        let errors = self.errors.fail > 0;
        match fail_on {
            None => false,
            Some(FailOn::One(k)) => failed(k) || (k.counts_call_outcome() && errors),
            Some(FailOn::All | FailOn::Any) => Kind::ALL.into_iter().any(failed) || errors,
        }
    }

    /// The `Summary:` block.
    pub fn text(&self) -> Vec<String> {
        let mut out = vec![
            "Summary:".to_string(),
            format!("replayed: {}", self.replayed),
            format!("diffed: {}", self.diffed),
        ];
        for k in Kind::ALL {
            if let Some(t) = self.tally(k) {
                out.push(format!("{k}: {}/{} pass ({})", t.pass, t.total, k.rule()));
            }
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
        if let Some(n) = self.failed_over.filter(|&n| n > 0) {
            out.push(format!(
                "failed over: {n} (records taken back from a dead target and replayed on another)"
            ));
        }
        if let Some(n) = self.dead_targets.filter(|&n| n > 0) {
            out.push(format!("dead targets: {n}"));
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
            Some(Stop::AllTargetsDead) => {
                out.push("stopped: every target died; the counts cover what was replayed".into())
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
        format!("providers: {}", or_dash(&h.providers.join(", "))),
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

/// One trace file of a fleet run, as the report lists it.
#[derive(Debug, Clone, Serialize)]
pub struct TraceEntry {
    pub path: String,
    pub model_hash: String,
    pub session_id: String,
    /// Request records taken from this file.
    pub records: u64,
}

/// One target of a fleet run, as the report lists it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetEntry {
    pub uri: String,
    /// From `GetModelInfo`; `null` when the target could not be reached at the start.
    pub info: Option<TargetInfo>,
    /// Records this target answered (results in the report).
    pub replayed: u64,
    /// Records taken back from this target when it died (in flight or queued) and sent
    /// to another.
    pub failed_over_from: u64,
    /// Whether it died (or was unreachable at the start).
    pub dead: bool,
    /// Why it died.
    pub error: Option<String>,
    /// Wall time of this target's answered calls, as the replayer measured it (ms);
    /// `null` when it answered none.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
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
    /// One entry per request record, in seq order (a fleet run: in (trace, seq) order);
    /// kept only for `--output` (see [`Report::push`]).
    pub requests: Vec<RequestResult>,
    /// Fleet runs only: the trace files replayed, in the order of `trace_index`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub traces: Vec<TraceEntry>,
    /// Fleet runs only: one entry per target, in the order given.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetEntry>,
    pub warnings: Vec<String>,
    /// The error that decided the exit code, if one did.
    pub error: Option<String>,
    pub exit_code: u8,
    /// Whether entries are kept: a long replay without `--output` holds no list of them.
    #[serde(skip)]
    keep_requests: bool,
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
            traces: Vec::new(),
            targets: Vec::new(),
            warnings: Vec::new(),
            error: None,
            exit_code: 0,
            keep_requests: args.output.is_some(),
        }
    }

    /// Sorts the entries by (trace, seq, line): a fleet run's answers arrive in any order.
    pub fn sort_requests(&mut self) {
        self.requests
            .sort_by_key(|r| (r.trace_index, r.seq, r.line));
    }

    /// Adds one request's result (dropped without `--output`).
    pub fn push(&mut self, r: RequestResult) {
        if self.keep_requests {
            self.requests.push(r);
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
    use crate::diff::{ActionsDiff, CacheDiff, Diff, LatencyDiff};

    fn passing() -> RequestResult {
        RequestResult {
            trace: None,
            trace_index: 0,
            seq: 0,
            line: 2,
            status: Outcome::Replayed,
            diffs: [
                Diff::Actions(ActionsDiff::compare(
                    &[1.0, 2.0],
                    (1, 2),
                    &[1.0, 2.0],
                    (1, 2),
                )),
                Diff::Latency(LatencyDiff::compare(98.0, Some(101.0)).unwrap()),
                Diff::Cache(CacheDiff::compare("hit", Some("hit")).unwrap()),
            ]
            .into_iter()
            .collect(),
            error: None,
            missing_images: vec![],
            unavailable: false,
        }
    }

    #[test]
    fn lines_look_like_the_seed() {
        let r = passing();
        assert_eq!(
            r.text(),
            "seq= 0 actions: cos=1.000000 max_abs=0.00e+00 [PASS] latency: 98→101ms (+3.1%) [PASS] cache: hit→hit [PASS]"
        );
        let mut s = Summary::new(KindSet::ALL, None);
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

    #[test]
    fn requests_are_kept_only_for_output() {
        let mut args = ReplayArgs::new("t.jsonl");
        let mut report = Report::new(&args);
        report.push(passing());
        assert!(
            report.requests.is_empty(),
            "entries are kept only for --output"
        );
        args.output = Some("r.json".into());
        let mut report = Report::new(&args);
        report.push(passing());
        assert_eq!(report.requests.len(), 1);
        let v = serde_json::to_value(&report).unwrap();
        let r = &v["requests"][0];
        assert_eq!(r["actions"]["cos"], 1.0);
        assert_eq!(r["cache"]["recorded"], "hit");
        assert_eq!(r["latency"]["replayed_ms"], 101.0);
        assert!(r.get("diffs").is_none(), "flattened");
    }

    #[test]
    fn fail_on_fires_per_kind() {
        let mut r = passing();
        r.diffs = [Diff::Latency(LatencyDiff::compare(3.0, Some(9.0)).unwrap())]
            .into_iter()
            .collect();
        let mut s = Summary::new(KindSet::ALL, None);
        s.add(&r);
        assert!(s.fail_on_fires(Some(FailOn::One(Kind::Latency))));
        assert!(!s.fail_on_fires(Some(FailOn::One(Kind::Actions))));
        assert!(!s.fail_on_fires(Some(FailOn::One(Kind::Cache))));
        assert!(s.fail_on_fires(Some(FailOn::Any)));
        assert!(!s.fail_on_fires(None));
        // A recorded failure replayed differently counts for actions, all and any.
        let mut s = Summary::new(KindSet::ALL, None);
        s.errors.add(false);
        assert!(s.fail_on_fires(Some(FailOn::One(Kind::Actions))));
        assert!(!s.fail_on_fires(Some(FailOn::One(Kind::Latency))));
        assert!(s.fail_on_fires(Some(FailOn::All)));
    }
}
