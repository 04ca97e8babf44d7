//! Fan-out workers: claim a job from the outbox (see [`crate::outbox`]),
//! page through the author's followers, update their feed caches (one
//! Redis pipeline per page), group them by the gateway node that owns them
//! and publish one event message per group to `feed.events`, persistent
//! and with publisher confirms; then delete the job, in the transaction
//! that claimed it.
//!
//! Memory stays bounded whatever the follower count: followers are read
//! [`FOLLOWER_PAGE`] at a time, a group is flushed once it holds
//! [`MAX_RECIPIENTS_PER_MESSAGE`], and all groups are flushed once
//! [`MAX_BUFFERED_RECIPIENTS`] are waiting.
//!
//! A job that fails part way (or whose worker dies) is redone from the
//! start: feed writes are idempotent (a sorted set) and devices detect
//! duplicate events by their id (the post id), so a retry may duplicate an
//! event but never loses a recipient.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use contract::event::{self, PostEvent};
use contract::membership;
use contract::ring::Ring;
use contract::slot::{SLOTS, slot_of};
use contract::topology;
use deadpool_postgres::GenericClient;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Link};
use crate::feed::Post;
use crate::outbox::{self, Job, JobKind};
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
/// A job that runs longer than this fails (and is retried): a stuck
/// dependency must not hold a job, its row lock and a connection forever.
/// A 10,000-follower fan-out takes about a second.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// An idle worker looks for due jobs this often even without a
/// notification: notifications are lost while the listener reconnects,
/// and a failed job's retry time passes without one.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Pause after the outbox itself could not be read (PostgreSQL down).
const DB_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Runs one worker until `shutdown`. A job in progress at shutdown is
/// rolled back: its row stays for the next worker.
pub async fn run_worker(backend: Arc<Backend>, index: usize, shutdown: CancellationToken) {
    let mut link = Link::new(format!("backend worker {index} ({})", std::process::id()));
    tracing::info!(worker = index, queue = backend.config.fanout_queue, "fan-out worker running");
    loop {
        let round = tokio::select! {
            r = work_one(&backend, &mut link) => r,
            _ = shutdown.cancelled() => break,
        };
        let pause = match round {
            Ok(true) => continue, // there may be more: look again at once
            Ok(false) => POLL_INTERVAL,
            Err(e) => {
                tracing::warn!(worker = index, "cannot read the outbox: {e:#}");
                DB_ERROR_PAUSE
            }
        };
        tokio::select! {
            _ = backend.outbox_wake.notified() => {}
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    link.close().await;
}

/// Claims and runs one due job. `Ok(false)`: there was none.
async fn work_one(backend: &Backend, link: &mut Link) -> anyhow::Result<bool> {
    let queue = backend.config.fanout_queue.as_str();
    let mut client = backend.db.get().await.context("database pool")?;
    let mut tx = client.transaction().await.context("beginning the claim")?;
    let Some(job) = outbox::claim(&tx, queue).await.context("claiming a job")? else {
        tx.commit().await?;
        return Ok(false);
    };
    // A savepoint, so that a failed statement of the job leaves the claim
    // usable for recording the failure.
    let sp = tx.savepoint("job").await?;
    let result = match tokio::time::timeout(JOB_TIMEOUT, run_job(backend, &sp, link, &job)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("timed out after {JOB_TIMEOUT:?}")),
    };
    match result {
        Ok(()) => {
            sp.commit().await?;
            let lag = outbox::done(&tx, &job).await?;
            tx.commit().await.context("committing a finished job")?;
            backend.metrics.fanout_jobs.increment(1);
            backend.metrics.fanout_lag.record(lag);
        }
        Err(e) => {
            sp.rollback().await?;
            let why = format!("{e:#}");
            let delay = outbox::failed(&tx, &job, &why).await?;
            tx.commit().await.context("recording a failed job")?;
            backend.metrics.fanout_retries.increment(1);
            tracing::warn!(
                job = job.id,
                post = job.post_id,
                attempts = job.attempts + 1,
                "fan-out failed, retrying in {delay:?}: {why}"
            );
            // Whatever broke, the next job starts on a fresh broker link.
            link.reset(&backend.brokers);
        }
    }
    Ok(true)
}

/// Runs one job to the end: every page of followers, every message
/// confirmed. `db` is the claiming transaction's connection.
pub async fn run_job(backend: &Backend, db: &impl GenericClient, link: &mut Link, job: &Job) -> anyhow::Result<()> {
    match job.kind {
        JobKind::Create => {
            let Some(post) = load_post(db, &job.post_id).await? else {
                // Deleted before its fan-out ran: its delete job follows.
                return Ok(());
            };
            backend.feed.put_post(&post).await.context("caching the post")?;
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
                let page = followers_page(db, &job.author_id, &after).await?;
                let Some(last) = page.last() else { break };
                after = last.clone();
                backend.feed.add(&post.id, &page).await.context("writing feeds")?;
                for f in &page {
                    if let Some(full) = groups.push(f) {
                        publish(backend, link, &ev, vec![full]).await?;
                    }
                }
                if groups.buffered >= MAX_BUFFERED_RECIPIENTS {
                    publish(backend, link, &ev, groups.take_all()).await?;
                }
                backend.metrics.fanout_recipients.increment(page.len() as u64);
                if page.len() < FOLLOWER_PAGE {
                    break;
                }
            }
            publish(backend, link, &ev, groups.take_all()).await?;
        }
        JobKind::Update => {
            // The body as it is now: a later update has its own job.
            if let Some(post) = load_post(db, &job.post_id).await? {
                backend.feed.put_post(&post).await.context("caching the post")?;
            }
        }
        JobKind::Delete => {
            backend.feed.forget_post(&job.post_id).await.context("forgetting the post")?;
            let mut after = String::new();
            loop {
                let page = followers_page(db, &job.author_id, &after).await?;
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

async fn load_post(db: &impl GenericClient, id: &str) -> anyhow::Result<Option<Post>> {
    let row = db
        .query_opt("SELECT id, text, author_id FROM posts WHERE id = $1", &[&id])
        .await
        .context("loading the post")?;
    Ok(row.map(|r| Post { id: r.get(0), text: r.get(1), author_user_id: r.get(2) }))
}

/// The next page of an author's followers after `after`, in id order.
async fn followers_page(db: &impl GenericClient, author: &str, after: &str) -> anyhow::Result<Vec<String>> {
    let rows = db
        .query(
            "SELECT follower_id FROM follows WHERE followee_id = $1 AND follower_id > $2 \
             ORDER BY follower_id LIMIT $3",
            &[&author, &after, &(FOLLOWER_PAGE as i64)],
        )
        .await
        .context("reading followers")?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Publishes one message per group, then waits for every confirm, all
/// within [`broker::PUBLISH_TIMEOUT`].
async fn publish(backend: &Backend, link: &mut Link, ev: &PostEvent, groups: Vec<Vec<String>>) -> anyhow::Result<()> {
    let groups: Vec<Vec<String>> = groups.into_iter().filter(|g| !g.is_empty()).collect();
    if groups.is_empty() {
        return Ok(());
    }
    let ch = link.channel(&backend.brokers).await?;
    let send = async {
        let mut confirms = Vec::with_capacity(groups.len());
        for group in &groups {
            let recipients: Vec<&str> = group.iter().map(String::as_str).collect();
            let body = event::encode(&recipients, ev);
            confirms.push(topology::publish_group(ch, &recipients, &body, FieldTable::default()).await?);
        }
        let n = confirms.len();
        for c in futures_util::future::try_join_all(confirms).await? {
            anyhow::ensure!(c.is_ack(), "broker refused an event message");
        }
        anyhow::Ok(n)
    };
    let n = match tokio::time::timeout(broker::PUBLISH_TIMEOUT, send).await {
        Ok(r) => r.context("publishing events")?,
        Err(_) => anyhow::bail!("publishing events: no confirm within {:?}", broker::PUBLISH_TIMEOUT),
    };
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
