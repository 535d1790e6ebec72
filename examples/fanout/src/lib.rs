//! Fan-out: one RabbitMQ topic, two subscriptions, each with its own queue,
//! handler and failure settings. [`Audit`] records every message once in
//! PostgreSQL and never gives up (`max_retries = -1`); [`Notify`] is slow
//! and gives some messages up to its dead-letter queue after a few
//! retries. Each subscription's queue holds its own backlog, so the slow
//! one never holds the other back.

pub mod audit;
pub mod db;
pub mod notify;
pub mod settings;

pub use audit::Audit;
pub use notify::Notify;
