//! A function handler's settings (`[handlers.NAME] kind = "function"`),
//! read strictly: the worker's config check runs them at load, so a bad
//! one exits 2 naming `handlers.NAME.KEY` before anything starts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use shardline_config::Invalid;
use shardline_proto::{LeaseId, LeaseKind};

use super::event::EventFormat;

/// The `kind` that makes a handler table a function.
pub const KIND: &str = "function";

/// Whether a `[handlers.NAME]` table asks for a function process pool
/// rather than a handler compiled into the worker.
pub fn is_function(settings: &toml::Table) -> bool {
    settings.get("kind").and_then(toml::Value::as_str) == Some(KIND)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSettings {
    /// Always `"function"` here (checked by [`is_function`]).
    pub kind: String,
    /// The process to start: program and arguments.
    pub command: Vec<String>,
    /// `_HANDLER`, for runtime clients that read it.
    #[serde(default)]
    pub handler: Option<String>,
    /// Extra environment, over the worker's own.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The processes' working directory (and `LAMBDA_TASK_ROOT`).
    #[serde(default)]
    pub working_dir: Option<PathBuf>,
    /// Processes per node; default: the node's batch concurrency.
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// Which Lambda event the function gets; default `kafka` for streams
    /// and `sqs` for subscriptions.
    #[serde(default)]
    pub event_format: Option<EventFormats>,
    /// A limit on each process's data segment (`RLIMIT_DATA`), like
    /// `"512MiB"`; also its `AWS_LAMBDA_FUNCTION_MEMORY_SIZE`.
    #[serde(default)]
    pub memory_limit: Option<String>,
    /// How long a process may take from start to its first request for
    /// an invocation (Lambda's init phase: 10 s).
    #[serde(default = "init_timeout", with = "humantime_serde")]
    pub init_timeout: Duration,
    /// `AWS_LAMBDA_FUNCTION_NAME` and the ARN's name; default the
    /// handler's name.
    #[serde(default)]
    pub function_name: Option<String>,
}

fn init_timeout() -> Duration {
    Duration::from_secs(10)
}

/// One format for every mapping, or one per mapping name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum EventFormats {
    All(EventFormat),
    ByMapping(BTreeMap<String, EventFormat>),
}

const FORMATS: &str = "kafka or kinesis (streams), sqs, sns or rmq (subscriptions), \
                       or a table of them by mapping name";

impl FunctionSettings {
    /// Reads and checks `[handlers.NAME]`; the error names the field.
    pub fn parse(name: &str, table: &toml::Table) -> Result<Self, Invalid> {
        let field = |key: &str| format!("handlers.{name}.{key}");
        let settings: FunctionSettings = toml::Value::Table(table.clone()).try_into().map_err(|e| {
            let text = e.to_string();
            if text.contains("untagged enum EventFormats") {
                let shown = table.get("event_format").map_or_else(String::new, ToString::to_string);
                return Invalid::new(field("event_format"), shown, FORMATS);
            }
            Invalid::new(format!("handlers.{name}"), text.trim().to_owned(), ALLOWED)
        })?;
        match settings.command.first() {
            None => return Err(Invalid::new(field("command"), "[]", "a program and its arguments")),
            Some(p) if p.is_empty() => {
                return Err(Invalid::new(field("command"), "an empty program", "a program name or path"));
            }
            Some(_) => {}
        }
        if let Some(n) = settings.concurrency {
            shardline_config::in_range(&field("concurrency"), n, 1, 1024)?;
        }
        if let Some(dir) = &settings.working_dir
            && !dir.is_dir()
        {
            let shown = format!("`{}`, which is not a directory", dir.display());
            return Err(Invalid::new(field("working_dir"), shown, "an existing directory"));
        }
        settings.memory_limit_bytes().map_err(|shown| {
            Invalid::new(field("memory_limit"), shown, "a size like \"512MiB\" or \"2GiB\", at least 16MiB")
        })?;
        let t = settings.init_timeout;
        let ok = t >= Duration::from_millis(100) && t <= Duration::from_secs(900);
        shardline_config::ensure(ok, &field("init_timeout"), format!("{t:?}"), "100ms to 900s")?;
        if let Some(n) = &settings.function_name {
            let ok = !n.is_empty()
                && n.len() <= 140
                && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
            shardline_config::ensure(ok, &field("function_name"), n, "1 to 140 of A-Z a-z 0-9 - _")?;
        }
        for key in settings.env.keys() {
            let ok = !key.is_empty() && !key.contains('=') && !key.contains('\0');
            shardline_config::ensure(
                ok,
                &field("env"),
                format!("a variable named `{key}`"),
                "names without `=`",
            )?;
            let reserved = RESERVED.contains(&key.as_str());
            let shown = format!("`{key}`, which the worker sets");
            shardline_config::ensure(!reserved, &field("env"), shown, "any variable but the Runtime API's")?;
        }
        Ok(settings)
    }

    /// `memory_limit` in bytes; `Err` shows the bad value.
    pub fn memory_limit_bytes(&self) -> Result<Option<u64>, String> {
        let Some(text) = &self.memory_limit else { return Ok(None) };
        let t = text.trim();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(digits);
        let scale: u64 = match unit.trim() {
            "B" | "" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            _ => return Err(format!("\"{text}\"")),
        };
        let bytes = number.parse::<u64>().ok().and_then(|n| n.checked_mul(scale));
        match bytes {
            Some(b) if b >= 16 << 20 => Ok(Some(b)),
            _ => Err(format!("\"{text}\"")),
        }
    }

    /// The format for a batch of `lease`, or why none fits.
    pub fn format_for(&self, lease: &LeaseId) -> Result<EventFormat, String> {
        let stream = lease.kind == LeaseKind::Shard;
        let default = if stream { EventFormat::Kafka } else { EventFormat::Sqs };
        let format = match &self.event_format {
            None => default,
            Some(EventFormats::All(f)) => *f,
            Some(EventFormats::ByMapping(by)) => by.get(&lease.name).copied().unwrap_or(default),
        };
        if format.for_streams() == stream {
            return Ok(format);
        }
        let (what, fits) = if stream {
            ("a Kafka stream", "kafka or kinesis")
        } else {
            ("a subscription", "sqs, sns or rmq")
        };
        Err(format!(
            "event_format `{}` does not fit `{}`, which is {what}: use {fits} (event_format can be a table by \
             mapping name)",
            format.name(),
            lease.name
        ))
    }
}

const ALLOWED: &str = "kind = \"function\", command (required), handler, env, working_dir, concurrency, \
                       event_format, memory_limit, init_timeout, function_name";

/// Variables the worker sets for the Runtime API; `env` may not change them.
pub const RESERVED: [&str; 3] = ["AWS_LAMBDA_RUNTIME_API", "AWS_LAMBDA_FUNCTION_NAME", "_HANDLER"];

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FunctionSettings, Invalid> {
        let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}"));
        FunctionSettings::parse("f", &table)
    }

    #[test]
    fn reads_every_setting_and_names_the_bad_one() {
        let full = parse(
            "kind = \"function\"\ncommand = [\"python3\", \"-m\", \"awslambdaric\", \"app.handler\"]\n\
             handler = \"app.handler\"\nenv = { A = \"1\" }\nworking_dir = \"/tmp\"\nconcurrency = 2\n\
             event_format = { clicks = \"kinesis\", mail = \"sns\" }\nmemory_limit = \"512MiB\"\n\
             init_timeout = \"3s\"\nfunction_name = \"thumbs\"\n",
        );
        let full = full.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(full.memory_limit_bytes(), Ok(Some(512 << 20)));
        assert_eq!(full.init_timeout, Duration::from_secs(3));
        assert_eq!(full.format_for(&LeaseId::shard("clicks", 0)), Ok(EventFormat::Kinesis));
        assert_eq!(full.format_for(&LeaseId::shard("other", 0)), Ok(EventFormat::Kafka));
        let slot = LeaseId { kind: LeaseKind::QueueSlot, name: "mail".into(), index: 0 };
        assert_eq!(full.format_for(&slot), Ok(EventFormat::Sns));

        let field =
            |text: &str| parse(&format!("kind = \"function\"\n{text}")).map(|_| ()).map_err(|e| e.field);
        assert_eq!(field("command = [\"x\"]"), Ok(()));
        assert_eq!(field("command = []"), Err("handlers.f.command".into()));
        assert_eq!(field("command = [\"x\"]\nconcurrency = 0"), Err("handlers.f.concurrency".into()));
        assert_eq!(
            field("command = [\"x\"]\nmemory_limit = \"lots\""),
            Err("handlers.f.memory_limit".into())
        );
        assert_eq!(
            field("command = [\"x\"]\nmemory_limit = \"1MiB\""),
            Err("handlers.f.memory_limit".into())
        );
        assert_eq!(field("command = [\"x\"]\nevent_format = \"xml\""), Err("handlers.f.event_format".into()));
        assert_eq!(
            field("command = [\"x\"]\nworking_dir = \"/nonexistent/dir\""),
            Err("handlers.f.working_dir".into())
        );
        assert_eq!(field("command = [\"x\"]\ninit_timeout = \"1h\""), Err("handlers.f.init_timeout".into()));
        assert_eq!(field("command = [\"x\"]\nenv = { _HANDLER = \"x\" }"), Err("handlers.f.env".into()));
        assert_eq!(
            field("command = [\"x\"]\nfunction_name = \"a b\""),
            Err("handlers.f.function_name".into())
        );
        let unknown = parse("kind = \"function\"\ncommand = [\"x\"]\nbogus = 1\n");
        assert!(unknown.is_err_and(|e| e.to_string().contains("bogus") && e.allowed.contains("command")));
        assert!(parse("kind = \"function\"\n").is_err_and(|e| e.to_string().contains("command")));
    }

    #[test]
    fn a_format_that_does_not_fit_the_source_is_refused_by_name() {
        let one = parse("kind = \"function\"\ncommand = [\"x\"]\nevent_format = \"sqs\"\n");
        let one = one.unwrap_or_else(|e| panic!("{e}"));
        let Err(why) = one.format_for(&LeaseId::shard("clicks", 1)) else { panic!("sqs on a stream") };
        assert!(
            why.contains("`sqs`") && why.contains("`clicks`") && why.contains("kafka or kinesis"),
            "{why}"
        );
        let slot = LeaseId { kind: LeaseKind::QueueSlot, name: "mail".into(), index: 0 };
        assert_eq!(one.format_for(&slot), Ok(EventFormat::Sqs));
    }
}
