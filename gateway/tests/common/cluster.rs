//! Helpers for tests with several nodes in one ring.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use contract::ring::Ring;
use contract::slot::SLOTS;
use contract::topology::node_queue;

use super::*;

pub async fn cluster(n: usize, key: &str) -> Vec<Node> {
    let mut nodes = Vec::new();
    for _ in 0..n {
        let key = key.to_owned();
        nodes.push(Node::start(move |c| c.membership_key = key).await);
    }
    wait_converged(&nodes).await;
    nodes
}

/// Waits until every node acts on the ring of exactly these nodes.
pub async fn wait_converged(nodes: &[Node]) {
    let ids: BTreeSet<String> = nodes.iter().map(|n| n.gw.config.node_id().to_owned()).collect();
    // Converged means serving too: a node that joined serves its users only
    // after every peer routes them to it (gateway/src/handover.rs); until
    // then a device for them is relayed elsewhere or told to retry.
    wait_for("ring converged and every node serving", || async {
        nodes.iter().all(|n| {
            let r = n.gw.ring();
            r.members().iter().map(|m| m.node_id.clone()).collect::<BTreeSet<_>>() == ids
                && n.gw.serving.load(std::sync::atomic::Ordering::Acquire)
        })
    })
    .await;
}

/// Waits until RabbitMQ shows every slot bound exactly once among the
/// nodes' queues, each by its ring owner.
pub async fn wait_bindings_match(nodes: &[Node], ring: &Ring) {
    let queue_of: BTreeMap<String, String> = nodes
        .iter()
        .map(|n| (n.gw.config.node_id().to_owned(), node_queue(n.gw.config.node_id(), n.gw.incarnation())))
        .collect();
    let queues: BTreeSet<String> = queue_of.values().cloned().collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for (q, slot) in bindings().await {
            if queues.contains(&q) {
                by_slot.entry(slot).or_default().push(q);
            }
        }
        let exact = (0..SLOTS).all(|s| {
            by_slot.get(&s).is_some_and(|qs| qs.len() == 1 && qs[0] == queue_of[&ring.owner(s).unwrap().node_id])
        });
        if exact {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "bindings never matched the ring: {by_slot:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
