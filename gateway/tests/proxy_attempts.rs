//! A device entering a node that does not own it and could not be relayed
//! is counted in `gateway_connections_opened_total` by why: the owner
//! refused it, or it could not be dialled. In-process
//! nodes share one registry, so the deltas are read from either node; each
//! test counts a result of its own.

mod common;

use common::cluster::wait_converged;
use common::raw;
use common::*;

/// Two converged nodes on a ring of their own, the second set up by
/// `owner_tweak`, and a user the second one owns.
async fn entry_and_owner(owner_tweak: impl FnOnce(&mut gateway::Config)) -> ([Node; 2], String) {
    let key = unique("ring");
    let k = key.clone();
    let entry = Node::start(move |c| c.membership_key = k).await;
    let owner = Node::start(move |c| {
        c.membership_key = key;
        owner_tweak(c);
    })
    .await;
    let nodes = [entry, owner];
    wait_converged(&nodes).await;
    let user = (0..)
        .map(|i| format!("u{i}-{}", unique("p")))
        .find(|u| nodes[0].gw.owner_of(u).is_some_and(|(mine, _)| !mine))
        .unwrap();
    (nodes, user)
}

fn attempts(result: &str) -> String {
    format!("gateway_connections_opened_total{{result=\"{result}\"}}")
}

#[tokio::test]
async fn an_owners_refusal_is_counted_as_proxy_owner_refused() {
    // One socket per address at the owner: this test's idle socket takes it.
    let (nodes, user) = entry_and_owner(|c| {
        c.max_connections_per_ip = 1;
        c.handshake_timeout = std::time::Duration::from_secs(60);
    })
    .await;
    let _hog = tokio::net::TcpStream::connect(nodes[1].addr).await.unwrap();
    wait_for("the owner counts the idle socket", || async { nodes[1].gw.per_address.len() == 1 }).await;
    let before = raw::metric(nodes[0].addr, &attempts("proxy_owner_refused")).await;
    let head = raw::upgrade_head("/posts", &format!("authorization: Bearer {}\r\n", token_for(&user)));
    let (status, answer, _) = raw::request(nodes[0].addr, &head).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(raw::metric(nodes[0].addr, &attempts("proxy_owner_refused")).await - before, 1.0);
}

/// The owner's internal address refuses connections (port 1 on loopback:
/// nothing listens there); its heartbeat is on time, so it stays a member.
#[tokio::test]
async fn an_owner_that_cannot_be_dialled_is_counted_as_proxy_owner_unreachable() {
    let (nodes, user) = entry_and_owner(|c| c.internal_url = Some("ws://127.0.0.1:1".into())).await;
    let before = raw::metric(nodes[0].addr, &attempts("proxy_owner_unreachable")).await;
    let head = raw::upgrade_head("/posts", &format!("authorization: Bearer {}\r\n", token_for(&user)));
    let (status, answer, _) = raw::request(nodes[0].addr, &head).await;
    assert_eq!(status, 502, "{answer}");
    assert_eq!(raw::metric(nodes[0].addr, &attempts("proxy_owner_unreachable")).await - before, 1.0);
}
