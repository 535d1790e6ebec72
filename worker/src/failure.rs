//! Writing records to Kafka topics: the `on_failure` destination, and the
//! copy that the `forward` handler shares with it.
//!
//! A record that gave up is written unchanged (key, value, headers) to the
//! mapping's `on_failure` topic, with headers saying where it came from and
//! why it gave up. The shard may checkpoint past it only once the broker has
//! acknowledged the write.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::handler::{BoxFuture, Record};
use crate::policy::{FailureSink, GaveUp};

/// The producer for what a worker writes to Kafka (on_failure, forward):
/// each write acknowledged by every in-sync replica before it counts.
pub fn producer(brokers: &str) -> Result<FutureProducer, KafkaError> {
    crate::source::kafka::client_config(brokers).set("acks", "all").set("linger.ms", "5").create()
}

/// Copies `records` to `topic`, keeping key, value and headers and adding
/// the headers `extra` gives for each; returns once the broker acknowledged
/// every one.
pub async fn copy_to(
    producer: &FutureProducer,
    topic: &str,
    records: &[Record],
    extra: impl Fn(&Record) -> Vec<(&'static str, String)>,
) -> Result<(), String> {
    let sends = records.iter().map(|r| {
        let added = extra(r);
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + added.len());
        for (key, value) in &r.headers {
            headers = headers.insert(Header { key, value: Some(value) });
        }
        for (key, value) in &added {
            headers = headers.insert(Header { key, value: Some(value) });
        }
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
        result.map_err(|(e, _)| format!("write to {topic}: {e}"))?;
    }
    Ok(())
}

/// Writes records that gave up to one Kafka topic.
pub struct KafkaFailureSink {
    pub producer: FutureProducer,
    pub topic: String,
}

impl FailureSink for KafkaFailureSink {
    fn send<'a>(&'a self, records: &'a [Record], why: &'a GaveUp) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let failed_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
            copy_to(&self.producer, &self.topic, records, |r| {
                vec![
                    ("shardline.source.stream", r.stream.clone()),
                    ("shardline.source.partition", r.partition.to_string()),
                    ("shardline.source.offset", r.offset.to_string()),
                    ("shardline.attempts", why.attempts.to_string()),
                    ("shardline.reason", why.reason.as_str().to_owned()),
                    ("shardline.error", why.error.clone()),
                    ("shardline.failed_at", failed_at.clone()),
                ]
            })
            .await?;
            metrics::counter!("shardline_on_failure_total", "reason" => why.reason.as_str())
                .increment(records.len() as u64);
            Ok(())
        })
    }
}
