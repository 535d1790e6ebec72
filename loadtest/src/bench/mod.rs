//! The benchmarks, one module per component measured. Each prints a short
//! table and can write its figures as JSON for tracking over time.

pub mod coordinator;
