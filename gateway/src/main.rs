use std::process::ExitCode;

use clap::Parser;
use gateway::Config;

// jemalloc keeps untouched parts of allocations out of RSS and returns
// freed memory well; idle connections are the memory budget here.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let config = match Config::parse().validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    // lapin logs at ERROR every channel the broker closes with an error
    // code. The gateway gets each one as an `Err` and reports what it
    // means itself: most are expected (a departed queue that another node
    // deleted first answers 404, see `departed`), the rest end the
    // connection and are logged as such. RUST_LOG=lapin=... shows them.
    if let Err(e) = logging::init_quieting("info", &["lapin::channel=off"]) {
        eprintln!("gateway: {e}");
        return ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("gateway: cannot listen on {} (GATEWAY_LISTEN): {e}", config.listen);
                return ExitCode::from(2);
            }
        };
        match gateway::run(listener, config, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gateway: {e:#}");
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
