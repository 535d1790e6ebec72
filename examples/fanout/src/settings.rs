//! The handlers' settings (`[handlers.audit]`, `[handlers.notify]` in the
//! worker's config), checked whole at `init` so a bad one stops the worker
//! before it joins, naming the key and what is allowed.

use std::time::Duration;

pub const AUDIT_KEYS: [&str; 2] = ["postgres", "schema"];
pub const NOTIFY_KEYS: [&str; 4] = ["postgres", "schema", "per_message", "bounce_domain"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    /// `postgres://USER@HOST:PORT/DB`.
    pub postgres: String,
    /// Where `audit_log` lives; created if missing.
    pub schema: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifySettings {
    pub postgres: String,
    /// Where `notified` lives; created if missing.
    pub schema: String,
    /// The simulated cost of sending one notification.
    pub per_message: Duration,
    /// Recipients at this domain bounce: those messages fail every time
    /// (the simulated permanent failure that ends in the dead-letter queue).
    pub bounce_domain: String,
}

impl AuditSettings {
    pub fn from_table(t: &toml::Table) -> Result<Self, String> {
        only(t, &AUDIT_KEYS)?;
        Ok(Self { postgres: postgres(t)?, schema: schema(t)? })
    }
}

impl NotifySettings {
    pub fn from_table(t: &toml::Table) -> Result<Self, String> {
        only(t, &NOTIFY_KEYS)?;
        let per_message = match string(t, "per_message")? {
            None => Duration::from_millis(100),
            Some(s) => match humantime::parse_duration(&s) {
                Ok(d) if d <= Duration::from_secs(60) => d,
                _ => {
                    return Err(format!(
                        "`per_message` = {s:?} is not allowed: a duration like \"100ms\", at most 60s"
                    ));
                }
            },
        };
        let bounce_domain = string(t, "bounce_domain")?.unwrap_or_else(|| "bounce.example".into());
        Ok(Self { postgres: postgres(t)?, schema: schema(t)?, per_message, bounce_domain })
    }
}

fn only(t: &toml::Table, known: &[&str]) -> Result<(), String> {
    match t.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!("unknown setting `{k}`; allowed: {}", known.join(", "))),
        None => Ok(()),
    }
}

fn string(t: &toml::Table, key: &str) -> Result<Option<String>, String> {
    match t.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(format!("`{key}` must be a string, not {}", v.type_str())),
    }
}

fn postgres(t: &toml::Table) -> Result<String, String> {
    string(t, "postgres")?.ok_or_else(|| {
        "`postgres` is required: the database URL, like \"postgres://postgres@127.0.0.1:5432/test\"".into()
    })
}

fn schema(t: &toml::Table) -> Result<String, String> {
    let schema = string(t, "schema")?.unwrap_or_else(|| "fanout".into());
    let ok = schema.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && schema.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && schema.len() <= 63;
    if ok {
        Ok(schema)
    } else {
        Err(format!(
            "`schema` = {schema:?} is not allowed: lower-case letters, digits and `_`, not starting with a digit, at most 63"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_worker::ConfigFile;

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn defaults_and_bad_values_name_the_key() {
        let n = NotifySettings::from_table(&table("postgres = \"postgres://h/db\""))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (n.schema.as_str(), n.per_message, n.bounce_domain.as_str()),
            ("fanout", Duration::from_millis(100), "bounce.example")
        );
        let bad = |text: &str| NotifySettings::from_table(&table(text)).err().unwrap_or_default();
        assert!(bad("").starts_with("`postgres` is required"));
        assert!(
            bad("postgres = \"x\"\nper_message = \"2m\"")
                .starts_with("`per_message` = \"2m\" is not allowed")
        );
        assert!(bad("postgres = \"x\"\nschema = \"A\"").starts_with("`schema` = \"A\" is not allowed"));
        let audit = AuditSettings::from_table(&table("postgres = \"x\"\nper_message = \"1s\""));
        assert_eq!(
            audit.err().unwrap_or_default(),
            "unknown setting `per_message`; allowed: postgres, schema"
        );
    }

    /// The shipped worker.toml, as the worker reads it, and its handler
    /// tables as `init` reads them.
    #[test]
    fn the_shipped_worker_config_is_valid() {
        let c = shardline_worker::WorkerConfig::parse(include_str!("../worker.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.validate(), Ok(()));
        let get = |name: &str| c.handlers.get(name).unwrap_or_else(|| panic!("no [handlers.{name}]"));
        let audit = AuditSettings::from_table(get("audit")).unwrap_or_else(|e| panic!("{e}"));
        let notify = NotifySettings::from_table(get("notify")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(audit.schema, notify.schema);
    }
}
