//! The `on_failure` destination for Kafka: each record that gave up is
//! written unchanged (key, value, headers) to the mapping's topic, with
//! headers saying where it came from and why it gave up. The shard may
//! checkpoint past it only once the broker has acknowledged the write.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::handler::{BoxFuture, Record};
use crate::policy::{FailureSink, GaveUp};

/// Writes records that gave up to one Kafka topic.
pub struct KafkaFailureSink {
    pub producer: FutureProducer,
    pub topic: String,
}

impl FailureSink for KafkaFailureSink {
    fn send<'a>(&'a self, records: &'a [Record], why: &'a GaveUp) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let failed_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
            let attempts = why.attempts.to_string();
            let sends = records.iter().map(|r| {
                let partition = r.partition.to_string();
                let offset = r.offset.to_string();
                let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 7);
                for (key, value) in &r.headers {
                    headers = headers.insert(Header { key, value: Some(value) });
                }
                headers = headers
                    .insert(Header { key: "shardline.source.stream", value: Some(&r.stream) })
                    .insert(Header { key: "shardline.source.partition", value: Some(&partition) })
                    .insert(Header { key: "shardline.source.offset", value: Some(&offset) })
                    .insert(Header { key: "shardline.attempts", value: Some(&attempts) })
                    .insert(Header { key: "shardline.reason", value: Some(why.reason.as_str()) })
                    .insert(Header { key: "shardline.error", value: Some(&why.error) })
                    .insert(Header { key: "shardline.failed_at", value: Some(&failed_at) });
                let mut record = FutureRecord::to(&self.topic).payload(&r.value).headers(headers);
                if let Some(key) = &r.key {
                    record = record.key(key);
                }
                self.producer.send(record, Duration::from_secs(30))
            });
            for result in futures::future::join_all(sends).await {
                result.map_err(|(e, _)| format!("on_failure topic {}: {e}", self.topic))?;
            }
            metrics::counter!("shardline_on_failure_total", "reason" => why.reason.as_str())
                .increment(records.len() as u64);
            Ok(())
        })
    }
}
