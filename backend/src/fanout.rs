//! Fan-out workers: take a job off the durable queue, page through the
//! author's followers, update their feed caches (one Redis pipeline per
//! page), group them by the gateway node that owns them and publish one
//! event message per group to `feed.events`, with publisher confirms.
//!
//! Memory stays bounded whatever the follower count: followers are read
//! [`FOLLOWER_PAGE`] at a time, a group is flushed once it holds
//! [`MAX_RECIPIENTS_PER_MESSAGE`], and all groups are flushed once
//! [`MAX_BUFFERED_RECIPIENTS`] are waiting.
//!
//! A job is acknowledged only after every message it published was
//! confirmed. A job that fails part way is put back and redone from the
//! start: feed writes are idempotent and devices detect duplicate events
//! by post id, so a retry may duplicate but never loses a recipient.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use contract::event::{self, PostEvent};
use contract::membership;
use contract::ring::Ring;
use contract::slot::{SLOTS, slot_of};
use contract::topology::{self};
use futures_util::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::feed::load_posts;
use crate::jobs::{self, Job, JobKind};
use crate::state::Backend;

/// Followers read from PostgreSQL, and feeds written to Redis, per round
/// trip: large enough to amortize the round trips, small enough that a
/// page is a few tens of KiB.
pub const FOLLOWER_PAGE: usize = 1000;
/// Most recipients in one broker message. A node's share of a 10,000
/// follower post (about 3,400 of 3 nodes) fits in one message; 5,000 ids
/// are about 200 KiB, which the broker and gateways handle easily.
pub const MAX_RECIPIENTS_PER_MESSAGE: usize = 5000;
/// Recipients buffered across all groups before every group is flushed.
/// Bounds a worker's memory (about 1 MiB of ids) without a membership
/// view, when there is one group per slot.
pub const MAX_BUFFERED_RECIPIENTS: usize = 20_000;
/// Pause before a failed job goes back on the queue, so a dead dependency
/// does not turn into a hot retry loop.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// First wait before reconnecting to the broker; doubles up to the max.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs one worker until `shutdown`, reconnecting to the broker as needed.
pub async fn run_worker(backend: Arc<Backend>, index: usize, shutdown: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match consume(&backend, index, &shutdown, &mut backoff).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(worker = index, "fan-out worker lost the broker: {e:#}; retrying in {backoff:?}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One broker connection's life; `Ok` only on shutdown.
async fn consume(
    backend: &Arc<Backend>,
    index: usize,
    shutdown: &CancellationToken,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    let name = format!("backend worker {index}");
    let conn = tokio::select! {
        c = jobs::connect(&backend.config.amqp_url, &name) => c?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    let jobs_ch = conn.create_channel().await?;
    jobs::declare_queue(&jobs_ch, &backend.config.fanout_queue).await?;
    // One job at a time per worker: a job is already thousands of writes.
    jobs_ch.basic_qos(1, BasicQosOptions::default()).await?;
    let events_ch = conn.create_channel().await?;
    events_ch.confirm_select(ConfirmSelectOptions::default()).await?;
    topology::declare_exchanges(&events_ch).await?;
    let mut consumer = jobs_ch
        .basic_consume(
            backend.config.fanout_queue.as_str().into(),
            format!("backend-worker-{index}-{}", std::process::id()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    *backoff = MIN_BACKOFF;
    tracing::info!(worker = index, queue = backend.config.fanout_queue, "fan-out worker consuming");
    loop {
        let delivery = tokio::select! {
            d = consumer.next() => match d {
                Some(d) => d?,
                None => anyhow::bail!("job consumer ended"),
            },
            _ = shutdown.cancelled() => {
                let _ = conn.close(200, "backend shutting down".into()).await;
                return Ok(());
            }
        };
        let job: Job = match serde_json::from_slice(&delivery.data) {
            Ok(j) => j,
            Err(e) => {
                // Requeueing an unreadable job would loop forever.
                tracing::error!("dropping unreadable fan-out job: {e}");
                delivery.reject(BasicRejectOptions { requeue: false }).await?;
                continue;
            }
        };
        let result = tokio::select! {
            r = run_job(backend, &events_ch, &job) => r,
            // Unacknowledged: the broker hands the job to another worker.
            _ = shutdown.cancelled() => {
                let _ = conn.close(200, "backend shutting down".into()).await;
                return Ok(());
            }
        };
        match result {
            Ok(()) => {
                backend.metrics.fanout_jobs.increment(1);
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Err(e) => {
                backend.metrics.fanout_retries.increment(1);
                tracing::warn!(post = job.post_id, "fan-out failed, will retry: {e:#}");
                tokio::time::sleep(RETRY_PAUSE).await;
                delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
                if !events_ch.status().connected() {
                    anyhow::bail!("event channel closed");
                }
            }
        }
    }
}

/// Runs one job to the end: every page of followers, every message
/// confirmed.
pub async fn run_job(backend: &Backend, events: &Channel, job: &Job) -> anyhow::Result<()> {
    match job.kind {
        JobKind::Create => {
            let Some(post) = load_posts(&backend.db, std::slice::from_ref(&job.post_id))
                .await
                .map_err(|e| anyhow::anyhow!("loading post: {e}"))?
                .pop()
            else {
                // Deleted before its fan-out ran: nothing to deliver.
                return Ok(());
            };
            let mut redis = backend.feed.redis.clone();
            let members = membership::fetch(&mut redis, &backend.config.membership_key)
                .await
                .context("reading gateway membership")?;
            let ring = Ring::new(members);
            let ts_ms = event::now_micros() / 1000;
            let ev = PostEvent::new(&post.id, &post.text, &post.author_user_id, ts_ms);
            let mut groups = Groups::new(&ring);
            let mut after = String::new();
            loop {
                let page = followers_page(backend, &job.author_id, &after).await?;
                let Some(last) = page.last() else { break };
                after = last.clone();
                backend.feed.add(&post.id, &page).await.context("writing feeds")?;
                for f in &page {
                    if let Some(full) = groups.push(f) {
                        publish(backend, events, &ev, vec![full]).await?;
                    }
                }
                if groups.buffered >= MAX_BUFFERED_RECIPIENTS {
                    publish(backend, events, &ev, groups.take_all()).await?;
                }
                backend.metrics.fanout_recipients.increment(page.len() as u64);
                if page.len() < FOLLOWER_PAGE {
                    break;
                }
            }
            publish(backend, events, &ev, groups.take_all()).await?;
        }
        JobKind::Delete => {
            let mut after = String::new();
            loop {
                let page = followers_page(backend, &job.author_id, &after).await?;
                let Some(last) = page.last() else { break };
                after = last.clone();
                backend.feed.remove(&job.post_id, &page).await.context("writing feeds")?;
                if page.len() < FOLLOWER_PAGE {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// The next page of an author's followers after `after`, in id order.
async fn followers_page(backend: &Backend, author: &str, after: &str) -> anyhow::Result<Vec<String>> {
    let rows = backend
        .db
        .get()
        .await?
        .query(
            "SELECT follower_id FROM follows WHERE followee_id = $1 AND follower_id > $2 \
             ORDER BY follower_id LIMIT $3",
            &[&author, &after, &(FOLLOWER_PAGE as i64)],
        )
        .await
        .context("reading followers")?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Publishes one message per group, then waits for every confirm.
async fn publish(backend: &Backend, ch: &Channel, ev: &PostEvent, groups: Vec<Vec<String>>) -> anyhow::Result<()> {
    let mut confirms = Vec::with_capacity(groups.len());
    for group in groups.iter().filter(|g| !g.is_empty()) {
        let recipients: Vec<&str> = group.iter().map(String::as_str).collect();
        let body = event::encode(&recipients, ev);
        let confirm = topology::publish_group(ch, &recipients, &body, FieldTable::default()).await?;
        confirms.push(confirm);
    }
    let n = confirms.len();
    for c in futures_util::future::try_join_all(confirms).await? {
        anyhow::ensure!(c.is_ack(), "broker refused an event message");
    }
    backend.metrics.events_published.increment(n as u64);
    Ok(())
}

/// Recipients grouped by owner node (or by slot, with no live members).
struct Groups {
    /// Group index of each slot: the owner's position in the ring, or the
    /// slot itself when the ring is empty.
    group_of_slot: Vec<u16>,
    groups: HashMap<u16, Vec<String>>,
    buffered: usize,
}

impl Groups {
    fn new(ring: &Ring) -> Groups {
        let group_of_slot = (0..SLOTS)
            .map(|s| match ring.owner(s) {
                Some(owner) => ring.members().iter().position(|m| m == owner).expect("owner is a member") as u16,
                None => s,
            })
            .collect();
        Groups { group_of_slot, groups: HashMap::new(), buffered: 0 }
    }

    /// Adds a recipient; returns its group if that group is now full.
    fn push(&mut self, user: &str) -> Option<Vec<String>> {
        let g = self.group_of_slot[usize::from(slot_of(user))];
        let group = self.groups.entry(g).or_default();
        group.push(user.to_owned());
        self.buffered += 1;
        if group.len() >= MAX_RECIPIENTS_PER_MESSAGE {
            self.buffered -= group.len();
            return self.groups.remove(&g);
        }
        None
    }

    fn take_all(&mut self) -> Vec<Vec<String>> {
        self.buffered = 0;
        self.groups.drain().map(|(_, g)| g).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::ring::Member;

    fn users(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user-{i}")).collect()
    }

    #[test]
    fn groups_follow_the_ring_and_route_to_an_owned_slot() {
        let ring = Ring::new(["a", "b", "c"].map(|n| Member { node_id: n.into(), url: format!("ws://{n}") }));
        let mut g = Groups::new(&ring);
        for u in users(3000) {
            assert!(g.push(&u).is_none());
        }
        let groups = g.take_all();
        assert_eq!(groups.len(), 3);
        for group in groups {
            let owner = ring.owner(slot_of(&group[0])).unwrap();
            assert!(group.iter().all(|u| ring.owner(slot_of(u)).unwrap() == owner));
        }
    }

    #[test]
    fn without_members_there_is_one_group_per_slot() {
        let mut g = Groups::new(&Ring::new([]));
        for u in users(20_000) {
            g.push(&u);
        }
        let groups = g.take_all();
        assert_eq!(groups.len(), usize::from(SLOTS));
        for group in groups {
            let s = slot_of(&group[0]);
            assert!(group.iter().all(|u| slot_of(u) == s));
        }
    }

    #[test]
    fn a_full_group_is_handed_out() {
        let ring = Ring::new([Member { node_id: "a".into(), url: "ws://a".into() }]);
        let mut g = Groups::new(&ring);
        let mut full = 0;
        for u in users(MAX_RECIPIENTS_PER_MESSAGE * 2 + 1) {
            if let Some(group) = g.push(&u) {
                assert_eq!(group.len(), MAX_RECIPIENTS_PER_MESSAGE);
                full += 1;
            }
        }
        assert_eq!(full, 2);
        assert_eq!(g.buffered, 1);
    }
}
