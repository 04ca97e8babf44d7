//! Three nodes: every slot bound exactly once by its owner; any entry node works.
//! (Each multi-node test has a binary of its own: a test process has one
//! RabbitMQ vhost, `common::vhost`, and clusters in it bind every slot of
//! its one exchange, so concurrent clusters would see each other's messages,
//! which a single deployment never does.)

mod common;

use common::cluster::*;
use common::*;
use contract::membership;
use contract::ring::Ring;
use contract::slot::SLOTS;

#[tokio::test]
async fn three_nodes_bind_each_slot_once_and_deliver_wherever_a_user_connects() {
    let key = unique("ring");
    let nodes = cluster(3, &key).await;
    let ring = Ring::new(membership::fetch(&mut redis_conn().await, &key).await.unwrap());
    assert_eq!(ring.members().len(), 3);
    // Every node's own view (over HTTP) is the ring computed here.
    for n in &nodes {
        let (_, body) = http_get(n.addr, "/v1/ring").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let owners: Vec<String> = serde_json::from_value(v["owners"].clone()).unwrap();
        let expected: Vec<String> = (0..SLOTS).map(|s| ring.owner(s).unwrap().node_id.clone()).collect();
        assert_eq!(owners, expected);
    }
    wait_bindings_match(&nodes, &ring).await;

    // 30 users, each entering through node i % 3: most are proxied.
    let users: Vec<String> = (0..30).map(|i| unique(&format!("u{i}"))).collect();
    let mut devices = Vec::new();
    for (i, u) in users.iter().enumerate() {
        devices.push(connect(&nodes[i % 3], u).await);
    }
    let publisher = Publisher::new().await;
    let ev = post(&unique("post"));
    let mut redis = redis_conn().await;
    post_like_backend(&mut redis, &publisher, &ring, &users, &ev).await;
    for d in &mut devices {
        assert_eq!(next_event(d).await, ev);
    }
    let proxied: usize = nodes.iter().map(|n| n.gw.sessions.device_count()).sum();
    assert_eq!(proxied, 30, "each device is held once, by its owner");
    for n in &nodes {
        for u in &users {
            let owns = n.gw.owner_of(u).unwrap().0;
            let holds = n.gw.sessions.device_count_of(u);
            assert_eq!(holds, usize::from(owns), "{u} must be held by its owner only");
        }
    }
}
