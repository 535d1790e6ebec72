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
mod raw;
mod system;

use std::time::Duration;

use anyhow::Context;
use lapin::Connection;
use serde_json::json;
use shardline_worker::amqp::Publisher;

use super::compare::{Bins, Common, Report, Sides, Target, Units, compare, joined, row, verdict};
use crate::stats::round3;
use queue::Names;

const TARGET_RATIO: f64 = 0.8;

#[derive(Debug, Clone, clap::Args)]
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
    /// Keep the queues and exchanges afterwards (to inspect them).
    #[arg(long)]
    keep_queues: bool,
    #[command(flatten)]
    common: Common,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let bins = Bins::resolve(args.common.coordinator_bin.as_deref(), args.common.worker_bin.as_deref())?;
    let size = usize::try_from(args.size).context("--size is too large")?;
    let json = args.common.json.clone();
    compare(Amqp { names: Names::unique(), size, admin: None, args }, bins, json.as_deref()).await
}

/// One run's names, settings and the harness's own connection, which
/// deletes the run's queues whatever happens to the measurement.
struct Amqp {
    args: Args,
    names: Names,
    size: usize,
    admin: Option<Connection>,
}

impl Target for Amqp {
    type Figures = Figures;

    fn describe(&self) -> String {
        let a = &self.args;
        format!(
            "amqp: queue {}, {} messages of {} B, batch_size {}, broker {}",
            self.names.queue,
            a.messages,
            a.size,
            a.batch_size,
            queue::without_password(&a.url)
        )
    }

    async fn prepare(&mut self) -> anyhow::Result<()> {
        self.admin = Some(queue::connect(&self.args.url, "shardline-bench-admin").await?);
        Ok(())
    }

    async fn measure(&mut self, bins: &Bins) -> anyhow::Result<Figures> {
        let (args, names) = (&self.args, &self.names);
        let admin = self.admin.as_ref().context("not prepared")?;
        let stall = Duration::from_secs(args.common.stall_timeout);
        let topology = system::Topology { url: &args.url, names, batch_size: args.batch_size };
        let (coordinator, queue_type) = system::start_coordinator(&bins.coordinator, &topology)
            .await
            .context("the coordinator did not set up the subscription")?;
        println!("  coordinator declared the topology ({queue_type} queues)");

        let publisher = Publisher::connect(&args.url, "shardline-bench-publisher");
        let first = queue::publish(&publisher, &names.topic, args.messages, self.size)
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
            broker_pid: args.common.broker_pid,
        })
        .await
        .context("the raw consumer baseline failed")?;
        println!("  raw consumer drained them in {:.2} s", raw.seconds);
        // Nothing left over for the worker: it must handle exactly the second N.
        let leftovers = queue::purge_leftovers(admin, &names.queue).await?;
        if leftovers > 0 {
            println!("  {leftovers} messages the baseline acked came back after it closed; purged");
        }

        let second = queue::publish(&publisher, &names.topic, args.messages, self.size)
            .await
            .context("publishing for shardline failed")?;
        println!("  published again in {:.1} s ({:.0} messages/s)", second.seconds, second.per_s);
        queue::check_depth(admin, &names.queue, args.messages).await?;

        let system = system::run(
            coordinator,
            &system::Settings {
                worker_bin: &bins.worker,
                url: &args.url,
                queue: &names.queue,
                expected: args.messages,
                stall,
                broker_pid: args.common.broker_pid,
            },
        )
        .await
        .context("the shardline run failed")?;
        Ok(Figures {
            args: self.args.clone(),
            queue_type,
            published: [first, second],
            sides: Sides { raw, system },
        })
    }

    async fn clean_up(&mut self) -> anyhow::Result<()> {
        let Some(admin) = self.admin.take() else { return Ok(()) };
        let deleted = if self.args.keep_queues { Ok(()) } else { queue::delete(&admin, &self.names).await };
        if let Err(e) = admin.close(200, "bench done".into()).await {
            eprintln!("warning: cannot close the admin connection: {e}");
        }
        deleted
    }

    fn names(&self) -> Vec<(&'static str, String)> {
        vec![("queue", self.names.queue.clone()), ("topic", self.names.topic.clone())]
    }
}

/// Everything one run measured.
struct Figures {
    args: Args,
    queue_type: String,
    /// Before the baseline, before shardline.
    published: [queue::Published; 2],
    sides: Sides,
}

impl Report for Figures {
    fn print(&self) {
        let (args, raw, sys) = (&self.args, &self.sides.raw, &self.sides.system);
        let (w, ratio) = (&sys.worker, self.sides.steady_ratio());
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
        let [first, second] = &self.published;
        row("publish messages/s (confirms)", format!("{:.0} / {:.0}", first.per_s, second.per_s));
        // A value wider than the column carries its note: `{:>12}` pads
        // the figure, the rest follows.
        let first_to_last = |per_s: f64, s: f64| format!("{per_s:>12.0}   ({s:.2} s first to last)");
        row("raw consumer messages/s", first_to_last(raw.steady_per_s, raw.seconds - raw.first_s));
        row("shardline messages/s", first_to_last(sys.steady_per_s, sys.seconds - sys.first_s));
        let met = verdict(ratio >= TARGET_RATIO);
        row("ratio shardline / raw", format!("{ratio:>12.2}   target >= {TARGET_RATIO:.1}: {met}"));
        row("worker peak RSS (MiB)", format!("{:.1}", sys.peak_rss_mib()));
        sys.print_memory();
        row(
            "with start-up: raw / shardline msg/s",
            format!(
                "{:>12}   ({:.2} s / {:.2} s)",
                format!("{:.0} / {:.0}", raw.per_s, sys.per_s),
                raw.seconds,
                sys.seconds
            ),
        );
        row("  ratio with start-up", format!("{:.2}", self.sides.total_ratio()));
        row("first message after (s) raw / shardline", format!("{:.2} / {:.2}", raw.first_s, sys.first_s));
        row("worker consuming after (s)", sys.ready_s.map_or("never seen".to_owned(), |s| format!("{s:.2}")));
        row("cores raw consumer / broker", joined(&[raw.cores, raw.broker_cores]));
        row(
            "CPU us/message raw / worker",
            joined(&[raw.cpu_us_per(args.messages), sys.worker_cpu_us_per(args.messages)]),
        );
        sys.print_cores();
        row(
            "mean messages/batch raw / shardline",
            format!(
                "{:.0} / {:.0}",
                args.messages as f64 / raw.batches.unwrap_or(0).max(1) as f64,
                w.mean_batch()
            ),
        );
        row("mean handler call (ms)", format!("{:.3}", w.mean_handler_ms));
        row("redelivered raw / shardline", format!("{} / {}", raw.redelivered.unwrap_or(0), w.redeliveries));
        if w.records > args.messages as f64 {
            println!("  note: the worker handled {:.0} messages for {} published", w.records, args.messages);
        }
    }

    fn json(&self) -> serde_json::Value {
        let (args, raw, sys) = (&self.args, &self.sides.raw, &self.sides.system);
        let ratio = self.sides.steady_ratio();
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
            "raw": raw.json(&UNITS),
            "shardline": sys.json(&UNITS),
            "raw_cpu_us_per_message": raw.cpu_us_per(args.messages).map(round3),
            "worker_cpu_us_per_message": sys.worker_cpu_us_per(args.messages).map(round3),
            "ratio": round3(ratio),
            "total_ratio": round3(self.sides.total_ratio()),
            "target_ratio": TARGET_RATIO,
            "ratio_met": ratio >= TARGET_RATIO,
            "worker_peak_rss_mib": round3(sys.peak_rss_mib()),
        })
    }
}

/// The JSON names of the system side's figures.
const UNITS: Units =
    Units { unit: "messages", raw_first: "first_message_s", first: "first_message_s", ready: "consuming_s" };
