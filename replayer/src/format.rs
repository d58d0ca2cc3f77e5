//! How numbers and verdicts read on the console: shared by the per-request lines
//! ([`crate::diff`]), the summaries ([`crate::report`]) and `--no-replay`
//! ([`crate::inspection`]). Leaf module: it imports nothing of this crate.

/// `[PASS]` / `[FAIL]`.
pub fn verdict(pass: bool) -> &'static str {
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

/// `1e-3` for 0.001 (thresholds in the summary).
pub fn short_sci(x: f64) -> String {
    format!("{x:e}")
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

/// `s` on one line (control characters as spaces), cut to `max` characters with `…`.
pub fn one_line(s: &str, max: usize) -> String {
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

/// A count a footer may not state (`dropped_requests` of the seed tool's traces): the
/// number, or `unknown` — never a 0 the trace did not say.
pub fn count_or_unknown(n: Option<u64>) -> String {
    n.map_or_else(|| "unknown".to_string(), |n| n.to_string())
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
    fn one_line_flattens_and_cuts() {
        assert_eq!(one_line("a\nb", 10), "a b");
        assert_eq!(one_line("abcdef", 3), "abc…");
    }
}
