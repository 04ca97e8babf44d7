//! The process's life: connect the services, serve the API and run the
//! fan-out workers, and on shutdown stop accepting, drain requests under
//! the grace timeout and stop the workers (a job in progress is rolled
//! back and stays in the outbox for the next worker).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{metrics_router, router};
use crate::state::Backend;
use crate::{fanout, outbox};

/// How often metrics upkeep runs: histograms are drained into their
/// summaries and the outbox gauges are read, whether or not anyone scrapes
/// `/metrics` (without upkeep, unscraped histograms grow with every request).
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

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
    let mut background = start_background(&backend, &stop);
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = crate::http::serve(listener, router(backend.clone()), backend.clone(), async move {
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
    while background.join_next().await.is_some() {}
    Ok(())
}

/// Runs only fan-out workers (`backend worker`), with `/metrics` and
/// `/healthz` on `metrics_listener`, until `shutdown` resolves.
pub async fn run_workers(
    metrics_listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let backend = Backend::connect(config).await?;
    let stop = CancellationToken::new();
    let mut background = start_background(&backend, &stop);
    tracing::info!(
        workers = backend.config.workers,
        metrics = %metrics_listener.local_addr()?,
        "fan-out workers running"
    );
    let metrics = crate::http::serve(metrics_listener, metrics_router(backend.clone()), backend.clone(), shutdown);
    metrics.await?;
    stop.cancel();
    while background.join_next().await.is_some() {}
    Ok(())
}

/// The workers, the outbox listener that wakes them, and metrics upkeep.
fn start_background(backend: &Arc<Backend>, stop: &CancellationToken) -> JoinSet<()> {
    let mut set = JoinSet::new();
    if backend.config.workers > 0 {
        let db_config = backend.config.database_url.parse().expect("validated");
        set.spawn(outbox::listen(
            db_config,
            backend.config.fanout_queue.clone(),
            backend.outbox_wake.clone(),
            stop.clone(),
        ));
    }
    for i in 0..backend.config.workers {
        set.spawn(fanout::run_worker(backend.clone(), i, stop.clone()));
    }
    set.spawn(upkeep(backend.clone(), stop.clone()));
    set
}

async fn upkeep(backend: Arc<Backend>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        backend.metrics.upkeep();
        if backend.config.workers == 0 {
            continue;
        }
        let read = async {
            let client = backend.db.get().await?;
            anyhow::Ok(outbox::backlog(&client, &backend.config.fanout_queue).await?)
        };
        match read.await {
            Ok((jobs, failing, oldest)) => backend.metrics.outbox(jobs, failing, oldest),
            Err(e) => tracing::debug!(error = %format_args!("{e:#}"), "outbox gauges not updated"),
        }
    }
}
