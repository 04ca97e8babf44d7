//! Fan-out workers: claim a job from the outbox (see [`crate::outbox`]),
//! then run its two parts at once, each reading the author's followers
//! in one streamed query on a PostgreSQL connection of its own:
//!
//! - **realtime**: group the followers by the gateway node that owns them
//!   and publish one event message per group to `feed.events`, persistent
//!   and with publisher confirms. It reads on the claiming transaction's
//!   connection, which nothing else uses meanwhile;
//! - **feeds**: cache the post's body and put its id into every
//!   follower's feed (one Redis pipeline per page, a few in flight). It
//!   reads on a second pooled connection, so that its many round trips
//!   never queue in front of the realtime part's rows.
//!
//! Neither part waits for the other: a post to 100,000 followers reaches
//! their devices while most of their feeds are still being written (the
//! feed writes are the slower part), a Redis outage does not hold the
//! devices back, nor a broker outage the feeds. The job is done, and its
//! row deleted in the transaction that claimed it, only when both parts
//! are; if either fails (or the worker dies) the whole job is redone.
//!
//! Memory stays bounded whatever the follower count: a streamed query
//! hands rows over only as fast as they are consumed (tokio-postgres
//! stops reading the socket when its one-message channel is full), a
//! group is flushed once it holds [`MAX_RECIPIENTS_PER_MESSAGE`], all
//! groups are flushed once [`MAX_BUFFERED_RECIPIENTS`] are waiting, at
//! most [`MAX_UNCONFIRMED`] messages wait for their confirm and at most
//! [`FEED_PIPELINES_IN_FLIGHT`] pages of [`FOLLOWER_PAGE`] are written at
//! once.
//!
//! A redone job may duplicate events but never loses a recipient: feed
//! writes are idempotent (a sorted set) and devices detect duplicate
//! events by their id (the post id). The price of not waiting: a device
//! that reconnects with `?since=` in the moment between its event and
//! its feed write (at most the job's duration, about a second for
//! 100,000 followers) reads a feed without the post; it got the event
//! live unless it was offline exactly then.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use contract::event::{self, PostEvent};
use contract::membership;
use contract::ring::Ring;
use contract::slot::{SLOTS, slot_of};
use contract::topology;
use deadpool_postgres::GenericClient;
use futures_util::TryStreamExt;
use lapin::PublisherConfirm;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::broker::{self, Link};
use crate::feed::Post;
use crate::outbox::{self, Job, JobKind};
use crate::state::Backend;

/// Feeds written (or, for a deleted post, cleaned) per Redis pipeline:
/// large enough to amortize the round trips, small
/// enough that a page (3 commands per follower) is a few hundred KiB.
pub const FOLLOWER_PAGE: usize = 1000;
/// Feed pipelines of one job waiting for Redis at once: one would leave
/// Redis idle for a round trip and an encode between pages; a few keep
/// it busy without letting one job's 100,000 followers queue megabytes
/// of commands in front of everyone else's reads.
pub const FEED_PIPELINES_IN_FLIGHT: usize = 4;
/// Event messages published and not yet confirmed, per job: the broker
/// confirms persistent messages after its disk write (a few ms, batched),
/// so waiting for each before the next would serialize those waits.
pub const MAX_UNCONFIRMED: usize = 64;
/// Longest wait for the gateway membership before publishing with the
/// last view read (or one message per slot): a slow Redis must not hold
/// events back. A stale view costs at most one gateway re-publish.
pub const MEMBERSHIP_TIMEOUT: Duration = Duration::from_millis(500);
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
                tracing::warn!(worker = index, error = %format_args!("{e:#}"), "cannot read the outbox");
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
async fn work_one(backend: &Arc<Backend>, link: &mut Link) -> anyhow::Result<bool> {
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
                retry_in = ?delay,
                error = %why,
                "fan-out failed, retrying"
            );
            // Whatever broke, the next job starts on a fresh broker link.
            link.reset(&backend.brokers);
        }
    }
    Ok(true)
}

/// Runs one job to the end: every page of followers, every message
/// confirmed. `db` is the claiming transaction's connection.
pub async fn run_job(
    backend: &Arc<Backend>,
    db: &impl GenericClient,
    link: &mut Link,
    job: &Job,
) -> anyhow::Result<()> {
    match job.kind {
        JobKind::Create => {
            let Some(post) = load_post(db, &job.post_id).await? else {
                // Deleted before its fan-out ran: its delete job follows.
                return Ok(());
            };
            let started = Instant::now();
            // Both parts run to their end even when the other fails, so an
            // outage of Redis or of the broker holds back only its own part.
            // The feed part is a task of its own, not a branch of a join:
            // in one task, its encoding of 300,000 Redis commands (for
            // 100,000 followers) and the realtime part would take turns on
            // one thread. Dropping the handle (job timeout, shutdown)
            // aborts it.
            let feeds = AbortOnDropHandle::new(tokio::spawn({
                let (backend, author, post) = (backend.clone(), job.author_id.clone(), post.clone());
                async move {
                    feeds(&backend, &author, &post).await?;
                    backend.metrics.fanout_part_done(Part::Feeds, started.elapsed());
                    anyhow::Ok(())
                }
            }));
            let realtime = async {
                realtime(backend, db, link, &job.author_id, &post).await?;
                backend.metrics.fanout_part_done(Part::Realtime, started.elapsed());
                anyhow::Ok(())
            }
            .await;
            let feeds = feeds.await.unwrap_or_else(|e| Err(anyhow::anyhow!("feed part: {e}")));
            match (realtime, feeds) {
                (Ok(()), Ok(())) => {}
                (Err(e), Ok(())) => return Err(e.context("realtime events (the feeds are written)")),
                (Ok(()), Err(e)) => return Err(e.context("feeds (the events are published)")),
                (Err(r), Err(f)) => anyhow::bail!("realtime events: {r:#}; feeds: {f:#}"),
            }
        }
        JobKind::Update => {
            // The body as it is now: a later update has its own job.
            if let Some(post) = load_post(db, &job.post_id).await? {
                backend.feed.put_post(&post).await.context("caching the post")?;
            }
        }
        JobKind::Delete => {
            backend.feed.forget_post(&job.post_id).await.context("forgetting the post")?;
            follower_pages(db, &job.author_id)
                .await?
                .try_for_each(
                    |page| async move { backend.feed.remove(&job.post_id, &page).await.context("writing feeds") },
                )
                .await?;
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

/// The realtime part: every follower in an event message to the node
/// that owns it, every message confirmed. Followers are streamed in one
/// query rather than paged: paging would add a round trip (and an index
/// descent) per page before the next publish.
async fn realtime(
    backend: &Backend,
    db: &impl GenericClient,
    link: &mut Link,
    author: &str,
    post: &Post,
) -> anyhow::Result<()> {
    let ring = backend.ring_view.read(backend).await;
    let ts_ms = event::now_micros() / 1000;
    let ev = PostEvent::new(&post.id, &post.text, &post.author_user_id, ts_ms);
    let mut groups = Groups::new(&ring);
    let mut out = Outgoing::default();
    let rows = all_followers(db, author).await?;
    futures_util::pin_mut!(rows);
    while let Some(row) = rows.try_next().await.context("reading followers")? {
        let follower: &str = row.get(0);
        if let Some(full) = groups.push(follower) {
            out.publish(backend, link, &ev, vec![full]).await?;
        }
        if groups.buffered >= MAX_BUFFERED_RECIPIENTS {
            out.publish(backend, link, &ev, groups.take_all()).await?;
        }
        backend.metrics.fanout_recipients.increment(1);
    }
    out.publish(backend, link, &ev, groups.take_all()).await?;
    out.confirm_all(backend).await
}

/// The feed part: the post's body cached, its id in every follower's
/// feed, [`FEED_PIPELINES_IN_FLIGHT`] pages at a time, on a connection of
/// its own (see the module comment). Rows are read on while pages wait
/// for Redis; the stream stops when the pipelines in flight are full.
async fn feeds(backend: &Backend, author: &str, post: &Post) -> anyhow::Result<()> {
    backend.feed.put_post(post).await.context("caching the post")?;
    let db = backend.db.get().await.context("database pool (feed part)")?;
    follower_pages(&db, author)
        .await?
        .try_for_each_concurrent(FEED_PIPELINES_IN_FLIGHT, |page| async move {
            backend.feed.add(&post.id, &page).await.context("writing feeds")
        })
        .await
}

/// All of an author's followers, streamed.
async fn all_followers(db: &impl GenericClient, author: &str) -> anyhow::Result<tokio_postgres::RowStream> {
    db.query_raw("SELECT follower_id FROM follows WHERE followee_id = $1", &[&author])
        .await
        .context("reading followers")
}

/// All of an author's followers, streamed in one query, in pages of
/// [`FOLLOWER_PAGE`] (the last one shorter).
async fn follower_pages(
    db: &impl GenericClient,
    author: &str,
) -> anyhow::Result<impl futures_util::TryStream<Ok = Vec<String>, Error = anyhow::Error>> {
    Ok(all_followers(db, author)
        .await?
        .map_ok(|row| row.get::<_, String>(0))
        .try_chunks(FOLLOWER_PAGE)
        .map_err(|e| anyhow::Error::new(e.1).context("reading followers")))
}

/// The event messages of one job: published as their groups fill, their
/// confirms awaited only when [`MAX_UNCONFIRMED`] are outstanding, and
/// all of them at the end.
#[derive(Default)]
struct Outgoing {
    unconfirmed: VecDeque<PublisherConfirm>,
}

impl Outgoing {
    /// Publishes one message per non-empty group.
    async fn publish(
        &mut self,
        backend: &Backend,
        link: &mut Link,
        ev: &PostEvent,
        groups: Vec<Vec<String>>,
    ) -> anyhow::Result<()> {
        for group in groups.into_iter().filter(|g| !g.is_empty()) {
            while self.unconfirmed.len() >= MAX_UNCONFIRMED {
                let oldest = self.unconfirmed.pop_front().expect("not empty");
                confirmed(backend, oldest).await?;
            }
            let ch = link.channel(&backend.brokers).await?;
            let recipients: Vec<&str> = group.iter().map(String::as_str).collect();
            let body = event::encode(&recipients, ev);
            let confirm = tokio::time::timeout(
                broker::PUBLISH_TIMEOUT,
                topology::publish_group(ch, &recipients, &body, FieldTable::default()),
            )
            .await
            .map_err(|_| anyhow::anyhow!("publishing events: no answer within {:?}", broker::PUBLISH_TIMEOUT))?
            .context("publishing events")?;
            self.unconfirmed.push_back(confirm);
        }
        Ok(())
    }

    /// Waits for every outstanding confirm.
    async fn confirm_all(mut self, backend: &Backend) -> anyhow::Result<()> {
        while let Some(c) = self.unconfirmed.pop_front() {
            confirmed(backend, c).await?;
        }
        Ok(())
    }
}

/// One message's confirm, within [`broker::PUBLISH_TIMEOUT`].
async fn confirmed(backend: &Backend, confirm: PublisherConfirm) -> anyhow::Result<()> {
    let c = match tokio::time::timeout(broker::PUBLISH_TIMEOUT, confirm).await {
        Ok(r) => r.context("publishing events")?,
        Err(_) => anyhow::bail!("publishing events: no confirm within {:?}", broker::PUBLISH_TIMEOUT),
    };
    anyhow::ensure!(c.is_ack(), "broker refused an event message");
    backend.metrics.events_published.increment(1);
    Ok(())
}

/// The gateway membership as the realtime part last read it, so that a
/// slow or unreachable Redis delays events by at most
/// [`MEMBERSHIP_TIMEOUT`] instead of holding them back.
#[derive(Default)]
pub struct RingView {
    last: Mutex<Option<Ring>>,
}

impl RingView {
    /// The membership now, or the last one read (no members at all before
    /// the first read: one message per slot, which the SPEC allows).
    async fn read(&self, backend: &Backend) -> Ring {
        let mut redis = backend.feed.redis.clone();
        let key = &backend.config.membership_key;
        match tokio::time::timeout(MEMBERSHIP_TIMEOUT, membership::fetch(&mut redis, key)).await {
            Ok(Ok(members)) => {
                let ring = Ring::new(members);
                *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(ring.clone());
                ring
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => format!("no answer within {MEMBERSHIP_TIMEOUT:?}"),
                };
                tracing::warn!(error = %why, "gateway membership unreadable: publishing with the last view");
                self.last.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_else(|| Ring::new([]))
            }
        }
    }
}

/// The two parts of a create job (a label of the part metric).
#[derive(Debug, Clone, Copy)]
pub enum Part {
    Realtime,
    Feeds,
}

impl Part {
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Realtime => "realtime",
            Part::Feeds => "feeds",
        }
    }
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
