//! `?since=` replays are bounded (newest page, with a `recovery_cut` frame
//! saying what was left out), shared between one user's devices, queued
//! per node, and leave other users alone.

mod common;

use std::time::Duration;

use common::raw::metric;
use common::*;
use contract::feedcache::{CachedPost, feed_key, post_key};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

/// Writes `n` posts of `size` bytes into `user`'s feed cache, as the
/// backend does; returns their ids, oldest first.
async fn fill_feed(user: &str, n: u64, size: usize) -> Vec<String> {
    let mut redis = redis_conn().await;
    let text = "x".repeat(size);
    let mut ids = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut pipe = redis::pipe();
        for seq in chunk {
            let id = format!("{}-{user}", post_id(*seq));
            let body = CachedPost { id: id.clone(), text: text.clone(), author_user_id: "a".into() };
            pipe.set_ex(post_key(&id), serde_json::to_string(&body).unwrap(), 600).ignore();
            pipe.zadd(feed_key(user), &id, 0).ignore();
            ids.push(id);
        }
        pipe.expire(feed_key(user), 600).ignore();
        pipe.query_async::<()>(&mut redis).await.unwrap();
    }
    ids
}

async fn drop_feed(user: &str, ids: &[String]) {
    let mut redis = redis_conn().await;
    let mut keys: Vec<String> = ids.iter().map(|i| post_key(i)).collect();
    keys.push(feed_key(user));
    redis::cmd("DEL").arg(&keys).query_async::<()>(&mut redis).await.unwrap();
}

/// Connects with `?since=` and reads the replay: (cut frame, event ids).
/// Stops after `events` events.
async fn replay(node: &Node, user: &str, since: &str, events: usize) -> (Option<serde_json::Value>, Vec<String>) {
    let url = format!("{}?token={}&since={since}", node.ws_url(), token_for(user));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connects");
    let (mut cut, mut ids) = (None, Vec::new());
    while ids.len() < events {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("replay arrives") {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "recovery_cut" {
                    assert!(cut.is_none() && ids.is_empty(), "one cut frame, before the events");
                    cut = Some(v);
                } else {
                    ids.push(v["id"].as_str().unwrap().to_owned());
                }
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected the replay, got {other:?}"),
        }
    }
    (cut, ids)
}

#[tokio::test]
async fn a_device_far_behind_gets_the_newest_page_and_is_told_it_was_cut() {
    let node = Node::start(|c| c.max_replay = 5).await;
    let user = unique("u");
    let ids = fill_feed(&user, 12, 10).await;
    let (cut, got) = replay(&node, &user, "0", 5).await;
    let cut = cut.expect("a recovery_cut frame first");
    assert_eq!(cut["skipped"], 7, "{cut}");
    assert_eq!(cut["since"], "0");
    assert_eq!(cut["first_id"].as_str(), Some(ids[7].as_str()));
    assert_eq!(got, ids[7..], "the newest five, oldest first");
    // Not behind by more than the page: no cut frame.
    let (cut, got) = replay(&node, &user, &ids[8], 3).await;
    assert!(cut.is_none());
    assert_eq!(got, ids[9..]);
    drop_feed(&user, &ids).await;
}

/// The storm: one follower's 10 devices reconnect with since=0 to a
/// feed of 1,000 posts of 20 KB, with recoveries queued one at a time; an
/// unrelated user recovering meanwhile is served too. Prints the RSS.
#[tokio::test]
async fn a_since_0_storm_is_bounded_shared_and_leaves_others_alone() {
    const DEVICES: usize = 10;
    let node = Node::start(|c| c.max_recoveries = 1).await;
    let page = node.gw.config.max_replay;
    let (storm_user, other) = (unique("storm"), unique("other"));
    let ids = fill_feed(&storm_user, 1000, 20 * 1024).await;
    let other_ids = fill_feed(&other, 3, 100).await;
    let rss = "gateway_process_rss_bytes";
    let reads = "gateway_recovery_reads_total";
    let (rss_before, reads_before) = (metric(node.addr, rss).await, metric(node.addr, reads).await);

    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (addr, peak) = (node.addr, peak.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(metric(addr, rss).await as u64, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let node_ref = &node;
    let storm =
        futures_util::future::join_all((0..DEVICES).map(|_| async { replay(node_ref, &storm_user, "0", page).await }));
    let bystander = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        replay(node_ref, &other, "0", 3).await
    };
    let started = std::time::Instant::now();
    let (results, (other_cut, other_got)) = tokio::join!(storm, bystander);
    let took = started.elapsed();
    sampler.abort();
    for (cut, got) in &results {
        assert_eq!(cut.as_ref().map(|c| c["skipped"].clone()), Some(serde_json::json!(1000 - page)));
        assert_eq!(got[..], ids[1000 - page..], "every device gets the newest page, in order");
    }
    assert!(other_cut.is_none());
    assert_eq!(other_got, other_ids, "the unrelated user is served");
    // One read is the bystander's; the storm's devices shared theirs.
    let storm_reads = metric(node.addr, reads).await - reads_before - 1.0;
    assert!((1.0..DEVICES as f64).contains(&storm_reads), "{DEVICES} devices took {storm_reads} feed reads");
    println!(
        "since=0 storm: {DEVICES} devices x {page} replayed events of 20 KB (feed of 1000) in {took:?}; \
         feed reads for the storm {storm_reads}; RSS before {:.0} MB, peak {:.0} MB",
        rss_before / 1e6,
        peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6
    );
    drop_feed(&storm_user, &ids).await;
    drop_feed(&other, &other_ids).await;
}
