//! A materialized view kept in PostgreSQL from a Kafka change stream,
//! effectively exactly once: the `materialized-view` handler (see
//! [`view`] for how a batch is applied and how the lease epoch fences a
//! zombie), the change envelope ([`change`]), its settings, its connection
//! pool, and the generator behind the `order-changes` producer.

pub mod change;
pub mod generate;
pub mod pool;
pub mod settings;
pub mod view;

pub use view::View;
