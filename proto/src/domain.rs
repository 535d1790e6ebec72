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

/// A shard's tumbling window as of a checkpoint: open, with the state the
/// window's last successful invocation returned, or closed (bounds kept, so
/// a record with a late timestamp counts in a later window, never in a
/// closed one again). Stored with the checkpoint in one record; the state
/// goes into JSON as base64.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowState {
    /// Unix ms, inclusive.
    pub start_ms: i64,
    /// Unix ms, exclusive.
    pub end_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "base64_bytes")]
    pub state: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closed: bool,
}

impl WindowState {
    pub fn open(start_ms: i64, end_ms: i64) -> Self {
        Self { start_ms, end_ms, state: None, closed: false }
    }

    /// The window's bounds while it is open.
    pub fn open_bounds(&self) -> Option<(i64, i64)> {
        (!self.closed).then_some((self.start_ms, self.end_ms))
    }
}

/// `Option<Vec<u8>>` as a base64 string in JSON (a byte array would take
/// about four times the room).
mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_str(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => STANDARD.decode(text).map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
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
    /// Tumbling windows per shard (streams only); zero: none.
    pub tumbling_window: Duration,
    /// A window closes once its shard has been idle this long past its end.
    pub window_grace: Duration,
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
            tumbling_window: Duration::ZERO,
            window_grace: Duration::from_secs(5),
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

    #[test]
    fn a_window_state_goes_into_json_as_base64_and_comes_back() {
        let open = WindowState { state: Some(vec![0, 255, 7]), ..WindowState::open(60_000, 120_000) };
        let json = serde_json::to_string(&open).unwrap();
        assert_eq!(json, r#"{"start_ms":60000,"end_ms":120000,"state":"AP8H"}"#);
        assert_eq!(serde_json::from_str::<WindowState>(&json).unwrap(), open);
        let closed = WindowState { closed: true, ..WindowState::open(0, 1) };
        assert_eq!(
            serde_json::from_str::<WindowState>(&serde_json::to_string(&closed).unwrap()).unwrap(),
            closed
        );
        assert!(serde_json::from_str::<WindowState>(r#"{"start_ms":0,"end_ms":1,"state":"!"}"#).is_err());
    }
}
