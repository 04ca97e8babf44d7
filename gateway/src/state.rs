//! What every part of a node shares: config, keys, sessions, the ring view,
//! metrics, readiness and the shutdown signal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use contract::ring::{Member, Ring};
use contract::token::Tokens;
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::{self, Metrics};
use crate::sessions::Sessions;

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
    /// The ring membership asks for; `None` until membership was read once.
    pub wanted_ring: tokio::sync::watch::Sender<Option<Arc<Ring>>>,
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
    /// Cancelled when the node starts shutting down.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// `?since=` replays (see `recovery`).
    pub recoveries: crate::recovery::Recoveries,
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
            wanted_ring: tokio::sync::watch::channel(None).0,
            broker_ready: AtomicBool::new(false),
            joined: AtomicBool::new(false),
            membership_ready: AtomicBool::new(false),
            stop_consuming: CancellationToken::new(),
            open_sockets: AtomicUsize::new(0),
            pending_sockets: AtomicUsize::new(0),
            per_address: Default::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            recoveries: crate::recovery::Recoveries::new(
                config.max_recoveries,
                config.max_replay.min(config.send_queue),
            ),
            redis: tokio::sync::OnceCell::new(),
            config,
        })
    }

    pub fn ring(&self) -> Arc<Ring> {
        self.ring.read().clone()
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

    pub fn is_ready(&self) -> bool {
        self.broker_ready.load(Ordering::Relaxed)
            && self.membership_ready.load(Ordering::Relaxed)
            && !self.is_draining()
    }

    /// The owner of a user's slot under the current ring, and whether it is
    /// this node. `None` when the ring is empty.
    pub fn owner_of(&self, user: &str) -> Option<(bool, Member)> {
        let ring = self.ring();
        let owner = ring.owner(contract::slot::slot_of(user))?;
        Some((owner.node_id == self.config.node_id(), owner.clone()))
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
