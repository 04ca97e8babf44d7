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
use tracing::Instrument;

use crate::close::{CloseCode, CloseReason};
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
/// The linger after the close of a device that fell behind: its backlog
/// and close frame are still in the kernel, and it answers pings it finds
/// there once it reads again. Were the socket closed meanwhile, those
/// answers would meet a closed socket, which resets the connection and
/// discards the close frame. Long enough for a device that paused (a
/// phone's app switch, a GC pause) to come back; a few hundred bytes of
/// task per slow device meanwhile.
const SLOW_CLOSE_LINGER: Duration = Duration::from_secs(10);
/// Send-buffer room added, beyond the bytes themselves, for the last
/// frames of a device closed for falling behind (the kernel counts its
/// own bookkeeping per buffer against SO_SNDBUF).
const CLOSE_ROOM: usize = 16 * 1024;
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
        tracing::debug!(error = %e, "setting SO_SNDBUF failed");
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
            gw.metrics.closed(CloseReason::TooManyDevices);
            let close = frame::close(CLOSE_TOO_MANY_DEVICES, &e.to_string());
            if Box::pin(write_with_timeout(&mut wr, &close)).await.is_ok() {
                let _ = wr.shutdown().await;
                Box::pin(linger_for(&mut rd, CLOSE_LINGER)).await;
            }
            return;
        }
    };
    gw.metrics.opened_ok.increment(1);
    device.span(gw.config.node_id()).in_scope(|| tracing::debug!(since = since.as_deref(), "device connected"));
    // The ring may have moved this user between the ownership check and
    // the registration; a reconcile that ran before it did not see this
    // device, so check again now that it is visible.
    match gw.owner_of(&user) {
        Some((true, _)) => {}
        Some((false, owner)) => {
            if device.outbox.close(Close::Frame { code: crate::broker::CLOSE_MOVED, reason: owner.url }) {
                gw.metrics.closed(CloseReason::Moved);
            }
        }
        None => {
            if device
                .outbox
                .close(Close::Frame { code: CloseCode::GoingAway, reason: "node rejoining, reconnect".into() })
            {
                // Not serving yet (handover): the same 1001 as a fenced node's.
                gw.metrics.closed(CloseReason::Fenced);
            }
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
                    break None;
                }
                match r {
                    Ok(ClientFrame::Ping(payload)) => device.outbox.push_control(frame::encode(frame::OP_PONG, &payload)),
                    Ok(ClientFrame::Pong | ClientFrame::Data { .. }) => {}
                    Ok(ClientFrame::Close(code)) => {
                        // Echo the client's code, as RFC 6455 asks.
                        if device.outbox.close(Close::Frame { code, reason: String::new() }) {
                            gw.metrics.closed(CloseReason::ClientClosed);
                        }
                        break None;
                    }
                    Err(e @ (ReadError::TooBig | ReadError::Protocol(_) | ReadError::Utf8(_))) => {
                        let why = match e {
                            ReadError::TooBig => CloseReason::FrameTooBig,
                            ReadError::Utf8(_) => CloseReason::InvalidUtf8,
                            _ => CloseReason::ProtocolError,
                        };
                        let code = e.close_code().expect("a frame error has a close code");
                        let reason = match e {
                            ReadError::TooBig => "frame too big",
                            ReadError::Protocol(why) | ReadError::Utf8(why) => why,
                            _ => "",
                        };
                        if device.outbox.close(Close::Frame { code, reason: reason.into() }) {
                            gw.metrics.closed(why);
                        }
                        break None;
                    }
                    Err(ReadError::Eof | ReadError::Io(_)) => {
                        if device.outbox.close(Close::Abort) {
                            gw.metrics.closed(CloseReason::ClientGone);
                        }
                        break None;
                    }
                }
            }
            r = &mut writer => break Some(r.unwrap_or(None)),
        }
    };
    // Our writer stops on its own; the stream state of the reader may be
    // mid-frame now, so only raw bytes are drained from here on.
    let lingering = match writer_done {
        Some(l) => l,
        None => (&mut writer).await.unwrap_or(None),
    };
    gw.sessions.unregister(&device);
    device.span(gw.config.node_id()).in_scope(|| tracing::debug!(linger = ?lingering, "device closed"));
    if let Some(d) = lingering {
        Box::pin(linger_for(&mut rd, d)).await;
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
    recover_in_span(gw, device, since).instrument(device.span(gw.config.node_id())).await
}

async fn recover_in_span(gw: &Gateway, device: &Device, since: &str) {
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
            tracing::debug!(since, replayed = pushed, cut = replay.cut.is_some(), "recovered");
        }
        Err(e) => {
            tracing::warn!(since, error = %e, "recovery failed: closing the device with 1011");
            device.outbox.close_discarding(Close::Frame { code: CloseCode::Internal, reason: e.to_string() });
            gw.metrics.closed(CloseReason::RecoveryFailed);
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

/// Reads and drops bytes until the peer closes or `CLOSE_LINGER` is up.
pub(crate) async fn linger<R: AsyncRead + Unpin>(rd: &mut R) {
    linger_for(rd, CLOSE_LINGER).await
}

/// Writes every buffer, each wait for socket space bounded by `stall`; a
/// stall is an error (for writers without an outbox to watch).
pub(crate) async fn write_all(wr: &OwnedWriteHalf, bufs: &mut [Bytes], stall: Duration) -> std::io::Result<()> {
    match write_watched(wr, bufs, false, stall, None).await? {
        Wrote::All => Ok(()),
        Wrote::Behind { .. } => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled")),
    }
}

/// Reads and drops bytes until the peer closes or the linger time is up.
async fn linger_for<R: AsyncRead + Unpin>(rd: &mut R, within: Duration) {
    let mut scratch = [0u8; 256];
    let _ = tokio::time::timeout(within, async {
        while let Ok(n) = rd.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Writes the device's frames until it is closed. Returns how long to
/// linger, if a close frame was written (so the peer deserves a linger).
async fn write_loop(gw: Arc<Gateway>, wr: Arc<OwnedWriteHalf>, device: Arc<Device>) -> Option<Duration> {
    let wrote_close = write_batches(&gw, &wr, &device).await;
    // The last handles on the write half: dropping it sends FIN.
    drop(device.outbox.detach());
    drop(wr);
    wrote_close
}

async fn write_batches(gw: &Gateway, wr: &OwnedWriteHalf, device: &Device) -> Option<Duration> {
    loop {
        let (Batch { mut frames, control, close }, mut partial) = device.outbox.take_marked().await;
        let n = frames.len();
        // The common case at any rate: one event, nothing else, and room
        // in the socket. Written without building vectors or timers.
        if n == 1 && control.is_empty() && close.is_none() {
            let q = frames.front_mut().expect("one frame");
            match wr.try_write(&q.frame) {
                Ok(w) if w == q.frame.len() => {
                    record_sent(gw, &[q.published_at_us]);
                    continue;
                }
                // The rest goes the long way, which must know it is a rest.
                Ok(w) => {
                    q.frame.advance(w);
                    partial |= w > 0;
                }
                // Would block, or failed: the long way finds out again.
                Err(_) => {}
            }
        }
        let c = control.len();
        let mut bufs: Vec<Bytes> = control;
        let published: Vec<u64> = frames.iter().map(|q| q.published_at_us).collect();
        bufs.extend(frames.drain(..).map(|Queued { frame, .. }| frame));
        if let Some(Close::Frame { code, reason }) = &close {
            bufs.push(frame::close(*code, reason));
        }
        let (stall, watch) =
            if close.is_some() { (CLOSE_WRITE_TIMEOUT, None) } else { (WRITE_STALL_TIMEOUT, Some(&device.outbox)) };
        match Box::pin(write_watched(wr, &mut bufs, partial, stall, watch)).await {
            Ok(Wrote::All) => record_sent(gw, &published),
            Ok(Wrote::Behind { next, rest }) if close.is_some() => {
                // Not even the batch with the close fitted: the device is
                // not reading. What follows the frame in progress is
                // dropped; that rest and the close frame are left to the
                // kernel.
                let sent = next.saturating_sub(c).min(n);
                record_sent(gw, &published[..sent]);
                gw.metrics.dropped_slow.increment((n - sent) as u64);
                let Some(Close::Frame { .. }) = close else { return None };
                let close_frame = bufs.last().cloned().expect("the close frame");
                let tail = if next + 1 == bufs.len() {
                    vec![rest.unwrap_or(close_frame)]
                } else {
                    rest.into_iter().chain([close_frame]).collect()
                };
                let span = device.span(gw.config.node_id());
                return Box::pin(finish_in_raised_buffer(wr, tail).instrument(span)).await;
            }
            Ok(Wrote::Behind { next, rest }) => {
                // Frames before `next` are on the wire (or will be, `rest`).
                let sent = next.saturating_sub(c).min(n);
                record_sent(gw, &published[..sent]);
                return Box::pin(close_behind(gw, wr, device, rest, n - sent)).await;
            }
            Err(e) => {
                device.span(gw.config.node_id()).in_scope(|| tracing::debug!(error = %e, "write failed"));
                gw.metrics.write_failed.increment(n as u64);
                if device.outbox.close(Close::Abort) {
                    gw.metrics.closed(CloseReason::WriteFailed);
                }
                return None;
            }
        }
        match close {
            None => {}
            Some(Close::Abort) => return None,
            Some(Close::Frame { .. }) => return Some(CLOSE_LINGER),
        }
    }
}

/// Counts frames written and their latency.
fn record_sent(gw: &Gateway, published: &[u64]) {
    if published.is_empty() {
        return;
    }
    gw.metrics.delivered.increment(published.len() as u64);
    let now = contract::event::now_micros();
    for p in published {
        gw.metrics.latency.record(now.saturating_sub(*p) as f64 / 1e6);
    }
}

/// Ends a device that fell behind: its queue overflowed, or its socket
/// took nothing for the stall timeout. The backlog is dropped, and the
/// rest of the frame in progress plus a 4008 close frame are handed to
/// the kernel, which sends them once the device reads again (also after
/// this task has dropped the socket). The socket is full, so its send
/// buffer is first raised by just that much: bounded, and the close can
/// reach the device rather than a bare FIN after the data. `unsent`:
/// event frames of the writer's batch that were not written.
async fn close_behind(
    gw: &Gateway,
    wr: &OwnedWriteHalf,
    device: &Device,
    rest: Option<Bytes>,
    unsent: usize,
) -> Option<Duration> {
    let slow = Close::Frame { code: crate::outbox::CLOSE_SLOW_CONSUMER, reason: "slow consumer".into() };
    let stalled = !device.outbox.falling_behind();
    let (close, queued) = device.outbox.abandon(slow);
    if stalled && matches!(close, Close::Frame { code: crate::outbox::CLOSE_SLOW_CONSUMER, .. }) {
        // An overflow was counted where it happened; a stall is counted here.
        gw.metrics.slow_closes.increment(1);
    }
    gw.metrics.dropped_slow.increment((unsent + queued) as u64);
    let Close::Frame { code, reason } = close else { return None };
    let tail = rest.into_iter().chain([frame::close(code, &reason)]).collect();
    finish_in_raised_buffer(wr, tail).instrument(device.span(gw.config.node_id())).await
}

/// Writes `bufs` (the rest of a frame in progress and a close frame) to a
/// socket that is full, by raising its send buffer by just that much.
/// Returns the linger for a device this far behind, if they were written.
///
/// The first write goes to the kernel directly, not through tokio: tokio
/// saw this socket would block and tries it again only once the kernel
/// reports it writable, which Linux does only when a third of the buffer
/// is free (`sk_stream_wspace >= sk_wmem_queued / 2`), far more than the
/// room added here. The kernel's send path itself asks only for room
/// below the new size, so the direct write takes the tail at once. (Left
/// to tokio, the close was written only when the frame in progress left
/// enough room by chance: a timing-dependent 4008 in `slow_consumer`.)
async fn finish_in_raised_buffer(wr: &OwnedWriteHalf, mut bufs: Vec<Bytes>) -> Option<Duration> {
    let need: usize = bufs.iter().map(Bytes::len).sum();
    let sock = socket2::SockRef::from(wr.as_ref());
    if let Ok(now) = sock.send_buffer_size() {
        // Linux reports the doubled size and doubles what it is given.
        if let Err(e) = sock.set_send_buffer_size(now / 2 + need + CLOSE_ROOM) {
            tracing::debug!(error = %e, "raising SO_SNDBUF for the close");
        }
    }
    let mut start = 0;
    loop {
        while start < bufs.len() && bufs[start].is_empty() {
            start += 1;
        }
        if start == bufs.len() {
            break;
        }
        let slices: Vec<IoSlice<'_>> = bufs[start..].iter().map(|b| IoSlice::new(b)).collect();
        let written = match sock.send_vectored(&slices) {
            Ok(0) => return None,
            Ok(n) => n,
            // Not even the raised buffer took it all: wait for the kernel.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => {
                tracing::debug!(error = %e, "writing the close failed");
                return None;
            }
        };
        drop(slices);
        let mut left = written;
        while left > 0 {
            let take = left.min(bufs[start].len());
            bufs[start].advance(take);
            left -= take;
            if bufs[start].is_empty() {
                start += 1;
            }
        }
    }
    if start == bufs.len() {
        return Some(SLOW_CLOSE_LINGER);
    }
    match write_watched(wr, &mut bufs[start..], false, CLOSE_WRITE_TIMEOUT, None).await {
        Ok(Wrote::All) => Some(SLOW_CLOSE_LINGER),
        Ok(Wrote::Behind { .. }) => {
            tracing::debug!("the close did not fit in the raised send buffer");
            None
        }
        Err(e) => {
            tracing::debug!(error = %e, "writing the close failed");
            None
        }
    }
}

/// How far a write got.
enum Wrote {
    All,
    /// The device fell behind before everything was written. `next`: the
    /// first buffer not fully written; `rest`: its unwritten part if its
    /// start is on the wire already (it must be finished before a close).
    Behind {
        next: usize,
        rest: Option<Bytes>,
    },
}

/// Writes every buffer, `MAX_IOVECS` per syscall, each wait for socket
/// space bounded by `stall`. With `watch`, also gives up as soon as that
/// outbox is closed for falling behind. `partial`: the first buffer is the
/// rest of a frame whose start is on the wire.
async fn write_watched(
    wr: &OwnedWriteHalf,
    bufs: &mut [Bytes],
    mut partial: bool,
    stall: Duration,
    watch: Option<&crate::outbox::Outbox>,
) -> std::io::Result<Wrote> {
    let mut start = 0;
    while start < bufs.len() {
        let end = (start + MAX_IOVECS).min(bufs.len());
        let slices: Vec<IoSlice<'_>> = bufs[start..end].iter().map(|b| IoSlice::new(b)).collect();
        // Try first: a socket with room (nearly always) needs no timer.
        let written = match wr.try_write_vectored(&slices) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                drop(slices);
                if !Box::pin(wait_writable(wr, stall, watch)).await? {
                    return Ok(Wrote::Behind { next: start, rest: partial.then(|| bufs[start].clone()) });
                }
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
            partial = true;
            if b.is_empty() {
                start += 1;
                partial = false;
            }
        }
        while start < bufs.len() && bufs[start].is_empty() {
            start += 1;
            partial = false;
        }
    }
    Ok(Wrote::All)
}

/// Waits until the socket takes more: true, or false when it took nothing
/// for `stall` or `watch` was closed for falling behind meanwhile.
async fn wait_writable(
    wr: &OwnedWriteHalf,
    stall: Duration,
    watch: Option<&crate::outbox::Outbox>,
) -> std::io::Result<bool> {
    let deadline = tokio::time::Instant::now() + stall;
    loop {
        tokio::select! {
            r = wr.writable() => return r.map(|()| true),
            _ = tokio::time::sleep_until(deadline) => return Ok(false),
            _ = async { watch.expect("guarded").woken().await }, if watch.is_some() => {
                if watch.is_some_and(|o| o.falling_behind()) {
                    return Ok(false);
                }
            }
        }
    }
}

async fn write_with_timeout(wr: &mut OwnedWriteHalf, buf: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_STALL_TIMEOUT, wr.write_all(buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write stalled"))?
}
