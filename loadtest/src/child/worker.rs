//! `shardline-worker` as a child: a generated config naming the coordinator,
//! the brokers, its handlers and a metrics port. The worker prints nothing
//! when ready; the caller watches the coordinator (leases, checkpoints)
//! instead, which is what a benchmark of the whole system measures anyway.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use anyhow::Context;
use tokio::process::Command;

use super::{Proc, Running, check_bin, free_port, quote, temp_dir};

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

/// A running `shardline-worker`; killed on drop.
pub struct Worker {
    run: Running,
}

impl Worker {
    /// Writes the config and starts `bin`; returns as soon as the process
    /// runs (the clock of a throughput measurement starts here).
    pub fn start(bin: &Path, settings: &WorkerSettings<'_>) -> anyhow::Result<Self> {
        check_bin(bin, "worker", "--worker-bin")?;
        let dir = temp_dir()?;
        let config_path = dir.path().join("worker.toml");
        let metrics_addr = free_port().context("cannot find a free port for the worker's metrics")?;
        std::fs::write(&config_path, config_toml(metrics_addr, settings))
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let mut command = Command::new(bin);
        // Handlers such as `log` print records on stdout; nobody reads them.
        command.arg("--config").arg(&config_path).stdout(Stdio::null());
        let proc = Proc::spawn("worker", command, dir.path().join("worker.log"))?;
        Ok(Self { run: Running { proc, metrics_addr, _dir: dir } })
    }
}

fn config_toml(metrics: SocketAddr, s: &WorkerSettings<'_>) -> String {
    let mut toml = format!(
        "coordinator = {}\nworker_id = {}\nkafka_brokers = {}\nmetrics_listen = \"{metrics}\"\n",
        quote(s.coordinator),
        quote(s.worker_id),
        quote(s.kafka_brokers)
    );
    if let Some(kib) = s.fetch_queue_kib {
        toml.push_str(&format!("fetch_queue_kib = {kib}\n"));
    }
    if let Some(url) = s.amqp_url {
        toml.push_str(&format!("amqp_url = {}\n", quote(url)));
    }
    if let Some(n) = s.max_inflight_batches {
        toml.push_str(&format!("max_inflight_batches = {n}\n"));
    }
    for (handler, settings) in s.handlers {
        toml.push_str(&format!("\n[handlers.{}]\n", quote(handler)));
        for (key, value) in settings {
            toml.push_str(&format!("{key} = {}\n", quote(value)));
        }
    }
    toml
}

impl Worker {
    /// Kills the worker and waits for it to be gone.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.run.stop().await
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
    fn config_names_coordinator_brokers_metrics_and_handler() {
        let settings = WorkerSettings {
            coordinator: "http://127.0.0.1:7400",
            worker_id: "bench",
            kafka_brokers: "127.0.0.1:9092",
            handlers: &[("noop", Vec::new())],
            fetch_queue_kib: Some(1024),
            amqp_url: None,
            max_inflight_batches: None,
        };
        let toml = config_toml(SocketAddr::from(([127, 0, 0, 1], 9500)), &settings);
        assert_eq!(
            toml,
            "coordinator = \"http://127.0.0.1:7400\"\nworker_id = \"bench\"\nkafka_brokers = \"127.0.0.1:9092\"\n\
             metrics_listen = \"127.0.0.1:9500\"\nfetch_queue_kib = 1024\n\n[handlers.\"noop\"]\n"
        );
        let toml = config_toml(
            SocketAddr::from(([127, 0, 0, 1], 9500)),
            &WorkerSettings { fetch_queue_kib: None, ..settings },
        );
        assert!(!toml.contains("fetch_queue_kib"), "{toml}");
        let toml = config_toml(
            SocketAddr::from(([127, 0, 0, 1], 9500)),
            &WorkerSettings { amqp_url: Some("amqp://u:p@h:5672/%2f"), ..settings },
        );
        assert!(toml.contains("amqp_url = \"amqp://u:p@h:5672/%2f\"\n"), "{toml}");
        let two = [
            ("sleep", vec![("per_batch", "1s".to_owned())]),
            ("forward", vec![("exchange", "r".to_owned())]),
        ];
        let toml = config_toml(
            SocketAddr::from(([127, 0, 0, 1], 9500)),
            &WorkerSettings { handlers: &two, ..settings },
        );
        assert!(
            toml.ends_with(
                "[handlers.\"sleep\"]\nper_batch = \"1s\"\n\n[handlers.\"forward\"]\nexchange = \"r\"\n"
            ),
            "{toml}"
        );
    }
}
