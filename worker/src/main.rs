//! `shardline-worker --config FILE`: a worker node hosting the built-in
//! handlers. A bad config exits 2 naming the field; the first
//! SIGTERM/SIGINT drains, a second exits at once.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use shardline_worker::{ConfigFile, WorkerConfig, WorkerError};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "shardline-worker", version, about = "A shardline worker node with the built-in handlers")]
struct Args {
    /// The TOML config file.
    #[arg(long, short, env = "SHARDLINE_WORKER_CONFIG")]
    config: PathBuf,
    /// Overrides `worker_id` in the config.
    #[arg(long)]
    worker_id: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut config = match WorkerConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(id) = args.worker_id {
        config.worker_id = Some(id);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(shardline_worker::drain_on_signals(shutdown.clone()));
        let Err(e) = shardline_worker::run(config, shardline_worker::builtin::handlers(), shutdown).await
        else {
            return ExitCode::SUCCESS;
        };
        eprintln!("error: {e}");
        let usage = matches!(e, WorkerError::Init(_) | WorkerError::Config(_) | WorkerError::Metrics { .. });
        if usage { ExitCode::from(2) } else { ExitCode::FAILURE }
    })
}
