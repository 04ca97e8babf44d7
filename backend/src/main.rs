use std::process::ExitCode;

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
