//! Partition offsets from Kafka, for operators: the earliest and latest
//! offset of a partition (to show lag and to check a checkpoint an operator
//! sets is inside the log) and the offset at a time (for resets by
//! timestamp). rdkafka's calls block, so each runs on the blocking pool.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use shardline_config::KafkaSettings;
use shardline_proto::{LeaseId, LeaseKind};

/// How long one lookup may take before the operator gets an error.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A Kafka client for offset lookups; cheap to clone.
#[derive(Clone)]
pub struct Offsets {
    consumer: Arc<BaseConsumer>,
    kafka: Arc<(String, KafkaSettings)>,
}

impl Offsets {
    /// A client of `brokers` with the `[kafka]` properties `kafka`.
    pub fn new(brokers: &str, kafka: &KafkaSettings) -> Result<Self, String> {
        let consumer = client_config(brokers, kafka)?
            .set("allow.auto.create.topics", "false")
            .create()
            .map_err(|e| format!("kafka client: {e}"))?;
        Ok(Self { consumer: Arc::new(consumer), kafka: Arc::new((brokers.to_owned(), kafka.clone())) })
    }

    /// `(earliest, latest)`: the log start and the next offset to be written.
    pub async fn watermarks(&self, topic: &str, partition: u32) -> Result<(i64, i64), String> {
        let (consumer, topic) = (self.consumer.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            consumer
                .fetch_watermarks(&topic, partition as i32, TIMEOUT)
                .map_err(|e| format!("offsets of {topic}/{partition}: {e}"))
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// The first offset at or after `timestamp_ms`; the end of the log when
    /// every record is older. Kafka answers -1 then, but tansu 0.6.0
    /// answers 0, which would rewind the shard to its start: so the answer
    /// stands only if the record it names is at or after the time.
    pub async fn at_time(&self, topic: &str, partition: u32, timestamp_ms: i64) -> Result<i64, String> {
        let (consumer, kafka, topic_owned) = (self.consumer.clone(), self.kafka.clone(), topic.to_owned());
        let found = tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic_owned, partition as i32, Offset::Offset(timestamp_ms))
                .map_err(|e| e.to_string())?;
            let result = consumer.offsets_for_times(tpl, TIMEOUT).map_err(|e| e.to_string())?;
            let offset = result
                .find_partition(&topic_owned, partition as i32)
                .map(|p| p.offset())
                .ok_or_else(|| format!("{topic_owned}/{partition}: no answer for the timestamp"))?;
            match offset {
                Offset::Offset(o) if o >= 0 => {
                    let wrong = stamped_before(&kafka, &topic_owned, partition, o, timestamp_ms)?;
                    Ok::<_, String>((!wrong).then_some(o))
                }
                _ => Ok(None),
            }
        })
        .await
        .map_err(|e| e.to_string())??;
        match found {
            Some(o) => Ok(o),
            None => Ok(self.watermarks(topic, partition).await?.1),
        }
    }
}

/// Is the first record at or after `offset` stamped before `timestamp_ms`?
/// (No record there, or one without a timestamp: no.) Read with a consumer
/// of its own: an assignment is per consumer, and lookups may run at once.
/// Blocking.
fn stamped_before(
    (brokers, kafka): &(String, KafkaSettings),
    topic: &str,
    partition: u32,
    offset: i64,
    timestamp_ms: i64,
) -> Result<bool, String> {
    let consumer: BaseConsumer = client_config(brokers, kafka)?
        .set("group.id", "shardline-offsets")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(|e| format!("kafka client: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition as i32, Offset::Offset(offset)).map_err(|e| e.to_string())?;
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(record)) => return Ok(record.timestamp().to_millis().is_some_and(|t| t < timestamp_ms)),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return Ok(false),
            Some(Err(e)) => return Err(format!("read {topic}/{partition} at {offset}: {e}")),
            None => {}
        }
    }
    Err(format!("read {topic}/{partition} at {offset}: no answer within {TIMEOUT:?}"))
}

/// `shardline-config`'s one home for a Kafka client's brokers and
/// properties (checked at load; what fails now is a secret file gone since).
fn client_config(brokers: &str, kafka: &KafkaSettings) -> Result<rdkafka::ClientConfig, String> {
    kafka.client_config(brokers).map_err(|e| format!("kafka client: {e}"))
}

/// Where an operator moves a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Offset(i64),
    Earliest,
    Latest,
    /// The first record at or after this time (Unix ms).
    Timestamp(i64),
}

/// Why a target cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Bad input: the operator can fix it.
    #[error("{0}")]
    Invalid(String),
    /// The broker did not answer: retry later.
    #[error("{0}")]
    Unavailable(String),
}

/// The offset `target` means for a shard, checked against the partition's
/// log: an operator can only point inside it (earliest..=latest).
pub async fn resolve(offsets: &Offsets, lease: &LeaseId, target: Target) -> Result<i64, ResolveError> {
    if lease.kind != LeaseKind::Shard {
        return Err(ResolveError::Invalid(format!(
            "`{lease}` is a queue slot; only shards have checkpoints"
        )));
    }
    let unreachable =
        |e: String| ResolveError::Unavailable(format!("cannot check the offsets of `{lease}`: {e}"));
    let (earliest, latest) = offsets.watermarks(&lease.name, lease.index).await.map_err(unreachable)?;
    match target {
        Target::Earliest => Ok(earliest),
        Target::Latest => Ok(latest),
        Target::Timestamp(ms) => offsets.at_time(&lease.name, lease.index, ms).await.map_err(unreachable),
        Target::Offset(o) if (earliest..=latest).contains(&o) => Ok(o),
        Target::Offset(o) => Err(ResolveError::Invalid(format!(
            "offset {o} is outside `{lease}`; allowed: {earliest} (earliest) to {latest} (latest)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    //! The parts of `resolve` that need no broker: which leases it refuses
    //! outright, and how a broker that does not answer is classified (the
    //! CLI exits 2 for `Invalid`, 1 for `Unavailable`). The lookups against
    //! a real log (earliest, latest, by timestamp, out of range) are tested
    //! end to end on tansu in `tests/tests/offsets.rs`.

    use std::time::Instant;

    use super::*;

    /// Nothing listens on port 1: every lookup fails after [`TIMEOUT`].
    const NOBODY: &str = "127.0.0.1:1";

    const TARGETS: [Target; 4] = [Target::Offset(3), Target::Earliest, Target::Latest, Target::Timestamp(1)];

    /// A queue slot has no offsets: refused as bad input for every target,
    /// at once, without asking any broker (which would take the lookup
    /// timeout here and answer `Unavailable`).
    #[tokio::test]
    async fn a_queue_slot_is_refused_as_invalid_without_asking_the_broker() {
        let offsets = Offsets::new(NOBODY, &KafkaSettings::default()).unwrap_or_else(|e| panic!("{e}"));
        let slot = LeaseId::slot("orders-sub", 2);
        let started = Instant::now();
        for target in TARGETS {
            let e = resolve(&offsets, &slot, target).await;
            assert!(
                matches!(&e, Err(ResolveError::Invalid(m)) if m.contains("orders-sub#2") && m.contains("queue slot")),
                "{target:?} on a queue slot: {e:?}"
            );
        }
        assert!(started.elapsed() < TIMEOUT / 5, "refusing a slot took {:?}", started.elapsed());
    }

    /// A broker that does not answer is `Unavailable` (retry later), never
    /// `Invalid`, whatever the target: even an offset cannot be checked
    /// against the log without it. The message names the lease.
    #[tokio::test]
    async fn an_unreachable_broker_is_unavailable_for_every_target() {
        let offsets = Offsets::new(NOBODY, &KafkaSettings::default()).unwrap_or_else(|e| panic!("{e}"));
        let shard = LeaseId::shard("orders", 1);
        let lookups = TARGETS.map(|t| {
            let (offsets, shard) = (offsets.clone(), shard.clone());
            tokio::spawn(async move { (t, resolve(&offsets, &shard, t).await) })
        });
        for lookup in lookups {
            let (target, e) = lookup.await.unwrap_or_else(|e| panic!("{e}"));
            assert!(
                matches!(&e, Err(ResolveError::Unavailable(m)) if m.contains("orders/1")),
                "{target:?} with no broker: {e:?}"
            );
        }
    }
}
