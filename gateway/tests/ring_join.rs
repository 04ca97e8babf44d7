//! A fourth node joins under load: a quarter of the slots move, moved
//! devices follow 4001 and recover with `since`, nothing is lost. Then one
//! node leaves cleanly under load: only its slots move, nothing is lost.
//! (Each multi-node test has a binary of its own: a test process has one
//! RabbitMQ vhost, `common::vhost`, and clusters in it bind every slot of
//! its one exchange, so concurrent clusters would see each other's messages,
//! which a single deployment never does.)

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::cluster::*;
use common::*;
use contract::membership;
use contract::ring::Ring;
use contract::slot::{SLOTS, slot_of};

#[tokio::test]
async fn a_node_joins_then_one_leaves_and_devices_lose_nothing() {
    let key = unique("ring");
    let mut nodes = cluster(3, &key).await;
    let three = Ring::new(membership::fetch(&mut redis_conn().await, &key).await.unwrap());
    let users: Vec<String> = (0..60).map(|i| unique(&format!("m{i}"))).collect();
    let devices = Devices::start(&format!("ws://{}", nodes[0].addr), &users);
    wait_for("devices connected", || async { nodes.iter().map(|n| n.gw.sessions.device_count()).sum::<usize>() == 60 })
        .await;

    let publishing = publish_series(users.clone(), key.clone(), 80, Duration::from_millis(40));
    publishing.wait_published(20).await;
    let key4 = key.clone();
    nodes.push(Node::start(move |c| c.membership_key = key4).await);
    wait_converged(&nodes).await;
    let four = nodes[0].gw.ring();
    let moved: Vec<u16> = (0..SLOTS).filter(|&s| three.owner(s) != four.owner(s)).collect();
    let new_id = nodes[3].gw.config.node_id();
    assert!(moved.iter().all(|&s| four.owner(s).unwrap().node_id == new_id), "only slots to the new node move");
    assert!((150..400).contains(&moved.len()), "{} slots moved, expected about 256", moved.len());

    let mut all: BTreeSet<String> = publishing.finish().await.into_iter().collect();
    wait_for("every device served", || async {
        nodes.iter().map(|n| n.gw.sessions.device_count()).sum::<usize>() == 60
    })
    .await;
    wait_bindings_match(&nodes, &four).await;

    // Then one of the first three leaves cleanly, under load: exactly its
    // slots move, to the others; its devices get 1001 and come back.
    let publishing = publish_series(users.clone(), key.clone(), 80, Duration::from_millis(40));
    publishing.wait_published(20).await;
    let mut leaver = nodes.remove(1);
    let leaver_id = leaver.gw.config.node_id().to_owned();
    leaver.stop().await;
    wait_converged(&nodes).await;
    let after = nodes[0].gw.ring();
    let left: Vec<u16> = (0..SLOTS).filter(|&s| four.owner(s) != after.owner(s)).collect();
    assert!(left.iter().all(|&s| four.owner(s).unwrap().node_id == leaver_id), "only the leaver's slots move");
    assert_eq!(left.len(), four.slots_of(&leaver_id).len());
    all.extend(publishing.finish().await);
    wait_for("every device served again", || async {
        nodes.iter().map(|n| n.gw.sessions.device_count()).sum::<usize>() == 60
    })
    .await;
    devices.wait_complete(&all, WAIT).await;

    let (mut moved_devices, mut left_devices, mut duplicates) = (0, 0, 0);
    for (u, log) in devices.finish().await {
        let missing: Vec<_> = all.difference(&log.ids).collect();
        assert!(
            missing.is_empty(),
            "{u} (joiner's: {}, leaver's: {}, 4001s {}, reconnects {}) lost {} events: {missing:?}",
            moved.contains(&slot_of(&u)),
            left.contains(&slot_of(&u)),
            log.moved,
            log.reconnects,
            missing.len()
        );
        duplicates += log.duplicates.len();
        if moved.contains(&slot_of(&u)) {
            assert!(log.moved >= 1, "{u} moved to the new node but got no 4001");
            moved_devices += 1;
        }
        if left.contains(&slot_of(&u)) {
            left_devices += 1;
        }
    }
    wait_bindings_match(&nodes, &after).await;
    eprintln!(
        "join: {} of 1024 slots moved, {moved_devices} of 60 devices moved; \
         leave: {} of 1024 slots moved, {left_devices} of 60 devices moved; \
         {} events to 60 devices, 0 lost, {duplicates} duplicates",
        moved.len(),
        left.len(),
        all.len()
    );
}
