//! The RabbitMQ side of a run: the receipts exchange and queue, the
//! publisher that follows the rate profile (publisher confirms through the
//! worker's own [`Publisher`]), the reader that books receipts, and
//! deleting what the run declared afterwards.
//!
//! Everything here survives `rabbitmqctl stop_app`: the publisher reports
//! the messages it could not get confirmed (they do not count as produced)
//! and reconnects on the next publish; the reader reconnects in a loop and
//! recognizes receipts RabbitMQ hands it a second time.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use lapin::ExchangeKind;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use shardline_proto::FailurePolicy;
use shardline_proto::topology::{self, headers};
use shardline_testkit::amqp::{connect, delete, with_channel};
use shardline_worker::amqp::{Message, Publisher, header_bytes};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::ledger::{Books, lock};
use super::payload::{self, now_ms};
use super::rate::Profile;

/// How often the producer looks at its schedule.
const TICK: Duration = Duration::from_millis(10);
/// Most messages in one publish call (each call waits for all confirms).
const CHUNK: usize = 200;
/// Publish calls waiting for confirms at once: enough to hide the confirm
/// round trip at a few thousand messages a second, bounded so a stopped
/// broker does not pile up unbounded work.
const IN_FLIGHT: usize = 32;
/// Unacknowledged receipts the reader may hold.
const PREFETCH: u16 = 1000;

/// The exchanges and queues of one run.
#[derive(Debug, Clone)]
pub struct Names {
    /// The fanout topic producers publish to.
    pub topic: String,
    pub subscriptions: Vec<String>,
    /// Both the receipts exchange and the queue bound to it.
    pub receipts: String,
}

/// Declares the receipts fanout exchange and a queue bound to it, before
/// any worker starts: the `chaos` handler's publishes are `mandatory`, so a
/// receipt with no queue to go to fails the batch. `durable`: both survive
/// a broker restart (the load test's broker kills); not durable, a
/// confirm waits for no disk write (`bench latency`, whose lease's next
/// batch waits for its receipts' confirms).
pub async fn declare_receipts(url: &str, name: &str, durable: bool) -> anyhow::Result<()> {
    let connection = connect(url, "shardline-loadtest-setup").await?;
    let exchange = ExchangeDeclareOptions { durable, ..ExchangeDeclareOptions::default() };
    let queue = QueueDeclareOptions { durable, ..QueueDeclareOptions::default() };
    with_channel(&connection, async |ch| {
        ch.exchange_declare(name.into(), ExchangeKind::Fanout, exchange, FieldTable::default()).await?;
        ch.queue_declare(name.into(), queue, FieldTable::default()).await?;
        ch.queue_bind(name.into(), name.into(), "".into(), QueueBindOptions::default(), FieldTable::default())
            .await
    })
    .await
    .with_context(|| format!("cannot declare the receipts exchange and queue {name}"))?;
    // The declarations are done; a failed close only leaks a connection
    // until the process ends.
    if let Err(e) = connection.close(200, "declared".into()).await {
        eprintln!("warning: cannot close the setup connection: {e}");
    }
    Ok(())
}

/// Deletes the receipts queue and exchange and, when `coordinator_topology`,
/// what the coordinator declared for the run (subscription, dead-letter and
/// retry queues, the exchanges): quorum queues left behind would cost the
/// broker on every later run. Call after the coordinator is stopped, or it
/// declares them again. Failures are returned as warnings.
pub async fn cleanup(url: &str, names: &Names, coordinator_topology: bool) -> Vec<String> {
    let connection = match connect(url, "shardline-loadtest-cleanup").await {
        Ok(c) => c,
        Err(e) => return vec![format!("cannot clean up RabbitMQ: {e:#}")],
    };
    let mut queues = vec![names.receipts.clone()];
    let mut exchanges = vec![names.receipts.clone()];
    if coordinator_topology {
        for s in &names.subscriptions {
            // The default policy's delays; a scenario that changes the retry
            // settings leaves its (empty) retry queues behind.
            queues.extend(topology::queues(s, &FailurePolicy::default()));
            exchanges.push(topology::dead_letter_exchange(s));
        }
        exchanges.push(names.topic.clone());
    }
    let mut warnings = Vec::new();
    if let Err(e) = delete(&connection, &queues, &exchanges).await {
        warnings.push(format!("{e:#}"));
    }
    if let Err(e) = connection.close(200, "cleaned up".into()).await {
        warnings.push(format!("cannot close the clean-up connection: {e}"));
    }
    warnings
}

pub struct ProduceSpec {
    pub url: String,
    pub exchange: String,
    pub run: String,
    pub keys: u32,
    pub size: usize,
    pub profile: Profile,
    pub duration: Duration,
}

/// Publishes on schedule from `started` for the scenario's duration, then
/// waits for every outstanding confirm. Publish calls run concurrently (at
/// most [`IN_FLIGHT`]); when they are all waiting (a stopped broker), the
/// schedule falls behind and catches up once RabbitMQ is back, the way a
/// real producer's buffer would. `sent_ms` is stamped when a message is
/// actually handed to the client, so the harness's own backlog does not
/// count as the system's latency.
pub async fn produce(spec: ProduceSpec, books: Books, started: Instant) -> anyhow::Result<()> {
    let publisher = Publisher::connect(&spec.url, "shardline-loadtest-producer");
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut calls = JoinSet::new();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = spec.duration.as_secs_f64();
    loop {
        tick.tick().await;
        // Finished calls are only reaped here so the set does not grow.
        while let Some(result) = calls.try_join_next() {
            result.context("a publish task panicked")?;
        }
        let t = started.elapsed().as_secs_f64().min(end);
        // Spikes on RabbitMQ are whole-rate (no partitions): all is base.
        let due = spec.profile.due(t, 0.0).base.floor() as u64;
        while sent < due {
            let permit = permits.clone().acquire_owned().await.context("the publish semaphore closed")?;
            let n = (due - sent).min(CHUNK as u64);
            let mut ids = Vec::with_capacity(n as usize);
            let mut messages = Vec::with_capacity(n as usize);
            {
                let mut ledger = lock(&books);
                for i in sent..sent + n {
                    let key = (i % u64::from(spec.keys)) as u32;
                    let sent_ms = now_ms();
                    let id = ledger.send(key, sent_ms);
                    ids.push(id);
                    messages.push(Message {
                        exchange: spec.exchange.clone(),
                        body: payload::encode(&spec.run, id, sent_ms, spec.size),
                        message_id: Some(payload::key(key)),
                        ..Message::default()
                    });
                }
            }
            sent += n;
            let publisher = publisher.clone();
            let books = books.clone();
            calls.spawn(async move {
                let result = publisher.publish(&messages).await;
                let at = now_ms();
                let mut ledger = lock(&books);
                for id in ids {
                    // On an error some may have been confirmed: all count as
                    // not produced, and any processed anyway are reported as
                    // unconfirmed, never as lost.
                    if result.is_ok() { ledger.acked(id, at) } else { ledger.failed(id) }
                }
                drop(permit);
            });
        }
        if t >= end {
            break;
        }
    }
    while let Some(result) = calls.join_next().await {
        result.context("a publish task panicked")?;
    }
    Ok(())
}

/// Consumes the receipts queue until stopped, reconnecting whenever the
/// connection breaks.
pub struct ReceiptReader {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Connections lost (and retried), for the report.
    reconnects: Arc<std::sync::atomic::AtomicU64>,
    last_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl ReceiptReader {
    pub fn start(url: &str, queue: &str, books: Books) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let (url, queue) = (url.to_owned(), queue.to_owned());
        let reconnects = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let last_error = Arc::new(std::sync::Mutex::new(None));
        let (counter, error) = (reconnects.clone(), last_error.clone());
        let task = tokio::spawn(async move {
            let (reconnects, last_error) = (counter, error);
            let mut seen = HashSet::new();
            loop {
                match consume(&url, &queue, &books, &mut seen, &mut stopped).await {
                    Ok(()) => return,
                    // RabbitMQ is down (a rabbit_stop fault) or the channel
                    // broke: unacknowledged receipts go back to the queue and
                    // come again after the reconnect.
                    Err(e) => {
                        *last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some(format!("{e:#}"));
                        reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            _ = stopped.changed() => return,
                        }
                    }
                }
            }
        });
        Self { stop, task, reconnects, last_error }
    }

    /// Stops consuming and waits for the reader to close; returns a note
    /// on the connections it lost, if any.
    pub async fn stop(mut self) -> Option<String> {
        let _ = self.stop.send(true);
        // It ends at its next delivery or wait; a panic there has nothing
        // to report beyond the receipts already booked.
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
        let n = self.reconnects.load(std::sync::atomic::Ordering::Relaxed);
        let last = self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        (n > 0).then(|| {
            format!("the receipts reader reconnected {n} times (last error: {})", last.unwrap_or_default())
        })
    }
}

impl Drop for ReceiptReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Longest wait for one step of (re)connecting or one ack: a broker that
/// is starting up can accept a connection and then not answer for a
/// while; the reader gives up on that attempt and tries again.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

async fn step<T, E: Into<anyhow::Error>>(
    what: &str,
    f: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(STEP_TIMEOUT, f).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => anyhow::bail!("{what} did not finish within {STEP_TIMEOUT:?}"),
    }
}

/// One connection's worth of consuming; `Ok` when told to stop.
async fn consume(
    url: &str,
    queue: &str,
    books: &Books,
    seen: &mut HashSet<u64>,
    stopped: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let connection = step("connect", connect(url, "shardline-loadtest-receipts")).await?;
    let channel = step("channel.open", connection.create_channel()).await?;
    step("basic.qos", channel.basic_qos(PREFETCH, BasicQosOptions::default())).await?;
    let mut consumer = step(
        "basic.consume",
        channel.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await?;
    loop {
        let delivery = tokio::select! {
            _ = stopped.changed() => {
                let _ = connection.close(200, "run done".into()).await;
                return Ok(());
            }
            delivery = consumer.next() => delivery,
        };
        let Some(delivery) = delivery else { anyhow::bail!("the broker cancelled the receipts consumer") };
        let delivery = delivery?;
        let header = |name: &str| {
            delivery.properties.headers().as_ref().and_then(|h| {
                h.inner()
                    .iter()
                    .find(|(k, _)| k.as_str() == name)
                    .map(|(_, v)| String::from_utf8_lossy(&header_bytes(v)).into_owned())
            })
        };
        let stamp = payload::decode(&delivery.data);
        let fields = (stamp, header(headers::STREAM), header(headers::PARTITION), header(headers::WORKER));
        // A redelivered receipt (this reader's connection broke before its
        // ack) is the same receipt again, not a second processing: the
        // fingerprint of what the worker wrote tells them apart.
        let mut fingerprint = std::collections::hash_map::DefaultHasher::new();
        (&fields.1, &fields.2, &fields.3, header(headers::OFFSET), fields.0.as_ref().map(|s| s.id))
            .hash(&mut fingerprint);
        let fresh = seen.insert(fingerprint.finish());
        if fresh || !delivery.redelivered {
            let mut ledger = lock(books);
            match fields {
                (Some(stamp), Some(stream), Some(partition), worker) => {
                    let shard = partition.parse().unwrap_or(u32::MAX);
                    // RabbitMQ gives receipts no timestamp finer than a
                    // second: the time read is the closest to processing.
                    let invoked_ms = header(headers::INVOKED_AT_MS).and_then(|v| v.parse().ok());
                    ledger.receipt(&stamp, &stream, shard, &worker.unwrap_or_default(), now_ms(), invoked_ms);
                }
                _ => ledger.foreign(),
            }
        }
        step("basic.ack", delivery.acker.ack(BasicAckOptions::default())).await?;
    }
}
