//! The shardline binaries under test as child processes: the real release
//! binaries with generated configs in throwaway directories, so a benchmark
//! measures exactly what ships (sled fsyncs, librdkafka settings included)
//! and leaves nothing behind.
//!
//! Every child lives in a [`Proc`] guard that kills it when dropped, so an
//! early return (`?`), a panic or an interrupted run stops it too.

mod coordinator;
mod worker;

pub use coordinator::{Coordinator, Discovery, Setup, Stream};
pub use worker::{Hosted, Worker, WorkerSettings};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// Where a sibling binary is by default: next to this executable, as
/// `cargo build --release -p shardline-coordinator -p shardline-worker -p
/// shardline-loadtest` puts them all in `target/release`.
pub fn default_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the path of this executable")?;
    let dir = exe.parent().context("this executable's path has no parent directory")?;
    Ok(dir.join(name))
}

/// Fails with the build command when `bin` is missing: the usual mistake is
/// a debug build of the harness, or a binary not built at all.
pub fn check_bin(bin: &Path, what: &str, flag: &str) -> anyhow::Result<()> {
    if !bin.is_file() {
        bail!(
            "{what} binary {} not found: build it with `cargo build --release -p shardline-coordinator \
             -p shardline-worker -p shardline-loadtest` or pass {flag}",
            bin.display()
        );
    }
    Ok(())
}

/// A running child process with its log file; killed on drop.
struct Proc {
    /// `coordinator`, `worker`: for error messages.
    name: &'static str,
    child: Child,
    pid: u32,
    log: PathBuf,
}

impl Proc {
    /// Starts `command` with stdin closed and stderr (where the binaries
    /// log) going to `log`: a terminal would slow the child down, and the
    /// tail is shown when it fails. Stdout is the caller's choice.
    fn spawn(name: &'static str, mut command: Command, log: PathBuf) -> anyhow::Result<Self> {
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe and touches no memory
        // of the parent.
        unsafe {
            command.pre_exec(|| {
                // Kill-on-drop needs the harness to unwind; this covers a
                // harness that is SIGKILLed or aborts: the kernel kills the
                // child with it, so no coordinator or worker is orphaned.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            // Hermetic: an operator's token, brokers or config in this shell
            // must not change what is measured (a token would make every call
            // fail); the generated config says everything.
            .env_remove("SHARDLINE_TOKEN")
            .env_remove("SHARDLINE_KAFKA_BROKERS")
            .env_remove("SHARDLINE_AMQP_URL")
            .env_remove("SHARDLINE_CONFIG")
            .env_remove("SHARDLINE_COORDINATOR")
            .env_remove("SHARDLINE_WORKER_CONFIG")
            .stdin(Stdio::null())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start the {name}"))?;
        let pid = child.id().with_context(|| format!("the {name} exited at once"))?;
        Ok(Self { name, child, pid, log })
    }

    /// Fails if the process has exited (crashed) while being measured.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                bail!(
                    "the {} exited ({status}) during the benchmark; its log:\n{}",
                    self.name,
                    self.log_tail(20)
                )
            }
            Err(e) => Err(e).with_context(|| format!("cannot check the {} process", self.name)),
        }
    }

    /// Kills the process and waits for it to be gone, so the next
    /// benchmark does not share the CPU with it.
    async fn stop(mut self) -> anyhow::Result<()> {
        self.child.start_kill().with_context(|| format!("cannot kill the {}", self.name))?;
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .with_context(|| format!("the {} did not exit within 10 s of SIGKILL", self.name))?
            .with_context(|| format!("cannot wait for the {}", self.name))?;
        Ok(())
    }

    /// The last `n` lines of the log, for error messages.
    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() {
            return "(empty)".to_owned();
        }
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Already exited (after `stop`) is fine: the error means exactly that.
        let _ = self.child.start_kill();
    }
}

/// A running binary: its process, its metrics endpoint and the throwaway
/// directory with its config, log and data. `Coordinator` and `Worker`
/// deref to it.
pub struct Running {
    proc: Proc,
    metrics_addr: SocketAddr,
    // Last field: removed after the child has been killed.
    _dir: tempfile::TempDir,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// Reads the child's Prometheus endpoint.
    pub async fn scrape(&self) -> anyhow::Result<Metrics> {
        scrape(self.metrics_addr).await
    }

    /// Fails if the child has exited (crashed) while being measured.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.proc.check_alive()
    }

    /// The kernel's peak resident set of the child so far, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        crate::stats::proc_status_kib(self.proc.pid, "VmHWM")
    }

    /// Kills the child and waits for it to be gone.
    async fn stop(self) -> anyhow::Result<()> {
        self.proc.stop().await
    }

    /// The last `n` lines of the child's log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    /// The throwaway directory with the child's config and logs (gone once
    /// the guard is dropped).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

/// A throwaway directory for one child's config, log and data.
fn temp_dir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("shardline-bench-")
        .tempdir()
        .context("cannot create a temporary directory")
}

/// Reads a Prometheus endpoint: every sample, keyed by `name{labels}` as
/// printed. Plain HTTP/1.0 over a socket: one GET does not justify an HTTP
/// client dependency.
async fn scrape(addr: SocketAddr) -> anyhow::Result<Metrics> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .context("the metrics endpoint did not answer within 5 s")?
        .with_context(|| format!("cannot read metrics from {addr}"))?;
    let (head, body) = response.split_once("\r\n\r\n").context("a metrics response without a body")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("the metrics endpoint answered `{}`", head.lines().next().unwrap_or_default());
    }
    Ok(Metrics::parse(body))
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

    /// The sum over every label set of `name` (`name` or `name{...}`).
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(key, _)| {
                key.strip_prefix(name).is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
            })
            .map(|(_, value)| value)
            .sum()
    }
}

/// A loopback port free right now. The child binds it a moment later;
/// another process taking it in between would fail the start loudly.
fn free_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()
}

/// A TOML string literal: a JSON string is a valid TOML basic string (same
/// escapes), so paths and names with quotes stay valid.
pub fn quote(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_keyed_by_name_and_labels() {
        let m = Metrics::parse(
            "# TYPE x counter\nshardline_checkpoints_total{result=\"accepted\"} 12\nflush_count 3\nflush{quantile=\"0.99\"} 0.5\n",
        );
        assert_eq!(m.get("shardline_checkpoints_total{result=\"accepted\"}"), 12.0);
        assert_eq!(m.get("flush{quantile=\"0.99\"}"), 0.5);
        assert_eq!(m.get("missing"), 0.0);
    }

    #[test]
    fn sums_over_label_sets_of_one_name_only() {
        let m = Metrics::parse("records{h=\"a\"} 2\nrecords{h=\"b\"} 3\nrecords_other 100\nrecords 1\n");
        assert_eq!(m.sum("records"), 6.0);
        assert_eq!(m.sum("absent"), 0.0);
    }

    #[test]
    fn quoting_escapes_like_toml() {
        assert_eq!(quote("/tmp/a \"b\""), "\"/tmp/a \\\"b\\\"\"");
    }
}
