//! A node that shuts down closes the devices it proxies to other owners
//! with 1001 too (at a frame boundary of the owner's stream), so its stop
//! does not wait out the grace on them.

mod common;

use std::time::{Duration, Instant};

use common::cluster::cluster;
use common::*;
use contract::slot::slot_of;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn a_stopping_node_closes_its_proxied_devices_with_1001() {
    let key = unique("ring");
    let mut nodes = cluster(2, &key).await;
    let ring = nodes[0].gw.ring();
    let owner = nodes[1].gw.config.node_id().to_owned();
    let user =
        (0..).map(|i| unique(&format!("p{i}"))).find(|u| ring.owner(slot_of(u)).unwrap().node_id == owner).unwrap();
    let mut ws = connect(&nodes[0], &user).await;
    wait_for("the owner holds the proxied device", || async { nodes[1].gw.sessions.device_count_of(&user) == 1 }).await;
    let ev = post(&unique("before"));
    Publisher::new().await.publish(&[&user], &ev).await;
    assert_eq!(next_event(&mut ws).await, ev, "served through the proxy");

    let mut entry = nodes.remove(0);
    let started = Instant::now();
    let stopping = tokio::spawn(async move { entry.stop().await });
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close.expect("a close frame, not a cut").code, CloseCode::Away);
    stopping.await.unwrap();
    let took = started.elapsed();
    eprintln!("proxying node stopped in {:.2}s (grace {:?})", took.as_secs_f64(), Duration::from_secs(10));
    assert!(took < Duration::from_secs(10), "the stop waited out the grace: {took:?}");
}
