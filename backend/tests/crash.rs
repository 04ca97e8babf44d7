//! A post is never lost between PostgreSQL and the fan-out: the real
//! backend binary, run as a child process, is SIGKILLed at random instants
//! during a burst of posts and restarted each time. Afterwards every post
//! that was acknowledged (200) is stored and in every follower's cached
//! feed, every stored post is in every follower's feed exactly once and no
//! other post is, every stored post reached every follower as an event at
//! least once (duplicates allowed, same id), and the outbox is empty.

mod common;

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use tokio::process::{Child, Command};

/// Kills during the burst.
const KILLS: usize = 12;
/// Concurrent posting clients: several requests are in flight at a kill.
const POSTERS: usize = 8;
/// Followers of the author.
const FOLLOWERS: usize = 30;
/// A kill comes this long (at random within the range) after the process
/// started answering.
const KILL_AFTER_MS: std::ops::Range<u64> = 30..250;

/// A random number in `range` (std only: a fresh `RandomState` is seeded
/// from the OS).
fn random(range: std::ops::Range<u64>) -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0);
    range.start + h.finish() % (range.end - range.start)
}

/// The backend binary with this test's settings.
struct Proc {
    addr: SocketAddr,
    queue: String,
    membership: String,
    log: std::path::PathBuf,
    child: Option<Child>,
}

impl Proc {
    async fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_backend"))
            .env("BACKEND_LISTEN", self.addr.to_string())
            .env("AMQP_URL", amqp_url())
            .env("REDIS_URL", REDIS_URL)
            .env("DATABASE_URL", DATABASE_URL)
            .env("JWT_SECRET", SECRET)
            .env("MEMBERSHIP_KEY", &self.membership)
            .env("FANOUT_QUEUE", &self.queue)
            .env("BACKEND_WORKERS", "2")
            .env("DATABASE_POOL_SIZE", "12")
            .env("ARGON2_MEMORY_KIB", "64")
            .env("ARGON2_ITERATIONS", "1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("the backend binary starts");
        self.child = Some(child);
        let client = Client { addr: self.addr };
        wait_for("backend process answering", || async {
            client.try_call("GET", "/healthz", None, None).await.is_some_and(|r| r.status == 200)
        })
        .await;
    }

    /// SIGKILL, and wait until it is gone.
    async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
}

#[derive(Default)]
struct Outcomes {
    /// Post ids answered with 200.
    acked: Vec<String>,
    /// Requests with no answer (killed mid-request, or refused while down).
    unanswered: usize,
    /// Other answers (503 while starting, for example).
    other: usize,
}

#[tokio::test]
async fn every_acknowledged_post_survives_sigkill_of_the_backend() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut proc = Proc {
        addr,
        queue: unique("test.crash"),
        membership: unique("test:members"),
        log: std::env::temp_dir().join(format!("backend-crash-{}.log", std::process::id())),
        child: None,
    };
    proc.start().await;
    let api = Client { addr };
    let (author, token) = api.user("Crashy").await;
    let followers = bulk_followers(&author, FOLLOWERS).await;
    let mut tap = Tap::new().await;

    // The burst: posters keep posting until the killer is done.
    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut posters = Vec::new();
    for p in 0..POSTERS {
        let (done, sent, token) = (done.clone(), sent.clone(), token.clone());
        posters.push(tokio::spawn(async move {
            let mut out = Outcomes::default();
            let mut i = 0;
            while !done.load(Ordering::SeqCst) {
                i += 1;
                sent.fetch_add(1, Ordering::SeqCst);
                let body = serde_json::json!({ "text": format!("poster {p} post {i}") }).to_string();
                match api.try_call("POST", "/post/create", Some(&token), Some(&body)).await {
                    Some(r) if r.status == 200 => out.acked.push(r.json().as_str().unwrap().to_owned()),
                    Some(_) => out.other += 1,
                    None => {
                        out.unanswered += 1;
                        // Down: do not spin on refused connections.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            out
        }));
    }
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(random(KILL_AFTER_MS))).await;
        proc.kill().await;
        proc.start().await;
    }
    done.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    let (mut unanswered, mut other) = (0, 0);
    for p in posters {
        let o = p.await.unwrap();
        acked.extend(o.acked);
        unanswered += o.unanswered;
        other += o.other;
    }

    // The last process finishes what is left in the outbox.
    let db = pg().await;
    let pending = || async {
        let n: i64 = db.query_one("SELECT count(*) FROM outbox WHERE queue = $1", &[&proc.queue]).await.unwrap().get(0);
        n
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while pending().await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the outbox did not drain: {} jobs left", pending().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stored: HashSet<String> = db
        .query("SELECT id FROM posts WHERE author_id = $1", &[&author])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let acked_set: HashSet<String> = acked.iter().cloned().collect();

    // Events: every stored post to every follower, at least once.
    let mut deliveries: HashMap<String, HashMap<String, usize>> = HashMap::new();
    let complete = |d: &HashMap<String, HashMap<String, usize>>| {
        stored.iter().all(|p| d.get(p).is_some_and(|r| r.len() == FOLLOWERS))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !complete(&deliveries) && tokio::time::Instant::now() < deadline {
        if let Some((post, recipients)) = tap.next_message(Duration::from_secs(5)).await {
            let per = deliveries.entry(post).or_default();
            for r in recipients {
                *per.entry(r).or_default() += 1;
            }
        }
    }
    let duplicates: usize = deliveries.values().flat_map(|r| r.values()).map(|&n| n.saturating_sub(1)).sum();
    let unfanned: Vec<&String> =
        stored.iter().filter(|p| deliveries.get(*p).is_none_or(|r| r.len() < FOLLOWERS)).collect();

    // Feeds: exactly the stored posts, each once (a sorted set cannot hold
    // one twice; what is checked is that none is missing and none extra).
    let mut redis = redis_conn().await;
    let mut wrong_feeds = 0;
    for f in &followers {
        let ids: Vec<String> =
            redis::cmd("ZRANGEBYSCORE").arg(format!("feed:{f}")).arg(0).arg(0).query_async(&mut redis).await.unwrap();
        let in_feed: HashSet<String> = ids.iter().cloned().collect();
        if in_feed != stored || ids.len() != stored.len() {
            wrong_feeds += 1;
        }
    }
    let lost: Vec<&String> = acked.iter().filter(|p| !stored.contains(*p)).collect();
    let stored_unacked = stored.difference(&acked_set).count();
    eprintln!(
        "crash test: {KILLS} SIGKILLs, {} posts sent, {} acknowledged, {unanswered} unanswered, {other} other answers; \
         {} stored ({stored_unacked} of them never acknowledged); {} event messages' recipients duplicated {duplicates} \
         times; {wrong_feeds} of {FOLLOWERS} feeds wrong; {} stored posts not delivered as events; log: {}",
        sent.load(Ordering::SeqCst),
        acked.len(),
        stored.len(),
        deliveries.len(),
        unfanned.len(),
        proc.log.display(),
    );
    assert!(acked.len() >= 50, "the burst posted too little to mean anything ({} acknowledged)", acked.len());
    assert!(lost.is_empty(), "acknowledged but not stored: {lost:?}");
    assert_eq!(wrong_feeds, 0, "every follower's feed holds exactly the stored posts");
    assert!(unfanned.is_empty(), "stored posts never fanned out as events: {unfanned:?}");

    drop_feeds(&followers).await;
    let mut redis = redis_conn().await;
    let _: () = redis::cmd("DEL").arg(&proc.membership).query_async(&mut redis).await.unwrap();
    proc.kill().await;
}
