//! RabbitMQ on the gateway: one connection (made through
//! `shardline_config::amqp::connect`, again whenever it is found broken),
//! a confirm-mode channel for `POST /v1/topics/...`, and one for
//! synchronous invocation over direct reply-to.
//!
//! Publishing is `mandatory` with publisher confirms, as the worker's
//! `Publisher`: a 202 means RabbitMQ confirmed the message *and* routed it
//! to a queue; a message no queue would keep is an error (422
//! `unroutable`), never a silent drop.
//!
//! Invocation (the reply contract in README "Synchronous invocation"): the
//! invoke channel consumes `amq.rabbitmq.reply-to` (no-ack) before its
//! first publish; each request goes to the default exchange with routing
//! key = the subscription's queue, `mandatory` (returned = no such
//! subscription, 404), `reply_to` and a fresh `correlation_id`; a task
//! hands each reply to the request waiting for its correlation id. A reply
//! nobody waits for any more (its request timed out) is dropped and
//! counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ErrorKind, ExchangeKind};
use tokio::sync::oneshot;

use crate::config::GatewayConfig;
use crate::error::ApiError;

/// The pseudo-queue of RabbitMQ's direct reply-to.
pub const REPLY_TO: &str = shardline_proto::topology::DIRECT_REPLY_TO;
/// The reply header carrying the handler's HTTP status (an integer),
/// named once in proto for the worker that writes it and this reader.
pub const STATUS_HEADER: &str = shardline_proto::topology::headers::STATUS;
/// Longest a connection attempt may take before the request is answered 503.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A handler's reply, as the requester reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// Every string header whose name does not start with `shardline.`.
    pub headers: Vec<(String, String)>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

impl Reply {
    /// The reply carried by `properties` and `body`: status from
    /// `shardline.status` (any integer type; missing: 200).
    pub fn read(properties: &BasicProperties, body: Vec<u8>) -> Result<Self, String> {
        let mut status = 200;
        let mut headers = Vec::new();
        if let Some(table) = properties.headers() {
            for (name, value) in table {
                let name = name.as_str();
                if name == STATUS_HEADER {
                    status = integer(value)
                        .and_then(|n| u16::try_from(n).ok())
                        .ok_or_else(|| format!("the reply's `{STATUS_HEADER}` is {value:?}, not a status"))?;
                } else if !name.starts_with("shardline.")
                    && let Some(text) = text(value)
                {
                    headers.push((name.to_owned(), text));
                }
            }
        }
        let content_type = properties.content_type().as_ref().map(|c| c.as_str().to_owned());
        Ok(Self { status, headers, content_type, body })
    }
}

fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// A reply, or why it cannot be read.
type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Result<Reply, String>>>>>;

/// The invoke channel and the requests waiting on it.
#[derive(Clone)]
struct Invoker {
    channel: Channel,
    pending: Pending,
    /// Cleared when the reply consumer ends (cancelled by the broker, or
    /// its channel broke): the next invocation opens a new channel.
    consuming: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Clone)]
pub struct Amqp {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    tls: Option<shardline_config::ClientTls>,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    publish: tokio::sync::Mutex<Option<Channel>>,
    invoke: tokio::sync::Mutex<Option<Invoker>>,
    /// Exchanges a passive declare found (a missing one is 404, and would
    /// close the publishing channel if published to).
    exchanges: Mutex<std::collections::HashSet<String>>,
}

impl Amqp {
    pub fn new(config: &GatewayConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                url: config.amqp_url.clone(),
                tls: config.amqp_tls.clone(),
                connection: tokio::sync::Mutex::new(None),
                publish: tokio::sync::Mutex::new(None),
                invoke: tokio::sync::Mutex::new(None),
                exchanges: Mutex::default(),
            }),
        }
    }

    /// The connection, connecting if there is none or it broke.
    async fn connection(&self) -> Result<Arc<Connection>, ApiError> {
        let mut slot = self.inner.connection.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(c.clone());
        }
        let connect =
            shardline_config::amqp::connect(&self.inner.url, self.inner.tls.as_ref(), "shardline-gateway");
        let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(c)) => Arc::new(c),
            Ok(Err(e)) => return Err(ApiError::Unavailable(format!("RabbitMQ cannot be reached: {e}"))),
            Err(_) => {
                return Err(ApiError::Unavailable(format!(
                    "RabbitMQ cannot be reached: no connection within {CONNECT_TIMEOUT:?}"
                )));
            }
        };
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// `Ok` when a connection is (or can be) open (for `/readyz`).
    pub async fn probe(&self) -> Result<(), String> {
        self.connection().await.map(drop).map_err(|e| e.to_string())
    }

    async fn confirm_channel(&self) -> Result<Channel, ApiError> {
        let channel =
            self.connection().await?.create_channel().await.map_err(unavailable("open a channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(unavailable("confirm.select"))?;
        Ok(channel)
    }

    async fn publish_channel(&self) -> Result<Channel, ApiError> {
        let mut slot = self.inner.publish.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(c.clone());
        }
        let channel = self.confirm_channel().await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// 404 unless RabbitMQ has exchange `name` (a passive declare on a
    /// channel of its own: a missing exchange closes the channel).
    async fn ensure_exchange(&self, name: &str) -> Result<(), ApiError> {
        if crate::lock(&self.inner.exchanges).contains(name) {
            return Ok(());
        }
        let channel =
            self.connection().await?.create_channel().await.map_err(unavailable("open a channel"))?;
        let options = ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() };
        let declared =
            channel.exchange_declare(name.into(), ExchangeKind::Topic, options, FieldTable::default()).await;
        match declared {
            Ok(()) => {
                if let Err(e) = channel.close(200, "done".into()).await {
                    tracing::debug!(error = %e, "closing the passive-declare channel");
                }
                crate::lock(&self.inner.exchanges).insert(name.to_owned());
                Ok(())
            }
            Err(e) if is_not_found(&e) => {
                Err(ApiError::not_found("topic", name, "RabbitMQ has no such exchange"))
            }
            Err(e) => Err(unavailable("declare (passive)")(e)),
        }
    }

    /// Publishes `body` to exchange `topic` with `routing_key`; returns the
    /// message id once RabbitMQ confirmed and routed it.
    pub async fn publish(
        &self,
        topic: &str,
        routing_key: &str,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<String, ApiError> {
        self.ensure_exchange(topic).await?;
        let message_id = uuid::Uuid::new_v4().to_string();
        let properties = properties(&message_id, content_type)?.with_delivery_mode(2);
        let channel = self.publish_channel().await?;
        let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        let key = short("routing_key", routing_key)?;
        let forget = |e: lapin::Error| {
            // Perhaps the exchange was deleted since it was checked: check again next time.
            crate::lock(&self.inner.exchanges).remove(topic);
            e
        };
        let confirm = channel
            .basic_publish(topic.into(), key, options, body, properties)
            .await
            .map_err(forget)
            .map_err(unavailable("publish"))?;
        let confirmation = confirm.await.map_err(forget).map_err(unavailable("confirm"))?;
        if confirmation.is_nack() {
            return Err(ApiError::Unavailable(format!("RabbitMQ refused (nack) the message for `{topic}`")));
        }
        if confirmation.take_message().is_some() {
            return Err(ApiError::Unroutable {
                topic: topic.to_owned(),
                routing_key: routing_key.to_owned(),
            });
        }
        Ok(message_id)
    }

    /// The invoke channel, opened (consuming reply-to first) if there is
    /// none or it broke.
    async fn invoker(&self) -> Result<Invoker, ApiError> {
        let mut slot = self.inner.invoke.lock().await;
        let alive = |i: &&Invoker| {
            i.channel.status().connected() && i.consuming.load(std::sync::atomic::Ordering::Acquire)
        };
        if let Some(i) = slot.as_ref().filter(alive) {
            return Ok(i.clone());
        }
        let channel = self.confirm_channel().await?;
        let options = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
        let consumer = channel
            .basic_consume(REPLY_TO.into(), "shardline-gateway".into(), options, FieldTable::default())
            .await
            .map_err(unavailable("consume amq.rabbitmq.reply-to"))?;
        let pending: Pending = Arc::default();
        let consuming = Arc::new(std::sync::atomic::AtomicBool::new(true));
        tokio::spawn(dispatch(consumer, pending.clone(), consuming.clone()));
        let invoker = Invoker { channel, pending, consuming };
        *slot = Some(invoker.clone());
        Ok(invoker)
    }

    /// Publishes a request to `subscription` and waits up to `deadline`
    /// for its reply.
    pub async fn invoke(
        &self,
        subscription: &str,
        body: &[u8],
        content_type: Option<&str>,
        deadline: Duration,
    ) -> Result<Reply, ApiError> {
        let invoker = self.invoker().await?;
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let message_id = uuid::Uuid::new_v4().to_string();
        let properties = properties(&message_id, content_type)?
            .with_reply_to(REPLY_TO.into())
            .with_correlation_id(short("correlation_id", &correlation_id)?);
        let (tx, rx) = oneshot::channel();
        crate::lock(&invoker.pending).insert(correlation_id.clone(), tx);
        // Removes the entry however this ends (timeout, error, client gone).
        let _waiting = Waiting { pending: &invoker.pending, id: &correlation_id };
        let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        let key = short("subscription", subscription)?;
        let published = async {
            let confirm = invoker
                .channel
                .basic_publish("".into(), key, options, body, properties)
                .await
                .map_err(unavailable("publish"))?;
            let confirmation = confirm.await.map_err(unavailable("confirm"))?;
            if confirmation.is_nack() {
                return Err(ApiError::Unavailable("RabbitMQ refused (nack) the request".into()));
            }
            if confirmation.take_message().is_some() {
                return Err(ApiError::not_found("subscription", subscription, "RabbitMQ has no such queue"));
            }
            Ok(())
        };
        let replied = async {
            published.await?;
            let reply = rx.await.map_err(|_| {
                ApiError::Unavailable("the reply channel to RabbitMQ broke before the reply came".into())
            })?;
            reply.map_err(ApiError::BadReply)
        };
        match tokio::time::timeout(deadline, replied).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::Timeout(format!(
                "subscription `{subscription}` did not reply within {}ms",
                deadline.as_millis()
            ))),
        }
    }
}

/// Drops a request's entry from the pending map when it stops waiting.
struct Waiting<'a> {
    pending: &'a Pending,
    id: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        crate::lock(self.pending).remove(self.id);
    }
}

/// Hands each reply to the request waiting for its correlation id, until
/// the channel breaks; then every waiting request learns it (its sender
/// is dropped with the map's entries).
async fn dispatch(
    mut consumer: lapin::Consumer,
    pending: Pending,
    consuming: Arc<std::sync::atomic::AtomicBool>,
) {
    while let Some(delivery) = consumer.next().await {
        let delivery = match delivery {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "the reply-to consumer failed; the next invocation opens a new one");
                break;
            }
        };
        let Some(id) = delivery.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned()) else {
            metrics::counter!("shardline_gateway_replies_dropped_total", "reason" => "no_correlation_id")
                .increment(1);
            tracing::warn!("a reply without a correlation id; dropped");
            continue;
        };
        let waiter = crate::lock(&pending).remove(&id);
        let Some(waiter) = waiter else {
            metrics::counter!("shardline_gateway_replies_dropped_total", "reason" => "late").increment(1);
            tracing::debug!(correlation_id = %id, "a reply nobody waits for (timed out); dropped");
            continue;
        };
        if waiter.send(Reply::read(&delivery.properties, delivery.data)).is_err() {
            metrics::counter!("shardline_gateway_replies_dropped_total", "reason" => "late").increment(1);
        }
    }
    consuming.store(false, std::sync::atomic::Ordering::Release);
    let waiting = std::mem::take(&mut *crate::lock(&pending));
    if !waiting.is_empty() {
        tracing::warn!(requests = waiting.len(), "the reply consumer ended; waiting requests answered 503");
    }
}

/// Persistent-less request properties: message id, content type (property
/// and `content-type` header).
fn properties(message_id: &str, content_type: Option<&str>) -> Result<BasicProperties, ApiError> {
    let mut props = BasicProperties::default().with_message_id(short("message_id", message_id)?);
    if let Some(content_type) = content_type {
        let mut headers = FieldTable::default();
        headers.insert("content-type".into(), AMQPValue::LongString(LongString::from(content_type)));
        props = props.with_content_type(short("Content-Type", content_type)?).with_headers(headers);
    }
    Ok(props)
}

fn short(what: &str, s: &str) -> Result<ShortString, ApiError> {
    ShortString::try_new(s).map_err(|_| {
        ApiError::BadRequest(format!("{what} is {} bytes long; AMQP allows at most 255", s.len()))
    })
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(p) if p.get_id() == 404)
}

fn unavailable(what: &'static str) -> impl Fn(lapin::Error) -> ApiError {
    move |e| ApiError::Unavailable(format!("RabbitMQ: {what} failed: {e}"))
}
