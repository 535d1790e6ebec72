//! Writing records to Kafka topics: the `on_failure` destination (records
//! unchanged, plus headers saying where they came from and why they gave
//! up), and the copy that the `forward` handler shares with it.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use shardline_config::{KafkaSettings, SetDefault};
use shardline_proto::LeaseId;
use shardline_proto::topology::headers;

use super::{FailureSink, GaveUp, Sent, SinkError};
use crate::handler::Record;

/// Where and how a worker's Kafka clients connect: `kafka_brokers` and
/// the `[kafka]` properties.
#[derive(Debug, Clone, Default)]
pub struct KafkaAccess {
    pub brokers: String,
    pub settings: KafkaSettings,
}

impl KafkaAccess {
    /// What every Kafka client of a worker starts from: the brokers and
    /// the operator's properties (`shardline-config`'s one home for
    /// them). Reconnects back off to at most 1 s unless a property says
    /// otherwise (librdkafka's default is 10 s): a broker that restarts is
    /// read from again within a second of answering, not up to ten later.
    pub fn client_config(&self) -> Result<ClientConfig, KafkaError> {
        // The properties were checked at load; what fails now is a
        // secret file gone since.
        let mut config = self
            .settings
            .client_config(&self.brokers)
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        config.set_default("reconnect.backoff.max.ms", "1000");
        Ok(config)
    }
}

/// Whether a Kafka error may go away by itself (a broker down, a timeout),
/// not only once someone changes something (config, record size, ACLs).
pub fn transient(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    match e {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) | KafkaError::Nul(_) => false,
        _ => !matches!(
            e.rdkafka_error_code(),
            Some(
                C::MessageSizeTooLarge
                    | C::InvalidMessageSize
                    | C::InvalidMessage
                    | C::TopicAuthorizationFailed
                    | C::InvalidTopic
                    | C::MessageBatchTooLarge
                    | C::InvalidArgument
            )
        ),
    }
}

/// The producer for what a worker writes to Kafka (on_failure, forward):
/// each write acknowledged by every in-sync replica before it counts.
pub fn producer(kafka: &KafkaAccess) -> Result<FutureProducer, KafkaError> {
    kafka.client_config()?.set("acks", "all").set_default("linger.ms", "5").create()
}

/// Copies `records` to `topic` with `extra` headers each; returns once the
/// broker acknowledged every one.
pub async fn copy_to(
    producer: &FutureProducer,
    topic: &str,
    records: &[Arc<Record>],
    extra: impl Fn(&Record) -> Vec<(&'static str, String)>,
) -> Result<(), SinkError> {
    let sends = records.iter().map(|r| {
        let added = extra(r);
        let empty = OwnedHeaders::new_with_capacity(r.headers.len() + added.len());
        let all = r.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        let all = all.chain(added.iter().map(|(k, v)| (*k, v.as_bytes())));
        let headers = all.fold(empty, |h, (key, value)| h.insert(Header { key, value: Some(value) }));
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        // A tombstone stays a tombstone: no payload at all, not an empty one.
        if let Some(value) = r.value() {
            record = record.payload(value);
        }
        if let Some(key) = &r.key {
            record = record.key(key.as_slice());
        }
        producer.send(record, Duration::from_secs(30))
    });
    for result in futures::future::join_all(sends).await {
        result.map_err(|(source, _)| SinkError::Kafka { topic: topic.to_owned(), source })?;
    }
    Ok(())
}

pub struct OnFailure {
    pub producer: FutureProducer,
    pub topic: String,
}

impl FailureSink for OnFailure {
    fn send<'a>(&'a self, lease: &'a LeaseId, records: &'a [Arc<Record>], why: &'a GaveUp) -> Sent<'a> {
        Box::pin(async move {
            let failed_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
            copy_to(&self.producer, &self.topic, records, |r| {
                vec![
                    (headers::SOURCE_STREAM, lease.name.clone()),
                    (headers::SOURCE_PARTITION, r.shard().to_string()),
                    (headers::SOURCE_OFFSET, r.position().to_string()),
                    (headers::ATTEMPTS, why.attempts.to_string()),
                    (headers::REASON, why.reason.as_str().to_owned()),
                    (headers::ERROR, why.error.clone()),
                    (headers::FAILED_AT, failed_at.clone()),
                ]
            })
            .await?;
            metrics::counter!("shardline_on_failure_total", "reason" => why.reason.as_str())
                .increment(records.len() as u64);
            Ok(())
        })
    }
}
