//! The coordinator under test as a child process: the real release binary
//! with a generated config and a throwaway data dir, so a benchmark measures
//! exactly what ships (sled fsyncs included) and leaves nothing behind.
//!
//! The guard kills the child when dropped, so every early return (`?`), a
//! panic or an interrupted run stops the coordinator too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
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
        std::fs::write(&config_path, config_toml(&dir.path().join("data"), streams)?)
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
        let mut this = Self { child, pid, addr: SocketAddr::from(([127, 0, 0, 1], 0)), log, _dir: dir };
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
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        // Already exited (after `stop`) is fine: the error means exactly that.
        let _ = self.child.start_kill();
    }
}

/// The generated config: loopback, port 0, the temp data dir, static streams.
fn config_toml(data_dir: &Path, streams: &[Stream<'_>]) -> anyhow::Result<String> {
    let data_dir = data_dir.to_str().context("the temporary directory's path is not UTF-8")?;
    // A JSON string literal is a valid TOML basic string (same escapes).
    let mut toml = format!("listen = \"127.0.0.1:0\"\ndata_dir = {}\n", serde_json::Value::from(data_dir));
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
        let toml = config_toml(Path::new("/tmp/a \"b\""), &streams)?;
        assert!(toml.contains("data_dir = \"/tmp/a \\\"b\\\"\""), "{toml}");
        assert!(
            toml.contains("[[streams]]\nname = \"bench\"\nhandler = \"bench\"\npartitions = 64"),
            "{toml}"
        );
        Ok(())
    }
}
