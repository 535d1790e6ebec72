//! The config files the harnesses give the binaries: values of the
//! binaries' own config types, serialized as TOML. Every default keeps its
//! one home in the binary, a renamed field fails to compile here, and
//! names with quotes or newlines stay valid.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
pub use shardline_coordinator::config::{
    Backoff, BatchSettings, Config as CoordinatorConfig, FilterConfig, QueueType, ServerTls, Store,
    StreamConfig, SubscriptionConfig, TopicConfig, TopicKind,
};
pub use shardline_gateway::config::GatewayConfig;
pub use shardline_worker::WorkerConfig;

/// A handler's settings table from `key, value` pairs of strings.
pub fn settings<V: AsRef<str>>(pairs: &[(&str, V)]) -> toml::Table {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.as_ref().into())).collect()
}

/// A worker config hosting `handler` with string `settings`, defaults
/// elsewhere.
pub fn hosting<V: AsRef<str>>(handler: &str, settings: &[(&str, V)]) -> WorkerConfig {
    let mut config = WorkerConfig::default();
    config.handlers.insert(handler.to_owned(), self::settings(settings));
    config
}

/// Writes `config` to `path` as TOML.
pub fn write(path: &Path, config: &impl Serialize) -> Result<()> {
    let text = toml::to_string(config).context("cannot write a config as TOML")?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Config text a test wrote by hand, as a value (what is not in it keeps
/// the binary's default).
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T> {
    toml::from_str(text).with_context(|| format!("not a valid config:\n{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_written_read_back_as_the_same_values() -> Result<()> {
        let dir = std::env::temp_dir().join(crate::unique("kit-config"));
        std::fs::create_dir_all(&dir)?;
        let coordinator = CoordinatorConfig {
            data_dir: "/tmp/a \"b\"\n".into(),
            streams: vec![StreamConfig::new("s", "noop")],
            subscriptions: vec![SubscriptionConfig::new("q", "t", "forward")],
            ..CoordinatorConfig::default()
        };
        write(&dir.join("c.toml"), &coordinator)?;
        let back: CoordinatorConfig = parse(&std::fs::read_to_string(dir.join("c.toml"))?)?;
        assert_eq!(back, coordinator);
        let worker =
            WorkerConfig { worker_id: Some("w\"1".into()), ..hosting("sleep", &[("per_batch", "1s")]) };
        write(&dir.join("w.toml"), &worker)?;
        let back: WorkerConfig = parse(&std::fs::read_to_string(dir.join("w.toml"))?)?;
        assert_eq!(back, worker);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn hand_written_text_with_an_unknown_key_is_refused() {
        assert!(parse::<CoordinatorConfig>("[[streams]]\nname = \"a\"\nhandlr = \"x\"\n").is_err());
        assert!(parse::<WorkerConfig>("[[streams]\nname = 1").is_err());
    }
}
