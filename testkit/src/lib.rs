//! The test kit: what the end-to-end tests (`tests/`) and the load harness
//! (`loadtest/`) share, one copy of each: the real binaries as child
//! processes killed on drop ([`process`]), the config files they are given
//! ([`config`]), Prometheus scrapes where a missing series is an error
//! ([`metrics`]), Kafka topic admin ([`kafka`]), RabbitMQ connections and
//! clean-up ([`amqp`]), whole-broker faults with their restarts
//! ([`broker`]), and the counting of receipts into lost, duplicated
//! and out-of-order records ([`receipts`]), and a test certificate
//! authority ([`tls`]).
//!
//! Production code never depends on this crate.

pub mod amqp;
pub mod broker;
pub mod config;
pub mod kafka;
pub mod metrics;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod receipts;
pub mod tls;

use std::net::SocketAddr;

use anyhow::Context;

/// A name no other run used (`<prefix>-<pid>-<nanos>`): topics, queues and
/// lease names accept every character of it.
pub fn unique(prefix: &str) -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// A loopback address free a moment ago. A child binds it a little later;
/// another process taking it in between fails that start loudly.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("bind port 0")?;
    listener.local_addr().context("the address of a port-0 listener")
}
