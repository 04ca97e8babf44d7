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

use contract::event::{self, HEADER_PUBLISHED_AT};
use contract::feedcache;
use contract::ring::Ring;
use contract::slot::slot_of;
use contract::topology::{self};
use lapin::options::ConfirmSelectOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use tokio::sync::Semaphore;

use crate::audience::Audience;
use crate::client::{AUTHOR, event_id, post_text, run_event};
use crate::pace::Pace;
use crate::series::Series;

/// Publisher confirms awaited concurrently; beyond this the publisher
/// waits, so a saturated broker slows the rate rather than eating memory.
const CONFIRM_WINDOW: usize = 4096;

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
    /// RabbitMQ's `feed.events`: one message per (event, owner node).
    Amqp { url: String },
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
    let mut out = match sink {
        Sink::Amqp { url } => Out::amqp(url, plan).await?,
        Sink::Nchan { url, connections } => Out::Nchan {
            publisher: Arc::new(crate::nchan::Publisher::new(url, *connections)),
            window: Arc::new(Semaphore::new(NCHAN_WINDOW as usize)),
            errors: Arc::new(AtomicU64::new(0)),
        },
    };
    let mut cache = match &plan.feed_cache {
        Some(url) => Some(
            redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await
                .with_context(|| format!("feed cache: Redis at {url}"))?,
        ),
        None => None,
    };

    let mut expected = Vec::new();
    let mut messages = 0u64;
    let mut pace = Pace::new(plan.rate, plan.duration);
    let started_us = event::now_micros();
    let mut picked: Vec<usize> = Vec::new();
    while let Some(due) = pace.due().await {
        for seq in due {
            plan.audience.recipients(seq, &mut picked);
            let deliveries: u32 = picked.iter().map(|&u| connected[u].load(Ordering::Relaxed)).sum();
            expected.push(deliveries);
            let published_us = event::now_micros();
            let ev = run_event(plan.run, seq, published_us);
            if let Some(conn) = &mut cache {
                write_feeds(conn, plan, &picked, seq, published_us).await?;
            }
            messages += out.publish(plan, &picked, &ev, published_us).await?;
            // Labelled by the second it ends in, like the workers' ticks.
            series.lock().add_published(published_us.div_ceil(1_000_000), 1);
        }
    }
    let elapsed = pace.elapsed();
    let errors = out.finish().await?;
    if errors > 0 {
        tracing::warn!(errors, "some publishes failed");
    }
    Ok((Published { expected, messages, started_us, elapsed }, errors))
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
        conn: Connection,
        ch: lapin::Channel,
        confirms: tokio::sync::mpsc::Sender<lapin::PublisherConfirm>,
        confirmer: tokio::task::JoinHandle<u64>,
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
    async fn amqp(url: &str, plan: &Plan) -> anyhow::Result<Out> {
        let conn = Connection::connect(url, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        topology::declare_exchanges(&ch).await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        // Confirms are awaited off the publishing loop, in a bounded window.
        let (confirms, mut rx) = tokio::sync::mpsc::channel::<lapin::PublisherConfirm>(CONFIRM_WINDOW);
        let confirmer = tokio::spawn(async move {
            let mut nacked = 0u64;
            while let Some(c) = rx.recv().await {
                match c.await {
                    Ok(conf) if conf.is_ack() => {}
                    _ => nacked += 1,
                }
            }
            nacked
        });
        let owner_of_user = plan
            .users
            .iter()
            .map(|u| {
                let owner = plan.ring.owner(slot_of(u)).expect("ring has members");
                plan.ring.members().iter().position(|m| m == owner).expect("owner is a member")
            })
            .collect();
        Ok(Out::Amqp { conn, ch, confirms, confirmer, owner_of_user })
    }

    /// Publishes one event to `recipients` (user indexes); returns the
    /// messages or requests it took.
    async fn publish(
        &mut self,
        plan: &Plan,
        recipients: &[usize],
        ev: &event::PostEvent,
        published_us: u64,
    ) -> anyhow::Result<u64> {
        match self {
            Out::Amqp { ch, confirms, owner_of_user, .. } => {
                let mut groups: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
                for &u in recipients {
                    groups.entry(owner_of_user[u]).or_default().push(&plan.users[u]);
                }
                for recipients in groups.values() {
                    let body = event::encode(recipients, ev);
                    let mut headers = FieldTable::default();
                    headers.insert(HEADER_PUBLISHED_AT.into(), AMQPValue::LongLongInt(published_us as i64));
                    let confirm = topology::publish_group(ch, recipients, &body, headers).await?;
                    confirms.send(confirm).await.ok();
                }
                Ok(groups.len() as u64)
            }
            Out::Nchan { publisher, window, errors } => {
                let permit = window.clone().acquire_owned().await?;
                let body = serde_json::to_vec(ev).expect("events serialize");
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

    /// Waits for what is in flight; returns the failures.
    async fn finish(self) -> anyhow::Result<u64> {
        match self {
            Out::Amqp { conn, ch, confirms, confirmer, .. } => {
                drop(confirms);
                let nacked = confirmer.await?;
                let _ = ch.close(200, "done".into()).await;
                let _ = conn.close(200, "done".into()).await;
                Ok(nacked)
            }
            Out::Nchan { window, errors, .. } => {
                let _all = window.acquire_many(NCHAN_WINDOW).await?;
                Ok(errors.load(Ordering::Relaxed))
            }
        }
    }
}
