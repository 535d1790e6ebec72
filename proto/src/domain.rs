//! Domain types shared by the coordinator, the worker and the CLI.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a lease is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseKind {
    /// One partition of a Kafka topic.
    Shard,
    /// One consumer slot of a RabbitMQ subscription queue.
    QueueSlot,
}

/// One lease: a shard (`orders/3`) or a queue slot (`emails#0`).
///
/// The textual form is what operators type: `STREAM/PARTITION` for shards,
/// `SUBSCRIPTION#SLOT` for queue slots.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseId {
    pub kind: LeaseKind,
    pub name: String,
    pub index: u32,
}

impl LeaseId {
    pub fn shard(stream: impl Into<String>, partition: u32) -> Self {
        Self { kind: LeaseKind::Shard, name: stream.into(), index: partition }
    }

    pub fn slot(subscription: impl Into<String>, slot: u32) -> Self {
        Self { kind: LeaseKind::QueueSlot, name: subscription.into(), index: slot }
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            LeaseKind::Shard => write!(f, "{}/{}", self.name, self.index),
            LeaseKind::QueueSlot => write!(f, "{}#{}", self.name, self.index),
        }
    }
}

impl FromStr for LeaseId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, sep) = if s.contains('#') { (LeaseKind::QueueSlot, '#') } else { (LeaseKind::Shard, '/') };
        let bad = || {
            format!(
                "`{s}` is not a lease: expected STREAM/PARTITION (e.g. orders/3) or SUBSCRIPTION#SLOT (e.g. emails#0)"
            )
        };
        let (name, index) = s.rsplit_once(sep).ok_or_else(bad)?;
        if name.is_empty() {
            return Err(bad());
        }
        let index = index.parse::<u32>().map_err(|_| bad())?;
        Ok(Self { kind, name: name.to_owned(), index })
    }
}

/// Where a shard without a checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartingPosition {
    /// Only records produced after the lease starts.
    #[default]
    Latest,
    /// The oldest record still in the partition.
    TrimHorizon,
    /// The first record at or after the mapping's starting timestamp.
    AtTimestamp,
}

/// Where a newly acquired lease starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Its checkpoint: the next offset to process.
    Checkpoint(i64),
    /// No checkpoint yet: the mapping's `starting_position`.
    MappingDefault,
    /// No checkpoint yet, and the partition appeared after its mapping was
    /// created: the oldest record, whatever `starting_position` says
    /// (records written before anyone read it are not skipped).
    Earliest,
}

impl Start {
    /// The checkpoint, if the lease has one.
    pub fn checkpoint(self) -> Option<i64> {
        match self {
            Start::Checkpoint(offset) => Some(offset),
            Start::MappingDefault | Start::Earliest => None,
        }
    }
}

/// How a lease's records are batched and which handler runs them: the
/// event source mapping, as the coordinator sends it with every acquire.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    pub handler: String,
    /// Most records per batch.
    pub batch_size: u32,
    /// Most payload bytes (key + value) per batch.
    pub max_batch_bytes: u64,
    /// How long to wait to fill a batch; zero: take what is there.
    pub batch_window: std::time::Duration,
    pub starting_position: StartingPosition,
    /// Milliseconds since the Unix epoch, for `AtTimestamp`.
    pub starting_timestamp_ms: i64,
    /// What happens when the handler fails.
    pub policy: FailurePolicy,
    /// Concurrent batches per shard (1..10); order is kept per record key.
    pub parallelization_factor: u32,
    /// Records that do not match skip the handler (and are checkpointed past).
    pub filter: Option<Filter>,
}

/// Lambda's failure settings for a mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct FailurePolicy {
    /// Retries of a failing batch; `None`: until the records expire.
    pub max_retries: Option<u32>,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub retry_multiplier: f64,
    pub retry_jitter: bool,
    /// Split a failing batch in two and retry the halves.
    pub bisect_on_error: bool,
    /// The handler names failed records; the rest count as done.
    pub report_item_failures: bool,
    /// Older records skip the handler and go to on_failure.
    pub max_record_age: Option<Duration>,
    /// Kafka topic for records that gave up; `None`: discarded.
    pub on_failure: Option<String>,
    /// A batch running longer fails.
    pub handler_timeout: Duration,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            max_retries: None,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            retry_multiplier: 2.0,
            retry_jitter: true,
            bisect_on_error: false,
            report_item_failures: false,
            max_record_age: None,
            on_failure: None,
            handler_timeout: Duration::from_secs(60),
        }
    }
}

/// A test on one field of a record's JSON value (Lambda's filter criteria,
/// reduced to the common cases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// Dotted path into the JSON object.
    pub field: String,
    pub test: FilterTest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterTest {
    /// Equals this JSON value (kept as JSON text).
    Equals(String),
    Exists,
    /// A string starting with this.
    Prefix(String),
}

impl Mapping {
    /// DESIGN.md's defaults for a handler.
    pub fn new(handler: impl Into<String>) -> Self {
        Self {
            handler: handler.into(),
            batch_size: 100,
            max_batch_bytes: 6 * 1024 * 1024,
            batch_window: std::time::Duration::ZERO,
            starting_position: StartingPosition::Latest,
            starting_timestamp_ms: 0,
            policy: FailurePolicy::default(),
            parallelization_factor: 1,
            filter: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_round_trip_through_text() {
        for id in [LeaseId::shard("orders", 3), LeaseId::slot("emails", 0), LeaseId::shard("a/b", 7)] {
            assert_eq!(id.to_string().parse::<LeaseId>(), Ok(id));
        }
        assert!("orders".parse::<LeaseId>().is_err());
        assert!("orders/x".parse::<LeaseId>().is_err());
        assert!("/1".parse::<LeaseId>().is_err());
    }
}
