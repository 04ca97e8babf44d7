//! One simulated device: connects from a chosen source address to its
//! user's owner node, then reads events and records what arrived.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use bytes::Bytes;
use fastwebsockets::{OpCode, WebSocket};
use http_body_util::Empty;
use hyper::Request;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;

use crate::accounting::Latency;

/// What all devices of a worker share.
pub struct Counters {
    pub latency: Latency,
    /// Events received since the last tick (duplicates too).
    pub received: AtomicU64,
    /// Events of other runs (another load generator on the same broker
    /// with the same user ids): ignored, only counted.
    pub foreign: AtomicU64,
    /// Unix micros of the latest receipt.
    pub last_receipt_us: AtomicU64,
    /// Close codes the gateways sent, for the report.
    pub closes: parking_lot::Mutex<std::collections::BTreeMap<u16, u64>>,
}

impl Counters {
    pub fn new() -> Counters {
        Counters { latency: Latency::new(LATENCY_SHARDS), received: AtomicU64::new(0), foreign: AtomicU64::new(0), last_receipt_us: AtomicU64::new(0), closes: Default::default() }
    }
}

impl Default for Counters {
    fn default() -> Counters {
        Counters::new()
    }
}

/// Latency shards per worker: enough that the few runtime threads rarely
/// wait on one another.
const LATENCY_SHARDS: usize = 64;

pub type Ws = WebSocket<TokioIo<Upgraded>>;

/// Connects a device: bind the source address (port chosen at connect
/// time, so ports are shared across destinations), TCP connect, upgrade.
pub async fn connect(source: Ipv4Addr, ws_url: &str, token: &str) -> anyhow::Result<Ws> {
    let hostport = ws_url.strip_prefix("ws://").context("ws:// URL")?;
    let dest: SocketAddr = tokio::net::lookup_host(hostport).await?.next().context("gateway address")?;
    let socket = TcpSocket::new_v4()?;
    // Without this, bind() reserves a port per source address for all
    // destinations, and one address runs out at ~28k connections.
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)?;
    socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
    let stream = socket.connect(dest).await?;
    stream.set_nodelay(true)?;
    let req = Request::builder()
        .method("GET")
        .uri(format!("http://{hostport}/post/feed/posted"))
        .header("host", hostport)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-key", fastwebsockets::handshake::generate_key())
        .header("sec-websocket-version", "13")
        .header("authorization", format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())?;
    let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, req, stream).await?;
    Ok(ws)
}

/// Reads events until the connection ends or `stop` fires; returns the
/// sequence numbers received, in arrival order.
pub async fn read_events(
    mut ws: Ws,
    key: usize,
    run: u64,
    counters: &Counters,
    stop: &CancellationToken,
) -> Vec<u32> {
    let mut seqs = Vec::new();
    loop {
        // read_frame is not cancel-safe, but on stop the connection is
        // abandoned, so a half-read frame does not matter.
        let frame = tokio::select! {
            f = ws.read_frame() => f,
            _ = stop.cancelled() => break,
        };
        let frame = match frame {
            Ok(f) => f,
            Err(_) => break,
        };
        match frame.opcode {
            OpCode::Text => {
                let now = contract::event::now_micros();
                match parse_event(&frame.payload) {
                    Some((r, seq, published)) if r == run => {
                        seqs.push(seq);
                        counters.latency.record(key, now.saturating_sub(published));
                        counters.received.fetch_add(1, Ordering::Relaxed);
                        counters.last_receipt_us.fetch_max(now, Ordering::Relaxed);
                    }
                    _ => {
                        counters.foreign.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            OpCode::Close => {
                let code = frame.payload.get(..2).map_or(1005, |b| u16::from_be_bytes([b[0], b[1]]));
                *counters.closes.lock().entry(code).or_default() += 1;
                break;
            }
            _ => {}
        }
    }
    seqs
}

/// Reads the run, the sequence number and the publish time (unix micros)
/// from the post text ([`post_text`]); the rest of the event is skipped
/// unread.
fn parse_event(payload: &[u8]) -> Option<(u64, u32, u64)> {
    #[derive(serde::Deserialize)]
    struct Data<'a> {
        #[serde(rename = "postText", borrow)]
        post_text: &'a str,
    }
    #[derive(serde::Deserialize)]
    struct Ev<'a> {
        #[serde(borrow)]
        data: Data<'a>,
    }
    let ev: Ev = serde_json::from_slice(payload).ok()?;
    let mut parts = ev.data.post_text.split(' ');
    let run = u64::from_str_radix(parts.next()?, 16).ok()?;
    let seq = parts.next()?.parse().ok()?;
    Some((run, seq, parts.next()?.parse().ok()?))
}

/// The text of event `seq` of run `run`: `"<run hex> <seq> <micros>"`,
/// what a device needs for accounting and latency (in e2e mode, the text
/// of a real post). The run id keeps runs that share a broker apart.
pub fn post_text(run: u64, seq: u32, published_us: u64) -> String {
    format!("{run:x} {seq} {published_us}")
}

/// Event `seq` of run 0 (for callers that need no run id).
pub fn event_for(seq: u32, published_us: u64) -> contract::event::PostEvent {
    run_event(0, seq, published_us)
}

/// The event a gateway-mode run publishes for sequence number `seq`.
pub fn run_event(run: u64, seq: u32, published_us: u64) -> contract::event::PostEvent {
    let text = post_text(run, seq, published_us);
    contract::event::PostEvent::new(&format!("lt-{run:x}-{seq}"), &text, "lt-author", published_us / 1000)
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_the_wire_format() {
        let ev = run_event(0xabc, 42, 1_700_000_000_123_456);
        let bytes = serde_json::to_vec(&ev).unwrap();
        assert_eq!(parse_event(&bytes), Some((0xabc, 42, 1_700_000_000_123_456)));
        assert_eq!(parse_event(b"{}"), None);
        let other = contract::event::PostEvent::new("p", "hello", "a", 1);
        assert_eq!(parse_event(&serde_json::to_vec(&other).unwrap()), None);
    }
}
