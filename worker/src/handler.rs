//! The handler SDK. A [`Handler`] is built once per worker node by
//! [`Handler::init`]; that one value (a connection pool, a model, a client)
//! is shared by every batch of every lease the node runs. [`Handlers`]
//! holds several by name, type-erased, so one binary can host many mappings.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use shardline_proto::LeaseId;

/// One record as the handler sees it. Malformed payloads arrive as bytes:
/// deserialising is the handler's job, and its errors are handler errors.
/// The stream (or subscription) it came from is the batch's `lease.name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    /// The payload; empty for a tombstone.
    pub value: Vec<u8>,
    /// The Kafka value is null (a compacted topic's deletion marker), not
    /// merely empty; copies (`forward`, `on_failure`) keep it null.
    pub tombstone: bool,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Milliseconds since the Unix epoch, when the broker gave one.
    pub timestamp_ms: Option<i64>,
    pub origin: Origin,
    /// Where a requester waits for this record's answer (a RabbitMQ
    /// message with `reply_to`, as the gateway's synchronous invocation
    /// sends): a [`Reply`] in the [`BatchResponse`] goes there.
    pub reply_to: Option<ReplyTo>,
}

/// A requester's return address: the queue its reply is published to
/// (through the default exchange) and the correlation id it matches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    pub queue: String,
    pub correlation_id: Option<String>,
}

/// Where a record came from, in its source's own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A record of a Kafka partition (a shard lease).
    Kafka { partition: u32, offset: i64 },
    /// A RabbitMQ delivery on a queue slot. Delivery tags count from 1 on
    /// every channel the slot opens; `redelivered`: RabbitMQ delivered it
    /// before (to this or another consumer) without an ack.
    Queue { slot: u32, delivery_tag: u64, redelivered: bool },
}

impl Record {
    /// The value, `None` for a tombstone.
    pub fn value(&self) -> Option<&[u8]> {
        (!self.tombstone).then_some(self.value.as_slice())
    }

    /// Key plus value bytes: what counts against `max_batch_bytes`.
    pub fn payload_len(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.value.len()
    }

    /// The record's place in its lease: the Kafka offset, or the delivery
    /// tag. [`BatchResponse::failed`] names records by it.
    pub fn position(&self) -> i64 {
        match self.origin {
            Origin::Kafka { offset, .. } => offset,
            Origin::Queue { delivery_tag, .. } => i64::try_from(delivery_tag).unwrap_or(i64::MAX),
        }
    }

    /// The partition or queue slot: the lease's index.
    pub fn shard(&self) -> u32 {
        match self.origin {
            Origin::Kafka { partition, .. } => partition,
            Origin::Queue { slot, .. } => slot,
        }
    }
}

/// One batch of records from one lease, in order. Records are shared, not
/// copied: a retry or a bisected half holds the same records.
#[derive(Debug, Clone)]
pub struct Batch {
    pub records: Vec<Arc<Record>>,
    pub lease: LeaseId,
    /// The lease's epoch: **a fencing token** for the handler's own sinks
    /// ([`Batch::fence`]). The coordinator raises a lease's epoch on every
    /// grant, so whoever holds the lease now holds a greater epoch than
    /// every earlier owner, a paused or partitioned "zombie" included.
    pub epoch: u64,
    /// Records behind the end of the partition when the batch was cut
    /// (-1 when not known yet).
    pub lag: i64,
    /// When this attempt times out (`handler_timeout` from its start), in
    /// wall-clock ms since the Unix epoch: Lambda's deadline, for handlers
    /// that pass it on. 0: no deadline known.
    pub deadline_ms: u64,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The fencing token of this batch: its lease and epoch. A sink that
    /// keeps, per lease, the greatest epoch that wrote to it and refuses a
    /// write quoting a smaller one (in the same transaction as the write)
    /// can never take a zombie's batch after the new owner's. See the
    /// README's "Fencing your sink" and `examples/materialized-view`.
    pub fn fence(&self) -> Fence {
        Fence { lease: self.lease.to_string(), epoch: self.epoch }
    }

    /// Time left before this attempt times out; `None` when no deadline
    /// is known.
    pub fn remaining(&self) -> Option<std::time::Duration> {
        (self.deadline_ms > 0)
            .then(|| std::time::Duration::from_millis(self.deadline_ms.saturating_sub(crate::unix_ms())))
    }
}

/// A lease's fencing token, as a sink stores it: `lease` is the lease id
/// as text (`stream/partition`, `subscription#slot`), `epoch` only grows
/// for a lease. Compare epochs of the same lease only.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fence {
    pub lease: String,
    pub epoch: u64,
}

impl Fence {
    /// Whether a sink that has seen `stored` (the greatest epoch written
    /// for this lease) must refuse this write: a newer owner wrote.
    pub fn is_stale(&self, stored: u64) -> bool {
        self.epoch < stored
    }
}

/// What a handler returns for a successful batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchResponse {
    /// Positions ([`Record::position`]) of records that failed on their own
    /// (with `report_item_failures`); empty: the whole batch succeeded.
    pub failed: Vec<i64>,
    /// Why a failed record failed, by position (optional; see
    /// [`BatchResponse::fail`]). A record that gives up carries its own
    /// error to its failure destination (a dead letter's `shardline.error`
    /// header, `on_failure`'s copy) instead of the generic "the handler
    /// reported failed records", so an operator reading the dead letters
    /// sees what was wrong with each one.
    pub errors: BTreeMap<i64, String>,
    /// Answers to records that carry [`Record::reply_to`]; published once
    /// their record succeeded, before it is acked. A reply to a record
    /// without `reply_to`, or to one that failed, is not sent.
    pub replies: Vec<Reply>,
}

impl BatchResponse {
    /// Names the record at `position` as failed, with its `error`.
    pub fn fail(&mut self, position: i64, error: impl Into<String>) {
        self.failed.push(position);
        self.errors.insert(position, error.into());
    }

    /// These records failed on their own; the rest succeeded.
    pub fn failed(failed: Vec<i64>) -> Self {
        Self { failed, ..Self::default() }
    }
}

/// A handler's answer to one record (synchronous invocation): the status,
/// headers and body the requester gets, as an HTTP response through the
/// gateway. A `content-type` header also becomes the AMQP content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The answered record's [`Record::position`].
    pub position: i64,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn new(record: &Record, status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self { position: record.position(), status, headers: Vec::new(), body: body.into() }
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// A batch failed; the batch policy decides what happens next.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub message: String,
}

impl HandlerError {
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }
}

impl From<String> for HandlerError {
    fn from(message: String) -> Self {
        Self { message }
    }
}

impl From<&str> for HandlerError {
    fn from(message: &str) -> Self {
        Self { message: message.to_owned() }
    }
}

/// `init` failed: the worker does not join the fleet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("init of handler `{handler}` failed: {message}")]
pub struct InitError {
    pub handler: String,
    pub message: String,
}

/// What `init` gets: its settings (`[handlers.NAME]`), and the Kafka
/// brokers and RabbitMQ connection for handlers that produce.
#[derive(Debug, Clone)]
pub struct InitContext {
    pub name: String,
    pub settings: toml::Table,
    pub kafka_brokers: String,
    /// `kafka_brokers` with the `[kafka]` properties: what a handler's own
    /// Kafka clients start from (`KafkaAccess::client_config`).
    pub kafka: crate::sink::kafka::KafkaAccess,
    /// The worker's one AMQP connection (it connects on first use).
    pub amqp: crate::amqp::Amqp,
    pub worker_id: String,
    /// The batches this node runs at once (`max_inflight_batches`, or
    /// the CPU count): what a handler sizes its own parallelism by.
    pub concurrency: u32,
    /// Where a handler reports a problem that makes this worker unhealthy.
    pub health: crate::health::Health,
}

impl InitContext {
    pub fn error(&self, message: impl Into<String>) -> InitError {
        InitError { handler: self.name.clone(), message: message.into() }
    }

    /// A string setting; `None` when absent.
    pub fn string(&self, key: &str) -> Result<Option<String>, InitError> {
        match self.settings.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.error(format!("`{key}` must be a string, not {}", other.type_str()))),
        }
    }

    /// A duration setting like `"5ms"`; `default` when absent.
    pub fn duration(&self, key: &str, default: Duration) -> Result<Duration, InitError> {
        match self.string(key)? {
            None => Ok(default),
            Some(s) => humantime::parse_duration(&s)
                .map_err(|e| self.error(format!("`{key}` = \"{s}\" is not a duration like \"5ms\": {e}"))),
        }
    }

    /// Fails on settings the handler does not know (like deny_unknown_fields).
    pub fn only(&self, known: &[&str]) -> Result<(), InitError> {
        match self.settings.keys().find(|k| !known.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) => Err(self.error(format!("unknown setting `{k}`; allowed: {}", known.join(", ")))),
        }
    }
}

/// User code. `init` once per node; `handle` once per batch.
pub trait Handler: Send + Sync + Sized + 'static {
    /// Runs once per worker node, before the worker joins the fleet.
    fn init(ctx: &InitContext) -> impl Future<Output = Result<Self, InitError>> + Send;

    /// Runs once per batch. Return `Err` (or panic) to fail the whole batch.
    fn handle(&self, batch: &Batch) -> impl Future<Output = Result<BatchResponse, HandlerError>> + Send;

    /// Runs once when the worker stops, after its last batch: close what
    /// `init` opened (a function's processes get SIGTERM here).
    fn shutdown(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A handler after `init`, type-erased so several can live in one map.
pub trait DynHandler: Send + Sync {
    fn handle<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<BatchResponse, HandlerError>>;
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

impl<H: Handler> DynHandler for H {
    fn handle<'a>(&'a self, batch: &'a Batch) -> BoxFuture<'a, Result<BatchResponse, HandlerError>> {
        Box::pin(Handler::handle(self, batch))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(Handler::shutdown(self))
    }
}

fn factory<H: Handler>() -> Factory {
    Box::new(|ctx: InitContext| {
        Box::pin(async move {
            let handler = H::init(&ctx).await?;
            Ok(Arc::new(handler) as Arc<dyn DynHandler>)
        })
    })
}

type Factory =
    Box<dyn Fn(InitContext) -> BoxFuture<'static, Result<Arc<dyn DynHandler>, InitError>> + Send + Sync>;

#[derive(Default)]
pub struct Handlers {
    factories: BTreeMap<String, Factory>,
}

impl Handlers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hosts handler type `H` under `name` (what mappings refer to).
    pub fn with<H: Handler>(mut self, name: impl Into<String>) -> Self {
        self.factories.insert(name.into(), factory::<H>());
        self
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }

    /// Whether this worker can run `[handlers.NAME]` with these settings:
    /// a handler compiled in under that name, or any `kind = "function"`.
    pub fn hosts(&self, name: &str, settings: &toml::Table) -> bool {
        crate::function::is_function(settings) || self.factories.contains_key(name)
    }

    /// Runs `init` of the named handlers once each, for all leases.
    pub async fn init(
        &self,
        contexts: Vec<InitContext>,
    ) -> Result<BTreeMap<String, Arc<dyn DynHandler>>, InitError> {
        let mut ready = BTreeMap::new();
        for ctx in contexts {
            let name = ctx.name.clone();
            let handler = if crate::function::is_function(&ctx.settings) {
                factory::<crate::function::Function>()(ctx).await?
            } else {
                let Some(factory) = self.factories.get(&name) else {
                    return Err(InitError {
                        handler: name,
                        message: "no such handler in this worker".into(),
                    });
                };
                factory(ctx).await?
            };
            metrics::counter!("shardline_handler_inits_total", "handler" => name.clone()).increment(1);
            tracing::info!(handler = %name, "handler initialised");
            ready.insert(name, handler);
        }
        Ok(ready)
    }
}
