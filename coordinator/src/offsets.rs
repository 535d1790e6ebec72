//! Partition offsets from Kafka, for operators: the earliest and latest
//! offset of a partition (to show lag and to check a checkpoint an operator
//! sets is inside the log) and the offset at a time (for resets by
//! timestamp). rdkafka's calls block, so each runs on the blocking pool.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use shardline_proto::{LeaseId, LeaseKind};

/// How long one lookup may take before the operator gets an error.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A Kafka client for offset lookups; cheap to clone.
#[derive(Clone)]
pub struct Offsets {
    consumer: Arc<BaseConsumer>,
}

impl Offsets {
    pub fn new(brokers: &str) -> Result<Self, String> {
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("allow.auto.create.topics", "false")
            .create()
            .map_err(|e| format!("kafka client: {e}"))?;
        Ok(Self { consumer: Arc::new(consumer) })
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
    /// every record is older (Kafka answers -1 then).
    pub async fn at_time(&self, topic: &str, partition: u32, timestamp_ms: i64) -> Result<i64, String> {
        let (consumer, topic_owned) = (self.consumer.clone(), topic.to_owned());
        let found = tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic_owned, partition as i32, Offset::Offset(timestamp_ms))
                .map_err(|e| e.to_string())?;
            let result = consumer.offsets_for_times(tpl, TIMEOUT).map_err(|e| e.to_string())?;
            let offset = result
                .find_partition(&topic_owned, partition as i32)
                .map(|p| p.offset())
                .ok_or_else(|| format!("{topic_owned}/{partition}: no answer for the timestamp"))?;
            Ok::<_, String>(offset)
        })
        .await
        .map_err(|e| e.to_string())??;
        match found {
            Offset::Offset(o) if o >= 0 => Ok(o),
            _ => Ok(self.watermarks(topic, partition).await?.1),
        }
    }
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
