//! One queue slot's life on a worker: a channel with `basic.qos` prefetch
//! sized to the batch, a consumer on the subscription queue, then cut batch
//! → policy/handler → one multiple-ack per batch, until the lease is
//! released (finish the batch, ack, cancel: the rest of the prefetch goes
//! back to the queue) or lost (close the channel at once: every
//! unacknowledged delivery goes back to the queue).
//!
//! Failures use the shared [`Lane`] with one attempt per delivery: a record
//! that fails is republished to the retry queue of its next delay with
//! `shardline.attempts` + 1 (RabbitMQ brings it back after the delay), or
//! to the dead-letter queue once `max_retries` is used up or it is older
//! than `max_record_age`; the original is acked only after that publish is
//! confirmed. So retries wait in RabbitMQ, not in a hot `nack(requeue)`
//! loop, and a worker crash during a retry delay loses nothing. With
//! `bisect_on_error` a failing batch is split first, so the good records of
//! a batch are acked and only the poison goes round.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use shardline_proto::{LeaseId, Mapping, topology};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Amqp, Message, Publisher, header_bytes, is_broker_header};
use crate::batcher::{Batcher, Limits};
use crate::handler::{BoxFuture, DynHandler, Record};
use crate::lease::{Exit, LeaseStats, UsageMeter};
use crate::policy::{CompiledFilter, Completion, FailureSink, GaveUp, Lane, Reason, Stopped};
use crate::source::RecordReader;

/// Everything a queue-slot task needs.
pub struct SlotTask {
    pub lease: LeaseId,
    pub epoch: u64,
    pub mapping: Mapping,
    pub handler: Arc<dyn DynHandler>,
    pub amqp: Amqp,
    pub publisher: Publisher,
    pub worker_id: String,
    pub stats: Arc<LeaseStats>,
    pub usage: UsageMeter,
    /// The node's `max_inflight_batches` permits (none: no limit).
    pub inflight: Option<Arc<tokio::sync::Semaphore>>,
    /// Fires on release or shutdown: finish the in-flight batch, then stop.
    pub drain: CancellationToken,
    /// Fires when the lease is lost or revoked: stop at once.
    pub kill: CancellationToken,
}

/// How one channel's session ended.
enum Session {
    /// Released or killed: the task ends.
    Done(Exit),
    /// The channel or connection broke: open a new one.
    Broken,
}

impl SlotTask {
    pub async fn run(self) -> Exit {
        let filter = match self.mapping.filter.as_ref().map(CompiledFilter::new).transpose() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(lease = %self.lease, error = %e, "bad filter; giving the slot back");
                return Exit::Released(None);
            }
        };
        // Either token ends the wait for a channel.
        let stop = CancellationToken::new();
        let (drain, kill, stop_any) = (self.drain.clone(), self.kill.clone(), stop.clone());
        let watcher = tokio::spawn(async move {
            tokio::select! {
                () = drain.cancelled() => {}
                () = kill.cancelled() => {}
            }
            stop_any.cancel();
        });
        let mut wait = Duration::from_millis(200);
        let exit = loop {
            let Some(channel) = self.amqp.channel(&stop).await else {
                break if self.kill.is_cancelled() { Exit::Killed } else { Exit::Released(None) };
            };
            match self.session(&channel, filter.as_ref()).await {
                Ok(Session::Done(exit)) => break exit,
                Ok(Session::Broken) => wait = Duration::from_millis(200),
                Err(e) => {
                    // A channel-level refusal (say the queue is not declared
                    // yet) is this slot's problem, not the connection's.
                    tracing::warn!(lease = %self.lease, error = %e, ?wait, "queue slot cannot consume; retrying");
                    metrics::counter!("shardline_source_errors_total").increment(1);
                }
            }
            // The channel is gone; RabbitMQ requeued what it had not seen
            // acked. Back off before consuming again.
            let _ = channel.close(200, "reopening".into()).await;
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(5));
            if self.kill.is_cancelled() {
                break Exit::Killed;
            }
            if self.drain.is_cancelled() {
                break Exit::Released(None);
            }
        };
        watcher.abort();
        exit
    }

    /// Consumes on one channel until released, killed or broken.
    async fn session(&self, channel: &Channel, filter: Option<&CompiledFilter>) -> Result<Session, String> {
        let queue = self.lease.name.as_str();
        let batch_size = self.mapping.batch_size.max(1);
        // Room for the next batch while one is in the handler, so the slot
        // does not idle for a round trip after each ack.
        let prefetch = u16::try_from(batch_size.saturating_mul(2)).unwrap_or(u16::MAX);
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| format!("basic.qos: {e}"))?;
        let tag = format!("{}/{}/{}", self.worker_id, self.lease, self.epoch);
        let consumer = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("basic.consume on `{queue}`: {e}"))?;
        tracing::info!(lease = %self.lease, epoch = self.epoch, prefetch, "consuming");

        let broken = CancellationToken::new();
        let properties: Arc<Mutex<HashMap<i64, BasicProperties>>> = Arc::default();
        let received = Arc::new(AtomicI64::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        let pump = tokio::spawn(pump(
            consumer,
            tx,
            self.lease.clone(),
            properties.clone(),
            received.clone(),
            broken.clone(),
        ));
        let reader = DeliveryReader { rx: tokio::sync::Mutex::new(rx) };
        let limits = Limits {
            batch_size: batch_size as usize,
            max_batch_bytes: usize::try_from(self.mapping.max_batch_bytes).unwrap_or(usize::MAX),
            window: self.mapping.batch_window,
        };
        let mut batcher = Batcher::new(reader, limits);
        // Delivery tags start at 1 on every channel and grow by one.
        let completion = Mutex::new(Completion::new(1));
        let acked = AtomicI64::new(0);
        let progress = |_: i64| {};
        let sink = RetrySink {
            publisher: &self.publisher,
            subscription: queue,
            delays: topology::retry_delays(&self.mapping.policy),
            max_retries: self.mapping.policy.max_retries,
            properties: &properties,
            worker: &self.worker_id,
        };
        // One attempt per delivery: retries go round through the retry queues.
        let policy = shardline_proto::FailurePolicy { max_retries: Some(0), ..self.mapping.policy.clone() };
        let lane = Lane {
            handler: &*self.handler,
            name: &self.mapping.handler,
            policy: &policy,
            filter,
            sink: &sink,
            hooks: &(),
            stop: &self.kill,
            drain: &self.drain,
            lease: &self.lease,
            epoch: self.epoch,
            lag: -1,
            completion: &completion,
            progress: &progress,
        };
        let labels = [("handler", self.mapping.handler.clone())];
        // Batches end on drain, or when the consumer breaks.
        let cut_stop = CancellationToken::new();
        let (drain, broken_now, cut_stop_any) = (self.drain.clone(), broken.clone(), cut_stop.clone());
        let watcher = tokio::spawn(async move {
            tokio::select! {
                () = drain.cancelled() => {}
                () = broken_now.cancelled() => {}
            }
            cut_stop_any.cancel();
        });
        let result = async {
            loop {
                let Some(records) = batcher.next_batch(&cut_stop).await else { break };
                let n = records.len() as u64;
                if let Ok(mut c) = completion.lock() {
                    c.add(records.iter().map(|r| r.offset));
                }
                // The node's batch budget (max_inflight_batches), shared by all leases.
                let _permit = match &self.inflight {
                    Some(s) => s.clone().acquire_owned().await.ok(),
                    None => None,
                };
                self.stats.in_flight.store(1, Ordering::Relaxed);
                let done = lane.process(records).await;
                self.stats.in_flight.store(0, Ordering::Relaxed);
                let done = done?;
                let position = completion.lock().map_or(1, |c| c.position());
                if position - 1 > acked.load(Ordering::Relaxed) {
                    // Everything below `position` is finished: one ack for all.
                    if let Err(e) =
                        channel.basic_ack((position - 1) as u64, BasicAckOptions { multiple: true }).await
                    {
                        tracing::warn!(lease = %self.lease, error = %e, "ack failed; the batch will be redelivered");
                        return Ok(Session::Broken);
                    }
                    acked.store(position - 1, Ordering::Relaxed);
                    if let Ok(mut props) = properties.lock() {
                        props.retain(|tag, _| *tag >= position);
                    }
                }
                self.stats.records.fetch_add(n, Ordering::Relaxed);
                self.stats.busy_micros.fetch_add(done.busy.as_micros() as u64, Ordering::Relaxed);
                self.usage.add(&self.lease.name, &self.mapping.handler, n, &done);
                self.stats.position.store(acked.load(Ordering::Relaxed), Ordering::Relaxed);
                self.stats.lag.store(
                    (received.load(Ordering::Relaxed) - acked.load(Ordering::Relaxed)).max(0),
                    Ordering::Relaxed,
                );
                metrics::counter!("shardline_records_total", &labels).increment(n);
                metrics::counter!("shardline_batches_total", &labels).increment(1);
            }
            if broken.is_cancelled() && !self.drain.is_cancelled() {
                return Ok(Session::Broken);
            }
            // Released: stop deliveries, then close; the prefetched rest
            // goes back to the queue for the slot's next owner.
            let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
            let _ = channel.close(200, "slot released".into()).await;
            Ok(Session::Done(Exit::Released(None)))
        };
        let outcome = tokio::select! {
            biased;
            () = self.kill.cancelled() => Err(Stopped),
            r = result => r,
        };
        watcher.abort();
        pump.abort();
        match outcome {
            Ok(session) => Ok(session),
            Err(Stopped) => {
                // Lost: nothing more is acked; closing returns the rest.
                let _ = channel.close(200, "slot lost".into()).await;
                Ok(Session::Done(Exit::Killed))
            }
        }
    }
}

/// Moves deliveries from the consumer into the reader's queue, as records.
async fn pump(
    mut consumer: lapin::Consumer,
    tx: mpsc::UnboundedSender<Record>,
    lease: LeaseId,
    properties: Arc<Mutex<HashMap<i64, BasicProperties>>>,
    received: Arc<AtomicI64>,
    broken: CancellationToken,
) {
    while let Some(delivery) = consumer.next().await {
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(%lease, error = %e, "consumer failed");
                break;
            }
        };
        let tag = delivery.delivery_tag as i64;
        received.store(tag, Ordering::Relaxed);
        if delivery.redelivered {
            metrics::counter!("shardline_redeliveries_total").increment(1);
        }
        let record = record(&lease, delivery.delivery_tag, &delivery.properties, delivery.data);
        if let Ok(mut props) = properties.lock() {
            props.insert(tag, delivery.properties);
        }
        if tx.send(record).is_err() {
            return;
        }
    }
    // Cancelled by the broker (queue deleted), channel closed or the
    // connection lost: the session must start over.
    broken.cancel();
}

/// A delivery as the handler sees it: the subscription as `stream`, the
/// slot as `partition`, the delivery tag as `offset`, the message id as key.
fn record(lease: &LeaseId, tag: u64, properties: &BasicProperties, data: Vec<u8>) -> Record {
    let headers = properties
        .headers()
        .as_ref()
        .map(|h| h.inner().iter().map(|(k, v)| (k.as_str().to_owned(), header_bytes(v))).collect())
        .unwrap_or_default();
    Record {
        key: properties.message_id().as_ref().map(|id| id.as_str().as_bytes().to_vec()),
        value: data,
        tombstone: false,
        headers,
        timestamp_ms: properties.timestamp().map(|secs| (secs as i64).saturating_mul(1000)),
        stream: lease.name.clone(),
        partition: lease.index,
        offset: tag as i64,
    }
}

/// The records of one channel, in delivery order.
struct DeliveryReader {
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Record>>,
}

impl RecordReader for DeliveryReader {
    async fn next(&self) -> Record {
        match self.rx.lock().await.recv().await {
            Some(r) => r,
            // The consumer is gone; the session's stop token ends the wait.
            None => std::future::pending().await,
        }
    }

    fn try_next(&self) -> Option<Record> {
        self.rx.try_lock().ok()?.try_recv().ok()
    }
}

/// Where failing queue records go: the retry queue of their next delay, or
/// the dead-letter exchange when out of retries or too old.
struct RetrySink<'a> {
    publisher: &'a Publisher,
    subscription: &'a str,
    delays: Vec<Duration>,
    max_retries: Option<u32>,
    /// Each delivery's original properties, to republish it faithfully.
    properties: &'a Mutex<HashMap<i64, BasicProperties>>,
    worker: &'a str,
}

/// Attempts a record has had before this delivery.
fn previous_attempts(r: &Record) -> u32 {
    r.headers
        .iter()
        .find(|(k, _)| k == topology::ATTEMPTS_HEADER)
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

impl FailureSink for RetrySink<'_> {
    fn send<'a>(&'a self, records: &'a [Record], why: &'a GaveUp) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let now = std::time::SystemTime::now();
            let failed_at = humantime::format_rfc3339_millis(now).to_string();
            let now_ms = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
            let mut messages = Vec::with_capacity(records.len());
            let (mut retried, mut dead) = (0u64, 0u64);
            for r in records {
                let attempts = previous_attempts(r) + why.attempts.max(1);
                let out_of_retries = self.max_retries.is_some_and(|max| attempts > max);
                let to_dlq = why.reason == Reason::TooOld || out_of_retries;
                let mut headers = FieldTable::default();
                for (k, v) in &r.headers {
                    if !is_broker_header(k)
                        && k != topology::ATTEMPTS_HEADER
                        && k != topology::FAILED_AT_HEADER
                    {
                        headers.insert(k.as_str().into(), AMQPValue::LongString(v.clone().into()));
                    }
                }
                let mut props = self.properties.lock().ok().and_then(|p| p.get(&r.offset).cloned());
                if let Some(p) = &props
                    && let Some(original) = p.headers()
                {
                    // Keep the original header types (not the byte copies).
                    for (k, v) in original.inner() {
                        let ours = [topology::ATTEMPTS_HEADER, topology::FAILED_AT_HEADER];
                        if !is_broker_header(k.as_str()) && !ours.contains(&k.as_str()) {
                            headers.insert(k.clone(), v.clone());
                        }
                    }
                }
                headers.insert(topology::ATTEMPTS_HEADER.into(), AMQPValue::LongLongInt(i64::from(attempts)));
                // When each attempt failed (Unix ms), oldest first: the retry
                // history travels with the message into the dead-letter queue.
                let history = match r.headers.iter().find(|(k, _)| k == topology::FAILED_AT_HEADER) {
                    Some((_, before)) => format!("{},{now_ms}", String::from_utf8_lossy(before)),
                    None => now_ms.to_string(),
                };
                headers.insert(topology::FAILED_AT_HEADER.into(), AMQPValue::LongString(history.into()));
                let (exchange, routing_key) = if to_dlq {
                    for (k, v) in [
                        ("shardline.reason", why.reason.as_str().to_owned()),
                        ("shardline.error", why.error.clone()),
                        ("shardline.failed_at", failed_at.clone()),
                        ("shardline.source.subscription", self.subscription.to_owned()),
                        ("shardline.worker", self.worker.to_owned()),
                    ] {
                        headers.insert(k.into(), AMQPValue::LongString(v.into()));
                    }
                    dead += 1;
                    (topology::dead_letter_exchange(self.subscription), String::new())
                } else {
                    headers.insert("shardline.error".into(), AMQPValue::LongString(why.error.clone().into()));
                    retried += 1;
                    let delay = topology::retry_delay(&self.delays, attempts);
                    (String::new(), topology::retry_queue(self.subscription, delay))
                };
                if let Some(p) = props.take() {
                    messages.push(Message {
                        exchange,
                        routing_key,
                        body: r.value.clone(),
                        headers,
                        message_id: None,
                        timestamp: *p.timestamp(),
                        properties: Some(p.with_headers(FieldTable::default())),
                    });
                } else {
                    messages.push(Message {
                        exchange,
                        routing_key,
                        body: r.value.clone(),
                        headers,
                        message_id: r.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
                        timestamp: r.timestamp_ms.map(|ms| (ms / 1000) as u64),
                        properties: None,
                    });
                }
            }
            self.publisher.publish(&messages).await?;
            metrics::counter!("shardline_retries_total", "subscription" => self.subscription.to_owned())
                .increment(retried);
            metrics::counter!("shardline_dead_lettered_total", "subscription" => self.subscription.to_owned())
                .increment(dead);
            Ok(())
        })
    }
}
