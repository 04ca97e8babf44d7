//! Memory per idle device, by transport: opens N idle devices (WebSocket
//! or SSE, one user each) on a running gateway, waits past a ping
//! interval, and reports the growth of the node's
//! `gateway_process_rss_bytes` per device, as BENCHMARKS.md's "hold"
//! scenario does for WebSocket with the load generator (which speaks no
//! SSE). Start a fresh node for each run so that the two are alike.
//!
//! ```text
//! cargo run --release -p gateway --example idle_devices -- \
//!     ADDR ws|sse DEVICES JWT_SECRET [SETTLE_SECS]
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use contract::token::Tokens;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connects this many at once: the node refuses sockets beyond its
/// unauthenticated limit (1,024 by default) with 503.
const CONCURRENT_CONNECTS: usize = 200;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: idle_devices ADDR ws|sse DEVICES JWT_SECRET [SETTLE_SECS]";
    anyhow::ensure!(args.len() >= 5, usage);
    let addr: SocketAddr = args[1].parse()?;
    let sse = match args[2].as_str() {
        "ws" => false,
        "sse" => true,
        _ => anyhow::bail!(usage),
    };
    let n: usize = args[3].parse()?;
    let tokens = Tokens::new(args[4].as_bytes());
    let settle = Duration::from_secs(args.get(5).map(|s| s.parse()).transpose()?.unwrap_or(25));

    let before = rss(addr).await?;
    let run = std::process::id();
    let mut held = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(CONCURRENT_CONNECTS) {
        let opens = chunk.iter().map(|i| {
            let token = tokens.issue(&format!("idle-{run}-{i}"), Duration::from_secs(3600));
            open(addr, sse, token)
        });
        for s in futures_util::future::join_all(opens).await {
            held.push(s?);
        }
    }
    eprintln!("{n} {} devices open; idle for {settle:?}", args[2]);
    tokio::time::sleep(settle).await;
    let after = rss(addr).await?;
    let devices = gauge(addr, "gateway_connections").await?;
    println!(
        "{} devices {devices}: RSS {:.1} -> {:.1} MiB = {:.0} B/device",
        args[2],
        before / 1048576.0,
        after / 1048576.0,
        (after - before) / devices
    );
    drop(held);
    Ok(())
}

/// Opens one device and reads its answer head (101 or 200).
async fn open(addr: SocketAddr, sse: bool, token: String) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    let head = if sse {
        format!("GET /posts?token={token} HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n")
    } else {
        format!(
            "GET /posts?token={token} HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    };
    s.write_all(head.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let k = s.read(&mut chunk).await?;
        anyhow::ensure!(k > 0, "closed before answering");
        buf.extend_from_slice(&chunk[..k]);
    }
    let want: &[u8] = if sse { b"HTTP/1.1 200" } else { b"HTTP/1.1 101" };
    anyhow::ensure!(buf.starts_with(want), "refused: {}", String::from_utf8_lossy(&buf));
    Ok(s)
}

async fn rss(addr: SocketAddr) -> anyhow::Result<f64> {
    gauge(addr, "gateway_process_rss_bytes").await
}

/// One unlabelled gauge from `/metrics`.
async fn gauge(addr: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("{name} not in /metrics"))
}
