//! What the coordinator's and the worker's config files share: how a file
//! is loaded (read, parsed strictly, overridden by `SHARDLINE_*` variables,
//! validated), the error that names a field, its value and what is
//! allowed, and the defaults both sides use for the brokers.
//!
//! It imports no other shardline crate; the coordinator and the worker
//! import it, so neither copies the other.

pub mod amqp;
pub mod kafka;
mod secret;

pub use amqp::check_amqp_tls;
pub use kafka::{KafkaSettings, SetDefault};
pub use secret::{ClientTls, check_pem, read_secret};

use std::fmt::{Debug, Display};
use std::path::{Path, PathBuf};

/// Kafka bootstrap servers unless the file or `SHARDLINE_KAFKA_BROKERS` says.
pub const KAFKA_BROKERS: &str = "127.0.0.1:9092";
/// RabbitMQ unless the file or `SHARDLINE_AMQP_URL` says.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The coordinator's port unless its `listen` says (and the worker's
/// default `coordinator` URL).
pub const COORDINATOR_PORT: u16 = 7400;

/// A field holding a value it may not: where, what, and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` is {value}; allowed: {allowed}")]
pub struct Invalid {
    /// Dotted path from the file's root, e.g. `streams[0].batch_size`.
    pub field: String,
    /// The value found, as the message shows it (`5ms`, `` `a b` ``, `missing`).
    pub value: String,
    /// What would be accepted.
    pub allowed: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, value: impl Display, allowed: impl Into<String>) -> Self {
        Self { field: field.into(), value: value.to_string(), allowed: allowed.into() }
    }

    /// The same error seen from the enclosing table: `batch_size` under
    /// `streams[0]` becomes `streams[0].batch_size`.
    /// An error with an empty `field` is about the table itself.
    pub fn under(mut self, table: &str) -> Self {
        self.field = if self.field.is_empty() { table.to_owned() } else { format!("{table}.{}", self.field) };
        self
    }
}

/// `Ok` if `ok`, else the field's error.
pub fn ensure(ok: bool, field: &str, value: impl Display, allowed: impl Into<String>) -> Result<(), Invalid> {
    if ok { Ok(()) } else { Err(Invalid::new(field, value, allowed)) }
}

/// `min <= value <= max`, naming the range (`Debug`: durations print as `5ms`).
pub fn in_range<T: PartialOrd + Debug>(field: &str, value: T, min: T, max: T) -> Result<(), Invalid> {
    let ok = min <= value && value <= max;
    ensure(ok, field, format!("{value:?}"), format!("{min:?} to {max:?}"))
}

/// Kafka bootstrap servers are not empty.
pub fn check_brokers(brokers: &str) -> Result<(), Invalid> {
    ensure(!brokers.trim().is_empty(), "kafka_brokers", "empty", "host:port[,host:port...]")
}

/// An AMQP URL; the value is echoed with its password masked.
pub fn check_amqp_url(url: &str) -> Result<(), Invalid> {
    let ok = url.starts_with("amqp://") || url.starts_with("amqps://");
    let shown = format!("`{}`", mask_password(url));
    ensure(ok, "amqp_url", shown, "amqp://USER:PASS@HOST:PORT/VHOST or amqps://...")
}

/// `scheme://user:***@host...`: a URL fit for an error message or a log.
pub fn mask_password(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, _)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            let sep = if scheme.is_empty() { "" } else { "://" };
            format!("{scheme}{sep}{user}:***@{}", &rest[userinfo.len() + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Where the coordinator keeps its lease table: `store = "sled"` (the
/// default: a directory on one machine) or `store = { postgres = "URL" }`
/// (shared by any number of coordinators, one of which leads). Env
/// `SHARDLINE_STORE` overrides with `sled` or a `postgres://` URL.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Store {
    #[default]
    Sled,
    Postgres(String),
}

impl Store {
    /// `sled`, or any other text as a PostgreSQL URL (checked by [`Store::check`]).
    pub fn from_env(value: String) -> Self {
        if value == "sled" { Self::Sled } else { Self::Postgres(value) }
    }

    /// A PostgreSQL store is a `postgres://` or `postgresql://` URL.
    pub fn check(&self) -> Result<(), Invalid> {
        match self {
            Self::Sled => Ok(()),
            Self::Postgres(url) => {
                let ok = url.starts_with("postgres://") || url.starts_with("postgresql://");
                let shown = format!("`{}`", mask_password(url));
                let allowed =
                    "\"sled\" or { postgres = \"postgres://USER:PASS@HOST:PORT/DB[?sslmode=require]\" }";
                ensure(ok, "store", shown, allowed)
            }
        }
    }
}

/// Shows a PostgreSQL URL with its password masked: configs are logged.
impl Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sled => f.write_str("Sled"),
            Self::Postgres(url) => write!(f, "Postgres({:?})", mask_password(url)),
        }
    }
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("config {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    /// `from`: the `SHARDLINE_*` variable the bad value came from, if any.
    #[error("config {path}: {source}{}", from.map(|v| format!(" (set by {v})")).unwrap_or_default())]
    Invalid { path: PathBuf, source: Invalid, from: Option<&'static str> },
}

/// The fields the `SHARDLINE_*` variables override; `coordinator` is
/// `None` for a file that has no such field.
pub struct Overrides<'a> {
    pub coordinator: Option<&'a mut String>,
    pub kafka_brokers: &'a mut String,
    pub amqp_url: &'a mut String,
    pub auth_token: &'a mut Option<String>,
    /// The coordinator's `store`; `None` for the worker.
    pub store: Option<&'a mut Store>,
    /// The coordinator's worker and viewer tokens; `None` for the worker.
    pub role_tokens: Option<(&'a mut Option<String>, &'a mut Option<String>)>,
    /// The coordinator's `advertise_url`; `None` for the worker. A
    /// variable because each replica advertises its own address while
    /// they share one config file (a Kubernetes ConfigMap).
    pub advertise_url: Option<&'a mut Option<String>>,
}

impl Overrides<'_> {
    /// Sets each field whose variable `env` returns (empty counts as unset);
    /// returns the (field, variable) pairs it set, so an error about such a
    /// field can name the variable rather than the file.
    pub fn apply(self, env: impl Fn(&str) -> Option<String>) -> Vec<(&'static str, &'static str)> {
        let env = |name: &str| env(name).filter(|v| !v.is_empty());
        let mut set = Vec::new();
        if let (Some(field), Some(v)) = (self.coordinator, env("SHARDLINE_COORDINATOR")) {
            *field = v;
            set.push(("coordinator", "SHARDLINE_COORDINATOR"));
        }
        if let Some(v) = env("SHARDLINE_KAFKA_BROKERS") {
            *self.kafka_brokers = v;
            set.push(("kafka_brokers", "SHARDLINE_KAFKA_BROKERS"));
        }
        if let Some(v) = env("SHARDLINE_AMQP_URL") {
            *self.amqp_url = v;
            set.push(("amqp_url", "SHARDLINE_AMQP_URL"));
        }
        if let Some(v) = env("SHARDLINE_TOKEN") {
            *self.auth_token = Some(v);
            set.push(("auth_token", "SHARDLINE_TOKEN"));
        }
        if let (Some(field), Some(v)) = (self.store, env("SHARDLINE_STORE")) {
            *field = Store::from_env(v);
            set.push(("store", "SHARDLINE_STORE"));
        }
        if let (Some(field), Some(v)) = (self.advertise_url, env("SHARDLINE_ADVERTISE_URL")) {
            *field = Some(v);
            set.push(("advertise_url", "SHARDLINE_ADVERTISE_URL"));
        }
        if let Some((worker, viewer)) = self.role_tokens {
            if let Some(v) = env("SHARDLINE_WORKER_TOKEN") {
                *worker = Some(v);
                set.push(("worker_token", "SHARDLINE_WORKER_TOKEN"));
            }
            if let Some(v) = env("SHARDLINE_VIEWER_TOKEN") {
                *viewer = Some(v);
                set.push(("viewer_token", "SHARDLINE_VIEWER_TOKEN"));
            }
        }
        set
    }
}

/// A config file: TOML parsed strictly, then env overrides, then checks.
pub trait ConfigFile: serde::de::DeserializeOwned {
    /// The fields environment variables may override.
    fn overrides(&mut self) -> Overrides<'_>;

    /// Checks every field; the error names the first bad one.
    fn validate(&self) -> Result<(), Invalid>;

    fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Reads, parses and validates `path`, applying the env overrides
    /// before validating (so an override is checked like the file).
    fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config =
            Self::parse(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        let overridden = config.overrides().apply(|name| std::env::var(name).ok());
        config.validate().map_err(|source| {
            let from = overridden.iter().find(|(field, _)| source.field == *field).map(|(_, var)| *var);
            ConfigError::Invalid { path: path.to_owned(), source, from }
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_replace_their_fields_and_empty_ones_are_ignored() {
        let (mut coordinator, mut brokers, mut amqp, mut token, mut store) =
            ("c".to_owned(), "b".to_owned(), "a".to_owned(), None, Store::Sled);
        let mut advertise = None;
        let env = |name: &str| match name {
            "SHARDLINE_COORDINATOR" => Some("http://x:1".to_owned()),
            "SHARDLINE_KAFKA_BROKERS" => Some("k:9".to_owned()),
            "SHARDLINE_AMQP_URL" => Some(String::new()),
            "SHARDLINE_TOKEN" => Some("t".to_owned()),
            "SHARDLINE_STORE" => Some("postgres://u:pw@db/x".to_owned()),
            "SHARDLINE_ADVERTISE_URL" => Some("https://c-0.peers:7400".to_owned()),
            _ => None,
        };
        let set = Overrides {
            coordinator: Some(&mut coordinator),
            kafka_brokers: &mut brokers,
            amqp_url: &mut amqp,
            auth_token: &mut token,
            store: Some(&mut store),
            role_tokens: None,
            advertise_url: Some(&mut advertise),
        }
        .apply(env);
        assert_eq!(
            set.iter().map(|(_, var)| *var).collect::<Vec<_>>(),
            [
                "SHARDLINE_COORDINATOR",
                "SHARDLINE_KAFKA_BROKERS",
                "SHARDLINE_TOKEN",
                "SHARDLINE_STORE",
                "SHARDLINE_ADVERTISE_URL"
            ]
        );
        assert_eq!(advertise.as_deref(), Some("https://c-0.peers:7400"));
        assert_eq!(store, Store::Postgres("postgres://u:pw@db/x".into()));
        assert_eq!(
            format!("{store:?}"),
            "Postgres(\"postgres://u:***@db/x\")",
            "a logged config hides the password"
        );
        assert_eq!(Store::from_env("sled".into()), Store::Sled);
        let e = Store::Postgres("mysql://u:pw@h/db".into()).check().map_err(|e| e.to_string());
        assert!(e.as_ref().is_err_and(|e| e.contains("`store` is `mysql://u:***@h/db`")), "{e:?}");
        assert_eq!((coordinator.as_str(), brokers.as_str(), amqp.as_str()), ("http://x:1", "k:9", "a"));
        assert_eq!(token.as_deref(), Some("t"));
    }

    #[test]
    fn errors_name_the_field_under_its_table() {
        let e = in_range("batch_size", 0, 1, 10_000).map_err(|e| e.under("streams[0]"));
        assert_eq!(
            e.map_err(|e| e.to_string()),
            Err("`streams[0].batch_size` is 0; allowed: 1 to 10000".to_owned())
        );
        assert_eq!(check_amqp_url("amqp://u:p@h/%2f"), Ok(()));
        let e = check_amqp_url("http://u:secret@h/v").map_err(|e| e.to_string());
        assert_eq!(
            e,
            Err("`amqp_url` is `http://u:***@h/v`; allowed: amqp://USER:PASS@HOST:PORT/VHOST or amqps://..."
                .into())
        );
        assert_eq!(mask_password("h:5672"), "h:5672");
    }
}
