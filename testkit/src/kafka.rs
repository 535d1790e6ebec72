//! Kafka topic admin on the real broker: create (fresh names, so no earlier
//! run's records or checkpoints leak in), grow, delete.
//!
//! tansu's DeleteTopics deletes every topic of the cluster (see
//! ARCHITECTURE.md): only code that knows it is alone may delete.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
pub use shardline_worker::sink::kafka::KafkaAccess;

/// How long the broker gets for one admin operation.
const TIMEOUT: Duration = Duration::from_secs(30);

fn admin(kafka: &KafkaAccess) -> Result<(AdminClient<DefaultClientContext>, AdminOptions)> {
    let client = kafka.client_config()?.create().context("cannot create a Kafka admin client")?;
    Ok((client, AdminOptions::new().operation_timeout(Some(TIMEOUT)).request_timeout(Some(TIMEOUT))))
}

/// Creates `topic` with `partitions`; one that exists already is fine when
/// `may_exist` (an external coordinator's stream), an error otherwise.
pub async fn create_topic(kafka: &KafkaAccess, topic: &str, partitions: u32, may_exist: bool) -> Result<()> {
    let (admin, options) = admin(kafka)?;
    let partitions = i32::try_from(partitions).context("too many partitions")?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics([&new], &options)
        .await
        .with_context(|| format!("cannot create topic {topic} on {}", kafka.brokers))?;
    for result in results {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) if may_exist => {}
            Err((t, e)) => return Err(anyhow!("cannot create topic {t}: {e}")),
        }
    }
    Ok(())
}

/// Deletes `topic` (on tansu: every topic, see the module doc).
pub async fn delete_topic(kafka: &KafkaAccess, topic: &str) -> Result<()> {
    let (admin, options) = admin(kafka)?;
    let results = admin
        .delete_topics(&[topic], &options)
        .await
        .with_context(|| format!("cannot delete topic {topic}"))?;
    for result in results {
        result.map_err(|(t, e)| anyhow!("cannot delete topic {t}: {e}"))?;
    }
    Ok(())
}

/// Grows `topic` to `total` partitions with CreatePartitions. tansu 0.6.0
/// does not implement that API (key 37 is absent from its ApiVersions), so
/// there the topic is deleted and created again with `total` partitions:
/// to the coordinator's discovery that is the same event, a topic whose
/// partition count grew while it ran.
pub async fn add_partitions(kafka: &KafkaAccess, topic: &str, total: usize) -> Result<()> {
    let (admin, options) = admin(kafka)?;
    let results = admin.create_partitions([&NewPartitions::new(topic, total)], &options).await;
    if !matches!(&results, Err(KafkaError::AdminOp(RDKafkaErrorCode::UnsupportedFeature))) {
        for r in results.context("create_partitions")? {
            r.map_err(|(t, e)| anyhow!("add partitions to {t}: {e}"))?;
        }
        return Ok(());
    }
    delete_topic(kafka, topic).await?;
    create_topic(kafka, topic, u32::try_from(total)?, false).await
}
