//! What every part of a node shares: config, keys, sessions, the ring view,
//! metrics, readiness and the shutdown signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use contract::ring::{Member, Ring};
use contract::token::Tokens;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::membership::View;
use crate::metrics::{self, Metrics};
use crate::outbox::Close;
use crate::sessions::Sessions;

/// Close code for devices of a node that shuts down or was fenced: they
/// reconnect (with `since`) and land on the current owners.
pub const CLOSE_GOING_AWAY: crate::close::CloseCode = crate::close::CloseCode::GoingAway;

pub struct Gateway {
    pub config: Config,
    pub tokens: Tokens,
    pub sessions: Sessions,
    pub metrics: Metrics,
    pub prometheus: PrometheusHandle,
    /// The ring this node acts on: bindings match it. Only the broker task
    /// replaces it, after binding the new slots (make before break).
    /// Readers clone the `Arc` and let go of the lock at once.
    pub ring: RwLock<Arc<Ring>>,
    /// `ring` without this node: the owners a node that does not serve yet
    /// hands its users over to (see `handover`).
    handover: RwLock<Arc<Ring>>,
    /// Set once every peer routes this node's slots to it (`handover`);
    /// until then it serves no device. Cleared when the node is fenced.
    pub serving: AtomicBool,
    /// Set when the node is fenced, cleared once it serves again (for
    /// `/readyz`'s reason).
    pub rejoining: AtomicBool,
    /// The view membership asks for; `None` until membership was read once.
    pub wanted: tokio::sync::watch::Sender<Option<View>>,
    /// This node's current incarnation (see `membership`); replaced when
    /// the node is fenced.
    incarnation: tokio::sync::watch::Sender<u64>,
    /// How long this node may go on delivering (see `membership::LEASE`).
    pub lease: Lease,
    /// Cancelled when a part of the node failed for good: it stops, and
    /// the process exits non-zero so that a supervisor restarts it.
    pub failed: CancellationToken,
    failure: parking_lot::Mutex<Option<String>>,
    /// True while the broker consumer is up (for `/readyz`).
    pub broker_ready: AtomicBool,
    /// Set once the broker has bound this node's slots: from then on the
    /// node announces itself in the membership.
    pub joined: AtomicBool,
    /// True while membership heartbeats succeed (for `/readyz`).
    pub membership_ready: AtomicBool,
    /// Cancelled after the node has left the ring and others took over its
    /// slots: the broker consumer stops and the queue is deleted.
    pub stop_consuming: CancellationToken,
    /// Sockets open now (HTTP and WebSocket), against `max_connections`.
    pub open_sockets: AtomicUsize,
    /// Sockets that have not upgraded yet, against `max_unauthenticated`.
    pub pending_sockets: AtomicUsize,
    /// Sockets per source address, against `max_connections_per_ip`.
    pub per_address: crate::admission::PerAddress,
    /// The address to dial for each peer (its internal URL, else its
    /// advertised one), as membership last read it: the proxy dials this,
    /// never a client-facing wss:// URL.
    pub dial_urls: RwLock<std::collections::HashMap<String, String>>,
    /// Cancelled when the node starts shutting down.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// `?since=` replays (see `recovery`).
    pub recoveries: crate::recovery::Recoveries,
    /// Detoured events for users with no device here, added to replays.
    pub late: crate::late::Late,
    /// Redis for recovery reads, connected on first use (reconnects itself).
    redis: tokio::sync::OnceCell<redis::aio::ConnectionManager>,
}

impl Gateway {
    pub fn new(config: Config) -> Arc<Gateway> {
        // The recorder must exist before handles are taken, or they are no-ops.
        let prometheus = metrics::install();
        let metrics = Metrics::new();
        let me = Member { node_id: config.node_id().to_owned(), url: config.advertise_url().to_owned() };
        let ring = Ring::new([me]);
        metrics.ring_members.set(ring.members().len() as f64);
        metrics.owned_slots.set(ring.slots_of(config.node_id()).len() as f64);
        Arc::new(Gateway {
            tokens: Tokens::new(config.jwt_secret.as_bytes()).with_max_lifetime(config.max_token_lifetime),
            sessions: Sessions::new(config.max_devices_per_user, config.send_queue, metrics.clone()),
            prometheus,
            metrics,
            ring: RwLock::new(Arc::new(ring)),
            handover: RwLock::new(Arc::new(Ring::new(Vec::<Member>::new()))),
            serving: AtomicBool::new(false),
            rejoining: AtomicBool::new(false),
            wanted: tokio::sync::watch::channel(None).0,
            incarnation: tokio::sync::watch::channel(contract::event::now_micros()).0,
            lease: Lease::new(),
            failed: CancellationToken::new(),
            failure: parking_lot::Mutex::new(None),
            broker_ready: AtomicBool::new(false),
            joined: AtomicBool::new(false),
            membership_ready: AtomicBool::new(false),
            stop_consuming: CancellationToken::new(),
            open_sockets: AtomicUsize::new(0),
            pending_sockets: AtomicUsize::new(0),
            per_address: Default::default(),
            dial_urls: Default::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            recoveries: crate::recovery::Recoveries::new(
                config.max_recoveries,
                config.max_replay.min(config.send_queue),
            ),
            late: Default::default(),
            redis: tokio::sync::OnceCell::new(),
            config,
        })
    }

    pub fn ring(&self) -> Arc<Ring> {
        self.ring.read().clone()
    }

    /// Makes `ring` the one this node acts on (after binding its slots).
    pub fn set_ring(&self, ring: Arc<Ring>) {
        *self.handover.write() = crate::handover::without(&ring, self.config.node_id());
        *self.ring.write() = ring;
    }

    /// Every peer routes this node's slots to it: it serves its users.
    pub fn serve(&self) {
        self.serving.store(true, Ordering::Release);
        self.rejoining.store(false, Ordering::Relaxed);
    }

    pub fn incarnation(&self) -> u64 {
        *self.incarnation.borrow()
    }

    /// Watches this node's incarnation.
    pub fn incarnations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.incarnation.subscribe()
    }

    /// The node can no longer vouch for what its devices got: the others
    /// dropped it from the ring (it was silent: hung, cut off, overloaded)
    /// or its queue was lost. It stops delivering, leaves its own view of
    /// the ring (so reconnecting devices are proxied to the current
    /// owners), closes every device with 1001 so that it recovers with
    /// `since`, and becomes a new incarnation, which joins again like a new
    /// node (bind, then announce). Its old queue is taken over as a
    /// predecessor's.
    pub fn fence(&self, why: &str) {
        self.lease.expire();
        self.rejoining.store(true, Ordering::Relaxed);
        self.serving.store(false, Ordering::Release);
        self.joined.store(false, Ordering::Relaxed);
        self.broker_ready.store(false, Ordering::Relaxed);
        let me = self.config.node_id();
        let ring = self.ring();
        let others: Vec<Member> = ring.members().iter().filter(|m| m.node_id != me).cloned().collect();
        if !others.is_empty() {
            self.set_ring(Arc::new(Ring::new(others)));
        }
        let closed = self.sessions.close_where(
            |_| true,
            Close::Frame { code: CLOSE_GOING_AWAY, reason: "node rejoining the ring, reconnect".into() },
        );
        let old = self.incarnation();
        let new = contract::event::now_micros().max(old + 1);
        self.incarnation.send_replace(new);
        self.metrics.fenced.increment(1);
        self.metrics.fenced_closes.increment(closed as u64);
        tracing::warn!(old, new, closed, reason = %why, "fenced: devices closed, rejoining as a new incarnation");
    }

    /// A part of the node failed for good: the node stops, and the process
    /// exits non-zero.
    pub fn fail(&self, why: String) {
        tracing::error!(reason = %why, "the node failed");
        self.failure.lock().get_or_insert(why);
        self.failed.cancel();
    }

    /// Why the node failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().clone()
    }

    /// A Redis connection for recovery reads.
    pub async fn redis(&self) -> redis::RedisResult<redis::aio::ConnectionManager> {
        let conn = self
            .redis
            .get_or_try_init(|| async {
                let client = redis::Client::open(self.config.redis_url.as_str())?;
                // The response timeout matches the recovery read's, so a
                // slow Redis is reported as a timeout, not a 500 ms error.
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(crate::recovery::READ_TIMEOUT))
                    .set_connection_timeout(Some(crate::recovery::READ_TIMEOUT));
                redis::aio::ConnectionManager::new_with_config(client, config).await
            })
            .await?;
        Ok(conn.clone())
    }

    pub fn is_draining(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Whether the node serves its users now (`/readyz`): `Err` says why
    /// not, first reason first.
    pub fn readiness(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("shutting down".into());
        }
        if let Some(why) = self.failure() {
            return Err(format!("failed: {why}"));
        }
        if !self.membership_ready.load(Ordering::Relaxed) {
            return Err("ring membership not up (Redis heartbeats failing)".into());
        }
        if !self.broker_ready.load(Ordering::Relaxed) {
            return Err("broker consumer not up".into());
        }
        if !self.serving.load(Ordering::Acquire) {
            return Err(if self.rejoining.load(Ordering::Relaxed) {
                "rejoining the ring (fenced): waiting for every peer to route this node's slots to it".into()
            } else {
                "joining the ring: waiting for every peer to route this node's slots to it".into()
            });
        }
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// The owner of a user's slot under the current ring, and whether it is
    /// this node. A node that does not serve yet (`handover`) names the
    /// owner the others still route the user to. `None` when nobody can
    /// serve the user now (the ring is empty, or this node is its only
    /// member and does not serve yet): the client retries.
    pub fn owner_of(&self, user: &str) -> Option<(bool, Member)> {
        let slot = contract::slot::slot_of(user);
        let ring = self.ring();
        let owner = ring.owner(slot)?;
        if owner.node_id != self.config.node_id() {
            return Some((false, owner.clone()));
        }
        if self.serving.load(Ordering::Acquire) {
            return Some((true, owner.clone()));
        }
        let handover = self.handover.read().clone();
        handover.owner(slot).map(|m| (false, m.clone()))
    }
}

/// Counts one open socket while alive; clones share the one count, so an
/// upgraded WebSocket keeps its socket counted after hyper lets go of it.
/// Holds the socket's place in its address's count too.
pub struct SocketGuard(Arc<Gateway>, #[allow(dead_code)] Option<crate::admission::AddressGuard>);

impl SocketGuard {
    /// Counts a socket, or refuses it when the node is at capacity.
    pub fn try_new(gw: &Arc<Gateway>, addr: Option<crate::admission::AddressGuard>) -> Option<Arc<SocketGuard>> {
        let max = gw.config.max_connections;
        gw.open_sockets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Arc::new(SocketGuard(gw.clone(), addr)))
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.open_sockets.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Until when this node may deliver, renewed by each successful heartbeat
/// (see `membership::LEASE`). Monotonic time, as micros since `base`.
pub struct Lease {
    base: std::time::Instant,
    until_us: AtomicU64,
}

impl Lease {
    fn new() -> Lease {
        Lease { base: std::time::Instant::now(), until_us: AtomicU64::new(0) }
    }

    pub fn renew(&self, until: tokio::time::Instant) {
        let us = until.into_std().saturating_duration_since(self.base).as_micros() as u64;
        self.until_us.fetch_max(us, Ordering::Relaxed);
    }

    /// A fixed ring has nobody to take over: the lease never ends.
    pub fn forever(&self) {
        self.until_us.store(u64::MAX, Ordering::Relaxed);
    }

    pub fn expire(&self) {
        if self.until_us.load(Ordering::Relaxed) != u64::MAX {
            self.until_us.store(0, Ordering::Relaxed);
        }
    }

    pub fn holds(&self) -> bool {
        (self.base.elapsed().as_micros() as u64) < self.until_us.load(Ordering::Relaxed)
    }
}
