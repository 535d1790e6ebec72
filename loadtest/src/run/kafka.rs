//! The Kafka side of a run: the source and receipts topics, the producer
//! that follows the rate profile, and the reader that books receipts.
//!
//! Topics are created with unique names and never deleted: tansu's
//! DeleteTopics deletes every topic of the cluster (see ARCHITECTURE.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use shardline_testkit::kafka::KafkaAccess;
use tokio::time::Instant;

use super::ledger::{Books, Ledger, lock};
use super::payload::{self, now_ms};
use super::rate::Profile;
use shardline_proto::topology::headers;

/// Partitions of the receipts topic: a few, so the workers' receipts do not
/// all queue behind one partition; a key's receipts still share one, which
/// is what the per-key order check needs.
pub const RECEIPT_PARTITIONS: u32 = 4;
/// How often the producer looks at its schedule.
const TICK: Duration = Duration::from_millis(10);
/// How long librdkafka keeps retrying a record before reporting it failed.
const MESSAGE_TIMEOUT_MS: &str = "30000";

/// What the producer needs besides the shared ledger.
pub struct ProduceSpec {
    pub kafka: KafkaAccess,
    pub topic: String,
    pub run: String,
    pub partitions: u32,
    pub keys: u32,
    pub size: usize,
    pub profile: Profile,
    pub duration: Duration,
}

/// Produces on schedule from `started` for the scenario's duration, then
/// waits for every outstanding acknowledgement. Each record is booked
/// before it is sent and marked acknowledged or failed when librdkafka
/// reports on it (acks=all, so "acknowledged" means the broker has it).
pub async fn produce(spec: ProduceSpec, ledger: Books, started: Instant) -> anyhow::Result<()> {
    let producer: FutureProducer = spec
        .kafka
        .client_config()?
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", MESSAGE_TIMEOUT_MS)
        .create()
        .context("cannot create the Kafka producer")?;
    let key_partition: Vec<u32> = (0..spec.keys).map(|k| payload::partition_of(k, spec.partitions)).collect();
    // A spike on some partitions draws its extra records from their keys.
    let (spike_keys, share) = match &spec.profile {
        Profile::Spike { partitions: Some(hot), .. } => {
            let keys: Vec<u32> =
                (0..spec.keys).filter(|&k| hot.contains(&key_partition[k as usize])).collect();
            let share = keys.len() as f64 / f64::from(spec.keys.max(1));
            (keys, share)
        }
        _ => (Vec::new(), 0.0),
    };
    let (mut base_sent, mut extra_sent) = (0u64, 0u64);
    let mut deliveries = FuturesUnordered::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = spec.duration.as_secs_f64();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some((id, result)) = deliveries.next(), if !deliveries.is_empty() => {
                book(&ledger, id, result);
                continue;
            }
        }
        let t = started.elapsed().as_secs_f64().min(end);
        let due = spec.profile.due(t, share);
        let mut batch = Vec::new();
        while (base_sent as f64) < due.base.floor() {
            batch.push((base_sent % u64::from(spec.keys)) as u32);
            base_sent += 1;
        }
        while (extra_sent as f64) < due.extra.floor() && !spike_keys.is_empty() {
            batch.push(spike_keys[(extra_sent % spike_keys.len() as u64) as usize]);
            extra_sent += 1;
        }
        for key in batch {
            let partition = key_partition[key as usize];
            let sent_ms = now_ms();
            let id = lock(&ledger).send(key, sent_ms);
            let value = payload::encode(&spec.run, id, sent_ms, spec.size);
            let key_text = payload::key(key);
            let record = FutureRecord::to(&spec.topic)
                .partition(i32::try_from(partition).unwrap_or(0))
                .key(&key_text)
                .payload(&value);
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push(async move { (id, delivery.await) }),
                // The local queue is full or the client is broken: this
                // record is not produced; the run goes on.
                Err(_) => lock(&ledger).failed(id),
            }
        }
        if t >= end {
            break;
        }
    }
    // Every record either reaches the broker or times out within
    // message.timeout.ms: this ends.
    while let Some((id, result)) = deliveries.next().await {
        book(&ledger, id, result);
    }
    Ok(())
}

type DeliveryResult =
    Result<rdkafka::producer::future_producer::OwnedDeliveryResult, futures::channel::oneshot::Canceled>;

fn book(ledger: &Mutex<Ledger>, id: u64, result: DeliveryResult) {
    let mut ledger = lock(ledger);
    match result {
        Ok(Ok(_)) => ledger.acked(id, now_ms()),
        Ok(Err(_)) | Err(_) => ledger.failed(id),
    }
}

/// Reads the receipts topic from its beginning on a blocking thread until
/// dropped, booking each receipt.
pub struct ReceiptReader {
    stop: Arc<AtomicBool>,
    thread: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl ReceiptReader {
    pub fn start(kafka: &KafkaAccess, topic: &str, ledger: Books) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = kafka
            .client_config()?
            // Required by librdkafka even for manual assignment; never joined.
            .set("group.id", format!("shardline-loadtest-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // Small fetch waits: a receipt's arrival is what progress shows.
            .set("fetch.wait.max.ms", "50")
            .create()
            .context("cannot create the receipts consumer")?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..RECEIPT_PARTITIONS {
            tpl.add_partition_offset(topic, i32::try_from(p).unwrap_or(0), Offset::Beginning)
                .context("cannot list a receipts partition")?;
        }
        consumer.assign(&tpl).context("cannot assign the receipts partitions")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = tokio::task::spawn_blocking(move || {
            while !flag.load(Ordering::Relaxed) {
                let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
                // A transient fetch error (the broker busy) is retried by
                // librdkafka itself; nothing to book.
                let Ok(m) = message else { continue };
                let stamp = m.payload().and_then(payload::decode);
                let header = |name: &str| {
                    m.headers().and_then(|h| {
                        h.iter()
                            .find(|h| h.key == name)
                            .and_then(|h| h.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    })
                };
                let mut ledger = lock(&ledger);
                match (stamp, header(headers::STREAM), header(headers::PARTITION)) {
                    (Some(stamp), Some(stream), Some(partition)) => {
                        let worker = header(headers::WORKER).unwrap_or_default();
                        // The worker's producer stamps the receipt when it
                        // forwards the record: the processing time itself,
                        // not when this reader got to it.
                        let at_ms = m
                            .timestamp()
                            .to_millis()
                            .and_then(|ms| u64::try_from(ms).ok())
                            .unwrap_or_else(now_ms);
                        let invoked_ms = header(headers::INVOKED_AT_MS).and_then(|v| v.parse().ok());
                        ledger.receipt(
                            &stamp,
                            &stream,
                            partition.parse().unwrap_or(u32::MAX),
                            &worker,
                            at_ms,
                            invoked_ms,
                        );
                    }
                    _ => ledger.foreign(),
                }
            }
            Ok(())
        });
        Ok(Self { stop, thread: Some(thread) })
    }

    /// Stops reading and waits for the thread.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.await.context("the receipts reader panicked")??;
        }
        Ok(())
    }
}

impl Drop for ReceiptReader {
    fn drop(&mut self) {
        // An interrupted run: the thread sees this within one poll.
        self.stop.store(true, Ordering::Relaxed);
    }
}
