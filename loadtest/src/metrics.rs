//! The load generator's own Prometheus metrics (SPEC names), served while
//! it runs, fed from the workers' ticks.

use std::net::SocketAddr;

use hdrhistogram::Histogram;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub const CONNECTIONS: &str = "loadtest_connections";
pub const RECEIVED: &str = "loadtest_messages_received_total";
pub const LATENCY: &str = "loadtest_latency_seconds";

/// Latency buckets in seconds, 0.5 ms to 30 s, like the gateway's own
/// delivery histogram: up to 30 s so a failover backlog reads as what it is
/// (a p99 of 7.5 s read 9.5 s with a top bucket of 5-10 s).
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0];

/// Serves `/metrics` on `listen` (in the background, on this runtime).
pub fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(Matcher::Full(LATENCY.into()), LATENCY_BUCKETS)?
        .install()
        .map_err(|e| anyhow::anyhow!("--metrics-listen {listen}: {e}"))?;
    metrics::describe_gauge!(CONNECTIONS, "Devices connected to the gateways now");
    metrics::describe_counter!(RECEIVED, "Events received by the devices (duplicates too)");
    metrics::describe_histogram!(LATENCY, "Publish to receipt, per delivery");
    Ok(())
}

/// One worker tick: the connections of all workers now, and this worker's
/// receipts of the last second. Without [`serve`] these go nowhere.
pub fn on_tick(connections: u64, received: u64, latency_us: &Histogram<u64>) {
    metrics::gauge!(CONNECTIONS).set(connections as f64);
    metrics::counter!(RECEIVED).increment(received);
    let h = metrics::histogram!(LATENCY);
    for v in latency_us.iter_recorded() {
        h.record_many(v.value_iterated_to() as f64 / 1e6, v.count_at_value() as usize);
    }
}
