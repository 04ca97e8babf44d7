//! The accept loop and the node's life: start the broker consumer and the
//! keepalive, serve connections, and on shutdown stop accepting, leave the
//! broker, close devices with 1001 and drain under the grace timeout.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::outbox::Close;
use crate::state::{Gateway, SocketGuard};
use crate::{broker, http, keepalive, membership};

pub use crate::state::CLOSE_GOING_AWAY;
/// A client must finish its HTTP request head within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error (EMFILE and friends) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Answer to a connection beyond `max_connections_per_ip`.
const OVER_ADDRESS_LIMIT: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: 45\r\nconnection: close\r\n\r\n{\"message\":\"too many connections from here\"}";
/// Answer to a connection beyond `max_connections`, written without waiting.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: 39\r\nconnection: close\r\n\r\n{\"message\":\"node at connection limit\"}";

/// Runs a node on an already bound listener until `shutdown` resolves.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let gw = Gateway::new(config);
    serve(gw, listener, shutdown).await
}

/// Like [`run`], for callers that keep a handle on the node (tests).
pub async fn serve(gw: Arc<Gateway>, listener: TcpListener, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tracing::info!(node = gw.config.node_id(), addr = %listener.local_addr()?, "gateway listening");
    // A part that ends before it was told to, or panics, fails the node:
    // it stops and the process exits non-zero (a supervisor restarts it)
    // rather than running half-alive.
    let membership = supervise(&gw, "membership", |gw| gw.shutdown.is_cancelled(), membership::run(gw.clone()));
    let broker = supervise(&gw, "broker", |gw| gw.stop_consuming.is_cancelled(), broker::run(gw.clone()));
    let keepalive = supervise(&gw, "keepalive", |gw| gw.shutdown.is_cancelled(), keepalive::run(gw.clone()));

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => accept(&gw, stream, peer.ip()),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            _ = &mut shutdown => break,
            _ = gw.failed.cancelled() => break,
        }
    }

    // Phases, each with a deadline, so a stop ends well inside the
    // supervisor's grace even when Redis or the broker do not answer.
    tracing::info!(devices = gw.sessions.device_count(), "shutting down: closing the devices");
    gw.shutdown.cancel(); // Leaves the ring; stops the keepalive.
    phase("leaving the ring", membership).await;
    phase("stopping the keepalive", keepalive).await;
    // The tombstone is written: the others bind this node's slots within a
    // poll and take over its queue, delivering what reaches it from now on
    // (`departed`). So consuming stops now, before the devices go: a
    // device must not get, from here, an event newer than one that the
    // new owner delivers (its `since` would skip the older one).
    gw.stop_consuming.cancel();
    phase("leaving the broker", broker).await;
    // The listener closes only now: until the tombstone is out, a refused
    // connect would tell the others this node died (see `membership`).
    drop(listener);
    gw.sessions.for_each_device(|d| {
        if d.outbox.close(Close::Frame { code: CLOSE_GOING_AWAY, reason: "node shutting down".into() }) {
            gw.metrics.closed(crate::close::CloseReason::Shutdown);
        }
    });
    gw.tasks.close();
    if tokio::time::timeout(gw.config.shutdown_grace, gw.tasks.wait()).await.is_err() {
        tracing::warn!(devices = gw.sessions.device_count(), "grace period over with devices still open");
    }
    match gw.failure() {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

/// Longest wait for one shutdown phase (leaving the ring, the broker).
const PHASE_DEADLINE: Duration = Duration::from_secs(3);

async fn phase(what: &str, task: tokio::task::JoinHandle<()>) {
    if tokio::time::timeout(PHASE_DEADLINE, task).await.is_err() {
        tracing::warn!(phase = what, deadline = ?PHASE_DEADLINE, "shutdown phase took longer than its deadline; going on");
    }
}

/// Runs `task`; if it ends while `expected` says it should not, or panics,
/// the node fails.
fn supervise(
    gw: &Arc<Gateway>,
    name: &'static str,
    expected: fn(&Gateway) -> bool,
    task: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let gw = gw.clone();
    let task = tokio::spawn(task);
    tokio::spawn(async move {
        match task.await {
            Ok(()) if expected(&gw) => {}
            Ok(()) => gw.fail(format!("the {name} task ended on its own")),
            Err(e) => gw.fail(format!("the {name} task failed: {e}")),
        }
    })
}

fn accept(gw: &Arc<Gateway>, stream: TcpStream, ip: std::net::IpAddr) {
    let Ok(addr) = crate::admission::AddressGuard::try_new(gw, ip) else {
        gw.metrics.opened_over_address_limit.increment(1);
        let _ = stream.try_write(OVER_ADDRESS_LIMIT);
        return;
    };
    let Some(pending) = crate::admission::PendingGuard::try_new(gw) else {
        gw.metrics.opened_over_unauthenticated_limit.increment(1);
        let _ = stream.try_write(OVER_CAPACITY);
        return;
    };
    let Some(guard) = SocketGuard::try_new(gw, addr) else {
        gw.metrics.opened_over_capacity.increment(1);
        let _ = stream.try_write(OVER_CAPACITY);
        return;
    };
    // Events are small and batched by the writer: send them at once.
    let _ = stream.set_nodelay(true);
    let gw = gw.clone();
    let tasks = gw.tasks.clone();
    tasks.spawn(async move {
        let svc_gw = gw.clone();
        // Shared with the handlers, so an SSE stream can take it over.
        let (socket, takeover) = crate::takeover::Socket::new(stream);
        let service = service_fn(move |req| http::handle(svc_gw.clone(), guard.clone(), takeover.clone(), req));
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(socket), service)
            .with_upgrades();
        tokio::pin!(conn);
        // Pending until hyper hands the upgraded socket over (the
        // connection future ends then) or the deadline ends it.
        let _pending = pending;
        tokio::select! {
            r = conn.as_mut() => { if let Err(e) = r { tracing::debug!(error = %e, "http connection ended"); } }
            _ = tokio::time::sleep(gw.config.handshake_timeout) => {
                gw.metrics.handshake_timeouts.increment(1);
            }
            _ = gw.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    });
}
