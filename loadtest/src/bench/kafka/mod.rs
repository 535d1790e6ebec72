//! `bench kafka`: end-to-end throughput against the real broker. One run,
//! one fresh topic:
//! 1. [`topic`]: create it and produce N keyed records (acks=all);
//! 2. [`raw`]: a plain rdkafka consumer reads them all: the ceiling;
//! 3. [`system`]: the real coordinator and one real worker (`noop` handler)
//!    process them, until the coordinator's checkpoints cover every record.
//!
//! The figure that matters is the ratio of 3 to 2 (target >= 0.8): both read
//! the same records from the same broker on the same machine, so the
//! broker's own speed cancels out. The worker's peak RSS is the other target
//! (<= 200 MiB with 8 partitions at full speed): its prefetch buffers are
//! bounded per partition.

mod callgrind;
mod raw;
// `bench function` runs the same system side on a topic made the same way.
pub(super) mod system;
pub(super) mod topic;

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use shardline_testkit::kafka::{self, KafkaAccess};
use shardline_worker::config::KafkaSettings;

use super::compare::{Bins, Common, Report, Sides, Target, Units, compare, joined, row, verdict};
use crate::stats::round3;

const TARGET_RATIO: f64 = 0.8;
const TARGET_RSS_MIB: f64 = 200.0;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Records to produce and read.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    records: u64,
    /// Partitions of the topic (one lease each, all on the one worker).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    partitions: u32,
    /// Payload bytes per record (the key is extra).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    record_bytes: u64,
    /// The stream's `batch_size` (records per handler call).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,
    /// The worker's `fetch_queue_kib` (prefetch per partition) [default:
    /// the worker's own default].
    #[arg(long, value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    fetch_queue_kib: Option<u32>,
    /// Run the worker's `sleep` handler with this many ms per batch instead
    /// of `noop`: a worker slower than the broker fills its prefetch buffers,
    /// which shows the memory bound rather than the throughput.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    handler_sleep_ms: Option<u64>,
    /// Run the worker's `count` handler (records per key) instead of `noop`.
    #[arg(long, conflicts_with = "handler_sleep_ms")]
    handler_count: bool,
    /// With `--handler-count`: also run the stream with tumbling windows of
    /// this many seconds (1..900), after the run without, on the same
    /// records, and print the windowed rate beside the plain one.
    #[arg(long, requires = "handler_count", value_parser = clap::value_parser!(u64).range(1..=900))]
    tumbling_window: Option<u64>,
    /// Extra librdkafka property for the raw baseline consumer, e.g.
    /// `fetch.wait.max.ms=100` (repeatable), to compare settings.
    #[arg(long = "raw-config", value_name = "KEY=VALUE", value_parser = parse_property)]
    raw_config: Vec<(String, String)>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "SHARDLINE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// A librdkafka property (`security.protocol=ssl`) for every Kafka
    /// client of the run: the bench's own, the raw baseline's and, as
    /// `[kafka] properties`, the coordinator's and the worker's
    /// (repeatable).
    #[arg(long = "kafka-property", value_name = "KEY=VALUE")]
    kafka_properties: Vec<String>,
    /// Delete the topic afterwards. Off by default: tansu 0.6.0 can panic
    /// when a topic is deleted while another client still fetches from it.
    #[arg(long)]
    delete_topic: bool,
    /// Instead of the end-to-end comparison: count instructions per record
    /// of the raw consumer and of the worker's record path under valgrind's
    /// callgrind, on a fresh topic with everything prefetched (a figure that
    /// repeats on a noisy machine; try `--records 20000 --partitions 1`).
    #[arg(long)]
    callgrind: bool,
    /// With `--callgrind`: runs of each side (min, median and max printed).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    callgrind_runs: u32,
    /// Internal: this process is one side run under callgrind.
    #[arg(long, hide = true, value_enum, requires = "callgrind_topic")]
    callgrind_side: Option<callgrind::Side>,
    /// Internal: the topic a `--callgrind-side` child reads.
    #[arg(long, hide = true)]
    callgrind_topic: Option<String>,
    #[command(flatten)]
    common: Common,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_owned(), value.trim().to_owned())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let bins = Bins::resolve(args.common.coordinator_bin.as_deref(), args.common.worker_bin.as_deref())?;
    let record_bytes = usize::try_from(args.record_bytes).context("--record-bytes is too large")?;
    let json = args.common.json.clone();
    let settings = KafkaSettings::default()
        .with_args(args.kafka_properties.iter().map(String::as_str))
        .map_err(anyhow::Error::msg)?;
    settings.check().context("--kafka-property")?;
    let access = KafkaAccess { brokers: args.brokers.clone(), settings };
    if let (Some(side), Some(topic)) = (args.callgrind_side, &args.callgrind_topic) {
        return callgrind::side(&args, &access, side, topic).await;
    }
    if args.callgrind {
        return callgrind::run(&args, &access).await;
    }
    compare(Kafka { topic: topic::unique_name(), record_bytes, args, access }, bins, json.as_deref()).await
}

/// One run's topic and settings.
struct Kafka {
    args: Args,
    /// `--brokers` and the `--kafka-property`s.
    access: KafkaAccess,
    topic: String,
    record_bytes: usize,
}

impl Target for Kafka {
    type Figures = Figures;

    fn describe(&self) -> String {
        let a = &self.args;
        format!(
            "kafka: topic {}, {} partitions, {} records of {} B, batch_size {}, brokers {}",
            self.topic, a.partitions, a.records, a.record_bytes, a.batch_size, a.brokers
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
        if let Some(empty) = watermarks.iter().position(|(low, high)| high <= low) {
            // Not an error, but the run then measures fewer leases than asked.
            eprintln!("warning: partition {empty} got no records");
        }

        let raw = raw::run(
            access,
            topic,
            args.partitions,
            args.records,
            &args.raw_config,
            stall,
            args.common.broker_pid,
        )
        .await
        .context("the raw consumer baseline failed")?;
        println!("  raw consumer read them in {:.2} s", raw.seconds);

        let settings = system::Settings {
            coordinator_bin: &bins.coordinator,
            worker_bin: &bins.worker,
            kafka: access,
            topic,
            watermarks: &watermarks,
            batch_size: args.batch_size,
            fetch_queue_kib: args.fetch_queue_kib,
            handler: match args.handler_count {
                true => ("count", toml::Table::new()),
                false => system::builtin(args.handler_sleep_ms.map(Duration::from_millis)),
            },
            max_inflight_batches: 0,
            tumbling_window: None,
            stall,
            broker_pid: args.common.broker_pid,
        };
        let (system, checkpoints_accepted) =
            system::run(&settings, async |_| Ok(())).await.context("the shardline run failed")?;
        // The same records again, with windows (a fresh coordinator: every
        // shard from the start).
        let windowed = match args.tumbling_window {
            None => None,
            Some(secs) => {
                let settings =
                    system::Settings { tumbling_window: Some(Duration::from_secs(secs)), ..settings };
                let (figures, _) = system::run(&settings, async |_| Ok(()))
                    .await
                    .context("the windowed shardline run failed")?;
                Some(figures)
            }
        };
        Ok(Figures {
            args: self.args.clone(),
            produced,
            sides: Sides { raw, system },
            checkpoints_accepted,
            windowed,
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

/// Everything one run measured.
struct Figures {
    args: Args,
    produced: topic::Produced,
    sides: Sides,
    /// Checkpoint entries the coordinator accepted during the run.
    checkpoints_accepted: f64,
    /// `--tumbling-window`: the same handler and records with windows.
    windowed: Option<crate::bench::compare::SystemFigures>,
}

impl Report for Figures {
    fn print(&self) {
        let (args, raw, sys) = (&self.args, &self.sides.raw, &self.sides.system);
        let (w, ratio) = (&sys.worker, self.sides.total_ratio());
        let rss = sys.peak_rss_mib();
        println!();
        println!(
            "kafka end to end: {} records of {} B over {} partitions, one worker, batch_size {}, fetch_queue_kib {}, \
             handler {}",
            args.records,
            args.record_bytes,
            args.partitions,
            args.batch_size,
            args.fetch_queue_kib.map_or("default".to_owned(), |k| k.to_string()),
            match (args.handler_count, args.handler_sleep_ms) {
                (true, _) => "count".to_owned(),
                (false, ms) => ms.map_or("noop".to_owned(), |ms| format!("sleep {ms} ms/batch")),
            }
        );
        row("produce records/s (acks=all)", format!("{:.0}", self.produced.per_s));
        // A value wider than the column carries its note: `{:>12}` pads
        // the figure, the rest follows.
        row("raw consumer records/s", format!("{:>12.0}   ({:.2} s)", raw.per_s, raw.seconds));
        row("shardline records/s", format!("{:>12.0}   ({:.2} s)", sys.per_s, sys.seconds));
        let met = verdict(ratio >= TARGET_RATIO);
        row("ratio shardline / raw", format!("{ratio:>12.2}   target >= {TARGET_RATIO:.1}: {met}"));
        let met = verdict(rss <= TARGET_RSS_MIB);
        row("worker peak RSS (MiB)", format!("{rss:>12.1}   target <= {TARGET_RSS_MIB:.0} MiB: {met}"));
        sys.print_memory();
        row("first record / checkpoint after (s)", format!("{:.2} / {:.2}", raw.first_s, sys.first_s));
        row("steady records/s raw / shardline", format!("{:.0} / {:.0}", raw.steady_per_s, sys.steady_per_s));
        row("  ratio in steady state", format!("{:.2}", self.sides.steady_ratio()));
        row("all leases owned after (s)", sys.ready_s.map_or("never seen".to_owned(), |s| format!("{s:.2}")));
        row("cores raw consumer / broker", joined(&[raw.cores, raw.broker_cores]));
        row(
            "CPU us/record raw / worker",
            joined(&[raw.cpu_us_per(args.records), sys.worker_cpu_us_per(args.records)]),
        );
        sys.print_cores();
        row("batches, mean records per batch", format!("{:.0}, {:.0}", w.batches, w.mean_batch()));
        row("checkpoint calls, mean ms", format!("{:.0}, {:.2}", w.checkpoint_calls, w.mean_checkpoint_ms));
        row("checkpoints accepted (coordinator)", format!("{:.0}", self.checkpoints_accepted));
        if let (Some(win), Some(secs)) = (&self.windowed, args.tumbling_window) {
            row(
                &format!("with {secs} s tumbling windows records/s"),
                format!("{:>12.0}   ({:.2} s)", win.per_s, win.seconds),
            );
            row(
                "  ratio windowed / without",
                format!("{:>12.2}", win.per_s / sys.per_s.max(f64::MIN_POSITIVE)),
            );
            row(
                "  steady records/s windowed / without",
                format!("{:.0} / {:.0}", win.steady_per_s, sys.steady_per_s),
            );
            row(
                "  CPU us/record windowed / without",
                joined(&[win.worker_cpu_us_per(args.records), sys.worker_cpu_us_per(args.records)]),
            );
        }
    }

    fn json(&self) -> serde_json::Value {
        let args = &self.args;
        let (raw, sys) = (&self.sides.raw, &self.sides.system);
        let (ratio, rss) = (self.sides.total_ratio(), sys.peak_rss_mib());
        let mut shardline = sys.json(&UNITS);
        shardline["coordinator_checkpoints_accepted"] = json!(self.checkpoints_accepted);
        json!({
            "brokers": args.brokers,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "records": args.records,
            "partitions": args.partitions,
            "record_bytes": args.record_bytes,
            "batch_size": args.batch_size,
            "fetch_queue_kib": args.fetch_queue_kib,
            "handler": match (args.handler_count, args.handler_sleep_ms) {
                (true, _) => "count",
                (false, Some(_)) => "sleep",
                (false, None) => "noop",
            },
            "tumbling_window_s": args.tumbling_window,
            "windowed": self.windowed.as_ref().map(|w| json!({
                "shardline": w.json(&UNITS),
                "ratio_to_without": round3(w.per_s / self.sides.system.per_s.max(f64::MIN_POSITIVE)),
            })),
            "handler_sleep_ms_per_batch": args.handler_sleep_ms,
            "raw_config": args.raw_config.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "produce": {
                "seconds": round3(self.produced.seconds),
                "records_per_s": round3(self.produced.per_s),
            },
            "raw": raw.json(&UNITS),
            "shardline": shardline,
            "raw_cpu_us_per_record": raw.cpu_us_per(args.records).map(round3),
            "worker_cpu_us_per_record": sys.worker_cpu_us_per(args.records).map(round3),
            "ratio": round3(ratio),
            "steady_ratio": round3(self.sides.steady_ratio()),
            "target_ratio": TARGET_RATIO,
            "ratio_met": ratio >= TARGET_RATIO,
            "worker_peak_rss_mib": round3(rss),
            "target_rss_mib": TARGET_RSS_MIB,
            "rss_met": rss <= TARGET_RSS_MIB,
        })
    }
}

/// The JSON names of the system side's figures.
const UNITS: Units = Units {
    unit: "records",
    raw_first: "first_record_s",
    first: "first_checkpoint_s",
    ready: "leases_owned_s",
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_key_value() {
        assert_eq!(parse_property("fetch.wait.max.ms = 100"), Ok(("fetch.wait.max.ms".into(), "100".into())));
        assert_eq!(parse_property("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_property("novalue").is_err());
        assert!(parse_property("=x").is_err());
    }
}
