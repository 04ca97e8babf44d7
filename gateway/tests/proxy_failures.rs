//! `gateway_connections_opened_total{result="proxy_*"}` counts every
//! device that entered a node that does not own its user and could not be
//! relayed, by why, on both transports: each failure is provoked on its own
//! and must move its own series by exactly one and no other proxy series;
//! a device that is relayed moves none. One test function, so no other test
//! of this process moves these counters meanwhile (the registry is per
//! process).

mod common;

use std::time::Duration;

use common::raw;
use common::*;

const RESULTS: [&str; 4] =
    ["proxy_no_internal_url", "proxy_owner_unreachable", "proxy_owner_timeout", "proxy_owner_refused"];

/// Every proxy failure's count, from the process's registry.
fn counts() -> Vec<f64> {
    let text = gateway::metrics::install().render();
    RESULTS
        .iter()
        .map(|r| {
            let sample = format!("gateway_connections_opened_total{{result=\"{r}\"}} ");
            text.lines().find_map(|l| l.strip_prefix(sample.as_str())).map_or(0.0, |v| v.trim().parse().unwrap())
        })
        .collect()
}

/// Checks that `result` (or none, for `None`) moved by exactly one since
/// `before`, and no other proxy failure moved. Counted before the answer
/// is written, so no wait is needed.
fn expect_one(result: Option<&str>, before: &[f64], what: &str) {
    let now = counts();
    for (i, r) in RESULTS.iter().enumerate() {
        let want = if Some(*r) == result { 1.0 } else { 0.0 };
        assert_eq!(now[i] - before[i], want, "{r} while provoking {what}");
    }
}

fn ws_head(user: &str) -> String {
    raw::upgrade_head("/posts", &format!("authorization: Bearer {}\r\n", token_for(user)))
}

fn sse_head(user: &str) -> String {
    format!(
        "GET /posts HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\nauthorization: Bearer {}\r\n\r\n",
        token_for(user)
    )
}

async fn stop(nodes: [Node; 2]) {
    for mut n in nodes {
        n.stop().await;
    }
}

/// A `ws://` address on loopback where nothing listens.
async fn closed_port() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("ws://{addr}")
}

#[tokio::test]
async fn every_proxy_failure_is_counted_once_on_both_transports() {
    // Relayed: no failure.
    let (nodes, user) = entry_and_owner(|_| {}).await;
    let text = gateway::metrics::install().render();
    for r in RESULTS {
        assert!(text.contains(&format!("result=\"{r}\"")), "{r} is exported before it happens");
    }
    let before = counts();
    let (status, answer, _ws) = raw::request(nodes[0].addr, &ws_head(&user)).await;
    assert_eq!(status, 101, "{answer}");
    let (status, answer, _sse) = raw::request(nodes[0].addr, &sse_head(&user)).await;
    assert_eq!(status, 200, "{answer}");
    expect_one(None, &before, "a relayed device");
    drop((_ws, _sse));
    stop(nodes).await;

    // The owner's internal address refuses connections: 502.
    let internal = closed_port().await;
    let (nodes, user) = entry_and_owner(move |c| c.internal_url = Some(internal)).await;
    for (transport, head) in [("ws", ws_head(&user)), ("sse", sse_head(&user))] {
        let before = counts();
        let (status, answer, _) = raw::request(nodes[0].addr, &head).await;
        assert_eq!(status, 502, "{transport}: {answer}");
        expect_one(Some("proxy_owner_unreachable"), &before, &format!("an unreachable owner ({transport})"));
    }
    stop(nodes).await;

    // The owner's internal address accepts but never answers: 504.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let internal = format!("ws://{}", silent.local_addr().unwrap());
    let (nodes, user) = entry_and_owner(move |c| c.internal_url = Some(internal)).await;
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let before = counts();
    let (status, answer, _) = raw::request(nodes[0].addr, &ws_head(&user)).await;
    assert_eq!(status, 504, "{answer}");
    expect_one(Some("proxy_owner_timeout"), &before, "a silent owner");
    held.abort();
    stop(nodes).await;

    // The owner refuses (one socket per address, held by this test): its
    // 503 is passed on, and counted.
    let (nodes, user) = entry_and_owner(|c| {
        c.max_connections_per_ip = 1;
        c.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let _hog = tokio::net::TcpStream::connect(nodes[1].addr).await.unwrap();
    wait_for("the owner counts the idle socket", || async { nodes[1].gw.per_address.len() == 1 }).await;
    for (transport, head) in [("ws", ws_head(&user)), ("sse", sse_head(&user))] {
        let before = counts();
        let (status, answer, _) = raw::request(nodes[0].addr, &head).await;
        assert_eq!(status, 503, "{transport}: {answer}");
        expect_one(Some("proxy_owner_refused"), &before, &format!("a refusing owner ({transport})"));
    }
}
