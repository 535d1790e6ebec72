//! The coordinator's TOML config: parsed strictly (`deny_unknown_fields`)
//! and validated as a whole before anything starts, so a typo is one clear
//! error naming the field and what is allowed, never a half-started fleet.
//!
//! Every default has one home: the wire types (`Mapping::new`,
//! `FailurePolicy::default`) for mapping settings, the core's `Balancer`
//! for `[balancer]`, `shardline-config` for the brokers, the `Default`
//! impls here for the rest. The types say what each table takes: a
//! subscription has no `starting_position`, `parallelization_factor` or
//! `on_failure` (queues have no positions, scale by slots, dead-letter to
//! `S.dlq`), so setting one is an unknown-field error. Every type is also
//! `Serialize`, so tests and tools build configs as values.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
pub use shardline_config::{ClientTls, ConfigError, ConfigFile, Invalid, KafkaSettings, Store};
use shardline_config::{
    Overrides, check_amqp_tls, check_amqp_url, check_brokers, check_pem, ensure, in_range, read_secret,
};
use shardline_proto::{FailurePolicy, Filter, FilterTest, LeaseId, LeaseKind, Mapping, StartingPosition};

pub use crate::auth::Tokens;
use crate::core::{Balancer, CoreConfig};

/// The whole coordinator config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the gRPC API (worker and admin services).
    pub listen: SocketAddr,
    /// Address of the Prometheus metrics endpoint; absent: no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the sled lease store lives (with `store = "sled"`).
    pub data_dir: PathBuf,
    /// The lease store: `"sled"` (default, in `data_dir`) or `{ postgres =
    /// "postgres://..." }`, shared by any number of coordinators of which
    /// one leads; env `SHARDLINE_STORE` overrides.
    pub store: Store,
    /// With PostgreSQL: each renewal sets the leader's deadline this far
    /// ahead (renewed every quarter of it); a standby takes over once it
    /// passes. At most half of the workers' fence time.
    #[serde(with = "humantime_serde")]
    pub leadership_timeout: Duration,
    /// With PostgreSQL: the URL standbys send clients to while this
    /// coordinator leads. Default: `http://` + `listen` (the host name when
    /// `listen` is a wildcard address). Env `SHARDLINE_ADVERTISE_URL`
    /// overrides: replicas sharing one config each advertise their own.
    pub advertise_url: Option<String>,
    /// TLS for the gRPC API: `{ cert, key, client_ca? }`; `client_ca`
    /// turns on mutual TLS (every client must present a certificate it
    /// signed, whose subject's `OU` may name the client's role).
    pub tls: Option<ServerTls>,
    /// Serve plaintext gRPC although `listen` is not a loopback address
    /// (only behind a TLS-terminating proxy or a mesh that encrypts).
    pub insecure: bool,
    /// The admin token (every call: `authorization: Bearer TOKEN`); env
    /// `SHARDLINE_TOKEN` overrides. Prefer `auth_token_file` or the
    /// variable: a config file is often readable by more people than a
    /// secret should be.
    pub auth_token: Option<String>,
    /// A file holding the admin token (a mounted Kubernetes Secret).
    pub auth_token_file: Option<PathBuf>,
    /// The workers' token: the worker service only; env
    /// `SHARDLINE_WORKER_TOKEN`.
    pub worker_token: Option<String>,
    pub worker_token_file: Option<PathBuf>,
    /// A read-only token for dashboards and `shardline checkpoints`; env
    /// `SHARDLINE_VIEWER_TOKEN`.
    pub viewer_token: Option<String>,
    pub viewer_token_file: Option<PathBuf>,
    /// How often workers heartbeat (told to them at registration).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A worker silent this long is dead; its leases move.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// A graceful handoff not confirmed within this is forced. Must be
    /// longer than every mapping's `handler_timeout`, so a draining lease can
    /// finish its in-flight batch; unset: see [`Config::handoff_timeout`].
    #[serde(with = "humantime_serde::option")]
    pub handoff_timeout: Option<Duration>,
    /// How often Kafka metadata is re-read to find new partitions.
    #[serde(with = "humantime_serde")]
    pub discovery_interval: Duration,
    /// Kafka bootstrap servers; env `SHARDLINE_KAFKA_BROKERS` overrides.
    pub kafka_brokers: String,
    /// RabbitMQ URL (`amqp://` or `amqps://`); env `SHARDLINE_AMQP_URL`
    /// overrides. Used only when subscriptions are configured.
    pub amqp_url: String,
    // Broker security (README "Broker security"): checked at load.
    /// `[kafka] properties`: librdkafka properties (security.protocol,
    /// sasl.*, ssl.*, ...) for every Kafka client of the coordinator
    /// (discovery, offsets); values are text, `{ file = "PATH" }` or
    /// `{ env = "VAR" }`.
    pub kafka: KafkaSettings,
    /// With an `amqps://` amqp_url: the CA the broker's certificate chains
    /// to (`ca`), and a client certificate (`cert`, `key`) if it asks.
    pub amqp_tls: Option<ClientTls>,
    /// How often subscription depths are read and slots rescaled.
    #[serde(with = "humantime_serde")]
    pub scale_interval: Duration,
    /// How often each stream's durable checkpoints are committed to its
    /// Kafka consumer group (`consumer_group`), for Kafka's own lag tools.
    #[serde(with = "humantime_serde")]
    pub consumer_group_commit_interval: Duration,
    /// Lease placement: `count` or `load` (the default) and its knobs.
    pub balancer: Balancer,
    /// Kafka topics whose partitions become leases.
    pub streams: Vec<StreamConfig>,
    /// RabbitMQ exchanges producers publish to.
    pub topics: Vec<TopicConfig>,
    /// RabbitMQ subscription queues whose slots become leases.
    pub subscriptions: Vec<SubscriptionConfig>,
}

impl Default for Config {
    fn default() -> Self {
        let core = CoreConfig::default();
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], shardline_config::COORDINATOR_PORT)),
            metrics_listen: None,
            data_dir: PathBuf::from("./shardline-data"),
            store: Store::Sled,
            leadership_timeout: Duration::from_secs(2),
            advertise_url: None,
            tls: None,
            insecure: false,
            auth_token: None,
            auth_token_file: None,
            worker_token: None,
            worker_token_file: None,
            viewer_token: None,
            viewer_token_file: None,
            heartbeat_interval: Duration::from_secs(1),
            session_timeout: core.session_timeout,
            handoff_timeout: None,
            discovery_interval: Duration::from_secs(10),
            kafka_brokers: shardline_config::KAFKA_BROKERS.into(),
            amqp_url: shardline_config::AMQP_URL.into(),
            kafka: KafkaSettings::default(),
            amqp_tls: None,
            scale_interval: Duration::from_secs(2),
            consumer_group_commit_interval: Duration::from_secs(5),
            balancer: core.balancer,
            streams: Vec::new(),
            topics: Vec::new(),
            subscriptions: Vec::new(),
        }
    }
}

/// The gRPC listener's TLS: PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// The coordinator's certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// CA certificate(s) client certificates must chain to; set: mutual
    /// TLS, a client without such a certificate is refused.
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    pub fn check(&self) -> Result<(), Invalid> {
        check_pem("cert", &self.cert)?;
        check_pem("key", &self.key)?;
        self.client_ca.as_ref().map_or(Ok(()), |ca| check_pem("client_ca", ca))
    }
}

/// A Kafka topic mapped to a handler: its own keys, then the settings
/// every mapping takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", default, deny_unknown_fields)]
pub struct StreamConfig {
    /// The Kafka topic.
    pub name: String,
    /// The handler that processes its batches (workers host handlers by name).
    pub handler: String,
    /// A fixed partition count instead of Kafka metadata discovery, for
    /// benchmarks of the coordinator alone. Leave unset in production.
    pub partitions: Option<u32>,
    /// Where a shard without a checkpoint starts: `latest`, `trim_horizon`
    /// or `at_timestamp` (then `starting_timestamp` is required).
    pub starting_position: StartingPosition,
    /// RFC 3339 time for `at_timestamp`, e.g. `2026-11-27T10:00:00Z`.
    #[serde(with = "humantime_serde::option")]
    pub starting_timestamp: Option<SystemTime>,
    /// Kafka topic that receives records that gave up; absent: discarded.
    pub on_failure: Option<String>,
    /// Concurrent batches per shard (1..10); order is kept per record key.
    pub parallelization_factor: u32,
    /// The Kafka consumer group whose committed offsets mirror this
    /// stream's durable checkpoints; unset: `shardline.<name>`.
    pub consumer_group: Option<String>,
    /// `false`: commit nothing to Kafka (the checkpoints stay only in the
    /// coordinator's store).
    pub mirror_offsets: bool,
    #[serde(flatten)]
    pub settings: BatchSettings,
}

impl StreamConfig {
    pub fn new(name: impl Into<String>, handler: impl Into<String>) -> Self {
        Self { name: name.into(), handler: handler.into(), ..Self::default() }
    }

    /// The mapping workers receive with every acquire of a lease.
    pub fn mapping(&self) -> Mapping {
        let mut mapping = self.settings.mapping(&self.handler);
        mapping.starting_position = self.starting_position;
        mapping.starting_timestamp_ms = self
            .starting_timestamp
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        mapping.parallelization_factor = self.parallelization_factor;
        mapping.policy.on_failure.clone_from(&self.on_failure);
        mapping
    }

    /// The consumer group this stream's checkpoints are committed to, if
    /// mirrored (a fixed-size stream has no Kafka topic behind it).
    pub fn mirror_group(&self) -> Option<String> {
        if !self.mirror_offsets || self.partitions.is_some() {
            return None;
        }
        Some(self.consumer_group.clone().unwrap_or_else(|| format!("shardline.{}", self.name)))
    }

    /// Checks this table; fields are named relative to it.
    fn validate(&self) -> Result<(), Invalid> {
        check_name("name", &self.name)?;
        check_name("handler", &self.handler)?;
        if let Some(p) = self.partitions {
            in_range("partitions", p, 1, 100_000)?;
        }
        let at_timestamp = self.starting_position == StartingPosition::AtTimestamp;
        match self.starting_timestamp {
            None if at_timestamp => Err(Invalid::new(
                "starting_timestamp",
                "missing",
                "an RFC 3339 time, required with starting_position = \"at_timestamp\"",
            ))?,
            Some(_) if !at_timestamp => Err(Invalid::new(
                "starting_timestamp",
                "set",
                "only with starting_position = \"at_timestamp\"",
            ))?,
            _ => {}
        }
        if let Some(topic) = &self.on_failure {
            check_name("on_failure", topic)?;
            ensure(*topic != self.name, "on_failure", "the stream itself", "another topic")?;
        }
        in_range("parallelization_factor", self.parallelization_factor, 1, 10)?;
        if let Some(group) = &self.consumer_group {
            // Kafka's own limit for a group id is its 16-bit string length;
            // the name rule for topics is stricter and keeps tools happy.
            check_name("consumer_group", group)?;
        }
        self.settings.validate()
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        let defaults = Mapping::new("");
        Self {
            name: String::new(),
            handler: String::new(),
            partitions: None,
            starting_position: defaults.starting_position,
            starting_timestamp: None,
            on_failure: defaults.policy.on_failure,
            parallelization_factor: defaults.parallelization_factor,
            consumer_group: None,
            mirror_offsets: true,
            settings: BatchSettings::default(),
        }
    }
}

/// Batch and failure settings of a mapping (DESIGN.md "Batches and handler
/// semantics"): the keys streams and subscriptions both take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BatchSettings {
    /// Most records per batch (1..10000).
    pub batch_size: u32,
    /// Most payload bytes (key + value) per batch (1 KiB..64 MiB).
    pub max_batch_bytes: u64,
    /// Wait up to this long to fill a batch (0..300 s).
    #[serde(with = "humantime_serde")]
    pub batch_window: Duration,
    /// Retries of a failing batch, 0..10000; `None` (-1 in TOML): until
    /// the records expire.
    #[serde(with = "max_retries")]
    pub max_retries: Option<u32>,
    /// Backoff between attempts of the same batch.
    pub retry_backoff: Backoff,
    /// Split a failing batch in two and retry the halves, down to the record.
    pub bisect_on_error: bool,
    /// The handler's response names failed records (Lambda's
    /// ReportBatchItemFailures); the shard checkpoints before the first.
    pub report_item_failures: bool,
    /// Older records skip the handler and go to on_failure (60 s..7 days).
    #[serde(with = "humantime_serde::option")]
    pub max_record_age: Option<Duration>,
    /// A batch running longer than this fails (1 s..900 s).
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
    /// Only records whose JSON value passes this reach the handler.
    pub filter: Option<FilterConfig>,
}

impl Default for BatchSettings {
    fn default() -> Self {
        let defaults = Mapping::new("");
        let policy = defaults.policy;
        Self {
            batch_size: defaults.batch_size,
            max_batch_bytes: defaults.max_batch_bytes,
            batch_window: defaults.batch_window,
            max_retries: policy.max_retries,
            retry_backoff: Backoff::default(),
            bisect_on_error: policy.bisect_on_error,
            report_item_failures: policy.report_item_failures,
            max_record_age: policy.max_record_age,
            handler_timeout: policy.handler_timeout,
            filter: None,
        }
    }
}

impl BatchSettings {
    /// The mapping of these settings for `handler`; what only streams set
    /// keeps its default.
    pub fn mapping(&self, handler: &str) -> Mapping {
        let b = &self.retry_backoff;
        Mapping {
            batch_size: self.batch_size,
            max_batch_bytes: self.max_batch_bytes,
            batch_window: self.batch_window,
            policy: FailurePolicy {
                max_retries: self.max_retries,
                retry_initial: b.initial,
                retry_max: b.max,
                retry_multiplier: b.multiplier,
                retry_jitter: b.jitter,
                bisect_on_error: self.bisect_on_error,
                report_item_failures: self.report_item_failures,
                max_record_age: self.max_record_age,
                handler_timeout: self.handler_timeout,
                ..FailurePolicy::default()
            },
            filter: self.filter.as_ref().and_then(FilterConfig::to_filter),
            ..Mapping::new(handler)
        }
    }

    fn validate(&self) -> Result<(), Invalid> {
        let secs = Duration::from_secs;
        in_range("batch_size", self.batch_size, 1, 10_000)?;
        let bytes = self.max_batch_bytes;
        ensure((1024..=64 << 20).contains(&bytes), "max_batch_bytes", bytes, "1024 to 67108864 (64 MiB)")?;
        let window = self.batch_window;
        ensure(window <= secs(300), "batch_window", format!("{window:?}"), "0s to 300s")?;
        if let Some(n) = self.max_retries {
            ensure(n <= max_retries::MAX, "max_retries", n, max_retries::ALLOWED)?;
        }
        let b = &self.retry_backoff;
        ensure(
            Duration::from_millis(1) <= b.initial && b.initial <= b.max && b.max <= secs(900),
            "retry_backoff",
            format!("{:?} to {:?}", b.initial, b.max),
            "1ms <= initial <= max <= 900s",
        )?;
        ensure(
            (1.0..=10.0).contains(&b.multiplier),
            "retry_backoff.multiplier",
            b.multiplier,
            "1.0 to 10.0",
        )?;
        if let Some(age) = self.max_record_age {
            let ok = (secs(60)..=secs(604_800)).contains(&age);
            ensure(ok, "max_record_age", format!("{age:?}"), "60s to 7 days (604800s)")?;
        }
        in_range("handler_timeout", self.handler_timeout, secs(1), secs(900))?;
        match &self.filter {
            Some(f) => f.validate().map_err(|e| e.under("filter")),
            None => Ok(()),
        }
    }
}

/// `max_retries` in TOML: -1 (until the records expire) is `None`.
mod max_retries {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub const MAX: u32 = 10_000;
    pub const ALLOWED: &str = "-1 (until the records expire) or 0 to 10000";

    pub fn serialize<S: Serializer>(value: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(value.map_or(-1, i64::from))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        match i64::deserialize(d)? {
            -1 => Ok(None),
            n => u32::try_from(n)
                .map(Some)
                .map_err(|_| D::Error::custom(format!("`max_retries` is {n}; allowed: {ALLOWED}"))),
        }
    }
}

/// Exponential backoff between attempts of a failing batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backoff {
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    pub multiplier: f64,
    pub jitter: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        let p = FailurePolicy::default();
        Self {
            initial: p.retry_initial,
            max: p.retry_max,
            multiplier: p.retry_multiplier,
            jitter: p.retry_jitter,
        }
    }
}

/// A test on one field of the record's JSON value: exactly one of
/// `equals`, `exists = true`, `prefix`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Dotted path, e.g. `order.type`.
    pub field: String,
    #[serde(default)]
    pub equals: Option<toml::Value>,
    #[serde(default)]
    pub exists: Option<bool>,
    #[serde(default)]
    pub prefix: Option<String>,
}

impl FilterConfig {
    /// `None` only for an invalid filter, which `validate` refuses first.
    fn to_filter(&self) -> Option<Filter> {
        let test = match (&self.equals, self.exists, &self.prefix) {
            (Some(v), None, None) => FilterTest::Equals(serde_json::to_string(v).ok()?),
            (None, Some(true), None) => FilterTest::Exists,
            (None, None, Some(p)) => FilterTest::Prefix(p.clone()),
            _ => return None,
        };
        Some(Filter { field: self.field.clone(), test })
    }

    fn validate(&self) -> Result<(), Invalid> {
        let f = &self.field;
        let path_ok = !f.is_empty() && !f.split('.').any(str::is_empty);
        ensure(path_ok, "field", format!("`{f}`"), "a dotted path like order.type")?;
        let tests = [self.equals.is_some(), self.exists.is_some(), self.prefix.is_some()];
        let value = match self.exists {
            Some(false) => "exists = false".to_owned(),
            _ => format!("{} tests", tests.iter().filter(|t| **t).count()),
        };
        let allowed = "exactly one of equals = VALUE, exists = true, prefix = \"TEXT\"";
        ensure(self.to_filter().is_some(), "", value, allowed)
    }
}

/// A RabbitMQ topic: the exchange producers publish to (SNS topic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// The exchange name.
    pub name: String,
    /// `fanout` (every subscription gets every message) or `topic`
    /// (subscriptions choose by `binding_key`).
    #[serde(default)]
    pub kind: TopicKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicKind {
    #[default]
    Fanout,
    Topic,
}

/// The queue type of a subscription and its retry and dead-letter queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    /// Quorum where the broker supports them (RabbitMQ 3.8+), else classic.
    #[default]
    Auto,
    Quorum,
    Classic,
}

/// A RabbitMQ subscription: a durable queue bound to a topic (SQS queue
/// subscribed to SNS), consumed through 1..N queue slots. Records that give
/// up go to its dead-letter queue, so it has no `on_failure`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", default, deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// The queue name.
    pub name: String,
    /// The topic (exchange) it is bound to; must be listed under `[[topics]]`.
    pub topic: String,
    pub handler: String,
    /// For `kind = "topic"` exchanges: the binding key (default `#`, all).
    pub binding_key: Option<String>,
    pub queue_type: QueueType,
    /// Fewest queue slots (concurrent consumers); the scaler starts here.
    pub min_slots: u32,
    /// Most queue slots (Lambda's maximum concurrency).
    pub max_concurrency: u32,
    /// Add slots while the backlog would take longer than this to drain.
    #[serde(with = "humantime_serde")]
    pub drain_target: Duration,
    /// Remove one slot after the queue has been idle this long.
    #[serde(with = "humantime_serde")]
    pub scale_down_after: Duration,
    #[serde(flatten)]
    pub settings: BatchSettings,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            topic: String::new(),
            handler: String::new(),
            binding_key: None,
            queue_type: QueueType::default(),
            min_slots: 1,
            max_concurrency: 10,
            drain_target: Duration::from_secs(10),
            scale_down_after: Duration::from_secs(60),
            settings: BatchSettings::default(),
        }
    }
}

impl SubscriptionConfig {
    pub fn new(name: impl Into<String>, topic: impl Into<String>, handler: impl Into<String>) -> Self {
        Self { name: name.into(), topic: topic.into(), handler: handler.into(), ..Self::default() }
    }

    /// Checks this table against the configured topics.
    fn validate(&self, topics: &BTreeMap<&str, TopicKind>) -> Result<(), Invalid> {
        check_name("name", &self.name)?;
        check_name("handler", &self.handler)?;
        let Some(kind) = topics.get(self.topic.as_str()) else {
            let known: Vec<&str> = topics.keys().copied().collect();
            let value = format!("`{}`, which is not under [[topics]]", self.topic);
            return Err(Invalid::new("topic", value, or_none(&known)));
        };
        if let Some(key) = &self.binding_key {
            let fanout = format!("set, but topic `{}` is a fanout", self.topic);
            ensure(*kind == TopicKind::Topic, "binding_key", fanout, "only with kind = \"topic\"")?;
            let ok = !key.is_empty() && key.len() <= 255;
            ensure(ok, "binding_key", format!("`{key}`"), "1 to 255 characters, e.g. orders.* or #")?;
        }
        in_range("max_concurrency", self.max_concurrency, 1, 1000)?;
        let max = self.max_concurrency;
        let min_ok = (1..=max).contains(&self.min_slots);
        ensure(min_ok, "min_slots", self.min_slots, format!("1 to max_concurrency ({max})"))?;
        let ms = Duration::from_millis;
        in_range("drain_target", self.drain_target, ms(100), ms(3_600_000))?;
        in_range("scale_down_after", self.scale_down_after, ms(100), ms(86_400_000))?;
        self.settings.validate()
    }
}

/// serde's `flatten` refuses an unknown key without naming the known ones;
/// this adds them (the keys a default table serializes to).
fn with_known_keys<E: serde::de::Error, T: Serialize + Default>(e: E, table: &str) -> E {
    let message = e.to_string();
    let message = message.trim_end();
    if !message.starts_with("unknown field") || message.contains("expected") {
        return e;
    }
    let keys = serde_json::to_value(T::default())
        .ok()
        .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()))
        .unwrap_or_default();
    E::custom(format!("{message}; a {table} takes {}", keys.join(", ")))
}

/// `remote = "Self"` above derives these as inherent functions, so that
/// the trait impls can add the known keys to an unknown-key error.
macro_rules! strict_table {
    ($type:ty, $table:literal) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                <$type>::serialize(self, s)
            }
        }
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <$type>::deserialize(d).map_err(|e| with_known_keys::<_, $type>(e, $table))
            }
        }
    };
}
strict_table!(StreamConfig, "stream");
strict_table!(SubscriptionConfig, "subscription");

/// What a handoff may take beyond the in-flight batch: the last checkpoint
/// and the release confirmation.
const HANDOFF_GRACE: Duration = Duration::from_secs(10);

impl ConfigFile for Config {
    fn overrides(&mut self) -> Overrides<'_> {
        Overrides {
            coordinator: None,
            kafka_brokers: &mut self.kafka_brokers,
            amqp_url: &mut self.amqp_url,
            auth_token: &mut self.auth_token,
            store: Some(&mut self.store),
            role_tokens: Some((&mut self.worker_token, &mut self.viewer_token)),
            advertise_url: Some(&mut self.advertise_url),
        }
    }

    /// Checks every field's range, each table by itself, then what spans
    /// tables (names listed once, subscriptions' topics).
    fn validate(&self) -> Result<(), Invalid> {
        self.validate_timing()?;
        self.validate_security()?;
        self.store.check()?;
        if let Store::Postgres(url) = &self.store {
            // The driver's own parser: what it refuses at start is refused here.
            url.parse::<tokio_postgres::Config>().map_err(|e| {
                let shown = format!("`{}`", shardline_config::mask_password(url));
                // The driver's message is generic; its source names the part.
                let why =
                    std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| format!("{e}: {s}"));
                Invalid::new("store", shown, format!("a PostgreSQL URL the driver accepts ({why})"))
            })?;
        }
        if let Some(url) = &self.advertise_url {
            let ok = url.starts_with("http://") || url.starts_with("https://");
            ensure(ok, "advertise_url", format!("`{url}`"), "an http:// or https:// URL clients can reach")?;
        }
        if self.streams.iter().any(|s| s.partitions.is_none()) {
            check_brokers(&self.kafka_brokers)?;
        }
        self.kafka.check()?;
        check_amqp_tls(&self.amqp_url, self.amqp_tls.as_ref())?;
        for (i, s) in self.streams.iter().enumerate() {
            s.validate().map_err(|e| e.under(&format!("streams[{i}]")))?;
        }
        listed_once("streams", self.streams.iter().map(|s| &s.name))?;
        validate_balancer(&self.balancer).map_err(|e| e.under("balancer"))?;
        for (i, t) in self.topics.iter().enumerate() {
            check_name(&format!("topics[{i}].name"), &t.name)?;
        }
        listed_once("topics", self.topics.iter().map(|t| &t.name))?;
        let topics: BTreeMap<&str, TopicKind> =
            self.topics.iter().map(|t| (t.name.as_str(), t.kind)).collect();
        if !self.subscriptions.is_empty() {
            check_amqp_url(&self.amqp_url)?;
        }
        for (i, s) in self.subscriptions.iter().enumerate() {
            let at = format!("subscriptions[{i}]");
            s.validate(&topics).map_err(|e| e.under(&at))?;
            let not_topic = !topics.contains_key(s.name.as_str());
            ensure(
                not_topic,
                &format!("{at}.name"),
                format!("`{}`, also a topic", s.name),
                "a name no topic has",
            )?;
        }
        listed_once("subscriptions", self.subscriptions.iter().map(|s| &s.name))
    }
}

impl Config {
    /// The tokens each role is given, read from their files. Checked by
    /// `validate`, so after a successful load this fails only if a file
    /// changed in between.
    pub fn tokens(&self) -> Result<Tokens, Invalid> {
        let one = |name: &str,
                   inline: &Option<String>,
                   file: &Option<PathBuf>|
         -> Result<Option<String>, Invalid> {
            match (inline, file) {
                (Some(_), Some(_)) => Err(Invalid::new(
                    format!("{name}_file"),
                    format!("set as well as `{name}`"),
                    format!("one of `{name}` and `{name}_file`"),
                )),
                (Some(token), None) => {
                    ensure(!token.is_empty(), name, "empty", "a non-empty token")?;
                    Ok(Some(token.clone()))
                }
                (None, Some(path)) => read_secret(&format!("{name}_file"), path).map(Some),
                (None, None) => Ok(None),
            }
        };
        let tokens = Tokens {
            admin: one("auth_token", &self.auth_token, &self.auth_token_file)?,
            worker: one("worker_token", &self.worker_token, &self.worker_token_file)?,
            viewer: one("viewer_token", &self.viewer_token, &self.viewer_token_file)?,
        };
        for (name, token) in [
            ("auth_token", &tokens.admin),
            ("worker_token", &tokens.worker),
            ("viewer_token", &tokens.viewer),
        ] {
            let visible = token.as_deref().is_none_or(|t| t.bytes().all(|b| b.is_ascii_graphic()));
            ensure(
                visible,
                name,
                "a token with spaces or control characters",
                "visible ASCII (what an HTTP header carries)",
            )?;
        }
        let mut given: Vec<&String> =
            [&tokens.admin, &tokens.worker, &tokens.viewer].into_iter().flatten().collect();
        given.sort();
        let distinct = given.windows(2).all(|w| w[0] != w[1]);
        ensure(distinct, "worker_token", "the same as another role's token", "a token of its own per role")?;
        Ok(tokens)
    }

    /// TLS files readable; off loopback, credentials and TLS (or an
    /// explicit `insecure`).
    fn validate_security(&self) -> Result<(), Invalid> {
        if let Some(tls) = &self.tls {
            tls.check().map_err(|e| e.under("tls"))?;
        }
        let tokens = self.tokens()?;
        if self.listen.ip().is_loopback() {
            return Ok(());
        }
        let mutual = self.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        let why = format!(
            "a credential, required because listen ({}) is not a loopback address: auth_token_file, \
             worker_token_file, viewer_token_file (or the tokens, or SHARDLINE_TOKEN, SHARDLINE_WORKER_TOKEN, \
             SHARDLINE_VIEWER_TOKEN), or tls.client_ca",
            self.listen
        );
        ensure(!tokens.is_empty() || mutual, "auth_token", "unset", why)?;
        let why = format!(
            "a [tls] table (cert, key), required because listen ({}) is not a loopback address; or \
             insecure = true to serve plaintext (only behind a TLS-terminating proxy or an encrypting mesh)",
            self.listen
        );
        ensure(self.tls.is_some() || self.insecure, "tls", "unset", why)
    }

    fn validate_timing(&self) -> Result<(), Invalid> {
        let ms = Duration::from_millis;
        in_range("heartbeat_interval", self.heartbeat_interval, ms(50), ms(60_000))?;
        in_range("session_timeout", self.session_timeout, ms(200), ms(600_000))?;
        if let Some(handoff) = self.handoff_timeout {
            in_range("handoff_timeout", handoff, ms(100), ms(3_600_000))?;
            if let Some((field, longest)) = self.longest_handler_timeout() {
                let allowed = format!(
                    "longer than the longest handler_timeout ({longest:?}, {field}), so a draining lease can \
                     finish its batch; or leave it unset for {:?}",
                    longest + HANDOFF_GRACE
                );
                ensure(handoff > longest, "handoff_timeout", format!("{handoff:?}"), allowed)?;
            }
        }
        in_range("discovery_interval", self.discovery_interval, ms(100), ms(3_600_000))?;
        let (session, heartbeat) = (self.session_timeout, self.heartbeat_interval);
        let twice = format!("at least twice heartbeat_interval ({heartbeat:?})");
        ensure(session >= heartbeat * 2, "session_timeout", format!("{session:?}"), twice)?;
        let leadership = self.leadership_timeout;
        in_range("leadership_timeout", leadership, ms(200), ms(60_000))?;
        if matches!(self.store, Store::Postgres(_)) {
            let most = shardline_proto::timing::max_leadership_timeout(session, heartbeat);
            let allowed = format!(
                "at most {most:?}: half the time workers wait for an acknowledged heartbeat before fencing \
                 themselves (session_timeout {session:?}, heartbeat_interval {heartbeat:?}), so they find a new \
                 leader in time; raise session_timeout or lower leadership_timeout"
            );
            ensure(leadership <= most, "leadership_timeout", format!("{leadership:?}"), allowed)?;
        }
        in_range(
            "consumer_group_commit_interval",
            self.consumer_group_commit_interval,
            ms(100),
            ms(3_600_000),
        )?;
        in_range("scale_interval", self.scale_interval, ms(100), ms(60_000))
    }

    /// The configured `handoff_timeout`, or by default 30 s, or the longest
    /// `handler_timeout` plus 10 s where that is longer: a release must be
    /// able to finish the batch in flight (the handler default, 60 s, makes
    /// it 70 s).
    pub fn handoff_timeout(&self) -> Duration {
        self.handoff_timeout.unwrap_or_else(|| {
            let longest = self.longest_handler_timeout().map_or(Duration::ZERO, |(_, t)| t);
            Duration::from_secs(30).max(longest + HANDOFF_GRACE)
        })
    }

    /// The longest `handler_timeout` of any mapping, and where it is set.
    fn longest_handler_timeout(&self) -> Option<(String, Duration)> {
        let streams = self.streams.iter().enumerate().map(|(i, s)| (format!("streams[{i}]"), &s.settings));
        let subs =
            self.subscriptions.iter().enumerate().map(|(i, s)| (format!("subscriptions[{i}]"), &s.settings));
        streams
            .chain(subs)
            .max_by_key(|(_, m)| m.handler_timeout)
            .map(|(at, m)| (format!("{at}.handler_timeout"), m.handler_timeout))
    }

    /// The mapping of a lease's stream or subscription, if configured.
    pub fn mapping(&self, lease: &LeaseId) -> Option<Mapping> {
        match lease.kind {
            LeaseKind::Shard => self.streams.iter().find(|s| s.name == lease.name).map(StreamConfig::mapping),
            LeaseKind::QueueSlot => self
                .subscriptions
                .iter()
                .find(|s| s.name == lease.name)
                .map(|s| s.settings.mapping(&s.handler)),
        }
    }

    pub fn core(&self) -> CoreConfig {
        CoreConfig {
            session_timeout: self.session_timeout,
            handoff_timeout: self.handoff_timeout(),
            balancer: self.balancer,
        }
    }
}

/// `[balancer]`'s ranges; fields are named relative to it.
fn validate_balancer(b: &Balancer) -> Result<(), Invalid> {
    let frac = |field: &str, v: f64, lo: f64, hi: f64| {
        ensure((lo..=hi).contains(&v), field, v, format!("{lo} to {hi}"))
    };
    frac("threshold", b.threshold, 0.05, 5.0)?;
    frac("min_utilisation", b.min_utilisation, 0.0, 1.0)?;
    frac("ema_alpha", b.ema_alpha, 0.01, 1.0)?;
    frac("target_utilisation", b.target_utilisation, 0.05, 1.0)?;
    in_range("max_moves", b.max_moves, 1, 1000)?;
    let ms = Duration::from_millis;
    in_range("stable_for", b.stable_for, ms(0), ms(3_600_000))?;
    in_range("cooldown", b.cooldown, ms(0), ms(3_600_000))?;
    in_range("backlog_drain", b.backlog_drain, ms(1000), ms(3_600_000))?;
    in_range("settle", b.settle, ms(0), ms(600_000))?;
    in_range("join_window", b.join_window, ms(0), ms(60_000))
}

/// Each name at most once in its list (`streams[1].name` repeats
/// `streams[0].name`).
fn listed_once<'a>(list: &str, names: impl Iterator<Item = &'a String>) -> Result<(), Invalid> {
    let mut seen = BTreeSet::new();
    for (i, name) in names.enumerate() {
        ensure(
            seen.insert(name),
            &format!("{list}[{i}].name"),
            format!("`{name}`, listed twice"),
            "each name once",
        )?;
    }
    Ok(())
}

fn or_none(names: &[&str]) -> String {
    if names.is_empty() { "none are configured".into() } else { names.join(", ") }
}

/// Names end up in lease ids (`name/3`, `name#0`), Kafka topics and AMQP
/// queues: keep them to characters all three accept.
fn check_name(field: &str, name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let value = if name.is_empty() { "empty".to_owned() } else { format!("`{name}`") };
    ensure(ok, field, value, "1 to 200 of A-Z a-z 0-9 . _ -")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_design() {
        let c = Config::parse("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.session_timeout, Duration::from_secs(10));
        assert_eq!(c.handoff_timeout(), Duration::from_secs(30));
        let one =
            Config::parse("[[streams]]\nname = \"s\"\nhandler = \"h\"\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            one.handoff_timeout(),
            Duration::from_secs(70),
            "the default handler_timeout (60 s) + 10 s"
        );
        assert_eq!(c.heartbeat_interval, Duration::from_secs(1));
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn the_function_example_configs_are_valid() {
        for text in [
            include_str!("../../examples/functions/python/coordinator.toml"),
            include_str!("../../examples/functions/node/coordinator.toml"),
        ] {
            let c = Config::parse(text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(c.validate(), Ok(()));
            assert!(c.streams.iter().all(|s| s.settings.report_item_failures));
        }
    }

    /// examples/uploads: one fanout topic, one subscription that reports
    /// item failures (poison uploads fail alone) and gives up after a few
    /// retries into its dead-letter queue.
    #[test]
    fn the_uploads_example_config_is_valid() {
        let c = Config::parse(include_str!("../../examples/uploads/coordinator.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.validate(), Ok(()));
        assert!(c.streams.is_empty());
        assert_eq!(
            c.topics.iter().map(|t| (t.name.as_str(), t.kind)).collect::<Vec<_>>(),
            [("uploads", TopicKind::Fanout)]
        );
        let [s] = c.subscriptions.as_slice() else { panic!("one subscription: {:?}", c.subscriptions) };
        assert_eq!((s.topic.as_str(), s.handler.as_str()), ("uploads", "uploads"));
        assert!(s.settings.report_item_failures);
        assert_eq!(s.settings.max_retries, Some(2));
        let round = Config::parse(&toml::to_string(&c).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(round.subscriptions.len(), 1);
    }

    /// The configs of the examples that are packages of their own
    /// (`examples/*/coordinator.toml`), as the coordinator reads them.
    #[test]
    fn the_application_example_configs_are_valid() {
        let c = Config::parse(include_str!("../../examples/materialized-view/coordinator.toml"))
            .unwrap_or_else(|e| panic!("materialized-view: {e}"));
        assert_eq!(c.validate(), Ok(()));
        let s = c.streams.first().unwrap_or_else(|| panic!("materialized-view: no stream"));
        assert_eq!((s.handler.as_str(), s.parallelization_factor), ("materialized-view", 1));
        let c = Config::parse(include_str!("../../examples/fanout/coordinator.toml"))
            .unwrap_or_else(|e| panic!("fanout: {e}"));
        assert_eq!(c.validate(), Ok(()));
        let policy = |name: &str| {
            let s = c.subscriptions.iter().find(|s| s.name == name);
            s.map(|s| (s.topic.as_str(), s.settings.max_retries, s.settings.report_item_failures))
        };
        assert_eq!(policy("audit"), Some(("notifications", None, false)), "audit never gives up");
        assert_eq!(policy("notify"), Some(("notifications", Some(2), true)));
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c =
            Config::parse(include_str!("../../examples/coordinator.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.streams.len(), 1);
        assert_eq!(c.subscriptions.first().map(|s| (s.min_slots, s.max_concurrency)), Some((1, 10)));
    }

    #[test]
    fn bad_values_name_the_field_and_the_range() {
        let bad = |text: &str| Config::parse(text).map(|c| c.validate());
        assert_eq!(
            bad("session_timeout = \"50ms\""),
            Ok(Err(Invalid::new("session_timeout", "50ms", "200ms to 600s")))
        );
        let e = bad("[[streams]]\nname = \"a b\"\nhandler = \"log\"");
        assert!(matches!(e, Ok(Err(Invalid { field: f, .. })) if f == "streams[0].name"));
        let e = bad("listen = \"0.0.0.0:7400\"");
        assert!(matches!(e, Ok(Err(Invalid { field: f, .. })) if f == "auth_token"));
        let sub = |extra: &str| {
            bad(&format!(
                "[[topics]]\nname = \"t\"\n[[subscriptions]]\nname = \"q\"\ntopic = \"t\"\nhandler = \"h\"\n{extra}"
            ))
        };
        assert!(matches!(sub(""), Ok(Ok(()))), "{:?}", sub(""));
        for (extra, field) in [
            ("min_slots = 0", "subscriptions[0].min_slots"),
            ("min_slots = 5\nmax_concurrency = 4", "subscriptions[0].min_slots"),
            ("max_concurrency = 1001", "subscriptions[0].max_concurrency"),
            ("binding_key = \"a.*\"", "subscriptions[0].binding_key"),
            ("batch_size = 0", "subscriptions[0].batch_size"),
            ("drain_target = \"1ms\"", "subscriptions[0].drain_target"),
        ] {
            assert!(
                matches!(sub(extra), Ok(Err(Invalid { field: f, .. })) if f == field),
                "{extra}: {:?}",
                sub(extra)
            );
        }
        let e = bad("[[subscriptions]]\nname = \"q\"\ntopic = \"nope\"\nhandler = \"h\"");
        assert!(
            matches!(e, Ok(Err(Invalid { field, value, .. })) if field == "subscriptions[0].topic" && value.contains("not under [[topics]]"))
        );
        let typo = Config::parse(
            "[[topics]]\nname = \"t\"\n[[subscriptions]]\nname = \"q\"\ntopic = \"t\"\nhandler = \"h\"\nmax_concurency = 3",
        );
        let typo = typo.map_err(|e| e.to_string());
        assert!(
            typo.as_ref().is_err_and(|e| e.contains("unknown field `max_concurency`") && e.contains("max_concurrency")),
            "{typo:?}"
        );
        // What only streams take is not a key of a subscription at all.
        for key in
            ["on_failure = \"x\"", "parallelization_factor = 2", "starting_position = \"trim_horizon\""]
        {
            let e = sub(key).map_err(|e| e.to_string());
            let name = key.split(' ').next().unwrap_or_default();
            assert!(
                e.as_ref().is_err_and(|e| e.contains(&format!("unknown field `{name}`"))),
                "{key}: {e:?}"
            );
        }
        let stream = |extra: &str| bad(&format!("[[streams]]\nname = \"s\"\nhandler = \"h\"\n{extra}"));
        assert!(
            matches!(stream("batch_size = 0"), Ok(Err(Invalid { field: f, .. })) if f == "streams[0].batch_size")
        );
        assert!(
            matches!(stream("batch_window = \"301s\""), Ok(Err(Invalid { field: f, .. })) if f == "streams[0].batch_window")
        );
        let e = stream("starting_position = \"at_timestamp\"");
        assert!(matches!(e, Ok(Err(Invalid { field: f, .. })) if f == "streams[0].starting_timestamp"));
        let ok =
            stream("starting_position = \"at_timestamp\"\nstarting_timestamp = \"2026-11-27T10:00:00Z\"");
        assert!(matches!(ok, Ok(Ok(()))), "{ok:?}");
        assert!(
            Config::parse("[[streams]]\nname = \"s\"\nhandler = \"h\"\nstarting_position = \"oldest\"")
                .is_err()
        );
        for (extra, field) in [
            ("max_retries = 10001", "streams[0].max_retries"),
            ("max_record_age = \"5s\"", "streams[0].max_record_age"),
            ("parallelization_factor = 11", "streams[0].parallelization_factor"),
            ("handler_timeout = \"0s\"", "streams[0].handler_timeout"),
            ("on_failure = \"s\"", "streams[0].on_failure"),
            ("retry_backoff = { initial = \"2s\", max = \"1s\" }", "streams[0].retry_backoff"),
            ("filter = { field = \"a\", exists = true, prefix = \"x\" }", "streams[0].filter"),
            ("filter = { field = \"a..b\", exists = true }", "streams[0].filter.field"),
        ] {
            assert!(
                matches!(stream(extra), Ok(Err(Invalid { field: f, .. })) if f == field),
                "{extra}: {:?}",
                stream(extra)
            );
        }
        let full = stream(
            "max_retries = 3\nbisect_on_error = true\nreport_item_failures = true\nmax_record_age = \"1h\"\n\
             on_failure = \"dlq\"\nparallelization_factor = 4\nhandler_timeout = \"5s\"\n\
             retry_backoff = { initial = \"10ms\", max = \"1s\", multiplier = 3.0, jitter = false }\n\
             filter = { field = \"kind\", equals = \"order\" }",
        );
        assert!(matches!(full, Ok(Ok(()))), "{full:?}");
        // -1 is "until the records expire"; other negatives name the key.
        let forever = Config::parse("[[streams]]\nname = \"s\"\nhandler = \"h\"\nmax_retries = -1");
        assert!(forever.is_ok_and(|c| c.streams[0].settings.max_retries.is_none()));
        let e = stream("max_retries = -2").map_err(|e| e.to_string());
        assert!(e.as_ref().is_err_and(|e| e.contains("`max_retries` is -2; allowed: -1")), "{e:?}");
        for (value, ok) in [("\"0s\"", false), ("\"999ms\"", false), ("\"1s\"", true), ("\"2h\"", false)] {
            let e = bad(&format!("[balancer]\nbacklog_drain = {value}"));
            if ok {
                assert!(matches!(e, Ok(Ok(()))), "{value}: {e:?}");
            } else {
                assert!(
                    matches!(&e, Ok(Err(Invalid { field, allowed, .. })) if field == "balancer.backlog_drain" && allowed == "1s to 3600s"),
                    "{value}: {e:?}"
                );
            }
        }
        let unknown = Config::parse("sesion_timeout = \"1s\"");
        assert!(unknown.is_err_and(|e| e.to_string().contains("unknown field `sesion_timeout`")));
    }

    /// Every default lives in one place: a config that sets nothing gives
    /// the wire types' mapping and the core's balancer and session.
    #[test]
    fn defaults_have_one_home() {
        let c = Config {
            streams: vec![StreamConfig::new("s", "h")],
            topics: vec![TopicConfig { name: "t".into(), kind: TopicKind::Fanout }],
            subscriptions: vec![SubscriptionConfig::new("q", "t", "h")],
            ..Config::default()
        };
        assert_eq!(c.mapping(&LeaseId::shard("s", 0)), Some(Mapping::new("h")));
        assert_eq!(c.mapping(&LeaseId::slot("q", 0)), Some(Mapping::new("h")));
        assert_eq!(c.core().balancer, Balancer::default());
        assert_eq!(c.balancer.strategy, crate::core::Strategy::Load, "README: `load` is the default");
        assert_eq!(c.session_timeout, CoreConfig::default().session_timeout);
        let parsed = Config::parse(
            "[[streams]]\nname = \"s\"\nhandler = \"h\"\n[[topics]]\nname = \"t\"\n\
             [[subscriptions]]\nname = \"q\"\ntopic = \"t\"\nhandler = \"h\"\n",
        );
        assert_eq!(parsed.ok(), Some(c));
    }

    /// Off loopback: a credential and TLS (or `insecure`); tokens from
    /// files, one source each, distinct per role.
    #[test]
    fn security_is_required_off_loopback_and_tokens_come_from_files() -> Result<(), std::io::Error> {
        let dir = tempfile::tempdir()?;
        let token = dir.path().join("admin");
        std::fs::write(&token, "adm-token\n")?;
        let pem = dir.path().join("cert.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n")?;
        let wide = Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 7400)),
            auth_token_file: Some(token.clone()),
            ..Config::default()
        };
        let field = |c: &Config| c.validate().map_err(|e| e.field);
        assert_eq!(field(&wide), Err("tls".into()), "no TLS off loopback");
        assert_eq!(field(&Config { insecure: true, ..wide.clone() }), Ok(()));
        let tls = ServerTls { cert: pem.clone(), key: pem.clone(), client_ca: None };
        assert_eq!(field(&Config { tls: Some(tls.clone()), ..wide.clone() }), Ok(()));
        let missing = ServerTls { key: dir.path().join("absent"), ..tls.clone() };
        assert_eq!(field(&Config { tls: Some(missing), ..wide.clone() }), Err("tls.key".into()));
        // Mutual TLS alone is a credential.
        let mutual = ServerTls { client_ca: Some(pem.clone()), ..tls.clone() };
        let certs_only = Config { tls: Some(mutual), auth_token_file: None, ..wide.clone() };
        assert_eq!(field(&certs_only), Ok(()));
        let nothing = Config { tls: Some(tls), auth_token_file: None, ..wide.clone() };
        assert_eq!(field(&nothing), Err("auth_token".into()));

        let tokens = wide.tokens().map(|t| t.admin);
        assert_eq!(tokens, Ok(Some("adm-token".into())), "the file's newline is not part of the token");
        let both = Config { auth_token: Some("x".into()), ..wide.clone() };
        assert_eq!(field(&both), Err("auth_token_file".into()));
        let same = Config { worker_token: Some("adm-token".into()), insecure: true, ..wide.clone() };
        assert_eq!(field(&same), Err("worker_token".into()), "roles may not share a token");
        let spaced = Config { viewer_token: Some("a b".into()), insecure: true, ..wide.clone() };
        assert_eq!(field(&spaced), Err("viewer_token".into()));
        Ok(())
    }

    /// parse → serialize → parse gives the same value, for the shipped
    /// example and for one that sets what the example leaves out.
    #[test]
    fn configs_round_trip_through_toml() {
        let example =
            Config::parse(include_str!("../../examples/coordinator.toml")).unwrap_or_else(|e| panic!("{e}"));
        let mut full = example.clone();
        full.auth_token = Some("secret".into());
        full.handoff_timeout = Some(Duration::from_secs(90));
        full.balancer.strategy = crate::core::Strategy::Count;
        full.store = Store::Postgres("postgres://u:p@db:5432/shardline?sslmode=require".into());
        full.advertise_url = Some("http://c0:7400".into());
        let mut stream = StreamConfig::new("t", "h");
        stream.partitions = Some(4);
        stream.starting_position = StartingPosition::AtTimestamp;
        stream.starting_timestamp = Some(std::time::UNIX_EPOCH + Duration::from_secs(1_790_000_000));
        stream.on_failure = Some("dlq".into());
        stream.settings.max_retries = Some(3);
        stream.settings.max_record_age = Some(Duration::from_secs(3600));
        stream.settings.filter = Some(FilterConfig {
            field: "a.b".into(),
            equals: Some(toml::Value::Integer(7)),
            exists: None,
            prefix: None,
        });
        full.streams.push(stream);
        full.subscriptions[0].binding_key = Some("a.*".into());
        full.topics[0].kind = TopicKind::Topic;
        for c in [example, full] {
            let text = toml::to_string(&c).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(Config::parse(&text).map_err(|e| e.to_string()), Ok(c), "{text}");
        }
    }

    /// The store is `"sled"` or a PostgreSQL URL (checked by the driver's
    /// own parser, the password masked in the error), and with PostgreSQL
    /// the leader's deadline must leave workers time to find a new leader
    /// before they fence themselves.
    #[test]
    fn the_store_and_the_election_timing_are_checked() {
        let check = |text: &str| Config::parse(text).map(|c| c.validate()).map_err(|e| e.to_string());
        let pg = "store = { postgres = \"postgres://u:secret@db/x\" }\n";
        assert_eq!(check(pg), Ok(Ok(())));
        assert_eq!(check("store = \"sled\""), Ok(Ok(())));
        assert!(check("store = \"mysql\"").is_err(), "an unknown store kind is a parse error");
        let e = check("store = { postgres = \"mysql://u:secret@db/x\" }");
        assert!(
            matches!(&e, Ok(Err(i)) if i.field == "store" && i.value.contains("u:***@db") && !i.value.contains("secret")),
            "{e:?}"
        );
        let e = check("store = { postgres = \"postgres://u:secret@db/x?bogus=1\" }");
        assert!(matches!(&e, Ok(Err(i)) if i.field == "store" && i.allowed.contains("bogus")), "{e:?}");
        // Defaults: fence after 8 s, so at most 4 s.
        let e = check(&format!("{pg}leadership_timeout = \"5s\""));
        assert!(
            matches!(&e, Ok(Err(i)) if i.field == "leadership_timeout" && i.allowed.starts_with("at most 4s")),
            "{e:?}"
        );
        assert_eq!(check(&format!("{pg}leadership_timeout = \"4s\"")), Ok(Ok(())));
        // With sled the election does not run: nothing to check against.
        assert_eq!(check("leadership_timeout = \"5s\""), Ok(Ok(())));
        let e = check("advertise_url = \"c0:7400\"");
        assert!(matches!(&e, Ok(Err(i)) if i.field == "advertise_url"), "{e:?}");
    }

    /// A handoff that cannot outlast the batch in flight would always be
    /// forced (and duplicate that batch): refused, naming the mapping.
    #[test]
    fn handoff_timeout_must_outlast_every_handler_timeout() {
        let with = |handoff: &str| {
            Config::parse(&format!(
                "handoff_timeout = \"{handoff}\"\n[[streams]]\nname = \"a\"\nhandler = \"h\"\nhandler_timeout = \"5s\"\n\
                 [[streams]]\nname = \"b\"\nhandler = \"h\"\nhandler_timeout = \"40s\"\n"
            ))
            .map(|c| c.validate())
        };
        let short = with("30s");
        assert!(
            matches!(&short, Ok(Err(Invalid { field, allowed, .. })) if field == "handoff_timeout" && allowed.contains("streams[1].handler_timeout")),
            "{short:?}"
        );
        assert!(matches!(with("41s"), Ok(Ok(()))));
    }
}
