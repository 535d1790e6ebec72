//! `shardline-worker` as a child: a generated config naming the coordinator,
//! the brokers, its handlers and a metrics port. The worker prints nothing
//! when ready; the caller watches the coordinator (leases, checkpoints)
//! instead, which is what a benchmark of the whole system measures anyway.

use std::path::Path;

use anyhow::Context;
use shardline_testkit::config::{self, WorkerFile};
use shardline_testkit::process;
use toml::Table;

use super::{Running, log_file, workspace};

/// What goes into the worker's config.
pub struct WorkerSettings<'a> {
    /// The coordinator's gRPC URL.
    pub coordinator: &'a str,
    pub worker_id: &'a str,
    pub kafka_brokers: &'a str,
    /// The handlers hosted (`noop`, `sleep`, ...), each with its settings
    /// as `key = "value"` string settings.
    pub handlers: &'a [Hosted<'a>],
    /// `fetch_queue_kib`; `None`: the worker's default.
    pub fetch_queue_kib: Option<u32>,
    /// `amqp_url`; `None`: the worker's default (local RabbitMQ).
    pub amqp_url: Option<&'a str>,
    /// The node's capacity in concurrent batches; `None`: no limit.
    pub max_inflight_batches: Option<u32>,
}

/// One handler a worker hosts: its name and its settings.
pub type Hosted<'a> = (&'a str, Vec<(&'a str, String)>);

impl WorkerSettings<'_> {
    /// Everything but the fixed keys, for the config file.
    fn table(&self) -> Table {
        let mut t = Table::new();
        t.extend(self.fetch_queue_kib.map(|k| ("fetch_queue_kib".to_owned(), i64::from(k).into())));
        t.extend(self.amqp_url.map(|u| ("amqp_url".to_owned(), u.into())));
        t.extend(self.max_inflight_batches.map(|n| ("max_inflight_batches".to_owned(), i64::from(n).into())));
        let handlers = self.handlers.iter().map(|(name, settings)| {
            let settings = config::table(settings.iter().map(|(k, v)| (*k, v.as_str().into())));
            ((*name).to_owned(), settings.into())
        });
        t.insert("handlers".into(), Table::from_iter(handlers).into());
        t
    }
}

/// A running `shardline-worker`; killed on drop.
pub struct Worker {
    run: Running,
}

impl Worker {
    /// Writes the config and starts `bin`; returns as soon as the process
    /// runs (the clock of a throughput measurement starts here).
    pub fn start(bin: &Path, settings: &WorkerSettings<'_>) -> anyhow::Result<Self> {
        let (dir, metrics_addr) = workspace()?;
        let config_path = dir.path().join("worker.toml");
        let text = config::worker_toml(WorkerFile {
            coordinator: settings.coordinator,
            worker_id: settings.worker_id,
            kafka_brokers: settings.kafka_brokers,
            metrics_listen: Some(metrics_addr),
            settings: settings.table(),
        })?;
        std::fs::write(&config_path, text)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let log = dir.path().join("worker.log");
        let proc = process::start_worker(bin, &config_path, "worker", log_file(&log)?)?;
        Ok(Self { run: Running { proc, log, metrics_addr, _dir: dir } })
    }

    /// Kills the worker and waits for it to be gone.
    pub fn stop(self) -> anyhow::Result<()> {
        self.run.stop()
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
    fn settings_name_handlers_with_theirs_and_only_the_options_given() {
        let two = [
            ("sleep", vec![("per_batch", "1s".to_owned())]),
            ("forward", vec![("exchange", "r".to_owned())]),
        ];
        let settings = WorkerSettings {
            coordinator: "http://127.0.0.1:7400",
            worker_id: "bench",
            kafka_brokers: "127.0.0.1:9092",
            handlers: &two,
            fetch_queue_kib: Some(1024),
            amqp_url: None,
            max_inflight_batches: None,
        };
        let t = settings.table();
        assert_eq!(t["fetch_queue_kib"].as_integer(), Some(1024));
        assert_eq!(t["handlers"]["sleep"]["per_batch"].as_str(), Some("1s"));
        assert_eq!(t["handlers"]["forward"]["exchange"].as_str(), Some("r"));
        assert!(!t.contains_key("amqp_url") && !t.contains_key("max_inflight_batches"), "{t}");
        let t = WorkerSettings { amqp_url: Some("amqp://u:p@h:5672/%2f"), handlers: &[], ..settings }.table();
        assert_eq!(t["amqp_url"].as_str(), Some("amqp://u:p@h:5672/%2f"));
    }
}
