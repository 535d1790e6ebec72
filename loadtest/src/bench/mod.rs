//! The benchmarks, one module per component measured. Each prints a short
//! table and can write its figures as JSON for tracking over time.

pub mod amqp;
pub mod coordinator;
pub mod kafka;

/// The target column: the figure, then whether it met the goal.
fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}
