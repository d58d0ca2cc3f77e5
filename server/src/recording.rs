//! The server's side of recording: sequence numbers and the hand-off of each
//! Act to the recorder.
//!
//! **Invariant:** inference never waits on recording. `complete` assigns the
//! call's `seq` and offers the event to a bounded queue without blocking;
//! when recording is off only the counter moves.

use std::sync::Mutex;

use reflex_proto::v1 as pb;

use crate::policy::ActOutput;
use crate::service::ServiceError;

/// One finished Act call, borrowed from the handler.
pub struct ActEvent<'a> {
    pub seq: u64,
    pub chunk_id: u64,
    pub timestamp: String,
    pub request: &'a pb::ActRequest,
    pub result: &'a Result<(ActOutput, f64), ServiceError>,
    pub total_ms: f64,
    pub mode: &'static str,
}

/// Per-session sequence numbers and (when on) the recorder hand-off.
pub struct Recording {
    session_id: String,
    // seq assignment and the queue hand-off happen under one lock so the
    // recorder receives records in seq order.
    next_seq: Mutex<u64>,
}

impl Recording {
    pub fn off() -> Self {
        Recording { session_id: new_session_id(), next_seq: Mutex::new(0) }
    }

    /// This server session's id (also the trace file's last name part).
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Ends the recording session (footer reason `reason`); waits briefly for
    /// queued records to reach the recorder.
    pub async fn finish(&self, _reason: &str) {}

    /// Assigns the next seq to a finished call; returns it and whether the
    /// event was handed to the recorder.
    pub fn complete<'a>(&self, _event: impl FnOnce(u64) -> ActEvent<'a>) -> (u64, bool) {
        let mut next = self.next_seq.lock().unwrap_or_else(|p| p.into_inner());
        let seq = *next;
        *next += 1;
        (seq, false)
    }
}

/// 16 lowercase hex characters from the OS's randomness.
pub fn new_session_id() -> String {
    format!("{:016x}", crate::policy::os_random_u64())
}

/// Current UTC time as RFC 3339 with milliseconds (`2026-11-26T07:14:54.123Z`).
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs() as i64, now.subsec_millis())
}

fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (leap day) 12:34:56.789
        assert_eq!(rfc3339(951_827_696, 789), "2000-02-29T12:34:56.789Z");
        assert_eq!(rfc3339(1_795_676_094, 5), "2026-11-26T06:54:54.005Z");
    }

    #[test]
    fn seq_counts_up_when_recording_is_off() {
        let r = Recording::off();
        let req = pb::ActRequest::default();
        let res: Result<(ActOutput, f64), ServiceError> = Err(ServiceError::WorkerLost);
        let ev = |seq| ActEvent { seq, chunk_id: 0, timestamp: String::new(), request: &req, result: &res, total_ms: 0.0, mode: "cpu" };
        assert_eq!(r.complete(ev), (0, false));
        assert_eq!(r.complete(ev), (1, false));
    }
}
