//! The load generator: many WebSocket devices against the gateways, events
//! published straight to `feed.events` grouped by ring owner, and an
//! honest account of what arrived.
//!
//! - [`cli`]: the command line.
//! - [`client`]: one device: connect from a chosen source address, read events.
//! - [`publisher`]: events at a target rate, one message per owner node.
//! - [`accounting`]: latency histograms, loss and duplicate counting.
//! - [`report`]: the JSON report, the summary table, gateway RSS.
//! - [`run`]: a whole run: ramp up, hold, publish, drain, report.

pub mod accounting;
pub mod cli;
pub mod client;
pub mod nchan;
pub mod publisher;
pub mod report;
pub mod run;
