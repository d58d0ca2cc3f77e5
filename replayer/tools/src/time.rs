//! RFC 3339 timestamps of trace records to Unix time. The writer prints them with
//! `reflex_proto::time` (`YYYY-MM-DDTHH:MM:SS.mmmZ`); other tools' traces may carry an
//! offset or more digits, so those are accepted too. No date crate: this is the one parse.

/// Nanoseconds since the Unix epoch, or `None` when `s` is not RFC 3339.
pub fn unix_nanos(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ns: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        // Digits past nanoseconds are dropped, not rounded: they cannot change the order.
        let digits = &s[start..i.min(start + 9)];
        frac_ns = digits.parse::<i64>().ok()? * 10i64.pow(9 - digits.len() as u32);
    }
    let offset_s: i64 = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            let o = oh * 3600 + om * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    Some(secs as i128 * 1_000_000_000 + frac_ns as i128)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::unix_nanos;

    #[test]
    fn parses_the_writers_form_and_offsets() {
        assert_eq!(unix_nanos("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(
            unix_nanos("2026-12-02T15:52:00.123Z"),
            Some(1_796_226_720_123_000_000)
        );
        assert_eq!(
            unix_nanos("2026-12-02T16:52:00.123+01:00"),
            unix_nanos("2026-12-02T15:52:00.123Z")
        );
        assert_eq!(
            unix_nanos("2000-03-01T00:00:00Z"),
            Some(951_868_800 * 1_000_000_000)
        );
    }

    #[test]
    fn refuses_what_is_not_rfc3339() {
        for s in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-12-02T15:52:00",
            "2026-12-02T15:52:00.Z",
        ] {
            assert_eq!(unix_nanos(s), None, "{s}");
        }
    }
}
