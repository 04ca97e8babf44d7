//! Prometheus metrics. Handles are resolved once here, so the hot path
//! (a delivery) touches atomics only, never the registry.

use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::close::CloseReason;
use crate::sessions::Transport;

/// Latency buckets (seconds): fine below 20 ms, where the target is.
/// Up to 30 s, so a backlog after a failover reads as what it is, not as
/// "above 10 s".
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0];
/// How often histograms are folded so unscraped samples do not pile up.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the global recorder (once per process) and returns the handle
/// that renders `/metrics`. Later calls return the same handle, so several
/// in-process nodes (tests) share one registry.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .expect("buckets are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            process_collector().describe();
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

/// The gateway's metrics (names from SPEC).
#[derive(Clone)]
pub struct Metrics {
    pub connections: Gauge,
    pub users: Gauge,
    pub opened_ok: Counter,
    pub opened_unauthorized: Counter,
    pub opened_bad_request: Counter,
    pub opened_too_many_devices: Counter,
    pub opened_over_capacity: Counter,
    pub opened_draining: Counter,
    pub broker_messages: Counter,
    pub broker_bad_messages: Counter,
    pub broker_reconnects: Counter,
    pub delivered: Counter,
    pub dropped_slow: Counter,
    pub write_failed: Counter,
    pub recipients_offline: Counter,
    pub latency: Histogram,
    pub slow_closes: Counter,
    pub oversize_closes: Counter,
    pub owned_slots: Gauge,
    pub ring_members: Gauge,
    pub rebalances: Counter,
    pub proxied: Gauge,
    pub proxied_total: Counter,
    pub republished: Counter,
    pub misrouted: Counter,
    pub departed_drained: Counter,
    pub moved_closes: Counter,
    /// Peers this node dropped from the ring (their heartbeat stopped).
    pub members_evicted: Counter,
    /// Times this node was fenced: dropped by the others, or its queue lost.
    pub fenced: Counter,
    pub fenced_closes: Counter,
    pub recovered: Counter,
    /// Detoured events kept for absent users (see `late`).
    pub late_kept: Counter,
    pub recovery_reads: Counter,
    pub opened_over_address_limit: Counter,
    pub opened_over_unauthenticated_limit: Counter,
    pub handshake_timeouts: Counter,
    pub rate_limited_closes: Counter,
    pub recovery_cuts: Counter,
    pub rss_bytes: Gauge,
    pub heap_allocated: Gauge,
    pub heap_resident: Gauge,
    /// The device counts split by transport (WebSocket, SSE).
    pub by_transport: PerTransport,
    /// `gateway_connections_closed_total` by reason, indexed by
    /// `CloseReason as usize` (the named fields above are the same counters).
    closes: Vec<Counter>,
    /// Proxy failures by result (see `ProxyFailure`).
    proxy_failures: Vec<Counter>,
    pub opened_ring_changing: Counter,
}

/// Why a device entering a node that does not own its user was not
/// relayed: the `result` label of `gateway_connections_opened_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyFailure {
    /// The owner advertises no ws:// address (502).
    NoInternalUrl,
    /// The owner could not be reached (502).
    OwnerUnreachable,
    /// The owner did not answer in time (504).
    OwnerTimeout,
    /// The owner refused the device (its status passed on).
    OwnerRefused,
}

impl ProxyFailure {
    const ALL: [ProxyFailure; 4] = [
        ProxyFailure::NoInternalUrl,
        ProxyFailure::OwnerUnreachable,
        ProxyFailure::OwnerTimeout,
        ProxyFailure::OwnerRefused,
    ];

    const fn label(self) -> &'static str {
        match self {
            ProxyFailure::NoInternalUrl => "proxy_no_internal_url",
            ProxyFailure::OwnerUnreachable => "proxy_owner_unreachable",
            ProxyFailure::OwnerTimeout => "proxy_owner_timeout",
            ProxyFailure::OwnerRefused => "proxy_owner_refused",
        }
    }
}

/// The metrics a transport has of its own.
#[derive(Clone)]
pub struct TransportMetrics {
    pub connections: Gauge,
    pub opened: Counter,
    pub proxied: Gauge,
}

/// [`TransportMetrics`] for each transport.
#[derive(Clone)]
pub struct PerTransport {
    ws: TransportMetrics,
    sse: TransportMetrics,
}

impl PerTransport {
    fn new() -> PerTransport {
        let of = |t: Transport| {
            let label = t.label();
            TransportMetrics {
                connections: gauge!("gateway_connections_by_transport", "transport" => label),
                opened: counter!("gateway_connections_opened_by_transport_total", "transport" => label),
                proxied: gauge!("gateway_proxied_connections_by_transport", "transport" => label),
            }
        };
        PerTransport { ws: of(Transport::WebSocket), sse: of(Transport::Sse) }
    }

    pub fn of(&self, t: Transport) -> &TransportMetrics {
        match t {
            Transport::WebSocket => &self.ws,
            Transport::Sse => &self.sse,
        }
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let opened = |result: &'static str| counter!("gateway_connections_opened_total", "result" => result);
        let deliveries = |result: &'static str| counter!("gateway_deliveries_total", "result" => result);
        let closes: Vec<Counter> = CloseReason::ALL
            .iter()
            .map(|r| counter!("gateway_connections_closed_total", "reason" => r.label()))
            .collect();
        let closed = |r: CloseReason| closes[r as usize].clone();
        Metrics {
            connections: gauge!("gateway_connections"),
            users: gauge!("gateway_users"),
            opened_ok: opened("ok"),
            opened_unauthorized: opened("unauthorized"),
            opened_bad_request: opened("bad_request"),
            opened_too_many_devices: opened("too_many_devices"),
            opened_over_capacity: opened("over_capacity"),
            opened_draining: opened("draining"),
            broker_messages: counter!("gateway_broker_messages_total"),
            broker_bad_messages: counter!("gateway_broker_bad_messages_total"),
            broker_reconnects: counter!("gateway_broker_reconnects_total"),
            delivered: deliveries("sent"),
            dropped_slow: deliveries("dropped_slow"),
            write_failed: deliveries("write_failed"),
            recipients_offline: counter!("gateway_recipients_offline_total"),
            latency: histogram!("gateway_delivery_latency_seconds"),
            slow_closes: closed(CloseReason::SlowConsumer),
            oversize_closes: closed(CloseReason::FrameTooBig),
            owned_slots: gauge!("gateway_owned_slots"),
            ring_members: gauge!("gateway_ring_members"),
            rebalances: counter!("gateway_rebalances_total"),
            proxied: gauge!("gateway_proxied_connections"),
            proxied_total: counter!("gateway_proxied_opened_total"),
            republished: counter!("gateway_republished_messages_total"),
            misrouted: counter!("gateway_misrouted_recipients_total"),
            departed_drained: counter!("gateway_departed_drained_messages_total"),
            moved_closes: closed(CloseReason::Moved),
            members_evicted: counter!("gateway_members_evicted_total"),
            fenced: counter!("gateway_fenced_total"),
            fenced_closes: closed(CloseReason::Fenced),
            recovered: counter!("gateway_recovered_events_total"),
            late_kept: counter!("gateway_late_events_kept_total"),
            recovery_reads: counter!("gateway_recovery_reads_total"),
            opened_over_address_limit: opened("over_address_limit"),
            opened_over_unauthenticated_limit: opened("over_unauthenticated_limit"),
            handshake_timeouts: counter!("gateway_handshake_timeouts_total"),
            rate_limited_closes: closed(CloseReason::RateLimited),
            recovery_cuts: counter!("gateway_recovery_cuts_total"),
            rss_bytes: gauge!("gateway_process_rss_bytes"),
            heap_allocated: gauge!("gateway_heap_allocated_bytes"),
            heap_resident: gauge!("gateway_heap_resident_bytes"),
            by_transport: PerTransport::new(),
            proxy_failures: ProxyFailure::ALL.iter().map(|f| opened(f.label())).collect(),
            opened_ring_changing: opened("ring_changing"),
            closes,
        }
    }
}

impl Metrics {
    /// Counts a device the node ended, by why.
    pub fn closed(&self, reason: CloseReason) {
        self.closes[reason as usize].increment(1);
    }

    /// Counts a connection attempt that could not be relayed to its owner.
    pub fn proxy_failed(&self, why: ProxyFailure) {
        self.proxy_failures[why as usize].increment(1);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// HELP text for every metric of the gateway (shown by `/metrics`).
fn describe() {
    describe_gauge!("gateway_connections", "Devices (WebSocket and SSE) this node holds, proxied ones included.");
    describe_gauge!(
        "gateway_connections_by_transport",
        "Devices this node holds by transport (ws, sse); they add up to gateway_connections."
    );
    describe_counter!(
        "gateway_connections_opened_by_transport_total",
        "Devices this node accepted (result ok), by transport (ws, sse)."
    );
    describe_gauge!(
        "gateway_proxied_connections_by_transport",
        "Devices this node relays to their owner node now, by transport (ws, sse)."
    );
    describe_gauge!("gateway_users", "Distinct users with at least one device on this node.");
    describe_counter!(
        "gateway_connections_opened_total",
        "Device connection attempts (WebSocket and SSE) by result: ok, why the node refused it (over_capacity, \
         over_address_limit, over_unauthenticated_limit, unauthorized, bad_request, too_many_devices, draining, \
         ring_changing), or why it could not relay it to the owner node (proxy_*)."
    );
    describe_counter!(
        "gateway_connections_closed_total",
        "Devices the node ended, by reason (close code): client_closed (echo), client_gone, ping_timeout, \
         write_failed (no frame), token_expired and rate_limited (1008), frame_too_big (1009), protocol_error \
         (1002), invalid_utf8 (1007), recovery_failed (1011), moved (4001), slow_consumer (4008), \
         too_many_devices (4029), shutdown and fenced (1001)."
    );
    describe_counter!("gateway_broker_messages_total", "Messages consumed from this node's RabbitMQ queue.");
    describe_counter!("gateway_broker_bad_messages_total", "Consumed messages that could not be parsed (rejected).");
    describe_counter!("gateway_broker_reconnects_total", "Times the RabbitMQ connection was lost and made again.");
    describe_counter!(
        "gateway_deliveries_total",
        "Event frames for devices by result: sent, dropped_slow (device closed as slow), write_failed."
    );
    describe_histogram!(
        "gateway_delivery_latency_seconds",
        Unit::Seconds,
        "From the publisher's x-published-at to the frame written to the device's socket."
    );
    describe_counter!("gateway_recipients_offline_total", "Recipients of consumed events with no device on this node.");
    describe_gauge!("gateway_owned_slots", "Slots of the 1024 this node owns and binds.");
    describe_gauge!("gateway_ring_members", "Members of the ring as this node sees it.");
    describe_counter!("gateway_rebalances_total", "Ring changes this node adopted.");
    describe_gauge!("gateway_proxied_connections", "Devices this node relays to their owner node now.");
    describe_counter!("gateway_proxied_opened_total", "Devices this node started relaying to their owner node.");
    describe_counter!(
        "gateway_republished_messages_total",
        "Messages re-published once because the publisher's ring view was stale."
    );
    describe_counter!(
        "gateway_misrouted_recipients_total",
        "Recipients that arrived at a node that does not own them (re-published)."
    );
    describe_counter!(
        "gateway_departed_drained_messages_total",
        "Messages drained from a departed node's queue and delivered."
    );
    describe_counter!("gateway_recovered_events_total", "Events replayed from the feed cache to devices (since).");
    describe_counter!(
        "gateway_late_events_kept_total",
        "Events that reached this node by a detour (re-published, drained) for a user with no device here, kept for its next replay."
    );
    describe_gauge!("gateway_process_rss_bytes", Unit::Bytes, "Resident set size of the process.");
    describe_gauge!("gateway_heap_allocated_bytes", Unit::Bytes, "Bytes the program holds (jemalloc).");
    describe_gauge!("gateway_heap_resident_bytes", Unit::Bytes, "Bytes jemalloc keeps resident.");
}

/// The standard `process_*` metrics (CPU seconds, RSS, open files and their
/// limit, threads), from the `metrics-process` crate: the open-file count is
/// what runs out first on a node holding devices.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// This process's resident set size, from `/proc/self/statm` (Linux).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

impl Metrics {
    /// Refreshes the memory gauges and the `process_*` metrics (called when
    /// `/metrics` is scraped).
    pub fn refresh_memory(&self) {
        process_collector().collect();
        if let Some(rss) = resident_bytes() {
            self.rss_bytes.set(rss as f64);
        }
        // jemalloc's own view: what the program holds vs what it keeps
        // resident. Zero when the process does not use jemalloc (tests).
        use tikv_jemalloc_ctl::{epoch, stats};
        if epoch::advance().is_ok() {
            if let Ok(a) = stats::allocated::read() {
                self.heap_allocated.set(a as f64);
            }
            if let Ok(r) = stats::resident::read() {
                self.heap_resident.set(r as f64);
            }
        }
    }
}
