//! A rolling restart: each of 3 nodes gets SIGTERM and is started again at
//! once under the same id and address, one after the other. Each restart
//! is a new incarnation with a queue of its own, so the survivors' take-over
//! of the old one never touches it. Nothing is lost; each stop ends well
//! inside the grace. Real processes.
//!
//! Prints its figures with:
//!   cargo test -p gateway --test ring_restart -- --nocapture

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::procs::*;
use common::*;

// This lost 199-360 of ~9,000 (event, device) pairs until a restarted node
// waited for its peers before serving (see `gateway::handover`): it accepted
// the devices the others still proxied to its id before it had bound its
// slots, while the others delivered those users' events "here" to nobody.
#[tokio::test]
async fn a_rolling_restart_under_the_same_ids_loses_nothing() {
    let key = unique("ring");
    let services = Services::shared(&key);
    let mut procs: Vec<GatewayProc> = (0..3).map(|_| GatewayProc::spawn(&services)).collect();
    let addrs: Vec<_> = procs.iter().map(|p| p.addr).collect();
    let ids: BTreeSet<String> = procs.iter().map(|p| p.id.clone()).collect();
    wait_members(&addrs, &ids, Duration::from_secs(30)).await;

    let users: Vec<String> = (0..36).map(|i| unique(&format!("r{i}"))).collect();
    // Devices enter through node 0, which restarts last.
    let devices = Devices::start(&procs[0].url(), &users);
    wait_for("devices connected", || async { devices_held(&addrs).await == 36.0 }).await;
    let publishing = publish_series_via(services.clone(), users.clone(), 100_000, Duration::from_millis(50));
    publishing.wait_published(20).await;

    let roll = Instant::now();
    let mut figures = Vec::new();
    for i in [2, 1, 0] {
        let stop = procs[i].terminate().await;
        let (id, addr) = (procs[i].id.clone(), procs[i].addr);
        let start = Instant::now();
        procs[i] = GatewayProc::spawn_as(&services, &id, addr);
        procs[i].wait_ready().await;
        wait_members(&addrs, &ids, Duration::from_secs(20)).await;
        figures.push(format!(
            "{id}: stop {:.2}s, back in the ring {:.2}s",
            stop.as_secs_f64(),
            start.elapsed().as_secs_f64()
        ));
    }
    let rolled = roll.elapsed();
    // A few more posts after the last start, then the series ends.
    let published = publishing.published();
    publishing.wait_published(published + 20).await;
    let all: BTreeSet<String> = publishing.stop().await.into_iter().collect();
    let complete = devices.wait_complete(&all, Duration::from_secs(20)).await;
    let logs = devices.finish().await;
    let (lost, duplicates) = losses(&all, &logs);
    eprintln!(
        "rolling restart of 3 nodes in {:.1}s ({}); {} events x 36 devices, {lost} lost, {duplicates} duplicates, \
         all devices complete {complete:?} after the last publish",
        rolled.as_secs_f64(),
        figures.join("; "),
        all.len()
    );
    assert_eq!(lost, 0);
}
