//! Latency and loss, counted rather than assumed.
//!
//! Every event has a sequence number. The publisher records how many
//! deliveries it expects for it (the connected devices of its recipients);
//! every device keeps the sequence numbers it received. At the end the two
//! are compared: what is missing is lost, what came twice to one device is
//! a duplicate, what came beyond the expected count is unexpected.

use hdrhistogram::Histogram;
use parking_lot::Mutex;

/// Latencies are kept in microseconds, 1 µs to 5 minutes, 3 significant digits.
const MAX_LATENCY_US: u64 = 300_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Latency histograms sharded by device, so that thousands of device tasks
/// on a few threads rarely contend, merged at the end.
pub struct Latency {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Latency {
    pub fn new(shards: usize) -> Latency {
        Latency { shards: (0..shards.max(1)).map(|_| Mutex::new(new_histogram())).collect() }
    }

    pub fn record(&self, key: usize, micros: u64) {
        let mut h = self.shards[key % self.shards.len()].lock();
        h.saturating_record(micros.clamp(1, MAX_LATENCY_US));
    }

    /// All shards merged into one histogram.
    pub fn merged(&self) -> Histogram<u64> {
        let mut out = new_histogram();
        for s in &self.shards {
            out.add(&*s.lock()).expect("same bounds");
        }
        out
    }

    /// Takes the samples recorded so far (for per-interval percentiles).
    pub fn take(&self) -> Histogram<u64> {
        let mut out = new_histogram();
        for s in &self.shards {
            let mut h = s.lock();
            out.add(&*h).expect("same bounds");
            h.reset();
        }
        out
    }
}

/// What a run delivered, against what it should have.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub unexpected: u64,
}

/// Compares the expected deliveries per event with what devices received.
/// `expected[seq]` is the number of deliveries expected for event `seq`;
/// each item of `per_device` is one device's received sequence numbers.
pub fn tally(expected: &[u32], per_device: impl IntoIterator<Item = Vec<u32>>) -> Tally {
    let mut got = vec![0u32; expected.len()];
    let mut t = Tally { expected: expected.iter().map(|&e| u64::from(e)).sum(), ..Tally::default() };
    for mut seqs in per_device {
        seqs.sort_unstable();
        let before = seqs.len();
        seqs.dedup();
        t.duplicates += (before - seqs.len()) as u64;
        for s in seqs {
            match got.get_mut(s as usize) {
                Some(n) => *n += 1,
                None => t.unexpected += 1, // a sequence number never published
            }
        }
    }
    for (&e, &g) in expected.iter().zip(&got) {
        t.received += u64::from(g.min(e));
        t.lost += u64::from(e.saturating_sub(g));
        t.unexpected += u64::from(g.saturating_sub(e));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_merge_into_the_histogram_of_all_samples() {
        let lat = Latency::new(4);
        let mut direct = new_histogram();
        for i in 1..=10_000u64 {
            lat.record(i as usize, i * 7);
            direct.record(i * 7).unwrap();
        }
        let merged = lat.merged();
        assert_eq!(merged.len(), 10_000);
        for q in [0.5, 0.9, 0.99, 0.999] {
            assert_eq!(merged.value_at_quantile(q), direct.value_at_quantile(q));
        }
        assert_eq!(merged.max(), direct.max());
        // `take` empties the shards.
        assert_eq!(lat.take().len(), 10_000);
        assert_eq!(lat.merged().len(), 0);
    }

    #[test]
    fn out_of_range_latencies_are_clamped_not_dropped() {
        let lat = Latency::new(1);
        lat.record(0, 0);
        lat.record(0, u64::MAX);
        assert_eq!(lat.merged().len(), 2);
    }

    #[test]
    fn nothing_missing_means_nothing_lost() {
        let t = tally(&[2, 1], [vec![0, 1], vec![0]]);
        assert_eq!(t, Tally { expected: 3, received: 3, lost: 0, duplicates: 0, unexpected: 0 });
    }

    #[test]
    fn missing_deliveries_are_lost_and_repeats_are_duplicates() {
        // Event 0 expected on 3 devices, event 1 on 2, event 2 on 1.
        let devices = vec![vec![0, 1, 1], vec![0], vec![2, 2, 2]];
        let t = tally(&[3, 2, 1], devices);
        assert_eq!(t.expected, 6);
        assert_eq!(t.received, 4); // 0 twice, 1 once, 2 once
        assert_eq!(t.lost, 2); // one of event 0, one of event 1
        assert_eq!(t.duplicates, 3);
        assert_eq!(t.unexpected, 0);
    }

    #[test]
    fn deliveries_beyond_expectation_are_unexpected() {
        let t = tally(&[1], [vec![0], vec![0], vec![7]]);
        assert_eq!(t.received, 1);
        assert_eq!(t.unexpected, 2); // a second device got event 0; event 7 never existed
        assert_eq!(t.lost, 0);
    }
}
