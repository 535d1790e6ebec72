//! The skeleton `bench kafka` and `bench amqp` share: one run measures the
//! same records read by a raw client (the ceiling on this broker and
//! machine) and through the real coordinator and one real worker, then
//! prints the comparison and can write it as JSON. A [`Target`] says how
//! to set its broker up, measure both sides and clean up; [`compare`]
//! runs it, and [`run_system`] is the whole-system side both share: the
//! clock from starting the worker to the last record, the meters (CPU,
//! memory), progress, stall detection and the worker's own metrics.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use shardline_testkit::config::WorkerConfig;
use tokio::time::Instant;

use crate::child::{self, Coordinator, Metrics, Worker};
use crate::stats::{ProcCpu, RssSampler, mib, proc_status_kib, round3};

/// How often the system side's progress is read: the end of a run is known
/// to within this (plus one read).
pub const POLL: Duration = Duration::from_millis(50);
/// Progress is kept for the report at this resolution.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// The worker's id in the system runs.
pub const WORKER_ID: &str = "bench";

/// The flags `bench kafka` and `bench amqp` share.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// The broker's process id, to report the cores it uses (e.g. `$(cat
    /// .brokers/tansu.pid)`, `$(pgrep -f beam.smp)`); omitted: not measured.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// The coordinator binary [default: `shardline-coordinator` next to this
    /// executable].
    #[arg(long, env = "SHARDLINE_COORDINATOR_BIN")]
    pub coordinator_bin: Option<PathBuf>,
    /// The worker binary [default: `shardline-worker` next to this
    /// executable].
    #[arg(long, env = "SHARDLINE_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
    /// Fail when no record is read, checkpointed or handled for this many
    /// seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub stall_timeout: u64,
    /// Also write the figures to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The binaries the system side runs.
pub struct Bins {
    pub coordinator: PathBuf,
    pub worker: PathBuf,
}

impl Bins {
    /// The flags' binaries or those next to this executable; checked
    /// before anything is loaded, so a missing one fails in a second.
    pub fn resolve(coordinator: Option<&Path>, worker: Option<&Path>) -> anyhow::Result<Self> {
        Ok(Self {
            coordinator: child::resolve_bin(coordinator, "shardline-coordinator", "--coordinator-bin")?,
            worker: child::resolve_bin(worker, "shardline-worker", "--worker-bin")?,
        })
    }
}

/// One benchmark target: its broker's setup, both measurements, clean-up.
pub trait Target {
    type Figures: Report;

    /// The run's one-line description, printed first.
    fn describe(&self) -> String;
    /// Fresh names on the broker (a topic, a connection for the queues).
    async fn prepare(&mut self) -> anyhow::Result<()>;
    /// Loads the broker and measures both sides.
    async fn measure(&mut self, bins: &Bins) -> anyhow::Result<Self::Figures>;
    /// Deletes what the run made (unless told to keep it).
    async fn clean_up(&mut self) -> anyhow::Result<()>;
    /// Names for the JSON report (`topic`, `queue`).
    fn names(&self) -> Vec<(&'static str, String)>;
}

/// What a measurement prints and writes.
pub trait Report {
    fn print(&self);
    fn json(&self) -> serde_json::Value;
}

/// Runs `target` and reports it; cleans up whether or not it measured.
pub async fn compare<T: Target>(mut target: T, bins: Bins, json_path: Option<&Path>) -> anyhow::Result<()> {
    println!("{}", target.describe());
    target.prepare().await?;
    let result = target.measure(&bins).await;
    if let Err(e) = target.clean_up().await {
        eprintln!("warning: {e:#}");
    }
    let figures = result?;
    figures.print();
    if let Some(path) = json_path {
        let mut report = figures.json();
        for (key, name) in target.names() {
            report[key] = json!(name);
        }
        report["coordinator_bin"] = json!(bins.coordinator.display().to_string());
        report["worker_bin"] = json!(bins.worker.display().to_string());
        let text = serde_json::to_string_pretty(&report).context("cannot encode the JSON report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

/// The system side's state at one poll.
pub struct Sample {
    /// Records done so far (checkpointed, handled).
    pub done: u64,
    /// Every record is done.
    pub complete: bool,
    /// The worker holds what it must (every lease; a consumer on the queue).
    pub ready: bool,
    /// For the stall message: what is left and why.
    pub state: String,
}

/// What the system side measured.
pub struct SystemFigures {
    /// From starting the worker to the last record done.
    pub seconds: f64,
    pub per_s: f64,
    /// When the worker held what it must ([`Sample::ready`]).
    pub ready_s: Option<f64>,
    /// When records were first seen done.
    pub first_s: f64,
    /// From the first done records seen to the last: start-up left out.
    pub steady_per_s: f64,
    pub sampled_peak_rss_kib: u64,
    pub hwm_kib: Option<u64>,
    pub worker_cores: Option<f64>,
    pub coordinator_cores: Option<f64>,
    pub harness_cores: Option<f64>,
    pub broker_cores: Option<f64>,
    pub worker: WorkerMetrics,
    /// The coordinator's metrics at the end, before it was stopped.
    pub coordinator_metrics: Metrics,
    /// `(seconds since the worker started, records done)`.
    pub progress: Vec<(f64, u64)>,
}

/// The worker's own view, from its metrics endpoint at the end of the run.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerMetrics {
    pub records: f64,
    pub batches: f64,
    pub checkpoint_calls: f64,
    pub mean_checkpoint_ms: f64,
    pub mean_handler_ms: f64,
    /// A count: an integer, so an empty sum (-0.0) prints as 0.
    pub redeliveries: u64,
}

impl WorkerMetrics {
    /// Records, batches and handler calls must be there after a run.
    /// Checkpoints (none on queues) and redeliveries (none unless a
    /// delivery came twice) are counters created at their first event.
    fn from(m: &Metrics) -> anyhow::Result<Self> {
        let mean_ms = |count: f64, sum: f64| if count > 0.0 { sum * 1000.0 / count } else { 0.0 };
        let checkpoint_calls = m.sum_or_zero("shardline_checkpoint_latency_seconds_count");
        Ok(Self {
            records: m.sum("shardline_records_total")?,
            batches: m.sum("shardline_batches_total")?,
            checkpoint_calls,
            mean_checkpoint_ms: mean_ms(
                checkpoint_calls,
                m.sum_or_zero("shardline_checkpoint_latency_seconds_sum"),
            ),
            mean_handler_ms: mean_ms(
                m.sum("shardline_handler_duration_seconds_count")?,
                m.sum("shardline_handler_duration_seconds_sum")?,
            ),
            redeliveries: m.sum_or_zero("shardline_redeliveries_total") as u64,
        })
    }

    pub fn mean_batch(&self) -> f64 {
        if self.batches > 0.0 { self.records / self.batches } else { 0.0 }
    }
}

/// The whole system on what the raw side read: starts one worker with
/// `settings` on `coordinator`, polls `sample` every [`POLL`] until it says
/// every one of `expected` records is done (failing when nothing moves for
/// `stall`), then reads the meters and the metrics and stops both.
pub async fn run_system(
    mut coordinator: Coordinator,
    worker_bin: &Path,
    settings: &WorkerConfig,
    expected: u64,
    stall: Duration,
    broker_pid: Option<u32>,
    mut sample: impl AsyncFnMut(&Worker) -> anyhow::Result<Sample>,
) -> anyhow::Result<SystemFigures> {
    let coordinator_cpu = ProcCpu::start(coordinator.pid());
    let harness_cpu = ProcCpu::start(std::process::id());
    let broker_cpu = broker_pid.map(ProcCpu::start);
    let started = Instant::now();
    let mut worker = Worker::start(worker_bin, settings)?;
    let rss = RssSampler::start(worker.pid());
    let worker_cpu = ProcCpu::start(worker.pid());

    let mut every = tokio::time::interval(POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ready_s = None;
    let mut first = None;
    let mut progress = Vec::new();
    let (mut last_done, mut last_progress) = (0, Instant::now());
    let seconds = loop {
        every.tick().await;
        worker.check_alive()?;
        coordinator.check_alive()?;
        let s = sample(&worker).await?;
        let now = started.elapsed();
        if s.ready && ready_s.is_none() {
            ready_s = Some(now.as_secs_f64());
        }
        if s.done > 0 && first.is_none() {
            first = Some((now, s.done));
        }
        if progress.last().is_none_or(|(t, _)| now.as_secs_f64() - t >= PROGRESS_EVERY.as_secs_f64()) {
            progress.push((round3(now.as_secs_f64()), s.done));
        }
        if s.complete {
            progress.push((round3(now.as_secs_f64()), s.done));
            break now;
        }
        if s.done > last_done {
            (last_done, last_progress) = (s.done, Instant::now());
        } else if last_progress.elapsed() > stall {
            bail!(
                "{} of {expected} records done ({}) and nothing more for {stall:?}; the worker's log:\n{}",
                s.done,
                s.state,
                worker.log_tail()
            );
        }
    };

    let hwm_kib = worker.peak_rss_kib();
    let worker_cores = worker_cpu.cores();
    let coordinator_cores = coordinator_cpu.cores();
    let harness_cores = harness_cpu.cores();
    let broker_cores = broker_cpu.and_then(|c| c.cores());
    let sampled_peak_rss_kib = rss.peak_kib().max(proc_status_kib(worker.pid(), "VmRSS").unwrap_or(0));
    // Figures that explain the rate, not the rate itself: one that cannot
    // be read is reported loudly and as zeros rather than failing a
    // finished measurement.
    let worker_metrics = match worker.scrape().await.and_then(|m| WorkerMetrics::from(&m)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("warning: cannot read the worker's metrics: {e:#}");
            WorkerMetrics::default()
        }
    };
    let coordinator_metrics = coordinator.scrape().await?;
    worker.stop()?;
    coordinator.stop()?;

    let (first_at, first_done) = first.unwrap_or((seconds, expected));
    let steady = seconds.saturating_sub(first_at).as_secs_f64();
    Ok(SystemFigures {
        seconds: seconds.as_secs_f64(),
        per_s: expected as f64 / seconds.as_secs_f64().max(1e-9),
        ready_s,
        first_s: first_at.as_secs_f64(),
        steady_per_s: if steady > 0.0 { expected.saturating_sub(first_done) as f64 / steady } else { 0.0 },
        sampled_peak_rss_kib,
        hwm_kib,
        worker_cores,
        coordinator_cores,
        harness_cores,
        broker_cores,
        worker: worker_metrics,
        coordinator_metrics,
        progress,
    })
}

/// Both sides of one run.
pub struct Sides {
    pub raw: RawFigures,
    pub system: SystemFigures,
}

impl Sides {
    /// Shardline's rate over the raw side's, start-up included: from
    /// connecting (raw) or starting the worker process (shardline, which
    /// includes registering and the grants).
    pub fn total_ratio(&self) -> f64 {
        self.system.per_s / self.raw.per_s.max(1e-9)
    }

    /// The ratio from each side's first records on: start-up left out
    /// (the first fetch of a large prefetch queue takes long on a slow
    /// broker, which the total time charges to whichever side asks for
    /// more).
    pub fn steady_ratio(&self) -> f64 {
        self.system.steady_per_s / self.raw.steady_per_s.max(1e-9)
    }
}

/// What the raw side measured.
pub struct RawFigures {
    /// From connecting to the last record.
    pub seconds: f64,
    pub per_s: f64,
    /// From connecting to the first record.
    pub first_s: f64,
    /// From the first records on: start-up left out.
    pub steady_per_s: f64,
    pub payload_bytes: u64,
    /// Acks and redeliveries (queues only).
    pub batches: Option<u64>,
    pub redelivered: Option<u64>,
    /// Cores this process used while consuming (the consumer is all it did).
    pub cores: Option<f64>,
    pub broker_cores: Option<f64>,
}

impl RawFigures {
    /// CPU time per record: what reading costs on this machine whatever
    /// the broker's speed.
    pub fn cpu_us_per(&self, records: u64) -> Option<f64> {
        Some(self.cores? * self.seconds * 1e6 / records as f64)
    }

    pub fn json(&self, u: &Units) -> serde_json::Value {
        json!({
            "seconds": round3(self.seconds),
            format!("{}_per_s", u.unit): round3(self.per_s),
            u.raw_first: round3(self.first_s),
            format!("steady_{}_per_s", u.unit): round3(self.steady_per_s),
            "batches": self.batches,
            "payload_bytes": self.payload_bytes,
            "redelivered": self.redelivered,
            "cores": self.cores.map(round3),
            "broker_cores": self.broker_cores.map(round3),
        })
    }
}

/// What a target calls its units in the JSON report.
pub struct Units {
    /// `records`, `messages`.
    pub unit: &'static str,
    /// The key of [`RawFigures::first_s`].
    pub raw_first: &'static str,
    /// The key of [`SystemFigures::first_s`].
    pub first: &'static str,
    /// The key of [`SystemFigures::ready_s`].
    pub ready: &'static str,
}

impl SystemFigures {
    pub fn peak_rss_mib(&self) -> f64 {
        mib(self.sampled_peak_rss_kib.max(self.hwm_kib.unwrap_or(0)))
    }

    /// CPU time per record of the worker. Against the raw side's it shows
    /// the worker's own cost, and the rate it could reach on a broker that
    /// is not the bottleneck.
    pub fn worker_cpu_us_per(&self, records: u64) -> Option<f64> {
        Some(self.worker_cores? * self.seconds * 1e6 / records as f64)
    }

    /// The memory line of the printed report.
    pub fn print_memory(&self) {
        row(
            "  sampled VmRSS / VmHWM (MiB)",
            format!(
                "{:.1} / {}",
                mib(self.sampled_peak_rss_kib),
                self.hwm_kib.map_or("n/a".to_owned(), |k| format!("{:.1}", mib(k)))
            ),
        );
    }

    /// The cores line of the printed report.
    pub fn print_cores(&self) {
        row(
            "cores worker / coord / harness / broker",
            joined(&[self.worker_cores, self.coordinator_cores, self.harness_cores, self.broker_cores]),
        );
    }

    pub fn json(&self, u: &Units) -> serde_json::Value {
        let w = &self.worker;
        json!({
            "seconds": round3(self.seconds),
            format!("{}_per_s", u.unit): round3(self.per_s),
            u.ready: self.ready_s.map(round3),
            u.first: round3(self.first_s),
            format!("steady_{}_per_s", u.unit): round3(self.steady_per_s),
            "worker_peak_rss_mib": round3(self.peak_rss_mib()),
            "worker_sampled_peak_rss_mib": round3(mib(self.sampled_peak_rss_kib)),
            "worker_vm_hwm_mib": self.hwm_kib.map(|k| round3(mib(k))),
            "cores": {
                "worker": self.worker_cores.map(round3),
                "coordinator": self.coordinator_cores.map(round3),
                "harness": self.harness_cores.map(round3),
                "broker": self.broker_cores.map(round3),
            },
            "worker_metrics": {
                "records": w.records,
                "batches": w.batches,
                "mean_batch_records": round3(w.mean_batch()),
                "checkpoint_calls": w.checkpoint_calls,
                "mean_checkpoint_ms": round3(w.mean_checkpoint_ms),
                "mean_handler_ms": round3(w.mean_handler_ms),
                "redeliveries": w.redeliveries,
            },
            "progress": self.progress,
        })
    }
}

/// One line of the printed table: a label and its figure.
pub fn row(label: &str, value: impl std::fmt::Display) {
    println!("  {label:<36} {value:>12}");
}

/// `a / b / c` with `-` for figures that could not be read.
pub fn joined(values: &[Option<f64>]) -> String {
    values.iter().map(|v| v.map_or("-".to_owned(), |c| format!("{c:.2}"))).collect::<Vec<_>>().join(" / ")
}

/// The target column: the figure, then whether it met the goal.
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}
