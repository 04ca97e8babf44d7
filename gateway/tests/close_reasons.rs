//! `gateway_connections_closed_total{reason}` counts every way a device
//! ends, once: each reason a test can provoke cheaply is provoked on its own
//! and must move its own series by exactly one and no other series. One
//! test function, so no other test of this process closes devices meanwhile
//! (the registry is per process).

mod common;

use std::time::Duration;

use common::raw::{self, close_payload};
use common::*;
use contract::token::{Claims, unix_now};
use gateway::close::CloseReason;

/// Every reason's count, from the process's registry (readable after the
/// node has stopped, unlike `/metrics`).
fn counts() -> Vec<(CloseReason, f64)> {
    let text = gateway::metrics::install().render();
    CloseReason::ALL
        .iter()
        .map(|r| {
            let sample = format!("gateway_connections_closed_total{{reason=\"{}\"}} ", r.label());
            let v = text.lines().find_map(|l| l.strip_prefix(sample.as_str())).map(|v| v.trim().parse().unwrap());
            (*r, v.unwrap_or(0.0))
        })
        .collect()
}

/// Waits until `reason` has moved by one, then checks nothing else moved.
async fn expect_one(reason: CloseReason, before: &[(CloseReason, f64)]) {
    let delta = |now: &[(CloseReason, f64)], r: CloseReason| {
        let i = r as usize;
        now[i].1 - before[i].1
    };
    wait_for(&format!("{reason:?} counted"), || async { delta(&counts(), reason) >= 1.0 }).await;
    let now = counts();
    for r in CloseReason::ALL {
        let want = if r == reason { 1.0 } else { 0.0 };
        assert_eq!(delta(&now, r), want, "{r:?} while provoking {reason:?}");
    }
}

#[tokio::test]
async fn every_close_reason_is_counted_once() {
    let mut node = Node::start(|c| {
        c.max_client_frame = 4096;
        c.max_devices_per_user = 1;
        c.ping_interval = Duration::from_millis(200);
        c.max_client_frames_per_sec = 50;
    })
    .await;
    let text = gateway::metrics::install().render();
    assert!(text.contains("# HELP gateway_connections_closed_total"), "HELP text");
    for r in CloseReason::ALL {
        assert!(text.contains(&format!("reason=\"{}\"", r.label())), "{r:?} is exported before it happens");
    }
    let path = "/posts";
    let ws_close = 0x8;

    // The client closes: its code is echoed.
    let before = counts();
    let mut d = raw::open(node.addr, path, &token_for(&unique("u"))).await;
    d.send(true, ws_close, &close_payload(4000, b"")).await;
    assert_eq!(d.close_code().await, Some(4000));
    expect_one(CloseReason::ClientClosed, &before).await;

    // The client's socket just ends.
    let before = counts();
    let d = raw::open(node.addr, path, &token_for(&unique("u"))).await;
    drop(d);
    expect_one(CloseReason::ClientGone, &before).await;

    // Too big, a protocol error (an unmasked frame is one: a reserved
    // opcode), text that is not UTF-8.
    for (reason, opcode, payload, code) in [
        (CloseReason::FrameTooBig, 0x1, vec![b'x'; 4097], 1009),
        (CloseReason::ProtocolError, 0x3, b"x".to_vec(), 1002),
        (CloseReason::InvalidUtf8, 0x1, vec![0xff, 0xfe], 1007),
    ] {
        let before = counts();
        let mut d = raw::open(node.addr, path, &token_for(&unique("u"))).await;
        d.send(true, opcode, &payload).await;
        assert_eq!(d.close_code().await, Some(code), "{reason:?}");
        expect_one(reason, &before).await;
    }

    // Frames faster than allowed.
    let before = counts();
    let mut d = raw::open(node.addr, path, &token_for(&unique("u"))).await;
    for _ in 0..60 {
        d.send(true, 0x1, b"hi").await;
    }
    assert_eq!(d.close_code().await, Some(1008));
    expect_one(CloseReason::RateLimited, &before).await;

    // A second device of a user allowed one.
    let user = unique("u");
    let first = raw::open(node.addr, path, &token_for(&user)).await;
    let before = counts();
    let mut second = raw::open(node.addr, path, &token_for(&user)).await;
    assert_eq!(second.close_code().await, Some(4029));
    expect_one(CloseReason::TooManyDevices, &before).await;
    // (It answers no pings: gone before it times out.)
    let before = counts();
    drop(first);
    expect_one(CloseReason::ClientGone, &before).await;

    // A token that expires while connected.
    let before = counts();
    let now = unix_now();
    let short = tokens().encode(&Claims { sub: unique("u"), iat: now, exp: now + 1 });
    let mut d = raw::open(node.addr, path, &short).await;
    // Pongs keep it from being dropped as silent first.
    let code = loop {
        let (op, payload) = d.frame_within(WAIT).await.expect("a frame before the close");
        match op {
            0x9 => d.send(true, 0xA, &payload).await,
            0x8 => break u16::from_be_bytes([payload[0], payload[1]]),
            _ => {}
        }
    };
    assert_eq!(code, 1008);
    expect_one(CloseReason::TokenExpired, &before).await;

    // A peer that answers no ping (no close frame).
    let before = counts();
    let mut d = raw::open(node.addr, path, &token_for(&unique("u"))).await;
    assert!(d.ended_within(WAIT).await, "a silent peer is dropped");
    expect_one(CloseReason::PingTimeout, &before).await;

    // Shutdown: a fresh device is closed with 1001.
    wait_for("no devices", || async { node.gw.sessions.device_count() == 0 }).await;
    let mut last = raw::open(node.addr, path, &token_for(&unique("u"))).await;
    wait_for("one device", || async { node.gw.sessions.device_count() == 1 }).await;
    let before = counts();
    let stop = node.stop();
    let (code, ()) = tokio::join!(last.close_code(), stop);
    assert_eq!(code, Some(1001));
    expect_one(CloseReason::Shutdown, &before).await;
}
