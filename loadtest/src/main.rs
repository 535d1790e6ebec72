//! `shardline-loadtest`: benchmarks and load tests that drive the real
//! shardline binaries. This file only parses arguments and dispatches; each
//! benchmark lives under [`bench`], the child-process and measurement
//! plumbing in [`child`] and [`stats`].
//!
//! Exit status of `bench`: non-zero only when the harness itself fails (a
//! binary does not start, calls fail). Missed targets are printed, never
//! asserted: the figures depend on the machine and its noise. `run`
//! asserts its scenario's thresholds (exit 1) and exits 2 for an invalid
//! scenario file.

mod bench;
mod child;
mod run;
mod stats;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "shardline-loadtest", version, about = "Benchmarks and load tests for shardline")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measures one component in isolation and prints its figures.
    #[command(subcommand)]
    Bench(BenchTarget),
    /// Runs a load-test scenario (TOML) against the real coordinator and
    /// workers: records produced on a rate profile, faults on schedule,
    /// every record verified through receipts (lost, duplicates, order,
    /// latency, recovery per fault). Exit 0: every threshold held; 1: one
    /// broke or the run failed; 2: the scenario is invalid.
    Run(run::Args),
}

#[derive(Subcommand)]
enum BenchTarget {
    /// The coordinator alone (static streams, no Kafka): checkpoint
    /// throughput, and a simulated fleet's heartbeat latency and memory.
    Coordinator(bench::coordinator::Args),
    /// End to end through a real Kafka-compatible broker: a raw rdkafka
    /// consumer's rate against the coordinator and one worker's, and the
    /// worker's memory.
    Kafka(bench::kafka::Args),
    /// End to end through a real RabbitMQ: a raw lapin consumer's rate
    /// against the coordinator and one worker's on the same queue, and the
    /// worker's memory.
    Amqp(bench::amqp::Args),
    /// The `function` handler kind's cost: the same Kafka records through
    /// a Python no-op Lambda function (Runtime API) and through the
    /// in-process `noop` handler; the ratio of their rates and the
    /// overhead per invocation.
    Function(bench::function::Args),
    /// Produce-to-handler-start latency through the coordinator and one
    /// worker (`forward`), next to produce-to-poll of a raw rdkafka
    /// consumer on the same broker in the same run: shardline's overhead.
    Latency(bench::latency::Args),
    /// `shardline-gateway`'s `POST /v1/streams/...` driven by wrk, next to
    /// a direct rdkafka producer at the same acks and concurrency: rates,
    /// p99 and their ratio.
    Gateway(bench::gateway::Args),
    /// Every benchmark in turn, with one JSON report of all their figures
    /// (compare two with `scripts/bench-compare.sh OLD NEW`).
    All(bench::all::Args),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let run = async {
        match cli.command {
            Command::Bench(BenchTarget::Coordinator(args)) => {
                bench::coordinator::run(args).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Bench(BenchTarget::Kafka(args)) => {
                bench::kafka::run(args).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Bench(BenchTarget::Amqp(args)) => {
                bench::amqp::run(args).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Bench(BenchTarget::Function(args)) => {
                bench::function::run(args).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Bench(BenchTarget::Latency(args)) => {
                bench::latency::run(args).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Bench(BenchTarget::Gateway(args)) => {
                bench::gateway::run(args).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Bench(BenchTarget::All(args)) => bench::all::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Run(args) => run::run(args).await,
        }
    };
    // Dropping `run` on a signal (Ctrl-C is SIGINT) drops the child guards,
    // which kill the coordinators and workers: an interrupted benchmark or
    // scenario leaves no process behind.
    let result = tokio::select! {
        result = run => result,
        signal = interrupted() => Err(anyhow::anyhow!("interrupted by {signal}")),
    };
    match result {
        Ok(code) => code,
        // A scenario that cannot run is a usage error, like a bad flag.
        Err(e) if e.downcast_ref::<run::BadScenario>().is_some() => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            // The context chain says what failed; a backtrace (printed when
            // RUST_BACKTRACE is set) would only bury it.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM, naming the signal.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        // Without handlers the default action (exit) applies anyway; never
        // resolve, so the benchmark is not cut short.
        _ => std::future::pending().await,
    }
}
