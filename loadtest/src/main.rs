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
            Command::Run(args) => {
                let json = args.json.clone();
                let report = match loadtest::run::run(args).await {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("loadtest: {e:#}");
                        return ExitCode::FAILURE;
                    }
                };
                report.print_summary();
                if let Some(path) = json {
                    let text = serde_json::to_string_pretty(&report).expect("report serializes");
                    if let Err(e) = std::fs::write(&path, text) {
                        eprintln!("loadtest: cannot write {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                }
                if report.messages.lost > 0 || report.connections.failed > 0 {
                    return ExitCode::from(3);
                }
                ExitCode::SUCCESS
            }
        }
    })
}
