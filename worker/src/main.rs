//! `shardline-worker`: joins a coordinator's fleet and holds the leases it
//! is given. The first SIGTERM/SIGINT releases every lease and leaves; a
//! second exits at once.

use std::process::ExitCode;

use clap::Parser;
use shardline_worker::{Session, SessionConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "shardline-worker", version, about = "A shardline worker node")]
struct Args {
    /// The coordinator's gRPC URL.
    #[arg(long, env = "SHARDLINE_COORDINATOR", default_value = "http://127.0.0.1:7400")]
    coordinator: String,
    /// This worker's id; unique in the fleet. Default: host name, pid.
    #[arg(long, env = "SHARDLINE_WORKER_ID")]
    worker_id: Option<String>,
    /// A handler this worker hosts (repeat for several).
    #[arg(long = "handler", required = true)]
    handlers: Vec<String>,
    /// Most leases to take; 0 = no limit.
    #[arg(long, default_value_t = 0)]
    capacity: u32,
    /// Shared token for the coordinator.
    #[arg(long, env = "SHARDLINE_TOKEN", hide_env_values = true)]
    token: Option<String>,
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
    let worker_id = args.worker_id.unwrap_or_else(default_worker_id);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The session's channel needs the runtime's reactor: build it inside.
    runtime.block_on(async move {
        let session = match Session::new(SessionConfig {
            coordinator: args.coordinator,
            worker_id,
            address: String::new(),
            handlers: args.handlers,
            capacity: args.capacity,
            token: args.token,
        }) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        match shardline_worker::hold::run(session, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let host = if host.is_empty() { "worker".to_owned() } else { host };
    format!("{host}-{}", std::process::id())
}

async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("shutting down: releasing leases (send the signal again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    std::process::exit(130);
}
