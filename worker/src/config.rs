//! The worker's TOML config: which coordinator, which handlers (and their
//! settings), Kafka and drain settings. Parsed strictly and validated before
//! anything starts; batch settings live with the mapping in the
//! coordinator's config, so every worker runs a mapping alike.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole worker config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// The coordinator's gRPC URL; env `SHARDLINE_COORDINATOR` overrides.
    #[serde(default = "default_coordinator")]
    pub coordinator: String,
    /// Unique in the fleet. Default: host name and process id.
    #[serde(default)]
    pub worker_id: Option<String>,
    /// Shared token for the coordinator; env `SHARDLINE_TOKEN` overrides.
    #[serde(default)]
    pub auth_token: Option<String>,
    /// Prometheus `/metrics`; absent: no endpoint.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Kafka bootstrap servers; env `SHARDLINE_KAFKA_BROKERS` overrides.
    #[serde(default = "default_brokers")]
    pub kafka_brokers: String,
    /// RabbitMQ URL for queue slots; env `SHARDLINE_AMQP_URL` overrides.
    /// The worker connects only once it is given a queue slot.
    #[serde(default = "default_amqp_url")]
    pub amqp_url: String,
    /// Most batches this worker runs at once, over all its leases (its node's
    /// capacity; the load balancer measures utilisation against it).
    /// 0: no limit, and the CPU count is reported as capacity.
    #[serde(default)]
    pub max_inflight_batches: u32,
    /// Most leases this worker takes; 0 = no limit.
    #[serde(default)]
    pub capacity: u32,
    /// On SIGTERM, how long in-flight batches may take to finish before the
    /// worker leaves anyway (its leases then move by timeout).
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Prefetched bytes buffered per partition (KiB). When a partition's
    /// buffer is full, fetching it pauses until the handler catches up:
    /// this bounds memory whatever the handler's speed.
    #[serde(default = "default_fetch_queue_kib")]
    pub fetch_queue_kib: u32,
    /// Handlers this worker hosts, by name, with their settings.
    pub handlers: BTreeMap<String, toml::Table>,
}

fn default_coordinator() -> String {
    "http://127.0.0.1:7400".into()
}
fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn default_amqp_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".into()
}
fn default_drain() -> Duration {
    Duration::from_secs(30)
}
fn default_fetch_queue_kib() -> u32 {
    4096
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: `{field}` {problem}")]
    Invalid { path: PathBuf, field: String, problem: String },
}

impl WorkerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config =
            Self::parse(&text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })?;
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(v) = env("SHARDLINE_COORDINATOR") {
            config.coordinator = v;
        }
        if let Some(v) = env("SHARDLINE_KAFKA_BROKERS") {
            config.kafka_brokers = v;
        }
        if let Some(v) = env("SHARDLINE_AMQP_URL") {
            config.amqp_url = v;
        }
        if let Some(v) = env("SHARDLINE_TOKEN") {
            config.auth_token = Some(v);
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

    /// Checks ranges; the error is `(field, what is allowed)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |field: &str, problem: String| Err((field.to_owned(), problem));
        if !(self.coordinator.starts_with("http://") || self.coordinator.starts_with("https://")) {
            return err(
                "coordinator",
                format!("is `{}`; allowed: an http:// or https:// URL", self.coordinator),
            );
        }
        if self.handlers.is_empty() {
            return err("handlers", "is empty; allowed: at least one [handlers.NAME] table".into());
        }
        if self.worker_id.as_deref().is_some_and(|w| w.is_empty() || w.len() > 200) {
            return err("worker_id", "allowed: 1 to 200 characters".into());
        }
        if self.drain_timeout > Duration::from_secs(3600) {
            return err("drain_timeout", format!("is {:?}; allowed: 0s to 3600s", self.drain_timeout));
        }
        if self.max_inflight_batches > 10_000 {
            return err(
                "max_inflight_batches",
                format!("is {}; allowed: 0 (no limit) to 10000", self.max_inflight_batches),
            );
        }
        if !(64..=1_048_576).contains(&self.fetch_queue_kib) {
            return err("fetch_queue_kib", format!("is {}; allowed: 64 to 1048576", self.fetch_queue_kib));
        }
        if !(self.amqp_url.starts_with("amqp://") || self.amqp_url.starts_with("amqps://")) {
            return err("amqp_url", "allowed: amqp://USER:PASS@HOST:PORT/VHOST or amqps://...".into());
        }
        if self.kafka_brokers.trim().is_empty() {
            return err("kafka_brokers", "is empty; allowed: host:port[,host:port...]".into());
        }
        Ok(())
    }

    /// The batches this worker runs at once, as told to the coordinator.
    pub fn concurrency(&self) -> u32 {
        match self.max_inflight_batches {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            n => n,
        }
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host =
                std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
            let host = if host.is_empty() { "worker".to_owned() } else { host };
            format!("{host}-{}", std::process::id())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c =
            WorkerConfig::parse(include_str!("../../examples/worker.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.handlers.keys().collect::<Vec<_>>(), ["forward", "log", "noop", "sleep"]);
    }

    #[test]
    fn parses_and_names_bad_fields() {
        let ok = WorkerConfig::parse("[handlers.log]\n[handlers.forward]\ntopic = \"r\"\n");
        let ok = ok.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.handlers.len(), 2);
        assert_eq!(ok.drain_timeout, Duration::from_secs(30));

        let none = WorkerConfig::parse("coordinator = \"http://x:1\"\nhandlers = {}\n").map(|c| c.validate());
        assert!(matches!(none, Ok(Err((f, _))) if f == "handlers"));
        let url = WorkerConfig::parse("coordinator = \"x:1\"\n[handlers.log]\n").map(|c| c.validate());
        assert!(matches!(url, Ok(Err((f, _))) if f == "coordinator"));
        assert!(
            WorkerConfig::parse("[handlers.log]\nbogus = 1\n").is_ok(),
            "handler settings are the handler's"
        );
        assert!(WorkerConfig::parse("bogus = 1\n[handlers.log]\n").is_err_and(|e| e.contains("bogus")));
    }
}
