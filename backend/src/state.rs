//! What the handlers and the workers share.

use std::sync::Arc;

use anyhow::Context;
use contract::token::Tokens;
use deadpool_postgres::Pool;
use tokio::sync::Notify;

use crate::broker::Nodes;
use crate::config::Config;
use crate::db;
use crate::fanout::RingView;
use crate::feed::FeedCache;
use crate::metrics::Metrics;
use crate::password::Passwords;
use crate::throttle::LoginThrottle;

pub struct Backend {
    pub config: Config,
    pub tokens: Tokens,
    /// PostgreSQL, the system of record, and the outbox of fan-out jobs.
    pub db: Pool,
    /// Redis: feeds, post bodies, and the gateway membership.
    pub feed: FeedCache,
    /// The RabbitMQ nodes the workers publish events to. The API itself
    /// never needs the broker: a post is accepted once it is committed.
    pub brokers: Nodes,
    /// The gateway membership the fan-out last read.
    pub ring_view: RingView,
    /// Wakes idle fan-out workers when a job is committed (see
    /// [`crate::outbox::listen`]).
    pub outbox_wake: Arc<Notify>,
    pub metrics: Metrics,
    pub passwords: Passwords,
    /// Failed logins per account and per address.
    pub logins: LoginThrottle,
}

impl Backend {
    /// Connects PostgreSQL (creating and migrating the database) and Redis.
    /// The broker is dialled by the workers when they have events to
    /// publish, so a broker outage delays devices, not the API.
    pub async fn connect(config: Config) -> anyhow::Result<Arc<Backend>> {
        let db = db::connect(&config.database_url, config.db_pool_size).await?;
        let client = redis::Client::open(config.redis_url.as_str()).context("REDIS_URL")?;
        let redis = redis::aio::ConnectionManager::new(client).await.context("connecting to Redis")?;
        let argon2_params = argon2::Params::new(config.argon2_memory_kib, config.argon2_iterations, 1, None)
            .map_err(|e| anyhow::anyhow!("argon2 params: {e}"))?;
        Ok(Arc::new(Backend {
            tokens: Tokens::new(config.jwt_secret().as_bytes()),
            brokers: Nodes::new(&config.amqp_url),
            ring_view: RingView::default(),
            outbox_wake: Arc::new(Notify::new()),
            feed: FeedCache { redis },
            metrics: Metrics::new(),
            passwords: Passwords::new(argon2_params),
            logins: LoginThrottle::new(config.login_throttle_per_address),
            db,
            config,
        }))
    }
}
