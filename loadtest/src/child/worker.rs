//! `shardline-worker` as a child: a generated config naming the coordinator,
//! the brokers, its handlers and a metrics port. The worker prints nothing
//! when ready; the caller watches the coordinator (leases, checkpoints)
//! instead, which is what a benchmark of the whole system measures anyway.

use std::collections::BTreeMap;
use std::path::Path;

use shardline_testkit::config::{self, WorkerConfig};
use shardline_testkit::process;

use super::{Running, log_file, workspace};

/// One handler a worker hosts: its name and its settings.
pub type Hosted<'a> = (&'a str, Vec<(&'a str, String)>);

/// The `handlers` of a worker config: each with its string settings.
pub fn handlers(hosted: &[Hosted<'_>]) -> BTreeMap<String, toml::Table> {
    hosted.iter().map(|(name, s)| ((*name).to_owned(), config::settings(s))).collect()
}

/// A running `shardline-worker`; killed on drop.
pub struct Worker {
    run: Running,
}

impl Worker {
    /// Writes the config and starts `bin`; returns as soon as the process
    /// runs (the clock of a throughput measurement starts here).
    /// `config` gets a metrics port of its own.
    pub fn start(bin: &Path, config: &WorkerConfig) -> anyhow::Result<Self> {
        let (dir, metrics_addr) = workspace()?;
        let config_path = dir.path().join("worker.toml");
        let config = WorkerConfig { metrics_listen: Some(metrics_addr), ..config.clone() };
        config::write(&config_path, &config)?;
        let log = dir.path().join("worker.log");
        let proc = process::start_worker(bin, &config_path, "worker", log_file(&log)?)?;
        Ok(Self { run: Running { proc, log, metrics_addr, _dir: dir } })
    }

    /// Kills the worker and waits for it to be gone.
    pub fn stop(self) -> anyhow::Result<()> {
        self.run.stop()
    }

    /// SIGTERM, then waits for the worker to drain and exit (see
    /// [`Running::terminate`]).
    pub async fn terminate(&mut self, within: std::time::Duration) -> anyhow::Result<()> {
        self.run.terminate(within).await
    }
}

impl std::ops::Deref for Worker {
    type Target = Running;

    fn deref(&self) -> &Running {
        &self.run
    }
}

impl std::ops::DerefMut for Worker {
    fn deref_mut(&mut self) -> &mut Running {
        &mut self.run
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_carry_their_string_settings() {
        let two = [("sleep", vec![("per_batch", "1s".to_owned())]), ("forward", vec![])];
        let h = handlers(&two);
        assert_eq!(h["sleep"]["per_batch"].as_str(), Some("1s"));
        assert!(h["forward"].is_empty());
    }
}
