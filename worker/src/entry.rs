//! [`main`]: everything the stock `shardline-worker` binary does, for a
//! user's own worker binary in one call: the command line (`--config FILE`
//! or `SHARDLINE_WORKER_CONFIG`, `--worker-id`), logging to stderr
//! (`RUST_LOG`, default `info`), the config loaded and checked (exit 2
//! naming the field), metrics from the config, the first SIGTERM/SIGINT
//! draining and a second exiting at once, and the exit codes (0 after a
//! drain, 2 for what the operator must fix, 1 for the rest).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::{ConfigFile, Handlers, WorkerConfig, WorkerError};

#[derive(Parser)]
#[command(version, about = "A shardline worker node")]
struct Args {
    /// The TOML config file.
    #[arg(long, short, env = "SHARDLINE_WORKER_CONFIG")]
    config: PathBuf,
    /// Overrides `worker_id` in the config.
    #[arg(long)]
    worker_id: Option<String>,
}

/// Runs a worker node hosting `handlers` until SIGTERM/SIGINT, as the
/// stock binary does; returns the process's exit code:
///
/// ```no_run
/// # use shardline_worker::Handlers;
/// fn main() -> std::process::ExitCode {
///     shardline_worker::main(Handlers::new() /* .with::<MyHandler>("mine") */)
/// }
/// ```
pub fn main(handlers: Handlers) -> ExitCode {
    let args = Args::parse();
    logging();
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
        tokio::spawn(crate::drain_on_signals(shutdown.clone()));
        let Err(e) = crate::run(config, handlers, shutdown).await else {
            return ExitCode::SUCCESS;
        };
        tracing::error!(error = %e, "the worker stopped");
        eprintln!("error: {e}");
        let usage = matches!(e, WorkerError::Init(_) | WorkerError::Config(_) | WorkerError::Metrics { .. });
        if usage { ExitCode::from(2) } else { ExitCode::FAILURE }
    })
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), coloured on
/// a terminal. A subscriber installed already (by an embedding program)
/// is kept.
fn logging() {
    let installed = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    if installed.is_err() {
        tracing::debug!("a tracing subscriber was installed already; keeping it");
    }
}
