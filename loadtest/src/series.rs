//! Per-second series of a run, added up from the workers' ticks: devices
//! connected, deliveries, latency percentiles.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::accounting::{merge_into, new_histogram};

#[derive(Default)]
pub struct Series {
    /// By unix second.
    buckets: BTreeMap<u64, Bucket>,
}

struct Bucket {
    connections: u64,
    deliveries: u64,
    events: u64,
    latency: Histogram<u64>,
}

/// One second of the run, as the report and the charts show it.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Seconds since the run started.
    pub t_s: u64,
    pub connections: u64,
    pub deliveries_per_s: u64,
    pub events_published: u64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
}

impl Series {
    fn bucket(&mut self, unix_s: u64) -> &mut Bucket {
        self.buckets.entry(unix_s).or_insert_with(|| Bucket {
            connections: 0,
            deliveries: 0,
            events: 0,
            latency: new_histogram(),
        })
    }

    /// Adds one worker's tick.
    pub fn add_tick(&mut self, unix_s: u64, open: u64, received: u64, latency: &Histogram<u64>) {
        let b = self.bucket(unix_s);
        b.connections += open;
        b.deliveries += received;
        merge_into(&mut b.latency, latency);
    }

    /// Counts events the coordinator published in this second.
    pub fn add_published(&mut self, unix_s: u64, events: u64) {
        self.bucket(unix_s).events += events;
    }

    /// The points from `start_unix_s` on.
    pub fn points(&self, start_unix_s: u64) -> Vec<Point> {
        let ms = |us: u64| us as f64 / 1000.0;
        self.buckets
            .range(start_unix_s..)
            .map(|(&s, b)| {
                let q = |q: f64| (!b.latency.is_empty()).then(|| ms(b.latency.value_at_quantile(q)));
                Point {
                    t_s: s - start_unix_s,
                    connections: b.connections,
                    deliveries_per_s: b.deliveries,
                    events_published: b.events,
                    latency_p50_ms: q(0.5),
                    latency_p99_ms: q(0.99),
                    latency_max_ms: (!b.latency.is_empty()).then(|| ms(b.latency.max())),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_of_one_second_add_up() {
        let mut s = Series::default();
        let mut h = new_histogram();
        h.record(2000).unwrap();
        s.add_tick(100, 10, 5, &h);
        s.add_tick(100, 20, 7, &new_histogram());
        s.add_tick(101, 30, 0, &new_histogram());
        s.add_published(100, 3);
        let p = s.points(99);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].t_s, p[0].connections, p[0].deliveries_per_s, p[0].events_published), (1, 30, 12, 3));
        assert_eq!(p[0].latency_p50_ms, Some(2.0));
        assert_eq!(p[1].latency_p99_ms, None);
    }
}
