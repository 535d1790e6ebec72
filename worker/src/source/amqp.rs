//! The RabbitMQ source: a queue slot consumes on a channel of its own with
//! a prefetch of twice the batch size (room for the next batch while one is
//! in the handler, so the slot does not idle a round trip after each ack),
//! and acks with one multiple-ack per batch ([`Acks`]). A channel that
//! breaks is reopened; delivery tags start at 1 on each.
//!
//! Each delivery is tried once: a failing message goes to its retry queue
//! or the dead letters ([`RetrySink`]) and is acked once that is confirmed.
//! So retries wait in RabbitMQ, not in a hot `nack(requeue)` loop, and a
//! worker crash during a retry delay loses nothing.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use shardline_proto::{FailurePolicy, LeaseId};

use super::{End, Exit, Finalizer, Lease, Opened, RecordReader, Source};
use crate::amqp::{Amqp, Publisher, header_bytes};
use crate::handler::{Origin, Record, ReplyTo};
use crate::policy::Hooks;
use crate::sink::FailureSink;
use crate::sink::retry::{Properties, RetrySink};

pub struct Slot {
    amqp: Amqp,
    tag: String,
    /// The mapping's policy with one attempt per delivery: retries go round
    /// through the retry queues.
    policy: FailurePolicy,
    sink: RetrySink,
    replies: Publisher,
}

impl Slot {
    pub fn new(amqp: Amqp, publisher: Publisher, worker_id: &str, lease: &Lease) -> Self {
        let policy = FailurePolicy { max_retries: Some(0), ..lease.mapping.policy.clone() };
        Self {
            amqp,
            tag: format!("{worker_id}/{}/{}", lease.id, lease.epoch),
            policy,
            sink: RetrySink::new(publisher.clone(), &lease.id.name, &lease.mapping.policy, worker_id),
            replies: publisher,
        }
    }

    async fn consume(
        &self,
        channel: &Channel,
        lease: &Lease,
    ) -> Result<Consumer, (&'static str, lapin::Error)> {
        let prefetch = u16::try_from(lease.mapping.batch_size.max(1).saturating_mul(2)).unwrap_or(u16::MAX);
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(|e| ("basic.qos", e))?;
        let queue = lease.id.name.as_str();
        let options = BasicConsumeOptions::default();
        let consumer = channel
            .basic_consume(queue.into(), self.tag.as_str().into(), options, FieldTable::default())
            .await
            .map_err(|e| ("basic.consume", e))?;
        tracing::info!(lease = %lease.id, epoch = lease.epoch, prefetch, "consuming");
        Ok(consumer)
    }
}

impl Hooks for Slot {}

impl Source for Slot {
    type Reader = Deliveries;
    type Finalizer = Acks;

    async fn open(&self, lease: &Lease) -> Result<Opened<Deliveries, Acks>, Exit> {
        let backoff = (Duration::from_millis(200), Duration::from_secs(5));
        let opened = crate::persist(&lease.drain, backoff, |wait| async move {
            let channel = self.amqp.channel(&lease.drain).await?;
            match self.consume(&channel, lease).await {
                Ok(consumer) => {
                    // Tags of an earlier channel mean nothing on this one.
                    crate::lock(&self.sink.properties).clear();
                    let properties = self.sink.properties.clone();
                    let finalizer = Acks {
                        channel,
                        tag: self.tag.clone(),
                        lease: lease.id.clone(),
                        acked: AtomicI64::new(0),
                        properties: properties.clone(),
                    };
                    let reader =
                        Deliveries { consumer, slot: lease.id.index, properties, received: 0, ended: false };
                    Some(Opened { reader, finalizer, position: 1 })
                }
                Err((what, e)) => {
                    // A channel-level refusal (say the queue is not declared
                    // yet) is this slot's problem, not the connection's.
                    tracing::warn!(lease = %lease.id, error = %e, what, ?wait, "queue slot cannot consume; retrying");
                    metrics::counter!("shardline_source_errors_total").increment(1);
                    close(&channel, "reopening").await;
                    None
                }
            }
        });
        opened.await.ok_or(Exit::Released(None))
    }

    fn policy<'a>(&'a self, _mapping: &'a shardline_proto::Mapping) -> &'a FailurePolicy {
        &self.policy
    }

    fn sink(&self) -> &dyn FailureSink {
        &self.sink
    }

    fn replies(&self) -> Option<&Publisher> {
        Some(&self.replies)
    }
}

/// Closes a channel; one already gone (as after it broke) is no error.
async fn close(channel: &Channel, why: &str) {
    if let Err(e) = channel.close(200, why.into()).await {
        tracing::debug!(error = %e, why, "closing a channel that is already gone");
    }
}

pub struct Deliveries {
    consumer: Consumer,
    slot: u32,
    properties: Properties,
    received: i64,
    /// Cancelled by the broker (queue deleted), channel or connection lost.
    ended: bool,
}

impl Deliveries {
    fn take(&mut self, delivery: Option<Result<lapin::message::Delivery, lapin::Error>>) -> Option<Record> {
        let delivery = match delivery {
            Some(Ok(d)) => d,
            ended => {
                if let Some(Err(e)) = ended {
                    tracing::warn!(slot = self.slot, error = %e, "consumer failed");
                }
                self.ended = true;
                return None;
            }
        };
        let (delivery_tag, redelivered) = (delivery.delivery_tag, delivery.redelivered);
        self.received = i64::try_from(delivery_tag).unwrap_or(i64::MAX);
        if redelivered {
            metrics::counter!("shardline_redeliveries_total").increment(1);
        }
        let origin = Origin::Queue { slot: self.slot, delivery_tag, redelivered };
        let record = record(&delivery.properties, delivery.data, origin);
        crate::lock(&self.properties).insert(delivery_tag, delivery.properties);
        Some(record)
    }
}

/// The record a handler sees of a delivery: the message id is the key,
/// headers as bytes ([`header_bytes`]), the AMQP timestamp (seconds) in
/// milliseconds, `reply_to` and `correlation_id` as its [`ReplyTo`]. Public for the fuzz targets (`fuzz/`).
pub fn record(properties: &lapin::BasicProperties, data: Vec<u8>, origin: Origin) -> Record {
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
        origin,
        reply_to: properties.reply_to().as_ref().map(|queue| ReplyTo {
            queue: queue.as_str().to_owned(),
            correlation_id: properties.correlation_id().as_ref().map(|id| id.as_str().to_owned()),
        }),
    }
}

impl RecordReader for Deliveries {
    async fn next(&mut self) -> Option<Record> {
        let delivery = if self.ended { None } else { self.consumer.next().await };
        self.take(delivery)
    }

    fn try_next(&mut self) -> Option<Record> {
        let delivery = if self.ended { None } else { self.consumer.next().now_or_never()? };
        self.take(delivery)
    }

    fn lag(&self, _cut_to: i64, finished: i64) -> i64 {
        (self.received - (finished - 1)).max(0)
    }
}

pub struct Acks {
    channel: Channel,
    tag: String,
    lease: LeaseId,
    acked: AtomicI64,
    /// Kept for republishing until acked.
    properties: Properties,
}

impl Finalizer for Acks {
    async fn settle(&self, next: i64) -> bool {
        let upto = next - 1;
        if upto <= self.acked.load(Ordering::Relaxed) {
            return true;
        }
        // Everything below `next` is finished: one ack for all.
        let options = BasicAckOptions { multiple: true };
        if let Err(e) = self.channel.basic_ack(upto as u64, options).await {
            tracing::warn!(lease = %self.lease, error = %e, "ack failed; the batch will be redelivered");
            return false;
        }
        self.acked.store(upto, Ordering::Relaxed);
        crate::lock(&self.properties).retain(|tag, _| *tag as i64 >= next);
        true
    }

    async fn close(self, how: End, _next: i64) -> Option<i64> {
        match how {
            End::Drained => {
                // Stop deliveries, then close; the prefetched rest goes
                // back to the queue for the slot's next owner.
                let cancel =
                    self.channel.basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default());
                if let Err(e) = cancel.await {
                    tracing::warn!(lease = %self.lease, error = %e, "basic.cancel failed; closing the channel anyway");
                }
                close(&self.channel, "slot released").await;
            }
            // Lost: nothing more is acked; closing returns the rest.
            End::Killed | End::Failed => close(&self.channel, "slot lost").await,
            End::Broken => close(&self.channel, "reopening").await,
        }
        None
    }
}
