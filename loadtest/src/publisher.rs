//! Publishes events at a target rate straight to `feed.events`, grouped by
//! ring owner as the backend does: one message per (event, owner node),
//! routed by the slot of the group's first recipient; or, against the
//! nginx + Nchan peer, one HTTP publish per event to its recipients'
//! channels. With a feed cache, each event is first written into its
//! recipients' feeds (as the backend does), so devices that reconnect
//! with `?since=` recover what they missed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use anyhow::Context;
use std::time::Duration;

use contract::event;
use contract::feedcache;
use contract::ring::Ring;
use contract::slot::slot_of;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::amqp::{Broker, BrokerStats, Msg};
use crate::audience::Audience;
use crate::client::{AUTHOR, event_id, post_text, run_event};
use crate::pace::Pace;
use crate::series::Series;

/// After the last event is due, what could not be published yet (the
/// broker or Redis is down) is retried this long, then given up and
/// expected nowhere. Longer than a broker restart or a Redis outage of
/// the fault suite, so those lose nothing on the publishing side.
pub const RETRY_AFTER_END: Duration = Duration::from_secs(30);
/// One feed-cache write that takes longer than this failed (and is retried).
const FEED_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Waits between failed feed-cache writes: from the first, doubling to the last.
const FEED_FIRST_BACKOFF: Duration = Duration::from_millis(50);
const FEED_MAX_BACKOFF: Duration = Duration::from_millis(500);

pub struct Plan {
    pub users: Arc<Vec<String>>,
    pub ring: Ring,
    pub rate: f64,
    pub audience: Audience,
    pub duration: Duration,
    /// Tags every event, so devices ignore other runs' events.
    pub run: u64,
    /// Redis URL: write each event into its recipients' feed caches first,
    /// as the backend does, so devices can recover it with `?since=`.
    pub feed_cache: Option<String>,
}

/// Where events go.
#[derive(Debug, Clone)]
pub enum Sink {
    /// RabbitMQ's `feed.events`: one message per (event, owner node), to
    /// any of `urls` (nodes of one cluster).
    Amqp { urls: Vec<String> },
    /// nginx + Nchan: one POST per event to all its recipients' channels,
    /// over at most `connections` keep-alive connections.
    Nchan { url: String, connections: usize },
}

/// What the publisher did.
pub struct Published {
    /// Deliveries expected per event sequence number.
    pub expected: Vec<u32>,
    /// Broker messages (AMQP) or HTTP publishes (Nchan) sent.
    pub messages: u64,
    pub started_us: u64,
    pub elapsed: Duration,
    /// How publishing went through faults (gateway mode).
    pub faults: PublishFaults,
}

/// What the publisher went through: reconnections, re-publishes, retried
/// feed writes, and what it could not publish at all (expected nowhere).
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct PublishFaults {
    #[serde(flatten)]
    pub broker: BrokerStats,
    /// Feed-cache writes that failed and were tried again.
    pub feed_retries: u64,
    /// Events not published at all: their feed write never succeeded.
    pub events_given_up: u64,
    /// Deliveries no longer expected because their message or event was given up.
    pub deliveries_given_up: u64,
}

/// Feed cache entries outlive any run, then go.
const FEED_TTL_S: u64 = 900;
/// Nchan publish requests in flight at once; beyond this the publisher waits.
const NCHAN_WINDOW: u32 = 256;

/// Publishes for `plan.duration`. `connected[u]` is the number of devices
/// of user `u` connected now: what an event to `u` should reach. Also
/// returns the messages the broker refused or the publish requests that
/// failed.
pub async fn run(
    sink: &Sink,
    plan: &Plan,
    connected: &[AtomicU32],
    series: &parking_lot::Mutex<Series>,
) -> anyhow::Result<(Published, u64)> {
    // What cannot be published by then is given up.
    let deadline = Instant::now() + plan.duration + RETRY_AFTER_END;
    let mut out = match sink {
        Sink::Amqp { urls } => Out::amqp(urls, plan, deadline).await?,
        Sink::Nchan { url, connections } => Out::Nchan {
            publisher: Arc::new(crate::nchan::Publisher::new(url, *connections)),
            window: Arc::new(Semaphore::new(NCHAN_WINDOW as usize)),
            errors: Arc::new(AtomicU64::new(0)),
        },
    };
    let mut cache = match &plan.feed_cache {
        Some(url) => Some(FeedCache::connect(url).await?),
        None => None,
    };

    let mut expected = Vec::new();
    let mut messages = 0u64;
    let mut faults = PublishFaults::default();
    let mut pace = Pace::new(plan.rate, plan.duration);
    let started_us = event::now_micros();
    let mut picked: Vec<usize> = Vec::new();
    while let Some(due) = pace.due().await {
        for seq in due {
            plan.audience.recipients(seq, &mut picked);
            let published_us = event::now_micros();
            if let Some(cache) = &mut cache
                && !cache.write(plan, &picked, seq, published_us, deadline).await
            {
                // Not in the feeds, so not published either: expected nowhere.
                expected.push(0);
                faults.events_given_up += 1;
                continue;
            }
            // Counted after the feed write: a device that reconnects
            // meanwhile is connected again by now, and recovers it.
            let mut deliveries = 0;
            messages += out.publish(plan, &picked, seq, published_us, connected, &mut deliveries).await?;
            expected.push(deliveries);
            // Labelled by the second it ends in, like the workers' ticks.
            series.lock().add_published(published_us.div_ceil(1_000_000), 1);
        }
        out.tend().await;
    }
    let elapsed = pace.elapsed();
    let (errors, broker, given_up) = out.finish().await?;
    for m in given_up {
        expected[m.seq as usize] -= m.deliveries;
        faults.deliveries_given_up += u64::from(m.deliveries);
    }
    faults.broker = broker;
    faults.feed_retries = cache.map_or(0, |c| c.retries);
    if errors > 0 {
        tracing::warn!(errors, "some publishes failed");
    }
    Ok((Published { expected, messages, started_us, elapsed, faults }, errors))
}

/// The feed cache (Redis), written before each event is published, with
/// retries: a Redis restart delays events, it does not end the run.
struct FeedCache {
    client: redis::Client,
    conn: Option<redis::aio::MultiplexedConnection>,
    retries: u64,
}

impl FeedCache {
    async fn connect(url: &str) -> anyhow::Result<FeedCache> {
        let client = redis::Client::open(url).with_context(|| format!("feed cache: {url:?} is not a Redis URL"))?;
        let conn = tokio::time::timeout(FEED_WRITE_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| anyhow::anyhow!("feed cache: Redis at {url} did not answer"))?
            .with_context(|| format!("feed cache: Redis at {url}"))?;
        Ok(FeedCache { client, conn: Some(conn), retries: 0 })
    }

    /// Puts event `seq` into its recipients' feeds, retrying until it is
    /// written (true) or `deadline` passes (false).
    async fn write(
        &mut self,
        plan: &Plan,
        recipients: &[usize],
        seq: u32,
        published_us: u64,
        deadline: Instant,
    ) -> bool {
        let mut backoff = FEED_FIRST_BACKOFF;
        loop {
            let attempt = async {
                if self.conn.is_none() {
                    self.conn = Some(self.client.get_multiplexed_async_connection().await?);
                }
                let conn = self.conn.as_mut().expect("just connected");
                write_feeds(conn, plan, recipients, seq, published_us).await
            };
            match tokio::time::timeout(FEED_WRITE_TIMEOUT, attempt).await {
                Ok(Ok(())) => return true,
                Ok(Err(e)) => tracing::warn!("feed cache write failed, retrying: {e:#}"),
                Err(_) => tracing::warn!("feed cache write took over {FEED_WRITE_TIMEOUT:?}, retrying"),
            }
            self.conn = None;
            self.retries += 1;
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(FEED_MAX_BACKOFF);
        }
    }
}

/// Puts event `seq` into its recipients' feeds (layout of
/// `contract::feedcache`), in one pipeline, before it is published.
async fn write_feeds(
    conn: &mut redis::aio::MultiplexedConnection,
    plan: &Plan,
    recipients: &[usize],
    seq: u32,
    published_us: u64,
) -> anyhow::Result<()> {
    let id = event_id(plan.run, seq);
    let post = feedcache::CachedPost {
        id: id.clone(),
        text: post_text(plan.run, seq, published_us),
        author_user_id: AUTHOR.into(),
    };
    let mut pipe = redis::pipe();
    pipe.cmd("SET").arg(feedcache::post_key(&id)).arg(serde_json::to_string(&post)?).arg("EX").arg(FEED_TTL_S).ignore();
    for &u in recipients {
        let key = feedcache::feed_key(&plan.users[u]);
        pipe.zadd(&key, &id, 0).ignore();
        pipe.expire(&key, FEED_TTL_S as i64).ignore();
    }
    pipe.query_async::<()>(conn).await.context("feed cache write")
}

#[allow(clippy::large_enum_variant)] // one value per run
enum Out {
    Amqp {
        broker: Broker,
        /// Ring member index of each user's owner.
        owner_of_user: Vec<usize>,
    },
    Nchan {
        publisher: Arc<crate::nchan::Publisher>,
        window: Arc<Semaphore>,
        errors: Arc<AtomicU64>,
    },
}

impl Out {
    async fn amqp(urls: &[String], plan: &Plan, deadline: Instant) -> anyhow::Result<Out> {
        let broker = Broker::connect(urls.to_vec(), deadline).await?;
        let owner_of_user = plan
            .users
            .iter()
            .map(|u| {
                let owner = plan.ring.owner(slot_of(u)).expect("ring has members");
                plan.ring.members().iter().position(|m| m == owner).expect("owner is a member")
            })
            .collect();
        Ok(Out::Amqp { broker, owner_of_user })
    }

    /// Publishes event `seq` to `recipients` (user indexes); adds the
    /// deliveries it should make (their connected devices, now) to
    /// `deliveries`; returns the messages or requests it took.
    async fn publish(
        &mut self,
        plan: &Plan,
        recipients: &[usize],
        seq: u32,
        published_us: u64,
        connected: &[AtomicU32],
        deliveries: &mut u32,
    ) -> anyhow::Result<u64> {
        let ev = run_event(plan.run, seq, published_us);
        let devices = |u: usize| connected[u].load(Ordering::Relaxed);
        match self {
            Out::Amqp { broker, owner_of_user } => {
                let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
                for &u in recipients {
                    groups.entry(owner_of_user[u]).or_default().push(u);
                }
                for group in groups.values() {
                    let names: Vec<&str> = group.iter().map(|&u| plan.users[u].as_str()).collect();
                    let msg = Msg {
                        seq,
                        deliveries: group.iter().map(|&u| devices(u)).sum(),
                        first: names[0].to_owned(),
                        body: event::encode(&names, &ev),
                        published_us,
                    };
                    *deliveries += msg.deliveries;
                    broker.publish(msg).await;
                }
                Ok(groups.len() as u64)
            }
            Out::Nchan { publisher, window, errors } => {
                *deliveries += recipients.iter().map(|&u| devices(u)).sum::<u32>();
                let permit = window.clone().acquire_owned().await?;
                let body = serde_json::to_vec(&ev).expect("events serialize");
                let users: Vec<String> = recipients.iter().map(|&u| plan.users[u].clone()).collect();
                let (publisher, errors) = (publisher.clone(), errors.clone());
                tokio::spawn(async move {
                    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
                    if let Err(e) = publisher.publish(&refs, &body).await {
                        tracing::warn!("Nchan publish failed: {e:#}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(permit);
                });
                Ok(recipients.len().div_ceil(crate::nchan::MAX_CHANNELS_PER_REQUEST) as u64)
            }
        }
    }

    /// Between ticks: re-publishes what came back unconfirmed.
    async fn tend(&mut self) {
        if let Out::Amqp { broker, .. } = self {
            broker.republish_failed().await;
        }
    }

    /// Waits for what is in flight; returns the failures (Nchan), the
    /// broker's figures and the messages given up.
    async fn finish(self) -> anyhow::Result<(u64, BrokerStats, Vec<Msg>)> {
        match self {
            Out::Amqp { mut broker, .. } => {
                let stats = broker.finish().await;
                Ok((stats.given_up, stats, broker.take_given_up()))
            }
            Out::Nchan { window, errors, .. } => {
                let _all = window.acquire_many(NCHAN_WINDOW).await?;
                Ok((errors.load(Ordering::Relaxed), BrokerStats::default(), Vec::new()))
            }
        }
    }
}
