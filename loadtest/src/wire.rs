//! The worker protocol: JSON lines over a worker's stdin and stdout.
//!
//! The coordinator starts each worker as `loadtest worker` (its own
//! binary, `std::env::current_exe()`), writes one [`Job`] line to the
//! worker's stdin and, when the run is over, one [`Command`] line. The
//! worker writes [`Report`] lines to its stdout: a [`Report::Tick`] at
//! every whole unix second, one [`Report::Ready`] once every device of its
//! slice has been attempted, and one [`Report::Done`] after the stop. Its
//! logs go to stderr. End of input (the coordinator is gone) stops it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::accounting::Receipts;
use crate::audience::Audience;

/// Everything a worker needs to connect its slice.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub worker: usize,
    /// The run's id: events of other runs are ignored.
    pub run: u64,
    /// Global index of the first user of the slice.
    pub first_user: u32,
    /// The slice's user ids.
    pub users: Vec<String>,
    /// One token per user of the slice (e2e: from the backend's login);
    /// empty: the worker mints them with `jwt_secret`.
    pub tokens: Vec<String>,
    pub jwt_secret: String,
    pub devices: u32,
    /// Gateway members as `node_id=ws://host:port`.
    pub members: Vec<String>,
    /// This worker's source addresses, first..=last.
    pub source_ips: (Ipv4Addr, Ipv4Addr),
    /// New connections per second for this worker.
    pub connect_rate: f64,
    /// Connection attempts this worker keeps in flight at most during
    /// ramp-up (all workers together stay below the gateways' cap on
    /// sockets that have not upgraded yet; see `run::max_connecting`).
    #[serde(default = "default_max_connecting")]
    pub max_connecting: usize,
    pub audience: Audience,
    /// `since` for a device that reconnects before it received anything:
    /// below every event id of the run (None: [`crate::client::since_floor`]
    /// of gateway-mode ids; e2e: below the backend's ids).
    #[serde(default)]
    pub since_floor: Option<String>,
    /// nginx + Nchan instead of gateways: the single member is its URL and
    /// a device's token is its user id (the channel it subscribes to).
    #[serde(default)]
    pub nchan: bool,
    /// Devices whose connection ends reconnect with `?since=<last id>`
    /// (to the 4001 reason's URL, else the owner, then the other members)
    /// until the run stops; they stay expected all along.
    #[serde(default)]
    pub recover: bool,
    /// Devices first dial the members in turn, not their owner (`--spread`).
    #[serde(default)]
    pub spread: bool,
}

fn default_max_connecting() -> usize {
    512
}

/// A worker's reconnection counters (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconnects {
    /// Reconnections that succeeded.
    pub connects: u64,
    /// Connections that ended during the run and were retried (churned
    /// ones included).
    pub disconnects: u64,
    /// Of those, closed by the worker on purpose (churn).
    pub churned: u64,
    /// Reconnection attempts that failed (each retry counts).
    pub failures: u64,
}

impl Reconnects {
    pub fn add(&mut self, o: &Reconnects) {
        self.connects += o.connects;
        self.disconnects += o.disconnects;
        self.churned += o.churned;
        self.failures += o.failures;
    }
}

/// Coordinator to worker, after the job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// Close the devices and report; `events` were published (0..events).
    Stop { events: u32 },
    /// From now on, close and reconnect `per_s` connected devices per
    /// second, picked at random (0: stop churning).
    Churn { per_s: f64 },
}

/// Worker to coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Report {
    /// The worker's state at a whole unix second.
    Tick {
        unix_s: u64,
        /// Devices connected now.
        open: u64,
        /// Connection attempts so far that succeeded / failed.
        established: u64,
        failed: u64,
        /// Events received since the previous tick (all, duplicates too).
        received: u64,
        /// Latencies of those events (V2, base64).
        latency: String,
        /// Global user index of each device that ended since the previous
        /// tick (after `Ready` only; before it, `Ready` has the counts).
        closed: Vec<u32>,
        /// Since the start: reconnections that succeeded, connections
        /// that ended and were retried, reconnection attempts that failed,
        /// and connections the worker closed on purpose (churn).
        #[serde(default)]
        reconnects: Reconnects,
    },
    /// Every device of the slice was attempted: the devices connected now
    /// per user of the slice, and the attempts that succeeded and failed.
    Ready {
        connected: Vec<u32>,
        established: u64,
        failed: u64,
        /// Failed attempts by cause ([`crate::client::failure_cause`]).
        #[serde(default)]
        failed_by_cause: BTreeMap<String, u64>,
        /// Unix micros of the first attempt and of the last attempt's
        /// outcome: the connect rate's window, without process start-up.
        #[serde(default)]
        first_attempt_us: u64,
        #[serde(default)]
        last_outcome_us: u64,
        /// Microseconds spent minting the slice's tokens (before the ramp).
        #[serde(default)]
        mint_us: u64,
    },
    /// Final accounting after `Stop`.
    Done {
        receipts: Receipts,
        /// All latencies of the run (V2, base64).
        latency: String,
        /// As `[[code, count], ...]`: integer map keys do not survive the
        /// internally tagged enum's buffering.
        #[serde(with = "pairs")]
        close_codes: BTreeMap<u16, u64>,
        /// Unix micros of the worker's latest receipt (0: none).
        last_receipt_us: u64,
        /// Frames that were not this run's events (ignored).
        foreign: u64,
    },
}

/// A map with integer keys as a list of pairs.
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(map: &BTreeMap<u16, u64>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u16, u64>, D::Error> {
        Ok(Vec::<(u16, u64)>::deserialize(d)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_cross_the_wire() {
        let done = Report::Done {
            receipts: Receipts::default(),
            latency: String::new(),
            close_codes: BTreeMap::from([(4001, 3), (1001, 1)]),
            last_receipt_us: 0,
            foreign: 0,
        };
        let line = serde_json::to_string(&done).unwrap();
        match serde_json::from_str(&line).unwrap() {
            Report::Done { close_codes, .. } => assert_eq!(close_codes, BTreeMap::from([(4001, 3), (1001, 1)])),
            other => panic!("{other:?}"),
        }
    }
}
