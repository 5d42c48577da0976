//! A latency histogram with log-linear buckets, allocated once.
//!
//! Values below `2 * SUB` each get their own bucket; above that, every power of two is split
//! into `SUB` equal buckets, so a bucket is never wider than 1/`SUB` of the values it holds
//! (under 0.8 % with `SUB` = 128). Recording is a few shifts and an add: nothing allocates, so
//! it can sit on the timed path of a benchmark.

/// Linear sub-buckets per power of two (a power of two itself).
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for every u64.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    min: u64,
    max: u64,
    sum: u128,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.total)
            .field("min", &self.min())
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram { counts: vec![0; BUCKETS], total: 0, min: u64::MAX, max: 0, sum: 0 }
    }

    /// The bucket of value `v`.
    fn index(v: u64) -> usize {
        if v < 2 * SUB {
            return v as usize;
        }
        // Keep the top SUB_BITS + 1 bits: `m` is in SUB..2*SUB.
        let shift = 63 - v.leading_zeros() - SUB_BITS;
        let m = v >> shift;
        (u64::from(shift) * SUB + m) as usize
    }

    /// The smallest and largest value of bucket `i`.
    fn bounds(i: usize) -> (u64, u64) {
        let i = i as u64;
        if i < 2 * SUB {
            return (i, i);
        }
        let shift = i / SUB - 1;
        let m = i % SUB + SUB;
        let low = m << shift;
        (low, low + ((1u64 << shift) - 1))
    }

    pub fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += u128::from(v);
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value below which `p` percent of the recorded values lie (nearest rank), as the
    /// middle of its bucket, kept within the recorded minimum and maximum. 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        // The epsilon keeps 99.9 % of 1000 at rank 999 despite 0.999 not being exact in binary.
        let exact = p / 100.0 * self.total as f64;
        let rank = (exact - 1e-9).ceil().clamp(1.0, self.total as f64) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, high) = Self::bounds(i);
                return (low + (high - low) / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_range() {
        let mut expect_low = 0u64;
        for i in 0..BUCKETS {
            let (low, high) = Histogram::bounds(i);
            assert_eq!(low, expect_low, "bucket {i}");
            assert!(high >= low);
            assert_eq!(Histogram::index(low), i);
            assert_eq!(Histogram::index(high), i);
            // Relative width stays under 1/SUB.
            assert!((high - low) as f64 <= low as f64 / SUB as f64 + 1.0, "bucket {i}");
            expect_low = high.wrapping_add(1);
        }
        assert_eq!(expect_low, 0, "the last bucket ends at u64::MAX");
        assert_eq!(Histogram::index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_of_a_uniform_run() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        assert_eq!(h.count(), 100_000);
        assert_eq!(h.min(), 10);
        assert_eq!(h.max(), 1_000_000);
        assert!((h.mean() - 500_005.0).abs() < 1e-6);
        for (p, exact) in
            [(50.0, 500_000.0), (90.0, 900_000.0), (99.0, 990_000.0), (99.9, 999_000.0)]
        {
            let got = h.percentile(p) as f64;
            assert!((got - exact).abs() / exact < 0.01, "p{p}: {got} vs {exact}");
        }
        assert_eq!(h.percentile(100.0), 1_000_000);
        assert_eq!(h.percentile(0.0), 10);
    }

    #[test]
    fn small_and_skewed() {
        let h = Histogram::new();
        assert_eq!((h.percentile(50.0), h.min(), h.max(), h.mean()), (0, 0, 0, 0.0));

        let mut h = Histogram::new();
        h.record(7);
        assert_eq!(h.percentile(50.0), 7);
        assert_eq!(h.percentile(99.9), 7);

        // 999 fast values and one slow one: p99 is fast, p99.9 too (rank 999), max slow.
        let mut h = Histogram::new();
        for _ in 0..999 {
            h.record(20_000);
        }
        h.record(5_000_000);
        let p99 = h.percentile(99.0);
        assert!((19_800..=20_200).contains(&p99), "{p99}");
        assert!(h.percentile(99.9) < 20_200);
        let slow = h.percentile(99.99) as f64;
        assert!((slow - 5e6).abs() / 5e6 < 0.01, "{slow}");
        assert_eq!(h.max(), 5_000_000);
    }
}
