//! Metric values split in per-thread shards: every request adds to several counters, and on a
//! busy gateway the runtime's threads would otherwise pass the same cache lines back and
//! forth on each one. A thread adds to its own shard; a scrape adds the shards up.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Shards per value: more than the runtime's threads on the machines tollgate runs on; a
/// thread beyond them shares a shard, which stays correct.
const SHARDS: usize = 16;

/// One shard's word, alone on its cache line pair (adjacent-line prefetch included).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Cell(AtomicU64);

/// This thread's shard.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

fn cells() -> Arc<[Cell]> {
    (0..SHARDS).map(|_| Cell::default()).collect()
}

/// A counter of whole numbers.
#[derive(Debug, Clone)]
pub struct Counter(Arc<[Cell]>);

impl Default for Counter {
    fn default() -> Self {
        Self(cells())
    }
}

impl Counter {
    pub fn inc_by(&self, n: u64) {
        if let Some(c) = self.0.get(shard()) {
            c.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |sum, c| sum.wrapping_add(c.0.load(Ordering::Relaxed)))
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A counter of amounts with fractions (dollars).
#[derive(Debug, Clone)]
pub struct FloatCounter(Arc<[Cell]>);

impl Default for FloatCounter {
    fn default() -> Self {
        Self(cells())
    }
}

impl FloatCounter {
    pub fn inc_by(&self, v: f64) {
        if let Some(c) = self.0.get(shard()) {
            // Only threads sharing this shard contend.
            let _ =
                c.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                    Some((f64::from_bits(bits) + v).to_bits())
                });
        }
    }

    pub fn get(&self) -> f64 {
        self.0
            .iter()
            .map(|c| f64::from_bits(c.0.load(Ordering::Relaxed)))
            .sum()
    }
}

impl TypedMetric for FloatCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for FloatCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A gauge moved up and down by many threads (requests in flight): a request may end on
/// another thread than it began, so a shard alone can go below zero; their sum cannot.
#[derive(Debug, Clone)]
pub struct Gauge(Arc<[Cell]>);

impl Default for Gauge {
    fn default() -> Self {
        Self(cells())
    }
}

impl Gauge {
    pub fn add(&self, n: i64) {
        if let Some(c) = self.0.get(shard()) {
            c.0.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> i64 {
        self.0
            .iter()
            .fold(0u64, |sum, c| sum.wrapping_add(c.0.load(Ordering::Relaxed))) as i64
    }
}

impl TypedMetric for Gauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for Gauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One shard of a histogram: per bucket (the last above every bound), then the count and
/// the sum in microseconds.
#[derive(Debug)]
#[repr(align(128))]
struct HistogramShard(Box<[AtomicU64]>);

/// A histogram of durations over fixed bounds (in seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    shards: Box<[HistogramShard]>,
}

/// What a histogram holds: per-bucket counts (not cumulative), the count, the sum in
/// seconds.
pub struct HistogramValues {
    pub buckets: Vec<u64>,
    pub count: u64,
    pub sum_s: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        let words = bounds.len() + 3;
        Self {
            bounds,
            shards: (0..SHARDS)
                .map(|_| HistogramShard((0..words).map(|_| AtomicU64::new(0)).collect()))
                .collect(),
        }
    }

    pub fn observe(&self, took: std::time::Duration) {
        let Some(shard) = self.shards.get(shard()) else {
            return;
        };
        let s = took.as_secs_f64();
        let n = self.bounds.len();
        let bucket = self.bounds.iter().position(|b| s <= *b).unwrap_or(n);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        for (i, add) in [(bucket, 1), (n + 1, 1), (n + 2, us)] {
            if let Some(w) = shard.0.get(i) {
                w.fetch_add(add, Ordering::Relaxed);
            }
        }
    }

    pub fn values(&self) -> HistogramValues {
        let n = self.bounds.len();
        let word = |i: usize| -> u64 {
            self.shards
                .iter()
                .filter_map(|s| s.0.get(i))
                .fold(0u64, |sum, w| sum.wrapping_add(w.load(Ordering::Relaxed)))
        };
        HistogramValues {
            buckets: (0..n).map(word).collect(),
            count: word(n + 1),
            sum_s: word(n + 2) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn shards_from_many_threads_add_up() {
        let c = Counter::default();
        let f = FloatCounter::default();
        let g = Gauge::default();
        let h = Arc::new(Histogram::new(&[0.1, 1.0]));
        let threads: Vec<_> = (0..40)
            .map(|i| {
                let (c, f, g, h) = (c.clone(), f.clone(), g.clone(), Arc::clone(&h));
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        c.inc_by(2);
                        f.inc_by(0.5);
                        // Up on one thread, down on another: the sum still comes to 0.
                        g.add(if i % 2 == 0 { 1 } else { -1 });
                        h.observe(Duration::from_millis(if i % 2 == 0 { 50 } else { 5_000 }));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.get(), 80_000);
        assert_eq!(f.get(), 20_000.0);
        assert_eq!(g.get(), 0);
        let v = h.values();
        assert_eq!(v.buckets, [20_000, 0]);
        assert_eq!(v.count, 40_000);
        assert!((v.sum_s - (20_000.0 * 0.05 + 20_000.0 * 5.0)).abs() < 1e-6);
    }
}
