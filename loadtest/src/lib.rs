//! The load generator: many WebSocket devices against the gateways, held by
//! several worker processes, events published straight to `feed.events`
//! grouped by ring owner, and an honest account of what arrived.
//!
//! - [`cli`]: the command line.
//! - [`e2e`]: `--mode e2e`: seed and post through the backend's HTTP API.
//! - [`discovery`]: the gateways, from the Redis membership or `--node`.
//! - [`run`]: the coordinator: ramp up, hold, publish, drain, report.
//! - [`pool`]: starts the worker processes and follows their reports.
//! - [`wire`]: the JSON lines between coordinator and workers.
//! - [`worker`]: a worker process: one slice of the devices.
//! - [`client`]: one device: connect from a chosen source address, read events.
//! - [`audience`]: who receives event `seq` (publisher and workers agree).
//! - [`publisher`]: events at a target rate, one message per owner node.
//! - [`amqp`]: the publisher's broker connection, which survives broker faults.
//! - [`pace`]: which event numbers are due, at a rate.
//! - [`accounting`]: latency histograms, loss and duplicate counting.
//! - [`series`]: per-second connections, deliveries and latency.
//! - [`charts`]: SVG charts of the series.
//! - [`cpu`]: the servers' CPU per delivery (publishing minus holding).
//! - [`metrics`]: the load generator's own Prometheus metrics.
//! - [`progress`]: progress bars for ramp-up and the run.
//! - [`report`]: the JSON report, the summary table, gateway RSS.

pub mod accounting;
pub mod amqp;
pub mod audience;
pub mod charts;
pub mod cli;
pub mod client;
pub mod cpu;
pub mod discovery;
pub mod e2e;
pub mod metrics;
pub mod nchan;
pub mod pace;
pub mod pool;
pub mod progress;
pub mod publisher;
pub mod report;
pub mod run;
pub mod series;
pub mod wire;
pub mod worker;
