//! The handler's settings (`[handlers.materialized-view]` in the worker's
//! config), checked whole at `init` so a bad one stops the worker before it
//! joins, naming the key and what is allowed.

use std::time::Duration;

/// Keys `[handlers.materialized-view]` may have.
pub const KEYS: [&str; 4] = ["postgres", "schema", "connections", "idle_in_transaction_timeout"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `postgres://USER@HOST:PORT/DB` (libpq's keys, e.g. `?password=`).
    pub postgres: String,
    /// The schema the view's tables live in; created if missing.
    pub schema: String,
    /// Connections in the pool; default: the worker's batch concurrency.
    pub connections: Option<usize>,
    /// A transaction left idle this long is ended by the server: a worker
    /// frozen mid-batch (the zombie case) must not keep its partition's
    /// row locked from the lease's next owner.
    pub idle_in_transaction_timeout: Duration,
}

impl Settings {
    pub fn from_table(table: &toml::Table) -> Result<Self, String> {
        if let Some(k) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(format!("unknown setting `{k}`; allowed: {}", KEYS.join(", ")));
        }
        let string = |key: &str| match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(format!("`{key}` must be a string, not {}", v.type_str())),
        };
        let postgres = string("postgres")?.ok_or(
            "`postgres` is required: the database URL, like \"postgres://postgres@127.0.0.1:5432/test\"",
        )?;
        let schema = string("schema")?.unwrap_or_else(|| "orders_view".into());
        let identifier = schema.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && schema.len() <= 63;
        if !identifier {
            return Err(format!(
                "`schema` = {schema:?} is not allowed: lower-case letters, digits and `_`, not starting with a digit, at most 63"
            ));
        }
        let connections = match table.get("connections") {
            None => None,
            Some(toml::Value::Integer(n)) if (1..=256).contains(n) => usize::try_from(*n).ok(),
            Some(v) => return Err(format!("`connections` = {v} is not allowed: an integer from 1 to 256")),
        };
        let idle_in_transaction_timeout = match string("idle_in_transaction_timeout")? {
            None => Duration::from_secs(10),
            Some(s) => match humantime::parse_duration(&s) {
                Ok(d) if (Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&d) => d,
                _ => {
                    return Err(format!(
                        "`idle_in_transaction_timeout` = {s:?} is not allowed: a duration like \"10s\" or \"500ms\", from 100ms to 1h"
                    ));
                }
            },
        };
        Ok(Self { postgres, schema, connections, idle_in_transaction_timeout })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn defaults_and_bad_values_name_the_key() {
        let s =
            Settings::from_table(&table("postgres = \"postgres://h/db\"")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s.schema.as_str(), s.connections), ("orders_view", None));
        assert_eq!(s.idle_in_transaction_timeout, Duration::from_secs(10));
        let bad = |text: &str| Settings::from_table(&table(text)).err().unwrap_or_default();
        assert!(bad("").starts_with("`postgres` is required"));
        assert!(
            bad("postgres = \"x\"\nschema = \"a; drop\"")
                .starts_with("`schema` = \"a; drop\" is not allowed")
        );
        assert!(bad("postgres = \"x\"\nconnections = 0").starts_with("`connections` = 0 is not allowed"));
        assert!(bad("postgres = \"x\"\nidle_in_transaction_timeout = \"2h\"").contains("is not allowed"));
        assert!(bad("postgres = \"x\"\ntable = \"t\"").starts_with("unknown setting `table`"));
    }

    /// The shipped worker.toml, as the worker reads it, and its handler
    /// table as `init` reads it.
    #[test]
    fn the_shipped_worker_config_is_valid() {
        use shardline_worker::ConfigFile;
        let c = shardline_worker::WorkerConfig::parse(include_str!("../worker.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.validate(), Ok(()));
        let table =
            c.handlers.get("materialized-view").unwrap_or_else(|| panic!("no [handlers.materialized-view]"));
        let s = Settings::from_table(table).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.schema, "orders_view");
    }
}
