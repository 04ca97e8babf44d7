//! Limits before authentication: a cap and a deadline for connections that
//! have not upgraded, a per-address cap, and a rate limit on client frames.

mod common;

use std::time::{Duration, Instant};

use common::raw;
use common::*;
use tokio::net::{TcpSocket, TcpStream};

/// Idle sockets (connected, never a byte) beyond the unauthenticated cap
/// are refused at once, so a real device still gets in although they
/// number more than the node's whole connection cap.
#[tokio::test]
async fn sockets_that_never_authenticate_cannot_keep_devices_out() {
    let node = Node::start(|c| {
        c.max_connections = 12;
        c.max_unauthenticated = 3;
        c.handshake_timeout = Duration::from_secs(30);
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(TcpStream::connect(node.addr).await.unwrap());
    }
    wait_for("the idle sockets are accepted", || async {
        node.gw.pending_sockets.load(std::sync::atomic::Ordering::Relaxed) == 3
    })
    .await;
    // Nine of the twelve were refused at once; while the three hold the
    // unauthenticated cap, a newcomer gets 503 too...
    let (status, _, _) = raw::request(node.addr, &raw::upgrade_head("/posts", "")).await;
    assert_eq!(status, 503, "the unauthenticated cap is full");
    // ...but the node's connection cap is far from full, so as soon as one
    // idle socket goes, a device gets in.
    idle.truncate(2);
    let mut device = raw::open(node.addr, "/posts", &token_for(&unique("u"))).await;
    device.send(true, 0x9, b"hi").await;
    assert_eq!(device.frame_within(WAIT).await, Some((0xA, b"hi".to_vec())));
    assert_eq!(node.gw.sessions.device_count(), 1);
}

#[tokio::test]
async fn a_connection_that_does_not_finish_its_handshake_in_time_is_closed() {
    let node = Node::start(|c| c.handshake_timeout = Duration::from_millis(500)).await;
    // Half a request head, then nothing.
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /posts HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut r = raw::Raw { s, buf: Vec::new() };
    let started = Instant::now();
    assert!(r.ended_within(Duration::from_secs(4)).await, "closed by the handshake deadline");
    println!("half-open handshake closed after {:?}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[tokio::test]
async fn one_address_holds_at_most_its_limit() {
    let node = Node::start(|c| c.max_connections_per_ip = 2).await;
    let from = |ip: &str| {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        s
    };
    let token = token_for(&unique("u"));
    let mut first = raw::open(node.addr, "/posts", &token).await;
    let _second = raw::open(node.addr, "/posts", &token).await;
    // A third from 127.0.0.1: refused with 503 before anything is read.
    let (status, head, _) = raw::request(node.addr, &raw::upgrade_head("/posts", "")).await;
    assert_eq!(status, 503, "{head}");
    // Another address is not affected.
    let mut s = from("127.0.0.2").connect(node.addr).await.unwrap();
    let head = raw::upgrade_head("/posts", &format!("authorization: Bearer {token}\r\n"));
    tokio::io::AsyncWriteExt::write_all(&mut s, head.as_bytes()).await.unwrap();
    let mut other = raw::Raw { s, buf: Vec::new() };
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 512];
        let n = tokio::io::AsyncReadExt::read(&mut other.s, &mut chunk).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&got));
    // When one of the first two goes, 127.0.0.1 has room again.
    first.send(true, 0x8, &raw::close_payload(1000, b"")).await;
    assert_eq!(first.close_code().await, Some(1000));
    drop(first);
    wait_for("room again for 127.0.0.1", || async {
        let token = token_for(&unique("v"));
        raw::request(node.addr, &raw::upgrade_head("/posts", &format!("authorization: Bearer {token}\r\n"))).await.0
            == 101
    })
    .await;
}

#[tokio::test]
async fn a_device_flooding_frames_is_closed_with_1008() {
    let node = Node::start(|c| c.max_client_frames_per_sec = 20).await;
    let mut d = raw::open(node.addr, "/posts", &token_for(&unique("u"))).await;
    // Pings within the limit are answered.
    for _ in 0..10 {
        d.send(true, 0x9, b"").await;
        loop {
            // The node's own pings (opcode 9) may come in between.
            match d.frame_within(WAIT).await.map(|f| f.0) {
                Some(0xA) => break,
                Some(0x9) => {}
                other => panic!("expected a pong, got {other:?}"),
            }
        }
    }
    // A flood is not.
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.extend(raw::client_frame(true, 0x9, b""));
    }
    tokio::io::AsyncWriteExt::write_all(&mut d.s, &flood).await.unwrap();
    assert_eq!(d.close_code().await, Some(1008));
    wait_for("device unregistered", || async { node.gw.sessions.device_count() == 0 }).await;
}
