//! A node that does not own the user relays the SSE stream from the owner:
//! the request goes to the owner (over its internal address, marked
//! `x-feed-proxied`, so the owner serves it whatever its ring says), and
//! the answer comes back byte for byte, refusals included.
//!
//! On shutdown the relay copies the owner's stream on to the end of the
//! event it is in, then sends `event: close` 1001 itself, as the WebSocket
//! proxy sends its own close frame: a relayed device is told to reconnect
//! like the node's own devices, never cut mid-event.
//!
//! An idle relayed device owns no buffer: reads go to a buffer on the
//! stack of a non-async call and are written on at once; only what the
//! client's socket does not take at once is copied out, while it waits.

use std::sync::Arc;

use bytes::Bytes;
use contract::ring::Member;
use hyper::StatusCode;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::TcpStream;

use super::{refuse, stream, wire};
use crate::close::CloseCode;
use crate::connection::{CLOSE_WRITE_TIMEOUT, WRITE_STALL_TIMEOUT};
use crate::http::Body;
use crate::proxy::{Answer, PROXIED_HEADER, dial_owner, refusal};
use crate::sessions::Transport;
use crate::state::{Gateway, SocketGuard};
use crate::takeover::Takeover;

/// Bytes a client may send after its request (see `stream`).
const MAX_CLIENT_BYTES: usize = 4096;
/// The most bytes read from the owner at once.
const CHUNK: usize = 4096;

/// Relays the request to `owner`. `since` is the resume point as this
/// node read it (`Last-Event-ID` or `?since=`); it goes on as
/// `Last-Event-ID`, which wins at the owner too.
pub async fn relay(
    gw: Arc<Gateway>,
    guard: Arc<SocketGuard>,
    takeover: Takeover,
    req: &Request<Incoming>,
    token: &str,
    owner: Member,
    since: Option<&str>,
) -> Response<Body> {
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/posts");
    let last_event_id = since.map(|s| format!("last-event-id: {s}\r\n")).unwrap_or_default();
    let node_id = gw.config.node_id();
    let head = |hostport: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nhost: {hostport}\r\naccept: text/event-stream\r\n\
             authorization: Bearer {token}\r\n{last_event_id}{PROXIED_HEADER}: {node_id}\r\n\
             connection: close\r\n\r\n"
        )
    };
    let Answer { stream: upstream, status, head, rest } = match dial_owner(&gw, &owner, 200, head).await {
        Ok(a) => a,
        Err(mut resp) => {
            resp.headers_mut().insert("access-control-allow-origin", "*".parse().expect("static"));
            return resp;
        }
    };
    if status != 200 {
        return refusal(status, &head);
    }
    let Some(client) = takeover.take() else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "connection already taken over");
    };
    let task_gw = gw.clone();
    gw.tasks.spawn(async move {
        let _guard = guard;
        let m = &task_gw.metrics;
        m.proxied.increment(1.0);
        m.by_transport.of(Transport::Sse).proxied.increment(1.0);
        m.proxied_total.increment(1);
        stream::tune(&task_gw, &client);
        let _ = upstream.set_nodelay(true);
        if let Err(e) = Box::pin(pipe(&task_gw, &client, &upstream, head, rest)).await {
            tracing::debug!(error = %e, "SSE relay ended");
        }
        m.proxied.decrement(1.0);
        m.by_transport.of(Transport::Sse).proxied.decrement(1.0);
    });
    // hyper writes this into nothing: the socket is the relay's now.
    Response::new(Body::new(Bytes::new()))
}

/// Copies the owner's answer (head, what came with it, then the stream) to
/// the client until either side ends, or this node shuts down.
async fn pipe(
    gw: &Gateway,
    client: &TcpStream,
    upstream: &TcpStream,
    head: String,
    rest: Vec<u8>,
) -> std::io::Result<()> {
    let mut events = Boundary::default();
    events.feed(&rest);
    write_all(client, &[head.into_bytes(), rest].concat(), WRITE_STALL_TIMEOUT).await?;
    let mut received = 0usize;
    let mut stopping = false;
    loop {
        if stopping && events.at_boundary() {
            let close = wire::close(CloseCode::GoingAway, "node shutting down");
            return write_all(client, &close, CLOSE_WRITE_TIMEOUT).await;
        }
        tokio::select! {
            r = upstream.readable() => {
                r?;
                match forward(upstream, client, &mut events, stopping)? {
                    Forwarded::Ended => return Ok(()),
                    Forwarded::All => {}
                    Forwarded::Partly(left) => write_all(client, &left, WRITE_STALL_TIMEOUT).await?,
                }
            }
            r = client.readable() => {
                r?;
                let mut scratch = [0u8; 512];
                match client.try_read(&mut scratch) {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        received += n;
                        if received > MAX_CLIENT_BYTES {
                            return Err(std::io::Error::other("the client sent data"));
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            _ = gw.stop_consuming.cancelled(), if !stopping => stopping = true,
        }
    }
}

enum Forwarded {
    /// The owner ended the stream.
    Ended,
    All,
    /// The client's socket took only part; the rest, to write when it can.
    Partly(Vec<u8>),
}

/// Reads what the owner sent and writes it on. While stopping, only up to
/// the end of the current event (the rest would be a partial event; the
/// client recovers it with its `Last-Event-ID`).
fn forward(
    upstream: &TcpStream,
    client: &TcpStream,
    events: &mut Boundary,
    stopping: bool,
) -> std::io::Result<Forwarded> {
    let mut chunk = [0u8; CHUNK];
    let n = match upstream.try_read(&mut chunk) {
        Ok(0) => return Ok(Forwarded::Ended),
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Forwarded::All),
        Err(e) => return Err(e),
    };
    let n = if stopping { events.feed_to_boundary(&chunk[..n]) } else { events.feed(&chunk[..n]) };
    let bytes = &chunk[..n];
    let written = match client.try_write(bytes) {
        Ok(w) => w,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    Ok(if written == bytes.len() { Forwarded::All } else { Forwarded::Partly(bytes[written..].to_vec()) })
}

/// Writes all of `buf`, each wait for room bounded by `stall`.
async fn write_all(s: &TcpStream, mut buf: &[u8], stall: std::time::Duration) -> std::io::Result<()> {
    while !buf.is_empty() {
        match s.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::timeout(stall, s.writable())
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled"))??;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Where events end in the owner's stream (after its head): at a blank
/// line, which the owner always writes as "\n\n".
#[derive(Debug)]
struct Boundary {
    /// The last byte seen was "\n".
    after_newline: bool,
    /// The last bytes seen ended an event.
    at_end: bool,
}

impl Default for Boundary {
    /// At the start of the body: the head has just ended.
    fn default() -> Boundary {
        Boundary { after_newline: true, at_end: true }
    }
}

impl Boundary {
    fn step(&mut self, b: u8) {
        if b == b'\n' {
            self.at_end |= self.after_newline;
            self.after_newline = true;
        } else {
            self.after_newline = false;
            self.at_end = false;
        }
    }

    /// Feeds all of `bytes`; returns its length.
    fn feed(&mut self, bytes: &[u8]) -> usize {
        bytes.iter().for_each(|b| self.step(*b));
        bytes.len()
    }

    /// Feeds `bytes` up to the end of the first event that ends in them
    /// (all of them if none does); returns how many.
    fn feed_to_boundary(&mut self, bytes: &[u8]) -> usize {
        for (i, b) in bytes.iter().enumerate() {
            self.step(*b);
            if self.at_end {
                return i + 1;
            }
        }
        bytes.len()
    }

    fn at_boundary(&self) -> bool {
        self.at_end
    }
}

#[cfg(test)]
mod tests {
    use super::Boundary;

    #[test]
    fn event_ends_are_found_across_any_chunking() {
        let stream = b"retry: 1000\n\nid: a\ndata: {\"x\":1}\n\n: ping\n\nevent: close\ndata: {}\n\n";
        for chunk in [1, 2, 3, 7, 64] {
            let mut b = Boundary::default();
            let mut ends = 0;
            for c in stream.chunks(chunk) {
                for byte in c {
                    let was = b.at_boundary();
                    b.feed(std::slice::from_ref(byte));
                    ends += usize::from(b.at_boundary() && !was);
                }
            }
            assert_eq!(ends, 4, "chunk {chunk}");
            assert!(b.at_boundary());
        }
    }

    #[test]
    fn stopping_forwards_to_the_end_of_the_current_event_only() {
        let mut b = Boundary::default();
        b.feed(b"id: a\nda");
        assert!(!b.at_boundary());
        let rest = b"ta: {}\n\nid: b\ndata: {}\n\n";
        let n = b.feed_to_boundary(rest);
        assert_eq!(&rest[..n], b"ta: {}\n\n");
        assert!(b.at_boundary());
    }
}
