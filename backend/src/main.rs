use std::process::ExitCode;

// Why not the system allocator: each argon2 hash takes a 19 MiB block.
// glibc serves the first from mmap and returns it, but then raises its
// mmap threshold to that size, so later blocks come from its per-thread
// arenas (one per blocking-pool thread that ever hashed, up to 8 per core)
// and stay resident after they are freed: a burst of 48 registrations left
// the process at 838 MiB, for good. jemalloc returns freed pages to the
// system after its decay time, from a background thread even while idle.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use backend::Config;
use backend::config::Mode;
use clap::Parser;

fn main() -> ExitCode {
    let config = match Config::parse().validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("backend: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = logging::init("info") {
        eprintln!("backend: {e}");
        return ExitCode::from(2);
    }
    // Without its background thread, jemalloc purges only when the program
    // allocates: an idle process would keep a burst's pages.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "jemalloc background thread not enabled");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        let result = match config.mode.unwrap_or(Mode::Serve) {
            Mode::Worker => {
                let listener = match tokio::net::TcpListener::bind(config.worker_metrics_listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!(
                            "backend: cannot listen on {} (BACKEND_WORKER_METRICS_LISTEN): {e}",
                            config.worker_metrics_listen
                        );
                        return ExitCode::from(2);
                    }
                };
                backend::run_workers(listener, config, shutdown_signal()).await
            }
            Mode::Serve => {
                let listener = match tokio::net::TcpListener::bind(config.listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("backend: cannot listen on {} (BACKEND_LISTEN): {e}", config.listen);
                        return ExitCode::from(2);
                    }
                };
                backend::run(listener, config, shutdown_signal()).await
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("backend: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
