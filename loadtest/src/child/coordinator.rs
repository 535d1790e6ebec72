//! The coordinator under test as a child process: the real release binary
//! with a generated config and a throwaway data dir, so a benchmark measures
//! exactly what ships (sled fsyncs included) and leaves nothing behind.
//!
//! The guard kills the child when dropped, so every early return (`?`), a
//! panic or an interrupted run stops the coordinator too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

/// How long the binary gets to open its store and bind.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A static stream in the generated config (`partitions` set: no Kafka).
pub struct Stream<'a> {
    pub name: &'a str,
    pub handler: &'a str,
    pub partitions: u32,
}

/// A running `shardline-coordinator`; killed on drop.
pub struct Coordinator {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    log: PathBuf,
    // Last field: dropped after `Drop::drop` has killed the child.
    _dir: tempfile::TempDir,
}

/// Where `shardline-coordinator` is by default: next to this executable, as
/// `cargo build --release -p shardline-coordinator -p shardline-loadtest`
/// puts both in `target/release`.
pub fn default_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the path of this executable")?;
    let dir = exe.parent().context("this executable's path has no parent directory")?;
    Ok(dir.join("shardline-coordinator"))
}

impl Coordinator {
    /// Starts `bin` on a loopback port chosen by the OS and waits for its
    /// `listening ADDR` line.
    pub async fn start(bin: &Path, streams: &[Stream<'_>]) -> anyhow::Result<Self> {
        if !bin.is_file() {
            bail!(
                "coordinator binary {} not found: build it with \
                 `cargo build --release -p shardline-coordinator -p shardline-loadtest` or pass --coordinator-bin",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("shardline-bench-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let config_path = dir.path().join("coordinator.toml");
        let log = dir.path().join("coordinator.log");
        let metrics_addr = free_port().context("cannot find a free port for the metrics endpoint")?;
        std::fs::write(&config_path, config_toml(&dir.path().join("data"), metrics_addr, streams)?)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;

        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&config_path)
            // Hermetic: an operator's token or brokers in this shell must not
            // change what is measured (a token would make every call fail).
            .env_remove("SHARDLINE_TOKEN")
            .env_remove("SHARDLINE_KAFKA_BROKERS")
            .env_remove("SHARDLINE_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Logs go to a file: a terminal would slow the coordinator down,
            // and the tail is shown when it fails.
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id().context("the coordinator exited at once")?;
        let stdout = child.stdout.take().context("the coordinator's stdout is not piped")?;

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
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut this = Self { child, pid, addr, metrics_addr, log, _dir: dir };
        let addr = match ready {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) => {
                let status = this.child.wait().await.map(|s| s.to_string()).unwrap_or_default();
                bail!("the coordinator exited ({status}) before listening; its log:\n{}", this.log_tail(20));
            }
            Ok(Err(e)) => bail!("cannot read the coordinator's stdout: {e}"),
            Err(_) => bail!(
                "the coordinator printed no `listening` line within {START_TIMEOUT:?}; its log:\n{}",
                this.log_tail(20)
            ),
        };
        this.addr = addr.parse().with_context(|| format!("bad address in `listening {addr}`"))?;
        // Keep draining stdout: nothing else is expected there, but a full
        // pipe must never block the coordinator.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(this)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Opens `n` HTTP/2 connections. Several, because the framing and IO of
    /// one connection run on one task on each side: a single connection
    /// would measure that task rather than the coordinator.
    pub async fn channels(&self, n: usize) -> anyhow::Result<Vec<Channel>> {
        let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))
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

    /// Reads the coordinator's Prometheus endpoint: every sample, keyed by
    /// `name{labels}` as printed. Plain HTTP/1.0 over a socket: one GET does
    /// not justify an HTTP client dependency.
    pub async fn scrape(&self) -> anyhow::Result<Metrics> {
        let fetch = async {
            let mut stream = tokio::net::TcpStream::connect(self.metrics_addr).await?;
            let request = format!("GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.metrics_addr);
            stream.write_all(request.as_bytes()).await?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(5), fetch)
            .await
            .context("the metrics endpoint did not answer within 5 s")?
            .with_context(|| format!("cannot read metrics from {}", self.metrics_addr))?;
        let (head, body) = response.split_once("\r\n\r\n").context("a metrics response without a body")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            bail!("the metrics endpoint answered `{}`", head.lines().next().unwrap_or_default());
        }
        Ok(Metrics::parse(body))
    }

    /// Fails if the coordinator has exited (crashed) while being measured.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                bail!(
                    "the coordinator exited ({status}) during the benchmark; its log:\n{}",
                    self.log_tail(20)
                )
            }
            Err(e) => Err(e).context("cannot check the coordinator process"),
        }
    }

    /// The kernel's peak resident set of the coordinator so far, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        crate::stats::proc_status_kib(self.pid, "VmHWM")
    }

    /// Kills the coordinator and waits for it to be gone, so the next
    /// benchmark does not share the CPU with it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.child.start_kill().context("cannot kill the coordinator")?;
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .context("the coordinator did not exit within 10 s of SIGKILL")?
            .context("cannot wait for the coordinator")?;
        Ok(())
    }

    /// The last `n` lines of the coordinator's log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            return "(empty)".to_owned();
        }
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        // Already exited (after `stop`) is fine: the error means exactly that.
        let _ = self.child.start_kill();
    }
}

/// Prometheus samples by `name{labels}`.
#[derive(Debug, Default, Clone)]
pub struct Metrics(BTreeMap<String, f64>);

impl Metrics {
    fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (key, value) = line.rsplit_once(' ')?;
                Some((key.trim().to_owned(), value.trim().parse().ok()?))
            })
            .collect();
        Self(samples)
    }

    /// A sample's value; absent (never recorded) reads as 0.
    pub fn get(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(0.0)
    }
}

/// A loopback port free right now. The coordinator binds it a moment later;
/// another process taking it in between would fail the start loudly.
fn free_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()
}

/// The generated config: loopback, port 0, the temp data dir, metrics on
/// (as in the example config, so their cost is measured too), static
/// streams.
fn config_toml(data_dir: &Path, metrics: SocketAddr, streams: &[Stream<'_>]) -> anyhow::Result<String> {
    let data_dir = data_dir.to_str().context("the temporary directory's path is not UTF-8")?;
    // A JSON string literal is a valid TOML basic string (same escapes).
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\nmetrics_listen = \"{metrics}\"\ndata_dir = {}\n",
        serde_json::Value::from(data_dir)
    );
    for s in streams {
        toml.push_str(&format!(
            "\n[[streams]]\nname = {}\nhandler = {}\npartitions = {}\n",
            serde_json::Value::from(s.name),
            serde_json::Value::from(s.handler),
            s.partitions
        ));
    }
    Ok(toml)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_quotes_paths_and_lists_static_streams() -> anyhow::Result<()> {
        let streams = [Stream { name: "bench", handler: "bench", partitions: 64 }];
        let metrics = SocketAddr::from(([127, 0, 0, 1], 9400));
        let toml = config_toml(Path::new("/tmp/a \"b\""), metrics, &streams)?;
        assert!(toml.contains("metrics_listen = \"127.0.0.1:9400\""), "{toml}");
        assert!(toml.contains("data_dir = \"/tmp/a \\\"b\\\"\""), "{toml}");
        assert!(
            toml.contains("[[streams]]\nname = \"bench\"\nhandler = \"bench\"\npartitions = 64"),
            "{toml}"
        );
        Ok(())
    }

    #[test]
    fn metrics_are_keyed_by_name_and_labels() {
        let m = Metrics::parse(
            "# TYPE x counter\nshardline_checkpoints_total{result=\"accepted\"} 12\nflush_count 3\nflush{quantile=\"0.99\"} 0.5\n",
        );
        assert_eq!(m.get("shardline_checkpoints_total{result=\"accepted\"}"), 12.0);
        assert_eq!(m.get("flush{quantile=\"0.99\"}"), 0.5);
        assert_eq!(m.get("missing"), 0.0);
    }
}
