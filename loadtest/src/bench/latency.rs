//! `bench latency`: how long a record waits between its producer and the
//! start of the handler, through shardline, next to how long it waits
//! between its producer and a plain rdkafka consumer's `poll` on the same
//! broker in the same run. The difference is shardline's overhead
//! (batching, the driver, the policy, the handler call), the figure issue
//! 17 targets (p99 < 5 ms at 2,000 records/s with `batch_window` 0).
//!
//! Each phase produces to a fresh topic at a steady rate (records due are
//! sent every millisecond, `linger.ms` 5), each value carrying its send time in
//! microseconds. The raw consumer is assigned every partition at its end
//! before producing starts and notes when each record is polled. The
//! shardline phase runs the real coordinator and one real worker with the
//! `forward` handler, which publishes each record to a RabbitMQ receipts
//! exchange with `shardline.invoked_at_ms` (when the handler began; RabbitMQ
//! and not a Kafka topic, since a lease runs one batch at a time and a
//! receipt sink as slow as tansu's acks=all produce would hold back the
//! records behind it; a queue that is not durable, so a confirm waits for no
//! disk write); producing starts
//! once every lease is owned and has pinned its start (`latest`). Both
//! sides' times are read in whole milliseconds (the receipts' resolution),
//! so the two are judged alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use shardline_proto::StartingPosition;
use shardline_proto::v1::{self, admin_api_client::AdminApiClient};
use shardline_testkit::config::{CoordinatorConfig, StreamConfig, WorkerConfig};
use shardline_testkit::kafka::KafkaAccess;
use shardline_worker::amqp::header_bytes;
use shardline_worker::config::KafkaSettings;
use tokio::time::Instant;

use super::compare::{Bins, Common, WORKER_ID};
use super::kafka::topic;
use crate::child::{Coordinator, Worker};
use crate::stats::round3;

/// Issue 17's target for the p99 overhead.
const TARGET_P99_OVERHEAD_MS: f64 = 5.0;
/// Receipts or polls quiet this long after producing ends: the run stops.
const QUIET: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Records per second produced in each phase.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    rate: u64,
    /// Seconds of producing per phase.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Partitions of each phase's topic.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    partitions: u32,
    /// The stream's `batch_window` in ms (0: a batch is cut from what is
    /// already fetched).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=300_000))]
    batch_window_ms: u64,
    /// `fetch.wait.max.ms` of both consumers (the raw one and the worker's,
    /// as a `[kafka]` property). A broker that does not answer a waiting
    /// fetch as soon as a record arrives (tansu 0.6) adds up to this much to
    /// every wait, on both sides alike; a small value keeps that noise
    /// below the overhead measured.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    fetch_wait_ms: u64,
    /// Kafka bootstrap servers.
    #[arg(long, env = "SHARDLINE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// RabbitMQ, for the receipts of the shardline phase.
    #[arg(long, env = "SHARDLINE_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    #[command(flatten)]
    common: Common,
}

/// One side's waits, in ms, sorted.
struct Waits(Vec<f64>);

impl Waits {
    fn new(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        Self(v)
    }

    fn quantile(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
        self.0[i.min(self.0.len() - 1)]
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "records": self.0.len(),
            "p50_ms": round3(self.quantile(0.5)),
            "p90_ms": round3(self.quantile(0.9)),
            "p99_ms": round3(self.quantile(0.99)),
            "p999_ms": round3(self.quantile(0.999)),
            "max_ms": round3(self.quantile(1.0)),
        })
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let bins = Bins::resolve(args.common.coordinator_bin.as_deref(), args.common.worker_bin.as_deref())?;
    let access = KafkaAccess { brokers: args.brokers.clone(), settings: KafkaSettings::default() };
    let records = args.rate * args.seconds;
    println!(
        "bench latency: {records} records at {}/s over {} partitions, batch_window {} ms, fetch.wait.max.ms {}; \
         producer → raw poll, then producer → handler start",
        args.rate, args.partitions, args.batch_window_ms, args.fetch_wait_ms
    );
    let raw = raw_side(&args, &access).await.context("raw consumer phase")?;
    let system = system_side(&args, &access, &bins).await.context("shardline phase")?;
    let overhead = |q: f64| system.quantile(q) - raw.quantile(q);
    println!("  {:<28} {:>9} {:>9} {:>9} {:>9} {:>9}", "ms", "p50", "p90", "p99", "p999", "max");
    for (name, w) in [("raw rdkafka poll", &raw), ("shardline handler start", &system)] {
        println!(
            "  {name:<28} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            w.quantile(0.5),
            w.quantile(0.9),
            w.quantile(0.99),
            w.quantile(0.999),
            w.quantile(1.0)
        );
    }
    let p99 = overhead(0.99);
    let verdict = if p99 < TARGET_P99_OVERHEAD_MS { "met" } else { "MISSED" };
    println!(
        "  overhead p50 / p99 / p999     {:.2} / {p99:.2} / {:.2} ms   target p99 < {TARGET_P99_OVERHEAD_MS} ms: {verdict}",
        overhead(0.5),
        overhead(0.999)
    );
    if let Some(path) = &args.common.json {
        let report = json!({
            "bench": "latency",
            "rate": args.rate,
            "seconds": args.seconds,
            "partitions": args.partitions,
            "batch_window_ms": args.batch_window_ms,
            "fetch_wait_ms": args.fetch_wait_ms,
            "raw": raw.json(),
            "shardline": system.json(),
            "overhead_p50_ms": round3(overhead(0.5)),
            "overhead_p99_ms": round3(p99),
            "overhead_p999_ms": round3(overhead(0.999)),
            "target_p99_overhead_ms": TARGET_P99_OVERHEAD_MS,
        });
        let text = serde_json::to_string_pretty(&report).context("cannot encode the JSON report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The send time a value carries: `t=<µs>;` then padding.
fn sent_us(value: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(value).ok()?;
    text.strip_prefix("t=")?.split(';').next()?.parse().ok()
}

/// A wait in ms from a send time in µs to a moment in whole ms.
fn wait_ms(sent_us: i64, at_ms: i64) -> f64 {
    (at_ms * 1000 - sent_us) as f64 / 1000.0
}

/// Produces `rate × seconds` records to `topic`, a few every millisecond,
/// each sent as soon as its time comes (no linger), keyed round-robin.
async fn produce_steady(access: &KafkaAccess, topic: &str, args: &Args) -> anyhow::Result<u64> {
    let producer: Arc<FutureProducer> = Arc::new(
        access
            .client_config()?
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000")
            .create()
            .context("cannot create a Kafka producer")?,
    );
    let total = args.rate * args.seconds;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut acks = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * args.rate as f64) as u64).min(total);
        while sent < due {
            let (producer, topic) = (producer.clone(), topic.to_owned());
            let key = format!("k-{}", sent % 64);
            let value = format!("t={};{}", now_us(), "x".repeat(64));
            acks.push(tokio::spawn(async move {
                producer
                    .send(FutureRecord::to(&topic).key(&key).payload(&value), Duration::from_secs(60))
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))
            }));
            sent += 1;
        }
    }
    for ack in acks {
        ack.await.context("a produce task failed")??;
    }
    Ok(total)
}

/// The raw consumer, assigned at the end of every partition, notes when
/// each record is polled; records are produced once it is assigned.
async fn raw_side(args: &Args, access: &KafkaAccess) -> anyhow::Result<Waits> {
    let name = topic::unique_name();
    topic::create(access, &name, args.partitions).await?;
    let mut config = access.client_config()?;
    config
        .set("group.id", format!("shardline-bench-latency-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", args.fetch_wait_ms.to_string());
    let consumer: BaseConsumer = config.create().context("cannot create the raw consumer")?;
    let mut list = TopicPartitionList::new();
    for p in 0..args.partitions {
        let p = i32::try_from(p).context("partition out of range")?;
        list.add_partition_offset(&name, p, Offset::End).context("assign")?;
    }
    consumer.assign(&list).context("cannot assign the partitions")?;
    let expected = args.rate * args.seconds;
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_c, ready_c) = (stop.clone(), ready.clone());
    let consume = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f64>> {
        let mut waits = Vec::new();
        let mut last = std::time::Instant::now();
        // A few empty polls resolve `End` and start fetching.
        for _ in 0..20 {
            if let Some(Err(e)) = consumer.poll(Duration::from_millis(50)) {
                eprintln!("warning: raw consumer: {e}");
            }
        }
        ready_c.store(true, Ordering::SeqCst);
        while (waits.len() as u64) < expected && !stop_c.load(Ordering::Relaxed) {
            match consumer.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => {
                    let at_ms = now_us() / 1000;
                    if let Some(sent) = m.payload().and_then(sent_us) {
                        waits.push(wait_ms(sent, at_ms));
                    }
                    last = std::time::Instant::now();
                }
                Some(Err(e)) => eprintln!("warning: raw consumer: {e}"),
                None if last.elapsed() > QUIET && !waits.is_empty() => break,
                None => {}
            }
        }
        Ok(waits)
    });
    while !ready.load(Ordering::SeqCst) {
        if consume.is_finished() {
            bail!("the raw consumer stopped before it was ready");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let produced = produce_steady(access, &name, args).await;
    if produced.is_err() {
        stop.store(true, Ordering::SeqCst);
    }
    let produced = produced?;
    let waits = consume.await.context("the raw consumer panicked")??;
    if (waits.len() as u64) < produced {
        bail!("the raw consumer read {} of {produced} records", waits.len());
    }
    Ok(Waits::new(waits))
}

/// The coordinator and one worker with `forward`; the receipts' invocation
/// times against the values' send times.
async fn system_side(args: &Args, access: &KafkaAccess, bins: &Bins) -> anyhow::Result<Waits> {
    let (name, receipts) = (topic::unique_name(), topic::unique_name());
    topic::create(access, &name, args.partitions).await?;
    // Not durable: RabbitMQ syncs a durable queue's messages in groups,
    // tens of milliseconds apart, and the lease's next batch would wait.
    crate::run::amqp::declare_receipts(&args.amqp_url, &receipts, false).await?;
    let measured = measure_system(args, access, bins, &name, &receipts).await;
    if let Err(e) = delete_receipts(&args.amqp_url, &receipts).await {
        eprintln!("warning: {e:#}");
    }
    measured
}

async fn measure_system(
    args: &Args,
    access: &KafkaAccess,
    bins: &Bins,
    name: &str,
    receipts: &str,
) -> anyhow::Result<Waits> {
    let mut stream =
        StreamConfig { starting_position: StartingPosition::Latest, ..StreamConfig::new(name, "forward") };
    stream.settings.batch_window = Duration::from_millis(args.batch_window_ms);
    let config = CoordinatorConfig {
        kafka_brokers: access.brokers.clone(),
        kafka: access.settings.clone(),
        discovery_interval: Duration::from_millis(500),
        streams: vec![stream],
        ..CoordinatorConfig::default()
    };
    let mut coordinator = Coordinator::start_with(&bins.coordinator, config).await?;
    let mut admin = AdminApiClient::new(coordinator.channels(1).await?.remove(0));
    // The worker's consumers wait for fetches as the raw one does.
    let fetch = format!("fetch.wait.max.ms={}", args.fetch_wait_ms);
    let kafka = KafkaSettings::default().with_args([fetch.as_str()]).map_err(anyhow::Error::msg)?;
    kafka.check().context("--fetch-wait-ms")?;
    let settings = WorkerConfig {
        coordinator: coordinator.url(),
        worker_id: Some(WORKER_ID.to_owned()),
        kafka_brokers: access.brokers.clone(),
        kafka,
        amqp_url: args.amqp_url.clone(),
        handlers: [("forward".to_owned(), shardline_testkit::config::settings(&[("exchange", receipts)]))]
            .into(),
        ..WorkerConfig::default()
    };
    let mut worker = Worker::start(&bins.worker, &settings)?;
    // Every lease owned and its start pinned: records produced from now on
    // are all read, none before.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        coordinator.check_alive()?;
        worker.check_alive()?;
        let request = v1::ListLeasesRequest { name: name.to_owned() };
        let leases = admin.list_leases(request).await.context("ListLeases failed")?.into_inner().leases;
        let pinned = leases.iter().filter(|l| l.owner == WORKER_ID && l.checkpoint.is_some()).count();
        if pinned == args.partitions as usize {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{pinned} of {} leases owned and started after 60 s; worker log:\n{}",
                args.partitions,
                worker.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let produced = produce_steady(access, name, args).await?;
    let waits = read_receipts(&args.amqp_url, receipts, produced).await;
    worker.stop()?;
    coordinator.stop()?;
    Ok(Waits::new(waits?))
}

/// Reads `expected` receipts: each one's invocation time against its
/// value's send time.
async fn read_receipts(url: &str, queue: &str, expected: u64) -> anyhow::Result<Vec<f64>> {
    let connection = shardline_testkit::amqp::connect(url, "shardline-bench-latency").await?;
    let channel = connection.create_channel().await.context("channel.open")?;
    channel.basic_qos(1000, BasicQosOptions::default()).await.context("basic.qos")?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .context("basic.consume")?;
    let mut waits = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
    while (waits.len() as u64) < expected {
        let delivery = match tokio::time::timeout(QUIET, consumer.next()).await {
            Err(_) => bail!("{} of {expected} receipts, then nothing for {QUIET:?}", waits.len()),
            Ok(None) => bail!("the broker cancelled the receipts consumer"),
            Ok(Some(d)) => d.context("receipts consumer")?,
        };
        let invoked: Option<i64> = delivery.properties.headers().as_ref().and_then(|h| {
            let (_, v) = h.inner().iter().find(|(k, _)| k.as_str() == "shardline.invoked_at_ms")?;
            String::from_utf8_lossy(&header_bytes(v)).parse().ok()
        });
        match (sent_us(&delivery.data), invoked) {
            (Some(sent), Some(at_ms)) => waits.push(wait_ms(sent, at_ms)),
            _ => bail!("a receipt without a send time or shardline.invoked_at_ms"),
        }
    }
    if let Err(e) = connection.close(200, "done".into()).await {
        eprintln!("warning: cannot close the receipts connection: {e}");
    }
    Ok(waits)
}

/// Deletes the receipts queue and exchange.
async fn delete_receipts(url: &str, name: &str) -> anyhow::Result<()> {
    let connection = shardline_testkit::amqp::connect(url, "shardline-bench-latency-cleanup").await?;
    shardline_testkit::amqp::delete(&connection, &[name.to_owned()], &[name.to_owned()]).await?;
    if let Err(e) = connection.close(200, "done".into()).await {
        eprintln!("warning: cannot close the cleanup connection: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_times_are_read_back_and_waits_are_in_ms() {
        assert_eq!(sent_us(b"t=1700000000123456;xxxx"), Some(1_700_000_000_123_456));
        assert_eq!(sent_us(b"junk"), None);
        assert!((wait_ms(1_000_500, 1_002) - 1.5).abs() < 1e-9);
        let w = Waits::new(vec![3.0, 1.0, 2.0, 4.0, 5.0]);
        assert_eq!((w.quantile(0.5), w.quantile(1.0), w.quantile(0.0)), (3.0, 5.0, 1.0));
    }
}
