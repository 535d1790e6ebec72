//! `bench amqp`: end-to-end throughput against the real RabbitMQ. One run,
//! one fresh subscription:
//! 1. [`system::start_coordinator`]: the real coordinator declares the
//!    topology (a fanout topic, the quorum subscription queue, its
//!    dead-letter and retry queues), so both sides below read the very same
//!    queue;
//! 2. [`queue`]: publish N messages to the topic with publisher confirms;
//! 3. [`raw`]: a plain lapin consumer with the slot's settings (prefetch
//!    2 × batch_size, batches of what is buffered, one multiple-ack each)
//!    drains them: the ceiling; it closes before step 4;
//! 4. publish N again, and [`system::run`]: one real worker (`noop`
//!    handler) takes the one queue slot and drains them.
//!
//! The figure that matters is the ratio of 4 to 3 (target >= 0.8), each
//! from its first message to its last: both read the same queue on the same
//! broker and machine, so the broker's own speed cancels out, and the
//! worker's start-up (registration, slot grant) is reported apart. All
//! queues and exchanges of the run are deleted afterwards.

mod queue;

pub(crate) use queue::with_channel;
mod raw;
mod system;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use lapin::Connection;
use serde_json::json;
use shardline_worker::amqp::Publisher;

use super::verdict;
use crate::child;
use crate::stats::round3;
use queue::Names;

const TARGET_RATIO: f64 = 0.8;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Messages to publish, once for each side.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    messages: u64,
    /// Body bytes per message.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    size: u64,
    /// The subscription's `batch_size` (messages per handler call); both
    /// sides prefetch twice this.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch_size: u32,
    /// RabbitMQ URL, for this harness, the coordinator and the worker.
    #[arg(long, env = "SHARDLINE_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// The broker's process id, to report the cores it uses (e.g. `$(pgrep
    /// -f beam.smp)`); omitted: not measured.
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
    /// Fail when no message is consumed for this many seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    stall_timeout: u64,
    /// Keep the queues and exchanges afterwards (to inspect them).
    #[arg(long)]
    keep_queues: bool,
    /// Also write the figures to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
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
    // Before publishing: a missing binary should fail in a second, not after
    // a minute of loading the broker.
    child::check_bin(&coordinator_bin, "coordinator", "--coordinator-bin")?;
    child::check_bin(&worker_bin, "worker", "--worker-bin")?;
    let size = usize::try_from(args.size).context("--size is too large")?;
    let names = Names::unique();
    println!(
        "amqp: queue {}, {} messages of {} B, batch_size {}, broker {}",
        names.queue,
        args.messages,
        args.size,
        args.batch_size,
        queue::without_password(&args.url)
    );

    // Deletes the run's queues whatever happens to the measurement.
    let admin = queue::connect(&args.url, "shardline-bench-admin").await?;
    let bins = Bins { coordinator: &coordinator_bin, worker: &worker_bin };
    let result = measure(&args, &names, size, &admin, &bins).await;
    if !args.keep_queues
        && let Err(e) = queue::delete(&admin, &names).await
    {
        eprintln!("warning: {e:#}");
    }
    if let Err(e) = admin.close(200, "bench done".into()).await {
        eprintln!("warning: cannot close the admin connection: {e}");
    }
    let figures = result?;
    figures.print(&args);
    if let Some(path) = &args.json {
        let mut report = figures.json(&args);
        report["queue"] = json!(names.queue);
        report["topic"] = json!(names.topic);
        report["coordinator_bin"] = json!(coordinator_bin.display().to_string());
        report["worker_bin"] = json!(worker_bin.display().to_string());
        let text = serde_json::to_string_pretty(&report).context("cannot encode the JSON report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

struct Bins<'a> {
    coordinator: &'a Path,
    worker: &'a Path,
}

/// Everything one run measured.
struct Figures {
    queue_type: String,
    /// Before the baseline, before shardline.
    published: [queue::Published; 2],
    raw: raw::RawFigures,
    system: system::SystemFigures,
}

impl Figures {
    /// From each side's first message to its last.
    fn ratio(&self) -> f64 {
        self.system.steady_per_s / self.raw.steady_per_s.max(1e-9)
    }

    /// With start-up: from connecting (raw) or starting the worker process
    /// (shardline, which includes registering and the slot grant).
    fn total_ratio(&self) -> f64 {
        self.system.per_s / self.raw.per_s.max(1e-9)
    }

    /// CPU time per message of the raw consumer: what consuming costs on
    /// this machine whatever the broker's speed.
    fn raw_cpu_us_per_message(&self, args: &Args) -> Option<f64> {
        Some(self.raw.cores? * self.raw.seconds * 1e6 / args.messages as f64)
    }

    /// CPU time per message of the worker. Against the raw figure it shows
    /// the worker's own cost.
    fn worker_cpu_us_per_message(&self, args: &Args) -> Option<f64> {
        Some(self.system.worker_cores? * self.system.seconds * 1e6 / args.messages as f64)
    }
}

async fn measure(
    args: &Args,
    names: &Names,
    size: usize,
    admin: &Connection,
    bins: &Bins<'_>,
) -> anyhow::Result<Figures> {
    let stall = Duration::from_secs(args.stall_timeout);
    let topology = system::Topology { url: &args.url, names, batch_size: args.batch_size };
    let (coordinator, queue_type) = system::start_coordinator(bins.coordinator, &topology)
        .await
        .context("the coordinator did not set up the subscription")?;
    println!("  coordinator declared the topology ({queue_type} queues)");

    let publisher = Publisher::connect(&args.url, "shardline-bench-publisher");
    let first = queue::publish(&publisher, &names.topic, args.messages, size)
        .await
        .context("publishing for the baseline failed")?;
    println!("  published in {:.1} s ({:.0} messages/s)", first.seconds, first.per_s);
    queue::check_depth(admin, &names.queue, args.messages).await?;

    let raw = raw::run(&raw::Settings {
        url: &args.url,
        queue: &names.queue,
        expected: args.messages,
        batch_size: args.batch_size,
        stall,
        broker_pid: args.broker_pid,
    })
    .await
    .context("the raw consumer baseline failed")?;
    println!("  raw consumer drained them in {:.2} s", raw.seconds);
    // Nothing left over for the worker: it must handle exactly the second N.
    queue::check_depth(admin, &names.queue, 0).await?;

    let second = queue::publish(&publisher, &names.topic, args.messages, size)
        .await
        .context("publishing for shardline failed")?;
    println!("  published again in {:.1} s ({:.0} messages/s)", second.seconds, second.per_s);
    queue::check_depth(admin, &names.queue, args.messages).await?;

    let system = system::run(
        coordinator,
        &system::Settings {
            worker_bin: bins.worker,
            url: &args.url,
            queue: &names.queue,
            expected: args.messages,
            stall,
            broker_pid: args.broker_pid,
        },
    )
    .await
    .context("the shardline run failed")?;
    Ok(Figures { queue_type, published: [first, second], raw, system })
}

/// `a / b / c` with `-` for figures that could not be read.
fn joined(values: &[Option<f64>]) -> String {
    values.iter().map(|v| v.map_or("-".to_owned(), |c| format!("{c:.2}"))).collect::<Vec<_>>().join(" / ")
}

impl Figures {
    fn print(&self, args: &Args) {
        let (raw, sys, w) = (&self.raw, &self.system, &self.system.worker);
        let ratio = self.ratio();
        println!();
        println!(
            "amqp end to end: {} messages of {} B, one {} queue, one worker with one slot, batch_size {}, \
             prefetch {}, handler noop",
            args.messages,
            args.size,
            self.queue_type,
            args.batch_size,
            args.batch_size.saturating_mul(2).min(u32::from(u16::MAX))
        );
        println!(
            "  {:<36} {:>12}",
            "publish messages/s (confirms)",
            format!("{:.0} / {:.0}", self.published[0].per_s, self.published[1].per_s)
        );
        println!(
            "  {:<36} {:>12.0}   ({:.2} s first to last)",
            "raw consumer messages/s",
            raw.steady_per_s,
            raw.seconds - raw.first_message_s
        );
        println!(
            "  {:<36} {:>12.0}   ({:.2} s first to last)",
            "shardline messages/s",
            sys.steady_per_s,
            sys.seconds - sys.first_message_s
        );
        println!(
            "  {:<36} {:>12.2}   target >= {TARGET_RATIO:.1}: {}",
            "ratio shardline / raw",
            ratio,
            verdict(ratio >= TARGET_RATIO)
        );
        println!("  {:<36} {:>12.1}", "worker peak RSS (MiB)", sys.peak_rss_mib());
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
            "  {:<36} {:>12}   ({:.2} s / {:.2} s)",
            "with start-up: raw / shardline msg/s",
            format!("{:.0} / {:.0}", raw.per_s, sys.per_s),
            raw.seconds,
            sys.seconds
        );
        println!("  {:<36} {:>12.2}", "  ratio with start-up", self.total_ratio());
        println!(
            "  {:<36} {:>12}",
            "first message after (s) raw / shardline",
            format!("{:.2} / {:.2}", raw.first_message_s, sys.first_message_s)
        );
        println!(
            "  {:<36} {:>12}",
            "worker consuming after (s)",
            sys.consuming_s.map_or("never seen".to_owned(), |s| format!("{s:.2}"))
        );
        println!("  {:<36} {:>12}", "cores raw consumer / broker", joined(&[raw.cores, raw.broker_cores]));
        println!(
            "  {:<36} {:>12}",
            "CPU us/message raw / worker",
            joined(&[self.raw_cpu_us_per_message(args), self.worker_cpu_us_per_message(args)])
        );
        println!(
            "  {:<36} {:>12}",
            "cores worker / coord / harness / broker",
            joined(&[sys.worker_cores, sys.coordinator_cores, sys.harness_cores, sys.broker_cores])
        );
        println!(
            "  {:<36} {:>12}",
            "mean messages/batch raw / shardline",
            format!("{:.0} / {:.0}", raw.mean_batch(), w.mean_batch())
        );
        println!("  {:<36} {:>12.3}", "mean handler call (ms)", w.mean_handler_ms);
        println!(
            "  {:<36} {:>12}",
            "redelivered raw / shardline",
            format!("{} / {}", raw.redelivered, w.redeliveries)
        );
        if w.records > args.messages as f64 {
            println!("  note: the worker handled {:.0} messages for {} published", w.records, args.messages);
        }
    }

    fn json(&self, args: &Args) -> serde_json::Value {
        let ratio = self.ratio();
        json!({
            "broker": queue::without_password(&args.url),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "messages": args.messages,
            "size": args.size,
            "batch_size": args.batch_size,
            "queue_type": self.queue_type,
            "handler": "noop",
            "publish": self.published.iter().map(|p| json!({
                "seconds": round3(p.seconds),
                "messages_per_s": round3(p.per_s),
            })).collect::<Vec<_>>(),
            "raw": self.raw.json(),
            "shardline": self.system.json(),
            "raw_cpu_us_per_message": self.raw_cpu_us_per_message(args).map(round3),
            "worker_cpu_us_per_message": self.worker_cpu_us_per_message(args).map(round3),
            "ratio": round3(ratio),
            "total_ratio": round3(self.total_ratio()),
            "target_ratio": TARGET_RATIO,
            "ratio_met": ratio >= TARGET_RATIO,
            "worker_peak_rss_mib": round3(self.system.peak_rss_mib()),
        })
    }
}
