//! Publishing with confirms: [`Publisher::publish`] returns only once
//! RabbitMQ has taken responsibility for every message (confirmed, and
//! routed: messages are `mandatory`, so one no queue would keep is an
//! error, not a silent drop). Persistent, so a confirmed message on a
//! durable queue survives a broker restart.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use tokio_util::sync::CancellationToken;

use crate::amqp::Amqp;

/// A publish that did not go through. Every kind may succeed on a later
/// try except an unroutable message, which needs the topology declared (by
/// the coordinator, or the operator for `forward`'s exchange).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Unavailable(String),
    #[error("{what}: {source}")]
    Channel { what: String, source: lapin::Error },
    #[error("RabbitMQ refused (nack) a message for exchange `{exchange}`")]
    Nacked { exchange: String },
    #[error(
        "no queue is bound to exchange `{exchange}` with routing key `{routing_key}`: the message would be lost"
    )]
    Unroutable { exchange: String, routing_key: String },
    /// A record's key (the message id) or a header name longer than an
    /// AMQP short string: the message cannot be written at all.
    #[error("{what} is {len} bytes long; AMQP allows at most 255 (a short string)")]
    TooLong { what: String, len: usize },
}

impl PublishError {
    /// Whether publishing the same messages again can help without anyone
    /// declaring anything.
    pub fn retryable(&self) -> bool {
        !matches!(self, PublishError::Unroutable { .. } | PublishError::TooLong { .. })
    }
}

#[derive(Debug, Clone, Default)]
pub struct Message {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub headers: FieldTable,
    /// Kept as the AMQP `message-id` property (and the record key).
    pub message_id: Option<String>,
    /// Seconds since the Unix epoch (AMQP `timestamp`); `None`: now.
    pub timestamp: Option<u64>,
    /// Others to carry over (content type and the like).
    pub properties: Option<BasicProperties>,
    /// Published without `mandatory`: for a direct reply-to address, which
    /// RabbitMQ reports as returned even when it delivered the message.
    pub unroutable_ok: bool,
}

/// The AMQP properties `m` is published with: persistent, its headers,
/// its timestamp (or `now`, in seconds), its message id. Public for the
/// fuzz targets (`fuzz/`).
pub fn properties(m: &Message, now: u64) -> Result<BasicProperties, PublishError> {
    let mut props = (m.properties.clone().unwrap_or_default())
        .with_delivery_mode(2)
        .with_headers(m.headers.clone())
        .with_timestamp(m.timestamp.unwrap_or(now));
    if let Some(id) = &m.message_id {
        props = props.with_message_id(short_string("the message id (the record's key)", id)?);
    }
    Ok(props)
}

/// `s` as an AMQP short string, or the error naming `what` is too long.
pub fn short_string(what: &str, s: &str) -> Result<ShortString, PublishError> {
    ShortString::try_new(s).map_err(|_| PublishError::TooLong { what: what.to_owned(), len: s.len() })
}

/// A confirm-mode channel on an [`Amqp`] connection, reopened when it
/// breaks. Cheap to clone; clones share the channel.
#[derive(Clone)]
pub struct Publisher {
    amqp: Amqp,
    channel: std::sync::Arc<tokio::sync::Mutex<Option<Channel>>>,
}

impl Publisher {
    pub fn new(amqp: Amqp) -> Self {
        Self { amqp, channel: Default::default() }
    }

    pub fn connect(url: &str, name: &str) -> Self {
        Self::new(Amqp::new(url, name))
    }

    async fn channel(&self) -> Result<Channel, PublishError> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        // One attempt through the connection's backoff, bounded so a
        // caller's own retry policy stays in charge.
        let never = CancellationToken::new();
        let bounded = tokio::time::timeout(Duration::from_secs(5), self.amqp.channel(&never));
        let channel = bounded.await.ok().flatten().ok_or_else(|| {
            PublishError::Unavailable(
                self.amqp.problem().unwrap_or_else(|| "amqp: no connection within 5s".into()),
            )
        })?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|source| PublishError::Channel { what: "confirm.select".into(), source })?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Publishes every message and waits for all confirms. `Err` names the
    /// first one not confirmed or not routed; treat all as not published
    /// (some may have been: at least once).
    pub async fn publish(&self, messages: &[Message]) -> Result<(), PublishError> {
        let channel = self.channel().await?;
        let now = crate::unix_ms() / 1000;
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            let props = properties(m, now)?;
            let options =
                BasicPublishOptions { mandatory: !m.unroutable_ok, ..BasicPublishOptions::default() };
            let (exchange, routing_key) = (m.exchange.as_str().into(), m.routing_key.as_str().into());
            let confirm = channel
                .basic_publish(exchange, routing_key, options, &m.body, props)
                .await
                .map_err(|source| self.failed(format!("publish to `{}`", m.exchange), source))?;
            confirms.push((m, confirm));
        }
        for (m, confirm) in confirms {
            let confirmation = confirm
                .await
                .map_err(|source| self.failed(format!("confirm from `{}`", m.exchange), source))?;
            if confirmation.is_nack() {
                return Err(PublishError::Nacked { exchange: m.exchange.clone() });
            }
            if confirmation.take_message().is_some() {
                return Err(PublishError::Unroutable {
                    exchange: m.exchange.clone(),
                    routing_key: m.routing_key.clone(),
                });
            }
        }
        Ok(())
    }

    /// Forgets a channel that failed, so the next publish opens a new one.
    fn failed(&self, what: String, source: lapin::Error) -> PublishError {
        match self.channel.try_lock() {
            Ok(mut slot) => *slot = None,
            // Held by a caller in `channel()`, which checks the channel's
            // state under the lock and replaces a broken one itself.
            Err(tokio::sync::TryLockError { .. }) => {
                tracing::debug!("channel slot busy; its holder replaces a broken channel")
            }
        }
        PublishError::Channel { what, source }
    }
}
