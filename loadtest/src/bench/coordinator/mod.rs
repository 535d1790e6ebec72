//! `bench coordinator`: the real coordinator binary with static streams (no
//! Kafka), driven over gRPC by simulated workers.
//!
//! Each mode runs against a fresh coordinator per store (`--store`: sled,
//! PostgreSQL in a fresh schema, or both under the same load, printed side
//! by side), so no run inherits another's store or memory:
//! - [`checkpoints`]: one worker, many leases, checkpoints as fast as the
//!   coordinator acknowledges them (durably: each waits for a group commit);
//! - [`fleet`]: many workers heartbeating and checkpointing at the normal
//!   1/s pace; heartbeat latency and the coordinator's memory are measured;
//! - [`restarts`] (`--mode restarts`, not part of `both`): workers joining
//!   and dying in turn, deregistered or expired; the coordinator's memory
//!   and per-worker series must stay flat.

mod checkpoints;
mod fleet;
mod restarts;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use serde_json::json;

use shardline_testkit::config::Store;
use shardline_testkit::postgres::Schema;

use super::verdict;
use crate::child;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Checkpoint throughput and latency of one worker with many leases.
    Checkpoints,
    /// Heartbeat latency and coordinator memory with a large fleet.
    Fleet,
    /// Both, one after the other.
    Both,
    /// Memory and per-worker series over many worker restarts.
    Restarts,
}

/// Which lease store(s) the coordinator runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreChoice {
    /// sled in a temporary directory.
    Sled,
    /// PostgreSQL (`SHARDLINE_TEST_POSTGRES`, default
    /// postgres://postgres@127.0.0.1:5432/test), a fresh schema per run.
    Postgres,
    /// sled, then PostgreSQL, with the same load; printed side by side.
    Both,
}

impl StoreChoice {
    fn names(self) -> &'static [&'static str] {
        match self {
            Self::Sled => &["sled"],
            Self::Postgres => &["postgres"],
            Self::Both => &["sled", "postgres"],
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The lease store(s) to measure.
    #[arg(long, value_enum, default_value_t = StoreChoice::Both)]
    store: StoreChoice,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,
    /// The coordinator binary [default: `shardline-coordinator` next to this
    /// executable].
    #[arg(long, env = "SHARDLINE_COORDINATOR_BIN")]
    coordinator_bin: Option<PathBuf>,
    /// Measured seconds per mode, after the warm-up [default: 10 for
    /// checkpoints, 20 for fleet].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
    duration: Option<u64>,
    /// Also write the figures to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// HTTP/2 connections the simulated workers share round-robin.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    channels: u64,
    /// Checkpoints mode: leases (partitions), one concurrent caller each.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    checkpoint_leases: u32,
    /// Fleet mode: simulated workers.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    fleet_workers: u32,
    /// Fleet mode: partitions of the one stream.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    fleet_partitions: u32,
    /// Restarts mode: workers that join and die in turn.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    restarts: u32,
}

/// The stream and handler every simulated worker hosts.
const STREAM: &str = "bench";
const HANDLER: &str = "bench";

/// Runs the selected modes, prints their tables and writes the JSON.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let bin =
        child::resolve_bin(args.coordinator_bin.as_deref(), "shardline-coordinator", "--coordinator-bin")?;
    let channels = usize::try_from(args.channels).context("--channels is too large")?;
    let mut report = json!({
        "coordinator_bin": bin.display().to_string(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "channels": channels,
    });
    let mut rows = Vec::new();
    for &name in args.store.names() {
        // The schema lives until this store's modes are measured; dropped
        // (with its tables) after.
        let schema = match name {
            "postgres" => Some(Schema::create("bench").await.context("cannot create a PostgreSQL schema")?),
            _ => None,
        };
        let store = schema.as_ref().map_or(Store::Sled, |s| Store::Postgres(s.url()));
        println!();
        println!("=== store: {name} ===");
        let mut row = Row { store: name, ..Row::default() };
        let mut figures_json = json!({});
        if matches!(args.mode, Mode::Checkpoints | Mode::Both) {
            let settings = checkpoints::Settings {
                leases: args.checkpoint_leases,
                channels,
                warmup: Duration::from_secs(1),
                duration: Duration::from_secs(args.duration.unwrap_or(10)),
            };
            let figures = checkpoints::run(&bin, store.clone(), &settings)
                .await
                .with_context(|| format!("checkpoints benchmark on {name} failed"))?;
            figures.print(&settings);
            (row.checkpoints_per_s, row.checkpoint_p99_ms) = figures.headline();
            figures_json["checkpoints"] = figures.json(&settings);
        }
        if matches!(args.mode, Mode::Fleet | Mode::Both) {
            let settings = fleet::Settings {
                workers: args.fleet_workers,
                partitions: args.fleet_partitions,
                channels,
                duration: Duration::from_secs(args.duration.unwrap_or(20)),
            };
            let figures = fleet::run(&bin, store.clone(), &settings)
                .await
                .with_context(|| format!("fleet benchmark on {name} failed"))?;
            figures.print(&settings);
            (row.heartbeat_p99_ms, row.fleet_rss_mib) = figures.headline();
            figures_json["fleet"] = figures.json(&settings);
        }
        if args.mode == Mode::Restarts {
            let settings = restarts::Settings { restarts: args.restarts };
            let figures = restarts::run(&bin, store.clone(), &settings)
                .await
                .with_context(|| format!("restarts benchmark on {name} failed"))?;
            figures.print(&settings);
            row.fleet_rss_mib = figures.headline();
            figures_json["restarts"] = figures.json(&settings);
        }
        report["stores"][name] = figures_json;
        rows.push(row);
    }
    print_comparison(&rows);
    report["comparison"] = rows.iter().map(Row::json).collect();
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).context("cannot encode the JSON report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

/// One store's headline figures, for the side-by-side table (`None`: the
/// mode was not run).
#[derive(Debug, Default)]
struct Row {
    store: &'static str,
    checkpoints_per_s: Option<f64>,
    checkpoint_p99_ms: Option<f64>,
    heartbeat_p99_ms: Option<f64>,
    fleet_rss_mib: Option<f64>,
}

impl Row {
    fn json(&self) -> serde_json::Value {
        use crate::stats::round3;
        json!({
            "store": self.store,
            "checkpoints_per_s": self.checkpoints_per_s.map(round3),
            "checkpoint_p99_ms": self.checkpoint_p99_ms.map(round3),
            "fleet_heartbeat_p99_ms": self.heartbeat_p99_ms.map(round3),
            "fleet_peak_rss_mib": self.fleet_rss_mib.map(round3),
        })
    }
}

/// The stores side by side: what the issue compares.
fn print_comparison(rows: &[Row]) {
    let cell = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    println!();
    println!("coordinator by store (same load)");
    println!(
        "  {:<10} {:>16} {:>16} {:>18} {:>16}",
        "store", "checkpoints/s", "ckpt p99 ms", "fleet hb p99 ms", "fleet RSS MiB"
    );
    for r in rows {
        println!(
            "  {:<10} {:>16} {:>16} {:>18} {:>16}",
            r.store,
            cell(r.checkpoints_per_s, 0),
            cell(r.checkpoint_p99_ms, 2),
            cell(r.heartbeat_p99_ms, 2),
            cell(r.fleet_rss_mib, 1)
        );
    }
}

/// `e`, and if the coordinator has died, how (its exit status and log):
/// a refused or broken connection says nothing of why.
fn with_death(coordinator: &mut child::Coordinator, e: anyhow::Error) -> anyhow::Error {
    match coordinator.check_alive() {
        Ok(()) => e,
        Err(dead) => e.context(format!("{dead:#}")),
    }
}

/// Fails the run when calls mostly fail: then the figures describe an
/// error path, not the coordinator, and must not be mistaken for a result.
fn check_calls(what: &str, ok: u64, failed: u64, first_error: Option<&str>) -> anyhow::Result<()> {
    if ok == 0 || failed > ok {
        anyhow::bail!(
            "{what}: {ok} succeeded, {failed} failed; first error: {}",
            first_error.unwrap_or("none recorded")
        );
    }
    Ok(())
}

/// The group commit and the service loop over a measurement window, from
/// the coordinator's own metrics: how many flushes, how long each took, how
/// many records and checkpoints each made durable, and what a request
/// waited behind in the loop (its queue, the turns and ticks that hold the
/// loop). This is what explains a checkpoint rate or a slow heartbeat.
#[derive(Debug, Clone, Copy, Default)]
struct GroupCommit {
    flushes_per_s: f64,
    mean_flush_ms: f64,
    /// The exporter's rolling p99 at the end of the window.
    p99_flush_ms: f64,
    checkpoints_per_flush: f64,
    records_per_flush: f64,
    /// Commands the loop took per turn (mean), and the p99s of a turn's
    /// time, of the longest queue wait in a turn and of a tick.
    commands_per_turn: f64,
    p99_turn_ms: f64,
    p99_queue_ms: f64,
    p99_tick_ms: f64,
}

impl GroupCommit {
    const FLUSH: &str = "shardline_store_flush_seconds";
    const RECORDS: &str = "shardline_store_flush_records";
    const BATCH: &str = "shardline_loop_batch_commands";
    const TURN: &str = "shardline_loop_turn_seconds";
    const QUEUE: &str = "shardline_loop_queue_seconds";
    const TICK: &str = "shardline_loop_tick_seconds";
    const ACCEPTED: &str = "shardline_checkpoints_total{result=\"accepted\"}";

    /// `before` may precede the first flush and checkpoint (series the
    /// coordinator creates at their first event); `after` must have both.
    fn between(before: &child::Metrics, after: &child::Metrics, window: Duration) -> anyhow::Result<Self> {
        let delta = |key: &str| Ok::<_, anyhow::Error>((after.get(key)? - before.get_or_zero(key)).max(0.0));
        let flushes = delta(&format!("{}_count", Self::FLUSH))?;
        let per_flush = |x: f64| if flushes > 0.0 { x / flushes } else { 0.0 };
        // The loop's own series are read as 0 when absent: a coordinator
        // from before they existed still gets its flush figures measured.
        let since = |key: &str| (after.get_or_zero(key) - before.get_or_zero(key)).max(0.0);
        let turns = since(&format!("{}_count", Self::BATCH));
        let p99 = |name: &str| after.get_or_zero(&format!("{name}{{quantile=\"0.99\"}}")) * 1000.0;
        Ok(Self {
            flushes_per_s: flushes / window.as_secs_f64().max(1e-9),
            mean_flush_ms: per_flush(delta(&format!("{}_sum", Self::FLUSH))? * 1000.0),
            p99_flush_ms: after.get(&format!("{}{{quantile=\"0.99\"}}", Self::FLUSH))? * 1000.0,
            checkpoints_per_flush: per_flush(delta(Self::ACCEPTED)?),
            records_per_flush: per_flush(since(&format!("{}_sum", Self::RECORDS))),
            commands_per_turn: if turns > 0.0 { since(&format!("{}_sum", Self::BATCH)) / turns } else { 0.0 },
            p99_turn_ms: p99(Self::TURN),
            p99_queue_ms: p99(Self::QUEUE),
            p99_tick_ms: p99(Self::TICK),
        })
    }

    fn json(&self) -> serde_json::Value {
        use crate::stats::round3;
        json!({
            "flushes_per_s": round3(self.flushes_per_s),
            "mean_flush_ms": round3(self.mean_flush_ms),
            "p99_flush_ms": round3(self.p99_flush_ms),
            "checkpoints_per_flush": round3(self.checkpoints_per_flush),
            "records_per_flush": round3(self.records_per_flush),
            "commands_per_turn": round3(self.commands_per_turn),
            "p99_turn_ms": round3(self.p99_turn_ms),
            "p99_queue_ms": round3(self.p99_queue_ms),
            "p99_tick_ms": round3(self.p99_tick_ms),
        })
    }

    fn print(&self) {
        println!(
            "  {:<32} {:>12}",
            "store flushes/s, mean / p99 ms",
            format!("{:.0}, {:.2} / {:.2}", self.flushes_per_s, self.mean_flush_ms, self.p99_flush_ms)
        );
        println!(
            "  {:<32} {:>12}",
            "checkpoints / records per flush",
            format!("{:.1} / {:.1}", self.checkpoints_per_flush, self.records_per_flush)
        );
        println!("  {:<32} {:>12}", "loop: commands per turn", format!("{:.1}", self.commands_per_turn));
        println!(
            "  {:<32} {:>12}",
            "loop p99 ms: queue / turn / tick",
            format!("{:.2} / {:.2} / {:.2}", self.p99_queue_ms, self.p99_turn_ms, self.p99_tick_ms)
        );
    }
}
