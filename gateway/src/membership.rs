//! Ring membership: heartbeats into the Redis hash, the live members read
//! back, and the wanted view handed to the broker task, which reconciles
//! bindings and sessions (make before break).
//!
//! Joining is make before break too: a new node first reads the members,
//! computes the ring with itself in it and binds its slots; only then does
//! it announce itself. Publishers never route to a slot nobody has bound.
//!
//! **Staleness is judged on evidence, not on a wall clock.** A peer is
//! dropped when, over [`HEARTBEAT_TIMEOUT`] of this node's own successful
//! reads, its heartbeat never advanced. A gap between two successful reads
//! longer than [`EVIDENCE_GAP`] (Redis was down or slow, or this process
//! did not run) starts every peer's count over: nobody could write
//! meanwhile, so silence then says nothing. A Redis outage thus never
//! changes the ring, and a process resumed after a hang does not drop its
//! peers. A peer whose heartbeat is late by [`SUSPECT_AFTER`] is probed: a
//! TCP connect to its advertised address that is *refused* means no
//! process listens there any more (it died, its sockets closed at once), and
//! it is dropped without waiting for the timeout. A hung or overloaded
//! process still has its listening socket, whose backlog the kernel keeps
//! accepting into, so it is never refused.
//!
//! A dropped incarnation is written to the evicted hash
//! ([`contract::membership::evicted_key`]), which every gateway honours at
//! once, so the first node to decide decides for all. A node that finds its
//! own incarnation there (it was hung or cut off from Redis) must not carry
//! on: it is fenced (`Gateway::fence`), closes its devices so they recover
//! with `since` on the current owners, and rejoins as a new incarnation.
//!
//! Until then it delivers nothing it cannot vouch for: each successful beat
//! grants a lease of [`LEASE`], shorter than the timeout peers need before
//! they may drop it, and the consumer delivers only while the lease holds.
//! So a node never delivers after the others took its slots over (a device
//! would then hold an event newer than one it missed, and `since` would
//! skip the older one).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use contract::membership::{FIELD_CLEANUP_AGE, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, Record, evicted_key, now_ms};
use contract::ring::{Member, Ring};
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use crate::state::Gateway;

/// A Redis call slower than this counts as a failed heartbeat.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Two successful reads further apart than this are no evidence about the
/// time between them (four missed beats: Redis was unreachable, or this
/// process was not running).
pub const EVIDENCE_GAP: Duration = Duration::from_secs(1);
/// A peer whose heartbeat has not advanced for this long is probed with a
/// TCP connect (two and a half beats: one late beat on a loaded machine is
/// common, and a probe costs one connection).
pub const SUSPECT_AFTER: Duration = Duration::from_millis(600);
/// How long a probe waits for connect to answer. Refusal is immediate; a
/// timeout is no evidence either way.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// How long after a successful beat this node may go on delivering. Peers
/// need `HEARTBEAT_TIMEOUT` of silence, counted from a read that came after
/// that beat, before they may drop it; one second less is the margin for
/// the time a delivery takes once begun.
pub const LEASE: Duration = Duration::from_secs(HEARTBEAT_TIMEOUT.as_secs() - 1);

/// The membership as this node sees it, handed to the broker task.
#[derive(Debug, Clone)]
pub struct View {
    pub ring: Arc<Ring>,
    /// The incarnation of every member (this node's own included). A member
    /// whose incarnation changed between two views left (its queue is
    /// taken over) and came back as another.
    pub incarnations: BTreeMap<String, u64>,
    /// An earlier incarnation of this node's own id seen in Redis (the
    /// process before a restart, or this one before it was fenced): its
    /// queue is taken over like a departed peer's.
    pub predecessor: Option<u64>,
}

impl View {
    /// A fixed ring (static members): every incarnation 0.
    pub fn fixed(ring: Ring) -> View {
        let incarnations = ring.members().iter().map(|m| (m.node_id.clone(), 0)).collect();
        View { ring: Arc::new(ring), incarnations, predecessor: None }
    }
}

/// One heartbeat, atomically: refuse if this incarnation was evicted or a
/// newer process with this id wrote the field; otherwise write the record
/// (when `ARGV[4]` is 1) and return both hashes.
const BEAT: &str = r#"
local evicted = redis.call('HGET', KEYS[2], ARGV[1])
if evicted and tonumber(evicted) >= tonumber(ARGV[2]) then return {'evicted'} end
local own = redis.call('HGET', KEYS[1], ARGV[1])
if own then
  local ok, r = pcall(cjson.decode, own)
  if ok and type(r) == 'table' and tonumber(r.incarnation or 0) > tonumber(ARGV[2]) then return {'superseded'} end
end
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return {'ok', redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"#;

/// Records an eviction; the evicted hash only ever grows per id.
const EVICT: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur or tonumber(cur) < tonumber(ARGV[2]) then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"#;

/// A peer in this node's view.
struct Peer {
    url: String,
    /// Where other nodes dial it (`Record::dial_url`).
    dial: String,
    incarnation: u64,
    heartbeat_ms: u64,
    /// When this node last saw the heartbeat change (or started counting).
    advanced: Instant,
}

enum Beat {
    Ok { fields: HashMap<String, String>, evicted: HashMap<String, u64> },
    Evicted,
    Superseded,
}

pub async fn run(gw: Arc<Gateway>) {
    if !gw.config.static_members.is_empty() {
        let ring = Ring::new(gw.config.static_members.clone());
        gw.wanted.send_replace(Some(View::fixed(ring)));
        gw.lease.forever();
        // Every node computes the same fixed ring: nobody to wait for.
        gw.serve();
        gw.membership_ready.store(true, Ordering::Relaxed);
        // Nothing to beat; ending now would look like a failure.
        gw.shutdown.cancelled().await;
        return;
    }
    // Checked at start (`Config::validate`).
    let client = redis::Client::open(gw.config.redis_url.as_str()).expect("REDIS_URL validated");
    let me = gw.config.node_id().to_owned();
    let url = gw.config.advertise_url().to_owned();
    let key = gw.config.membership_key.clone();
    let evicted_key = evicted_key(&key);
    let mut conn: Option<MultiplexedConnection> = None;
    let mut peers: BTreeMap<String, Peer> = BTreeMap::new();
    let mut last_ok: Option<Instant> = None;
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = gw.shutdown.cancelled() => break,
        }
        let started = Instant::now();
        let incarnation = gw.incarnation();
        let joined = gw.joined.load(Ordering::Relaxed);
        let record = Record::alive(&url, now_ms())
            .of_incarnation(incarnation)
            .with_internal_url(gw.config.internal_url().map(str::to_owned));
        let beat = async {
            if conn.is_none() {
                conn = Some(client.get_multiplexed_async_connection().await?);
            }
            let c = conn.as_mut().expect("connected");
            let reply: redis::Value = redis::cmd("EVAL")
                .arg(BEAT)
                .arg(2)
                .arg(&key)
                .arg(&evicted_key)
                .arg(&me)
                .arg(incarnation)
                .arg(serde_json::to_string(&record).expect("record"))
                .arg(if joined { "1" } else { "0" })
                .query_async(c)
                .await?;
            parse_beat(reply)
        };
        let beat = match tokio::time::timeout(REDIS_TIMEOUT, beat).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                fail(&gw, &mut conn, &mut last_ok, &e.to_string());
                continue;
            }
            Err(_) => {
                fail(&gw, &mut conn, &mut last_ok, "timed out");
                continue;
            }
        };
        let (fields, evicted) = match beat {
            Beat::Ok { fields, evicted } => (fields, evicted),
            Beat::Evicted => {
                gw.fence("the other nodes dropped this one from the ring (it was silent)");
                continue;
            }
            Beat::Superseded => {
                gw.fail(format!("another process now runs as node {me} (a newer incarnation wrote its record)"));
                break;
            }
        };
        gw.lease.renew(started + LEASE);
        gw.membership_ready.store(true, Ordering::Relaxed);
        let now = Instant::now();
        // No evidence about the time between two reads this far apart.
        if last_ok.is_none_or(|t| now.duration_since(t) > EVIDENCE_GAP) {
            for p in peers.values_mut() {
                p.advanced = now;
            }
        }
        last_ok = Some(now);

        let wall = now_ms();
        let timeout_ms = HEARTBEAT_TIMEOUT.as_millis() as u64;
        let mut predecessor = None;
        for (id, v) in &fields {
            let Ok(r) = serde_json::from_str::<Record>(v) else { continue };
            if *id == me {
                if r.incarnation < incarnation {
                    predecessor = Some(r.incarnation);
                }
                continue;
            }
            let evicted_up_to = evicted.get(id).copied();
            if r.left || evicted_up_to.is_some_and(|e| r.incarnation <= e) {
                if peers.get(id).is_some_and(|p| p.incarnation <= r.incarnation) {
                    peers.remove(id);
                    tracing::info!(node = id, incarnation = r.incarnation, "member left");
                }
                continue;
            }
            match peers.get_mut(id) {
                Some(p) if p.incarnation == r.incarnation => {
                    if p.heartbeat_ms != r.heartbeat_ms {
                        p.heartbeat_ms = r.heartbeat_ms;
                        p.advanced = now;
                    }
                    p.dial = r.dial_url().to_owned();
                    p.url = r.url;
                }
                // An older incarnation's record cannot overwrite a newer
                // one's (the beat refuses), but may have been read before it.
                Some(p) if p.incarnation > r.incarnation => {}
                // A new member, or a restarted one: admitted while fresh
                // (a field left behind by a dead node is not let back in).
                _ => {
                    if wall.saturating_sub(r.heartbeat_ms) < timeout_ms {
                        if peers.contains_key(id) {
                            tracing::info!(node = id, incarnation = r.incarnation, "member restarted");
                        }
                        let p = Peer {
                            dial: r.dial_url().to_owned(),
                            url: r.url,
                            incarnation: r.incarnation,
                            heartbeat_ms: r.heartbeat_ms,
                            advanced: now,
                        };
                        peers.insert(id.clone(), p);
                    }
                }
            }
        }
        // Dropped by another node: dropped here too.
        peers.retain(|id, p| {
            let keep = evicted.get(id).is_none_or(|&e| p.incarnation > e);
            if !keep {
                tracing::info!(node = id, incarnation = p.incarnation, "member evicted by another node");
            }
            keep
        });

        let mut evict: Vec<(String, u64, &'static str)> = Vec::new();
        let mut suspects = Vec::new();
        for (id, p) in &peers {
            let quiet = now.duration_since(p.advanced);
            if quiet >= HEARTBEAT_TIMEOUT {
                evict.push((id.clone(), p.incarnation, "heartbeat stopped"));
            } else if quiet >= SUSPECT_AFTER {
                suspects.push((id.clone(), p.incarnation, p.dial.clone()));
            }
        }
        let probes = suspects.into_iter().map(|(id, inc, url)| async move { (id, inc, refused(&url).await) });
        for (id, inc, refused) in futures_util::future::join_all(probes).await {
            if refused {
                evict.push((id, inc, "heartbeat late and its address refuses connections"));
            }
        }
        for (id, inc, why) in evict {
            let Some(c) = conn.as_mut() else { break };
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(EVICT).arg(1).arg(&evicted_key).arg(&id).arg(inc);
            match tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async::<()>(c)).await {
                // Dropped only once every node can see it: the others follow
                // the evicted hash, and the node itself will find it there.
                Ok(Ok(())) => {
                    tracing::warn!(node = id, incarnation = inc, reason = why, "dropping member");
                    peers.remove(&id);
                    gw.metrics.members_evicted.increment(1);
                }
                Ok(Err(e)) => tracing::warn!(node = id, error = %e, "could not record eviction"),
                Err(_) => tracing::warn!(node = id, error = "timed out", "could not record eviction"),
            }
        }

        // Any node may clean up (HDEL is idempotent), but only fields that
        // are in no view and that publishers have stopped routing to.
        let cleanup: Vec<&String> = fields
            .iter()
            .filter(|(id, v)| {
                **id != me
                    && !peers.contains_key(*id)
                    && serde_json::from_str::<Record>(v).map_or(true, |r| {
                        wall.saturating_sub(r.effective_heartbeat_ms()) >= FIELD_CLEANUP_AGE.as_millis() as u64
                    })
            })
            .map(|(k, _)| k)
            .collect();
        if !cleanup.is_empty()
            && let Some(c) = conn.as_mut()
        {
            let _: Result<(), _> = redis::cmd("HDEL").arg(&key).arg(&cleanup).query_async(c).await;
        }

        *gw.dial_urls.write() = peers.iter().map(|(id, p)| (id.clone(), p.dial.clone())).collect();
        let mut members: Vec<Member> =
            peers.iter().map(|(id, p)| Member { node_id: id.clone(), url: p.url.clone() }).collect();
        // Before it announces itself, the node is in its own view only.
        members.push(Member { node_id: me.clone(), url: url.clone() });
        members.sort();
        let mut incarnations: BTreeMap<String, u64> = peers.iter().map(|(id, p)| (id.clone(), p.incarnation)).collect();
        incarnations.insert(me.clone(), incarnation);
        let changed = gw.wanted.borrow().as_ref().is_none_or(|v| {
            v.ring.members() != members.as_slice() || v.incarnations != incarnations || v.predecessor != predecessor
        });
        if changed {
            tracing::info!(members = ?incarnations, ?predecessor, "ring membership changed");
            let view = View { ring: Arc::new(Ring::new(members)), incarnations, predecessor };
            gw.wanted.send_replace(Some(view));
        }
    }
    // Leave at once: the others rebalance on their next beat.
    if let Some(c) = conn.as_mut() {
        let tombstone = Record::leaving(&url, now_ms()).of_incarnation(gw.incarnation());
        let tombstone = serde_json::to_string(&tombstone).expect("record");
        let left: Result<(), _> = redis::cmd("HSET").arg(&key).arg(&me).arg(tombstone).query_async(c).await;
        if let Err(e) = left {
            tracing::warn!(error = %e, "could not leave the ring");
        }
    }
}

fn parse_beat(reply: redis::Value) -> redis::RedisResult<Beat> {
    let parts: Vec<redis::Value> = redis::from_redis_value(reply)?;
    let mut parts = parts.into_iter();
    let status: String = redis::from_redis_value(parts.next().unwrap_or(redis::Value::Nil))?;
    match status.as_str() {
        "evicted" => Ok(Beat::Evicted),
        "superseded" => Ok(Beat::Superseded),
        _ => {
            let pairs = |v: Option<redis::Value>| -> redis::RedisResult<Vec<(String, String)>> {
                let flat: Vec<String> = redis::from_redis_value(v.unwrap_or(redis::Value::Nil))?;
                Ok(flat.chunks_exact(2).map(|kv| (kv[0].clone(), kv[1].clone())).collect())
            };
            let fields = pairs(parts.next())?.into_iter().collect();
            let evicted = pairs(parts.next())?.into_iter().filter_map(|(k, v)| Some((k, v.parse().ok()?))).collect();
            Ok(Beat::Ok { fields, evicted })
        }
    }
}

/// Whether a TCP connect to the host and port of `url` is refused: no
/// process listens there.
async fn refused(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("ws://").or_else(|| url.strip_prefix("wss://")) else { return false };
    let hostport = rest.split('/').next().unwrap_or(rest);
    match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(hostport)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

fn fail(gw: &Gateway, conn: &mut Option<MultiplexedConnection>, last_ok: &mut Option<Instant>, why: &str) {
    if gw.membership_ready.swap(false, Ordering::Relaxed) {
        tracing::warn!(error = why, "membership heartbeat failed");
    }
    *conn = None;
    *last_ok = None;
}
