//! shardline's worker: the handler SDK and the runtime.
//!
//! Write a [`Handler`] (`init` once per node, `handle` once per batch) and
//! run it in your own `main`:
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
//! Layers, bottom up: [`source`] (records from Kafka) and [`amqp`]
//! (deliveries from RabbitMQ) → [`batcher`] → [`policy`] (retries; the
//! handler runs here) → [`lease`] (one shard's loop) or [`amqp::slot`] (one
//! queue slot's loop) → [`runtime`] (instructions from the coordinator,
//! drain on shutdown). [`membership`] and [`checkpointer`] talk to the
//! coordinator.

pub mod amqp;
pub mod batcher;
pub mod builtin;
pub mod checkpointer;
pub mod config;
pub mod failure;
pub mod handler;
pub mod lease;
pub mod membership;
pub mod policy;
pub mod runtime;
pub mod source;

pub use config::{ConfigError, ConfigFile, WorkerConfig};
pub use handler::{Batch, BatchResponse, Handler, HandlerError, Handlers, InitContext, InitError, Record};
pub use membership::{HeldLeases, LeaseEvent, Session, SessionConfig, SessionError};
pub use runtime::{WorkerError, run};
