//! The shardline binaries under test as child processes: the real release
//! binaries with generated configs in throwaway directories, so a benchmark
//! measures exactly what ships (sled fsyncs, librdkafka settings included)
//! and leaves nothing behind. Starting, configs and scrapes are the test
//! kit's (`shardline-testkit`); this adds the harness's own: a log file
//! per child, its tail in errors, memory and liveness checks.

mod coordinator;
mod worker;

pub use coordinator::Coordinator;
pub use shardline_testkit::metrics::Metrics;
pub use worker::{Hosted, Worker, handlers};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use shardline_testkit::process::{self, Proc};

/// The binary `name`: `given` (a `--*-bin` flag), else next to this
/// executable, as `cargo build --release -p shardline-coordinator -p
/// shardline-worker -p shardline-loadtest` puts them all in
/// `target/release`. Fails at once, naming `flag`, if it is missing: a
/// run should not fail after minutes of loading the broker.
pub fn resolve_bin(given: Option<&Path>, name: &str, flag: &str) -> anyhow::Result<PathBuf> {
    let bin = given.map_or_else(|| process::bin(name), Path::to_path_buf);
    process::check_bin(&bin, flag)?;
    Ok(bin)
}

/// A running binary: its process, its log, its metrics endpoint and the
/// throwaway directory with its config, log and data. `Coordinator` and
/// `Worker` deref to it.
pub struct Running {
    proc: Proc,
    log: PathBuf,
    metrics_addr: SocketAddr,
    // Last field: removed after the child has been killed.
    _dir: tempfile::TempDir,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// Reads the child's Prometheus endpoint.
    pub async fn scrape(&self) -> anyhow::Result<Metrics> {
        shardline_testkit::metrics::scrape(&self.metrics_addr.to_string()).await
    }

    /// The child's `/metrics` as served (every series, exposition text).
    pub async fn metrics_text(&self) -> anyhow::Result<String> {
        shardline_testkit::metrics::http_get(&self.metrics_addr.to_string(), "/metrics").await
    }

    /// Fails if the child has exited (crashed) while being measured.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.proc.exited()? {
            None => Ok(()),
            Some(status) => {
                bail!(
                    "the {} exited ({status}) during the run; its log:\n{}",
                    self.proc.name,
                    self.log_tail()
                )
            }
        }
    }

    /// The kernel's peak resident set of the child so far, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        crate::stats::proc_status_kib(self.pid(), "VmHWM")
    }

    /// Kills the child and waits for it to be gone, so the next
    /// measurement does not share the CPU with it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.proc.kill9()
    }

    /// Stops the child as a supervisor scaling it in would: SIGTERM, then
    /// waits up to `within` for it to exit on its own (a worker drains:
    /// finishes its batches, checkpoints, releases its leases). Fails if
    /// it does not exit in time (it is then killed) or exits with an error.
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<()> {
        self.proc.signal(libc::SIGTERM)?;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.proc.exited()? {
                if !status.success() {
                    bail!(
                        "the {} exited {status} after SIGTERM; its log:\n{}",
                        self.proc.name,
                        self.log_tail()
                    );
                }
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                self.proc.kill9()?;
                bail!("the {} did not exit within {within:?} of SIGTERM; killed", self.proc.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where the child serves `/metrics`.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The last 20 lines of the child's log, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }

    /// The throwaway directory with the child's config and logs (gone once
    /// the guard is dropped).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

/// A throwaway directory for one child's config, log and data, with a
/// free port for its metrics.
fn workspace() -> anyhow::Result<(tempfile::TempDir, SocketAddr)> {
    let dir = tempfile::Builder::new()
        .prefix("shardline-bench-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let metrics = shardline_testkit::free_addr().context("cannot find a free port for metrics")?;
    Ok((dir, metrics))
}

/// The child's log file (its stderr, where the binaries log): a terminal
/// would slow it down, and the tail is shown when it fails.
fn log_file(path: &Path) -> anyhow::Result<std::process::Stdio> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(file.into())
}

/// The last 20 lines of a log, for error messages.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return "(empty)".to_owned();
    }
    lines[lines.len().saturating_sub(20)..].join("\n")
}
