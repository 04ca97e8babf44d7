//! The accepted socket as hyper sees it, shared with the request handler,
//! so that a handler can take the raw socket over (Server-Sent Events).
//!
//! hyper gives a socket back only on a 101 upgrade. An SSE stream is a 200
//! answer that lasts the device's whole life; served as a hyper body it
//! would keep hyper's connection buffers (an 8 KiB read buffer and an
//! 8 KiB header buffer, a dirty page each) and its connection state for
//! that life: several times what an idle WebSocket device costs. Taken
//! over, an SSE device is a bare socket like a WebSocket one. The price is
//! one small allocation per accepted connection and an uncontended lock
//! per read and write (only hyper's task polls the socket until a handler,
//! running in that same task, takes it).

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

type Slot = Arc<Mutex<Option<TcpStream>>>;

/// The socket hyper serves. Once taken over it reads as closed and
/// swallows writes, so hyper's own answer goes nowhere and its connection
/// ends quietly.
pub struct Socket(Slot);

/// A handler's right to take the socket over.
#[derive(Clone)]
pub struct Takeover(Slot);

impl Socket {
    pub fn new(stream: TcpStream) -> (Socket, Takeover) {
        let slot = Arc::new(Mutex::new(Some(stream)));
        (Socket(slot.clone()), Takeover(slot))
    }

    /// The stream, unless a handler took it (after a WebSocket upgrade).
    pub fn into_stream(self) -> Option<TcpStream> {
        self.0.lock().take()
    }
}

impl Takeover {
    /// Takes the socket from hyper. Call it in the handler's task (the one
    /// hyper polls the socket from) and before the handler returns: hyper
    /// then writes its answer into nothing and ends the connection.
    pub fn take(&self) -> Option<TcpStream> {
        self.0.lock().take()
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match &mut *self.0.lock() {
            Some(s) => Pin::new(s).poll_read(cx, buf),
            None => Poll::Ready(Ok(())), // End of stream.
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match &mut *self.0.lock() {
            Some(s) => Pin::new(s).poll_write(cx, buf),
            None => Poll::Ready(Ok(buf.len())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut *self.0.lock() {
            Some(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true // A TcpStream is.
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut *self.0.lock() {
            Some(s) => Pin::new(s).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut *self.0.lock() {
            Some(s) => Pin::new(s).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}
