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
        Counters {
            latency: Latency::new(LATENCY_SHARDS),
            received: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            last_receipt_us: AtomicU64::new(0),
            closes: Default::default(),
        }
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
    connect_since(source, ws_url, token, None).await
}

/// [`connect`], asking for recovery: `?since=<id>` replays the feed's
/// events newer than `id` before the live ones. `ws_url` is a node's
/// `ws://host:port` base (a path after it, as in a 4001 reason, is ignored).
pub async fn connect_since(source: Ipv4Addr, ws_url: &str, token: &str, since: Option<&str>) -> anyhow::Result<Ws> {
    let rest = ws_url.strip_prefix("ws://").context("ws:// URL")?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let dest: SocketAddr = tokio::net::lookup_host(hostport).await?.next().context("gateway address")?;
    let socket = TcpSocket::new_v4()?;
    // Without this, bind() reserves a port per source address for all
    // destinations, and one address runs out at ~28k connections.
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)?;
    socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
    let stream = socket.connect(dest).await?;
    stream.set_nodelay(true)?;
    let query = since.map(|s| format!("?since={s}")).unwrap_or_default();
    let req = Request::builder()
        .method("GET")
        .uri(format!("http://{hostport}/post/feed/posted{query}"))
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

/// Why a connection attempt failed, as one short label for the report:
/// `refused` (nothing listens), `reset` (the server dropped the socket
/// before answering, as a gateway over its pending cap may), `http_<code>`
/// (the server answered with that status instead of 101),
/// `closed_before_response`, `no_source_port`, `timeout` (counted by the
/// caller), else `other`.
pub fn failure_cause(e: &anyhow::Error) -> String {
    for cause in e.chain() {
        if let Some(ws) = cause.downcast_ref::<fastwebsockets::WebSocketError>() {
            match ws {
                fastwebsockets::WebSocketError::InvalidStatusCode(code) => return format!("http_{code}"),
                fastwebsockets::WebSocketError::IoError(io) => return io_cause(io).to_owned(),
                fastwebsockets::WebSocketError::HTTPError(h) => {
                    if let Some(io) = std::error::Error::source(h).and_then(|s| s.downcast_ref::<std::io::Error>()) {
                        return io_cause(io).to_owned();
                    }
                    if h.is_incomplete_message() || h.is_closed() {
                        return "closed_before_response".to_owned();
                    }
                    return "http_error".to_owned();
                }
                _ => return "websocket_handshake".to_owned(),
            }
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io_cause(io).to_owned();
        }
        if let Some(h) = cause.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_closed())
        {
            return "closed_before_response".to_owned();
        }
    }
    "other".to_owned()
}

fn io_cause(io: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match io.kind() {
        ConnectionRefused => "refused",
        ConnectionReset | ConnectionAborted | BrokenPipe => "reset",
        AddrNotAvailable | AddrInUse => "no_source_port",
        TimedOut => "timeout",
        UnexpectedEof => "closed_before_response",
        _ => "io_other",
    }
}

/// Why a device's connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The run is over.
    Stopped,
    /// The load generator closed it on purpose (churn).
    Churned,
    /// Close 4001: the user moved to the node at this URL.
    Moved(String),
    /// Another close code from the server.
    Closed(u16),
    /// The connection broke (EOF, reset, protocol error).
    Broken,
}

/// Reads events until the connection ends or `stop` fires; returns the
/// sequence numbers received, in arrival order.
pub async fn read_events(ws: Ws, key: usize, run: u64, counters: &Counters, stop: &CancellationToken) -> Vec<u32> {
    let (mut seqs, mut newest) = (Vec::new(), String::new());
    read_until(ws, key, run, counters, stop, None, &mut seqs, &mut newest).await;
    seqs
}

/// Reads events into `seqs` until the connection ends, `stop` fires or
/// `churn` is notified (then it closes the connection itself, code 1000);
/// says why it ended. `newest` keeps the greatest event id received (ids
/// sort by time): what a reconnection asks for as `since`.
#[allow(clippy::too_many_arguments)]
pub async fn read_until(
    mut ws: Ws,
    key: usize,
    run: u64,
    counters: &Counters,
    stop: &CancellationToken,
    churn: Option<&tokio::sync::Notify>,
    seqs: &mut Vec<u32>,
    newest: &mut String,
) -> Ended {
    let churned = async {
        match churn {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(churned);
    loop {
        // read_frame is not cancel-safe, but on stop or churn the
        // connection is abandoned, so a half-read frame does not matter.
        let frame = tokio::select! {
            f = ws.read_frame() => f,
            _ = stop.cancelled() => return Ended::Stopped,
            _ = &mut churned => {
                let _ = ws.write_frame(fastwebsockets::Frame::close(1000, b"churn")).await;
                return Ended::Churned;
            }
        };
        let frame = match frame {
            Ok(f) => f,
            Err(_) => return Ended::Broken,
        };
        match frame.opcode {
            OpCode::Text => {
                let now = contract::event::now_micros();
                match parse_event(&frame.payload) {
                    Some((r, seq, published, id)) if r == run => {
                        seqs.push(seq);
                        if id > newest.as_str() {
                            id.clone_into(newest);
                        }
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
                if code == 4001 {
                    let reason = String::from_utf8_lossy(frame.payload.get(2..).unwrap_or_default()).into_owned();
                    if reason.starts_with("ws://") {
                        return Ended::Moved(reason);
                    }
                }
                return Ended::Closed(code);
            }
            _ => {}
        }
    }
}

/// Reads the run, the sequence number and the publish time (unix micros)
/// from the post text ([`post_text`]); the rest of the event is skipped
/// unread.
fn parse_event(payload: &[u8]) -> Option<(u64, u32, u64, &str)> {
    #[derive(serde::Deserialize)]
    struct Data<'a> {
        #[serde(rename = "postText", borrow)]
        post_text: &'a str,
    }
    #[derive(serde::Deserialize)]
    struct Ev<'a> {
        #[serde(borrow)]
        id: &'a str,
        #[serde(borrow)]
        data: Data<'a>,
    }
    let ev: Ev = serde_json::from_slice(payload).ok()?;
    let mut parts = ev.data.post_text.split(' ');
    let run = u64::from_str_radix(parts.next()?, 16).ok()?;
    let seq = parts.next()?.parse().ok()?;
    Some((run, seq, parts.next()?.parse().ok()?, ev.id))
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
    contract::event::PostEvent::new(&event_id(run, seq), &text, AUTHOR, published_us / 1000)
}

/// The author of gateway-mode events.
pub const AUTHOR: &str = "lt-author";

/// The post id of event `seq` of run `run`. Fixed width, so ids of one run
/// sort (as strings, like the feed cache and `?since=` compare them) in
/// publication order.
pub fn event_id(run: u64, seq: u32) -> String {
    format!("lt-{run:016x}-{seq:010}")
}

/// A `since` below every event id of run `run`: what a device that has
/// received nothing yet asks for when it reconnects.
pub fn since_floor(run: u64) -> String {
    format!("lt-{run:016x}-")
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
        assert_eq!(parse_event(&bytes), Some((0xabc, 42, 1_700_000_000_123_456, event_id(0xabc, 42).as_str())));
        assert_eq!(parse_event(b"{}"), None);
        assert!(event_id(7, 9) < event_id(7, 10) && since_floor(7) < event_id(7, 0));
        let other = contract::event::PostEvent::new("p", "hello", "a", 1);
        assert_eq!(parse_event(&serde_json::to_vec(&other).unwrap()), None);
    }

    async fn connect_error(url: &str) -> anyhow::Error {
        match connect(Ipv4Addr::LOCALHOST, url, "t").await {
            Ok(_) => panic!("{url}: connected"),
            Err(e) => e,
        }
    }

    #[tokio::test]
    async fn failed_connects_are_told_apart_by_cause() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Nothing listens on a port just freed.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let e = connect_error(&format!("ws://{free}")).await;
        assert_eq!(failure_cause(&e), "refused", "{e:#}");
        // A server that answers 503 (a gateway over capacity) or 429.
        for (status, want) in [("503 Service Unavailable", "http_503"), ("429 Too Many Requests", "http_429")] {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let head = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                s.write_all(head.as_bytes()).await.unwrap();
            });
            let e = connect_error(&format!("ws://{addr}")).await;
            assert_eq!(failure_cause(&e), want, "{e:#}");
            server.await.unwrap();
        }
        // A server that takes the request and closes without answering.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf).await;
        });
        let e = connect_error(&format!("ws://{addr}")).await;
        server.await.unwrap();
        assert!(["closed_before_response", "reset"].contains(&failure_cause(&e).as_str()), "{e:#}");
    }
}
