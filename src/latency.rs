//! Latency samples and their percentiles, shared by the demo and the benchmarks (it imports
//! neither).

use std::time::Instant;

/// Latency samples in milliseconds.
#[derive(Debug, Default, Clone)]
pub struct Summary(Vec<f64>);

impl Summary {
    pub fn push(&mut self, ms: f64) {
        self.0.push(ms);
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Nearest-rank percentile; NaN when empty.
    pub fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
        v[rank.min(v.len()) - 1]
    }
    /// Only the samples above zero (e.g. prefix time on cache misses).
    pub fn nonzero(&self) -> Summary {
        Summary(self.0.iter().copied().filter(|v| *v > 0.0).collect())
    }
}

impl FromIterator<f64> for Summary {
    fn from_iter<I: IntoIterator<Item = f64>>(iter: I) -> Summary {
        Summary(iter.into_iter().collect())
    }
}

pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut s = Summary::default();
        for v in 1..=100 {
            s.push(v as f64);
        }
        assert_eq!(
            (s.pct(50.0), s.pct(99.0), s.pct(100.0)),
            (50.0, 99.0, 100.0)
        );
        assert!(Summary::default().pct(50.0).is_nan());
    }
}
