//! Where records go that the worker writes itself. Sinks sit below the
//! sources and the driver and never import either. A sink says `Ok` only
//! once the records are safely where it sent them (the lease may finish
//! them only then); its errors say whether trying again can help.

pub mod kafka;
pub mod publish;
pub mod reply;
pub mod retry;

use std::sync::Arc;

use shardline_proto::LeaseId;

use crate::handler::{BoxFuture, Record};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    RetriesExhausted,
    TooOld,
    HandlerTimeout,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RetriesExhausted => "retries_exhausted",
            Reason::TooOld => "too_old",
            Reason::HandlerTimeout => "handler_timeout",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GaveUp {
    pub reason: Reason,
    pub attempts: u32,
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("write to Kafka topic `{topic}`: {source}")]
    Kafka { topic: String, source: rdkafka::error::KafkaError },
    #[error(transparent)]
    Publish(#[from] publish::PublishError),
}

impl SinkError {
    /// Whether the same records may go through later without anyone
    /// changing anything (a broker down, a leader moving), as opposed to
    /// needing an operator (a record too large, no permission).
    pub fn retryable(&self) -> bool {
        match self {
            SinkError::Kafka { source, .. } => kafka::transient(source),
            SinkError::Publish(e) => e.retryable(),
        }
    }
}

pub type Sent<'a> = BoxFuture<'a, Result<(), SinkError>>;

/// Where records that gave up go. `Ok` only once they are safely there:
/// the lease may finish them (checkpoint or ack past them) only then.
pub trait FailureSink: Send + Sync {
    fn send<'a>(&'a self, lease: &'a LeaseId, records: &'a [Arc<Record>], why: &'a GaveUp) -> Sent<'a>;
}

/// No `on_failure`: records that gave up are dropped (counted and logged),
/// as Lambda discards them.
pub struct Discard;

impl FailureSink for Discard {
    fn send<'a>(&'a self, lease: &'a LeaseId, records: &'a [Arc<Record>], why: &'a GaveUp) -> Sent<'a> {
        Box::pin(async move {
            metrics::counter!("shardline_records_discarded_total", "reason" => why.reason.as_str())
                .increment(records.len() as u64);
            for r in records {
                tracing::error!(
                    %lease, position = r.position(), reason = why.reason.as_str(), attempts = why.attempts,
                    error = %why.error, "record discarded (no on_failure destination)"
                );
            }
            Ok(())
        })
    }
}
