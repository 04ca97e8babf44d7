//! Gateway membership in Redis: who is in the ring.
//!
//! One hash (default [`MEMBERS_KEY`]): field = node id, value = JSON
//! `{"url": "ws://host:port", "heartbeat_ms": <unix ms>}`. A node rewrites
//! its field every [`HEARTBEAT_INTERVAL`]; a field whose heartbeat is older
//! than [`HEARTBEAT_TIMEOUT`] is not a member (and survivors delete it).
//! A node that stops cleanly writes `"left": true` (a tombstone) rather
//! than deleting its field: everyone then drops it at once, in the same
//! order as a dead node (gateways first, publishers [`PUBLISHER_GRACE`]
//! later), where a vanished field could not be told from a Redis restart.
//! Every process reads the whole hash with one `HGETALL` and builds the
//! ring with [`crate::ring::Ring::new`].
//!
//! Each record carries the node's `incarnation` (unix microseconds when
//! that process, or its rejoin, began): a node restarted under the same id
//! is a new incarnation, with a queue of its own
//! ([`crate::topology::node_queue`]). Gateways that drop a member whose
//! heartbeat stopped record it in a second hash, [`evicted_key`]: field =
//! node id, value = the newest incarnation dropped. Every gateway drops an
//! evicted incarnation at once, and a node that finds its own incarnation
//! there (it was hung or cut off) closes its devices and rejoins as a new
//! one. Publishers need not read it: an evicted node stops beating, and
//! routing by slot reaches whoever binds the slot.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ring::Member;

/// The default Redis hash of gateway nodes. Configurable (`--membership-key`)
/// so several clusters, or tests, can share one Redis.
pub const MEMBERS_KEY: &str = "gateway:nodes";
/// How often a node refreshes its heartbeat and re-reads the members. A
/// quarter second keeps "dead node noticed" within 5.25 s of its last beat
/// (so within 5.25 s of its death), leaving time to re-bind its slots and
/// have its devices back within 6 s. Four small Redis calls per node per
/// second.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// A node is a member while its heartbeat is younger than this (SPEC: 5 s).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// Publishers keep a member this much longer than gateways do. Gateways
/// must have re-bound a dead node's slots before any publisher stops routing
/// to it: otherwise a group routed by one of its slots reaches nobody.
pub const PUBLISHER_GRACE: Duration = Duration::from_secs(1);
/// Gateways delete a stale field only once publishers have dropped it too.
pub const FIELD_CLEANUP_AGE: Duration = Duration::from_secs(7);

/// What a node writes into its field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub url: String,
    pub heartbeat_ms: u64,
    /// Which life of the node this is (0 from writers that predate it).
    #[serde(default)]
    pub incarnation: u64,
    /// Written once by a node that stops cleanly.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub left: bool,
    /// The `ws://` address other gateway nodes dial to reach this one (to
    /// proxy a device, or to probe whether it died), when it differs from
    /// `url`, e.g. `wss://` behind a TLS terminator for clients and plain
    /// `ws://` between nodes. Absent: nodes dial `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_url: Option<String>,
}

impl Record {
    /// The heartbeat of a live node.
    pub fn alive(url: &str, now_ms: u64) -> Record {
        Record { url: url.into(), heartbeat_ms: now_ms, incarnation: 0, left: false, internal_url: None }
    }

    /// The same record, with the address other nodes dial.
    pub fn with_internal_url(self, internal_url: Option<String>) -> Record {
        Record { internal_url, ..self }
    }

    /// The address other gateway nodes dial to reach this node.
    pub fn dial_url(&self) -> &str {
        self.internal_url.as_deref().unwrap_or(&self.url)
    }

    /// The same record, for the given incarnation.
    pub fn of_incarnation(self, incarnation: u64) -> Record {
        Record { incarnation, ..self }
    }

    /// The tombstone of a node that stops cleanly now.
    pub fn leaving(url: &str, now_ms: u64) -> Record {
        Record { url: url.into(), heartbeat_ms: now_ms, incarnation: 0, left: true, internal_url: None }
    }

    /// The heartbeat staleness is judged by. A node that left counts as
    /// one whose heartbeat went stale the moment it left: gateways drop it
    /// at once, publishers [`PUBLISHER_GRACE`] later, cleanup after that.
    pub fn effective_heartbeat_ms(&self) -> u64 {
        if self.left {
            self.heartbeat_ms.saturating_sub(HEARTBEAT_TIMEOUT.as_millis() as u64)
        } else {
            self.heartbeat_ms
        }
    }
}

/// The live members of a `HGETALL` answer, sorted by node id. Unreadable
/// and stale fields are left out.
pub fn live_members(fields: &HashMap<String, String>, now_ms: u64, timeout: Duration) -> Vec<Member> {
    let mut out: Vec<Member> = fields
        .iter()
        .filter_map(|(id, v)| {
            let r: Record = serde_json::from_str(v).ok()?;
            (now_ms.saturating_sub(r.effective_heartbeat_ms()) < timeout.as_millis() as u64)
                .then(|| Member { node_id: id.clone(), url: r.url })
        })
        .collect();
    out.sort();
    out
}

/// Fields of the hash whose heartbeat is stale (or unreadable).
pub fn stale_fields(fields: &HashMap<String, String>, now_ms: u64, timeout: Duration) -> Vec<String> {
    let live: Vec<String> = live_members(fields, now_ms, timeout).into_iter().map(|m| m.node_id).collect();
    fields.keys().filter(|k| !live.contains(k)).cloned().collect()
}

/// Reads the members a publisher should route to from the hash `key`
/// (heartbeat younger than the timeout plus [`PUBLISHER_GRACE`]).
pub async fn fetch(conn: &mut impl redis::aio::ConnectionLike, key: &str) -> redis::RedisResult<Vec<Member>> {
    let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(key).query_async(conn).await?;
    Ok(live_members(&fields, now_ms(), HEARTBEAT_TIMEOUT + PUBLISHER_GRACE))
}

/// The hash of evicted incarnations that goes with the members hash `key`.
pub fn evicted_key(key: &str) -> String {
    format!("{key}:evicted")
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fresh_readable_fields_are_members() {
        let rec = |url: &str, hb: u64| serde_json::to_string(&Record::alive(url, hb)).unwrap();
        let fields: HashMap<String, String> = [
            ("b".to_string(), rec("ws://b", 10_000)),
            ("a".to_string(), rec("ws://a", 9_000)),
            ("old".to_string(), rec("ws://old", 1_000)),
            ("junk".to_string(), "{".to_string()),
        ]
        .into();
        let live = live_members(&fields, 12_000, Duration::from_secs(5));
        assert_eq!(live.iter().map(|m| m.node_id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(live[0].url, "ws://a");
        let mut stale = stale_fields(&fields, 12_000, Duration::from_secs(5));
        stale.sort();
        assert_eq!(stale, ["junk", "old"]);
    }

    #[test]
    fn a_node_that_left_is_dropped_by_gateways_now_and_by_publishers_after_the_grace() {
        let left = serde_json::to_string(&Record::leaving("ws://l", 10_000)).unwrap();
        assert!(left.contains(r#""left":true"#));
        let alive = serde_json::to_string(&Record::alive("ws://a", 10_000)).unwrap();
        assert!(!alive.contains("left"), "live records keep the SPEC shape: {alive}");
        let fields: HashMap<String, String> = [("l".to_string(), left), ("a".to_string(), alive)].into();
        let ids = |t: u64, timeout: Duration| {
            live_members(&fields, t, timeout).into_iter().map(|m| m.node_id).collect::<Vec<_>>()
        };
        assert_eq!(ids(10_000, HEARTBEAT_TIMEOUT), ["a"]);
        assert_eq!(ids(10_500, HEARTBEAT_TIMEOUT + PUBLISHER_GRACE), ["a", "l"]);
        assert_eq!(ids(11_000, HEARTBEAT_TIMEOUT + PUBLISHER_GRACE), ["a"]);
    }
}
