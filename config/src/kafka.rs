//! `[kafka]`: librdkafka properties (`security.protocol`, `sasl.*`,
//! `ssl.*`, ...) passed to every Kafka client a process makes, and the one
//! function that builds those clients' config from `kafka_brokers` and
//! them, so no client of the worker, the coordinator, the CLI or the load
//! test can miss them.
//!
//! A value is text (numbers and booleans are written as librdkafka reads
//! them), `{ file = "PATH" }` (a Kubernetes secret mount) or
//! `{ env = "VAR" }`. Checked when the config is loaded: every file and
//! variable read, no property shardline sets itself, and librdkafka itself
//! accepts the set (a client is created and dropped, with no broker to
//! reach), so a typo is a config error (exit 2) with librdkafka's words.
//! Read again for each client made, so a rotated secret file counts from
//! the next client on.
//!
//! This crate depends on rdkafka for that check: only librdkafka knows its
//! property names and which combinations it refuses, and every process
//! that loads a config links it already.
//!
//! Values that may be secret (read from a file or the environment, or
//! named like a password, secret or key) never appear in `Debug` output or
//! in error messages.

use std::collections::BTreeMap;
use std::fmt::{self, Debug};
use std::path::PathBuf;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext};
use rdkafka::error::KafkaError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Invalid, read_secret};

/// Properties shardline sets itself, because the protocol depends on them:
/// the brokers come from `kafka_brokers`; the coordinator, not a consumer
/// group, owns partitions and offsets; the worker reads lag from
/// librdkafka's statistics and bounds its buffer by `fetch_queue_kib`;
/// what goes to `on_failure` is acknowledged by every in-sync replica; no
/// client creates a topic by asking for it. Aliases are listed with their
/// property.
pub const RESERVED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "auto.commit.enable",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.partition.eof",
    "statistics.interval.ms",
    "queued.max.messages.kbytes",
    "acks",
    "request.required.acks",
    "transactional.id",
    "allow.auto.create.topics",
];

/// The `[kafka]` table.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    /// librdkafka properties for every Kafka client of the process, by
    /// name: text, `{ file = "PATH" }` or `{ env = "VAR" }`.
    pub properties: BTreeMap<String, Property>,
}

/// One property's value, or where to read it.
#[derive(Clone, PartialEq, Eq)]
pub enum Property {
    Text(String),
    /// The file's text without its trailing newline.
    File(PathBuf),
    /// The variable's value.
    Env(String),
}

/// A property with its value now.
struct Resolved {
    name: String,
    value: String,
    /// Never shown: read from a file or the environment, or named like a secret.
    secret: bool,
}

impl KafkaSettings {
    /// Properties given as text (for the CLI's `--kafka-property` and tests).
    pub fn from_texts<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let properties =
            pairs.into_iter().map(|(k, v)| (k.to_owned(), Property::Text(v.to_owned()))).collect();
        Self { properties }
    }

    /// Adds `KEY=VALUE` arguments (`--kafka-property` of the CLI and the
    /// load test) as text properties, replacing any of the same name.
    pub fn with_args<'a>(mut self, args: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        for arg in args {
            match arg.split_once('=') {
                Some((key, value)) if !key.trim().is_empty() => {
                    self.properties.insert(key.trim().to_owned(), Property::Text(value.to_owned()));
                }
                // The argument is not shown: it may hold a secret.
                _ => {
                    return Err(
                        "a --kafka-property without KEY=; allowed: KEY=VALUE, e.g. security.protocol=ssl"
                            .into(),
                    );
                }
            }
        }
        Ok(self)
    }

    /// Checks what [`KafkaSettings::client_config`] will need; fields are
    /// named from the file's root (`kafka.properties."sasl.password"`).
    pub fn check(&self) -> Result<(), Invalid> {
        if self.properties.is_empty() {
            return Ok(());
        }
        let resolved = self.resolve()?;
        let mut config = ClientConfig::new();
        for property in &resolved {
            // One at a time, so an unknown name or a bad value is pinned
            // to its property whatever the map's order.
            let mut alone = ClientConfig::new();
            alone.set(&property.name, &property.value);
            if let Err(e) = alone.create_native_config() {
                let why = format!("refused by librdkafka ({})", librdkafka_says(&e, property));
                let allowed = "a property librdkafka knows, with a value it accepts (its CONFIGURATION.md)";
                return Err(Invalid::new(field(&property.name), why, allowed));
            }
            config.set(&property.name, &property.value);
        }
        // Together: what librdkafka refuses only at client creation (a
        // missing CA file, a SASL mechanism without its settings). No
        // `bootstrap.servers`, so nothing is dialled.
        config.create_with_context::<_, BaseConsumer<Quiet>>(Quiet).map(drop).map_err(|e| {
            let mut why = match &e {
                KafkaError::ClientCreation(message) => message.clone(),
                other => other.to_string(),
            };
            for secret in resolved.iter().filter(|p| p.secret && !p.value.is_empty()) {
                why = why.replace(&secret.value, "***");
            }
            Invalid::new(
                "kafka.properties",
                format!("refused by librdkafka ({why})"),
                "properties librdkafka accepts together",
            )
        })
    }

    /// The config every Kafka client of the process starts from:
    /// `bootstrap.servers` and the properties, files and variables read
    /// now. Callers add their own settings: [`RESERVED`] ones with `set`,
    /// defaults an operator may change with [`SetDefault::set_default`].
    pub fn client_config(&self, brokers: &str) -> Result<ClientConfig, Invalid> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", brokers);
        for property in self.resolve()? {
            config.set(property.name, property.value);
        }
        Ok(config)
    }

    /// Every value now, in name order; a reserved name, an unreadable file
    /// or an unset variable is the property's error.
    fn resolve(&self) -> Result<Vec<Resolved>, Invalid> {
        self.properties
            .iter()
            .map(|(name, property)| {
                let at = field(name);
                if RESERVED.contains(&name.as_str()) {
                    let allowed = format!("any librdkafka property but these: {}", RESERVED.join(", "));
                    return Err(Invalid::new(at, "a property shardline sets itself", allowed));
                }
                let (value, secret) = match property {
                    Property::Text(text) => (text.clone(), sensitive(name)),
                    Property::File(path) => (read_secret(&at, path)?, true),
                    Property::Env(var) => match std::env::var(var) {
                        Ok(value) if !value.is_empty() => (value, true),
                        _ => {
                            let shown = format!("{{ env = \"{var}\" }}, which is unset or empty");
                            return Err(Invalid::new(
                                at,
                                shown,
                                "a variable set in the process's environment",
                            ));
                        }
                    },
                };
                Ok(Resolved { name: name.clone(), value, secret })
            })
            .collect()
    }
}

/// librdkafka's reason, with the value left out when it may be a secret.
fn librdkafka_says(e: &KafkaError, property: &Resolved) -> String {
    let why = match e {
        // Its text is "desc key value": only the description is needed.
        KafkaError::ClientConfig(_, desc, _, _) => desc.clone(),
        other => other.to_string(),
    };
    if property.secret && !property.value.is_empty() { why.replace(&property.value, "***") } else { why }
}

/// `kafka.properties."NAME"`: the key as TOML quotes a dotted name.
fn field(name: &str) -> String {
    format!("kafka.properties.\"{name}\"")
}

/// Named like something to keep out of logs.
fn sensitive(name: &str) -> bool {
    ["password", "secret", "key.pem", "oauthbearer.config", "sasl.jaas"].iter().any(|s| name.contains(s))
}

/// Sets a default an operator's `[kafka]` property overrides.
pub trait SetDefault {
    fn set_default(&mut self, key: &str, value: impl Into<String>) -> &mut Self;
}

impl SetDefault for ClientConfig {
    fn set_default(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        if self.get(key).is_none() {
            self.set(key, value.into());
        }
        self
    }
}

/// Drops librdkafka's log lines for the throwaway client of the check
/// (it warns that it has no brokers, which is the point).
struct Quiet;

impl ClientContext for Quiet {
    fn log(&self, _: RDKafkaLogLevel, _: &str, _: &str) {}
}

impl ConsumerContext for Quiet {}

/// Text shown as is unless its name looks secret; files and variables by
/// where they are.
impl Debug for KafkaSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self.properties.iter().map(|(name, p)| {
            let value = match p {
                Property::Text(_) if sensitive(name) => "***".to_owned(),
                Property::Text(text) => format!("{text:?}"),
                Property::File(path) => format!("{{ file = {path:?} }}"),
                Property::Env(var) => format!("{{ env = {var:?} }}"),
            };
            (name, Verbatim(value))
        });
        let map: BTreeMap<_, _> = shown.collect();
        f.debug_struct("KafkaSettings").field("properties", &map).finish()
    }
}

/// Debug-prints its text as is.
struct Verbatim(String);

impl Debug for Verbatim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Debug for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Its name is not known here: assume the worst.
            Self::Text(_) => f.write_str("Text(***)"),
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Env(var) => f.debug_tuple("Env").field(var).finish(),
        }
    }
}

const ALLOWED: &str = "a string, a number, true/false, { file = \"PATH\" } or { env = \"VAR\" }";

/// What TOML may hold for a property.
#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Table(BTreeMap<String, String>),
}

impl<'de> Deserialize<'de> for Property {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw = Raw::deserialize(d).map_err(|_| D::Error::custom(format!("expected {ALLOWED}")))?;
        Ok(match raw {
            Raw::Text(text) => Self::Text(text),
            Raw::Int(n) => Self::Text(n.to_string()),
            Raw::Float(x) => Self::Text(x.to_string()),
            Raw::Bool(b) => Self::Text(b.to_string()),
            Raw::Table(table) => {
                let mut entries = table.into_iter();
                match (entries.next(), entries.next()) {
                    (Some((key, path)), None) if key == "file" => Self::File(path.into()),
                    (Some((key, var)), None) if key == "env" => Self::Env(var),
                    _ => return Err(D::Error::custom(format!("expected {ALLOWED}"))),
                }
            }
        })
    }
}

impl Serialize for Property {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Text(text) => s.serialize_str(text),
            Self::File(path) => BTreeMap::from([("file", path)]).serialize(s),
            Self::Env(var) => BTreeMap::from([("env", var)]).serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        kafka: KafkaSettings,
    }

    fn parse(text: &str) -> Result<KafkaSettings, String> {
        toml::from_str::<File>(text).map(|f| f.kafka).map_err(|e| e.to_string())
    }

    fn check(text: &str) -> Result<(), Invalid> {
        parse(text).unwrap_or_else(|e| panic!("{e}")).check()
    }

    #[test]
    fn values_are_text_numbers_booleans_files_or_variables() {
        let k = parse(
            "[kafka.properties]\n\"security.protocol\" = \"sasl_ssl\"\n\"socket.timeout.ms\" = 5000\n\
             \"enable.ssl.certificate.verification\" = false\n\"sasl.password\" = { file = \"/run/p\" }\n\
             \"sasl.username\" = { env = \"KAFKA_USER\" }\n",
        );
        let k = k.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(k.properties["socket.timeout.ms"], Property::Text("5000".into()));
        assert_eq!(k.properties["enable.ssl.certificate.verification"], Property::Text("false".into()));
        assert_eq!(k.properties["sasl.password"], Property::File("/run/p".into()));
        assert_eq!(k.properties["sasl.username"], Property::Env("KAFKA_USER".into()));
        let text = toml::to_string(&File { kafka: k.clone() }).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parse(&text), Ok(k), "{text}");
        for bad in ["{ path = \"/x\" }", "{ file = \"/x\", env = \"X\" }", "[\"a\"]"] {
            let e = parse(&format!("[kafka.properties]\n\"sasl.password\" = {bad}\n"));
            assert!(e.as_ref().is_err_and(|e| e.contains(ALLOWED)), "{bad}: {e:?}");
        }
        assert!(parse("[kafka]\nproperty = {}\n").is_err_and(|e| e.contains("properties")));
    }

    #[test]
    fn a_typo_or_a_bad_value_is_refused_with_librdkafkas_words() {
        assert_eq!(
            check("[kafka.properties]\n\"security.protocol\" = \"ssl\"\n\"client.id\" = \"x\"\n"),
            Ok(())
        );
        let e = check("[kafka.properties]\n\"sasl.pasword\" = \"hunter2\"\n").map_err(|e| e.to_string());
        let e = e.err().unwrap_or_default();
        assert!(e.starts_with("`kafka.properties.\"sasl.pasword\"` is "), "{e}");
        assert!(e.contains("No such configuration property"), "{e}");
        assert!(!e.contains("hunter2"), "a value named like a secret is not shown: {e}");
        let e = check("[kafka.properties]\n\"security.protocol\" = \"tls\"\n").map_err(|e| e.to_string());
        assert!(e.as_ref().is_err_and(|e| e.contains("security.protocol") && e.contains("tls")), "{e:?}");
        // Refused only together, when the client is created.
        let e = check(
            "[kafka.properties]\n\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"/nonexistent/ca.pem\"\n",
        );
        let e = e.map_err(|e| e.to_string());
        assert!(
            e.as_ref().is_err_and(|e| e.contains("`kafka.properties` is refused by librdkafka")),
            "{e:?}"
        );
    }

    #[test]
    fn what_shardline_sets_itself_is_refused_and_listed() {
        for name in ["group.id", "bootstrap.servers", "enable.auto.commit", "acks"] {
            let e = check(&format!("[kafka.properties]\n\"{name}\" = \"x\"\n")).err();
            let e = e.unwrap_or_else(|| panic!("{name} accepted"));
            assert_eq!(e.field, format!("kafka.properties.\"{name}\""));
            assert!(e.to_string().contains("is a property shardline sets itself"), "{e}");
            assert!(e.allowed.contains(&format!(" {name}")), "the list names it: {e}");
        }
    }

    #[test]
    fn secrets_come_from_files_and_variables_and_never_show() {
        let dir = tempdir();
        let pass = dir.join("kafka-pass");
        std::fs::write(&pass, "s3cret-file\n").ok();
        let var = format!("SHARDLINE_TEST_KAFKA_USER_{}", std::process::id());
        // SAFETY: this test alone uses this variable, named by its process.
        unsafe { std::env::set_var(&var, "s3cret-user") };
        let k = KafkaSettings {
            properties: BTreeMap::from([
                ("sasl.password".into(), Property::File(pass.clone())),
                ("sasl.username".into(), Property::Env(var.clone())),
                ("ssl.key.password".into(), Property::Text("s3cret-inline".into())),
                ("client.id".into(), Property::Text("billing".into())),
            ]),
        };
        assert_eq!(k.check(), Ok(()));
        let config = k.client_config("b:9092").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.get("sasl.password"), Some("s3cret-file"));
        assert_eq!(config.get("sasl.username"), Some("s3cret-user"));
        assert_eq!(config.get("bootstrap.servers"), Some("b:9092"));
        let shown = format!("{k:?} {:?}", k.properties["ssl.key.password"]);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("billing") && shown.contains("kafka-pass") && shown.contains(&var), "{shown}");

        let args = KafkaSettings::default().with_args(["client.id=a=b", " linger.ms =5"]);
        let args = args.map(|k| k.properties);
        let want = BTreeMap::from([
            ("client.id".to_owned(), Property::Text("a=b".into())),
            ("linger.ms".to_owned(), Property::Text("5".into())),
        ]);
        assert_eq!(args, Ok(want));
        let e = KafkaSettings::default().with_args(["hunter2"]).err().unwrap_or_default();
        assert!(e.contains("KEY=VALUE") && !e.contains("hunter2"), "{e}");

        // A default shardline sets gives way to the operator's property.
        let mut config = config;
        config.set_default("client.id", "shardline-w1").set_default("linger.ms", "5");
        assert_eq!((config.get("client.id"), config.get("linger.ms")), (Some("billing"), Some("5")));

        std::fs::remove_file(&pass).ok();
        let e = k.check().err().map(|e| e.field);
        assert_eq!(e.as_deref(), Some("kafka.properties.\"sasl.password\""));
        std::fs::write(&pass, "ok\n").ok();
        // SAFETY: as above.
        unsafe { std::env::remove_var(&var) };
        let e = k.check().err().map(|e| (e.field.clone(), e.to_string()));
        let (field, text) = e.unwrap_or_default();
        assert_eq!(field, "kafka.properties.\"sasl.username\"");
        assert!(text.contains(&var) && text.contains("unset"), "{text}");
        std::fs::remove_dir_all(&dir).ok();
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shardline-kafka-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        dir
    }
}
