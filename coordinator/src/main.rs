//! `shardline-coordinator --config FILE`: parses and validates the config
//! (exit 2 on a bad one, nothing started), then serves until SIGTERM/SIGINT.
//! The first signal drains (close the API, flush the store); a second exits
//! at once. A store failure while serving exits 1 with the error (see
//! [`shardline_coordinator::serve`]), for a supervisor to restart it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use shardline_coordinator::config::{Config, ConfigFile};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "shardline-coordinator",
    version,
    about = "shardline's coordinator: leases, checkpoints, assignment"
)]
struct Args {
    /// The TOML config file.
    #[arg(long, short, env = "SHARDLINE_CONFIG")]
    config: PathBuf,
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
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        let result = shardline_coordinator::serve(config, shutdown, |addr| {
            // A machine-readable line for scripts and tests that use port 0.
            let mut out = std::io::stdout();
            let _ = writeln!(out, "listening {addr}");
            let _ = out.flush();
        })
        .await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    });
    // Bounded: after a store failure a blocking flush may never return, and
    // dropping the runtime would wait for it forever instead of exiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("shutting down: draining (send the signal again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    std::process::exit(130);
}
