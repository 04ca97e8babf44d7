//! Proxying a device to its owner node, so one entry URL always works.
//!
//! The client's upgrade request is replayed to the owner (same key, token
//! and query, marked with `x-feed-proxied` so the owner serves it itself
//! whatever its ring says). When the owner answers 101, this node answers
//! 101 too and copies bytes both ways. Either side closing closes both.
//!
//! After the handshake the relay holds the two raw sockets and nothing
//! else: hyper's connection and its buffers are gone (the client's socket
//! is taken back from the upgrade, as `connection` does), no WebSocket
//! stack is involved (frames pass through as bytes, only their boundaries
//! are tracked, in 32 bytes), and reads go to a buffer that lives for one
//! poll. An idle relayed device costs its task and two sockets.

use std::future::{Future, poll_fn};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use contract::ring::Member;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

use crate::close::CloseCode;
use crate::connection::{CLOSE_WRITE_TIMEOUT, WRITE_STALL_TIMEOUT};
use crate::http::{Body, message};
use crate::metrics::ProxyFailure;
use crate::sessions::Transport;
use crate::state::{Gateway, SocketGuard};

/// Header marking a proxied upgrade; its value is the proxying node's id.
pub const PROXIED_HEADER: &str = "x-feed-proxied";
/// Connecting to the owner and reading its answer must take less than
/// this, and less than half the handshake timeout (see `owner_timeout`).
const OWNER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest upgrade answer head accepted from the owner.
const MAX_HEAD: usize = 8 * 1024;

pub async fn proxy(
    gw: Arc<Gateway>,
    guard: Arc<SocketGuard>,
    mut req: Request<Incoming>,
    token: String,
    owner: Member,
) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").and_then(|v| v.to_str().ok()).map(str::to_owned) else {
        return message(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let path = req.uri().path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "/posts".into());
    let node_id = gw.config.node_id().to_owned();
    let head = |hostport: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nhost: {hostport}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
             sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\nauthorization: Bearer {token}\r\n\
             {PROXIED_HEADER}: {node_id}\r\n\r\n"
        )
    };
    let Answer { stream: upstream, status, head: answer, rest } = match dial_owner(&gw, &owner, 101, head).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    if status != 101 {
        return refusal(status, &answer);
    }
    let (resp, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => return message(StatusCode::BAD_REQUEST, &format!("bad WebSocket handshake: {e}")),
    };
    let task_gw = gw.clone();
    gw.tasks.spawn(async move {
        let _guard = guard;
        let Ok(ws) = upgrade.await else { return };
        let Some((client, pre_read)) = raw_socket(ws.into_inner().into_inner()) else { return };
        let m = &task_gw.metrics;
        m.proxied.increment(1.0);
        m.by_transport.of(Transport::WebSocket).proxied.increment(1.0);
        m.proxied_total.increment(1);
        // Bounded like a device the node serves itself (see `connection`).
        if let Err(e) = socket2::SockRef::from(&client).set_send_buffer_size(task_gw.config.device_send_buffer) {
            tracing::debug!("setting SO_SNDBUF: {e}");
        }
        let (mut client, mut upstream) = (client, upstream);
        if let Err(e) = Box::pin(relay(&task_gw, &mut client, &mut upstream, pre_read, rest)).await {
            tracing::debug!("WebSocket relay ended: {e}");
        }
        m.proxied.decrement(1.0);
        m.by_transport.of(Transport::WebSocket).proxied.decrement(1.0);
    });
    resp.map(|_| Full::new(Bytes::new()))
}

/// The client's raw socket, and the bytes it sent behind its handshake
/// (copied out: hyper's `Bytes` is a view into its whole connection read
/// buffer, see `connection::serve`), from hyper's upgraded connection.
fn raw_socket(upgraded: hyper::upgrade::Upgraded) -> Option<(TcpStream, Vec<u8>)> {
    let parts = match upgraded.downcast::<TokioIo<crate::takeover::Socket>>() {
        Ok(parts) => parts,
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream");
            return None;
        }
    };
    let pre_read = parts.read_buf.to_vec();
    drop(parts.read_buf);
    match parts.io.into_inner().into_stream() {
        Some(stream) => Some((stream, pre_read)),
        None => {
            tracing::error!("upgraded connection was taken over");
            None
        }
    }
}

/// What the owner answered.
pub(crate) struct Answer {
    pub stream: TcpStream,
    pub status: u16,
    /// The answer head, and its body when the status was not the one
    /// asked for.
    pub head: String,
    /// Bytes of the stream read past the head (after the status asked for).
    pub rest: Vec<u8>,
}

/// Dials `owner` on its internal address (its advertised URL may be a
/// client-facing wss:// one), sends the request head that `head` makes
/// from the owner's `host:port`, and reads the answer head, all within
/// `OWNER_TIMEOUT`. After status `ok` (101 for a WebSocket, 200 for an SSE
/// stream) the stream goes on; any other answer is read with its body.
/// The error is the answer to give the client. Every failure, a refusal
/// included, is counted (`Metrics::proxy_failed`) here, for both transports.
pub(crate) async fn dial_owner(
    gw: &Gateway,
    owner: &Member,
    ok: u16,
    head: impl FnOnce(&str) -> String,
) -> Result<Answer, Response<Body>> {
    let dial = gw.dial_urls.read().get(&owner.node_id).cloned().unwrap_or_else(|| owner.url.clone());
    let Some(hostport) = dial.strip_prefix("ws://").map(str::to_owned) else {
        gw.metrics.proxy_failed(ProxyFailure::NoInternalUrl);
        tracing::warn!(owner = owner.node_id, url = dial, "proxy: the owner has no ws:// address");
        return Err(message(StatusCode::BAD_GATEWAY, "owner node has no ws:// address (set its GATEWAY_INTERNAL_URL)"));
    };
    let head = head(&hostport);
    let dial = async {
        let mut s = TcpStream::connect(&hostport).await?;
        s.set_nodelay(true)?;
        s.write_all(head.as_bytes()).await?;
        let (status, answer, rest) = read_head(&mut s, ok).await?;
        Ok::<_, std::io::Error>(Answer { stream: s, status, head: answer, rest })
    };
    match tokio::time::timeout(owner_timeout(gw), dial).await {
        Ok(Ok(answer)) => {
            if answer.status != ok {
                gw.metrics.proxy_failed(ProxyFailure::OwnerRefused);
            }
            Ok(answer)
        }
        Ok(Err(e)) => {
            gw.metrics.proxy_failed(ProxyFailure::OwnerUnreachable);
            tracing::warn!(owner = owner.node_id, error = %e, "proxy: the owner is unreachable");
            Err(message(StatusCode::BAD_GATEWAY, &format!("owner node {} unreachable: {e}", owner.node_id)))
        }
        Err(_) => {
            gw.metrics.proxy_failed(ProxyFailure::OwnerTimeout);
            tracing::warn!(owner = owner.node_id, timeout = ?owner_timeout(gw), "proxy: the owner did not answer");
            Err(message(StatusCode::GATEWAY_TIMEOUT, &format!("owner node {} did not answer", owner.node_id)))
        }
    }
}

/// How long the owner may take. The client's handshake timeout runs from
/// its accept and cuts the connection without an answer: the owner's wait
/// must end well inside it, so that the client gets its 504 (and the
/// failure is counted as one) rather than a cut.
fn owner_timeout(gw: &Gateway) -> Duration {
    OWNER_TIMEOUT.min(gw.config.handshake_timeout / 2)
}

/// Headers of the owner's answer that describe its connection to us, not
/// the answer: hyper sets its own.
const HOP_BY_HOP: [&str; 7] =
    ["connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te", "trailer"];

/// The owner's refusal (401, 503, ...), passed on with its body and its
/// end-to-end headers (`retry-after` above all, so clients back off as the
/// owner asked).
pub(crate) fn refusal(status: u16, answer: &str) -> Response<Body> {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    for line in head.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else { continue };
        let name = name.trim().to_ascii_lowercase();
        if HOP_BY_HOP.contains(&name.as_str()) {
            continue;
        }
        if let (Ok(n), Ok(v)) =
            (hyper::header::HeaderName::from_bytes(name.as_bytes()), hyper::header::HeaderValue::from_str(value.trim()))
        {
            resp.headers_mut().append(n, v);
        }
    }
    resp
}

/// Reads an HTTP answer head: (status, head text, bytes read past it).
/// An answer other than `ok` is read with its (small, JSON) body.
async fn read_head(s: &mut TcpStream, ok: u16) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            let mut rest = buf.split_off(end + 4);
            if status != ok {
                // Read the (small, JSON) body that follows a refusal.
                let len = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0)
                    .min(MAX_HEAD);
                while rest.len() < len {
                    let n = s.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    rest.extend_from_slice(&chunk[..n]);
                }
                let body = String::from_utf8_lossy(&rest).into_owned();
                return Ok((status, format!("{head}{body}"), Vec::new()));
            }
            return Ok((status, head, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "owner answer head too long"));
        }
    }
}

/// Copies both ways until either side ends. When this node shuts down, the
/// owner's stream is copied on to the end of the frame it is in, and the
/// client gets a close frame with 1001 from here (so a proxied device is
/// told to reconnect like the node's own devices), instead of a cut.
///
/// An idle relayed device owns no buffer: each direction reads into a
/// buffer on the stack of one poll and writes what it read on at once;
/// only what the receiving socket does not take at once is copied out,
/// while it waits for room.
async fn relay(
    gw: &Gateway,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    pre_read: Vec<u8>,
    rest: Vec<u8>,
) -> std::io::Result<()> {
    let (mut cl_rd, cl_wr) = client.split();
    let (mut up_rd, up_wr) = upstream.split();
    // What each side sent before the relay began: the client behind its
    // request, the owner behind its 101.
    write_all(&up_wr, &pre_read, WRITE_STALL_TIMEOUT).await?;
    drop(pre_read);
    let mut frames = Boundary::default();
    frames.feed(&rest);
    write_all(&cl_wr, &rest, WRITE_STALL_TIMEOUT).await?;
    drop(rest);
    let mut stopping = false;
    loop {
        if stopping && frames.at_boundary() {
            let close = crate::frame::close(CloseCode::GoingAway, "node shutting down");
            write_all(&cl_wr, &close, CLOSE_WRITE_TIMEOUT).await?;
            // The client answers with its own close: read it (for a
            // while), so that closing the socket does not reset the
            // connection and discard the close frame on its way.
            let _ = socket2::SockRef::from(cl_wr.as_ref()).shutdown(std::net::Shutdown::Write);
            let _ = tokio::time::timeout(CLOSE_LINGER, poll_fn(|cx| drain(cx, &mut cl_rd))).await;
            return Ok(());
        }
        // While stopping, read no further than the end of the current frame.
        let limit = if stopping { frames.to_boundary() } else { usize::MAX };
        tokio::select! {
            r = poll_fn(|cx| pass(cx, &mut up_rd, &cl_wr, limit, Some(&mut frames))) => match r? {
                Passed::Ended => return Ok(()),
                Passed::All => {}
                Passed::Partly(left) => write_all(&cl_wr, &left, WRITE_STALL_TIMEOUT).await?,
            },
            r = poll_fn(|cx| pass(cx, &mut cl_rd, &up_wr, usize::MAX, None)) => match r? {
                Passed::Ended => return Ok(()),
                Passed::All => {}
                Passed::Partly(left) => write_all(&up_wr, &left, WRITE_STALL_TIMEOUT).await?,
            },
            _ = gw.stop_consuming.cancelled(), if !stopping => stopping = true,
        }
    }
}

/// After the close frame, how long the client's answer is waited for.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// The most bytes read from one side at once.
const CHUNK: usize = 16 * 1024;

enum Passed {
    /// The side read from ended its stream.
    Ended,
    All,
    /// The other side's socket took only part; the rest, to write when it can.
    Partly(Vec<u8>),
}

/// Reads what one side sent (at most `limit` bytes) into a buffer that
/// lives only for this call, and writes it to the other side as far as
/// its socket takes it without waiting.
fn pass(
    cx: &mut Context<'_>,
    from: &mut ReadHalf<'_>,
    to: &WriteHalf<'_>,
    limit: usize,
    frames: Option<&mut Boundary>,
) -> Poll<std::io::Result<Passed>> {
    let mut chunk = [MaybeUninit::<u8>::uninit(); CHUNK];
    let mut buf = ReadBuf::uninit(&mut chunk[..limit.min(CHUNK)]);
    // A short read clears the socket's readiness: no extra read to learn
    // that nothing more is there.
    if let Err(e) = std::task::ready!(Pin::new(from).poll_read(cx, &mut buf)) {
        return Poll::Ready(Err(e));
    }
    let bytes = buf.filled();
    if bytes.is_empty() {
        return Poll::Ready(Ok(Passed::Ended));
    }
    if let Some(frames) = frames {
        frames.feed(bytes);
    }
    let written = match to.try_write(bytes) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Poll::Ready(Err(e)),
    };
    Poll::Ready(Ok(if written == bytes.len() { Passed::All } else { Passed::Partly(bytes[written..].to_vec()) }))
}

/// Reads and discards until the stream ends or fails.
fn drain(cx: &mut Context<'_>, from: &mut ReadHalf<'_>) -> Poll<()> {
    let mut chunk = [MaybeUninit::<u8>::uninit(); 512];
    loop {
        let mut buf = ReadBuf::uninit(&mut chunk);
        match std::task::ready!(Pin::new(&mut *from).poll_read(cx, &mut buf)) {
            Ok(()) if !buf.filled().is_empty() => {}
            _ => return Poll::Ready(()),
        }
    }
}

/// Writes all of `buf`, each wait for room bounded by `stall`. Boxed: a
/// rare wait, kept out of an idle relay's task.
fn write_all<'a>(
    to: &'a WriteHalf<'_>,
    buf: &'a [u8],
    stall: Duration,
) -> Pin<Box<dyn Future<Output = std::io::Result<()>> + Send + 'a>> {
    Box::pin(async move {
        let mut buf = buf;
        while !buf.is_empty() {
            match to.try_write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::timeout(stall, to.writable())
                        .await
                        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled"))??;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
}

/// Where server frames end in the owner's byte stream (unmasked frames:
/// two header bytes, an extended length of 2 or 8, a mask key if set).
#[derive(Debug, Default)]
struct Boundary {
    /// The header of the next frame, as far as it came (at most 14 bytes).
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes left in the current frame once its header is read.
    payload_left: u64,
}

impl Boundary {
    fn header_len(h: &[u8]) -> Option<usize> {
        let b1 = *h.get(1)?;
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        Some(2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 })
    }

    fn payload_len(h: &[u8]) -> u64 {
        match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = (self.payload_left as usize).min(bytes.len());
                self.payload_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.header[self.header_len] = bytes[0];
            self.header_len += 1;
            bytes = &bytes[1..];
            let header = &self.header[..self.header_len];
            if Boundary::header_len(header) == Some(header.len()) {
                self.payload_left = Boundary::payload_len(header);
                self.header_len = 0;
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0
    }

    /// Bytes that may be read without passing the end of the current frame
    /// (at least 1: a header is read byte by byte).
    fn to_boundary(&self) -> usize {
        if self.payload_left > 0 { self.payload_left.min(usize::MAX as u64) as usize } else { 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::Boundary;

    #[test]
    fn frame_ends_are_found_across_any_chunking() {
        let mut stream = Vec::new();
        stream.extend_from_slice(&crate::frame::text(b"hello"));
        stream.extend_from_slice(&crate::frame::text(&[b'x'; 300]));
        stream.extend_from_slice(&crate::frame::text(&vec![b'y'; 70_000]));
        for chunk in [1, 2, 3, 7, 64, 4096] {
            let mut b = Boundary::default();
            let mut ends = 0;
            for c in stream.chunks(chunk) {
                for byte in c {
                    b.feed(std::slice::from_ref(byte));
                    ends += usize::from(b.at_boundary());
                }
            }
            assert_eq!(ends, 3, "chunk {chunk}");
            assert!(b.at_boundary());
        }
    }
}
