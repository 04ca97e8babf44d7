//! One device's connection after the upgrade: the reader runs in the
//! connection's task, the writer in a task of its own, and they share only
//! the device's outbox.

use std::collections::HashSet;
use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;

use crate::close::CloseCode;
use crate::frame::{self, ClientFrame, FrameReader, ReadError};
use crate::outbox::{Batch, Close, Queued};
use crate::sessions::{CLOSE_TOO_MANY_DEVICES, Device, Transport};
use crate::state::Gateway;

/// After our close frame, how long we keep reading for the client's close
/// before dropping the socket (so the client reads our close frame rather
/// than a reset).
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// A write that makes no progress for this long means the peer is gone
/// (or not reading: with the bounded kernel buffer below, a device that
/// stops reading stalls its writer within a few events).
pub(crate) const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Writing the close frame itself may stall only this long: a device
/// closed for not reading will not read it either, and its socket should
/// go at once rather than after a whole stall timeout.
pub(crate) const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Most buffers handed to one `writev` (Linux allows 1024).
const MAX_IOVECS: usize = 64;

/// Serves an upgraded WebSocket for an authenticated user until it closes.
/// What the upgrade request asked for.
pub struct Request {
    pub user: String,
    pub token_expires_at: u64,
    /// `?since=<post id>`: replay newer feed events first.
    pub since: Option<String>,
}

pub async fn serve(gw: Arc<Gateway>, upgraded: Upgraded, req: Request) {
    let Request { user, token_expires_at, since } = req;
    let (stream, pre_read) = match upgraded.downcast::<TokioIo<crate::takeover::Socket>>() {
        Ok(parts) => match parts.io.into_inner().into_stream() {
            Some(stream) => (stream, parts.read_buf),
            None => {
                tracing::error!("upgraded connection was taken over");
                return;
            }
        },
        Err(_) => {
            tracing::error!("upgraded connection is not a TCP stream");
            return;
        }
    };
    // A bounded kernel send buffer: Linux autotunes it up to ~4 MB, which
    // a device that stops reading fills for many seconds before its writer
    // notices anything (and that much kernel memory per device). Bounded,
    // the send queue overflows (4008) soon after the device stops reading.
    if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(gw.config.device_send_buffer) {
        tracing::debug!("setting SO_SNDBUF: {e}");
    }
    let (rd, mut wr) = stream.into_split();
    // Bytes the client sent right behind its handshake come first. They are
    // copied out: hyper's `Bytes` is a view into its whole 8 KiB connection
    // read buffer (already dirtied by the request), and keeping even an
    // empty view of it costs an idle device a resident page.
    // (A block, so the original view is dropped here: shadowing would keep
    // it alive in this future's state for the connection's whole life.)
    let pre_read = {
        let view = pre_read;
        if view.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(&view) }
    };
    let mut rd = AsyncReadExt::chain(std::io::Cursor::new(pre_read), rd);

    let device = match gw.sessions.register(&user, token_expires_at, Transport::WebSocket) {
        Ok(d) => d,
        Err(e) => {
            gw.metrics.opened_too_many_devices.increment(1);
            let close = frame::close(CLOSE_TOO_MANY_DEVICES, &e.to_string());
            if Box::pin(write_with_timeout(&mut wr, &close)).await.is_ok() {
                let _ = wr.shutdown().await;
                Box::pin(linger(&mut rd)).await;
            }
            return;
        }
    };
    gw.metrics.opened_ok.increment(1);
    // The ring may have moved this user between the ownership check and
    // the registration; a reconcile that ran before it did not see this
    // device, so check again now that it is visible.
    match gw.owner_of(&user) {
        Some((true, _)) => {}
        Some((false, owner)) => {
            device.outbox.close(Close::Frame { code: crate::broker::CLOSE_MOVED, reason: owner.url })
        }
        None => {
            device.outbox.close(Close::Frame { code: CloseCode::GoingAway, reason: "node rejoining, reconnect".into() })
        }
    }
    if let Some(since) = since {
        // Boxed, like every rare await here: a connection's task is as big
        // as its largest await state, and idle devices must stay small.
        Box::pin(recover(&gw, &device, &since)).await;
    }
    // Shared: the writer task writes what is queued, and `Outbox::push`
    // writes an event itself when nothing is.
    let wr = Arc::new(wr);
    device.outbox.attach(wr.clone());
    let mut writer = tokio::spawn(write_loop(gw.clone(), wr, device.clone()));

    let mut reader = FrameReader::new(gw.config.max_client_frame);
    let mut rate = FrameRate::new(gw.config.max_client_frames_per_sec);
    let writer_done = loop {
        tokio::select! {
            // `FrameReader::next` is cancel-safe, so it may lose this race.
            r = reader.next(&mut rd) => {
                device.missed_pings.store(0, Ordering::Relaxed);
                if r.is_ok() && !rate.allow() {
                    gw.metrics.rate_limited_closes.increment(1);
                    device.outbox.close(Close::Frame { code: CloseCode::Policy, reason: "too many client frames".into() });
                    break false;
                }
                match r {
                    Ok(ClientFrame::Ping(payload)) => device.outbox.push_control(frame::encode(frame::OP_PONG, &payload)),
                    Ok(ClientFrame::Pong | ClientFrame::Data { .. }) => {}
                    Ok(ClientFrame::Close(code)) => {
                        // Echo the client's code, as RFC 6455 asks.
                        device.outbox.close(Close::Frame { code, reason: String::new() });
                        break false;
                    }
                    Err(e @ (ReadError::TooBig | ReadError::Protocol(_) | ReadError::Utf8(_))) => {
                        if e == ReadError::TooBig {
                            gw.metrics.oversize_closes.increment(1);
                        }
                        let code = e.close_code().expect("a frame error has a close code");
                        let reason = match e {
                            ReadError::TooBig => "frame too big",
                            ReadError::Protocol(why) | ReadError::Utf8(why) => why,
                            _ => "",
                        };
                        device.outbox.close(Close::Frame { code, reason: reason.into() });
                        break false;
                    }
                    Err(ReadError::Eof | ReadError::Io(_)) => {
                        device.outbox.close(Close::Abort);
                        break false;
                    }
                }
            }
            _ = &mut writer => break true,
        }
    };
    // Our writer stops on its own; the stream state of the reader may be
    // mid-frame now, so only raw bytes are drained from here on.
    let wrote_close = if writer_done { true } else { (&mut writer).await.unwrap_or(false) };
    gw.sessions.unregister(&device);
    if wrote_close {
        Box::pin(linger(&mut rd)).await;
    }
}

/// Queues the feed's events newer than `since` ahead of the live ones
/// (the device is registered already, so nothing published meanwhile is
/// missed). Events that live delivery has queued already are left out of
/// the replay; one that arrives live just after it still comes twice,
/// recognisable by its id. If the feed cannot be read, the device is
/// closed with 1011 to reconnect later rather than silently miss events,
/// and live events queued meanwhile are dropped: delivering them would
/// move the client's next `since` past the gap.
pub(crate) async fn recover(gw: &Gateway, device: &Device, since: &str) {
    match gw.recoveries.replay(gw, &device.user, since).await {
        Ok(replay) => {
            let now = contract::event::now_micros();
            if replay.cut.is_some() {
                gw.metrics.recovery_cuts.increment(1);
            }
            let pushed = device.outbox.prepend_with(|live| {
                let queued: HashSet<&str> = live.iter().filter_map(|q| event_id(&q.frame)).collect();
                let frames: Vec<Queued> = replay
                    .cut
                    .iter()
                    .chain(replay.events.iter().filter(|(id, _)| !queued.contains(id.as_str())).map(|(_, f)| f))
                    .map(|f| Queued { frame: f.clone(), published_at_us: now })
                    .collect();
                frames
            });
            gw.metrics.recovered.increment(pushed as u64);
        }
        Err(e) => {
            tracing::warn!("{e}");
            device.outbox.close_discarding(Close::Frame { code: CloseCode::Internal, reason: e.to_string() });
        }
    }
}

/// Client frames per one-second window. A fixed window (two counters, no
/// allocation) is enough: it only has to stop a client that floods, and a
/// flood is far above the limit in every window.
struct FrameRate {
    limit: u32,
    window_start: tokio::time::Instant,
    count: u32,
}

impl FrameRate {
    fn new(limit: u32) -> FrameRate {
        FrameRate { limit, window_start: tokio::time::Instant::now(), count: 0 }
    }

    /// Counts a frame; false once the window's limit is passed.
    fn allow(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.count = 0;
        }
        self.count += 1;
        self.count <= self.limit
    }
}

/// The `id` of a queued event frame.
fn event_id(frame: &[u8]) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        id: &'a str,
    }
    serde_json::from_slice::<Id>(frame::payload(frame)?).ok().map(|e| e.id)
}

/// Reads and drops bytes until the peer closes or the linger time is up.
pub(crate) async fn linger<R: AsyncRead + Unpin>(rd: &mut R) {
    let mut scratch = [0u8; 256];
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Ok(n) = rd.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Writes the device's frames until it is closed. Returns whether a close
/// frame was written (so the peer deserves a linger).
async fn write_loop(gw: Arc<Gateway>, wr: Arc<OwnedWriteHalf>, device: Arc<Device>) -> bool {
    let wrote_close = write_batches(&gw, &wr, &device).await;
    // The last handles on the write half: dropping it sends FIN.
    drop(device.outbox.detach());
    drop(wr);
    wrote_close
}

async fn write_batches(gw: &Gateway, wr: &OwnedWriteHalf, device: &Device) -> bool {
    loop {
        let Batch { mut frames, control, close } = device.outbox.take().await;
        let n = frames.len();
        // The common case at any rate: one event, nothing else. Written
        // without building vectors.
        if n == 1 && control.is_empty() && close.is_none() {
            let Queued { frame, published_at_us } = frames.pop_front().expect("one frame");
            if let Err(e) = write_one(wr, frame).await {
                tracing::debug!(device = device.id, "write failed: {e}");
                gw.metrics.write_failed.increment(1);
                device.outbox.close(Close::Abort);
                return false;
            }
            gw.metrics.delivered.increment(1);
            gw.metrics.latency.record(contract::event::now_micros().saturating_sub(published_at_us) as f64 / 1e6);
            continue;
        }
        let mut bufs: Vec<Bytes> = control;
        let published: Vec<u64> = frames.iter().map(|q| q.published_at_us).collect();
        bufs.extend(frames.drain(..).map(|Queued { frame, .. }| frame));
        if let Some(Close::Frame { code, reason }) = &close {
            bufs.push(frame::close(*code, reason));
        }
        let stall = if close.is_some() { CLOSE_WRITE_TIMEOUT } else { WRITE_STALL_TIMEOUT };
        if let Err(e) = Box::pin(write_all(wr, &mut bufs, stall)).await {
            tracing::debug!(device = device.id, "write failed: {e}");
            gw.metrics.write_failed.increment(n as u64);
            device.outbox.close(Close::Abort);
            return false;
        }
        if n > 0 {
            gw.metrics.delivered.increment(n as u64);
            let now = contract::event::now_micros();
            for p in published {
                gw.metrics.latency.record(now.saturating_sub(p) as f64 / 1e6);
            }
        }
        match close {
            None => {}
            Some(Close::Abort) => return false,
            Some(Close::Frame { .. }) => return true,
        }
    }
}

/// Writes every buffer, `MAX_IOVECS` per syscall, each write bounded by
/// the stall timeout.
pub(crate) async fn write_all(wr: &OwnedWriteHalf, bufs: &mut [Bytes], stall: Duration) -> std::io::Result<()> {
    let mut start = 0;
    while start < bufs.len() {
        let end = (start + MAX_IOVECS).min(bufs.len());
        let slices: Vec<IoSlice<'_>> = bufs[start..end].iter().map(|b| IoSlice::new(b)).collect();
        // Try first: a socket with room (nearly always) needs no timer.
        let written = match wr.try_write_vectored(&slices) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                drop(slices);
                wait_writable(wr, stall).await?;
                continue;
            }
            other => other?,
        };
        drop(slices);
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 {
            let b = &mut bufs[start];
            let take = left.min(b.len());
            b.advance(take);
            left -= take;
            if b.is_empty() {
                start += 1;
            }
        }
        while start < bufs.len() && bufs[start].is_empty() {
            start += 1;
        }
    }
    Ok(())
}

/// Writes one buffer: straight away if the socket has room, else waiting
/// at most the stall timeout.
async fn write_one(wr: &OwnedWriteHalf, mut buf: Bytes) -> std::io::Result<()> {
    loop {
        match wr.try_write(&buf) {
            Ok(n) if n == buf.len() => return Ok(()),
            Ok(n) => buf.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_writable(wr, WRITE_STALL_TIMEOUT).await?,
            Err(e) => return Err(e),
        }
    }
}

/// Waits until the socket takes more, at most the stall timeout. Boxed:
/// rare, and the timer would otherwise sit in every writer's state.
async fn wait_writable(wr: &OwnedWriteHalf, stall: Duration) -> std::io::Result<()> {
    Box::pin(tokio::time::timeout(stall, wr.writable()))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled"))?
}

async fn write_with_timeout(wr: &mut OwnedWriteHalf, buf: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_STALL_TIMEOUT, wr.write_all(buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled"))?
}
