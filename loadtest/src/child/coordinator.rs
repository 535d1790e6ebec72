//! `shardline-coordinator` as a child: the caller's config value with
//! loopback port 0, a temporary data dir and metrics on, started and
//! waited for until it prints `listening ADDR`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use shardline_testkit::config::{self, CoordinatorConfig, Store, StreamConfig};
use shardline_testkit::process::{self, Proc};
use tonic::transport::{Channel, Endpoint};

use super::{Running, log_file, tail, workspace};

/// How long the binary gets to open its store and bind.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `shardline-coordinator`; killed on drop.
pub struct Coordinator {
    run: Running,
    /// What the config file says; `listen` is port 0 until the first
    /// start has bound one, then that address, so a restart binds it again.
    config: CoordinatorConfig,
    /// How many times [`Coordinator::restart`] ran: names each new log.
    restarts: u32,
}

impl Coordinator {
    /// Starts `bin` with static streams (no Kafka) on `store`, and waits until it
    /// leads (at once on sled; after winning the election on PostgreSQL),
    /// so the first call a benchmark makes is served.
    pub async fn start_on(bin: &Path, streams: Vec<StreamConfig>, store: Store) -> anyhow::Result<Self> {
        let coordinator =
            Self::start_with(bin, CoordinatorConfig { streams, store, ..CoordinatorConfig::default() })
                .await?;
        coordinator.wait_leading(START_TIMEOUT).await?;
        Ok(coordinator)
    }

    /// Starts `bin` with `config` on a loopback port chosen by the OS, a
    /// data directory of its own and metrics on, and waits for its
    /// `listening ADDR` line.
    pub async fn start_with(bin: &Path, mut config: CoordinatorConfig) -> anyhow::Result<Self> {
        let (dir, metrics) = workspace()?;
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.metrics_listen = Some(metrics);
        config.data_dir = dir.path().join("data");
        let (proc, log) = launch(bin, dir.path(), &mut config, "coordinator.log").await?;
        Ok(Self { run: Running { proc, log, metrics_addr: metrics, _dir: dir }, config, restarts: 0 })
    }

    /// Whether `/readyz` answers 200: this coordinator leads (a sled one
    /// always does; on PostgreSQL only the elected one).
    pub async fn leads(&self) -> bool {
        shardline_testkit::metrics::http_get(&self.run.metrics_addr.to_string(), "/readyz").await.is_ok()
    }

    /// Waits until [`Coordinator::leads`], failing with the log's tail
    /// after `timeout`.
    pub async fn wait_leading(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.leads().await {
            if tokio::time::Instant::now() > deadline {
                bail!("the coordinator did not lead within {timeout:?}; its log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// `kill -9`s the coordinator and starts `bin` again on the same
    /// address, config and data directory: workers reconnect to the URL
    /// they have, and the lease store is what the killed process left.
    /// Returns once the new process listens.
    pub async fn restart(&mut self, bin: &Path) -> anyhow::Result<()> {
        self.kill9()?;
        self.relaunch(bin).await
    }

    /// `kill -9`s the coordinator and waits for it to be gone; the guard
    /// stays, so [`Coordinator::relaunch`] can start it again.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.run.proc.kill9()
    }

    /// Starts `bin` again on the address, config and store of the killed
    /// process; returns once it listens (on PostgreSQL: as a standby until
    /// it wins an election).
    pub async fn relaunch(&mut self, bin: &Path) -> anyhow::Result<()> {
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
async fn launch(
    bin: &Path,
    dir: &Path,
    config: &mut CoordinatorConfig,
    log: &str,
) -> anyhow::Result<(Proc, PathBuf)> {
    let config_path = dir.join("coordinator.toml");
    config::write(&config_path, config)?;
    let log = dir.join(log);
    let stderr = log_file(&log)?;
    // Spawned here, on a runtime worker thread, which lives as long as the
    // run: the child dies with the thread that started it (PDEATHSIG), and
    // a `spawn_blocking` thread ends after 10 s idle. Only the wait blocks.
    let starting = process::spawn_coordinator(bin, &config_path, &[], stderr)?;
    let started = tokio::task::spawn_blocking(move || starting.wait(START_TIMEOUT))
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
