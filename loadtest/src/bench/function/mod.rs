//! `bench function`: what the `function` handler kind costs per invocation.
//! One run, one fresh topic, produced once and read twice through the real
//! coordinator and one real worker (`bench kafka`'s system side), each
//! side with a fresh coordinator starting from the beginning:
//! 1. `noop`: the handler compiled into the worker, which does nothing;
//! 2. `function`: a Python no-op Lambda function (`loadtest/functions/
//!    noop.py`) under the Lambda runtime client, each batch one invocation
//!    through the worker's Runtime API.
//!
//! Both sides run the same number of batches at once (`--concurrency`: the
//! worker's `max_inflight_batches`, and the function's processes), so the
//! difference is the invocation alone. The figure that matters is the
//! overhead per invocation: the worker's own mean handler time
//! (`shardline_handler_duration_seconds`, sum over count) of side 2 minus
//! that of side 1; target < 1 ms at batch_size 100. It is split into the
//! CPU the Python processes spent per invocation (runtime client and
//! function), the worker's CPU beyond the noop side's (building and
//! encoding the event, serving the Runtime API) and the rest (waiting:
//! wake-ups, the run queue). Records/s of both sides and their ratio show
//! what it does to throughput.

mod python;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use serde_json::json;
use shardline_testkit::kafka::{self, KafkaAccess};
use shardline_worker::config::KafkaSettings;

use super::compare::{Bins, Common, Report, SystemFigures, Target, Units, compare, joined, row, verdict};
use super::kafka::{system, topic};
use crate::child::Worker;
use crate::stats::round3;

/// The Runtime API's cost per invocation, at [`TARGET_BATCH`] records.
const TARGET_OVERHEAD_US: f64 = 1000.0;
const TARGET_BATCH: u32 = 100;
/// The function's handler name (the stream's `handler`, the metrics'
/// label).
const FUNCTION_HANDLER: &str = "python_noop";

/// The Lambda event the function gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventFormat {
    /// The self-managed Kafka event (`records` by topic-partition).
    Kafka,
    /// The Kinesis event (`Records[].kinesis`).
    Kinesis,
}

impl EventFormat {
    fn name(self) -> &'static str {
        match self {
            Self::Kafka => "kafka",
            Self::Kinesis => "kinesis",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Records to produce (once; both sides read them all).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    records: u64,
    /// Partitions of the topic (one lease each, all on the one worker).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    partitions: u32,
    /// Payload bytes per record (the key is extra).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    record_bytes: u64,
    /// The stream's `batch_size` (records per handler call, per
    /// invocation).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,
    /// Batches at once, on both sides: the worker's
    /// `max_inflight_batches`, and the function's `concurrency`
    /// (processes).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    concurrency: u32,
    /// The Lambda event the function gets.
    #[arg(long, value_enum, default_value_t = EventFormat::Kafka)]
    event_format: EventFormat,
    /// The Python interpreter with awslambdaric [default: venv/bin/python
    /// under `SHARDLINE_FUNCTIONS_DIR` or ~/.cache/shardline/functions, as
    /// `scripts/functions.sh install` puts it].
    #[arg(long)]
    python: Option<PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "SHARDLINE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// A librdkafka property (`security.protocol=ssl`) for every Kafka
    /// client of the run, as in `bench kafka` (repeatable).
    #[arg(long = "kafka-property", value_name = "KEY=VALUE")]
    kafka_properties: Vec<String>,
    /// Delete the topic afterwards (off by default, as in `bench kafka`).
    #[arg(long)]
    delete_topic: bool,
    #[command(flatten)]
    common: Common,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let bins = Bins::resolve(args.common.coordinator_bin.as_deref(), args.common.worker_bin.as_deref())?;
    let python = args.python.clone().unwrap_or_else(python::default_python);
    python::check(&python)?;
    let record_bytes = usize::try_from(args.record_bytes).context("--record-bytes is too large")?;
    let json = args.common.json.clone();
    let settings = KafkaSettings::default()
        .with_args(args.kafka_properties.iter().map(String::as_str))
        .map_err(anyhow::Error::msg)?;
    settings.check().context("--kafka-property")?;
    let access = KafkaAccess { brokers: args.brokers.clone(), settings };
    let target = Function { topic: topic::unique_name(), record_bytes, python, args, access };
    compare(target, bins, json.as_deref()).await
}

/// One run's topic and settings.
struct Function {
    args: Args,
    access: KafkaAccess,
    topic: String,
    record_bytes: usize,
    python: PathBuf,
}

impl Function {
    /// `[handlers.python_noop]`: the no-op under the runtime client.
    fn handler(&self, files: &python::Files) -> anyhow::Result<toml::Table> {
        let text = |p: &std::path::Path| {
            p.to_str().map(str::to_owned).with_context(|| format!("{} is not UTF-8", p.display()))
        };
        let command = [text(&self.python)?, "-m".into(), "awslambdaric".into(), python::HANDLER.into()];
        let mut env = toml::Table::new();
        env.insert(python::CPU_DIR_VAR.into(), text(&files.cpu_dir())?.into());
        let mut table = toml::Table::new();
        table.insert("kind".into(), "function".into());
        table.insert("command".into(), toml::Value::Array(command.map(toml::Value::from).into()));
        table.insert("working_dir".into(), text(files.task_root())?.into());
        table.insert("concurrency".into(), i64::from(self.args.concurrency).into());
        table.insert("event_format".into(), self.args.event_format.name().into());
        table.insert("env".into(), env.into());
        Ok(table)
    }
}

impl Target for Function {
    type Figures = Figures;

    fn describe(&self) -> String {
        let a = &self.args;
        format!(
            "function: topic {}, {} partitions, {} records of {} B, batch_size {}, concurrency {}, event_format \
             {}, brokers {}",
            self.topic,
            a.partitions,
            a.records,
            a.record_bytes,
            a.batch_size,
            a.concurrency,
            a.event_format.name(),
            a.brokers
        )
    }

    async fn prepare(&mut self) -> anyhow::Result<()> {
        topic::create(&self.access, &self.topic, self.args.partitions).await
    }

    async fn measure(&mut self, bins: &Bins) -> anyhow::Result<Figures> {
        let (args, topic, access) = (&self.args, self.topic.as_str(), &self.access);
        let stall = Duration::from_secs(args.common.stall_timeout);
        let (produced, watermarks) =
            topic::fill(access, topic, args.partitions, args.records, self.record_bytes).await?;

        let side = |handler| system::Settings {
            coordinator_bin: &bins.coordinator,
            worker_bin: &bins.worker,
            kafka: access,
            topic,
            watermarks: &watermarks,
            batch_size: args.batch_size,
            fetch_queue_kib: None,
            handler,
            max_inflight_batches: args.concurrency,
            tumbling_window: None,
            stall,
            broker_pid: args.common.broker_pid,
        };
        let (noop, noop_accepted) = system::run(&side(system::builtin(None)), async |_| Ok(()))
            .await
            .context("the noop side failed")?;
        println!("  noop handler: {:.2} s", noop.seconds);

        let files = python::Files::write()?;
        let mut at_end = None;
        let (function, function_accepted) =
            system::run(&side((FUNCTION_HANDLER, self.handler(&files)?)), async |worker: &Worker| {
                at_end = Some(FunctionEnd::read(worker, &files).await?);
                Ok(())
            })
            .await
            .context("the function side failed")?;
        println!("  Python function: {:.2} s", function.seconds);
        let end = at_end.context("the function side ended without its final reading")?;
        if let Err(why) = &end.cpu {
            eprintln!("warning: the Python CPU per invocation is left out: {why}");
        }
        Ok(Figures {
            args: self.args.clone(),
            python: self.python.clone(),
            produced,
            noop: Side { figures: noop, accepted: noop_accepted },
            function: Side { figures: function, accepted: function_accepted },
            end,
        })
    }

    async fn clean_up(&mut self) -> anyhow::Result<()> {
        if self.args.delete_topic {
            kafka::delete_topic(&self.access, &self.topic).await?;
        }
        Ok(())
    }

    fn names(&self) -> Vec<(&'static str, String)> {
        vec![("topic", self.topic.clone())]
    }
}

/// What the function side's worker shows at the end, while its processes
/// still run.
struct FunctionEnd {
    invocations: u64,
    process_starts: u64,
    /// `Err`: why the split is left out.
    cpu: Result<python::Cpu, String>,
}

impl FunctionEnd {
    async fn read(worker: &Worker, files: &python::Files) -> anyhow::Result<Self> {
        let m = worker.scrape().await?;
        let invocations = m.sum("shardline_function_invocations_total")? as u64;
        let process_starts = m.sum("shardline_function_process_starts_total")? as u64;
        let cpu = python::Cpu::read(&files.cpu_dir(), process_starts, invocations)?;
        Ok(Self { invocations, process_starts, cpu })
    }
}

/// One side's figures and the checkpoint entries its coordinator accepted.
struct Side {
    figures: SystemFigures,
    accepted: f64,
}

impl Side {
    fn handler_us(&self) -> f64 {
        self.figures.worker.mean_handler_ms * 1000.0
    }

    fn json(&self) -> serde_json::Value {
        let mut v = self.figures.json(&UNITS);
        v["coordinator_checkpoints_accepted"] = json!(self.accepted);
        v["mean_handler_us"] = json!(round3(self.handler_us()));
        v
    }
}

/// Everything one run measured.
struct Figures {
    args: Args,
    python: PathBuf,
    produced: topic::Produced,
    noop: Side,
    function: Side,
    end: FunctionEnd,
}

impl Figures {
    fn ratio(&self) -> f64 {
        self.function.figures.per_s / self.noop.figures.per_s.max(1e-9)
    }

    fn steady_ratio(&self) -> f64 {
        self.function.figures.steady_per_s / self.noop.figures.steady_per_s.max(1e-9)
    }

    /// What an invocation adds to a batch's handler time.
    fn overhead_us(&self) -> f64 {
        self.function.handler_us() - self.noop.handler_us()
    }

    /// `None` at other batch sizes: the target is stated for one.
    fn overhead_met(&self) -> Option<bool> {
        (self.args.batch_size == TARGET_BATCH).then(|| self.overhead_us() < TARGET_OVERHEAD_US)
    }

    /// The worker's CPU per invocation beyond the noop side's: building
    /// and encoding the event, serving the Runtime API, reading the reply
    /// (both sides ran the same batches; the function side's start-up,
    /// spawning its processes, is spread over them).
    fn worker_cpu_us(&self) -> Option<f64> {
        let cpu = |f: &SystemFigures| Some(f.worker_cores? * f.seconds);
        let extra = cpu(&self.function.figures)? - cpu(&self.noop.figures)?;
        (self.end.invocations > 0).then(|| extra * 1e6 / self.end.invocations as f64)
    }

    /// How the overhead divides, where the Python CPU could be read.
    fn split(&self) -> Option<Split> {
        let python_cpu_us = self.end.cpu.as_ref().ok()?.us_per_invocation();
        let worker_cpu_us = self.worker_cpu_us();
        let rest_us = self.overhead_us() - python_cpu_us - worker_cpu_us.unwrap_or(0.0);
        Some(Split { python_cpu_us, worker_cpu_us, rest_us })
    }
}

/// The overhead per invocation: what the Python processes and the worker
/// spent on CPU for it, and the rest: waiting (wake-ups, the run queue of
/// a busy machine), and the worker's CPU when it could not be read.
struct Split {
    python_cpu_us: f64,
    worker_cpu_us: Option<f64>,
    rest_us: f64,
}

impl Report for Figures {
    fn print(&self) {
        let (args, noop, function) = (&self.args, &self.noop.figures, &self.function.figures);
        println!();
        println!(
            "function vs noop: {} records of {} B over {} partitions, one worker, batch_size {}, {} batches at \
             once, event_format {}",
            args.records,
            args.record_bytes,
            args.partitions,
            args.batch_size,
            args.concurrency,
            args.event_format.name()
        );
        row("produce records/s (acks=all)", format!("{:.0}", self.produced.per_s));
        row("noop records/s", format!("{:>12.0}   ({:.2} s)", noop.per_s, noop.seconds));
        row("function records/s", format!("{:>12.0}   ({:.2} s)", function.per_s, function.seconds));
        row("ratio function / noop", format!("{:.2}", self.ratio()));
        row(
            "steady records/s noop / function",
            format!("{:.0} / {:.0}", noop.steady_per_s, function.steady_per_s),
        );
        row("  ratio in steady state", format!("{:.2}", self.steady_ratio()));
        row(
            "mean handler us noop / function",
            format!("{:.1} / {:.1}", self.noop.handler_us(), self.function.handler_us()),
        );
        let met = match self.overhead_met() {
            Some(met) => verdict(met).to_owned(),
            None => format!("stated for batch_size {TARGET_BATCH}"),
        };
        row(
            "overhead per invocation (us)",
            format!(
                "{:>12.1}   target < {TARGET_OVERHEAD_US:.0} us at batch_size {TARGET_BATCH}: {met}",
                self.overhead_us()
            ),
        );
        match (self.split(), &self.end.cpu) {
            (Some(split), _) => {
                row("  Python CPU (runtime client + fn)", format!("{:.1}", split.python_cpu_us));
                row(
                    "  worker CPU beyond noop's",
                    split.worker_cpu_us.map_or("-".to_owned(), |us| format!("{us:.1}")),
                );
                row("  rest: waiting (wake-ups, run queue)", format!("{:.1}", split.rest_us));
            }
            (None, Err(why)) => row("  split", format!("left out: {why}")),
            (None, Ok(_)) => {}
        }
        row(
            "invocations, function processes started",
            format!("{}, {}", self.end.invocations, self.end.process_starts),
        );
        row(
            "batches noop / function",
            format!("{:.0} / {:.0}", noop.worker.batches, function.worker.batches),
        );
        row(
            "worker CPU us/record noop / function",
            joined(&[noop.worker_cpu_us_per(args.records), function.worker_cpu_us_per(args.records)]),
        );
        row(
            "worker peak RSS MiB noop / function",
            format!("{:.1} / {:.1}", noop.peak_rss_mib(), function.peak_rss_mib()),
        );
    }

    fn json(&self) -> serde_json::Value {
        let args = &self.args;
        let split = self.split();
        json!({
            "brokers": args.brokers,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "records": args.records,
            "partitions": args.partitions,
            "record_bytes": args.record_bytes,
            "batch_size": args.batch_size,
            "concurrency": args.concurrency,
            "event_format": args.event_format.name(),
            "python": self.python.display().to_string(),
            "produce": {
                "seconds": round3(self.produced.seconds),
                "records_per_s": round3(self.produced.per_s),
            },
            "noop": self.noop.json(),
            "function": self.function.json(),
            "invocations": self.end.invocations,
            "function_process_starts": self.end.process_starts,
            "ratio": round3(self.ratio()),
            "steady_ratio": round3(self.steady_ratio()),
            "overhead_us": round3(self.overhead_us()),
            "python_cpu_us_per_invocation": split.as_ref().map(|s| round3(s.python_cpu_us)),
            "worker_cpu_us_per_invocation": self.worker_cpu_us().map(round3),
            "rest_us_per_invocation": split.as_ref().map(|s| round3(s.rest_us)),
            "python_cpu": self.end.cpu.as_ref().ok().map(|c| json!({
                "processes": c.processes,
                "invocations_counted": c.invocations,
                "seconds": round3(c.seconds),
            })),
            "split_left_out": self.end.cpu.as_ref().err(),
            "target_overhead_us": TARGET_OVERHEAD_US,
            "target_batch_size": TARGET_BATCH,
            "overhead_met": self.overhead_met(),
        })
    }
}

/// The JSON names of each side's figures.
const UNITS: Units = Units {
    unit: "records",
    raw_first: "first_record_s",
    first: "first_checkpoint_s",
    ready: "leases_owned_s",
};
