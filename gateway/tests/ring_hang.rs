//! A node hangs (SIGSTOP) for 8 s, then resumes. The others drop it on
//! evidence (its heartbeat stopped while theirs went on) and take its slots
//! over; on resume it finds itself evicted, is fenced (its devices closed
//! with 1001, so they recover with `since` on the current owners), and
//! rejoins as a new incarnation. Nothing is lost. Real processes.
//!
//! Prints its figures with:
//!   cargo test -p gateway --test ring_hang -- --nocapture

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::procs::*;
use common::*;

#[tokio::test]
async fn a_node_hung_then_resumed_is_fenced_and_its_devices_lose_nothing() {
    let key = unique("ring");
    let services = Services::shared(&key);
    let procs: Vec<GatewayProc> = (0..3).map(|_| GatewayProc::spawn(&services)).collect();
    let addrs: Vec<_> = procs.iter().map(|p| p.addr).collect();
    let all_ids: BTreeSet<String> = procs.iter().map(|p| p.id.clone()).collect();
    wait_members(&addrs, &all_ids, Duration::from_secs(30)).await;

    let users: Vec<String> = (0..36).map(|i| unique(&format!("h{i}"))).collect();
    let devices = Devices::start(&procs[0].url(), &users);
    wait_for("devices connected", || async { devices_held(&addrs).await == 36.0 }).await;
    let publishing = publish_series_via(services.clone(), users.clone(), 320, Duration::from_millis(50));
    publishing.wait_published(20).await;

    let victim = &procs[2];
    let survivors = addrs[..2].to_vec();
    let others: BTreeSet<String> = procs[..2].iter().map(|p| p.id.clone()).collect();
    victim.signal("-STOP");
    let stopped = Instant::now();
    wait_members(&survivors, &others, Duration::from_secs(20)).await;
    let owned_after = stopped.elapsed();
    // The fault lasts 8 s (a scenario setting, not a wait for a condition).
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(stopped.elapsed())).await;
    victim.signal("-CONT");
    let resumed = Instant::now();
    wait_for_within("the resumed node fenced itself", Duration::from_secs(10), || async {
        metric(victim.addr, "gateway_fenced_total").await >= 1.0
    })
    .await;
    let fenced_after = resumed.elapsed();
    wait_members(&addrs, &all_ids, Duration::from_secs(20)).await;
    let rejoined_after = resumed.elapsed();

    let all: BTreeSet<String> = publishing.finish().await.into_iter().collect();
    let complete = devices.wait_complete(&all, Duration::from_secs(20)).await;
    let logs = devices.finish().await;
    let (lost, duplicates) = losses(&all, &logs);
    let closes: u32 = logs.iter().map(|(_, l)| l.closes.get(&1001).copied().unwrap_or(0)).sum();
    eprintln!(
        "hang: survivors owned its slots {:.1}s after SIGSTOP; resumed after 8 s, fenced {:.2}s later, \
         rejoined {:.1}s later; {} events x 36 devices, {lost} lost, {duplicates} duplicates, {closes} closes 1001, \
         all devices complete {complete:?} after the last publish",
        owned_after.as_secs_f64(),
        fenced_after.as_secs_f64(),
        rejoined_after.as_secs_f64(),
        all.len()
    );
    assert_eq!(lost, 0);
}
