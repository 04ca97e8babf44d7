//! A take-over of a departed node's queue that a lost broker connection
//! interrupts is resumed on the next connection: what waited in that queue
//! still reaches its devices, and the queue goes away.

mod common;

use std::time::Duration;

use common::cluster::*;
use common::*;
use contract::slot::slot_of;
use contract::topology::node_queue;

#[tokio::test]
async fn a_take_over_cut_short_by_a_broker_connection_loss_is_resumed_after_the_reconnect() {
    let key = unique("ring");
    let proxy = AmqpProxy::start().await;
    let (k, url) = (key.clone(), proxy.url());
    let a = Node::start(move |c| {
        c.membership_key = k;
        c.amqp_url = url;
    })
    .await;
    let k = key.clone();
    let b = Node::start(move |c| c.membership_key = k).await;
    let mut nodes = vec![a, b];
    wait_converged(&nodes).await;
    let a_id = nodes[0].gw.config.node_id().to_owned();
    // A user that stays on `a` throughout.
    let ring = nodes[0].gw.ring();
    let user =
        (0..).map(|i| unique(&format!("t{i}"))).find(|u| ring.owner(slot_of(u)).unwrap().node_id == a_id).unwrap();
    let mut ws = connect(&nodes[0], &user).await;

    // `b` leaves; `a` takes its queue over, and loses the broker at once.
    let b_queue = node_queue(nodes[1].gw.config.node_id(), nodes[1].gw.incarnation());
    let mut b = nodes.pop().unwrap();
    b.stop().await;
    wait_for("a adopted the ring without b", || async { nodes[0].gw.ring().members().len() == 1 }).await;
    assert!(proxy.kill_all() > 0, "a's broker connection cut");

    // Something routed to `b` before `a` bound its slots waits in b's queue.
    let conn = lapin::Connection::connect(&amqp_url(), Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let ev = post(&unique("waiting"));
    ch.basic_publish(
        "".into(),
        b_queue.as_str().into(),
        Default::default(),
        &contract::event::encode(&[&user], &ev),
        Default::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    // Reconnected, `a` resumes the take-over: the event arrives, the queue goes.
    assert_eq!(next_event_within(&mut ws, Duration::from_secs(15)).await, Some(ev), "drained after the reconnect");
    wait_for("b's old queue deleted", || async { !queues().await.contains(&b_queue) }).await;
}
