//! A publisher with a stale ring view: one re-publish fixes it, never a loop.
//! (Each multi-node test has a binary of its own: a test process has one
//! RabbitMQ vhost, `common::vhost`, and clusters in it bind every slot of
//! its one exchange, so concurrent clusters would see each other's messages,
//! which a single deployment never does.)

mod common;

use std::time::Duration;

use common::cluster::*;
use common::*;
use contract::slot::{SLOTS, slot_of};

#[tokio::test]
async fn a_stale_ring_view_is_corrected_by_one_republish_and_no_loop() {
    let key = unique("ring");
    let nodes = cluster(3, &key).await;
    let ring = nodes[0].gw.ring();
    // A user owned by some node, and a slot owned by another one.
    let user = (0..)
        .map(|i| unique(&format!("s{i}")))
        .find(|u| ring.owner(slot_of(u)).unwrap().node_id == nodes[1].gw.config.node_id())
        .unwrap();
    let wrong_slot = (0..SLOTS).find(|&s| ring.owner(s).unwrap().node_id == nodes[0].gw.config.node_id()).unwrap();
    let mut ws = connect(&nodes[1], &user).await;

    // Watch what the broker carries for the user's slot.
    let conn = lapin::Connection::connect(&amqp_url(), Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let watch = unique("watch");
    let opts = lapin::options::QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    ch.queue_declare(watch.as_str().into(), opts, Default::default()).await.unwrap();
    let rk = contract::slot::routing_key(slot_of(&user));
    ch.queue_bind(
        watch.as_str().into(),
        contract::topology::EXCHANGE.into(),
        rk.as_str().into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();

    // Routed by a publisher whose ring says node 0 owns the user.
    let publisher = Publisher::new().await;
    let ev = post(&unique("stale"));
    publisher.publish_raw(wrong_slot, &contract::event::encode(&[&user], &ev)).await;
    assert_eq!(next_event(&mut ws).await, ev);
    assert_eq!(next_event_within(&mut ws, Duration::from_millis(700)).await, None, "delivered once");

    // Exactly one copy went back through the broker, marked as one hop.
    let mut copies = 0;
    while let Some(msg) = ch.basic_get(watch.as_str().into(), Default::default()).await.unwrap() {
        let hops = contract::topology::header_u64(msg.delivery.properties.headers().as_ref(), "x-hops");
        assert_eq!(hops, Some(1));
        copies += 1;
    }
    assert_eq!(copies, 1, "one re-publish");

    // A message that already hopped once is never re-published.
    let ev2 = post(&unique("hopped"));
    let mut headers = lapin::types::FieldTable::default();
    headers.insert("x-hops".into(), lapin::types::AMQPValue::LongLongInt(1));
    publisher.publish_with_headers(wrong_slot, &contract::event::encode(&[&user], &ev2), headers).await;
    assert_eq!(next_event_within(&mut ws, Duration::from_millis(700)).await, None);
    assert!(ch.basic_get(watch.as_str().into(), Default::default()).await.unwrap().is_none(), "no second hop");
}
