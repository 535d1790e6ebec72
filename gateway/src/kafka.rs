//! Kafka on the gateway: one idempotent producer with `acks=all` (a 202
//! means every in-sync replica has the record) and a metadata client that
//! tells an existing topic from a missing one (a missing one is 404, and
//! never created by asking: `allow.auto.create.topics=false`). Both are
//! made from `KafkaSettings::client_config`, the one place every Kafka
//! client starts from.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::BaseConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use shardline_config::SetDefault;

use crate::config::GatewayConfig;
use crate::error::ApiError;

/// Longest a metadata read (is the topic there? is Kafka up?) may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Produced {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Clone)]
pub struct Kafka {
    producer: FutureProducer,
    metadata: Arc<BaseConsumer>,
    /// Topics seen in Kafka's metadata: checked once, then trusted (a topic
    /// deleted later answers `UnknownTopicOrPartition`, which forgets it).
    known: Arc<Mutex<HashSet<String>>>,
    produce_timeout: Duration,
}

impl Kafka {
    /// The clients; nothing is dialled yet (librdkafka connects lazily).
    pub fn new(config: &GatewayConfig) -> Result<Self, String> {
        let base = config.kafka.client_config(&config.kafka_brokers).map_err(|e| e.to_string())?;
        let ms = config.produce_timeout.as_millis().to_string();
        let producer = base
            .clone()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // The gateway's deadline for an acknowledgement is produce_timeout.
            .set("message.timeout.ms", ms)
            .set_default("linger.ms", "5")
            .set_default("client.id", "shardline-gateway")
            .create()
            .map_err(|e| format!("cannot create the Kafka producer: {e}"))?;
        let metadata = base
            .clone()
            .set("allow.auto.create.topics", "false")
            .set_default("client.id", "shardline-gateway-metadata")
            .create()
            .map_err(|e| format!("cannot create the Kafka metadata client: {e}"))?;
        Ok(Self {
            producer,
            metadata: Arc::new(metadata),
            known: Arc::default(),
            produce_timeout: config.produce_timeout,
        })
    }

    /// Produces `value` to `topic` and waits for its acknowledgement.
    pub async fn produce(
        &self,
        topic: &str,
        key: Option<&str>,
        value: &[u8],
        content_type: Option<&str>,
    ) -> Result<Produced, ApiError> {
        self.ensure_topic(topic).await?;
        let mut record = FutureRecord::<str, [u8]>::to(topic).payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(content_type) = content_type {
            let header = Header { key: "content-type", value: Some(content_type) };
            record = record.headers(OwnedHeaders::new().insert(header));
        }
        // message.timeout.ms bounds the wait in librdkafka; this backstop
        // only matters if a delivery report never comes.
        let backstop = self.produce_timeout + Duration::from_secs(5);
        let sent = tokio::time::timeout(backstop, self.producer.send(record, self.produce_timeout)).await;
        match sent {
            Err(_) => Err(ApiError::Unavailable(format!(
                "Kafka did not acknowledge the record within {:?}",
                self.produce_timeout
            ))),
            Ok(Ok(delivery)) => Ok(Produced { partition: delivery.partition, offset: delivery.offset }),
            Ok(Err((e, _))) => Err(self.produce_error(topic, e)),
        }
    }

    fn produce_error(&self, topic: &str, e: KafkaError) -> ApiError {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                crate::lock(&self.known).remove(topic);
                ApiError::not_found("stream", topic, "Kafka has no such topic")
            }
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
                ApiError::TooLarge(format!("Kafka refused the record as too large: {e}"))
            }
            _ => ApiError::Unavailable(format!("Kafka did not take the record: {e}")),
        }
    }

    /// `Ok` once Kafka's metadata has listed `topic`; 404 if it answers
    /// without it, 503 if it does not answer.
    async fn ensure_topic(&self, topic: &str) -> Result<(), ApiError> {
        if crate::lock(&self.known).contains(topic) {
            return Ok(());
        }
        let (client, name) = (self.metadata.clone(), topic.to_owned());
        let found = tokio::task::spawn_blocking(move || topic_exists(&client, &name, METADATA_TIMEOUT))
            .await
            .map_err(|e| ApiError::Unavailable(format!("the Kafka metadata read failed: {e}")))?;
        match found {
            Ok(true) => {
                crate::lock(&self.known).insert(topic.to_owned());
                Ok(())
            }
            Ok(false) => Err(ApiError::not_found("stream", topic, "Kafka has no such topic")),
            Err(e) => Err(ApiError::Unavailable(format!("Kafka cannot be reached: {e}"))),
        }
    }

    /// `Ok` when the cluster answers a metadata request (for `/readyz`).
    pub async fn probe(&self) -> Result<(), String> {
        let client = self.metadata.clone();
        let answered = tokio::task::spawn_blocking(move || {
            use rdkafka::consumer::Consumer;
            client.fetch_metadata(None, METADATA_TIMEOUT).map(drop)
        })
        .await;
        match answered {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("Kafka cannot be reached: {e}")),
            Err(e) => Err(format!("the Kafka metadata read failed: {e}")),
        }
    }

    /// Waits for records still in the producer's queue (on shutdown).
    pub fn flush(&self) {
        if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "records still unacknowledged at exit");
        }
    }
}

/// Whether Kafka's metadata lists `topic` with partitions. Blocking.
fn topic_exists(client: &BaseConsumer, topic: &str, timeout: Duration) -> Result<bool, KafkaError> {
    use rdkafka::consumer::Consumer;
    let metadata = client.fetch_metadata(Some(topic), timeout)?;
    let listed = metadata.topics().iter().find(|t| t.name() == topic);
    Ok(listed.is_some_and(|t| t.error().is_none() && !t.partitions().is_empty()))
}
