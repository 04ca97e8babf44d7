//! The run's report: JSON (SPEC's "Load-test report" fields) and a summary
//! table. Gateway memory comes from each node's `/metrics`.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::accounting::Tally;
use crate::e2e::E2eReport;
use crate::series::Point;
use crate::wire::Reconnects;

#[derive(Debug, Serialize)]
pub struct Report {
    pub connections: Connections,
    pub connect_rate_per_s: f64,
    pub ramp_up_s: f64,
    /// Worker processes that held the devices.
    pub workers: u32,
    pub messages: Tally,
    pub broker_messages_published: u64,
    pub events_published: u64,
    pub deliveries_per_s: f64,
    /// The servers' (gateways' or nginx's) CPU per delivery, kernel
    /// included: publishing minus holding; none when nothing was published
    /// or a server could not be read.
    pub server_cpu: Option<crate::cpu::CpuReport>,
    pub latency_ms: LatencyMs,
    pub gateways: Vec<GatewayMemory>,
    /// Close codes the gateways sent to devices during the run.
    pub close_codes: BTreeMap<u16, u64>,
    /// Frames that were not events of this run (another load generator on
    /// the same broker, same user ids); ignored by the accounting.
    pub foreign_frames: u64,
    /// Broker messages that could not be published at all (given up after
    /// retries), or Nchan publish requests that failed.
    pub publish_errors: u64,
    /// How publishing went through broker and Redis faults.
    pub publisher: crate::publisher::PublishFaults,
    /// Devices that reconnected (`--recover`, `--churn`).
    pub reconnects: ReconnectReport,
    /// Per second since the run started.
    pub series: Vec<Point>,
    /// Unix second of the series' `t_s = 0`, to line the series up with
    /// events outside the run (a fault script's timestamps).
    pub series_start_unix_s: u64,
    /// e2e mode: posts over HTTP and the backend's fan-out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e2e: Option<E2eReport>,
    pub params: serde_json::Value,
}

#[derive(Debug, Serialize)]
pub struct Connections {
    pub target: u64,
    pub established: u64,
    pub failed: u64,
    /// Failed attempts by cause: refused, reset, timeout, http_503, ...
    pub failed_by_cause: BTreeMap<String, u64>,
    /// From the first attempt of any worker to the last outcome of any
    /// (without starting the workers and minting tokens), and the rate of
    /// successful connects over it.
    pub attempt_window_s: f64,
    pub connects_per_s_in_window: f64,
    /// The longest a worker spent minting its tokens (before its ramp).
    pub token_minting_s: f64,
}

#[derive(Debug, Serialize, Default)]
pub struct LatencyMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencyMs {
    pub fn from_micros(h: &Histogram<u64>) -> LatencyMs {
        if h.is_empty() {
            return LatencyMs::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencyMs {
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct GatewayMemory {
    pub node_id: String,
    /// Devices the gateway reports holding.
    pub connections: u64,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    /// (RSS after ramp-up - RSS before) / connections.
    pub rss_per_connection_bytes: f64,
    /// nginx only: proportional set size (shared pages counted once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pss_before_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pss_after_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pss_per_connection_bytes: Option<f64>,
}

/// Reconnections over the whole run, and their rates over the publishing
/// window (churn runs only while events are published).
#[derive(Debug, Serialize, Default)]
pub struct ReconnectReport {
    /// `--churn`: closes asked for per second.
    pub churn_requested_per_s: f64,
    /// Seconds of publishing the rates are over.
    pub window_s: f64,
    /// Connections closed on purpose (churn), connections that ended
    /// (churned or not) and were retried, reconnections, failed attempts.
    pub churned: u64,
    pub disconnects: u64,
    pub connects: u64,
    pub failures: u64,
    pub churned_per_s: f64,
    pub disconnects_per_s: f64,
    pub connects_per_s: f64,
}

impl ReconnectReport {
    pub fn new(total: &Reconnects, window: std::time::Duration, churn: f64) -> ReconnectReport {
        let w = window.as_secs_f64().max(1e-3);
        ReconnectReport {
            churn_requested_per_s: churn,
            window_s: window.as_secs_f64(),
            churned: total.churned,
            disconnects: total.disconnects,
            connects: total.connects,
            failures: total.failures,
            churned_per_s: total.churned as f64 / w,
            disconnects_per_s: total.disconnects as f64 / w,
            connects_per_s: total.connects as f64 / w,
        }
    }
}

/// Reads one gauge from a gateway's `/metrics` (ws:// base URL).
pub async fn scrape_gauge(ws_base: &str, name: &str) -> Option<f64> {
    let hostport = ws_base.strip_prefix("ws://")?;
    let mut s = tokio::net::TcpStream::connect(hostport).await.ok()?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(format!("GET /metrics HTTP/1.1\r\nhost: {hostport}\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_string(&mut body)).await.ok()?.ok()?;
    body.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

impl Report {
    pub fn print_summary(&self) {
        let c = &self.connections;
        let m = &self.messages;
        let l = &self.latency_ms;
        println!(
            "connections   target {}  established {}  failed {}  ({:.0}/s over {:.1}s, {} workers)",
            c.target, c.established, c.failed, self.connect_rate_per_s, self.ramp_up_s, self.workers
        );
        if c.attempt_window_s > 0.0 {
            println!(
                "connect rate  {:.0}/s from the first attempt to the last outcome ({:.2}s; tokens minted beforehand in {:.3}s)",
                c.connects_per_s_in_window, c.attempt_window_s, c.token_minting_s
            );
        }
        if !c.failed_by_cause.is_empty() {
            println!("failed by     {:?}", c.failed_by_cause);
        }
        println!(
            "events        {} published as {} broker messages",
            self.events_published, self.broker_messages_published
        );
        println!(
            "deliveries    expected {}  received {}  lost {}  duplicates {}  unexpected {}",
            m.expected, m.received, m.lost, m.duplicates, m.unexpected
        );
        println!("throughput    {:.0} deliveries/s", self.deliveries_per_s);
        if let Some(c) = &self.server_cpu {
            println!(
                "server CPU    {:.2} us/delivery  ({:.2} CPU s over {:.1}s publishing, {:.2} cores; held: {:.2} CPU s over {:.1}s)",
                c.us_per_delivery, c.publish_cpu_s, c.publish_window_s, c.publish_cores, c.hold_cpu_s, c.hold_window_s
            );
        }
        println!(
            "latency ms    p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
        for g in &self.gateways {
            println!(
                "gateway {:<10} {} connections  RSS {:.1} MiB -> {:.1} MiB  = {:.0} bytes/connection",
                g.node_id,
                g.connections,
                g.rss_before_bytes as f64 / 1048576.0,
                g.rss_after_bytes as f64 / 1048576.0,
                g.rss_per_connection_bytes
            );
        }
        if let Some(e) = &self.e2e {
            e.print_summary();
        }
        let r = &self.reconnects;
        if r.disconnects > 0 || r.churn_requested_per_s > 0.0 {
            println!(
                "reconnects    {} closed ({} by churn, {:.0}/s over {:.1}s of publishing), {} reconnected ({:.0}/s), {} failed attempts",
                r.disconnects, r.churned, r.churned_per_s, r.window_s, r.connects, r.connects_per_s, r.failures
            );
        }
        let p = &self.publisher;
        if p.broker.reconnects + p.broker.connect_failures + p.broker.republished + p.feed_retries > 0 {
            println!(
                "publisher     {} reconnects ({} failed attempts), {} messages published again, {} feed writes retried; given up: {} messages, {} events, {} deliveries",
                p.broker.reconnects,
                p.broker.connect_failures,
                p.broker.republished,
                p.feed_retries,
                p.broker.given_up,
                p.events_given_up,
                p.deliveries_given_up
            );
        }
        if self.publish_errors > 0 {
            println!("publish errors {}", self.publish_errors);
        }
        if self.foreign_frames > 0 {
            println!("ignored       {} frames of other runs (same user ids on the same broker)", self.foreign_frames);
        }
        if !self.close_codes.is_empty() {
            println!("close codes   {:?}", self.close_codes);
        }
    }
}
