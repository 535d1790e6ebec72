//! The config files the harnesses give the binaries, written in one place
//! per binary: the fixed parts (addresses, data directory, brokers) plus
//! a table of everything else, serialized as TOML (never pieced together
//! as text, so names with quotes or newlines stay valid).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use toml::{Table, Value};

/// A coordinator's config file.
pub struct CoordinatorFile<'a> {
    /// `127.0.0.1:0` lets the OS choose; the coordinator prints the port.
    pub listen: &'a str,
    pub data_dir: &'a Path,
    pub metrics_listen: Option<SocketAddr>,
    pub kafka_brokers: Option<&'a str>,
    /// Every other key and table (`[[streams]]`, `[[subscriptions]]`, ...).
    /// A fixed key set here too wins over the field.
    pub settings: Table,
}

/// The coordinator's config as TOML text.
pub fn coordinator_toml(file: CoordinatorFile<'_>) -> Result<String> {
    let data_dir = file.data_dir.to_str().context("the data directory's path is not UTF-8")?;
    let mut fixed = vec![("listen", Value::from(file.listen)), ("data_dir", data_dir.into())];
    fixed.extend(file.metrics_listen.map(|a| ("metrics_listen", a.to_string().into())));
    fixed.extend(file.kafka_brokers.map(|b| ("kafka_brokers", b.into())));
    render(file.settings, fixed)
}

/// A worker's config file.
pub struct WorkerFile<'a> {
    /// The coordinator's gRPC URL.
    pub coordinator: &'a str,
    pub worker_id: &'a str,
    pub kafka_brokers: &'a str,
    pub metrics_listen: Option<SocketAddr>,
    /// Every other key and the `[handlers.*]` tables. A fixed key set here
    /// too wins over the field.
    pub settings: Table,
}

/// The worker's config as TOML text.
pub fn worker_toml(file: WorkerFile<'_>) -> Result<String> {
    let mut fixed = vec![
        ("coordinator", Value::from(file.coordinator)),
        ("worker_id", file.worker_id.into()),
        ("kafka_brokers", file.kafka_brokers.into()),
    ];
    fixed.extend(file.metrics_listen.map(|a| ("metrics_listen", a.to_string().into())));
    render(file.settings, fixed)
}

fn render(mut settings: Table, fixed: Vec<(&str, Value)>) -> Result<String> {
    for (key, value) in fixed {
        settings.entry(key).or_insert(value);
    }
    toml::to_string(&settings).context("cannot write a config as TOML")
}

/// Config text a test wrote by hand, as a table to merge into a file.
pub fn parse(text: &str) -> Result<Table> {
    toml::from_str(text).with_context(|| format!("not valid TOML:\n{text}"))
}

/// A table from `key, value` pairs.
pub fn table<'a>(pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Table {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_files_carry_the_fixed_keys_and_quote_what_needs_it() -> Result<()> {
        let mut settings =
            parse("session_timeout = \"2s\"\n[[streams]]\nname = \"a\"\nhandler = \"noop\"\n")?;
        settings.insert("listen".into(), "127.0.0.1:7000".into());
        let text = coordinator_toml(CoordinatorFile {
            listen: "127.0.0.1:0",
            data_dir: Path::new("/tmp/a \"b\""),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9400))),
            kafka_brokers: None,
            settings,
        })?;
        let back = parse(&text)?;
        assert_eq!(back["data_dir"].as_str(), Some("/tmp/a \"b\""), "{text}");
        assert_eq!(back["listen"].as_str(), Some("127.0.0.1:7000"), "settings win: {text}");
        assert_eq!(back["metrics_listen"].as_str(), Some("127.0.0.1:9400"), "{text}");
        assert_eq!(back["streams"][0]["handler"].as_str(), Some("noop"), "{text}");
        assert!(!back.contains_key("kafka_brokers"), "{text}");
        Ok(())
    }

    #[test]
    fn worker_files_name_coordinator_brokers_and_handlers() -> Result<()> {
        let text = worker_toml(WorkerFile {
            coordinator: "http://127.0.0.1:7400",
            worker_id: "w\"1",
            kafka_brokers: "127.0.0.1:9092",
            metrics_listen: None,
            settings: parse("[handlers.sleep]\nper_batch = \"1s\"\n")?,
        })?;
        let back = parse(&text)?;
        assert_eq!(back["worker_id"].as_str(), Some("w\"1"), "{text}");
        assert_eq!(back["coordinator"].as_str(), Some("http://127.0.0.1:7400"), "{text}");
        assert_eq!(back["handlers"]["sleep"]["per_batch"].as_str(), Some("1s"), "{text}");
        assert!(!back.contains_key("metrics_listen"), "{text}");
        Ok(())
    }

    #[test]
    fn hand_written_text_that_is_not_toml_is_refused() {
        assert!(parse("[[streams]\nname = 1").is_err());
    }
}
