//! Shard discovery: the partitions of each configured stream come from Kafka
//! metadata (through rdkafka), re-read every `discovery_interval`, so a
//! partition added while running gets a lease. Discovery only ever adds
//! leases. (Queue slots come from [`crate::amqp`]'s scaler.) Each round
//! also reads every partition's high watermark, the core's bound on
//! checkpoints (a worker's own figures are not trusted for it).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use shardline_proto::{LeaseId, LeaseKind};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::service::{Command, Handle};

/// Why one metadata read failed. Every variant is worth retrying next round.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("kafka client: {0}")]
    Client(String),
    #[error("topic `{0}` does not exist (yet)")]
    NoTopic(String),
}

/// Sends the fixed-size streams once, then
/// reads Kafka metadata for the other streams until `shutdown`.
pub async fn run(config: Arc<Config>, handle: Handle, shutdown: CancellationToken) {
    for s in config.streams.iter().filter(|s| s.partitions.is_some()) {
        let command = Command::Discovered {
            kind: LeaseKind::Shard,
            name: s.name.clone(),
            handler: s.handler.clone(),
            count: s.partitions.unwrap_or(0),
        };
        if handle.send(command).await.is_err() {
            return;
        }
    }
    let streams: Vec<_> = config.streams.iter().filter(|s| s.partitions.is_none()).cloned().collect();
    if streams.is_empty() {
        return;
    }
    let client = config.kafka.client_config(&config.kafka_brokers).map_err(|e| e.to_string());
    let consumer = client.and_then(|mut c| {
        c.set("allow.auto.create.topics", "false").create::<BaseConsumer>().map_err(|e| e.to_string())
    });
    let consumer: Arc<BaseConsumer> = match consumer {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::error!(error = %e, "cannot create the Kafka metadata client; streams get no leases");
            return;
        }
    };
    for stream in &streams {
        // Exported at 0 from the start, so an alert can tell "no errors"
        // from "no such series".
        metrics::counter!("shardline_discovery_errors_total", "stream" => stream.name.clone()).increment(0);
    }
    let mut interval = tokio::time::interval(config.discovery_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        for stream in &streams {
            let (reader, topic) = (consumer.clone(), stream.name.clone());
            let timeout = config.discovery_interval.max(Duration::from_secs(5));
            let result = tokio::task::spawn_blocking(move || partition_count(&reader, &topic, timeout))
                .await
                .unwrap_or_else(|e| Err(DiscoveryError::Client(e.to_string())));
            // A missing topic is reported as zero partitions: the mapping
            // exists from now on, so the partitions of a topic created later
            // start at the earliest offset, not at `latest`.
            let result = match result {
                Err(DiscoveryError::NoTopic(topic)) => {
                    tracing::debug!(%topic, "topic does not exist yet");
                    Ok(0)
                }
                other => other,
            };
            match result {
                Ok(count) => {
                    metrics::gauge!("shardline_stream_partitions", "stream" => stream.name.clone())
                        .set(count);
                    let command = Command::Discovered {
                        kind: LeaseKind::Shard,
                        name: stream.name.clone(),
                        handler: stream.handler.clone(),
                        count,
                    };
                    if handle.send(command).await.is_err() {
                        return;
                    }
                    // After the leases exist (the core keeps watermarks of
                    // its leases only).
                    let (consumer, topic) = (consumer.clone(), stream.name.clone());
                    let highs = tokio::task::spawn_blocking(move || {
                        high_watermarks(&consumer, &topic, count, timeout)
                    })
                    .await
                    .unwrap_or_default();
                    if !highs.is_empty() && handle.send(Command::Watermarks(highs)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    metrics::counter!("shardline_discovery_errors_total", "stream" => stream.name.clone())
                        .increment(1);
                    tracing::warn!(stream = %stream.name, error = %e, "discovery failed; retrying next round");
                }
            }
        }
    }
}

fn partition_count(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Result<u32, DiscoveryError> {
    let metadata =
        consumer.fetch_metadata(Some(topic), timeout).map_err(|e| DiscoveryError::Client(e.to_string()))?;
    let t = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| DiscoveryError::NoTopic(topic.to_owned()))?;
    if t.error().is_some() || t.partitions().is_empty() {
        return Err(DiscoveryError::NoTopic(topic.to_owned()));
    }
    Ok(t.partitions().len() as u32)
}

/// The high watermarks of the first `count` partitions of `topic`, up to
/// the first that does not answer (the rest are read next round rather
/// than each waiting out the timeout). Blocking.
fn high_watermarks(
    consumer: &BaseConsumer,
    topic: &str,
    count: u32,
    timeout: Duration,
) -> Vec<(LeaseId, i64)> {
    let mut highs = Vec::with_capacity(count as usize);
    for p in 0..count {
        match consumer.fetch_watermarks(topic, p as i32, timeout) {
            Ok((_, high)) => highs.push((LeaseId::shard(topic, p), high)),
            Err(e) => {
                tracing::debug!(%topic, partition = p, error = %e, "high watermarks not read; next round");
                break;
            }
        }
    }
    highs
}
