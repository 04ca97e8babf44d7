//! The process's life: connect the services, serve the API and run the
//! fan-out workers, and on shutdown stop accepting, drain requests under
//! the grace timeout and stop the workers (a job in progress goes back to
//! the queue unacknowledged).

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::fanout;
use crate::http::router;
use crate::state::Backend;

/// Runs the API and `config.workers` fan-out workers on an already bound
/// listener until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let backend = Backend::connect(config).await?;
    serve(backend, listener, shutdown).await
}

/// Like [`run`], for callers that keep a handle on the backend (tests).
pub async fn serve(
    backend: Arc<Backend>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, workers = backend.config.workers, "backend listening");
    let stop = CancellationToken::new();
    let mut workers = start_workers(&backend, &stop);
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(backend.clone())).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = drain_tx.send(());
    });
    let grace = backend.config.shutdown_grace;
    tokio::select! {
        r = server => r?,
        _ = async { if drain_rx.await.is_ok() { tokio::time::sleep(grace).await } else { std::future::pending().await } } => {
            tracing::warn!("grace period over with requests still in flight");
        }
    }
    stop.cancel();
    while workers.join_next().await.is_some() {}
    backend.jobs.close().await;
    Ok(())
}

/// Runs only fan-out workers (`backend worker`) until `shutdown` resolves.
pub async fn run_workers(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let backend = Backend::connect(config).await?;
    let stop = CancellationToken::new();
    let mut workers = start_workers(&backend, &stop);
    tracing::info!(workers = backend.config.workers, "fan-out workers running");
    shutdown.await;
    stop.cancel();
    while workers.join_next().await.is_some() {}
    Ok(())
}

fn start_workers(backend: &Arc<Backend>, stop: &CancellationToken) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for i in 0..backend.config.workers {
        set.spawn(fanout::run_worker(backend.clone(), i, stop.clone()));
    }
    set
}
