//! The one wall-clock formatter of reflex: RFC 3339 UTC timestamps with milliseconds
//! (`2026-04-24T17:13:05.123Z`), the form of every time on the wire (`SessionStart.started_at`,
//! `ActRecord.timestamp`, `SessionEnd.ended_at`) and in traces, and the `YYYYMMDD-HHMMSS`
//! stamp of trace file names. The server stamps calls with it, the recorder headers,
//! footers and file names.
//!
//! A dozen lines of civil-calendar arithmetic instead of a date crate: we only ever format
//! UTC, never parse or do time zones.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A UTC instant, whole seconds since the Unix epoch plus milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct UtcTime {
    secs: i64,
    millis: u32,
}

impl UtcTime {
    /// The current time.
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    /// Converts a `SystemTime` (times before 1970 are clamped to the epoch).
    pub fn from_system(t: SystemTime) -> Self {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        Self {
            secs: d.as_secs() as i64,
            millis: d.subsec_millis(),
        }
    }

    /// Seconds since the epoch.
    pub fn from_unix(secs: i64, millis: u32) -> Self {
        Self {
            secs,
            millis: millis.min(999),
        }
    }

    /// The same instant shifted by whole seconds.
    pub fn plus_secs(self, secs: i64) -> Self {
        Self {
            secs: self.secs + secs,
            millis: self.millis,
        }
    }

    /// `2026-04-24T17:13:05.123Z`.
    pub fn rfc3339_millis(self) -> String {
        let (y, mo, d, h, mi, s) = self.civil();
        format!(
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
            self.millis
        )
    }

    /// `20260424-171305`, the time part of a trace file name.
    pub fn file_stamp(self) -> String {
        let (y, mo, d, h, mi, s) = self.civil();
        format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
    }

    fn civil(self) -> (i64, u32, u32, u32, u32, u32) {
        let days = self.secs.div_euclid(86_400);
        let sod = self.secs.rem_euclid(86_400) as u32;
        let (y, m, d) = civil_from_days(days);
        (y, m, d, sod / 3600, sod / 60 % 60, sod % 60)
    }
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 to (year, month, day) in the
/// proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(
            UtcTime::from_unix(0, 0).rfc3339_millis(),
            "1970-01-01T00:00:00.000Z"
        );
        // 2026-04-24T17:13:05Z, the seed page's example file.
        let t = UtcTime::from_unix(1_777_050_785, 7);
        assert_eq!(t.rfc3339_millis(), "2026-04-24T17:13:05.007Z");
        assert_eq!(t.file_stamp(), "20260424-171305");
        // Leap day and the end of a year.
        assert_eq!(
            UtcTime::from_unix(951_782_400, 0).file_stamp(),
            "20000229-000000"
        );
        assert_eq!(
            UtcTime::from_unix(1_735_689_599, 999).rfc3339_millis(),
            "2024-12-31T23:59:59.999Z"
        );
        assert_eq!(t.plus_secs(55).file_stamp(), "20260424-171400");
        // From the server's former copy: a leap day with milliseconds, and 2026-11-26.
        assert_eq!(
            UtcTime::from_unix(951_827_696, 789).rfc3339_millis(),
            "2000-02-29T12:34:56.789Z"
        );
        assert_eq!(
            UtcTime::from_unix(1_795_676_094, 5).rfc3339_millis(),
            "2026-11-26T06:54:54.005Z"
        );
        let at = UNIX_EPOCH + Duration::from_millis(951_827_696_789);
        assert_eq!(
            UtcTime::from_system(at).rfc3339_millis(),
            "2000-02-29T12:34:56.789Z"
        );
    }
}
