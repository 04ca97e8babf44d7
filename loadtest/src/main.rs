use std::process::ExitCode;

use clap::Parser;
use loadtest::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async {
        match cli.command {
            Command::Worker => match loadtest::worker::run().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("loadtest worker: {e:#}");
                    ExitCode::FAILURE
                }
            },
            Command::Run(args) => match loadtest::run::main(*args).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("loadtest: {e:#}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}
