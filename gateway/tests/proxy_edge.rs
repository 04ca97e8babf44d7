//! The proxy passes an owner's refusal on whole: status, body and its
//! end-to-end headers (`Retry-After`).

mod common;

use common::cluster::wait_converged;
use common::raw;
use common::*;

#[tokio::test]
async fn an_owners_refusal_reaches_the_client_with_its_headers() {
    let key = unique("ring");
    let k = key.clone();
    let entry = Node::start(move |c| c.membership_key = k).await;
    // The owner lets one address hold one socket: this test's idle socket
    // takes it, so the proxy's dial (from the same address) gets 503.
    let k = key.clone();
    let owner = Node::start(move |c| {
        c.membership_key = k;
        c.max_connections_per_ip = 1;
        c.handshake_timeout = std::time::Duration::from_secs(60);
    })
    .await;
    let nodes = [entry, owner];
    wait_converged(&nodes).await;
    let user = (0..)
        .map(|i| format!("u{i}-{}", unique("p")))
        .find(|u| nodes[0].gw.owner_of(u).is_some_and(|(mine, _)| !mine))
        .unwrap();
    let _hog = tokio::net::TcpStream::connect(nodes[1].addr).await.unwrap();
    wait_for("the owner counts the idle socket", || async { nodes[1].gw.per_address.len() == 1 }).await;
    let head = raw::upgrade_head("/posts", &format!("authorization: Bearer {}\r\n", token_for(&user)));
    let (status, answer, _) = raw::request(nodes[0].addr, &head).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"), "Retry-After passed on: {answer}");
}
