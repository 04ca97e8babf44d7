//! A device that stops reading (a raw socket with a 4 KiB receive buffer
//! that reads nothing) is closed with 4008 within seconds of falling
//! behind, whether it falls behind fast (its send queue overflows) or
//! slowly (its socket takes nothing for the write-stall timeout). The close
//! frame waits in the kernel: once the device reads again it finds a
//! prefix of its events, in order, then 4008. The user's other device and
//! other users lose nothing.

mod common;

use std::time::{Duration, Instant};

use common::raw::{Raw, upgrade_head};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SLOW_CLOSES: &str = "gateway_connections_closed_total{reason=\"slow_consumer\"}";
/// Event text size: a few events fill the stalled device's kernel buffers.
const TEXT: usize = 16 * 1024;

/// Upgrades on a socket with a tiny receive buffer (which also turns off
/// the kernel's autotuning), then reads nothing until told.
async fn stalled_device(node: &Node, user: &str) -> Raw {
    let mut s = small_window_stream(node.addr).await;
    let head = upgrade_head("/posts", &format!("authorization: Bearer {}\r\n", token_for(user)));
    s.write_all(head.as_bytes()).await.unwrap();
    // Byte by byte, so nothing past the answer head is read.
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "closed during the handshake");
        got.push(b[0]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&got));
    Raw { s, buf: Vec::new() }
}

/// Reads the stalled device's backlog: the event ids before the close
/// frame and the close code (`None`: the socket ended without one).
async fn read_backlog(raw: &mut Raw) -> (Vec<String>, Option<u16>) {
    let mut ids = Vec::new();
    while let Some((op, payload)) = raw.frame_within(WAIT).await {
        match op {
            0x1 => ids.push(serde_json::from_slice::<contract::event::PostEvent>(&payload).expect("an event").id),
            0x8 => return (ids, Some(u16::from_be_bytes([payload[0], payload[1]]))),
            _ => {}
        }
    }
    (ids, None)
}

/// What both ways of falling behind end with: only the slow device gone
/// (`left` devices stay), its close counted, and on its socket a prefix
/// of the events, in order and not all of them, then a 4008 close frame.
async fn assert_closed_slow(node: &Node, slow: &mut Raw, left: usize, closes_before: f64, ids: &[String]) {
    assert_eq!(node.gw.sessions.device_count(), left, "only the slow device was closed");
    assert!(raw::metric(node.addr, SLOW_CLOSES).await - closes_before >= 1.0, "the close is counted");
    let (got, code) = read_backlog(slow).await;
    assert_eq!(code, Some(4008), "after {} events", got.len());
    assert!(got.len() < ids.len(), "the backlog was dropped");
    assert_eq!(got, ids[..got.len()], "what arrived is a prefix, in order");
}

fn big_post(id: String) -> contract::event::PostEvent {
    let mut ev = post(&id);
    ev.data.post_text = "x".repeat(TEXT);
    ev
}

/// Publishes `n` big events to `user` and, in the same messages, `other`.
/// Returns their ids.
async fn publish(publisher: &Publisher, user: &str, other: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let ev = big_post(unique("p"));
        publisher.publish(&[user, other], &ev).await;
        ids.push(ev.id);
    }
    ids
}

/// Reads `n` events from a healthy device while the test publishes, and
/// hands the device back (still connected).
fn reader(mut ws: Ws, n: usize) -> tokio::task::JoinHandle<(Vec<String>, Ws)> {
    tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < n {
            got.push(next_event(&mut ws).await.id);
        }
        (got, ws)
    })
}

/// The queue overflows: the device is closed at once, and 4008 reaches
/// the wire once it reads again.
#[tokio::test]
async fn a_device_flooded_while_not_reading_gets_4008_within_seconds() {
    // Enough to overflow the default 512-frame queue with the kernel
    // buffers full.
    const EVENTS: usize = 700;
    let node = Node::start(|_| {}).await;
    let (user, other) = (unique("u"), unique("o"));
    let healthy = connect(&node, &user).await;
    let bystander = connect(&node, &other).await;
    let mut slow = stalled_device(&node, &user).await;
    wait_for("three devices", || async { node.gw.sessions.device_count() == 3 }).await;
    let closes_before = raw::metric(node.addr, SLOW_CLOSES).await;

    let (healthy, bystander) = (reader(healthy, EVENTS), reader(bystander, EVENTS));
    let publisher = Publisher::new().await;
    let started = Instant::now();
    let ids = publish(&publisher, &user, &other, EVENTS).await;
    let published_in = started.elapsed();
    wait_for_within("the slow device closed", Duration::from_secs(3), || async {
        node.gw.sessions.device_count() == 2
    })
    .await;
    println!(
        "{EVENTS} events published in {published_in:?}; slow device closed {:?} after the first",
        started.elapsed()
    );
    let (healthy, _healthy) = healthy.await.unwrap();
    assert_eq!(healthy, ids, "the user's reading device lost nothing");
    let (bystander, _bystander) = bystander.await.unwrap();
    assert_eq!(bystander, ids, "another user's device lost nothing");
    assert_closed_slow(&node, &mut slow, 2, closes_before, &ids).await;
}

/// A device that stops reading while events trickle in never overflows
/// its queue: its writer gives up after the stall timeout instead.
#[tokio::test]
async fn a_device_that_stalls_at_a_trickle_gets_4008_after_the_stall_timeout() {
    // Enough to fill the kernel buffers (~8 KiB receive, 128 KiB send) and
    // leave some queued, far below the 512-frame queue.
    const EVENTS: usize = 30;
    let node = Node::start(|_| {}).await;
    let (user, other) = (unique("u"), unique("o"));
    let bystander = connect(&node, &other).await;
    let mut slow = stalled_device(&node, &user).await;
    wait_for("two devices", || async { node.gw.sessions.device_count() == 2 }).await;
    let closes_before = raw::metric(node.addr, SLOW_CLOSES).await;

    let bystander = reader(bystander, EVENTS);
    let publisher = Publisher::new().await;
    let started = Instant::now();
    let ids = publish(&publisher, &user, &other, EVENTS).await;
    let published = Instant::now();
    println!("{EVENTS} events published in {:?}", started.elapsed());
    // The stall timeout is 5 s.
    wait_for_within("the stalled device closed", Duration::from_secs(8), || async {
        node.gw.sessions.device_count() == 1
    })
    .await;
    println!("stalled device closed {:?} after the last event", published.elapsed());
    let (bystander, _bystander) = bystander.await.unwrap();
    assert_eq!(bystander, ids, "another user's device lost nothing");
    assert_closed_slow(&node, &mut slow, 1, closes_before, &ids).await;
}
