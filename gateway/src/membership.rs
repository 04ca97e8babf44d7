//! Ring membership: heartbeats into the Redis hash, the live members read
//! back, and the wanted ring handed to the broker task, which reconciles
//! bindings and sessions (make before break).
//!
//! Joining is make before break too: a new node first reads the members,
//! computes the ring with itself in it and binds its slots; only then does
//! it announce itself. Publishers never route to a slot nobody has bound.
//!
//! A member stays in this node's view until its last heartbeat is older
//! than the timeout, even if Redis forgets it (a Redis restart keeps
//! nothing). Nodes re-register within one interval, so a Redis blip does
//! not reshuffle the ring.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use contract::membership::{FIELD_CLEANUP_AGE, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, Record, now_ms};
use contract::ring::{Member, Ring};
use redis::aio::MultiplexedConnection;

use crate::state::Gateway;

/// A Redis call slower than this counts as a failed heartbeat.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn run(gw: Arc<Gateway>) {
    if !gw.config.static_members.is_empty() {
        let ring = Ring::new(gw.config.static_members.clone());
        gw.wanted_ring.send_replace(Some(Arc::new(ring)));
        gw.membership_ready.store(true, Ordering::Relaxed);
        return;
    }
    let client = match redis::Client::open(gw.config.redis_url.as_str()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("REDIS_URL unusable: {e}");
            return;
        }
    };
    let me = gw.config.node_id().to_owned();
    let record = |r: Record| serde_json::to_string(&r).expect("record");
    let url = gw.config.advertise_url().to_owned();
    let key = gw.config.membership_key.clone();
    let mut conn: Option<MultiplexedConnection> = None;
    // node id -> (url, last heartbeat seen, unix ms)
    let mut seen: BTreeMap<String, (String, u64)> = BTreeMap::new();
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = gw.shutdown.cancelled() => break,
        }
        let now = now_ms();
        let beat = async {
            if conn.is_none() {
                conn = Some(client.get_multiplexed_async_connection().await?);
            }
            let c = conn.as_mut().expect("connected");
            let mut pipe = redis::pipe();
            if gw.joined.load(Ordering::Relaxed) {
                pipe.cmd("HSET").arg(&key).arg(&me).arg(record(Record::alive(&url, now))).ignore();
            }
            let (fields,): (HashMap<String, String>,) = pipe.cmd("HGETALL").arg(&key).query_async(c).await?;
            Ok::<_, redis::RedisError>(fields)
        };
        let fields = match tokio::time::timeout(REDIS_TIMEOUT, beat).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                fail(&gw, &mut conn, &e.to_string());
                continue;
            }
            Err(_) => {
                fail(&gw, &mut conn, "timed out");
                continue;
            }
        };
        gw.membership_ready.store(true, Ordering::Relaxed);
        let timeout = HEARTBEAT_TIMEOUT.as_millis() as u64;
        for (id, v) in &fields {
            if let Ok(r) = serde_json::from_str::<Record>(v) {
                if r.left {
                    if seen.remove(id).is_some() {
                        tracing::info!(node = id, "member left");
                    }
                    continue;
                }
                // A field that is stale already (left behind until cleanup)
                // is not let back in, so a dead node is dropped once.
                if now.saturating_sub(r.heartbeat_ms) >= timeout && !seen.contains_key(id) {
                    continue;
                }
                let e = seen.entry(id.clone()).or_insert((r.url.clone(), 0));
                if r.heartbeat_ms >= e.1 {
                    *e = (r.url, r.heartbeat_ms);
                }
            }
        }
        let stale: Vec<String> =
            seen.iter().filter(|(_, (_, hb))| now.saturating_sub(*hb) >= timeout).map(|(id, _)| id.clone()).collect();
        if !stale.is_empty() {
            tracing::info!(?stale, "dropping members with stale heartbeats");
            for id in &stale {
                seen.remove(id);
            }
        }
        // Any survivor may clean up (HDEL is idempotent), but only fields
        // that publishers have stopped routing to as well.
        let cleanup: Vec<&String> = fields
            .iter()
            .filter(|(_, v)| {
                serde_json::from_str::<Record>(v).map_or(true, |r| {
                    now.saturating_sub(r.effective_heartbeat_ms()) >= FIELD_CLEANUP_AGE.as_millis() as u64
                })
            })
            .map(|(k, _)| k)
            .collect();
        if !cleanup.is_empty()
            && let Some(c) = conn.as_mut()
        {
            let _: Result<(), _> = redis::cmd("HDEL").arg(&key).arg(&cleanup).query_async(c).await;
        }
        let mut members: Vec<Member> =
            seen.iter().map(|(id, (url, _))| Member { node_id: id.clone(), url: url.clone() }).collect();
        // Before it announces itself, the node is in its own view only.
        if !members.iter().any(|m| m.node_id == me) {
            members.push(Member { node_id: me.clone(), url: gw.config.advertise_url().to_owned() });
            members.sort();
        }
        let changed = gw.wanted_ring.borrow().as_ref().is_none_or(|r| r.members() != members.as_slice());
        if changed {
            tracing::info!(members = ?members.iter().map(|m| &m.node_id).collect::<Vec<_>>(), "ring membership changed");
            gw.wanted_ring.send_replace(Some(Arc::new(Ring::new(members))));
        }
    }
    // Leave at once: the others rebalance on their next beat.
    if let Some(c) = conn.as_mut() {
        let tombstone = record(Record::leaving(&url, now_ms()));
        let left: Result<(), _> = redis::cmd("HSET").arg(&key).arg(&me).arg(tombstone).query_async(c).await;
        if let Err(e) = left {
            tracing::warn!("could not leave the ring: {e}");
        }
    }
}

fn fail(gw: &Gateway, conn: &mut Option<MultiplexedConnection>, why: &str) {
    if gw.membership_ready.swap(false, Ordering::Relaxed) {
        tracing::warn!("membership heartbeat failed: {why}");
    }
    *conn = None;
}
