//! One SSE device after its request was accepted: its task writes what
//! the device's outbox holds, re-framed for SSE (`wire`), and watches the
//! socket for the client leaving. One task, not two like a WebSocket
//! device: the client has nothing to say after its request.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::wire;
use crate::close::CloseCode;
use crate::connection::{CLOSE_WRITE_TIMEOUT, WRITE_STALL_TIMEOUT, linger, recover, write_all};
use crate::frame;
use crate::outbox::{Batch, Close, Queued};
use crate::sessions::Device;
use crate::state::Gateway;

/// Bytes a client may send after its request before it is closed (1008).
/// `EventSource` sends none; a client that streams data at the gateway is
/// not an SSE client, and reading it for ever would be work for nothing.
const MAX_CLIENT_BYTES: usize = 4096;

/// An SSE client never answers pings, so a dead peer (gone without a
/// reset) is found by TCP: data unacknowledged for this many ping
/// intervals (the pings themselves, at least) ends the connection. Two, as
/// a WebSocket device is dropped after two unanswered pings.
const USER_TIMEOUT_PINGS: u32 = 2;

/// Socket settings of an SSE client's socket, whether the device is held
/// here or relayed to its owner.
pub(super) fn tune(gw: &Gateway, stream: &TcpStream) {
    let sock = socket2::SockRef::from(stream);
    // Bounded like a WebSocket device's (see `connection`): a client that
    // stops reading overflows its send queue (4008) soon after.
    if let Err(e) = sock.set_send_buffer_size(gw.config.device_send_buffer) {
        tracing::debug!(error = %e, "setting SO_SNDBUF failed");
    }
    if let Err(e) = sock.set_tcp_user_timeout(Some(gw.config.ping_interval * USER_TIMEOUT_PINGS)) {
        tracing::debug!(error = %e, "setting TCP_USER_TIMEOUT failed");
    }
}

/// Serves a registered SSE device on the socket taken over from hyper,
/// `since` being its resume point, until it closes.
pub async fn serve(gw: Arc<Gateway>, stream: TcpStream, device: Arc<Device>, since: Option<String>) {
    tune(&gw, &stream);
    let (mut rd, wr) = stream.into_split();
    // Boxed: a device's task is as big as its largest await state.
    device.span(gw.config.node_id()).in_scope(|| tracing::debug!(since = since.as_deref(), "device connected"));
    let wrote_close = Box::pin(run(&gw, &rd, &wr, &device, since)).await;
    gw.sessions.unregister(&device);
    device.span(gw.config.node_id()).in_scope(|| tracing::debug!(wrote_close, "device closed"));
    // Dropping the write half sends FIN; the client reads the close event
    // before anything else happens to the socket.
    drop(wr);
    if wrote_close {
        Box::pin(linger(&mut rd)).await;
    }
}

/// Returns whether the stream ended with a close event.
async fn run(gw: &Gateway, rd: &OwnedReadHalf, wr: &OwnedWriteHalf, device: &Device, since: Option<String>) -> bool {
    if let Err(e) = write_all(wr, &mut [wire::head()], WRITE_STALL_TIMEOUT).await {
        device.span(gw.config.node_id()).in_scope(|| tracing::debug!(error = %e, "writing the SSE head failed"));
        return false;
    }
    if let Some(since) = since {
        Box::pin(recover(gw, device, &since)).await;
    }
    let mut received = 0usize;
    loop {
        tokio::select! {
            // Both cancel-safe.
            batch = device.outbox.take() => {
                if let Some(wrote_close) = write_batch(gw, wr, device, batch).await {
                    return wrote_close;
                }
            }
            r = rd.readable() => {
                if let Err(e) = r {
                    device.span(gw.config.node_id()).in_scope(|| tracing::debug!(error = %e, "SSE socket failed"));
                    device.outbox.close(Close::Abort);
                    return false;
                }
                match drain(rd) {
                    Ok(0) => {
                        // The client left (or TCP gave up on it).
                        device.outbox.close(Close::Abort);
                        return false;
                    }
                    Ok(n) => {
                        received += n;
                        if received > MAX_CLIENT_BYTES {
                            device.outbox.close(Close::Frame {
                                code: CloseCode::Policy,
                                reason: "an SSE client sends nothing after its request".into(),
                            });
                        }
                    }
                    Err(()) => {}
                }
            }
        }
    }
}

/// Reads and drops what the client sent: `Ok(0)` when it closed or the
/// socket failed, `Err` when nothing was there after all. The buffer is
/// on the stack of this call, not in the device's task.
fn drain(rd: &OwnedReadHalf) -> Result<usize, ()> {
    let mut scratch = [0u8; 512];
    match rd.try_read(&mut scratch) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(()),
        Err(_) => Ok(0),
    }
}

/// Writes one batch. `None` to go on, else whether a close event was
/// written (the stream is over either way).
async fn write_batch(gw: &Gateway, wr: &OwnedWriteHalf, device: &Device, batch: Batch) -> Option<bool> {
    let Batch { frames, control, close } = batch;
    let n = frames.len();
    let mut bufs: Vec<Bytes> = Vec::with_capacity(1 + 3 * n + 1);
    // Control frames are the keepalive's pings (an SSE client sends no
    // pings, so no pongs are due): one comment for all of them.
    let ping = control.iter().any(|c| c.first().is_some_and(|b| b & 0x0F == frame::OP_PING));
    if ping {
        bufs.push(Bytes::from_static(wire::PING));
    }
    let published: Vec<u64> = frames.iter().map(|q| q.published_at_us).collect();
    for Queued { frame, .. } in &frames {
        wire::message(frame, &mut bufs);
    }
    drop(frames);
    if let Some(Close::Frame { code, reason }) = &close {
        bufs.push(wire::close(*code, reason));
    }
    let stall = if close.is_some() { CLOSE_WRITE_TIMEOUT } else { WRITE_STALL_TIMEOUT };
    if let Err(e) = Box::pin(write_all(wr, &mut bufs, stall)).await {
        device.span(gw.config.node_id()).in_scope(|| tracing::debug!(error = %e, "write failed"));
        gw.metrics.write_failed.increment(n as u64);
        device.outbox.close(Close::Abort);
        return Some(false);
    }
    if ping {
        // The keepalive counts pings a device leaves unanswered; an SSE
        // device cannot answer, and TCP (`USER_TIMEOUT_PINGS`) watches its
        // liveness instead, so a ping written counts as answered.
        device.missed_pings.store(0, Ordering::Relaxed);
    }
    if n > 0 {
        gw.metrics.delivered.increment(n as u64);
        let now = contract::event::now_micros();
        for p in published {
            gw.metrics.latency.record(now.saturating_sub(p) as f64 / 1e6);
        }
    }
    match close {
        None => None,
        Some(Close::Abort) => Some(false),
        Some(Close::Frame { .. }) => Some(true),
    }
}
