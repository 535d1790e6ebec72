//! RabbitMQ on the worker: one AMQP connection per process (DESIGN.md),
//! with a channel per queue slot and one for publishing ([`Publisher`],
//! re-exported here for handlers, tests and the load test). [`Amqp`]
//! connects on first use, and whoever finds it broken reconnects it with
//! backoff (one at a time); until it is back the worker reports itself
//! unhealthy in its heartbeats. Channels are not recovered: their users
//! open new ones (RabbitMQ has requeued what a lost channel had unacked).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use shardline_config::ClientTls;
use tokio_util::sync::CancellationToken;

pub use crate::sink::publish::{Message, PublishError, Publisher};

/// The process's AMQP connection; cheap to clone.
#[derive(Clone)]
pub struct Amqp {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    /// `amqp_tls`: the CA and client certificate for an `amqps://` URL.
    tls: Option<ClientTls>,
    name: String,
    connection: tokio::sync::Mutex<Option<Connection>>,
    /// Why the connection is down, while it is.
    problem: Mutex<Option<String>>,
}

impl std::fmt::Debug for Amqp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: show the host part only.
        let host = self.inner.url.rsplit('@').next().unwrap_or_default();
        f.debug_struct("Amqp").field("host", &host).finish()
    }
}

impl Amqp {
    /// Connects on first use; `name` shows in RabbitMQ's connection list.
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self::with_tls(url, name, None)
    }

    /// The same, trusting `tls`'s CA (and presenting its certificate) for
    /// an `amqps://` URL: the worker's `amqp_tls`.
    pub fn with_tls(url: impl Into<String>, name: impl Into<String>, tls: Option<ClientTls>) -> Self {
        Self {
            inner: Arc::new(Inner {
                url: url.into(),
                tls,
                name: name.into(),
                connection: tokio::sync::Mutex::new(None),
                problem: Mutex::new(None),
            }),
        }
    }

    pub fn problem(&self) -> Option<String> {
        crate::lock(&self.inner.problem).clone()
    }

    fn set_problem(&self, problem: Option<String>) {
        let connected = problem.is_none();
        *crate::lock(&self.inner.problem) = problem;
        metrics::gauge!("shardline_amqp_connected").set(if connected { 1.0 } else { 0.0 });
    }

    /// A new channel, reconnecting as long as it takes; `None` once `stop`.
    pub async fn channel(&self, stop: &CancellationToken) -> Option<Channel> {
        let backoff = (Duration::from_millis(100), Duration::from_secs(5));
        crate::persist(stop, backoff, |wait| async move {
            let e = match self.try_channel().await {
                Ok(channel) => return Some(channel),
                Err(e) => e,
            };
            tracing::warn!(error = %e, ?wait, "RabbitMQ unavailable; retrying");
            self.set_problem(Some(format!("amqp: {e}")));
            metrics::counter!("shardline_source_errors_total").increment(1);
            None
        })
        .await
    }

    async fn try_channel(&self) -> Result<Channel, lapin::Error> {
        let mut slot = self.inner.connection.lock().await;
        if let Some(connection) = slot.as_ref().filter(|c| c.status().connected()) {
            match connection.create_channel().await {
                Ok(channel) => return Ok(channel),
                Err(e) => tracing::warn!(error = %e, "cannot open a channel; reconnecting"),
            }
        }
        *slot = None;
        let inner = &self.inner;
        let connection = shardline_config::amqp::connect(&inner.url, inner.tls.as_ref(), &inner.name).await?;
        let channel = connection.create_channel().await?;
        *slot = Some(connection);
        if self.problem().is_some() {
            tracing::info!("RabbitMQ connection re-established");
        }
        self.set_problem(None);
        Ok(channel)
    }
}

/// A header value as bytes for [`crate::handler::Record`]: strings as they
/// are, numbers and booleans in decimal text, anything else in debug form.
pub fn header_bytes(value: &AMQPValue) -> Vec<u8> {
    match value {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        AMQPValue::Boolean(b) => b.to_string().into_bytes(),
        AMQPValue::ShortShortInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortShortUInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortUInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongUInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongLongInt(n) => n.to_string().into_bytes(),
        AMQPValue::Timestamp(n) => n.to_string().into_bytes(),
        other => format!("{other:?}").into_bytes(),
    }
}

/// Headers RabbitMQ adds when it dead-letters. A republished message must
/// not carry them: RabbitMQ would see its own `x-death` trail, take the
/// retry loop for a dead-letter cycle and drop the message.
pub(crate) fn is_broker_header(key: &str) -> bool {
    key == "x-death" || key.starts_with("x-first-death-") || key.starts_with("x-last-death-")
}

/// Byte headers as AMQP long strings. A name longer than 255 bytes (a
/// Kafka header's may be) does not fit an AMQP field name: an error naming
/// it, never a panic.
pub fn field_table<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<FieldTable, PublishError> {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        let shown: String = k.chars().take(40).collect();
        let key = crate::sink::publish::short_string(&format!("header name `{shown}...`"), k)?;
        table.insert(key, AMQPValue::LongString(v.to_vec().into()));
    }
    Ok(table)
}
