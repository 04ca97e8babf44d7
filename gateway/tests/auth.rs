//! Every kind of bad token gets 401 with a JSON message, and no upgrade.

mod common;

use common::*;
use contract::token::{Claims, unix_now};

fn upgrade_request(path: &str, auth_header: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth_header}\r\n"
    )
}

async fn assert_refused(node: &Node, path: &str, header: &str, why: &str) {
    let (status, body) = raw_request(node.addr, &upgrade_request(path, header)).await;
    assert_eq!(status, 401, "{why}: expected 401, got {status} {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{why}: body not JSON: {body}"));
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{why}: no message in {body}");
}

#[tokio::test]
async fn bad_tokens_get_401_and_no_upgrade() {
    let node = Node::start(|_| {}).await;
    let now = unix_now();
    let tokens = tokens();
    let expired = tokens.encode(&Claims { sub: "u".into(), iat: now - 7200, exp: now - 3600 });
    let forged = contract::token::Tokens::new(b"not-the-secret-at-all!").issue("u", std::time::Duration::from_secs(60));
    // {"alg":"none"} with no signature.
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1IiwiaWF0IjoxLCJleHAiOjk5OTk5OTk5OTl9.";
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &Claims { sub: "u".into(), iat: now, exp: now + 600 },
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();

    let path = "/post/feed/posted";
    assert_refused(&node, path, "", "missing").await;
    assert_refused(&node, path, &format!("authorization: Bearer {expired}\r\n"), "expired").await;
    assert_refused(&node, path, &format!("authorization: Bearer {forged}\r\n"), "forged").await;
    assert_refused(&node, path, &format!("x-auth: {none}\r\n"), "alg none").await;
    assert_refused(&node, "/posts", &format!("x-auth: Bearer {hs512}\r\n"), "HS512").await;
    assert_refused(&node, &format!("/posts?token={forged}"), "", "forged in query").await;
    assert_refused(&node, path, "authorization: Basic dTpw\r\n", "not bearer").await;
    assert_refused(&node, path, "authorization: Bearer not.a.jwt\r\n", "garbage").await;

    // The node counted them and holds no device.
    let (_, metrics) = http_get(node.addr, "/metrics").await;
    assert!(metrics.contains("gateway_connections_opened_total{result=\"unauthorized\"}"));
    assert_eq!(node.gw.sessions.device_count(), 0);
}

#[tokio::test]
async fn a_valid_token_without_upgrade_headers_gets_426() {
    let node = Node::start(|_| {}).await;
    let req = format!(
        "GET /posts HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
        token_for("u")
    );
    let (status, body) = raw_request(node.addr, &req).await;
    assert_eq!(status, 426, "{body}");
}
