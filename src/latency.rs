//! Round-trip times: a log-linear histogram (HdrHistogram's layout with 32
//! linear steps per power of two, so any value is known within 1/32, about
//! 3%), its percentiles, and the forms zping prints.

use serde::Serialize;

/// Linear steps per power of two, as a power of two.
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Values below SUB get a bucket each; above, 32 buckets per power of two
/// up to 2^64.
const BUCKETS: usize = (SUB as usize) * (64 - SUB_BITS as usize + 1);

/// Bucket of `v`: exact below SUB, else (power of two, top SUB_BITS bits).
#[inline(always)]
fn bucket(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = e - SUB_BITS;
    let sub = (v >> shift) & (SUB - 1);
    ((shift as usize + 1) << SUB_BITS) + sub as usize
}

/// The values bucket `i` holds: `lo..=hi`.
fn bounds(i: usize) -> (u64, u64) {
    if i < SUB as usize {
        return (i as u64, i as u64);
    }
    let shift = (i >> SUB_BITS) as u32 - 1;
    let sub = (i as u64 & (SUB - 1)) | SUB;
    let lo = sub << shift;
    (lo, lo + ((1u64 << shift) - 1))
}

/// Counts of values (nanoseconds), with exact min, max and sum.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    min: u64,
    max: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            min: u64::MAX,
            max: 0,
            sum: 0,
        }
    }
}

/// What zping reports of a histogram, in nanoseconds. Percentiles are the
/// upper edge of the bucket the rank falls in (never below the true
/// value, at most 1/32 above it), capped at the exact max.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Rtt {
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    #[serde(rename = "p99.9")]
    pub p99_9: u64,
    pub max: u64,
    pub mean: f64,
}

impl Histogram {
    #[inline(always)]
    pub fn record(&mut self, v: u64) {
        self.counts[bucket(v)] += 1;
        self.total += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += u128::from(v);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn clear(&mut self) {
        self.counts.fill(0);
        self.total = 0;
        self.min = u64::MAX;
        self.max = 0;
        self.sum = 0;
    }

    /// The value at quantile `q` (0..=1): the smallest bucket edge with at
    /// least ceil(q * count) values at or below it.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bounds(i).1.clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// Percentiles; None without values.
    pub fn rtt(&self) -> Option<Rtt> {
        (self.total > 0).then(|| Rtt {
            min: self.min,
            p50: self.quantile(0.50),
            p90: self.quantile(0.90),
            p99: self.quantile(0.99),
            p99_9: self.quantile(0.999),
            max: self.max,
            mean: self.sum as f64 / self.total as f64,
        })
    }

    /// The non-empty buckets as `[lo, hi, count]`, values lo..=hi ns.
    pub fn buckets(&self) -> Vec<[u64; 3]> {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| {
                let (lo, hi) = bounds(i);
                [lo, hi, c]
            })
            .collect()
    }
}

/// Nanoseconds as microseconds with two decimals, as zping prints them.
pub fn us(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1000.0)
}

impl Rtt {
    /// `min 3.10 p50 4.20 p90 5.00 p99 7.90 p99.9 11.20 max 15.00 us`
    pub fn text(&self) -> String {
        format!(
            "min {} p50 {} p90 {} p99 {} p99.9 {} max {} us",
            us(self.min),
            us(self.p50),
            us(self.p90),
            us(self.p99),
            us(self.p99_9),
            us(self.max)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_a_bucket_that_holds_it_within_a_32nd() {
        let mut prev_hi = None;
        for i in 0..BUCKETS {
            let (lo, hi) = bounds(i);
            assert!(lo <= hi);
            if let Some(p) = prev_hi {
                assert_eq!(lo, p + 1, "buckets {} and {i} leave no gap", i - 1);
            }
            prev_hi = Some(hi);
            assert_eq!(bucket(lo), i);
            assert_eq!(bucket(hi), i);
            assert!((hi - lo) as f64 <= lo as f64 / 32.0 + 1.0);
        }
        assert_eq!(prev_hi, Some(u64::MAX));
        for v in [0, 1, 31, 32, 33, 63, 64, 1000, 4321, 1 << 40, u64::MAX] {
            let (lo, hi) = bounds(bucket(v));
            assert!(lo <= v && v <= hi, "{v} in {lo}..={hi}");
        }
    }

    #[test]
    fn percentiles_of_a_known_spread() {
        let mut h = Histogram::default();
        assert_eq!(h.rtt(), None);
        for v in 1..=1000u64 {
            h.record(v * 10);
        }
        let r = h.rtt().unwrap();
        assert_eq!((r.min, r.max), (10, 10_000));
        assert_eq!(r.mean, 5005.0);
        // True values 5000, 9000, 9900, 9990: upper bucket edges, within 1/32.
        for (got, want) in [(r.p50, 5000), (r.p90, 9000), (r.p99, 9900), (r.p99_9, 9990)] {
            assert!(
                got >= want && got as f64 <= want as f64 * (1.0 + 1.0 / 32.0),
                "{got} vs {want}"
            );
        }
        assert_eq!(h.quantile(1.0), 10_000);
        let b = h.buckets();
        assert_eq!(b.iter().map(|x| x[2]).sum::<u64>(), 1000);
        assert!(b.iter().all(|&[lo, hi, _]| lo <= hi));
        h.clear();
        assert_eq!(h.count(), 0);
        assert_eq!(h.rtt(), None);
    }

    #[test]
    fn one_value_is_every_percentile() {
        let mut h = Histogram::default();
        h.record(4242);
        let r = h.rtt().unwrap();
        assert_eq!([r.min, r.p50, r.p99_9, r.max], [4242; 4]);
        assert_eq!(
            r.text(),
            "min 4.24 p50 4.24 p90 4.24 p99 4.24 p99.9 4.24 max 4.24 us"
        );
    }
}
