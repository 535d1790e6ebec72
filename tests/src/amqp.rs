//! Publishing test messages and reading receipts and dead letters on the
//! real RabbitMQ.
//!
//! Messages carry their id in the body (`id-<n>`) and as message id. The
//! `forward` handler (or `chaos` with `exchange`) publishes a receipt per
//! processed message to a fanout exchange; a queue bound to it collects
//! the receipts, and [`drain_queue`] reads them all.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use shardline_worker::amqp::{Message, Publisher};

/// The broker's URL; `SHARDLINE_AMQP_URL` overrides.
pub fn amqp_url() -> String {
    std::env::var("SHARDLINE_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub async fn connect() -> Result<Connection> {
    shardline_testkit::amqp::connect(&amqp_url(), "shardline-tests").await
}

pub async fn channel() -> Result<(Connection, Channel)> {
    let connection = connect().await?;
    let channel = connection.create_channel().await.context("channel")?;
    Ok((connection, channel))
}

/// A publisher with confirms, as producers use it.
pub fn publisher() -> Publisher {
    Publisher::connect(&amqp_url(), "shardline-tests")
}

/// Publishes `id-<from>..id-<to>` to `exchange`, 500 per confirm round;
/// returns once RabbitMQ confirmed (and routed) every one.
pub async fn publish_ids(publisher: &Publisher, exchange: &str, from: u64, to: u64) -> Result<()> {
    let mut n = from;
    while n < to {
        let end = (n + 500).min(to);
        let messages: Vec<Message> = (n..end)
            .map(|i| Message {
                exchange: exchange.to_owned(),
                body: format!("id-{i}").into_bytes(),
                message_id: Some(format!("id-{i}")),
                ..Message::default()
            })
            .collect();
        publisher
            .publish(&messages)
            .await
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("publish {n}..{end}"))?;
        n = end;
    }
    Ok(())
}

/// A durable fanout exchange with one durable queue bound to it (of the
/// same name plus `.q`): where receipts are collected.
pub async fn receipts_exchange(channel: &Channel, name: &str) -> Result<String> {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel.exchange_declare(name.into(), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
    let queue = format!("{name}.q");
    let q = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(queue.as_str().into(), q, FieldTable::default()).await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            name.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(queue)
}

/// One message read back, with its headers as text.
#[derive(Debug, Clone)]
pub struct Got {
    pub body: String,
    pub headers: BTreeMap<String, String>,
    pub redelivered: bool,
}

impl Got {
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.get(key).map(String::as_str)
    }

    /// The id of a message `id-<n>`.
    pub fn id(&self) -> Option<u64> {
        self.body.strip_prefix("id-")?.parse().ok()
    }
}

fn text(v: &AMQPValue) -> String {
    String::from_utf8_lossy(&shardline_worker::amqp::header_bytes(v)).into_owned()
}

/// Reads (and acks) messages from `queue` until `want` were read and the
/// queue was quiet for `quiet`, or `timeout` passes.
pub async fn drain_queue(queue: &str, want: usize, quiet: Duration, timeout: Duration) -> Result<Vec<Got>> {
    let (_connection, channel) = channel().await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .with_context(|| format!("consume {queue}"))?;
    let started = Instant::now();
    let mut got = Vec::new();
    let mut last = Instant::now();
    while started.elapsed() < timeout {
        if got.len() >= want && last.elapsed() >= quiet {
            break;
        }
        let next = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await;
        let Ok(Some(delivery)) = next else { continue };
        let d = delivery.context("consume")?;
        let headers = d
            .properties
            .headers()
            .as_ref()
            .map(|h| h.inner().iter().map(|(k, v)| (k.as_str().to_owned(), text(v))).collect())
            .unwrap_or_default();
        got.push(Got {
            body: String::from_utf8_lossy(&d.data).into_owned(),
            headers,
            redelivered: d.redelivered,
        });
        d.acker.ack(BasicAckOptions::default()).await?;
        last = Instant::now();
    }
    Ok(got)
}

/// Ready messages in `queue` (a passive declare).
pub async fn depth(queue: &str) -> Result<u32> {
    let connection = connect().await?;
    let depth = shardline_testkit::amqp::depth(&connection, queue).await?;
    Ok(u32::try_from(depth.ready)?)
}

/// Receipts per id: how often each was processed.
pub fn counts(receipts: &[Got]) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for r in receipts {
        if let Some(id) = r.id() {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

/// Deletes what a test declares on the tests' broker when dropped.
pub fn cleanup() -> shardline_testkit::amqp::Cleanup {
    shardline_testkit::amqp::Cleanup::new(&amqp_url())
}
