//! The comparisons: one recorded call against its replay.
//!
//! Thresholds (SPEC "Replay"): actions pass when cos ≥ 0.999 **and** max |Δ| < 1e-3;
//! latency when the target's `latency.total_ms` is within ±5 % of the recorded
//! `total_ms`; cache when the target's own status equals the recorded one. A call that
//! failed when recorded passes when the replay fails in the same class of gRPC code
//! ([`ErrorClass`]).
//!
//! Pure functions: no I/O, so every rule is tested here on numbers.

use serde::Serialize;
use tonic::Code;

/// Smallest cosine similarity that passes.
pub const MIN_COS: f64 = 0.999;
/// max |Δ| must stay below this.
pub const MAX_ABS: f64 = 1e-3;
/// Largest |Δ| of total latency that passes, in percent of the recorded total.
pub const LATENCY_PCT: f64 = 5.0;

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

    /// The class of a recorded `error.slug`: a gRPC code name in any case (`INVALID_ARGUMENT`,
    /// `invalid-argument`) or one of the server's own slugs. `None`: unknown or empty.
    pub fn of_slug(slug: &str) -> Option<ErrorClass> {
        let norm = slug.trim().to_ascii_uppercase().replace('-', "_");
        let code = match norm.as_str() {
            // reflex-server's slugs (service::ServiceError::slug).
            "QUEUE_FULL" => Code::ResourceExhausted,
            "SHUTTING_DOWN" => Code::Unavailable,
            "ENGINE_FAILED" | "WORKER_LOST" => Code::Internal,
            other => code_from_name(other)?,
        };
        Some(ErrorClass::of(code))
    }
}

const CODES: [(Code, &str); 17] = [
    (Code::Ok, "OK"),
    (Code::Cancelled, "CANCELLED"),
    (Code::Unknown, "UNKNOWN"),
    (Code::InvalidArgument, "INVALID_ARGUMENT"),
    (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
    (Code::NotFound, "NOT_FOUND"),
    (Code::AlreadyExists, "ALREADY_EXISTS"),
    (Code::PermissionDenied, "PERMISSION_DENIED"),
    (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (Code::FailedPrecondition, "FAILED_PRECONDITION"),
    (Code::Aborted, "ABORTED"),
    (Code::OutOfRange, "OUT_OF_RANGE"),
    (Code::Unimplemented, "UNIMPLEMENTED"),
    (Code::Internal, "INTERNAL"),
    (Code::Unavailable, "UNAVAILABLE"),
    (Code::DataLoss, "DATA_LOSS"),
    (Code::Unauthenticated, "UNAUTHENTICATED"),
];

/// `INVALID_ARGUMENT` for `Code::InvalidArgument`.
pub fn code_name(code: Code) -> &'static str {
    CODES
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("UNKNOWN", |(_, n)| n)
}

fn code_from_name(name: &str) -> Option<Code> {
    CODES.iter().find(|(_, n)| *n == name).map(|(c, _)| *c)
}

#[cfg(test)]
mod tests {
    use super::*;

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
