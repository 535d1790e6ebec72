//! `shardline-coordinator` as a child: a generated config (loopback, port 0,
//! a temporary data dir, metrics on), started and waited for until it
//! prints `listening ADDR`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tonic::transport::{Channel, Endpoint};

use super::{Proc, Running, check_bin, free_port, quote, temp_dir};

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
    /// TOML added verbatim after the top-level settings (its own top-level
    /// keys first, then tables), for what the typed fields do not cover,
    /// such as RabbitMQ topics and subscriptions.
    pub extra: Option<&'a str>,
}

/// A running `shardline-coordinator`; killed on drop.
pub struct Coordinator {
    run: Running,
    addr: SocketAddr,
    /// How many times [`Coordinator::restart`] ran: names each new log.
    restarts: u32,
}

impl Coordinator {
    /// Starts `bin` with static streams (no Kafka).
    pub async fn start(bin: &Path, streams: &[Stream<'_>]) -> anyhow::Result<Self> {
        Self::start_with(bin, &Setup { streams, kafka: None, extra: None }).await
    }

    /// Starts `bin` on a loopback port chosen by the OS and waits for its
    /// `listening ADDR` line.
    pub async fn start_with(bin: &Path, setup: &Setup<'_>) -> anyhow::Result<Self> {
        check_bin(bin, "coordinator", "--coordinator-bin")?;
        let dir = temp_dir()?;
        let config_path = dir.path().join("coordinator.toml");
        let metrics_addr = free_port().context("cannot find a free port for the metrics endpoint")?;
        std::fs::write(&config_path, config_toml(&dir.path().join("data"), metrics_addr, setup)?)
            .with_context(|| format!("cannot write {}", config_path.display()))?;

        let (proc, addr) = spawn_and_wait(bin, &config_path, dir.path().join("coordinator.log")).await?;
        Ok(Self { run: Running { proc, metrics_addr, _dir: dir }, addr, restarts: 0 })
    }

    /// `kill -9`s the coordinator and starts `bin` again on the same
    /// address, config and data directory: workers reconnect to the URL
    /// they have, and the lease store is what the killed process left.
    /// Returns once the new process listens.
    pub async fn restart(&mut self, bin: &Path) -> anyhow::Result<()> {
        let dir = self.run._dir.path().to_owned();
        let config_path = dir.join("coordinator.toml");
        let config = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?;
        // The first start let the OS choose the port; the workers know that
        // one now, so the new process must bind exactly it.
        let pinned = config.replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"{}\"", self.addr), 1);
        std::fs::write(&config_path, pinned)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        self.run.proc.child.start_kill().context("cannot kill the coordinator")?;
        tokio::time::timeout(Duration::from_secs(10), self.run.proc.child.wait())
            .await
            .context("the coordinator did not exit within 10 s of SIGKILL")?
            .context("cannot wait for the coordinator")?;
        self.restarts += 1;
        // A log per incarnation: the killed one's log stays readable.
        let log = dir.join(format!("coordinator-{}.log", self.restarts));
        let (proc, addr) = spawn_and_wait(bin, &config_path, log).await?;
        if addr != self.addr {
            bail!("the restarted coordinator listens on {addr}, not {}", self.addr);
        }
        self.run.proc = proc;
        Ok(())
    }

    /// The gRPC URL, as a worker's `coordinator` setting.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
                .with_context(|| format!("cannot connect to the coordinator at {}", self.addr))?;
            channels.push(channel);
        }
        Ok(channels)
    }
}

/// Starts `bin --config config_path` and waits for its `listening ADDR`
/// line; stdout is drained afterwards so a full pipe never blocks it.
async fn spawn_and_wait(bin: &Path, config_path: &Path, log: PathBuf) -> anyhow::Result<(Proc, SocketAddr)> {
    let mut command = Command::new(bin);
    command.arg("--config").arg(config_path).stdout(Stdio::piped());
    let mut proc = Proc::spawn("coordinator", command, log)?;
    let stdout = proc.child.stdout.take().context("the coordinator's stdout is not piped")?;

    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = line.strip_prefix("listening ") {
                return Ok::<_, std::io::Error>(Some(addr.trim().to_owned()));
            }
        }
        Ok(None)
    })
    .await;
    let addr = match ready {
        Ok(Ok(Some(addr))) => addr,
        Ok(Ok(None)) => {
            let status = proc.child.wait().await.map(|s| s.to_string()).unwrap_or_default();
            bail!("the coordinator exited ({status}) before listening; its log:\n{}", proc.log_tail(20));
        }
        Ok(Err(e)) => bail!("cannot read the coordinator's stdout: {e}"),
        Err(_) => bail!(
            "the coordinator printed no `listening` line within {START_TIMEOUT:?}; its log:\n{}",
            proc.log_tail(20)
        ),
    };
    let addr = addr.parse().with_context(|| format!("bad address in `listening {addr}`"))?;
    // Keep draining stdout: nothing else is expected there, but a full
    // pipe must never block the coordinator.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((proc, addr))
}

/// The generated config: loopback, port 0, the temp data dir, metrics on
/// (as in the example config, so their cost is measured too), the streams.
fn config_toml(data_dir: &Path, metrics: SocketAddr, setup: &Setup<'_>) -> anyhow::Result<String> {
    let data_dir = data_dir.to_str().context("the temporary directory's path is not UTF-8")?;
    let mut toml =
        format!("listen = \"127.0.0.1:0\"\nmetrics_listen = \"{metrics}\"\ndata_dir = {}\n", quote(data_dir));
    if let Some(kafka) = &setup.kafka {
        toml.push_str(&format!(
            "kafka_brokers = {}\ndiscovery_interval = \"{}ms\"\n",
            quote(kafka.brokers),
            kafka.interval.as_millis().max(1)
        ));
    }
    if let Some(extra) = setup.extra {
        // Before the streams: the extra text's top-level keys must not land
        // inside a `[[streams]]` table.
        toml.push_str(extra);
        if !extra.ends_with('\n') {
            toml.push('\n');
        }
    }
    for s in setup.streams {
        toml.push_str(&format!("\n[[streams]]\nname = {}\nhandler = {}\n", quote(s.name), quote(s.handler)));
        if let Some(partitions) = s.partitions {
            toml.push_str(&format!("partitions = {partitions}\n"));
        }
        if let Some(batch_size) = s.batch_size {
            toml.push_str(&format!("batch_size = {batch_size}\n"));
        }
        if let Some(position) = s.starting_position {
            toml.push_str(&format!("starting_position = {}\n", quote(position)));
        }
    }
    Ok(toml)
}

impl Coordinator {
    /// Kills the coordinator and waits for it to be gone.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.run.stop().await
    }
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
    fn config_quotes_paths_and_lists_static_streams() -> anyhow::Result<()> {
        let streams = [Stream::fixed("bench", "bench", 64)];
        let metrics = SocketAddr::from(([127, 0, 0, 1], 9400));
        let toml = config_toml(
            Path::new("/tmp/a \"b\""),
            metrics,
            &Setup { streams: &streams, kafka: None, extra: None },
        )?;
        assert!(toml.contains("metrics_listen = \"127.0.0.1:9400\""), "{toml}");
        assert!(toml.contains("data_dir = \"/tmp/a \\\"b\\\"\""), "{toml}");
        assert!(
            toml.contains("[[streams]]\nname = \"bench\"\nhandler = \"bench\"\npartitions = 64"),
            "{toml}"
        );
        assert!(!toml.contains("kafka_brokers"), "{toml}");
        Ok(())
    }

    #[test]
    fn config_for_kafka_discovery_sets_brokers_interval_and_stream_settings() -> anyhow::Result<()> {
        let streams = [Stream {
            name: "topic-1",
            handler: "noop",
            partitions: None,
            batch_size: Some(1000),
            starting_position: Some("trim_horizon"),
        }];
        let setup = Setup {
            streams: &streams,
            kafka: Some(Discovery { brokers: "127.0.0.1:9092", interval: Duration::from_millis(500) }),
            extra: None,
        };
        let toml = config_toml(Path::new("/tmp/d"), SocketAddr::from(([127, 0, 0, 1], 1)), &setup)?;
        assert!(
            toml.contains("kafka_brokers = \"127.0.0.1:9092\"\ndiscovery_interval = \"500ms\""),
            "{toml}"
        );
        assert!(toml.contains("batch_size = 1000\nstarting_position = \"trim_horizon\""), "{toml}");
        assert!(!toml.contains("partitions"), "{toml}");
        Ok(())
    }

    #[test]
    fn config_puts_extra_text_before_the_streams() -> anyhow::Result<()> {
        let streams = [Stream::fixed("bench", "bench", 1)];
        let setup = Setup { streams: &streams, kafka: None, extra: Some("scale_interval = \"500ms\"") };
        let toml = config_toml(Path::new("/tmp/d"), SocketAddr::from(([127, 0, 0, 1], 1)), &setup)?;
        assert!(toml.contains("scale_interval = \"500ms\"\n\n[[streams]]"), "{toml}");
        Ok(())
    }
}
