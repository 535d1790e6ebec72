//! Helpers for shardline's end-to-end tests: start the real binaries as
//! child processes (on port 0, in temp dirs), talk to them over gRPC, and
//! manage Kafka topics and RabbitMQ queues on the real brokers. What the
//! load harness needs too lives in `shardline-testkit`; this crate gives
//! it the tests' defaults (brokers from the environment, logs on stderr).
//!
//! The binaries must be built first (`cargo build --workspace --bins`); the
//! test command in the README does that.

pub mod amqp;
pub mod deploy;
pub mod fresh;
pub mod kafka;
pub mod serial;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shardline_proto::v1::{self, admin_api_client::AdminApiClient, worker_api_client::WorkerApiClient};
pub use shardline_testkit::config::{CoordinatorConfig, StreamConfig, SubscriptionConfig, WorkerConfig};
pub use shardline_testkit::metrics::{http_get, http_status};
pub use shardline_testkit::process::Proc;
pub use shardline_testkit::unique;
use shardline_testkit::{config, process};
use tonic::transport::Channel;

/// Where the workspace's binaries are: `SHARDLINE_BIN_DIR` (taken as is),
/// else the target dir this test binary was built into, where a binary
/// older than its sources fails the test ([`fresh`]).
pub fn bin(name: &str) -> PathBuf {
    let path = process::bin(name);
    if std::env::var_os("SHARDLINE_BIN_DIR").is_none() {
        fresh::ensure_fresh(&path);
    }
    path
}

/// The Kafka bootstrap servers the tests use.
pub fn kafka_brokers() -> String {
    std::env::var("SHARDLINE_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The tests' Kafka for the kit's topic admin (no `[kafka]` properties).
pub fn kafka() -> shardline_testkit::kafka::KafkaAccess {
    shardline_testkit::kafka::KafkaAccess { brokers: kafka_brokers(), ..Default::default() }
}

/// A running `shardline-coordinator`.
pub struct Coordinator {
    pub proc: Proc,
    pub url: String,
    pub data_dir: PathBuf,
}

impl Coordinator {
    /// Starts the binary with `config`, its `data_dir` set, the tests'
    /// brokers where it keeps the defaults, and a port the OS chooses where
    /// it keeps the default `listen`.
    pub fn start_config(mut config: CoordinatorConfig, data_dir: &Path) -> Result<Self> {
        let default = CoordinatorConfig::default();
        if config.listen == default.listen {
            config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        }
        if config.kafka_brokers == default.kafka_brokers {
            config.kafka_brokers = kafka_brokers();
        }
        if config.amqp_url == default.amqp_url {
            config.amqp_url = amqp::amqp_url();
        }
        config.data_dir = data_dir.to_owned();
        let dir = data_dir.parent().unwrap_or(data_dir);
        let path = dir.join(format!("coordinator-{}.toml", unique("cfg")));
        config::write(&path, &config)?;
        let bin = bin("shardline-coordinator");
        let (proc, addr) =
            process::start_coordinator(&bin, &path, &[], Stdio::inherit(), Duration::from_secs(30))?;
        Ok(Self { proc, url: format!("http://{addr}"), data_dir: data_dir.to_owned() })
    }

    pub async fn admin(&self) -> Result<AdminApiClient<Channel>> {
        AdminApiClient::connect(self.url.clone()).await.context("connect admin API")
    }

    /// Every lease as the admin API lists it.
    pub async fn leases(&self) -> Result<Vec<v1::LeaseInfo>> {
        let mut admin = self.admin().await?;
        Ok(admin.list_leases(v1::ListLeasesRequest::default()).await?.into_inner().leases)
    }

    /// The leases of one stream or subscription, in partition (slot) order.
    pub async fn leases_of(&self, name: &str) -> Result<Vec<v1::LeaseInfo>> {
        let mut leases: Vec<v1::LeaseInfo> = self
            .leases()
            .await?
            .into_iter()
            .filter(|l| l.lease.as_ref().is_some_and(|l| l.name == name))
            .collect();
        leases.sort_by_key(|l| l.lease.as_ref().map(|l| l.index));
        Ok(leases)
    }

    /// Every known worker as the admin API lists it.
    pub async fn workers(&self) -> Result<Vec<v1::WorkerInfo>> {
        let mut admin = self.admin().await?;
        Ok(admin.list_workers(v1::ListWorkersRequest {}).await?.into_inner().workers)
    }

    pub async fn worker_api(&self) -> Result<WorkerApiClient<Channel>> {
        WorkerApiClient::connect(self.url.clone()).await.context("connect worker API")
    }
}

/// Starts a `shardline-worker` process hosting `handler` (with no settings).
pub fn start_worker(coordinator_url: &str, worker_id: &str, handler: &str) -> Result<Proc> {
    start_worker_config(coordinator_url, worker_id, WorkerConfig::hosting([handler]))
}

/// Starts a `shardline-worker` with `config`, its coordinator and id set,
/// and the tests' brokers where it keeps the defaults: the binaries start
/// without `SHARDLINE_*` variables.
pub fn start_worker_config(coordinator_url: &str, worker_id: &str, mut config: WorkerConfig) -> Result<Proc> {
    let default = WorkerConfig::default();
    if config.kafka_brokers == default.kafka_brokers {
        config.kafka_brokers = kafka_brokers();
    }
    if config.amqp_url == default.amqp_url {
        config.amqp_url = amqp::amqp_url();
    }
    config.coordinator = coordinator_url.to_owned();
    config.worker_id = Some(worker_id.to_owned());
    let path = std::env::temp_dir().join(format!("{}.toml", unique(&format!("worker-{worker_id}"))));
    config::write(&path, &config)?;
    process::start_worker(&bin("shardline-worker"), &path, worker_id, Stdio::inherit())
}

/// Creates a topic on the real broker.
pub async fn create_topic(name: &str, partitions: i32) -> Result<()> {
    shardline_testkit::kafka::create_topic(&kafka(), name, u32::try_from(partitions)?, false).await
}

/// Grows a topic to `total` partitions; on tansu by deleting and creating
/// it again, and tansu's DeleteTopics deletes every topic of the cluster:
/// see tests/tests/discovery.rs.
pub async fn add_partitions(name: &str, total: usize) -> Result<()> {
    shardline_testkit::kafka::add_partitions(&kafka(), name, total).await
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after
/// `timeout` with the last state it saw.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many leases each worker owns.
pub fn owners(leases: &[v1::LeaseInfo]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for l in leases.iter().filter(|l| !l.owner.is_empty()) {
        *counts.entry(l.owner.clone()).or_default() += 1;
    }
    counts
}

/// A loopback port that was free a moment ago, for a process that must come
/// back on the same address (a restarted coordinator).
pub fn free_port() -> Result<u16> {
    Ok(shardline_testkit::free_addr()?.port())
}

/// The value of one Prometheus `series` (name with labels, as printed) in
/// a `/metrics` body; absent is an error naming it.
pub fn metric(body: &str, series: &str) -> Result<f64> {
    shardline_testkit::metrics::Metrics::parse(body).get(series)
}

/// Scrapes `/metrics` at `addr` and reads `series`; absent is an error.
pub async fn scrape(addr: &str, series: &str) -> Result<f64> {
    shardline_testkit::metrics::scrape(addr).await?.get(series)
}

/// [`scrape`] where absent reads as 0: only for a counter the binary
/// creates at its first event, which may not have happened.
pub async fn scrape_or_zero(addr: &str, series: &str) -> Result<f64> {
    Ok(shardline_testkit::metrics::scrape(addr).await?.get_or_zero(series))
}
