//! The benchmark's topic on the real broker: created fresh (a unique name,
//! so no earlier run's records or checkpoints leak in), filled with keyed
//! records, measured (watermarks), and deleted afterwards.

use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use shardline_testkit::kafka::KafkaAccess;
use tokio::time::Instant;

/// Records in flight before the producer waits for their acknowledgements:
/// enough to fill librdkafka's batches, far below its 100,000-message
/// queue, so a send never fails for a full queue.
const CHUNK: u64 = 10_000;
/// How long the broker gets for one admin operation or metadata read.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A topic name no earlier run used; only characters the coordinator's
/// stream names allow.
pub fn unique_name() -> String {
    shardline_testkit::unique("shardline-bench")
}

/// What producing measured.
#[derive(Debug, Clone, Copy)]
pub struct Produced {
    pub seconds: f64,
    pub per_s: f64,
}

/// Produces `records` keyed records of `record_bytes` each with acks=all,
/// waiting for every acknowledgement chunk by chunk. Keys are distinct, so
/// the partitioner spreads records over all partitions.
pub async fn produce(
    kafka: &KafkaAccess,
    topic: &str,
    records: u64,
    record_bytes: usize,
) -> anyhow::Result<Produced> {
    let producer: FutureProducer = kafka
        .client_config()?
        .set("acks", "all")
        // Larger batches than the 5 ms default: fewer, bigger produce
        // requests are what a bulk load wants.
        .set("linger.ms", "20")
        .set("message.timeout.ms", "120000")
        .create()
        .context("cannot create a Kafka producer")?;
    let mut value = vec![b'x'; record_bytes];
    let started = Instant::now();
    let mut next = 0u64;
    while next < records {
        let end = (next + CHUNK).min(records);
        let mut pending = Vec::with_capacity((end - next) as usize);
        for i in next..end {
            let key = format!("key-{i}");
            // The index at the front keeps payloads distinct (nothing
            // downstream can deduplicate or compress them away).
            let digits = i.to_string();
            let n = digits.len().min(value.len());
            value[..n].copy_from_slice(&digits.as_bytes()[..n]);
            let record = FutureRecord::to(topic).key(&key).payload(&value);
            match producer.send_result(record) {
                Ok(delivery) => pending.push(delivery),
                Err((e, _)) => bail!("cannot enqueue record {i}: {e}"),
            }
        }
        for delivery in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => bail!("the broker did not take a record: {e}"),
                Err(_) => bail!("the producer dropped a delivery report"),
            }
        }
        next = end;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Produced { seconds, per_s: records as f64 / seconds.max(1e-9) })
}

/// Creates `topic` with `partitions`, saying how long it took.
pub async fn create(access: &KafkaAccess, topic: &str, partitions: u32) -> anyhow::Result<()> {
    let created = std::time::Instant::now();
    shardline_testkit::kafka::create_topic(access, topic, partitions, false).await?;
    println!("  topic created in {:.1} s", created.elapsed().as_secs_f64());
    Ok(())
}

/// Produces `records` of `record_bytes` to `topic` and checks the broker
/// holds every one; how it went, and each partition's (low, high)
/// watermarks.
pub async fn fill(
    access: &KafkaAccess,
    topic: &str,
    partitions: u32,
    records: u64,
    record_bytes: usize,
) -> anyhow::Result<(Produced, Vec<(i64, i64)>)> {
    let produced =
        produce(access, topic, records, record_bytes).await.context("producing the records failed")?;
    println!("  produced in {:.1} s ({:.0} records/s)", produced.seconds, produced.per_s);
    let watermarks = watermarks(access, topic, partitions).await?;
    let stored: i64 = watermarks.iter().map(|(low, high)| high - low).sum();
    if stored != records as i64 {
        bail!("the broker holds {stored} records of {topic} after {records} were acknowledged");
    }
    Ok((produced, watermarks))
}

/// `(low, high)` watermarks of every partition `0..partitions`.
pub async fn watermarks(
    kafka: &KafkaAccess,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<Vec<(i64, i64)>> {
    let kafka = kafka.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer = metadata_consumer(&kafka)?;
        (0..partitions)
            .map(|p| {
                let p = i32::try_from(p).context("too many partitions")?;
                consumer
                    .fetch_watermarks(&topic, p, ADMIN_TIMEOUT)
                    .with_context(|| format!("cannot read the watermarks of {topic}/{p}"))
            })
            .collect()
    })
    .await
    .context("the watermark reader panicked")?
}

/// A consumer only used for metadata; it never joins a group or commits.
fn metadata_consumer(kafka: &KafkaAccess) -> anyhow::Result<BaseConsumer> {
    kafka
        .client_config()?
        .set("group.id", "shardline-bench-metadata")
        .set("enable.auto.commit", "false")
        .create()
        .context("cannot create a Kafka consumer")
}

/// Every partition `0..partitions` of `topic` from its beginning.
pub fn all_from_beginning(topic: &str, partitions: u32) -> anyhow::Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let p = i32::try_from(p).context("too many partitions")?;
        tpl.add_partition_offset(topic, p, Offset::Beginning).context("cannot list a partition")?;
    }
    Ok(tpl)
}
