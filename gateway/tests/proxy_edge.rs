//! The proxy passes an owner's refusal on whole: status, body and its
//! end-to-end headers (`Retry-After`).

mod common;

use common::raw;
use common::*;

#[tokio::test]
async fn an_owners_refusal_reaches_the_client_with_its_headers() {
    // The owner lets one address hold one socket: this test's idle socket
    // takes it, so the proxy's dial (from the same address) gets 503.
    let (nodes, user) = entry_and_owner(|c| {
        c.max_connections_per_ip = 1;
        c.handshake_timeout = std::time::Duration::from_secs(60);
    })
    .await;
    let _hog = tokio::net::TcpStream::connect(nodes[1].addr).await.unwrap();
    wait_for("the owner counts the idle socket", || async { nodes[1].gw.per_address.len() == 1 }).await;
    let head = raw::upgrade_head("/posts", &format!("authorization: Bearer {}\r\n", token_for(&user)));
    let (status, answer, _) = raw::request(nodes[0].addr, &head).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"), "Retry-After passed on: {answer}");
}

/// Behind TLS, an owner advertises `wss://` to clients (an address the
/// nodes cannot dial) and its internal `ws://` address to other nodes: the
/// proxy dials the internal one, and a device entering elsewhere is upgraded.
#[tokio::test]
async fn the_proxy_dials_the_owners_internal_url_not_its_wss_url() {
    let (nodes, user) = entry_and_owner(|c| {
        c.internal_url = c.advertise_url.take();
        // Port 1 on loopback: nothing listens there, and it is not ws://.
        c.advertise_url = Some("wss://127.0.0.1:1".into());
    })
    .await;
    assert!(nodes[0].gw.owner_of(&user).unwrap().1.url.starts_with("wss://"), "the owner advertises wss://");
    let head = raw::upgrade_head("/posts", &format!("authorization: Bearer {}\r\n", token_for(&user)));
    let (status, answer, _) = raw::request(nodes[0].addr, &head).await;
    assert_eq!(status, 101, "proxied through the internal URL: {answer}");
}
