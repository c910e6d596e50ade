//! A fixed-bucket histogram of durations, kept in atomics so the hot path pays one
//! `fetch_add` per bucket search and nothing else: no lock, no allocation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds. One set for hits (a fraction of a
/// millisecond on loopback, tens of milliseconds across a WAN or a slow shared tier) and
/// compiles (tens of milliseconds to minutes): a single fixed set keeps the series the
/// same on every server, so dashboards can sum them across a fleet.
pub const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 60.0,
];

/// A histogram of durations: how many observations fell at or below each bound of
/// [`BUCKETS`], plus their count and sum. STATS reports the count and the sum (in
/// microseconds); `/metrics` reports all of it, from the same atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket, not cumulative; the last one is past every bound.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// A copy of a [`Histogram`] at one moment, cumulative the way Prometheus wants it.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations at or below it)`, `+Inf` last.
    pub buckets: Vec<(f64, u64)>,
    /// Observations.
    pub count: u64,
    /// Sum of the observations, in seconds.
    pub sum_seconds: f64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations in microseconds (STATS carries integers).
    pub fn sum_micros(&self) -> u64 {
        self.sum_micros.load(Ordering::Relaxed)
    }

    /// The cumulative buckets, count and sum. The count is the sum of the buckets read
    /// here, so the snapshot is consistent in itself even while observations land.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0;
        let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            running += b.load(Ordering::Relaxed);
            buckets.push((BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), running));
        }
        HistogramSnapshot {
            buckets,
            count: running,
            sum_seconds: self.sum_micros() as f64 / 1e6,
        }
    }

    /// Forgets every observation.
    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
        self.count.store(0, Ordering::Relaxed);
        self.sum_micros.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_accumulate() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50)); // <= 0.0001
        h.observe(Duration::from_millis(3)); // <= 0.005
        h.observe(Duration::from_secs(120)); // +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets.len(), BUCKETS.len() + 1);
        assert_eq!(s.buckets[0], (0.0001, 1));
        assert_eq!(s.buckets[4], (0.0025, 1));
        assert_eq!(s.buckets[5], (0.005, 2));
        assert_eq!(s.buckets[BUCKETS.len() - 1], (60.0, 2));
        assert_eq!(s.buckets[BUCKETS.len()].1, 3);
        assert!(s.buckets[BUCKETS.len()].0.is_infinite());
        assert!((s.sum_seconds - 120.00305).abs() < 1e-9);
        assert_eq!(h.sum_micros(), 120_003_050);
        h.reset();
        assert_eq!(h.snapshot().count, 0);
    }

    #[test]
    fn a_bound_itself_belongs_to_its_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(1));
        assert_eq!(h.snapshot().buckets[3], (0.001, 1));
        assert_eq!(h.snapshot().buckets[2].1, 0);
    }
}
