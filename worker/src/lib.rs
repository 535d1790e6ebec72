//! shardline's worker: the handler SDK and the runtime.
//!
//! Write a [`Handler`] (`init` once per node, `handle` once per batch) and
//! make it a worker binary with [`main`] (the stock binary's command line,
//! logging, metrics, signals and exit codes in one call), or run it inside
//! your own program:
//!
//! ```no_run
//! use shardline_worker::{Batch, BatchResponse, Handler, HandlerError, Handlers, InitContext, InitError};
//!
//! struct Count;
//!
//! impl Handler for Count {
//!     async fn init(_ctx: &InitContext) -> Result<Self, InitError> {
//!         Ok(Count)
//!     }
//!     async fn handle(&self, batch: &Batch) -> Result<BatchResponse, HandlerError> {
//!         println!("{} records", batch.len());
//!         Ok(BatchResponse::default())
//!     }
//! }
//!
//! # async fn example() -> Result<(), shardline_worker::WorkerError> {
//! let config = shardline_worker::WorkerConfig::hosting(["count"]);
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! shardline_worker::run(config, Handlers::new().with::<Count>("count"), shutdown).await
//! # }
//! ```
//!
//! Layers, bottom up (a layer imports only those below it): the clients
//! ([`amqp`]) → [`sink`] (where records the worker writes go) → [`source`]
//! (Kafka partitions and queue slots) → [`batcher`] and [`policy`] (the
//! handler runs here) → [`driver`] (one lease's loop, for every source) →
//! [`runtime`]. [`membership`] and [`checkpointer`] talk to the coordinator;
//! the runtime's HTTP endpoint (`metrics_listen`) serves `/metrics`,
//! `/healthz` and `/readyz`.

pub mod amqp;
pub mod batcher;
pub mod builtin;
pub mod checkpointer;
pub mod config;
pub mod driver;
mod endpoint;
mod entry;
pub mod function;
pub mod handler;
pub mod health;
pub mod membership;
pub mod policy;
pub mod runtime;
pub mod sink;
pub mod source;

pub use config::{ConfigError, ConfigFile, WorkerConfig};
pub use entry::main;
pub use handler::{
    Batch, BatchResponse, Fence, Handler, HandlerError, Handlers, InitContext, InitError, Origin, Record,
    Reply, ReplyTo,
};
pub use membership::{HeldLeases, LeaseEvent, Session, SessionConfig, SessionError, Stand, Standing};
pub use runtime::{WorkerError, drain_on_signals, run};

/// Locks `m`. A lock is poisoned only by a panic while it was held; every
/// mutex here guards plain data changed in single steps (maps of figures,
/// pending checkpoints), so its data is still whole: the panic is reported
/// loudly where it happened, the poison here once, and work goes on.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| {
        tracing::error!("a lock was poisoned by a panic elsewhere; going on with its data");
        m.clear_poison();
        poisoned.into_inner()
    })
}

/// Wall-clock Unix ms (0 before 1970, which no reader takes for a real time).
pub(crate) fn unix_ms() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Tries `attempt` until it answers, waiting from `min` doubling up to
/// `max` between tries; `None` once `stop` fires.
pub(crate) async fn persist<T, F: std::future::Future<Output = Option<T>>>(
    stop: &tokio_util::sync::CancellationToken,
    (min, max): (std::time::Duration, std::time::Duration),
    mut attempt: impl FnMut(std::time::Duration) -> F,
) -> Option<T> {
    let mut wait = min;
    loop {
        if let Some(answer) = stop.run_until_cancelled(attempt(wait)).await? {
            return Some(answer);
        }
        stop.run_until_cancelled(tokio::time::sleep(wait)).await?;
        wait = (wait * 2).min(max);
    }
}
