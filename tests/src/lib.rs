//! Helpers for shardline's end-to-end tests: start the real binaries as
//! child processes (on port 0, in temp dirs), talk to them over gRPC, and
//! manage Kafka topics and RabbitMQ queues on the real brokers.
//!
//! The binaries must be built first (`cargo build --workspace --bins`); the
//! test command in the README does that.

pub mod amqp;
pub mod fresh;
pub mod kafka;
pub mod serial;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use shardline_proto::v1::{self, admin_api_client::AdminApiClient, worker_api_client::WorkerApiClient};
use tonic::transport::Channel;

/// Where the workspace's binaries are: `SHARDLINE_BIN_DIR` (taken as is),
/// else the target dir this test binary was built into, where a binary
/// older than its sources fails the test ([`fresh`]).
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("SHARDLINE_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    // target/<profile>/deps/<test binary> → target/<profile>/<name>
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let path = profile_dir.join(name);
    fresh::ensure_fresh(&path);
    path
}

/// The Kafka bootstrap servers the tests use.
pub fn kafka_brokers() -> String {
    std::env::var("SHARDLINE_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A name no other test run used, for topics.
pub fn unique(prefix: &str) -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves
/// nothing running.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `kill -9`.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill().context("kill -9")?;
        self.child.wait().context("reap")?;
        Ok(())
    }

    pub fn signal(&self, signal: i32) -> Result<()> {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        if rc != 0 {
            bail!("kill({}, {signal}) failed: {}", self.pid(), std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Still running (not exited, not killed)?
    pub fn child_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `shardline-coordinator`.
pub struct Coordinator {
    pub proc: Proc,
    pub url: String,
    pub data_dir: PathBuf,
}

impl Coordinator {
    /// Starts the binary with `config` (TOML; `listen` and `data_dir` are
    /// added) and waits for its `listening ADDR` line.
    pub fn start(config: &str, data_dir: &Path) -> Result<Self> {
        Self::start_on(config, data_dir, "127.0.0.1:0")
    }

    pub fn start_on(config: &str, data_dir: &Path, listen: &str) -> Result<Self> {
        let dir = data_dir.parent().unwrap_or(data_dir);
        let path = dir.join(format!("coordinator-{}.toml", unique("cfg")));
        let full = format!(
            "listen = \"{listen}\"\ndata_dir = \"{}\"\nkafka_brokers = \"{}\"\n{config}",
            data_dir.display(),
            kafka_brokers()
        );
        std::fs::write(&path, full).context("write config")?;
        let mut child = Command::new(bin("shardline-coordinator"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!(
                    "spawn {} (built? cargo build --workspace --bins)",
                    bin("shardline-coordinator").display()
                )
            })?;
        let stdout = child.stdout.take().context("coordinator stdout")?;
        let proc = Proc { child, name: "coordinator".into() };
        let addr = read_listening(stdout)?;
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

/// Reads child stdout until `listening ADDR`, then keeps draining it in a
/// thread so the child never blocks on a full pipe.
fn read_listening(stdout: std::process::ChildStdout) -> Result<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && let Some(addr) = line.strip_prefix("listening ") {
                let _ = tx.send(addr.trim().to_owned());
                sent = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).context("coordinator did not print `listening ADDR` within 30 s")
}

/// Starts a `shardline-worker` process hosting `handler` (with no settings).
pub fn start_worker(coordinator_url: &str, worker_id: &str, handler: &str) -> Result<Proc> {
    start_worker_with(coordinator_url, worker_id, &format!("[handlers.{handler}]\n"))
}

/// Starts a `shardline-worker` with `extra` appended to its config (handler
/// tables, metrics_listen, ...).
pub fn start_worker_with(coordinator_url: &str, worker_id: &str, extra: &str) -> Result<Proc> {
    let path = std::env::temp_dir().join(format!("{}.toml", unique(&format!("worker-{worker_id}"))));
    let config = format!(
        "coordinator = \"{coordinator_url}\"\nworker_id = \"{worker_id}\"\nkafka_brokers = \"{}\"\n{extra}",
        kafka_brokers()
    );
    std::fs::write(&path, config).context("write worker config")?;
    let child = Command::new(bin("shardline-worker"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawn {}", bin("shardline-worker").display()))?;
    Ok(Proc { child, name: worker_id.to_owned() })
}

fn admin_client() -> Result<AdminClient<DefaultClientContext>> {
    ClientConfig::new().set("bootstrap.servers", kafka_brokers()).create().context("kafka admin client")
}

/// Creates a topic on the real broker.
pub async fn create_topic(name: &str, partitions: i32) -> Result<()> {
    let admin = admin_client()?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics([&topic], &opts).await.context("create_topics")?;
    for r in results {
        r.map_err(|(t, e)| anyhow::anyhow!("create topic {t}: {e}"))?;
    }
    Ok(())
}

/// Grows a topic to `total` partitions with CreatePartitions. tansu 0.6.0
/// does not implement that API (key 37 is absent from its ApiVersions), so
/// there the topic is deleted and created again with `total` partitions:
/// to the coordinator's discovery that is the same event, a topic whose
/// partition count grew while it ran. Beware: tansu's DeleteTopics deletes
/// every topic of the cluster; see tests/tests/discovery.rs.
pub async fn add_partitions(name: &str, total: usize) -> Result<()> {
    let admin = admin_client()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_partitions([&NewPartitions::new(name, total)], &opts).await;
    let unsupported = matches!(
        &results,
        Err(rdkafka::error::KafkaError::AdminOp(rdkafka::types::RDKafkaErrorCode::UnsupportedFeature))
    );
    if !unsupported {
        for r in results.context("create_partitions")? {
            r.map_err(|(t, e)| anyhow::anyhow!("add partitions to {t}: {e}"))?;
        }
        return Ok(());
    }
    for r in admin.delete_topics(&[name], &opts).await.context("delete_topics")? {
        r.map_err(|(t, e)| anyhow::anyhow!("delete topic {t}: {e}"))?;
    }
    create_topic(name, i32::try_from(total)?).await
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
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind port 0")?;
    Ok(listener.local_addr()?.port())
}

/// `GET path` over plain HTTP/1.0 on loopback; returns the body.
pub async fn http_get(addr: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (_, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
    Ok(body.to_owned())
}

/// The value of one Prometheus `series` (name with labels, as printed).
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Scrapes `/metrics` at `addr` and reads `series`; absent reads as 0.
pub async fn scrape(addr: &str, series: &str) -> Result<f64> {
    let body = http_get(addr, "/metrics").await?;
    Ok(metric(&body, series).unwrap_or(0.0))
}
