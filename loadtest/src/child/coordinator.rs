//! `shardline-coordinator` as a child: a generated config (loopback, port 0,
//! a temporary data dir, metrics on), started and waited for until it
//! prints `listening ADDR`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use shardline_testkit::config::{self, CoordinatorFile, coordinator_toml};
use shardline_testkit::process::{self, Proc};
use toml::{Table, Value};
use tonic::transport::{Channel, Endpoint};

use super::{Running, log_file, tail, workspace};

/// How long the binary gets to open its store and bind.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A stream in the generated config.
pub struct Stream<'a> {
    pub name: &'a str,
    pub handler: &'a str,
    /// A fixed partition count (no Kafka); `None`: discovered from Kafka.
    pub partitions: Option<u32>,
    /// `batch_size`; `None`: the coordinator's default.
    pub batch_size: Option<u32>,
    /// `starting_position` (`latest`, `trim_horizon`); `None`: the default.
    pub starting_position: Option<&'a str>,
}

impl<'a> Stream<'a> {
    /// A static stream of `partitions` leases: the coordinator alone.
    pub fn fixed(name: &'a str, handler: &'a str, partitions: u32) -> Self {
        Self { name, handler, partitions: Some(partitions), batch_size: None, starting_position: None }
    }

    fn table(&self) -> Table {
        let mut t = config::table([("name", self.name.into()), ("handler", self.handler.into())]);
        t.extend(self.partitions.map(|p| ("partitions".to_owned(), i64::from(p).into())));
        t.extend(self.batch_size.map(|b| ("batch_size".to_owned(), i64::from(b).into())));
        t.extend(self.starting_position.map(|p| ("starting_position".to_owned(), p.into())));
        t
    }
}

/// Where the coordinator finds Kafka and how often it reads metadata.
pub struct Discovery<'a> {
    pub brokers: &'a str,
    pub interval: Duration,
}

/// What the generated config holds besides the fixed parts.
pub struct Setup<'a> {
    pub streams: &'a [Stream<'a>],
    /// `None`: no Kafka settings (static streams need none).
    pub kafka: Option<Discovery<'a>>,
    /// Every other setting: RabbitMQ topics and subscriptions, a
    /// scenario's `[coordinator]` keys.
    pub extra: Table,
}

/// A running `shardline-coordinator`; killed on drop.
pub struct Coordinator {
    run: Running,
    config: Config,
    /// How many times [`Coordinator::restart`] ran: names each new log.
    restarts: u32,
}

/// What the coordinator's config says, kept to write it again for a
/// restart.
struct Config {
    /// Port 0 until the first start has bound one; then that address.
    listen: SocketAddr,
    metrics: SocketAddr,
    kafka_brokers: Option<String>,
    settings: Table,
}

impl Coordinator {
    /// Starts `bin` with static streams (no Kafka).
    pub async fn start(bin: &Path, streams: &[Stream<'_>]) -> anyhow::Result<Self> {
        Self::start_with(bin, Setup { streams, kafka: None, extra: Table::new() }).await
    }

    /// Starts `bin` on a loopback port chosen by the OS and waits for its
    /// `listening ADDR` line.
    pub async fn start_with(bin: &Path, setup: Setup<'_>) -> anyhow::Result<Self> {
        let (dir, metrics) = workspace()?;
        let mut settings = setup.extra;
        if let Some(kafka) = &setup.kafka {
            let interval = format!("{}ms", kafka.interval.as_millis().max(1));
            settings.insert("discovery_interval".into(), interval.into());
        }
        if !setup.streams.is_empty() {
            let streams = setup.streams.iter().map(|s| Value::from(s.table())).collect::<Vec<_>>();
            settings.insert("streams".into(), streams.into());
        }
        let kafka_brokers = setup.kafka.map(|k| k.brokers.to_owned());
        let mut config =
            Config { listen: SocketAddr::from(([127, 0, 0, 1], 0)), metrics, kafka_brokers, settings };
        let (proc, log) = launch(bin, dir.path(), &mut config, "coordinator.log").await?;
        Ok(Self { run: Running { proc, log, metrics_addr: metrics, _dir: dir }, config, restarts: 0 })
    }

    /// `kill -9`s the coordinator and starts `bin` again on the same
    /// address, config and data directory: workers reconnect to the URL
    /// they have, and the lease store is what the killed process left.
    /// Returns once the new process listens.
    pub async fn restart(&mut self, bin: &Path) -> anyhow::Result<()> {
        self.run.proc.kill9()?;
        self.restarts += 1;
        // A log per incarnation: the killed one's log stays readable.
        let log = format!("coordinator-{}.log", self.restarts);
        let dir = self.run.dir().to_owned();
        (self.run.proc, self.run.log) = launch(bin, &dir, &mut self.config, &log).await?;
        Ok(())
    }

    /// The gRPC URL, as a worker's `coordinator` setting.
    pub fn url(&self) -> String {
        format!("http://{}", self.config.listen)
    }

    /// Opens `n` HTTP/2 connections. Several, because the framing and IO of
    /// one connection run on one task on each side: a single connection
    /// would measure that task rather than the coordinator.
    pub async fn channels(&self, n: usize) -> anyhow::Result<Vec<Channel>> {
        let endpoint = Endpoint::from_shared(self.url())
            .context("bad coordinator address")?
            .connect_timeout(Duration::from_secs(5))
            // A stuck coordinator fails the run instead of hanging it.
            .timeout(Duration::from_secs(30))
            .tcp_nodelay(true);
        let mut channels = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let channel = endpoint
                .connect()
                .await
                .with_context(|| format!("cannot connect to the coordinator at {}", self.config.listen))?;
            channels.push(channel);
        }
        Ok(channels)
    }

    /// Kills the coordinator and waits for it to be gone.
    pub fn stop(self) -> anyhow::Result<()> {
        self.run.stop()
    }
}

/// Writes the config into `dir` and starts `bin` with its log in `log`;
/// pins `config.listen` to the address bound. The first start lets the OS
/// choose the port; the workers know that one then, so a restarted
/// process must bind exactly it.
async fn launch(bin: &Path, dir: &Path, config: &mut Config, log: &str) -> anyhow::Result<(Proc, PathBuf)> {
    let config_path = dir.join("coordinator.toml");
    let text = coordinator_toml(CoordinatorFile {
        listen: &config.listen.to_string(),
        data_dir: &dir.join("data"),
        metrics_listen: Some(config.metrics),
        kafka_brokers: config.kafka_brokers.as_deref(),
        settings: config.settings.clone(),
    })?;
    std::fs::write(&config_path, text).with_context(|| format!("cannot write {}", config_path.display()))?;
    let log = dir.join(log);
    let stderr = log_file(&log)?;
    let bin = bin.to_owned();
    let started = tokio::task::spawn_blocking(move || {
        process::start_coordinator(&bin, &config_path, stderr, START_TIMEOUT)
    })
    .await
    .context("the coordinator's starter panicked")?;
    let (proc, addr) = started.with_context(|| format!("its log:\n{}", tail(&log)))?;
    if config.listen.port() != 0 && addr != config.listen {
        bail!("the restarted coordinator listens on {addr}, not {}", config.listen);
    }
    config.listen = addr;
    Ok((proc, log))
}

impl std::ops::Deref for Coordinator {
    type Target = Running;

    fn deref(&self) -> &Running {
        &self.run
    }
}

impl std::ops::DerefMut for Coordinator {
    fn deref_mut(&mut self) -> &mut Running {
        &mut self.run
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_become_tables_with_only_the_settings_given() {
        let t = Stream::fixed("bench", "noop", 64).table();
        assert_eq!(
            toml::to_string(&t).ok().as_deref(),
            Some("handler = \"noop\"\nname = \"bench\"\npartitions = 64\n")
        );
        let t = Stream {
            batch_size: Some(1000),
            starting_position: Some("trim_horizon"),
            partitions: None,
            ..Stream::fixed("t", "h", 1)
        }
        .table();
        assert_eq!(t.get("batch_size").and_then(Value::as_integer), Some(1000));
        assert_eq!(t.get("starting_position").and_then(Value::as_str), Some("trim_horizon"));
        assert!(!t.contains_key("partitions"));
    }
}
