//! Latency and loss, counted rather than assumed.
//!
//! Every event has a sequence number. The coordinator records how many
//! deliveries it expects for it (the connected devices of its recipients at
//! publish time). Each worker keeps, per device, the sequence numbers that
//! arrived, and at the end folds them into [`Receipts`]: per event, how
//! many distinct devices of an intended recipient got it, plus the repeats
//! (duplicates) and the deliveries nobody should have had (unexpected).
//! The coordinator sums the workers' receipts and compares them with what
//! it expected ([`tally`]): what is missing is lost.
//!
//! Latency histograms cross the process boundary in hdrhistogram's V2
//! format, base64 encoded ([`encode_histogram`], [`decode_histogram`]).

use anyhow::Context;
use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::audience::Audience;

/// Latencies are kept in microseconds, 1 µs to 5 minutes, 3 significant digits.
const MAX_LATENCY_US: u64 = 300_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Latency histograms sharded by device, so that thousands of device tasks
/// on a few threads rarely contend.
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

    /// Takes the samples recorded since the last call, emptying the shards.
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

/// A histogram as V2 bytes in base64, for a JSON line.
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2Serializer::new().serialize(h, &mut bytes).expect("serializing into memory cannot fail");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn decode_histogram(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).context("histogram is not base64")?;
    Deserializer::new().deserialize(&mut bytes.as_slice()).map_err(|e| anyhow::anyhow!("bad V2 histogram: {e:?}"))
}

/// Adds `from` into `into`, whatever bounds `from` was made with.
pub fn merge_into(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    for v in from.iter_recorded() {
        into.saturating_record_n(v.value_iterated_to().clamp(1, MAX_LATENCY_US), v.count_at_value());
    }
}

/// What one worker's devices received, per event.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipts {
    /// `got[seq]`: distinct devices of intended recipients that got `seq`.
    pub got: Vec<u32>,
    /// Repeats of an event on one device.
    pub duplicates: u64,
    /// Events on a device whose user was not a recipient, or never published.
    pub unexpected: u64,
}

impl Receipts {
    pub fn new(events: u32) -> Receipts {
        Receipts { got: vec![0; events as usize], ..Receipts::default() }
    }

    /// Folds in one device of user `user` (global index) that received
    /// `seqs`, in any order.
    pub fn add_device(&mut self, user: usize, mut seqs: Vec<u32>, audience: &Audience) {
        seqs.sort_unstable();
        let before = seqs.len();
        seqs.dedup();
        self.duplicates += (before - seqs.len()) as u64;
        for s in seqs {
            match self.got.get_mut(s as usize) {
                Some(n) if audience.contains(s, user) => *n += 1,
                _ => self.unexpected += 1,
            }
        }
    }

    /// Adds another worker's receipts.
    pub fn merge(&mut self, other: &Receipts) {
        if self.got.len() < other.got.len() {
            self.got.resize(other.got.len(), 0);
        }
        for (a, b) in self.got.iter_mut().zip(&other.got) {
            *a += b;
        }
        self.duplicates += other.duplicates;
        self.unexpected += other.unexpected;
    }
}

/// What a run delivered, against what it should have.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub unexpected: u64,
}

/// Compares the expected deliveries per event (`expected[seq]`) with the
/// merged receipts of all workers.
pub fn tally(expected: &[u32], receipts: &Receipts) -> Tally {
    let mut t = Tally {
        expected: expected.iter().map(|&e| u64::from(e)).sum(),
        duplicates: receipts.duplicates,
        unexpected: receipts.unexpected,
        ..Tally::default()
    };
    for (seq, &e) in expected.iter().enumerate() {
        let g = receipts.got.get(seq).copied().unwrap_or(0);
        t.received += u64::from(g.min(e));
        t.lost += u64::from(e.saturating_sub(g));
        // More distinct devices than were connected at publish time.
        t.unexpected += u64::from(g.saturating_sub(e));
    }
    // Receipts for sequence numbers the coordinator never published.
    t.unexpected += receipts.got.iter().skip(expected.len()).map(|&g| u64::from(g)).sum::<u64>();
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_merged_across_workers_equal_the_histogram_of_all_samples() {
        // Two "workers" record, serialize and ship their histograms; the
        // coordinator decodes and merges them.
        let (a, b) = (Latency::new(4), Latency::new(3));
        let mut direct = new_histogram();
        for i in 1..=20_000u64 {
            let v = i * 37 % 250_000 + 1;
            if i % 3 == 0 {
                a.record(i as usize, v)
            } else {
                b.record(i as usize, v)
            }
            direct.record(v).unwrap();
        }
        let wire = [encode_histogram(&a.take()), encode_histogram(&b.take())];
        let mut merged = new_histogram();
        for w in &wire {
            merge_into(&mut merged, &decode_histogram(w).unwrap());
        }
        assert_eq!(merged.len(), 20_000);
        for q in [0.5, 0.9, 0.99, 0.999] {
            assert_eq!(merged.value_at_quantile(q), direct.value_at_quantile(q), "q {q}");
        }
        assert_eq!(merged.max(), direct.max());
        // `take` emptied the shards.
        assert_eq!(a.take().len(), 0);
        assert!(decode_histogram("not base64!").is_err());
        assert!(decode_histogram("AAAA").is_err());
    }

    #[test]
    fn out_of_range_latencies_are_clamped_not_dropped() {
        let lat = Latency::new(1);
        lat.record(0, 0);
        lat.record(0, u64::MAX);
        assert_eq!(lat.take().len(), 2);
    }

    /// Event `seq` goes to user `seq % 3` only.
    fn audience() -> Audience {
        Audience::Followers { users: 3, authors: 3 }
    }

    #[test]
    fn nothing_missing_means_nothing_lost() {
        let a = Audience::Followers { users: 4, authors: 2 }; // even seq: users 0, 2; odd: 1, 3
        let mut w1 = Receipts::new(2);
        w1.add_device(0, vec![0], &a);
        w1.add_device(1, vec![1], &a);
        let mut w2 = Receipts::new(2);
        w2.add_device(2, vec![0], &a);
        w2.add_device(3, vec![1], &a);
        let mut all = Receipts::default();
        all.merge(&w1);
        all.merge(&w2);
        let t = tally(&[2, 2], &all);
        assert_eq!(t, Tally { expected: 4, received: 4, lost: 0, duplicates: 0, unexpected: 0 });
    }

    #[test]
    fn missing_pairs_are_lost_and_repeats_are_duplicates() {
        let a = audience();
        // Worker 1 holds user 0 (two devices), worker 2 users 1 and 2.
        let mut w1 = Receipts::new(3);
        w1.add_device(0, vec![0, 0], &a); // event 0 twice on one device
        w1.add_device(0, vec![], &a); // second device of user 0 got nothing
        let mut w2 = Receipts::new(3);
        w2.add_device(1, vec![1], &a);
        w2.add_device(2, vec![2, 2, 2], &a);
        let mut all = Receipts::default();
        all.merge(&w1);
        all.merge(&w2);
        // Expected: event 0 on 2 devices (user 0's), event 1 on 1, event 2 on 1.
        let t = tally(&[2, 1, 1], &all);
        assert_eq!(t.expected, 4);
        assert_eq!(t.received, 3);
        assert_eq!(t.lost, 1);
        assert_eq!(t.duplicates, 3);
        assert_eq!(t.unexpected, 0);
    }

    #[test]
    fn deliveries_to_non_recipients_or_unpublished_events_are_unexpected() {
        let a = audience();
        let mut r = Receipts::new(3);
        r.add_device(1, vec![0], &a); // user 1 is not a recipient of event 0
        r.add_device(0, vec![0, 9], &a); // event 9 was never published
        let t = tally(&[1, 0, 0], &r);
        assert_eq!(t.received, 1);
        assert_eq!(t.unexpected, 2);
        assert_eq!(t.lost, 0);
        // A device that connected after publishing counts as unexpected too.
        let t = tally(&[0, 0, 0], &r);
        assert_eq!((t.received, t.unexpected, t.lost), (0, 3, 0));
    }
}
