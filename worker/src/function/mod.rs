//! The `function` handler kind: users' existing AWS Lambda functions, in
//! any language, run unchanged through the Lambda Runtime API.
//!
//! `[handlers.NAME] kind = "function"` ([`settings`]) starts a pool of the
//! function's processes ([`pool`]), each polling its own loopback Runtime
//! API endpoint ([`api`]). Each batch is one invocation: its event is the
//! Lambda event of the mapping's `event_format` ([`event`]); the reply's
//! `batchItemFailures` become the batch's failed records; an error the
//! function reports, a crash or a timeout fail the batch, which then goes
//! through the mapping's retry, bisect and on_failure policy like any
//! handler's failure.

pub mod api;
pub mod event;
pub mod pool;
pub mod settings;

use std::time::Duration;

use axum::body::Bytes;
use serde_json::Value;

use self::event::EventFormat;
use self::pool::{Outcome, Pool, Spec};
pub use self::settings::{FunctionSettings, KIND, is_function};
use crate::handler::{Batch, BatchResponse, Handler, HandlerError, InitContext, InitError};

/// Region and account in the ARNs a function sees (nothing in AWS).
const ARN_PREFIX: &str = "arn:aws:lambda:local:000000000000:function";

pub struct Function {
    name: String,
    settings: FunctionSettings,
    pool: Pool,
    brokers: String,
}

impl Handler for Function {
    async fn init(ctx: &InitContext) -> Result<Self, InitError> {
        let settings =
            FunctionSettings::parse(&ctx.name, &ctx.settings).map_err(|e| ctx.error(e.to_string()))?;
        let processes = settings.concurrency.unwrap_or(ctx.concurrency).max(1);
        let memory_limit =
            settings.memory_limit_bytes().map_err(|e| ctx.error(format!("memory_limit {e}")))?;
        let function_name = settings.function_name.clone().unwrap_or_else(|| ctx.name.clone());
        let spec = Spec {
            handler: ctx.name.clone(),
            command: settings.command.clone(),
            env: environment(&settings, &function_name, memory_limit),
            working_dir: settings.working_dir.clone(),
            memory_limit,
            init_timeout: settings.init_timeout,
            function_arn: format!("{ARN_PREFIX}:{function_name}"),
            processes,
        };
        // A program that is not there is a config mistake: refuse to start
        // (exit 2) rather than retry it forever.
        if let Some(program) = spec.command.first() {
            which(program, settings.working_dir.as_deref(), settings.env.get("PATH"))
                .map_err(|e| ctx.error(e))?;
        }
        let pool = Pool::start(spec, ctx.health.clone());
        // Wait for one process to initialise (or fail to) so the worker's
        // first batches do not race the cold start, as Lambda's first
        // invocation waits for its init. A failure does not stop the
        // worker: it is unhealthy, and the pool retries with backoff.
        let mut status = pool.status();
        let wait = settings.init_timeout + Duration::from_secs(1);
        let first = tokio::time::timeout(wait, status.wait_for(|s| s.ready > 0 || s.init_failure.is_some()));
        match first.await {
            Ok(Ok(s)) if s.ready > 0 => tracing::info!(handler = %ctx.name, processes, "function ready"),
            Ok(Ok(s)) => tracing::error!(
                handler = %ctx.name,
                reason = s.init_failure.as_deref().unwrap_or_default(),
                "the function does not initialise; its batches fail until it does (retrying with backoff)"
            ),
            Ok(Err(_)) | Err(_) => {
                tracing::warn!(handler = %ctx.name, "the function's first process is still starting")
            }
        }
        Ok(Self { name: ctx.name.clone(), settings, pool, brokers: ctx.kafka_brokers.clone() })
    }

    async fn handle(&self, batch: &Batch) -> Result<BatchResponse, HandlerError> {
        let format = self.settings.format_for(&batch.lease).map_err(HandlerError::new)?;
        let body = event::event(format, batch, &self.brokers)
            .map_err(|e| HandlerError::new(format!("cannot encode the {} event: {e}", format.name())))?;
        let deadline = match batch.deadline_ms {
            0 => crate::unix_ms() + 15 * 60 * 1000,
            d => d,
        };
        let outcome = self.pool.invoke(Bytes::from(body), deadline, trace_id(batch)).await;
        let name = &self.name;
        match outcome.map_err(|e| HandlerError::new(format!("function `{name}`: {e}")))? {
            Outcome::Response(reply) => self.reply(format, batch, &reply),
            Outcome::Error(e) => Err(HandlerError::new(format!("function `{name}` failed: {e}"))),
            Outcome::Died(why) => Err(HandlerError::new(format!("function `{name}`: {why}"))),
        }
    }

    async fn shutdown(&self) {
        self.pool.shutdown().await;
    }
}

impl Function {
    /// A reply's `batchItemFailures` as failed positions. An empty reply
    /// or one without the list means every record succeeded; a reply
    /// that is not JSON fails the batch (as Lambda treats an invalid
    /// response when it reads item failures).
    fn reply(&self, format: EventFormat, batch: &Batch, reply: &[u8]) -> Result<BatchResponse, HandlerError> {
        let value: Value = if reply.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(reply).map_err(|e| {
                let shown = String::from_utf8_lossy(&reply[..reply.len().min(200)]).into_owned();
                HandlerError::new(format!(
                    "function `{}` replied with something that is not JSON ({e}): {shown}",
                    self.name
                ))
            })?
        };
        let failed = event::failures(format, batch, &value)
            .map_err(|e| HandlerError::new(format!("function `{}`: {e}", self.name)))?;
        Ok(BatchResponse::failed(failed))
    }
}

/// What every process of the function gets beyond the worker's own
/// environment: the variables Lambda documents, then the user's `env`.
fn environment(
    settings: &FunctionSettings,
    function_name: &str,
    memory_limit: Option<u64>,
) -> Vec<(String, String)> {
    let memory_mib = memory_limit.map_or_else(machine_memory_mib, |b| b >> 20);
    let task_root = settings
        .working_dir
        .clone()
        .and_then(|d| std::fs::canonicalize(d).ok())
        .or_else(|| std::env::current_dir().ok())
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let mut env = vec![
        ("AWS_LAMBDA_FUNCTION_NAME".to_owned(), function_name.to_owned()),
        ("AWS_LAMBDA_FUNCTION_VERSION".to_owned(), "$LATEST".to_owned()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE".to_owned(), memory_mib.to_string()),
        ("AWS_LAMBDA_LOG_GROUP_NAME".to_owned(), format!("/aws/lambda/{function_name}")),
        ("AWS_LAMBDA_INITIALIZATION_TYPE".to_owned(), "on-demand".to_owned()),
        ("AWS_REGION".to_owned(), "local".to_owned()),
        ("AWS_DEFAULT_REGION".to_owned(), "local".to_owned()),
        ("AWS_EXECUTION_ENV".to_owned(), "shardline".to_owned()),
        ("LAMBDA_TASK_ROOT".to_owned(), task_root),
    ];
    if let Some(handler) = &settings.handler {
        env.push(("_HANDLER".to_owned(), handler.clone()));
    }
    env.extend(settings.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// The machine's memory in MiB (what a process without `memory_limit`
/// may use); 10240 (Lambda's largest) where /proc does not say.
fn machine_memory_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kib.map_or(10240, |k| k / 1024)
}

/// The batch's trace id: a record's `X-Amzn-Trace-Id` header passed
/// through, else a new X-Ray-shaped root (there is no X-Ray here; a
/// function's tracing library still finds the id it expects).
fn trace_id(batch: &Batch) -> String {
    let passed = batch.records.iter().find_map(|r| {
        r.headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("x-amzn-trace-id"))
            .map(|(_, v)| v.clone())
    });
    if let Some(Ok(id)) = passed.map(String::from_utf8) {
        return id;
    }
    let secs = crate::unix_ms() / 1000;
    let id = pool::request_id().replace('-', "");
    format!("Root=1-{secs:08x}-{};Sampled=0", &id[..24])
}

/// Finds `program` as the OS would run it: a path (relative to the
/// working directory) or a name on `PATH` (the function's own, when its
/// `env` sets one).
fn which(
    program: &str,
    working_dir: Option<&std::path::Path>,
    path_var: Option<&String>,
) -> Result<(), String> {
    let path = std::path::Path::new(program);
    let found = if program.contains('/') {
        let full = match working_dir {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        };
        full.is_file()
    } else {
        path_var
            .map(std::ffi::OsString::from)
            .or_else(|| std::env::var_os("PATH"))
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
    };
    if found {
        Ok(())
    } else {
        Err(format!("command `{program}` not found (looked on PATH and in working_dir)"))
    }
}

#[cfg(test)]
mod tests;
