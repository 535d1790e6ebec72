//! The coordinator's TOML config: parsed strictly (`deny_unknown_fields`)
//! and validated as a whole before anything starts, so a typo is one clear
//! error naming the field and what is allowed, never a half-started fleet.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use shardline_proto::{FailurePolicy, Filter, FilterTest, LeaseId, LeaseKind, Mapping, StartingPosition};

use crate::core::CoreConfig;

/// The whole coordinator config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the gRPC API (worker and admin services).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Address of the Prometheus metrics endpoint; absent: no endpoint.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Where the sled lease store lives.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Shared secret required from every client (`authorization: Bearer
    /// TOKEN`). Required when `listen` is not a loopback address; env
    /// `SHARDLINE_TOKEN` overrides.
    #[serde(default)]
    pub auth_token: Option<String>,
    /// How often workers heartbeat (told to them at registration).
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A worker silent this long is dead; its leases move.
    #[serde(default = "default_session", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// A graceful handoff not confirmed within this is forced. Must be
    /// longer than every mapping's `handler_timeout`, so a draining lease can
    /// finish its in-flight batch; unset: see [`Config::handoff_timeout`].
    #[serde(default, with = "humantime_serde::option")]
    pub handoff_timeout: Option<Duration>,
    /// How often Kafka metadata is re-read to find new partitions.
    #[serde(default = "default_discovery", with = "humantime_serde")]
    pub discovery_interval: Duration,
    /// Kafka bootstrap servers; env `SHARDLINE_KAFKA_BROKERS` overrides.
    #[serde(default = "default_brokers")]
    pub kafka_brokers: String,
    /// Kafka topics whose partitions become leases.
    #[serde(default)]
    pub streams: Vec<StreamConfig>,
    /// RabbitMQ URL (`amqp://` or `amqps://`); env `SHARDLINE_AMQP_URL`
    /// overrides. Used only when subscriptions are configured.
    #[serde(default = "default_amqp_url")]
    pub amqp_url: String,
    /// How often subscription depths are read and slots rescaled.
    #[serde(default = "default_scale_interval", with = "humantime_serde")]
    pub scale_interval: Duration,
    /// Lease placement: `count` or `load` (the default) and its knobs.
    #[serde(default)]
    pub balancer: BalancerConfig,
    /// RabbitMQ exchanges producers publish to.
    #[serde(default)]
    pub topics: Vec<TopicConfig>,
    /// RabbitMQ subscription queues whose slots become leases.
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// A Kafka topic mapped to a handler.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// The Kafka topic.
    pub name: String,
    /// The handler that processes its batches (workers host handlers by name).
    pub handler: String,
    /// A fixed partition count instead of Kafka metadata discovery, for
    /// benchmarks of the coordinator alone. Leave unset in production.
    pub partitions: Option<u32>,
    /// Batching and failure handling.
    pub settings: MappingSettings,
}

/// The fields of `[[streams]]` that are not mapping settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamFields {
    name: String,
    handler: String,
    #[serde(default)]
    partitions: Option<u32>,
}

const STREAM_FIELDS: &[&str] = &["name", "handler", "partitions"];

impl<'de> Deserialize<'de> for StreamConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (own, settings) = split_fields::<D, StreamFields>(d, STREAM_FIELDS, "stream")?;
        Ok(Self { name: own.name, handler: own.handler, partitions: own.partitions, settings })
    }
}

/// Batch and failure settings of a mapping (DESIGN.md "Batches and handler
/// semantics"): the same keys for streams and subscriptions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSettings {
    /// Most records per batch (1..10000).
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Most payload bytes (key + value) per batch (1 KiB..64 MiB).
    #[serde(default = "default_batch_bytes")]
    pub max_batch_bytes: u64,
    /// Wait up to this long to fill a batch (0..300 s).
    #[serde(default, with = "humantime_serde")]
    pub batch_window: Duration,
    /// Where a shard without a checkpoint starts: `latest`, `trim_horizon`
    /// or `at_timestamp` (then `starting_timestamp` is required).
    #[serde(default)]
    pub starting_position: StartingPosition,
    /// RFC 3339 time for `at_timestamp`, e.g. `2026-11-27T10:00:00Z`.
    #[serde(default, with = "humantime_serde::option")]
    pub starting_timestamp: Option<std::time::SystemTime>,
    /// Retries of a failing batch: -1 (until the records expire) or 0..10000.
    #[serde(default = "default_max_retries")]
    pub max_retries: i32,
    /// Backoff between attempts of the same batch.
    #[serde(default)]
    pub retry_backoff: BackoffConfig,
    /// Split a failing batch in two and retry the halves, down to the record.
    #[serde(default)]
    pub bisect_on_error: bool,
    /// The handler's response names failed records (Lambda's
    /// ReportBatchItemFailures); the shard checkpoints before the first.
    #[serde(default)]
    pub report_item_failures: bool,
    /// Older records skip the handler and go to on_failure (60 s..7 days).
    #[serde(default, with = "humantime_serde::option")]
    pub max_record_age: Option<Duration>,
    /// Kafka topic that receives records that gave up; absent: discarded.
    #[serde(default)]
    pub on_failure: Option<String>,
    /// Concurrent batches per shard (1..10); order is kept per record key.
    #[serde(default = "default_parallelization")]
    pub parallelization_factor: u32,
    /// A batch running longer than this fails (1 s..900 s).
    #[serde(default = "default_handler_timeout", with = "humantime_serde")]
    pub handler_timeout: Duration,
    /// Only records whose JSON value passes this reach the handler.
    #[serde(default)]
    pub filter: Option<FilterConfig>,
}

/// Splits one `[[streams]]` / `[[subscriptions]]` table into its own fields
/// and the shared mapping settings, each parsed strictly: serde cannot
/// combine `flatten` with `deny_unknown_fields`, and a typo must be an error.
fn split_fields<'de, D, T>(d: D, own: &[&str], what: &str) -> Result<(T, MappingSettings), D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::Error;
    let table = toml::Table::deserialize(d)?;
    let (mine, rest): (toml::Table, toml::Table) =
        table.into_iter().partition(|(k, _)| own.contains(&k.as_str()));
    let mine = T::deserialize(toml::Value::Table(mine)).map_err(|e| D::Error::custom(e.message()))?;
    let settings = MappingSettings::deserialize(toml::Value::Table(rest))
        .map_err(|e| D::Error::custom(format!("{} (a {what} also takes {})", e.message(), own.join(", "))))?;
    Ok((mine, settings))
}

/// Exponential backoff between attempts of a failing batch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub initial: Duration,
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub max: Duration,
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    #[serde(default = "default_true")]
    pub jitter: bool,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self { initial: default_retry_initial(), max: default_retry_max(), multiplier: 2.0, jitter: true }
    }
}

/// A test on one field of the record's JSON value: exactly one of
/// `equals`, `exists`, `prefix`.
#[derive(Debug, Clone, Deserialize)]
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

impl MappingSettings {
    /// The mapping workers receive with every acquire of a lease.
    pub fn mapping(&self, handler: &str) -> Mapping {
        let starting_timestamp_ms = self
            .starting_timestamp
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        Mapping {
            handler: handler.to_owned(),
            batch_size: self.batch_size,
            max_batch_bytes: self.max_batch_bytes,
            batch_window: self.batch_window,
            starting_position: self.starting_position,
            starting_timestamp_ms,
            policy: FailurePolicy {
                max_retries: u32::try_from(self.max_retries).ok(),
                retry_initial: self.retry_backoff.initial,
                retry_max: self.retry_backoff.max,
                retry_multiplier: self.retry_backoff.multiplier,
                retry_jitter: self.retry_backoff.jitter,
                bisect_on_error: self.bisect_on_error,
                report_item_failures: self.report_item_failures,
                max_record_age: self.max_record_age,
                on_failure: self.on_failure.clone(),
                handler_timeout: self.handler_timeout,
            },
            parallelization_factor: self.parallelization_factor,
            filter: self.filter.as_ref().and_then(FilterConfig::to_filter),
        }
    }
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
}

/// `[balancer]`: how leases are placed (DESIGN.md "placement").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerConfig {
    /// `load` (counts as far as load allows, and moves off drowning
    /// workers) or `count` (lease counts within one).
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// A worker above the fleet's mean utilisation × (1 + threshold) is
    /// overloaded (0.05..5).
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Below this utilisation no worker counts as overloaded (0..1).
    #[serde(default = "default_min_utilisation")]
    pub min_utilisation: f64,
    /// Most leases one plan moves (1..1000).
    #[serde(default = "default_max_moves")]
    pub max_moves: usize,
    /// Overloaded this long before a plan.
    #[serde(default = "default_stable_for", with = "humantime_serde")]
    pub stable_for: Duration,
    /// No plan this long after the last.
    #[serde(default = "default_cooldown", with = "humantime_serde")]
    pub cooldown: Duration,
    /// A moved lease's reports are ignored this long.
    #[serde(default = "default_settle", with = "humantime_serde")]
    pub settle: Duration,
    /// Weight of the newest report in the moving average (0.01..1).
    #[serde(default = "default_ema_alpha")]
    pub ema_alpha: f64,
    /// The utilisation `shardline_desired_workers` plans for (0.05..1).
    #[serde(default = "default_target_utilisation")]
    pub target_utilisation: f64,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            strategy: default_strategy(),
            threshold: default_threshold(),
            min_utilisation: default_min_utilisation(),
            max_moves: default_max_moves(),
            stable_for: default_stable_for(),
            cooldown: default_cooldown(),
            settle: default_settle(),
            ema_alpha: default_ema_alpha(),
            target_utilisation: default_target_utilisation(),
        }
    }
}

fn default_strategy() -> String {
    "load".into()
}
fn default_threshold() -> f64 {
    0.2
}
fn default_min_utilisation() -> f64 {
    0.5
}
fn default_max_moves() -> usize {
    8
}
fn default_stable_for() -> Duration {
    Duration::from_secs(5)
}
fn default_cooldown() -> Duration {
    Duration::from_secs(10)
}
fn default_settle() -> Duration {
    Duration::from_secs(3)
}
fn default_ema_alpha() -> f64 {
    0.3
}
fn default_target_utilisation() -> f64 {
    0.7
}

/// A RabbitMQ topic: the exchange producers publish to (SNS topic).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// The exchange name.
    pub name: String,
    /// `fanout` (every subscription gets every message) or `topic`
    /// (subscriptions choose by `binding_key`).
    #[serde(default)]
    pub kind: TopicKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopicKind {
    #[default]
    Fanout,
    Topic,
}

/// The queue type of a subscription and its retry and dead-letter queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    /// Quorum where the broker supports them (RabbitMQ 3.8+), else classic.
    #[default]
    Auto,
    Quorum,
    Classic,
}

/// A RabbitMQ subscription: a durable queue bound to a topic (SQS queue
/// subscribed to SNS), consumed through 1..N queue slots.
#[derive(Debug, Clone)]
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
    pub drain_target: Duration,
    /// Remove one slot after the queue has been idle this long.
    pub scale_down_after: Duration,
    /// Batching and failure handling (no `on_failure`: records that give up
    /// go to the subscription's dead-letter queue).
    pub settings: MappingSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionFields {
    name: String,
    topic: String,
    handler: String,
    #[serde(default)]
    binding_key: Option<String>,
    #[serde(default)]
    queue_type: QueueType,
    #[serde(default = "default_min_slots")]
    min_slots: u32,
    #[serde(default = "default_max_concurrency")]
    max_concurrency: u32,
    #[serde(default = "default_drain_target", with = "humantime_serde")]
    drain_target: Duration,
    #[serde(default = "default_scale_down_after", with = "humantime_serde")]
    scale_down_after: Duration,
}

const SUBSCRIPTION_FIELDS: &[&str] = &[
    "name",
    "topic",
    "handler",
    "binding_key",
    "queue_type",
    "min_slots",
    "max_concurrency",
    "drain_target",
    "scale_down_after",
];

impl<'de> Deserialize<'de> for SubscriptionConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (own, settings) = split_fields::<D, SubscriptionFields>(d, SUBSCRIPTION_FIELDS, "subscription")?;
        Ok(Self {
            name: own.name,
            topic: own.topic,
            handler: own.handler,
            binding_key: own.binding_key,
            queue_type: own.queue_type,
            min_slots: own.min_slots,
            max_concurrency: own.max_concurrency,
            drain_target: own.drain_target,
            scale_down_after: own.scale_down_after,
            settings,
        })
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7400))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./shardline-data")
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(1)
}
fn default_session() -> Duration {
    Duration::from_secs(10)
}
/// What a handoff may take beyond the in-flight batch: the last checkpoint
/// and the release confirmation.
const HANDOFF_GRACE: Duration = Duration::from_secs(10);
fn default_discovery() -> Duration {
    Duration::from_secs(10)
}
fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn default_min_slots() -> u32 {
    1
}
fn default_max_concurrency() -> u32 {
    10
}
fn default_drain_target() -> Duration {
    Duration::from_secs(10)
}
fn default_scale_down_after() -> Duration {
    Duration::from_secs(60)
}
fn default_scale_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_amqp_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".into()
}
fn default_max_retries() -> i32 {
    -1
}
fn default_retry_initial() -> Duration {
    Duration::from_millis(100)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(30)
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_true() -> bool {
    true
}
fn default_parallelization() -> u32 {
    1
}
fn default_handler_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_batch_size() -> u32 {
    100
}
fn default_batch_bytes() -> u64 {
    6 * 1024 * 1024
}

/// A config that cannot be used; the message names the field and the
/// allowed values.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: `{field}` {problem}")]
    Invalid { path: PathBuf, field: String, problem: String },
}

impl Config {
    /// Reads, parses and validates a config file, applying env overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config =
            Self::parse(&text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })?;
        if let Ok(brokers) = std::env::var("SHARDLINE_KAFKA_BROKERS")
            && !brokers.is_empty()
        {
            config.kafka_brokers = brokers;
        }
        if let Ok(url) = std::env::var("SHARDLINE_AMQP_URL")
            && !url.is_empty()
        {
            config.amqp_url = url;
        }
        if let Ok(token) = std::env::var("SHARDLINE_TOKEN")
            && !token.is_empty()
        {
            config.auth_token = Some(token);
        }
        config.validate().map_err(|(field, problem)| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            problem,
        })?;
        Ok(config)
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

    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks every field's range; the error is `(field, what is allowed)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |field: &str, problem: String| Err((field.to_owned(), problem));
        let range = |field: &str, value: Duration, min: Duration, max: Duration| {
            if value < min || value > max {
                err(field, format!("is {value:?}; allowed: {min:?} to {max:?}"))
            } else {
                Ok(())
            }
        };
        let ms = Duration::from_millis;
        range("heartbeat_interval", self.heartbeat_interval, ms(50), ms(60_000))?;
        range("session_timeout", self.session_timeout, ms(200), ms(600_000))?;
        if let Some(handoff) = self.handoff_timeout {
            range("handoff_timeout", handoff, ms(100), ms(3_600_000))?;
            if let Some((field, longest)) = self.longest_handler_timeout()
                && handoff <= longest
            {
                return err(
                    "handoff_timeout",
                    format!(
                        "is {handoff:?}; allowed: longer than the longest handler_timeout ({longest:?}, {field}), \
                         so a draining lease can finish its batch; or leave it unset for {:?}",
                        longest + HANDOFF_GRACE
                    ),
                );
            }
        }
        range("discovery_interval", self.discovery_interval, ms(100), ms(3_600_000))?;
        if self.session_timeout < self.heartbeat_interval * 2 {
            return err(
                "session_timeout",
                format!(
                    "is {:?}; allowed: at least twice heartbeat_interval ({:?})",
                    self.session_timeout, self.heartbeat_interval
                ),
            );
        }
        if !self.listen.ip().is_loopback() && self.auth_token.as_deref().is_none_or(str::is_empty) {
            return err(
                "auth_token",
                format!(
                    "is required because listen ({}) is not a loopback address; set it or SHARDLINE_TOKEN",
                    self.listen
                ),
            );
        }
        if self.kafka_brokers.trim().is_empty() && self.streams.iter().any(|s| s.partitions.is_none()) {
            return err("kafka_brokers", "is empty; allowed: host:port[,host:port...]".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, s) in self.streams.iter().enumerate() {
            check_name(&format!("streams[{i}].name"), &s.name)?;
            check_name(&format!("streams[{i}].handler"), &s.handler)?;
            if s.partitions == Some(0) || s.partitions.is_some_and(|p| p > 100_000) {
                return err(&format!("streams[{i}].partitions"), "allowed: 1 to 100000".into());
            }
            validate_settings(&format!("streams[{i}]"), &s.settings)?;
            if s.settings.on_failure.as_ref() == Some(&s.name) {
                return err(
                    &format!("streams[{i}].on_failure"),
                    "is the stream itself; allowed: another topic".into(),
                );
            }
            if !names.insert(("stream", s.name.clone())) {
                return err(&format!("streams[{i}].name"), format!("`{}` is listed twice", s.name));
            }
        }
        range("scale_interval", self.scale_interval, ms(100), ms(60_000))?;
        let b = &self.balancer;
        if b.strategy != "load" && b.strategy != "count" {
            return err("balancer.strategy", format!("is `{}`; allowed: load, count", b.strategy));
        }
        let frac = |field: &str, v: f64, lo: f64, hi: f64| {
            if (lo..=hi).contains(&v) { Ok(()) } else { err(field, format!("is {v}; allowed: {lo} to {hi}")) }
        };
        frac("balancer.threshold", b.threshold, 0.05, 5.0)?;
        frac("balancer.min_utilisation", b.min_utilisation, 0.0, 1.0)?;
        frac("balancer.ema_alpha", b.ema_alpha, 0.01, 1.0)?;
        frac("balancer.target_utilisation", b.target_utilisation, 0.05, 1.0)?;
        if !(1..=1000).contains(&b.max_moves) {
            return err("balancer.max_moves", format!("is {}; allowed: 1 to 1000", b.max_moves));
        }
        range("balancer.stable_for", b.stable_for, ms(0), ms(3_600_000))?;
        range("balancer.cooldown", b.cooldown, ms(0), ms(3_600_000))?;
        range("balancer.settle", b.settle, ms(0), ms(600_000))?;
        let mut topics = std::collections::BTreeMap::new();
        for (i, t) in self.topics.iter().enumerate() {
            check_name(&format!("topics[{i}].name"), &t.name)?;
            if topics.insert(t.name.clone(), t.kind).is_some() {
                return err(&format!("topics[{i}].name"), format!("`{}` is listed twice", t.name));
            }
        }
        if !self.subscriptions.is_empty()
            && !self.amqp_url.starts_with("amqp://")
            && !self.amqp_url.starts_with("amqps://")
        {
            return err("amqp_url", "allowed: amqp://USER:PASS@HOST:PORT/VHOST or amqps://...".into());
        }
        for (i, s) in self.subscriptions.iter().enumerate() {
            let field = |f: &str| format!("subscriptions[{i}].{f}");
            check_name(&field("name"), &s.name)?;
            check_name(&field("handler"), &s.handler)?;
            let Some(kind) = topics.get(&s.topic) else {
                let known: Vec<&str> = topics.keys().map(String::as_str).collect();
                return err(
                    &field("topic"),
                    format!("is `{}`, which is not under [[topics]]; allowed: {}", s.topic, or_none(&known)),
                );
            };
            match (kind, &s.binding_key) {
                (TopicKind::Fanout, Some(_)) => {
                    return err(
                        &field("binding_key"),
                        format!(
                            "is set, but topic `{}` is a fanout; allowed only with kind = \"topic\"",
                            s.topic
                        ),
                    );
                }
                (_, Some(key)) if key.is_empty() || key.len() > 255 => {
                    return err(
                        &field("binding_key"),
                        "allowed: 1 to 255 characters, e.g. orders.* or #".into(),
                    );
                }
                _ => {}
            }
            if !(1..=1000).contains(&s.max_concurrency) {
                return err(
                    &field("max_concurrency"),
                    format!("is {}; allowed: 1 to 1000", s.max_concurrency),
                );
            }
            if !(1..=s.max_concurrency).contains(&s.min_slots) {
                return err(
                    &field("min_slots"),
                    format!("is {}; allowed: 1 to max_concurrency ({})", s.min_slots, s.max_concurrency),
                );
            }
            range(&field("drain_target"), s.drain_target, ms(100), ms(3_600_000))?;
            range(&field("scale_down_after"), s.scale_down_after, ms(100), ms(86_400_000))?;
            validate_settings(&format!("subscriptions[{i}]"), &s.settings)?;
            let q = &s.settings;
            if q.on_failure.is_some() {
                return err(
                    &field("on_failure"),
                    format!(
                        "is set; records of a subscription that give up go to its dead-letter queue `{}`; allowed: unset",
                        shardline_proto::topology::dead_letter_queue(&s.name)
                    ),
                );
            }
            if q.parallelization_factor != 1 {
                return err(
                    &field("parallelization_factor"),
                    "allowed: 1 (a subscription scales by queue slots: min_slots, max_concurrency)".into(),
                );
            }
            if q.starting_position != StartingPosition::Latest || q.starting_timestamp.is_some() {
                return err(
                    &field("starting_position"),
                    "is set; allowed: unset (a queue has no positions)".into(),
                );
            }
            if !names.insert(("subscription", s.name.clone())) {
                return err(&field("name"), format!("`{}` is listed twice", s.name));
            }
            if topics.contains_key(&s.name) {
                return err(
                    &field("name"),
                    format!("`{}` is also a topic; allowed: a name no topic has", s.name),
                );
            }
        }
        Ok(())
    }

    /// The mapping of a lease's stream or subscription, if configured.
    pub fn mapping(&self, lease: &LeaseId) -> Option<Mapping> {
        match lease.kind {
            LeaseKind::Shard => {
                self.streams.iter().find(|s| s.name == lease.name).map(|s| s.settings.mapping(&s.handler))
            }
            LeaseKind::QueueSlot => self
                .subscriptions
                .iter()
                .find(|s| s.name == lease.name)
                .map(|s| s.settings.mapping(&s.handler)),
        }
    }

    pub fn core(&self) -> CoreConfig {
        let b = &self.balancer;
        let balancer = crate::core::Balancer {
            strategy: if b.strategy == "count" {
                crate::core::Strategy::Count
            } else {
                crate::core::Strategy::Load
            },
            threshold: b.threshold,
            min_utilisation: b.min_utilisation,
            max_moves: b.max_moves,
            stable_for: b.stable_for,
            cooldown: b.cooldown,
            settle: b.settle,
            ema_alpha: b.ema_alpha,
            target_utilisation: b.target_utilisation,
        };
        CoreConfig {
            session_timeout: self.session_timeout,
            handoff_timeout: self.handoff_timeout(),
            balancer,
        }
    }
}

/// Checks the mapping settings shared by streams and subscriptions.
fn validate_settings(prefix: &str, s: &MappingSettings) -> Result<(), (String, String)> {
    let err = |field: &str, problem: String| Err((field.to_owned(), problem));
    let field = |f: &str| format!("{prefix}.{f}");
    if !(1..=10_000).contains(&s.batch_size) {
        return err(&field("batch_size"), format!("is {}; allowed: 1 to 10000", s.batch_size));
    }
    if !(1024..=64 * 1024 * 1024).contains(&s.max_batch_bytes) {
        return err(
            &field("max_batch_bytes"),
            format!("is {}; allowed: 1024 to 67108864 (64 MiB)", s.max_batch_bytes),
        );
    }
    if s.batch_window > Duration::from_secs(300) {
        return err(&field("batch_window"), format!("is {:?}; allowed: 0s to 300s", s.batch_window));
    }
    match (s.starting_position, s.starting_timestamp) {
        (StartingPosition::AtTimestamp, None) => {
            return err(
                &field("starting_timestamp"),
                "is missing; required with starting_position = \"at_timestamp\" (RFC 3339)".into(),
            );
        }
        (StartingPosition::Latest | StartingPosition::TrimHorizon, Some(_)) => {
            return err(
                &field("starting_timestamp"),
                "is set; allowed only with starting_position = \"at_timestamp\"".into(),
            );
        }
        _ => {}
    }
    if !(-1..=10_000).contains(&s.max_retries) {
        return err(
            &field("max_retries"),
            format!("is {}; allowed: -1 (until expired) or 0 to 10000", s.max_retries),
        );
    }
    let b = &s.retry_backoff;
    if b.initial < Duration::from_millis(1) || b.initial > b.max || b.max > Duration::from_secs(900) {
        return err(
            &field("retry_backoff"),
            format!("is {:?} to {:?}; allowed: 1ms <= initial <= max <= 900s", b.initial, b.max),
        );
    }
    if !(1.0..=10.0).contains(&b.multiplier) {
        return err(&field("retry_backoff.multiplier"), format!("is {}; allowed: 1.0 to 10.0", b.multiplier));
    }
    if let Some(age) = s.max_record_age
        && !(Duration::from_secs(60)..=Duration::from_secs(604_800)).contains(&age)
    {
        return err(&field("max_record_age"), format!("is {age:?}; allowed: 60s to 7 days (604800s)"));
    }
    if let Some(topic) = &s.on_failure {
        check_name(&field("on_failure"), topic)?;
    }
    if !(1..=10).contains(&s.parallelization_factor) {
        return err(
            &field("parallelization_factor"),
            format!("is {}; allowed: 1 to 10", s.parallelization_factor),
        );
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(900)).contains(&s.handler_timeout) {
        return err(&field("handler_timeout"), format!("is {:?}; allowed: 1s to 900s", s.handler_timeout));
    }
    if let Some(f) = &s.filter {
        if f.field.is_empty() || f.field.split('.').any(str::is_empty) {
            return err(
                &field("filter.field"),
                format!("is `{}`; allowed: a dotted path like order.type", f.field),
            );
        }
        if f.exists == Some(false) || f.to_filter().is_none() {
            return err(
                &field("filter"),
                "allowed: exactly one of equals = VALUE, exists = true, prefix = \"TEXT\"".into(),
            );
        }
    }
    Ok(())
}

fn or_none(names: &[&str]) -> String {
    if names.is_empty() { "none are configured".into() } else { names.join(", ") }
}

/// Names end up in lease ids (`name/3`, `name#0`), Kafka topics and AMQP
/// queues: keep them to characters all three accept.
fn check_name(field: &str, name: &str) -> Result<(), (String, String)> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err((field.to_owned(), format!("is `{name}`; allowed: 1 to 200 of A-Z a-z 0-9 . _ -")))
    }
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
            Ok(Err(("session_timeout".into(), "is 50ms; allowed: 200ms to 600s".into())))
        );
        let e = bad("[[streams]]\nname = \"a b\"\nhandler = \"log\"");
        assert!(matches!(e, Ok(Err((f, _))) if f == "streams[0].name"));
        let e = bad("listen = \"0.0.0.0:7400\"");
        assert!(matches!(e, Ok(Err((f, _))) if f == "auth_token"));
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
            ("on_failure = \"x\"", "subscriptions[0].on_failure"),
            ("parallelization_factor = 2", "subscriptions[0].parallelization_factor"),
            ("starting_position = \"trim_horizon\"", "subscriptions[0].starting_position"),
            ("batch_size = 0", "subscriptions[0].batch_size"),
            ("drain_target = \"1ms\"", "subscriptions[0].drain_target"),
        ] {
            assert!(matches!(sub(extra), Ok(Err((f, _))) if f == field), "{extra}: {:?}", sub(extra));
        }
        let e = bad("[[subscriptions]]\nname = \"q\"\ntopic = \"nope\"\nhandler = \"h\"");
        assert!(
            matches!(e, Ok(Err((f, p))) if f == "subscriptions[0].topic" && p.contains("not under [[topics]]"))
        );
        let typo = Config::parse(
            "[[topics]]\nname = \"t\"\n[[subscriptions]]\nname = \"q\"\ntopic = \"t\"\nhandler = \"h\"\nmax_concurency = 3",
        );
        assert!(typo.is_err_and(|e| e.contains("unknown field `max_concurency`") && e.contains("max_concurrency")));
        let stream = |extra: &str| bad(&format!("[[streams]]\nname = \"s\"\nhandler = \"h\"\n{extra}"));
        assert!(matches!(stream("batch_size = 0"), Ok(Err((f, _))) if f == "streams[0].batch_size"));
        assert!(
            matches!(stream("batch_window = \"301s\""), Ok(Err((f, _))) if f == "streams[0].batch_window")
        );
        let e = stream("starting_position = \"at_timestamp\"");
        assert!(matches!(e, Ok(Err((f, _))) if f == "streams[0].starting_timestamp"));
        let ok =
            stream("starting_position = \"at_timestamp\"\nstarting_timestamp = \"2026-11-27T10:00:00Z\"");
        assert!(matches!(ok, Ok(Ok(()))), "{ok:?}");
        assert!(
            Config::parse("[[streams]]\nname = \"s\"\nhandler = \"h\"\nstarting_position = \"oldest\"")
                .is_err()
        );
        for (extra, field) in [
            ("max_retries = -2", "streams[0].max_retries"),
            ("max_record_age = \"5s\"", "streams[0].max_record_age"),
            ("parallelization_factor = 11", "streams[0].parallelization_factor"),
            ("handler_timeout = \"0s\"", "streams[0].handler_timeout"),
            ("on_failure = \"s\"", "streams[0].on_failure"),
            ("retry_backoff = { initial = \"2s\", max = \"1s\" }", "streams[0].retry_backoff"),
            ("filter = { field = \"a\", exists = true, prefix = \"x\" }", "streams[0].filter"),
            ("filter = { field = \"a..b\", exists = true }", "streams[0].filter.field"),
        ] {
            assert!(matches!(stream(extra), Ok(Err((f, _))) if f == field), "{extra}: {:?}", stream(extra));
        }
        let full = stream(
            "max_retries = 3\nbisect_on_error = true\nreport_item_failures = true\nmax_record_age = \"1h\"\n\
             on_failure = \"dlq\"\nparallelization_factor = 4\nhandler_timeout = \"5s\"\n\
             retry_backoff = { initial = \"10ms\", max = \"1s\", multiplier = 3.0, jitter = false }\n\
             filter = { field = \"kind\", equals = \"order\" }",
        );
        assert!(matches!(full, Ok(Ok(()))), "{full:?}");
        let unknown = Config::parse("sesion_timeout = \"1s\"");
        assert!(unknown.is_err_and(|e| e.contains("unknown field `sesion_timeout`")));
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
            matches!(&short, Ok(Err((f, why))) if f == "handoff_timeout" && why.contains("streams[1].handler_timeout")),
            "{short:?}"
        );
        assert!(matches!(with("41s"), Ok(Ok(()))));
    }
}
