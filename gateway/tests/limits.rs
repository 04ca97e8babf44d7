//! Limits: oversized client frames (1009), slow devices (4008), too many
//! devices (4029), silent peers and expired tokens.

mod common;

use std::time::Duration;

use common::*;
use contract::token::{Claims, unix_now};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn oversized_client_frame_closes_with_1009() {
    let node = Node::start(|c| c.max_client_frame = 4096).await;
    let mut ws = connect(&node, &unique("u")).await;
    // A frame at the limit is fine; one byte more is not.
    send_text(&mut ws, "x".repeat(4096)).await;
    send_text(&mut ws, "x".repeat(4097)).await;
    let (_, close) = read_until_close(&mut ws).await;
    assert_eq!(close.expect("close frame").code, CloseCode::Size);
    wait_for("device unregistered", || async { node.gw.sessions.device_count() == 0 }).await;
}

#[tokio::test]
async fn slow_device_gets_4008_while_a_healthy_device_keeps_receiving() {
    const EVENTS: usize = 600;
    const QUEUE: usize = 16;
    const WINDOW: usize = QUEUE / 2;
    let node = Node::start(|c| c.send_queue = QUEUE).await;
    let user = unique("u");
    let mut healthy = connect(&node, &user).await;

    // The slow device never reads until told; a tiny receive buffer (which
    // also turns off autotuning) makes the backlog reach the gateway soon.
    let stream = small_window_stream(node.addr).await;
    let mut req = node.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {}", token_for(&user)).parse().unwrap());
    let (mut slow, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    wait_for("two devices", || async { node.gw.sessions.device_count() == 2 }).await;

    let slow_closed = "gateway_connections_closed_total{reason=\"slow_consumer\"}";
    let closed_before = common::raw::metric(node.addr, slow_closed).await;
    let publisher = Publisher::new().await;
    let big_text = "x".repeat(16 * 1024);
    let mut ids = Vec::new();
    // How many events the healthy device has read: the publisher keeps
    // within half its send queue of it, so on a loaded machine the healthy
    // device (which reads as fast as it is scheduled) is never the one that
    // falls behind, while the slow one, reading nothing, does.
    let read = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = tokio::spawn({
        let read = read.clone();
        async move {
            let mut got = Vec::new();
            while got.len() < EVENTS {
                got.push(next_event(&mut healthy).await.id);
                read.store(got.len(), std::sync::atomic::Ordering::Relaxed);
            }
            got
        }
    });
    for i in 0..EVENTS {
        if i >= WINDOW {
            wait_for("the healthy device to keep up", || async {
                read.load(std::sync::atomic::Ordering::Relaxed) >= i - WINDOW
            })
            .await;
        }
        let mut ev = post(&format!("{user}-{i}"));
        ev.data.post_text = big_text.clone();
        publisher.publish(&[&user], &ev).await;
        ids.push(ev.id);
    }
    // Every event reached the healthy device, in order.
    assert_eq!(reader.await.unwrap(), ids);

    // The slow device, once it reads, finds a prefix of the events and 4008.
    let (events, close) = read_until_close(&mut slow).await;
    assert_eq!(close.expect("close frame").code, CloseCode::from(4008));
    assert!(events.len() < EVENTS, "the slow device should have lost its backlog");
    let got: Vec<_> = events.into_iter().map(|e| e.id).collect();
    assert_eq!(got, ids[..got.len()], "what did arrive is in order and without gaps");
    // Counted (the registry is shared by this process's nodes: at least one).
    let counted = common::raw::metric(node.addr, slow_closed).await - closed_before;
    assert!(counted >= 1.0, "slow-consumer closes counted: {counted}");
}

#[tokio::test]
async fn device_over_the_per_user_limit_is_closed_with_4029() {
    let node = Node::start(|c| c.max_devices_per_user = 2).await;
    let user = unique("u");
    let mut first = connect(&node, &user).await;
    let _second = connect(&node, &user).await;
    let mut third = connect(&node, &user).await;
    let (_, close) = read_until_close(&mut third).await;
    assert_eq!(close.expect("close frame").code, CloseCode::from(4029));
    // The first two are untouched.
    let ev = post(&unique("post"));
    Publisher::new().await.publish(&[&user], &ev).await;
    assert_eq!(next_event(&mut first).await, ev);
    assert_eq!(node.gw.sessions.device_count(), 2);
}

#[tokio::test]
async fn silent_peer_is_pinged_then_dropped() {
    let node = Node::start(|c| c.ping_interval = Duration::from_millis(200)).await;
    // A raw client that completes the handshake and then never answers.
    let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let req = format!(
        "GET /posts HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
         sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         authorization: Bearer {}\r\n\r\n",
        token_for(&unique("u"))
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read_all).await.expect("the node drops a silent peer");
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    let frames = &seen[text.find("\r\n\r\n").unwrap() + 4..];
    assert!(frames.windows(2).any(|w| w == [0x89, 0x00]), "no ping was sent: {frames:?}");
    wait_for("device unregistered", || async { node.gw.sessions.device_count() == 0 }).await;
}

#[tokio::test]
async fn answering_peer_stays_and_expired_token_closes_with_1008() {
    let node = Node::start(|c| c.ping_interval = Duration::from_millis(200)).await;
    let user = unique("u");
    let now = unix_now();
    let short = tokens().encode(&Claims { sub: user.clone(), iat: now, exp: now + 2 });
    let url = format!("{}?token={short}", node.ws_url());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    // tungstenite answers pings while we read: the device must survive many
    // ping intervals, then be closed with 1008 when its token expires.
    let started = std::time::Instant::now();
    let close = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(c))) => break c,
            Some(Ok(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(close.expect("close frame").code, CloseCode::Policy);
    assert!(started.elapsed() >= Duration::from_millis(900), "closed before the token expired");
}

/// With the default send queue, a device that stops reading is closed soon
/// after it falls behind: the kernel send buffer is bounded, so the queue
/// overflows after about 512 events instead of after megabytes more.
#[tokio::test]
async fn a_device_that_stops_reading_is_closed_within_seconds() {
    const EVENTS: usize = 700;
    let node = Node::start(|_| {}).await;
    let user = unique("u");
    let stream = small_window_stream(node.addr).await;
    let mut req = node.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {}", token_for(&user)).parse().unwrap());
    let (_stalled, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    wait_for("the device", || async { node.gw.sessions.device_count() == 1 }).await;

    let slow = "gateway_connections_closed_total{reason=\"slow_consumer\"}";
    let slow_before = common::raw::metric(node.addr, slow).await;
    let publisher = Publisher::new().await;
    let started = std::time::Instant::now();
    let mut closed_after = None;
    for i in 0..EVENTS {
        let mut ev = post(&format!("{user}-{i}"));
        ev.data.post_text = "x".repeat(16 * 1024);
        publisher.publish(&[&user], &ev).await;
        if node.gw.sessions.device_count() == 0 {
            closed_after = Some((i + 1, started.elapsed()));
            break;
        }
    }
    if closed_after.is_none() {
        wait_for("the stalled device closed", || async { node.gw.sessions.device_count() == 0 }).await;
        closed_after = Some((EVENTS, started.elapsed()));
    }
    let (events, took) = closed_after.unwrap();
    let how =
        if common::raw::metric(node.addr, slow).await > slow_before { "4008 (queue full)" } else { "write stall" };
    println!("stalled device closed by {how} after {events} events of 16 KB, {took:?} after the first");
    // Well under the old ~15 s stall (plus megabytes of kernel buffer).
    assert!(took < std::time::Duration::from_secs(10), "closed only after {took:?}");
}
