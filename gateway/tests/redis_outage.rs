//! Redis (a private instance) goes away for 10 s and comes back empty. The
//! ring must not change: nobody could beat meanwhile, so silence is no
//! evidence that a peer died. Delivery pauses once the nodes' leases run
//! out (events wait in their durable queues) and resumes when Redis
//! answers again; devices stay connected and lose nothing. Real processes.
//!
//! Prints its figures with:
//!   cargo test -p gateway --test redis_outage -- --nocapture

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::procs::*;
use common::services::PrivateRedis;
use common::*;

#[tokio::test]
async fn a_redis_outage_changes_no_ring_and_loses_nothing() {
    let redis = PrivateRedis::start().await;
    let key = unique("ring");
    let services = Services { redis_url: redis.url(), ..Services::shared(&key) };
    let procs: Vec<GatewayProc> = (0..3).map(|_| GatewayProc::spawn(&services)).collect();
    let addrs: Vec<_> = procs.iter().map(|p| p.addr).collect();
    let ids: BTreeSet<String> = procs.iter().map(|p| p.id.clone()).collect();
    wait_members(&addrs, &ids, Duration::from_secs(30)).await;

    let users: Vec<String> = (0..30).map(|i| unique(&format!("o{i}"))).collect();
    let devices = Devices::start(&procs[0].url(), &users);
    wait_for("devices connected", || async { devices_held(&addrs).await == 30.0 }).await;
    let publishing = publish_series_via(services.clone(), users.clone(), 100_000, Duration::from_millis(50));
    publishing.wait_published(20).await;

    redis.stop().await;
    let down = Instant::now();
    // Every node's view of the ring, sampled through the outage and after.
    let mut views_changed = 0;
    while down.elapsed() < Duration::from_secs(10) {
        for a in &addrs {
            views_changed += usize::from(members_seen_by(*a).await != ids);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    redis.restart().await;
    let back = Instant::now();
    wait_for_within("every node ready again", Duration::from_secs(20), || async {
        for a in &addrs {
            if http_get(*a, "/readyz").await.0 != 200 {
                return false;
            }
        }
        true
    })
    .await;
    let ready_after = back.elapsed();
    while back.elapsed() < Duration::from_secs(3) {
        for a in &addrs {
            views_changed += usize::from(members_seen_by(*a).await != ids);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let published = publishing.published();
    publishing.wait_published(published + 20).await;
    let all: BTreeSet<String> = publishing.stop().await.into_iter().collect();
    let complete = devices.wait_complete(&all, Duration::from_secs(20)).await;
    let logs = devices.finish().await;
    let (lost, duplicates) = losses(&all, &logs);
    let (mut evicted, mut fenced) = (0.0, 0.0);
    for a in &addrs {
        evicted += metric(*a, "gateway_members_evicted_total").await;
        fenced += metric(*a, "gateway_fenced_total").await;
    }
    let reconnects: u32 = logs.iter().map(|(_, l)| l.reconnects).sum();
    eprintln!(
        "redis down 10 s: ring views that differed {views_changed}, evictions {evicted}, fences {fenced}, \
         nodes ready {:.1}s after Redis was back; {} events x 30 devices, {lost} lost, {duplicates} duplicates, \
         {reconnects} reconnects, complete {complete:?} after the last publish",
        ready_after.as_secs_f64(),
        all.len()
    );
    assert_eq!(views_changed, 0, "the ring changed during a Redis outage");
    assert_eq!(evicted, 0.0);
    assert_eq!(lost, 0);
}
