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
    /// A graceful handoff not confirmed within this is forced.
    #[serde(default = "default_handoff", with = "humantime_serde")]
    pub handoff_timeout: Duration,
    /// How often Kafka metadata is re-read to find new partitions.
    #[serde(default = "default_discovery", with = "humantime_serde")]
    pub discovery_interval: Duration,
    /// Kafka bootstrap servers; env `SHARDLINE_KAFKA_BROKERS` overrides.
    #[serde(default = "default_brokers")]
    pub kafka_brokers: String,
    /// Kafka topics whose partitions become leases.
    #[serde(default)]
    pub streams: Vec<StreamConfig>,
    /// RabbitMQ subscription queues whose slots become leases.
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// A Kafka topic mapped to a handler.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// The Kafka topic.
    pub name: String,
    /// The handler that processes its batches (workers host handlers by name).
    pub handler: String,
    /// A fixed partition count instead of Kafka metadata discovery, for
    /// benchmarks of the coordinator alone. Leave unset in production.
    #[serde(default)]
    pub partitions: Option<u32>,
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

impl StreamConfig {
    /// The mapping workers receive with every acquire of this stream's shards.
    pub fn mapping(&self) -> Mapping {
        let starting_timestamp_ms = self
            .starting_timestamp
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        Mapping {
            handler: self.handler.clone(),
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

/// A RabbitMQ subscription (durable queue bound to a topic exchange).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// The queue name.
    pub name: String,
    /// The exchange producers publish to.
    pub topic: String,
    pub handler: String,
    /// Queue slots (concurrent consumers) of this subscription.
    #[serde(default = "default_slots")]
    pub slots: u32,
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
fn default_handoff() -> Duration {
    Duration::from_secs(30)
}
fn default_discovery() -> Duration {
    Duration::from_secs(10)
}
fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn default_slots() -> u32 {
    1
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
        range("handoff_timeout", self.handoff_timeout, ms(100), ms(3_600_000))?;
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
            let field = |f: &str| format!("streams[{i}].{f}");
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
                return err(
                    &field("retry_backoff.multiplier"),
                    format!("is {}; allowed: 1.0 to 10.0", b.multiplier),
                );
            }
            if let Some(age) = s.max_record_age
                && !(Duration::from_secs(60)..=Duration::from_secs(604_800)).contains(&age)
            {
                return err(
                    &field("max_record_age"),
                    format!("is {age:?}; allowed: 60s to 7 days (604800s)"),
                );
            }
            if let Some(topic) = &s.on_failure {
                check_name(&field("on_failure"), topic)?;
                if topic == &s.name {
                    return err(&field("on_failure"), "is the stream itself; allowed: another topic".into());
                }
            }
            if !(1..=10).contains(&s.parallelization_factor) {
                return err(
                    &field("parallelization_factor"),
                    format!("is {}; allowed: 1 to 10", s.parallelization_factor),
                );
            }
            if !(Duration::from_secs(1)..=Duration::from_secs(900)).contains(&s.handler_timeout) {
                return err(
                    &field("handler_timeout"),
                    format!("is {:?}; allowed: 1s to 900s", s.handler_timeout),
                );
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
            if !names.insert(("stream", s.name.clone())) {
                return err(&format!("streams[{i}].name"), format!("`{}` is listed twice", s.name));
            }
        }
        for (i, s) in self.subscriptions.iter().enumerate() {
            check_name(&format!("subscriptions[{i}].name"), &s.name)?;
            check_name(&format!("subscriptions[{i}].topic"), &s.topic)?;
            check_name(&format!("subscriptions[{i}].handler"), &s.handler)?;
            if !(1..=1000).contains(&s.slots) {
                return err(
                    &format!("subscriptions[{i}].slots"),
                    format!("is {}; allowed: 1 to 1000", s.slots),
                );
            }
            if !names.insert(("subscription", s.name.clone())) {
                return err(&format!("subscriptions[{i}].name"), format!("`{}` is listed twice", s.name));
            }
        }
        Ok(())
    }

    /// The mapping of a lease's stream or subscription, if configured.
    pub fn mapping(&self, lease: &LeaseId) -> Option<Mapping> {
        match lease.kind {
            LeaseKind::Shard => self.streams.iter().find(|s| s.name == lease.name).map(StreamConfig::mapping),
            LeaseKind::QueueSlot => self
                .subscriptions
                .iter()
                .find(|s| s.name == lease.name)
                .map(|s| Mapping::new(s.handler.clone())),
        }
    }

    pub fn core(&self) -> CoreConfig {
        CoreConfig { session_timeout: self.session_timeout, handoff_timeout: self.handoff_timeout }
    }
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
        assert_eq!(c.handoff_timeout, Duration::from_secs(30));
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
        assert_eq!(c.subscriptions.first().map(|s| s.slots), Some(2));
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
        let e = bad("[[subscriptions]]\nname = \"q\"\ntopic = \"t\"\nhandler = \"h\"\nslots = 0");
        assert!(matches!(e, Ok(Err((f, _))) if f == "subscriptions[0].slots"));
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
}
