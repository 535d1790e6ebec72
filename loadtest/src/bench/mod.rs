//! The benchmarks, one module per component measured. Each prints a short
//! table and can write its figures as JSON for tracking over time.

pub mod all;
pub mod amqp;
mod compare;
pub mod coordinator;
pub mod function;
pub mod gateway;
pub mod kafka;
pub mod latency;

use compare::verdict;
