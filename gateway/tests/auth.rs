//! Every kind of bad token gets 401 with a JSON message, and no upgrade.

mod common;

use common::raw::metric;
use common::*;
use contract::token::{Claims, unix_now};

const UNAUTHORIZED: &str = "gateway_connections_opened_total{result=\"unauthorized\"}";

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
    let before = metric(node.addr, UNAUTHORIZED).await;
    assert_refused(&node, path, "", "missing").await;
    assert_refused(&node, path, &format!("authorization: Bearer {expired}\r\n"), "expired").await;
    assert_refused(&node, path, &format!("authorization: Bearer {forged}\r\n"), "forged").await;
    assert_refused(&node, path, &format!("x-auth: {none}\r\n"), "alg none").await;
    assert_refused(&node, "/posts", &format!("x-auth: Bearer {hs512}\r\n"), "HS512").await;
    assert_refused(&node, &format!("/posts?token={forged}"), "", "forged in query").await;
    assert_refused(&node, path, "authorization: Basic dTpw\r\n", "not bearer").await;
    assert_refused(&node, path, "authorization: Bearer not.a.jwt\r\n", "garbage").await;

    // The node counted them (other tests of this process share the
    // registry, so at least these eight) and holds no device.
    let counted = metric(node.addr, UNAUTHORIZED).await - before;
    assert!(counted >= 8.0, "8 refusals counted as {counted}");
    assert_eq!(node.gw.sessions.device_count(), 0);
}

/// A token that is valid alone, in the wrong company: two different tokens
/// in any two places (or one place twice) are refused, identical copies are
/// one token.
#[tokio::test]
async fn two_different_tokens_get_401_in_any_combination() {
    let node = Node::start(|_| {}).await;
    let (a, b) = (token_for(&unique("a")), token_for(&unique("b")));
    let p = "/posts";
    let q = |t: &str| format!("/posts?token={t}");
    let cases = [
        (p.to_owned(), format!("authorization: Bearer {a}\r\nx-auth: {b}\r\n"), "authorization and x-auth"),
        (q(&b), format!("authorization: Bearer {a}\r\n"), "authorization and query"),
        (q(&b), format!("x-auth: Bearer {a}\r\n"), "x-auth and query"),
        (p.to_owned(), format!("authorization: Bearer {a}\r\nauthorization: Bearer {b}\r\n"), "two authorization"),
        (p.to_owned(), format!("x-auth: {a}\r\nx-auth: {b}\r\n"), "two x-auth"),
        (format!("/posts?token={a}&token={b}"), String::new(), "two in the query"),
    ];
    for (path, headers, why) in &cases {
        assert_refused(&node, path, headers, why).await;
    }
    // The same token in every place is fine.
    let same = raw::upgrade_head(&q(&a), &format!("authorization: Bearer {a}\r\nx-auth: {a}\r\n"));
    let (status, head, _raw) = raw::request(node.addr, &same).await;
    assert_eq!(status, 101, "{head}");
}

fn signed(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn future_overlong_and_odd_subject_tokens_get_401() {
    let node = Node::start(|c| c.max_token_lifetime = std::time::Duration::from_secs(3600)).await;
    let now = unix_now();
    let bearer = |t: String| format!("authorization: Bearer {t}\r\n");
    let future_iat = signed(serde_json::json!({"sub": "u", "iat": now + 120, "exp": now + 600}));
    let future_nbf = signed(serde_json::json!({"sub": "u", "iat": now, "nbf": now + 120, "exp": now + 600}));
    let overlong = signed(serde_json::json!({"sub": "u", "iat": now, "exp": now + 3601}));
    assert_refused(&node, "/posts", &bearer(future_iat), "iat in the future").await;
    assert_refused(&node, "/posts", &bearer(future_nbf), "nbf in the future").await;
    assert_refused(&node, "/posts", &bearer(overlong), "lifetime over the limit").await;
    for sub in ["a/b", "a|b", "a\u{1}b", "a b", "ü"] {
        let t = signed(serde_json::json!({"sub": sub, "iat": now, "exp": now + 60}));
        assert_refused(&node, "/posts", &bearer(t), &format!("sub {sub:?}")).await;
    }
    // At the limit, and with an nbf already passed, it is fine.
    let ok = signed(serde_json::json!({"sub": "u.v-w_1", "iat": now, "nbf": now - 1, "exp": now + 3600}));
    let (status, head, _raw) = raw::request(node.addr, &raw::upgrade_head("/posts", &bearer(ok))).await;
    assert_eq!(status, 101, "{head}");
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
