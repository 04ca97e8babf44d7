//! The node survives losing its broker connection: it reconnects,
//! redeclares, rebinds and goes on delivering, without a restart.

mod common;

use common::*;

#[tokio::test]
async fn killed_amqp_connection_recovers_and_delivers_later_events() {
    let proxy = AmqpProxy::start().await;
    let url = proxy.url();
    let node = Node::start(move |c| c.amqp_url = url).await;
    let user = unique("u");
    let mut ws = connect(&node, &user).await;
    let publisher = Publisher::new().await;

    let before = post(&unique("before"));
    publisher.publish(&[&user], &before).await;
    assert_eq!(next_event(&mut ws).await, before);

    // Cut the node's AMQP connection, as a broker crash would.
    assert!(proxy.kill_all() >= 1, "the node's AMQP connection went through the proxy");
    // Published while the node is (or just was) disconnected: the durable
    // queue keeps it.
    let during = post(&unique("during"));
    publisher.publish(&[&user], &during).await;

    wait_for("node reconnected", || async {
        let (_, m) = http_get(node.addr, "/metrics").await;
        m.lines().any(|l| l.starts_with("gateway_broker_reconnects_total") && !l.ends_with(" 0"))
    })
    .await;
    node.wait_ready().await;
    let after = post(&unique("after"));
    publisher.publish(&[&user], &after).await;

    // Delivery is at-least-once: an ack in flight when the connection died
    // means a redelivery, which clients detect by id. Nothing may be missing
    // and nothing foreign may appear.
    let mut seen = std::collections::BTreeSet::new();
    while !(seen.contains(&during.id) && seen.contains(&after.id)) {
        let ev = next_event(&mut ws).await;
        assert!([&before.id, &during.id, &after.id].contains(&&ev.id), "unexpected event {ev:?}");
        seen.insert(ev.id);
    }
    // The device itself never noticed.
    assert_eq!(node.gw.sessions.device_count(), 1);
}
