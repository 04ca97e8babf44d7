use std::process::ExitCode;

use clap::Parser;
use loadtest::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init("warn") {
        eprintln!("loadtest: {e}");
        return ExitCode::from(2);
    }
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
