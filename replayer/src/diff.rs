//! The comparisons: one recorded call against its replay, per [`Kind`] of diff.
//!
//! Thresholds (SPEC "Replay"): actions pass when cos ≥ 0.999 **and** max |Δ| < 1e-3;
//! latency when the target's `latency.total_ms` is within ±5 % of the recorded
//! `total_ms`; cache when the target's own status equals the recorded one. A call that
//! failed when recorded passes when the replay fails in the same class of gRPC code
//! ([`ErrorClass`]).
//!
//! **[`Kind`] is the one list of diffs.** The flags (`--diff`, `--fail-on`), the compare
//! step, the tallies, the console lines and the JSON report all iterate [`Kind::ALL`]; a
//! new kind is a variant here, its arms in the `match`es of `impl Kind` and `impl Diff`,
//! its result type, and its test below. Nothing else names a kind.
//!
//! Pure functions: no I/O, so every rule is tested here on numbers.

use reflex_proto::errors::{ErrorSlug, code_from_name};
use reflex_proto::v1::ActResponse;
use reflex_recorder::RequestRecord;
use serde::Serialize;
use serde::ser::SerializeMap;
use tonic::Code;

use crate::format::{ms, ms_pair, sci, short_sci, verdict};
/// The canonical gRPC code names are the wire contract's (`reflex_proto::errors`).
pub use reflex_proto::errors::code_name;

/// Smallest cosine similarity that passes.
pub const MIN_COS: f64 = 0.999;
/// max |Δ| must stay below this.
pub const MAX_ABS: f64 = 1e-3;
/// Largest |Δ| of total latency that passes, in percent of the recorded total.
pub const LATENCY_PCT: f64 = 5.0;

/// A kind of diff: what a replayed call is compared on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Cosine similarity and max |Δ| of the action chunk.
    Actions,
    /// The target's `latency.total_ms` against the recorded one.
    Latency,
    /// The target's own cache status against the recorded one.
    Cache,
}

impl Kind {
    /// Every kind, in the order lines, summaries and reports show them.
    pub const ALL: [Kind; 3] = [Kind::Actions, Kind::Latency, Kind::Cache];
    /// How many kinds there are.
    pub const COUNT: usize = Kind::ALL.len();

    /// The name in flags, lines and the JSON report.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Actions => "actions",
            Kind::Latency => "latency",
            Kind::Cache => "cache",
        }
    }

    /// The help of its `--diff` value.
    pub fn help(self) -> &'static str {
        match self {
            Kind::Actions => "Cosine similarity and max |Δ| of the action chunk",
            Kind::Latency => "The target's latency.total_ms against the recorded one (±5 %)",
            Kind::Cache => "The target's own cache status against the recorded one",
        }
    }

    /// The pass rule, as the summary line states it.
    pub fn rule(self) -> String {
        match self {
            Kind::Actions => format!("cos≥{MIN_COS}, max_abs<{}", short_sci(MAX_ABS)),
            Kind::Latency => format!("within ±{LATENCY_PCT}% of recorded total_ms"),
            Kind::Cache => "status match".to_string(),
        }
    }

    /// Its thresholds, as the JSON report's `summary.thresholds` names them.
    pub fn thresholds(self) -> &'static [(&'static str, f64)] {
        match self {
            Kind::Actions => &[("actions_min_cos", MIN_COS), ("actions_max_abs", MAX_ABS)],
            Kind::Latency => &[("latency_pct", LATENCY_PCT)],
            Kind::Cache => &[],
        }
    }

    /// Whether this diff stands for the outcome of the call, so that a recorded failure
    /// replayed differently fails it too (for `--fail-on`).
    pub fn counts_call_outcome(self) -> bool {
        matches!(self, Kind::Actions)
    }

    /// Compares a recorded call that succeeded with the target's answer (or its error).
    /// `None` when the trace has nothing to compare with for this kind.
    pub fn compare(
        self,
        record: &RequestRecord,
        reply: Result<&ActResponse, &tonic::Status>,
    ) -> Option<Diff> {
        match self {
            Kind::Actions => Some(Diff::Actions(match reply {
                Ok(resp) => ActionsDiff::compare(
                    &record.response.actions,
                    (record.response.num_actions, record.response.action_dim),
                    &resp.actions,
                    (resp.num_actions, resp.action_dim),
                ),
                Err(s) => ActionsDiff::failed(format!("target error {}", code_name(s.code()))),
            })),
            Kind::Latency => LatencyDiff::compare(
                record.latency.total_ms,
                reply
                    .ok()
                    .and_then(|r| r.latency.as_ref())
                    .map(|l| l.total_ms),
            )
            .map(Diff::Latency),
            Kind::Cache => CacheDiff::compare(
                record.cache.as_ref().map_or("", |c| c.status.as_str()),
                reply.ok().map(|r| r.cache.as_str()),
            )
            .map(Diff::Cache),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of kinds: the diffs a run computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KindSet(u32);

impl KindSet {
    pub const ALL: KindSet = KindSet((1 << Kind::COUNT) - 1);
    pub const EMPTY: KindSet = KindSet(0);

    pub fn of(kind: Kind) -> KindSet {
        KindSet(1 << kind.index())
    }

    pub fn insert(&mut self, kind: Kind) {
        self.0 |= 1 << kind.index();
    }

    pub fn contains(self, kind: Kind) -> bool {
        self.0 & (1 << kind.index()) != 0
    }

    /// The kinds in the set, in [`Kind::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Kind> {
        Kind::ALL.into_iter().filter(move |k| self.contains(*k))
    }

    /// `all`, or the names joined by commas (as the report's first line shows them).
    pub fn label(self) -> String {
        if self == KindSet::ALL {
            return "all".into();
        }
        self.iter().map(Kind::as_str).collect::<Vec<_>>().join(",")
    }
}

/// One kind's comparison of one call.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Diff {
    Actions(ActionsDiff),
    Latency(LatencyDiff),
    Cache(CacheDiff),
}

impl Diff {
    pub fn kind(&self) -> Kind {
        match self {
            Diff::Actions(_) => Kind::Actions,
            Diff::Latency(_) => Kind::Latency,
            Diff::Cache(_) => Kind::Cache,
        }
    }

    pub fn pass(&self) -> bool {
        match self {
            Diff::Actions(d) => d.pass,
            Diff::Latency(d) => d.pass,
            Diff::Cache(d) => d.pass,
        }
    }

    /// Its part of the request's console line, e.g. `cache: hit→hit [PASS]`.
    pub fn text(&self) -> String {
        let body = match self {
            Diff::Actions(a) => match (a.cos, a.max_abs) {
                (Some(cos), Some(max)) => format!("cos={cos:.6} max_abs={}", sci(max)),
                _ => a.note.as_deref().unwrap_or("-").to_string(),
            },
            Diff::Latency(l) => match (l.replayed_ms, l.delta_pct) {
                (Some(r), Some(d)) => format!("{} ({d:+.1}%)", ms_pair(l.recorded_ms, r)),
                _ => format!("{}→-", ms(l.recorded_ms)),
            },
            Diff::Cache(c) => format!("{}→{}", c.recorded, c.replayed.as_deref().unwrap_or("-")),
        };
        format!("{}: {body} {}", self.kind(), verdict(self.pass()))
    }
}

/// The diffs of one call, in [`Kind::ALL`] order; in JSON, one field per kind computed
/// (`"actions": {…}, "cache": {…}`), flattened into the request's entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diffs(Vec<Diff>);

impl Diffs {
    pub fn push(&mut self, d: Diff) {
        debug_assert!(self.get(d.kind()).is_none(), "one diff per kind");
        self.0.push(d);
        self.0.sort_by_key(Diff::kind);
    }

    pub fn get(&self, kind: Kind) -> Option<&Diff> {
        self.0.iter().find(|d| d.kind() == kind)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diff> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<Diff> for Diffs {
    fn from_iter<I: IntoIterator<Item = Diff>>(iter: I) -> Diffs {
        let mut d = Diffs::default();
        for x in iter {
            d.push(x);
        }
        d
    }
}

impl Serialize for Diffs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for d in &self.0 {
            m.serialize_entry(d.kind().as_str(), d)?;
        }
        m.end()
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
    pub fn add(&mut self, pass: bool) {
        self.total += 1;
        if pass {
            self.pass += 1;
        } else {
            self.fail += 1;
        }
    }
}

/// A [`Tally`] per kind computed; in JSON one field per kind, `null` for a kind the run
/// did not compute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tallies([Option<Tally>; Kind::COUNT]);

impl Tallies {
    /// Zero tallies for the kinds in `kinds`.
    pub fn new(kinds: KindSet) -> Tallies {
        let mut t = Tallies::default();
        for k in kinds.iter() {
            t.0[k.index()] = Some(Tally::default());
        }
        t
    }

    /// `None` when the run does not compute `kind`.
    pub fn get(&self, kind: Kind) -> Option<Tally> {
        self.0[kind.index()]
    }

    /// Counts `d` when its kind is computed.
    pub fn add(&mut self, d: &Diff) {
        if let Some(t) = &mut self.0[d.kind().index()] {
            t.add(d.pass());
        }
    }
}

impl Serialize for Tallies {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(Kind::COUNT))?;
        for k in Kind::ALL {
            m.serialize_entry(k.as_str(), &self.get(k))?;
        }
        m.end()
    }
}

/// The thresholds in force, as the report states them (each kind's [`Kind::thresholds`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Thresholds;

impl Serialize for Thresholds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for k in Kind::ALL {
            for (name, value) in k.thresholds() {
                m.serialize_entry(name, value)?;
            }
        }
        m.end()
    }
}

/// Actions of one call, recorded against replayed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActionsDiff {
    /// Cosine similarity of the flattened chunks; `null` when not comparable.
    pub cos: Option<f64>,
    /// Largest absolute difference of one value; `null` when not comparable.
    pub max_abs: Option<f64>,
    pub pass: bool,
    /// Why there are no numbers (shape mismatch, target error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl ActionsDiff {
    /// Compares two row-major chunks with their shapes.
    pub fn compare(
        recorded: &[f32],
        recorded_shape: (u32, u32),
        replayed: &[f32],
        replayed_shape: (u32, u32),
    ) -> ActionsDiff {
        if recorded.len() != replayed.len() || recorded_shape != replayed_shape {
            return ActionsDiff::failed(format!(
                "shape {}x{} ({} values) → {}x{} ({} values)",
                recorded_shape.0,
                recorded_shape.1,
                recorded.len(),
                replayed_shape.0,
                replayed_shape.1,
                replayed.len()
            ));
        }
        let (mut dot, mut na, mut nb, mut max_abs) = (0f64, 0f64, 0f64, 0f64);
        let mut identical = true;
        for (&a, &b) in recorded.iter().zip(replayed) {
            identical &= a.to_bits() == b.to_bits();
            if a.is_nan() && b.is_nan() {
                // null in the trace and NaN again: the same (non-)value.
                continue;
            }
            let (a, b) = (f64::from(a), f64::from(b));
            let d = (a - b).abs();
            // NaN on one side only, or infinities that differ: no finite distance.
            max_abs = if d.is_nan() {
                f64::INFINITY
            } else {
                max_abs.max(d)
            };
            if a.is_finite() && b.is_finite() {
                dot += a * b;
                na += a * a;
                nb += b * b;
            }
        }
        let cos = if identical {
            // Bit-exact: exactly 1, not whatever rounding makes of dot / (|a| |b|).
            1.0
        } else if na == 0.0 && nb == 0.0 {
            1.0
        } else if na == 0.0 || nb == 0.0 {
            0.0
        } else {
            (dot / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0)
        };
        ActionsDiff {
            cos: Some(cos),
            max_abs: Some(max_abs),
            pass: cos >= MIN_COS && max_abs < MAX_ABS,
            note: None,
        }
    }

    /// A failed comparison without numbers.
    pub fn failed(note: String) -> ActionsDiff {
        ActionsDiff {
            cos: None,
            max_abs: None,
            pass: false,
            note: Some(note),
        }
    }
}

/// `latency.total_ms`, recorded against replayed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencyDiff {
    pub recorded_ms: f64,
    /// `null` when the target answered with an error.
    pub replayed_ms: Option<f64>,
    /// (replayed − recorded) / recorded × 100.
    pub delta_pct: Option<f64>,
    pub pass: bool,
}

impl LatencyDiff {
    /// `None` when the trace has no latency to compare with (0 or not finite).
    pub fn compare(recorded_ms: f64, replayed_ms: Option<f64>) -> Option<LatencyDiff> {
        if !(recorded_ms.is_finite() && recorded_ms > 0.0) {
            return None;
        }
        let delta_pct = replayed_ms.map(|r| (r - recorded_ms) / recorded_ms * 100.0);
        Some(LatencyDiff {
            recorded_ms,
            replayed_ms,
            delta_pct,
            pass: delta_pct.is_some_and(|d| d.abs() <= LATENCY_PCT),
        })
    }
}

/// Prefix-cache status, recorded against the target's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheDiff {
    pub recorded: String,
    /// `null` when the target answered with an error.
    pub replayed: Option<String>,
    pub pass: bool,
}

impl CacheDiff {
    /// `None` when the trace has no status (traces of the seed's tool).
    pub fn compare(recorded: &str, replayed: Option<&str>) -> Option<CacheDiff> {
        if recorded.is_empty() {
            return None;
        }
        Some(CacheDiff {
            recorded: recorded.to_string(),
            replayed: replayed.map(str::to_string),
            pass: replayed == Some(recorded),
        })
    }
}

/// A call that failed on either side: what failed, and whether the outcomes agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorDiff {
    /// `{slug, message}` from the trace; `null` when the recorded call succeeded.
    pub recorded: Option<RecordedError>,
    /// `{code, message}` of the target's status; `null` when the replay succeeded.
    pub replayed: Option<ReplayedError>,
    pub pass: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedError {
    pub slug: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayedError {
    /// gRPC code name, e.g. `INVALID_ARGUMENT`.
    pub code: String,
    pub message: String,
}

impl ErrorDiff {
    /// Both sides' outcomes; `None` when both succeeded.
    pub fn compare(
        recorded: Option<RecordedError>,
        replayed: Option<&tonic::Status>,
    ) -> Option<ErrorDiff> {
        if recorded.is_none() && replayed.is_none() {
            return None;
        }
        let pass = match (&recorded, replayed) {
            (Some(r), Some(s)) => match ErrorClass::of_slug(&r.slug) {
                // A slug we cannot place (seed traces often have none): any failure agrees.
                None => true,
                Some(class) => class == ErrorClass::of(s.code()),
            },
            _ => false,
        };
        Some(ErrorDiff {
            recorded,
            replayed: replayed.map(|s| ReplayedError {
                code: code_name(s.code()).to_string(),
                message: s.message().to_string(),
            }),
            pass,
        })
    }
}

/// What kind of failure a gRPC code is. Codes in one class count as the same outcome:
/// the server may say `OUT_OF_RANGE` where it used to say `INVALID_ARGUMENT` for the same
/// bad input, but a request the model rejected is never the same as a server that was busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request itself is wrong (the same request fails again anywhere).
    Request,
    /// The server could not take the call then (queue full, shutting down, timeouts).
    Capacity,
    /// The server failed on a good request.
    Server,
}

impl ErrorClass {
    pub fn of(code: Code) -> ErrorClass {
        match code {
            Code::InvalidArgument
            | Code::OutOfRange
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated => ErrorClass::Request,
            Code::ResourceExhausted
            | Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted => ErrorClass::Capacity,
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss | Code::Unimplemented => {
                ErrorClass::Server
            }
        }
    }

    /// The class of a recorded `error.slug`: one of the server's own slugs or a gRPC code
    /// name, in any case and with `-` or `_` (`queue-full`, `INVALID_ARGUMENT`,
    /// `invalid-argument`). `None`: unknown or empty.
    pub fn of_slug(slug: &str) -> Option<ErrorClass> {
        let slug = slug.trim();
        let code = match ErrorSlug::parse(&slug.to_ascii_lowercase().replace('_', "-")) {
            // The server's slugs name the code it answered with.
            Some(s) => s.code(),
            None => code_from_name(&slug.to_ascii_uppercase().replace('-', "_"))?,
        };
        Some(ErrorClass::of(code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reflex_proto::v1::Latency;
    use reflex_recorder::trace::{CacheInfo, TraceLatency, TraceResponse};

    /// A recorded call that succeeded: a 1×2 chunk, 3 ms, a cache hit.
    fn record() -> RequestRecord {
        RequestRecord {
            response: TraceResponse {
                actions: vec![0.5, -0.25],
                num_actions: 1,
                action_dim: 2,
            },
            latency: TraceLatency {
                total_ms: 3.0,
                ..Default::default()
            },
            cache: Some(CacheInfo {
                status: "hit".into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn kinds_are_listed_once_in_order_with_distinct_names() {
        for (i, k) in Kind::ALL.into_iter().enumerate() {
            assert_eq!(k.index(), i, "ALL is in declaration order");
            assert!(!k.help().is_empty() && !k.rule().is_empty());
        }
        let mut names: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Kind::COUNT);
        assert!(
            !names.contains(&"all") && !names.contains(&"any"),
            "flag words"
        );
        assert_eq!(KindSet::ALL.iter().collect::<Vec<_>>(), Kind::ALL);
        assert_eq!(KindSet::ALL.label(), "all");
        let mut s = KindSet::of(Kind::Cache);
        s.insert(Kind::Actions);
        assert_eq!(s.label(), "actions,cache");
        assert_eq!(KindSet::EMPTY.label(), "");
    }

    #[test]
    fn each_kind_compares_an_answer_and_an_error() {
        let r = record();
        let same = ActResponse {
            actions: vec![0.5, -0.25],
            num_actions: 1,
            action_dim: 2,
            cache: "hit".into(),
            latency: Some(Latency {
                total_ms: 3.1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let error = tonic::Status::internal("boom");
        for k in Kind::ALL {
            let ok = k
                .compare(&r, Ok(&same))
                .expect("the record has data for every kind");
            assert_eq!(ok.kind(), k);
            assert!(ok.pass(), "{k}: {ok:?}");
            assert!(ok.text().starts_with(&format!("{k}: ")), "{}", ok.text());
            assert!(ok.text().ends_with(" [PASS]"));
            let failed = k
                .compare(&r, Err(&error))
                .expect("an error is a failed diff");
            assert!(!failed.pass(), "{k}: {failed:?}");
            assert!(failed.text().ends_with(" [FAIL]"));
        }
        let mut other = same.clone();
        other.actions = vec![-0.5, 0.25];
        other.cache = "miss".into();
        other.latency = Some(Latency {
            total_ms: 30.0,
            ..Default::default()
        });
        for k in Kind::ALL {
            assert!(!k.compare(&r, Ok(&other)).unwrap().pass(), "{k}");
        }
        // Nothing to compare with: no recorded latency, no recorded cache status.
        let bare = RequestRecord::default();
        assert!(Kind::Latency.compare(&bare, Ok(&same)).is_none());
        assert!(Kind::Cache.compare(&bare, Ok(&same)).is_none());
    }

    #[test]
    fn per_kind_json_fields() {
        let r = record();
        let d: Diffs = [Kind::Cache, Kind::Actions]
            .into_iter()
            .filter_map(|k| k.compare(&r, Err(&tonic::Status::unavailable("x"))))
            .collect();
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["actions"]["note"], "target error UNAVAILABLE");
        assert_eq!(v["cache"]["replayed"], serde_json::Value::Null);
        assert!(v.get("latency").is_none());
        let kinds: Vec<Kind> = d.iter().map(Diff::kind).collect();
        assert_eq!(kinds, [Kind::Actions, Kind::Cache], "in Kind::ALL order");

        let mut t = Tallies::new(KindSet::of(Kind::Actions));
        for x in d.iter() {
            t.add(x);
        }
        let v = serde_json::to_value(t).unwrap();
        assert_eq!(v["actions"]["fail"], 1);
        assert_eq!(v["cache"], serde_json::Value::Null, "not computed");
        assert_eq!(v["latency"], serde_json::Value::Null);
        let v = serde_json::to_value(Thresholds).unwrap();
        assert_eq!(v["actions_min_cos"], 0.999);
        assert_eq!(v["actions_max_abs"], 0.001);
        assert_eq!(v["latency_pct"], 5.0);
    }

    #[test]
    fn identical_actions_are_exact() {
        let a: Vec<f32> = (0..350).map(|i| (i as f32 * 0.37).sin() * 0.3).collect();
        let d = ActionsDiff::compare(&a, (50, 7), &a, (50, 7));
        assert_eq!((d.cos, d.max_abs, d.pass), (Some(1.0), Some(0.0), true));
    }

    #[test]
    fn action_thresholds() {
        let a: Vec<f32> = (0..350).map(|i| (i as f32 * 0.37).sin()).collect();
        // A small shift: cos stays ~1 but max_abs crosses 1e-3.
        let mut b = a.clone();
        b[10] += 2e-3;
        let d = ActionsDiff::compare(&a, (50, 7), &b, (50, 7));
        assert!(d.cos.unwrap() > 0.999999 && !d.pass, "{d:?}");
        b[10] = a[10] + 5e-4;
        assert!(ActionsDiff::compare(&a, (50, 7), &b, (50, 7)).pass);
        // Another model: unrelated actions.
        let c: Vec<f32> = (0..350).map(|i| (i as f32 * 1.91).cos()).collect();
        let d = ActionsDiff::compare(&a, (50, 7), &c, (50, 7));
        assert!(d.cos.unwrap() < 0.5 && !d.pass);
        // Shapes.
        let d = ActionsDiff::compare(&a, (50, 7), &a[..343], (49, 7));
        assert!(!d.pass && d.cos.is_none() && d.note.unwrap().contains("50x7"));
        // NaN on both sides in the same place is equal; on one side it fails.
        let mut n = a.clone();
        n[3] = f32::NAN;
        assert!(ActionsDiff::compare(&n, (50, 7), &n, (50, 7)).pass);
        assert!(!ActionsDiff::compare(&a, (50, 7), &n, (50, 7)).pass);
        // Zero chunks.
        let z = vec![0.0; 14];
        assert!(ActionsDiff::compare(&z, (2, 7), &z, (2, 7)).pass);
    }

    #[test]
    fn latency_within_five_percent() {
        let d = LatencyDiff::compare(3.0, Some(3.15)).unwrap();
        assert!(d.pass && (d.delta_pct.unwrap() - 5.0).abs() < 1e-9);
        assert!(!LatencyDiff::compare(3.0, Some(3.2)).unwrap().pass);
        assert!(!LatencyDiff::compare(3.0, Some(2.8)).unwrap().pass);
        assert!(!LatencyDiff::compare(3.0, None).unwrap().pass);
        assert_eq!(LatencyDiff::compare(0.0, Some(1.0)), None);
    }

    #[test]
    fn cache_status_match() {
        assert!(CacheDiff::compare("hit", Some("hit")).unwrap().pass);
        assert!(!CacheDiff::compare("hit", Some("miss")).unwrap().pass);
        assert!(!CacheDiff::compare("miss", None).unwrap().pass);
        assert_eq!(CacheDiff::compare("", Some("hit")), None);
    }

    /// The server's slugs come from the shared list, so a slug it adds is classed here
    /// without a second copy to update.
    #[test]
    fn every_server_slug_has_the_class_of_its_code() {
        for slug in ErrorSlug::ALL {
            let class = Some(ErrorClass::of(slug.code()));
            assert_eq!(ErrorClass::of_slug(slug.as_str()), class, "{slug}");
            let shouted = slug.as_str().to_ascii_uppercase().replace('-', "_");
            assert_eq!(ErrorClass::of_slug(&shouted), class, "{shouted}");
        }
        assert_eq!(ErrorClass::of_slug("no-such-slug"), None);
        assert_eq!(ErrorClass::of_slug(" "), None);
    }

    #[test]
    fn error_outcomes_compare_by_class() {
        let rec = |slug: &str| {
            Some(RecordedError {
                slug: slug.into(),
                message: "m".into(),
            })
        };
        let invalid = tonic::Status::invalid_argument("state has 3 values");
        let busy = tonic::Status::resource_exhausted("queue full");
        assert_eq!(ErrorDiff::compare(None, None), None);
        assert!(
            ErrorDiff::compare(rec("invalid-argument"), Some(&invalid))
                .unwrap()
                .pass
        );
        assert!(
            ErrorDiff::compare(rec("INVALID_ARGUMENT"), Some(&invalid))
                .unwrap()
                .pass
        );
        assert!(
            ErrorDiff::compare(rec("out_of_range"), Some(&invalid))
                .unwrap()
                .pass
        );
        assert!(
            !ErrorDiff::compare(rec("invalid-argument"), Some(&busy))
                .unwrap()
                .pass
        );
        assert!(
            ErrorDiff::compare(rec("queue-full"), Some(&busy))
                .unwrap()
                .pass
        );
        assert!(ErrorDiff::compare(rec(""), Some(&busy)).unwrap().pass);
        let d = ErrorDiff::compare(rec("invalid-argument"), None).unwrap();
        assert!(!d.pass && d.replayed.is_none());
        let d = ErrorDiff::compare(None, Some(&invalid)).unwrap();
        assert!(!d.pass);
        assert_eq!(d.replayed.unwrap().code, "INVALID_ARGUMENT");
    }
}
