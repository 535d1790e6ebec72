//! shardline's worker library.
//!
//! Today it holds the worker's side of the lease protocol ([`membership`])
//! and a runtime that joins the fleet and holds leases ([`hold`]); the
//! handler SDK, the Kafka and AMQP sources and the batch policy build on
//! these (see the open issues and ARCHITECTURE.md).

pub mod hold;
pub mod membership;

pub use membership::{HeldLeases, LeaseEvent, Session, SessionConfig, SessionError};
