//! Fan-out at scale: a post by an author with 10,000 followers is one
//! broker message per gateway node that owns some of them (one per slot
//! at most without membership), and lands in every follower's feed.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use contract::membership::{Record, now_ms};
use contract::ring::{Member, Ring};
use contract::slot::{SLOTS, slot_of};

const FOLLOWERS: usize = 10_000;

#[tokio::test]
async fn ten_thousand_followers_are_three_messages_for_three_nodes() {
    let backend = TestBackend::start(|_| {}).await;
    let api = backend.client();
    let (author, author_token) = api.user("Famous").await;

    let followers = bulk_followers(&author, FOLLOWERS).await;

    // Three fake gateway nodes in this backend's membership key, kept fresh.
    let key = backend.backend.config.membership_key.clone();
    let members: Vec<Member> =
        ["n1", "n2", "n3"].iter().map(|n| Member { node_id: n.to_string(), url: format!("ws://{n}:1") }).collect();
    let write_records = |key: String, members: Vec<Member>| async move {
        let mut redis = redis_conn().await;
        let mut pipe = redis::pipe();
        for m in &members {
            let rec = serde_json::to_string(&Record::alive(&m.url, now_ms())).unwrap();
            pipe.hset(&key, &m.node_id, rec).ignore();
        }
        let _: () = pipe.query_async(&mut redis).await.unwrap();
    };
    write_records(key.clone(), members.clone()).await;
    let heartbeat = {
        let (key, members) = (key.clone(), members.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                write_records(key.clone(), members.clone()).await;
            }
        })
    };
    let ring = Ring::new(members.clone());

    let mut tap = Tap::new().await;
    let started = Instant::now();
    let post_id = api.post(&author_token, "to all my fans").await;
    let messages = tap.collect(&post_id, FOLLOWERS, Duration::from_millis(500)).await;
    let elapsed = started.elapsed();
    eprintln!("fan-out of {FOLLOWERS} recipients in {} messages: {elapsed:?}", messages.len());

    let sizes: Vec<usize> = messages.iter().map(|(_, r)| r.len()).collect();
    assert_eq!(messages.len(), 3, "one message per owner node, got sizes {sizes:?}");
    let mut all: HashSet<String> = HashSet::new();
    let mut owners = HashSet::new();
    for (slot, recipients) in &messages {
        assert_eq!(*slot, slot_of(&recipients[0]), "routed by the first recipient's slot");
        let owner = ring.owner(*slot).unwrap();
        assert!(recipients.iter().all(|r| ring.owner(slot_of(r)).unwrap() == owner), "a group spans owners");
        owners.insert(owner.node_id.clone());
        all.extend(recipients.iter().cloned());
    }
    assert_eq!(owners.len(), 3);
    assert_eq!(all, followers.iter().cloned().collect::<HashSet<_>>());

    // Every follower's cached feed holds the post (written alongside the
    // publishing, not before it: see tests/celebrity.rs).
    wait_for("every feed holds the post", || async { feeds_holding(&followers, &post_id).await == FOLLOWERS }).await;

    // Without live members: one message per slot at most, same recipients.
    heartbeat.abort();
    let mut redis = redis_conn().await;
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut redis).await.unwrap();
    let second = api.post(&author_token, "anyone there?").await;
    let messages = tap.collect(&second, FOLLOWERS, Duration::from_millis(500)).await;
    assert!(messages.len() <= usize::from(SLOTS), "{} messages", messages.len());
    assert!(messages.len() > 3);
    let mut per_slot: HashMap<u16, usize> = HashMap::new();
    let mut all = HashSet::new();
    for (slot, recipients) in &messages {
        assert!(recipients.iter().all(|r| slot_of(r) == *slot), "a per-slot message spans slots");
        *per_slot.entry(*slot).or_default() += 1;
        all.extend(recipients.iter().cloned());
    }
    assert!(per_slot.values().all(|&n| n == 1), "one message per slot");
    assert_eq!(all.len(), FOLLOWERS);

    let published = api.call("GET", "/metrics", None, None).await.body;
    assert!(counter(&published, "backend_fanout_recipients_total") >= (2 * FOLLOWERS) as f64);
    assert!(counter(&published, "backend_events_published_total") >= (3 + messages.len()) as f64);

    // Tidy the shared Redis: these followers' feeds and the posts' bodies.
    drop_feeds(&followers).await;
    let _: () = redis::pipe()
        .del(format!("post:{post_id}"))
        .del(format!("post:{second}"))
        .query_async(&mut redis)
        .await
        .unwrap();
    backend.stop().await;
}

/// The value of an unlabelled counter in a `/metrics` text.
fn counter(metrics: &str, name: &str) -> f64 {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test]
async fn a_fan_out_cut_off_by_a_broker_failure_is_redone_without_losing_anyone() {
    const N: usize = 3000;
    /// Without members the job is one message per slot (about 950 for
    /// 3,000 followers): the cut comes well inside it.
    const CUT_AT_PUBLISH: u64 = 100;
    let proxy = AmqpProxy::start().await;
    let url = proxy.url();
    let backend = TestBackend::start(move |c| c.amqp_url = url).await;
    let api = backend.client();
    let (author, author_token) = api.user("Unlucky").await;
    let followers = bulk_followers(&author, N).await;
    let retries_before = counter(&api.call("GET", "/metrics", None, None).await.body, "backend_fanout_retries_total");
    let accepted_before = proxy.accepted();

    let mut tap = Tap::new().await;
    // Every broker connection of the backend is cut just before its
    // 100th publish reaches the broker: the job is mid-publish, not done.
    proxy.cut_before_publish(CUT_AT_PUBLISH);
    let post_id = api.post(&author_token, "through a flaky broker").await;
    let mut all = HashSet::new();
    let messages = tap.collect_into(&post_id, &mut all, N, Duration::from_millis(300)).await;
    let slots: HashSet<u16> = messages.iter().map(|(s, _)| *s).collect();
    let retries =
        counter(&api.call("GET", "/metrics", None, None).await.body, "backend_fanout_retries_total") - retries_before;
    let reconnects = proxy.accepted() - accepted_before;
    eprintln!(
        "cut before publish #{CUT_AT_PUBLISH}: {} messages over {} slots, {retries} job retries, {reconnects} new broker connections",
        messages.len(),
        slots.len(),
    );
    assert_eq!(proxy.cuts(), 1, "the cut happened");
    // The messages before the cut, and then the whole job again.
    assert!(messages.len() > slots.len(), "the job was redone after the cut ({} messages)", messages.len());
    assert!(retries >= 1.0, "the failed job was counted as a retry");
    assert!(reconnects >= 1, "the worker reconnected through the proxy");
    assert_eq!(all, followers.iter().cloned().collect::<HashSet<_>>(), "every follower got the event");
    wait_for("every feed holds the post", || async { feeds_holding(&followers, &post_id).await == N }).await;

    drop_feeds(&followers).await;
    backend.stop().await;
}

/// The outbox row of a post's job: (attempts, last error).
async fn job_row(post_id: &str) -> Option<(i32, Option<String>)> {
    let row = pg().await.query_opt("SELECT attempts, last_error FROM outbox WHERE post_id = $1", &[&post_id]).await;
    row.unwrap().map(|r| (r.get(0), r.get(1)))
}

#[tokio::test]
async fn while_the_broker_is_down_a_post_is_accepted_and_its_job_retried_visibly_until_it_is_back() {
    const N: usize = 3;
    let proxy = AmqpProxy::start().await;
    proxy.refuse(true);
    let url = proxy.url();
    let backend = TestBackend::start(move |c| c.amqp_url = url).await;
    let api = backend.client();
    let (author, author_token) = api.user("Patient").await;
    let followers = bulk_followers(&author, N).await;
    let mut tap = Tap::new().await;

    // Accepted: the post and its job are committed, the broker is not asked.
    let post_id = api.post(&author_token, "while the broker is away").await;
    // The feeds do not wait for the broker.
    wait_for("feeds written", || async { feeds_holding(&followers, &post_id).await == N }).await;
    // The job fails, stays, says why, and is retried with growing delays.
    wait_for("two failed attempts", || async { job_row(&post_id).await.is_some_and(|(a, _)| a >= 2) }).await;
    let (attempts, why) = job_row(&post_id).await.expect("the job is kept");
    let why = why.expect("the row says why");
    eprintln!("job after {attempts} attempts: {why}");
    assert!(why.contains("broker unreachable"), "{why}");
    wait_for("the failing job in the metrics", || async {
        let m = api.call("GET", "/metrics", None, None).await.body;
        counter(&m, "backend_outbox_failing_jobs") >= 1.0 && counter(&m, "backend_fanout_retries_total") >= 2.0
    })
    .await;
    assert_eq!(api.call("GET", "/readyz", None, None).await.status, 200, "the API stays ready");

    // The broker is back: the next attempt delivers, and the job is gone.
    proxy.refuse(false);
    let mut all = HashSet::new();
    tap.collect_into(&post_id, &mut all, N, Duration::from_millis(100)).await;
    assert_eq!(all, followers.iter().cloned().collect::<HashSet<_>>(), "every follower got the event");
    wait_for("job finished", || async { job_row(&post_id).await.is_none() }).await;

    drop_feeds(&followers).await;
    backend.stop().await;
}

#[tokio::test]
async fn with_several_broker_urls_the_workers_move_to_the_next_node_when_one_is_lost() {
    // Two proxies to the one broker stand for two nodes of a cluster.
    let (a, b) = (AmqpProxy::start().await, AmqpProxy::start().await);
    a.refuse(true);
    let urls = format!("{},{}", a.url(), b.url());
    let backend = TestBackend::start(move |c| c.amqp_url = urls).await;
    let api = backend.client();
    let (author, author_token) = api.user("Clustered").await;
    let followers = bulk_followers(&author, 3).await;
    let mut tap = Tap::new().await;
    let want: HashSet<String> = followers.iter().cloned().collect();

    // Node a is down from the start: the workers use b.
    let first = api.post(&author_token, "via the second node").await;
    let mut got = HashSet::new();
    tap.collect_into(&first, &mut got, 3, Duration::from_millis(100)).await;
    assert_eq!(got, want);
    let on_b = b.accepted();
    assert!(on_b >= 1, "the workers connected to b");

    // b goes down (connections cut, new ones refused), a comes back.
    b.refuse(true);
    a.refuse(false);
    b.kill_all();
    let second = api.post(&author_token, "via the first node again").await;
    let mut got = HashSet::new();
    tap.collect_into(&second, &mut got, 3, Duration::from_millis(100)).await;
    assert_eq!(got, want);
    eprintln!("connections: a {}, b {}", a.accepted(), b.accepted());
    assert!(a.accepted() >= 1, "the workers moved to a");
    assert_eq!(b.accepted(), on_b, "nothing more reached b");

    drop_feeds(&followers).await;
    backend.stop().await;
}
