//! RFC 6455 as a server must behave, for what a client can send: close
//! codes (§7.4), UTF-8 in text messages and close reasons (§8.1), and the
//! opening handshake (§4.2). Raw sockets, so nothing is tidied up for us.

mod common;

use common::raw::{self, close_payload};
use common::*;

const TEXT: u8 = 0x1;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;

async fn device(node: &Node) -> raw::Raw {
    raw::open(node.addr, "/posts", &token_for(&unique("u"))).await
}

#[tokio::test]
async fn valid_close_codes_are_echoed_and_invalid_ones_get_1002() {
    let node = Node::start(|_| {}).await;
    for code in [1000u16, 1001, 1003, 1007, 1011, 3000, 3999, 4000, 4999] {
        let mut d = device(&node).await;
        d.send(true, CLOSE, &close_payload(code, b"bye")).await;
        assert_eq!(d.close_code().await, Some(code), "a client's {code} is echoed");
    }
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        let mut d = device(&node).await;
        d.send(true, CLOSE, &close_payload(code, b"")).await;
        assert_eq!(d.close_code().await, Some(1002), "a client may not send {code}");
    }
    // No code at all: answered with 1000 (never 1005 on the wire).
    let mut d = device(&node).await;
    d.send(true, CLOSE, b"").await;
    assert_eq!(d.close_code().await, Some(1000));
    wait_for("devices unregistered", || async { node.gw.sessions.device_count() == 0 }).await;
}

#[tokio::test]
async fn invalid_utf8_gets_1007() {
    let node = Node::start(|_| {}).await;
    // In a text frame.
    let mut d = device(&node).await;
    d.send(true, TEXT, &[0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xCE, 0xBC, 0xCE, 0xB5, 0xED, 0xA0, 0x80]).await;
    assert_eq!(d.close_code().await, Some(1007));
    // In a fragmented message, cut inside a character, ending short of it.
    let mut d = device(&node).await;
    d.send(false, TEXT, "κό".as_bytes()).await;
    d.send(false, CONTINUATION, &[0xCF]).await;
    d.send(true, CONTINUATION, b"").await;
    assert_eq!(d.close_code().await, Some(1007));
    // In a close reason.
    let mut d = device(&node).await;
    d.send(true, CLOSE, &close_payload(1000, &[0xFF, 0xFE])).await;
    assert_eq!(d.close_code().await, Some(1007));
    // Valid UTF-8 cut across fragments is accepted: the device stays.
    let mut d = device(&node).await;
    let text = "κόσμε".as_bytes();
    d.send(false, TEXT, &text[..3]).await;
    d.send(true, CONTINUATION, &text[3..]).await;
    d.send(true, 0x9, b"still here?").await;
    assert_eq!(d.frame_within(WAIT).await, Some((0xA, b"still here?".to_vec())));
}

#[tokio::test]
async fn the_handshake_is_checked() {
    let node = Node::start(|_| {}).await;
    let auth = format!("authorization: Bearer {}\r\n", token_for(&unique("u")));
    let head = |version: &str, key: &str, http: &str| {
        format!(
            "GET /posts {http}\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-version: {version}\r\nsec-websocket-key: {key}\r\n{auth}\r\n"
        )
    };
    // A version other than 13: 426, naming the one supported.
    let (status, answer, _) = raw::request(node.addr, &head("8", raw::KEY, "HTTP/1.1")).await;
    assert_eq!(status, 426, "{answer}");
    assert!(answer.to_ascii_lowercase().contains("sec-websocket-version: 13\r\n"), "{answer}");
    // HTTP/1.0 has no upgrade.
    let (status, answer, _) = raw::request(node.addr, &head("13", raw::KEY, "HTTP/1.0")).await;
    assert_eq!(status, 400, "{answer}");
    // Keys that are not 16 bytes in base64.
    for key in ["c2hvcnQ=", "not base64 at all!", "dGhlIHNhbXBsZSBub25jZSE=", ""] {
        let (status, answer, _) = raw::request(node.addr, &head("13", key, "HTTP/1.1")).await;
        assert_eq!(status, 400, "key {key:?}: {answer}");
    }
    let (status, answer, _) = raw::request(node.addr, &head("13", raw::KEY, "HTTP/1.1")).await;
    assert_eq!(status, 101, "{answer}");
    assert!(answer.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "RFC 6455's sample accept value: {answer}");
}
