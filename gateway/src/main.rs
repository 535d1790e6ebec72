//! `shardline-gateway --config FILE`: parses and validates the config
//! (exit 2 on a bad one, nothing started), prints `listening ADDR` on
//! stdout once bound, then serves until SIGTERM/SIGINT (in-flight requests
//! finish, queued records are flushed; a second signal exits at once).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use shardline_gateway::config::{ConfigFile, GatewayConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "shardline-gateway",
    version,
    about = "shardline's HTTP gateway: streams, topics, invocation"
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
                // lapin logs every returned message with its body (a 404
                // here, answered to the client): request data stays out of
                // the log.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("info,lapin::returned_messages=error")
                }),
        )
        .init();
    let config = match GatewayConfig::load(&args.config) {
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
        let result = shardline_gateway::serve(config, shutdown, |addr| {
            // A machine-readable line for scripts and tests that use port 0.
            let mut out = std::io::stdout();
            if let Err(e) = writeln!(out, "listening {addr}").and_then(|()| out.flush()) {
                tracing::warn!(error = %e, "cannot print the listening address");
            }
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
    // Bounded: a blocking metadata read may still be waiting on a broker.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}

/// The first signal drains; a second exits at once.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("draining: finishing in-flight requests");
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}
