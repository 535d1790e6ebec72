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

mod raw;
mod system;
mod topic;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;

use super::verdict;
use crate::child;
use crate::stats::round3;

const TARGET_RATIO: f64 = 0.8;
const TARGET_RSS_MIB: f64 = 200.0;

#[derive(Debug, clap::Args)]
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
    /// Extra librdkafka property for the raw baseline consumer, e.g.
    /// `fetch.wait.max.ms=100` (repeatable), to compare settings.
    #[arg(long = "raw-config", value_name = "KEY=VALUE", value_parser = parse_property)]
    raw_config: Vec<(String, String)>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "SHARDLINE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The broker's process id, to report the cores it uses (e.g.
    /// `$(cat .brokers/tansu.pid)`); omitted: not measured.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// The coordinator binary [default: `shardline-coordinator` next to this
    /// executable].
    #[arg(long, env = "SHARDLINE_COORDINATOR_BIN")]
    coordinator_bin: Option<PathBuf>,
    /// The worker binary [default: `shardline-worker` next to this
    /// executable].
    #[arg(long, env = "SHARDLINE_WORKER_BIN")]
    worker_bin: Option<PathBuf>,
    /// Fail when no record is read or checkpointed for this many seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    stall_timeout: u64,
    /// Delete the topic afterwards. Off by default: tansu 0.6.0 can panic
    /// when a topic is deleted while another client still fetches from it.
    #[arg(long)]
    delete_topic: bool,
    /// Also write the figures to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_owned(), value.trim().to_owned())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let coordinator_bin = match &args.coordinator_bin {
        Some(bin) => bin.clone(),
        None => child::default_bin("shardline-coordinator")?,
    };
    let worker_bin = match &args.worker_bin {
        Some(bin) => bin.clone(),
        None => child::default_bin("shardline-worker")?,
    };
    // Before producing: a missing binary should fail in a second, not after
    // minutes of loading the broker.
    child::check_bin(&coordinator_bin, "coordinator", "--coordinator-bin")?;
    child::check_bin(&worker_bin, "worker", "--worker-bin")?;
    let record_bytes = usize::try_from(args.record_bytes).context("--record-bytes is too large")?;
    let stall = Duration::from_secs(args.stall_timeout);
    let topic = topic::unique_name();
    println!(
        "kafka: topic {topic}, {} partitions, {} records of {} B, batch_size {}, brokers {}",
        args.partitions, args.records, args.record_bytes, args.batch_size, args.brokers
    );

    let created = std::time::Instant::now();
    topic::create(&args.brokers, &topic, args.partitions).await?;
    println!("  topic created in {:.1} s", created.elapsed().as_secs_f64());
    let result = measure(&args, &topic, record_bytes, stall, &coordinator_bin, &worker_bin).await;
    if args.delete_topic
        && let Err(e) = topic::delete(&args.brokers, &topic).await
    {
        eprintln!("warning: {e:#}");
    }
    let figures = result?;
    figures.print(&args);
    if let Some(path) = &args.json {
        let mut report = figures.json(&args);
        report["topic"] = json!(topic);
        report["coordinator_bin"] = json!(coordinator_bin.display().to_string());
        report["worker_bin"] = json!(worker_bin.display().to_string());
        let text = serde_json::to_string_pretty(&report).context("cannot encode the JSON report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

/// Everything one run measured.
struct Figures {
    produced: topic::Produced,
    raw: raw::RawFigures,
    system: system::SystemFigures,
}

impl Figures {
    fn ratio(&self) -> f64 {
        self.system.per_s / self.raw.per_s.max(1e-9)
    }

    /// The ratio without start-up (from the first record or checkpoint on):
    /// the first fetch of a large prefetch queue takes long on a slow
    /// broker, which the total time charges to whichever side asks for more.
    fn steady_ratio(&self) -> f64 {
        self.system.steady_per_s / self.raw.steady_per_s.max(1e-9)
    }

    /// CPU time per record of the raw consumer: what reading costs on this
    /// machine whatever the broker's speed.
    fn raw_cpu_us_per_record(&self, args: &Args) -> Option<f64> {
        Some(self.raw.cores? * self.raw.seconds * 1e6 / args.records as f64)
    }

    /// CPU time per record of the worker. Against the raw figure it shows
    /// the worker's own cost, and the rate it could reach on a broker that
    /// is not the bottleneck.
    fn worker_cpu_us_per_record(&self, args: &Args) -> Option<f64> {
        Some(self.system.worker_cores? * self.system.seconds * 1e6 / args.records as f64)
    }
}

async fn measure(
    args: &Args,
    topic: &str,
    record_bytes: usize,
    stall: Duration,
    coordinator_bin: &std::path::Path,
    worker_bin: &std::path::Path,
) -> anyhow::Result<Figures> {
    let produced = topic::produce(&args.brokers, topic, args.records, record_bytes)
        .await
        .context("producing the records failed")?;
    println!("  produced in {:.1} s ({:.0} records/s)", produced.seconds, produced.per_s);
    let watermarks = topic::watermarks(&args.brokers, topic, args.partitions).await?;
    let stored: i64 = watermarks.iter().map(|(low, high)| high - low).sum();
    if stored != args.records as i64 {
        bail!("the broker holds {stored} records of {topic} after {} were acknowledged", args.records);
    }
    if let Some(empty) = watermarks.iter().position(|(low, high)| high <= low) {
        // Not an error, but the run then measures fewer leases than asked.
        eprintln!("warning: partition {empty} got no records");
    }

    let raw = raw::run(
        &args.brokers,
        topic,
        args.partitions,
        args.records,
        &args.raw_config,
        stall,
        args.broker_pid,
    )
    .await
    .context("the raw consumer baseline failed")?;
    println!("  raw consumer read them in {:.2} s", raw.seconds);

    let system = system::run(&system::Settings {
        coordinator_bin,
        worker_bin,
        brokers: &args.brokers,
        topic,
        watermarks: &watermarks,
        batch_size: args.batch_size,
        fetch_queue_kib: args.fetch_queue_kib,
        sleep_per_batch: args.handler_sleep_ms.map(Duration::from_millis),
        stall,
        broker_pid: args.broker_pid,
    })
    .await
    .context("the shardline run failed")?;
    Ok(Figures { produced, raw, system })
}

/// `a / b / c` with `-` for figures that could not be read.
fn cores(values: &[Option<f64>]) -> String {
    values.iter().map(|v| v.map_or("-".to_owned(), |c| format!("{c:.2}"))).collect::<Vec<_>>().join(" / ")
}

impl Figures {
    fn print(&self, args: &Args) {
        let (raw, sys, w) = (&self.raw, &self.system, &self.system.worker);
        let ratio = self.ratio();
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
            args.handler_sleep_ms.map_or("noop".to_owned(), |ms| format!("sleep {ms} ms/batch"))
        );
        println!("  {:<36} {:>12.0}", "produce records/s (acks=all)", self.produced.per_s);
        println!("  {:<36} {:>12.0}   ({:.2} s)", "raw consumer records/s", raw.per_s, raw.seconds);
        println!("  {:<36} {:>12.0}   ({:.2} s)", "shardline records/s", sys.per_s, sys.seconds);
        println!(
            "  {:<36} {:>12.2}   target >= {TARGET_RATIO:.1}: {}",
            "ratio shardline / raw",
            ratio,
            verdict(ratio >= TARGET_RATIO)
        );
        println!(
            "  {:<36} {:>12.1}   target <= {TARGET_RSS_MIB:.0} MiB: {}",
            "worker peak RSS (MiB)",
            rss,
            verdict(rss <= TARGET_RSS_MIB)
        );
        println!(
            "  {:<36} {:>12}",
            "  sampled VmRSS / VmHWM (MiB)",
            format!(
                "{:.1} / {}",
                crate::stats::mib(sys.sampled_peak_rss_kib),
                sys.hwm_kib.map_or("n/a".to_owned(), |k| format!("{:.1}", crate::stats::mib(k)))
            )
        );
        println!(
            "  {:<36} {:>12}",
            "first record / checkpoint after (s)",
            format!("{:.2} / {:.2}", raw.first_record_s, sys.first_checkpoint_s)
        );
        println!(
            "  {:<36} {:>12}",
            "steady records/s raw / shardline",
            format!("{:.0} / {:.0}", raw.steady_per_s, sys.steady_per_s)
        );
        println!("  {:<36} {:>12.2}", "  ratio in steady state", self.steady_ratio());
        println!(
            "  {:<36} {:>12}",
            "all leases owned after (s)",
            sys.leases_owned_s.map_or("never seen".to_owned(), |s| format!("{s:.2}"))
        );
        println!("  {:<36} {:>12}", "cores raw consumer / broker", cores(&[raw.cores, raw.broker_cores]));
        println!(
            "  {:<36} {:>12}",
            "CPU us/record raw / worker",
            cores(&[self.raw_cpu_us_per_record(args), self.worker_cpu_us_per_record(args)])
        );
        println!(
            "  {:<36} {:>12}",
            "cores worker / coord / harness / broker",
            cores(&[sys.worker_cores, sys.coordinator_cores, sys.harness_cores, sys.broker_cores])
        );
        println!(
            "  {:<36} {:>12}",
            "batches, mean records per batch",
            format!("{:.0}, {:.0}", w.batches, w.mean_batch())
        );
        println!(
            "  {:<36} {:>12}",
            "checkpoint calls, mean ms",
            format!("{:.0}, {:.2}", w.checkpoint_calls, w.mean_checkpoint_ms)
        );
        println!("  {:<36} {:>12.0}", "checkpoints accepted (coordinator)", sys.checkpoints_accepted);
    }

    fn json(&self, args: &Args) -> serde_json::Value {
        let ratio = self.ratio();
        let rss = self.system.peak_rss_mib();
        json!({
            "brokers": args.brokers,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "records": args.records,
            "partitions": args.partitions,
            "record_bytes": args.record_bytes,
            "batch_size": args.batch_size,
            "fetch_queue_kib": args.fetch_queue_kib,
            "handler": if args.handler_sleep_ms.is_some() { "sleep" } else { "noop" },
            "handler_sleep_ms_per_batch": args.handler_sleep_ms,
            "raw_config": args.raw_config.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "produce": {
                "seconds": round3(self.produced.seconds),
                "records_per_s": round3(self.produced.per_s),
            },
            "raw": self.raw.json(),
            "shardline": self.system.json(),
            "raw_cpu_us_per_record": self.raw_cpu_us_per_record(args).map(round3),
            "worker_cpu_us_per_record": self.worker_cpu_us_per_record(args).map(round3),
            "ratio": round3(ratio),
            "steady_ratio": round3(self.steady_ratio()),
            "target_ratio": TARGET_RATIO,
            "ratio_met": ratio >= TARGET_RATIO,
            "worker_peak_rss_mib": round3(rss),
            "target_rss_mib": TARGET_RSS_MIB,
            "rss_met": rss <= TARGET_RSS_MIB,
        })
    }
}

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
