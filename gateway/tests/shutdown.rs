//! Graceful shutdown: devices get 1001 (reconnect elsewhere), the node
//! stops accepting and deletes its queue. (That frames queued before the
//! close are written first is `outbox`'s unit test.)

mod common;

use common::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn shutdown_sends_1001_to_every_device_and_leaves_the_broker() {
    let mut node = Node::start(|_| {}).await;
    let queue = contract::topology::node_queue(node.gw.config.node_id(), node.gw.incarnation());
    let (a, b) = (unique("a"), unique("b"));
    let mut a1 = connect(&node, &a).await;
    let mut a2 = connect(&node, &a).await;
    let mut b1 = connect(&node, &b).await;
    let ev = post(&unique("post"));
    Publisher::new().await.publish(&[&a, &b], &ev).await;
    for ws in [&mut a1, &mut a2, &mut b1] {
        assert_eq!(next_event(ws).await, ev);
    }

    let addr = node.addr;
    let stopping = tokio::spawn(async move {
        node.stop().await;
    });
    for ws in [&mut a1, &mut a2, &mut b1] {
        let (events, close) = read_until_close(ws).await;
        assert!(events.is_empty(), "nothing new was published");
        assert_eq!(close.expect("close frame").code, CloseCode::Away);
    }
    stopping.await.unwrap();

    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the node stopped accepting");
    let conn = lapin::Connection::connect(&amqp_url(), Default::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let gone = ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await;
    assert!(gone.is_err(), "queue {queue} should be deleted on a clean stop");
}
