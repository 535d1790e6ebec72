//! The worker's TOML config. Batch settings live with the mapping in the
//! coordinator's config, so every worker runs a mapping alike; loading,
//! env overrides and field errors are `shardline-config`'s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
pub use shardline_config::{ClientTls, ConfigError, ConfigFile, Invalid, KafkaSettings};
use shardline_config::{
    Overrides, check_amqp_tls, check_amqp_url, check_brokers, ensure, in_range, read_secret,
};
use shardline_proto::{Credentials, TlsPem};

/// The whole worker config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// The coordinators' gRPC URLs, comma-separated (one leads, the others
    /// stand by; one URL, such as a Service's, is enough: a standby names
    /// the leader); env `SHARDLINE_COORDINATOR` overrides.
    pub coordinator: String,
    /// Unique in the fleet. Default: host name and process id.
    pub worker_id: Option<String>,
    /// The token this worker presents to the coordinator (its worker
    /// token); env `SHARDLINE_TOKEN` overrides. Prefer `auth_token_file`
    /// or the variable over writing it here.
    pub auth_token: Option<String>,
    /// A file holding the token (a mounted Kubernetes Secret).
    pub auth_token_file: Option<PathBuf>,
    /// TLS to `https://` coordinators: `{ ca, cert?, key? }` (the CA that
    /// signed the coordinator's certificate; a client certificate for
    /// mutual TLS). Without it, `https://` is verified against the
    /// system's roots.
    pub tls: Option<ClientTls>,
    /// Prometheus `/metrics`; absent: no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Kafka bootstrap servers; env `SHARDLINE_KAFKA_BROKERS` overrides.
    pub kafka_brokers: String,
    /// RabbitMQ URL for queue slots; env `SHARDLINE_AMQP_URL` overrides.
    /// The worker connects only once it is given a queue slot.
    pub amqp_url: String,
    // Broker security (README "Broker security"): checked at load.
    /// `[kafka] properties`: librdkafka properties (security.protocol,
    /// sasl.*, ssl.*, ...) for every Kafka client of this worker; values
    /// are text, `{ file = "PATH" }` or `{ env = "VAR" }`.
    pub kafka: KafkaSettings,
    /// With an `amqps://` amqp_url: the CA the broker's certificate chains
    /// to (`ca`), and a client certificate (`cert`, `key`) if it asks.
    pub amqp_tls: Option<ClientTls>,
    /// Most batches this worker runs at once, over all its leases (its node's
    /// capacity; the load balancer measures utilisation against it).
    /// 0: no limit, and the CPU count is reported as capacity.
    pub max_inflight_batches: u32,
    /// Most leases this worker takes; 0 = no limit.
    pub capacity: u32,
    /// On SIGTERM, how long in-flight batches may take to finish before the
    /// worker leaves anyway (its leases then move by timeout).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Prefetched bytes buffered per partition (KiB). When a partition's
    /// buffer is full, fetching it pauses until the handler catches up:
    /// this bounds memory whatever the handler's speed.
    pub fetch_queue_kib: u32,
    /// Handlers this worker hosts, by name, with their settings.
    pub handlers: BTreeMap<String, toml::Table>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            coordinator: format!("http://127.0.0.1:{}", shardline_config::COORDINATOR_PORT),
            worker_id: None,
            auth_token: None,
            auth_token_file: None,
            tls: None,
            metrics_listen: None,
            kafka_brokers: shardline_config::KAFKA_BROKERS.into(),
            amqp_url: shardline_config::AMQP_URL.into(),
            kafka: KafkaSettings::default(),
            amqp_tls: None,
            max_inflight_batches: 0,
            capacity: 0,
            drain_timeout: Duration::from_secs(30),
            fetch_queue_kib: 4096,
            handlers: BTreeMap::new(),
        }
    }
}

impl ConfigFile for WorkerConfig {
    fn overrides(&mut self) -> Overrides<'_> {
        Overrides {
            coordinator: Some(&mut self.coordinator),
            kafka_brokers: &mut self.kafka_brokers,
            amqp_url: &mut self.amqp_url,
            auth_token: &mut self.auth_token,
            store: None,
            role_tokens: None,
            advertise_url: None,
        }
    }

    fn validate(&self) -> Result<(), Invalid> {
        let list = &self.coordinator;
        shardline_proto::Endpoints::parse(list).map_err(|e| {
            let value = format!("`{list}`, whose entry `{}` {}", e.entry, e.problem);
            Invalid::new("coordinator", value, shardline_proto::EndpointsError::ALLOWED)
        })?;
        if let Some(tls) = &self.tls {
            tls.check("tls")?;
            let https = list.split(',').any(|url| url.trim().starts_with("https://"));
            let shown = format!("set, but every coordinator URL (`{list}`) is http://");
            ensure(https, "tls", shown, "https:// coordinator URLs with `tls`, or no `tls`")?;
        }
        self.credentials()?;
        ensure(!self.handlers.is_empty(), "handlers", "empty", "at least one [handlers.NAME] table")?;
        for (name, settings) in &self.handlers {
            match settings.get("kind") {
                None => {}
                Some(_) if crate::function::is_function(settings) => {
                    crate::function::FunctionSettings::parse(name, settings)?;
                }
                Some(other) => {
                    let allowed = "\"function\" (or no kind: a handler compiled into this worker)";
                    return Err(Invalid::new(format!("handlers.{name}.kind"), other, allowed));
                }
            }
        }
        if let Some(id) = &self.worker_id {
            let ok = !id.is_empty() && id.len() <= 200;
            ensure(ok, "worker_id", format!("{} characters long", id.len()), "1 to 200 characters")?;
        }
        let drain = self.drain_timeout;
        ensure(drain <= Duration::from_secs(3600), "drain_timeout", format!("{drain:?}"), "0s to 3600s")?;
        let inflight = self.max_inflight_batches;
        ensure(inflight <= 10_000, "max_inflight_batches", inflight, "0 (no limit) to 10000")?;
        in_range("fetch_queue_kib", self.fetch_queue_kib, 64, 1_048_576)?;
        check_amqp_url(&self.amqp_url)?;
        check_amqp_tls(&self.amqp_url, self.amqp_tls.as_ref())?;
        self.kafka.check()?;
        check_brokers(&self.kafka_brokers)
    }
}

impl WorkerConfig {
    /// The token (from the file or the variable) and the TLS files, read.
    pub fn credentials(&self) -> Result<Credentials, Invalid> {
        let token = match (&self.auth_token, &self.auth_token_file) {
            (Some(_), Some(_)) => {
                let allowed = "one of `auth_token` (or SHARDLINE_TOKEN) and `auth_token_file`";
                return Err(Invalid::new("auth_token_file", "set as well as `auth_token`", allowed));
            }
            (Some(token), None) => Some(token.clone()),
            (None, Some(path)) => Some(read_secret("auth_token_file", path)?),
            (None, None) => None,
        };
        let tls = match &self.tls {
            None => None,
            Some(tls) => {
                let (ca, identity) = tls
                    .read()
                    .map_err(|e| Invalid::new("tls", format!("unreadable ({e})"), "readable PEM files"))?;
                Some(TlsPem { ca, identity })
            }
        };
        Credentials::new(token, tls).map_err(|why| Invalid::new("auth_token", "unusable", why))
    }

    /// A config hosting `handlers` (each with no settings), defaults
    /// elsewhere: for tests and embedders that build configs as values.
    pub fn hosting<'a>(handlers: impl IntoIterator<Item = &'a str>) -> Self {
        let handlers = handlers.into_iter().map(|name| (name.to_owned(), toml::Table::new())).collect();
        Self { handlers, ..Self::default() }
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
    fn the_uploads_example_config_is_valid() {
        let c = WorkerConfig::parse(include_str!("../../examples/uploads/worker.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.handlers.keys().collect::<Vec<_>>(), ["uploads"]);
    }

    /// examples/functions/*/worker.toml, as the worker reads them from the
    /// repository root (where their `working_dir`s are relative to).
    #[test]
    fn the_function_example_configs_are_valid() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for (text, name) in [
            (include_str!("../../examples/functions/python/worker.toml"), "python"),
            (include_str!("../../examples/functions/node/worker.toml"), "node"),
        ] {
            let mut c = WorkerConfig::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            for settings in c.handlers.values_mut() {
                assert!(crate::function::is_function(settings), "{name}: not a function");
                let Some(toml::Value::String(dir)) = settings.get("working_dir") else {
                    panic!("{name}: no working_dir")
                };
                let absolute = root.join(dir).display().to_string();
                settings.insert("working_dir".into(), toml::Value::String(absolute));
            }
            assert_eq!(c.validate(), Ok(()), "{name}");
        }
    }

    #[test]
    fn tls_needs_an_https_coordinator_and_the_token_one_source() -> Result<(), std::io::Error> {
        let dir = std::env::temp_dir().join(format!("shardline-worker-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n")?;
        let token = dir.join("token");
        std::fs::write(&token, "wrk\n")?;
        let base = WorkerConfig {
            tls: Some(ClientTls { ca: pem.clone(), cert: None, key: None }),
            auth_token_file: Some(token.clone()),
            ..WorkerConfig::hosting(["log"])
        };
        let field = |c: &WorkerConfig| c.validate().map_err(|e| e.field);
        assert_eq!(field(&base), Err("tls".into()), "tls with only http:// URLs is a mistake");
        let https = WorkerConfig { coordinator: "https://c:7400".into(), ..base.clone() };
        assert_eq!(field(&https), Ok(()));
        let both = WorkerConfig { auth_token: Some("x".into()), ..https.clone() };
        assert_eq!(field(&both), Err("auth_token_file".into()));
        let gone = WorkerConfig { auth_token_file: Some(dir.join("absent")), ..https.clone() };
        assert_eq!(field(&gone), Err("auth_token_file".into()));
        let Ok(credentials) = https.credentials() else { panic!("credentials of a valid config") };
        let request = credentials.request(());
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        assert_eq!(header, Some("Bearer wrk"));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn parses_and_names_bad_fields() {
        let ok = WorkerConfig::parse("[handlers.log]\n[handlers.forward]\ntopic = \"r\"\n");
        let ok = ok.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.handlers.len(), 2);
        assert_eq!(ok.drain_timeout, Duration::from_secs(30));

        let none = WorkerConfig::parse("coordinator = \"http://x:1\"\nhandlers = {}\n").map(|c| c.validate());
        assert!(matches!(none, Ok(Err(Invalid { field: f, .. })) if f == "handlers"));
        let url = WorkerConfig::parse("coordinator = \"x:1\"\n[handlers.log]\n").map(|c| c.validate());
        assert!(matches!(url, Ok(Err(Invalid { field: f, .. })) if f == "coordinator"));
        // A list: every entry is checked, and the bad one is named.
        let list = |text: &str| {
            let c = WorkerConfig::parse(&format!("coordinator = \"{text}\"\n[handlers.log]\n"));
            c.unwrap_or_else(|e| panic!("{e}")).validate()
        };
        assert_eq!(list(" http://c1:7000 , https://c2:7000 "), Ok(()));
        for (text, entry) in [
            ("http://c1:7000,ftp://c2:7000", "ftp://c2:7000"),
            ("http://c1:7000,,http://c2:7000", ""),
            ("http://c1:7000,http://c1:7000", "http://c1:7000"),
        ] {
            let Err(e) = list(text) else { panic!("`{text}` was accepted") };
            assert_eq!(e.field, "coordinator");
            assert!(e.to_string().contains(&format!("entry `{entry}`")), "{e}");
            assert!(e.allowed.contains("comma-separated list"), "{e}");
        }
        assert!(
            WorkerConfig::parse("[handlers.log]\nbogus = 1\n").is_ok(),
            "handler settings are the handler's"
        );
        assert_eq!(WorkerConfig::parse("[handlers.log]\n").ok(), Some(WorkerConfig::hosting(["log"])));
        assert!(
            WorkerConfig::parse("bogus = 1\n[handlers.log]\n")
                .is_err_and(|e| e.to_string().contains("bogus"))
        );
    }

    /// parse → serialize → parse gives the same value (handler settings included).
    #[test]
    fn configs_round_trip_through_toml() {
        let example =
            WorkerConfig::parse(include_str!("../../examples/worker.toml")).unwrap_or_else(|e| panic!("{e}"));
        let full = WorkerConfig {
            worker_id: Some("w-1".into()),
            auth_token: Some("secret".into()),
            max_inflight_batches: 8,
            ..example.clone()
        };
        for c in [example, full] {
            let text = toml::to_string(&c).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(WorkerConfig::parse(&text).map_err(|e| e.to_string()), Ok(c), "{text}");
        }
    }
}
