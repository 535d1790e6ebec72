//! The gateway's TOML config: where it listens, the brokers (shared
//! defaults and `[kafka]`/`amqp_tls` as the other binaries take them), the
//! bearer token, what it exposes (allow-lists: anything else is 404) and
//! its limits. Loading, `SHARDLINE_*` overrides and field errors are
//! `shardline-config`'s; every default lives in [`Default`] below.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
pub use shardline_config::{ClientTls, ConfigError, ConfigFile, Invalid, KafkaSettings};
use shardline_config::{
    Overrides, check_amqp_tls, check_amqp_url, check_brokers, ensure, in_range, read_secret,
};

/// The whole gateway config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where the HTTP API listens.
    pub listen: SocketAddr,
    /// Kafka bootstrap servers; env `SHARDLINE_KAFKA_BROKERS` overrides.
    pub kafka_brokers: String,
    /// RabbitMQ URL; env `SHARDLINE_AMQP_URL` overrides.
    pub amqp_url: String,
    /// `[kafka] properties`: librdkafka properties for the gateway's Kafka
    /// clients (security.protocol, sasl.*, ssl.*, ...).
    pub kafka: KafkaSettings,
    /// With an `amqps://` amqp_url: the CA (and client certificate).
    pub amqp_tls: Option<ClientTls>,
    /// A file holding the bearer token every `/v1/` request must present
    /// (`Authorization: Bearer TOKEN`); env `SHARDLINE_TOKEN` gives it
    /// instead. Without a token only a loopback `listen` is allowed.
    pub token_file: Option<PathBuf>,
    /// Set by `SHARDLINE_TOKEN` only (never read from or written to the file).
    #[serde(skip)]
    pub token: Option<String>,
    /// Kafka topics `POST /v1/streams/{stream}/records` may write.
    pub streams: Vec<String>,
    /// RabbitMQ topic exchanges `POST /v1/topics/{topic}/messages` may publish to.
    pub topics: Vec<String>,
    /// Subscriptions `POST /v1/invoke/{subscription}` may invoke.
    pub subscriptions: Vec<String>,
    /// Largest request body accepted (bytes); larger is 413.
    pub max_body_bytes: usize,
    /// Longest an invocation waits for its reply; a client may ask for
    /// less (`Shardline-Timeout-Ms` or `?timeout_ms=`), never more. 504 after.
    #[serde(with = "humantime_serde")]
    pub invoke_timeout: Duration,
    /// Longest a record waits for Kafka's acknowledgement (librdkafka's
    /// `message.timeout.ms`); 503 after.
    #[serde(with = "humantime_serde")]
    pub produce_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            kafka_brokers: shardline_config::KAFKA_BROKERS.into(),
            amqp_url: shardline_config::AMQP_URL.into(),
            kafka: KafkaSettings::default(),
            amqp_tls: None,
            token_file: None,
            token: None,
            streams: Vec::new(),
            topics: Vec::new(),
            subscriptions: Vec::new(),
            max_body_bytes: 1024 * 1024,
            invoke_timeout: Duration::from_secs(30),
            produce_timeout: Duration::from_secs(10),
        }
    }
}

impl ConfigFile for GatewayConfig {
    fn overrides(&mut self) -> Overrides<'_> {
        Overrides {
            coordinator: None,
            kafka_brokers: &mut self.kafka_brokers,
            amqp_url: &mut self.amqp_url,
            auth_token: &mut self.token,
            store: None,
            role_tokens: None,
            advertise_url: None,
        }
    }

    fn validate(&self) -> Result<(), Invalid> {
        let token = self.bearer_token()?;
        // The coordinator's rule: a listener others can reach needs a credential.
        if !self.listen.ip().is_loopback() {
            let why = format!(
                "a bearer token (token_file or SHARDLINE_TOKEN), required because listen ({}) is not a \
                 loopback address",
                self.listen
            );
            ensure(token.is_some(), "token_file", "unset", why)?;
        }
        for (field, names) in
            [("streams", &self.streams), ("topics", &self.topics), ("subscriptions", &self.subscriptions)]
        {
            check_names(field, names)?;
        }
        in_range("max_body_bytes", self.max_body_bytes, 1, 256 * 1024 * 1024)?;
        let s = Duration::from_secs;
        in_range("invoke_timeout", self.invoke_timeout, Duration::from_millis(10), s(3600))?;
        in_range("produce_timeout", self.produce_timeout, Duration::from_millis(100), s(300))?;
        check_amqp_url(&self.amqp_url)?;
        check_amqp_tls(&self.amqp_url, self.amqp_tls.as_ref())?;
        self.kafka.check()?;
        check_brokers(&self.kafka_brokers)
    }
}

impl GatewayConfig {
    /// The token from `SHARDLINE_TOKEN` or `token_file` (read now), if any.
    pub fn bearer_token(&self) -> Result<Option<String>, Invalid> {
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                let allowed = "one of SHARDLINE_TOKEN and `token_file`";
                Err(Invalid::new("token_file", "set as well as SHARDLINE_TOKEN", allowed))
            }
            (Some(token), None) => {
                let ok = !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic());
                ensure(ok, "auth_token", "not a header value", "printable ASCII without spaces")?;
                Ok(Some(token.clone()))
            }
            (None, Some(path)) => {
                let token = read_secret("token_file", path)?;
                let ok = token.bytes().all(|b| b.is_ascii_graphic());
                let allowed = "a file holding printable ASCII without spaces";
                ensure(ok, "token_file", "not a header value", allowed)?;
                Ok(Some(token))
            }
            (None, None) => Ok(None),
        }
    }
}

/// Names in an allow-list: not empty, no whitespace or `/`, no repeats.
fn check_names(field: &str, names: &[String]) -> Result<(), Invalid> {
    let allowed = "names of 1 to 249 characters without whitespace or `/`, each once";
    for (i, name) in names.iter().enumerate() {
        let ok =
            !name.is_empty() && name.len() <= 249 && !name.contains(|c: char| c.is_whitespace() || c == '/');
        ensure(ok, &format!("{field}[{i}]"), format!("`{name}`"), allowed)?;
        let repeated = names[..i].contains(name);
        ensure(!repeated, &format!("{field}[{i}]"), format!("`{name}`, listed twice"), allowed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_is_valid() {
        let c = GatewayConfig::parse(include_str!("../gateway.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.streams, ["orders"]);
        assert_eq!(c.subscriptions, ["resize"]);
        assert_eq!(c.invoke_timeout, Duration::from_secs(30));
    }

    #[test]
    fn defaults_and_round_trip() {
        let c = GatewayConfig::parse("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c, GatewayConfig::default());
        assert_eq!(c.max_body_bytes, 1 << 20);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        let text = toml::to_string(&c).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(GatewayConfig::parse(&text).ok(), Some(c));
    }

    #[test]
    fn bad_fields_are_named() {
        let field = |text: &str| GatewayConfig::parse(text).map(|c| c.validate().map_err(|e| e.field));
        assert!(GatewayConfig::parse("bogus = 1\n").is_err_and(|e| e.to_string().contains("bogus")));
        assert_eq!(field("listen = \"0.0.0.0:8080\"\n").ok(), Some(Err("token_file".into())));
        assert_eq!(field("streams = [\"a\", \"a\"]\n").ok(), Some(Err("streams[1]".into())));
        assert_eq!(field("topics = [\"a b\"]\n").ok(), Some(Err("topics[0]".into())));
        assert_eq!(field("max_body_bytes = 0\n").ok(), Some(Err("max_body_bytes".into())));
        assert_eq!(field("invoke_timeout = \"1ms\"\n").ok(), Some(Err("invoke_timeout".into())));
        assert_eq!(field("amqp_url = \"http://x\"\n").ok(), Some(Err("amqp_url".into())));
        let off_loopback = GatewayConfig {
            listen: "0.0.0.0:80".parse().unwrap_or_else(|e| panic!("{e}")),
            token: Some("t0k".into()),
            ..GatewayConfig::default()
        };
        assert_eq!(off_loopback.validate(), Ok(()));
        let spaced = GatewayConfig { token: Some("a b".into()), ..off_loopback.clone() };
        assert_eq!(spaced.validate().map_err(|e| e.field), Err("auth_token".into()));
        let gone =
            GatewayConfig { token: None, token_file: Some("/nonexistent/token".into()), ..off_loopback };
        assert_eq!(gone.validate().map_err(|e| e.field), Err("token_file".into()));
    }
}
