//! The end-to-end tests that take a shared broker away from everyone else.
//!
//! A test that stops RabbitMQ (`stop_app`, `kill -9`) or deletes tansu
//! topics (tansu 0.6.0 deletes every topic of the cluster) breaks any other
//! test using that broker at the same time, in this process or another.
//! Exactly those tests call [`broker_outage`] before they start: it holds
//! an exclusive lock on [`OUTAGE_LOCK`] for as long as the test runs, so two
//! outages never overlap. Everything else running beside them is kept out
//! by running end-to-end tests one binary at a time (cargo's default) and
//! under `flock /tmp/shardline-e2e.lock` where several checkouts share the
//! brokers; this lock is a different file, so taking it under that `flock`
//! cannot deadlock.

use std::fs::File;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result, bail};

/// The lock file of broker outages.
pub const OUTAGE_LOCK: &str = "/tmp/shardline-broker-outage.lock";

/// Held for the length of a test that disrupts a shared broker; released
/// when dropped (the file is closed).
#[derive(Debug)]
pub struct Outage {
    /// Holds the lock until closed.
    _lock: File,
}

/// Takes the exclusive outage lock, waiting for any other outage to end.
pub async fn broker_outage() -> Result<Outage> {
    tokio::task::spawn_blocking(|| {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(OUTAGE_LOCK)
            .with_context(|| format!("open {OUTAGE_LOCK}"))?;
        // SAFETY: flock(2) on a descriptor this function owns; no memory.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            bail!("flock {OUTAGE_LOCK}: {}", std::io::Error::last_os_error());
        }
        Ok(Outage { _lock: file })
    })
    .await
    .context("outage lock task")?
}
