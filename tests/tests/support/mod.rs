//! Helpers shared by the test files that check README claims no other test
//! checked (`offsets.rs`, `process.rs`, `batching.rs`, `topics.rs`,
//! `examples.rs`): starting the binaries with a chosen environment,
//! reading a worker's metrics strictly, telling batches apart in receipts,
//! and removing a RabbitMQ topology however a test ends.
//!
//! Each test file compiles this module and uses a part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use rdkafka::producer::FutureRecord;
use shardline_proto::FailurePolicy;
use shardline_proto::topology::{dead_letter_exchange, queues};
use shardline_tests::kafka::Consumed;
use shardline_tests::{Coordinator, Proc, bin, create_topic, http_get, metric, unique};

/// Short coordinator timings, so that leases are granted and moved within
/// a second or two.
pub const TIMINGS: &str = "heartbeat_interval = \"300ms\"\nsession_timeout = \"3s\"\ndiscovery_interval = \"500ms\"\nscale_interval = \"500ms\"\n";

/// Starts `shardline-coordinator` on `config` exactly as given (nothing is
/// added: the caller sets `listen`, `data_dir`, brokers) with `env` on top
/// of this process's environment, and waits for its `listening ADDR`.
pub fn coordinator_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Result<Coordinator> {
    let path = config_file(dir, &unique("coordinator"), config)?;
    let mut command = Command::new(bin("shardline-coordinator"));
    command
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command.envs(env.iter().copied());
    let mut child = command.spawn().context("spawn shardline-coordinator (built?)")?;
    let stdout = child.stdout.take().context("coordinator stdout")?;
    let proc = Proc { child, name: "coordinator".into() };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening ") {
                // The test may have given up already; then nobody listens.
                if tx.send(addr.trim().to_owned()).is_err() {
                    eprintln!("coordinator printed `listening` after the test stopped waiting");
                }
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).context("no `listening ADDR` within 30 s")?;
    Ok(Coordinator { proc, url: format!("http://{addr}"), data_dir: dir.to_owned() })
}

/// Writes `text` to `dir/NAME.toml`; returns its path.
pub fn config_file(dir: &Path, name: &str, text: &str) -> Result<String> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    path.into_os_string().into_string().map_err(|p| anyhow::anyhow!("a temp path that is not UTF-8: {p:?}"))
}

/// Starts a binary (`shardline-worker`, `json-sum`, ...) with `args`, `env`
/// on top of this process's environment and stdout piped (for `json-sum`'s
/// lines); killed when dropped.
pub fn spawn(name: &str, args: &[&str], env: &[(&str, &str)], stdout: Stdio) -> Result<Proc> {
    let mut command = Command::new(bin(name));
    command
        .args(args)
        .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
        .stdout(stdout)
        .stderr(Stdio::inherit());
    command.envs(env.iter().copied());
    let child =
        command.spawn().with_context(|| format!("spawn {name} (built? cargo build --workspace --bins)"))?;
    Ok(Proc { child, name: name.to_owned() })
}

/// How a process that should refuse to start ended: exit code and stderr.
pub async fn refused(name: &str, config: &str, env: &[(&str, &str)]) -> Result<(i32, String)> {
    let out = tokio::process::Command::new(bin(name))
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .with_context(|| format!("{name} with {env:?} was still running after 20 s"))??;
    Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// A worker's `/metrics` series, which must be there: a renamed or missing
/// series fails the test instead of reading as 0.
pub async fn series(addr: &str, series: &str) -> Result<f64> {
    let body = http_get(addr, "/metrics").await?;
    metric(&body, series).with_context(|| format!("no series `{series}` in the metrics of {addr}:\n{body}"))
}

/// One handler invocation, rebuilt from the receipts `forward` / `chaos`
/// wrote for it: the records of one lease that share
/// `shardline.invoked_at_ms`.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub stream: String,
    pub partition: u32,
    /// When the handler was called (unix ms).
    pub started_ms: i64,
    /// Until when it was surely still running: `chaos` sleeps
    /// `sleep_per_batch` before it forwards anything.
    pub running_until_ms: i64,
    pub offsets: Vec<i64>,
    /// Key plus value bytes, as `max_batch_bytes` counts them.
    pub bytes: usize,
}

/// The invocations in `receipts` of a handler that sleeps `busy` per
/// batch, by start time. Batches of one lease run one after another and
/// each takes at least `busy`, so within a lease the start time tells
/// batches apart.
pub fn invocations(receipts: &[Consumed], busy: Duration) -> Result<Vec<Invocation>> {
    let busy_ms = i64::try_from(busy.as_millis())?;
    let mut by_batch = BTreeMap::<(i64, String, u32), Invocation>::new();
    for r in receipts {
        let field = |name: &str| r.header(name).with_context(|| format!("receipt without {name}: {r:?}"));
        let started_ms: i64 = field("shardline.invoked_at_ms")?.parse()?;
        let (stream, partition) =
            (field("shardline.stream")?.to_owned(), field("shardline.partition")?.parse()?);
        let batch = by_batch.entry((started_ms, stream.clone(), partition)).or_insert_with(|| Invocation {
            stream,
            partition,
            started_ms,
            running_until_ms: started_ms + busy_ms,
            offsets: Vec::new(),
            bytes: 0,
        });
        batch.offsets.push(field("shardline.offset")?.parse()?);
        batch.bytes += r.key.as_ref().map_or(0, String::len) + r.value.len();
    }
    Ok(by_batch.into_values().collect())
}

/// The most invocations running at one moment.
pub fn peak_overlap(all: &[Invocation]) -> usize {
    all.iter()
        .map(|b| {
            all.iter().filter(|o| o.started_ms <= b.started_ms && b.started_ms < o.running_until_ms).count()
        })
        .max()
        .unwrap_or(0)
}

/// The RabbitMQ names a test's topology uses, deleted when dropped (also
/// when the test fails): each subscription's queue, dead-letter queue and
/// exchange and retry queues (for the default failure policy), and the
/// topic exchanges.
pub struct Topology {
    pub exchanges: Vec<String>,
    pub subscriptions: Vec<String>,
}

impl Topology {
    pub fn new(exchanges: usize, subscriptions: usize) -> Self {
        Self {
            exchanges: (0..exchanges).map(|_| unique("t")).collect(),
            subscriptions: (0..subscriptions).map(|_| unique("s")).collect(),
        }
    }

    async fn delete(&self) -> Result<()> {
        let (_connection, channel) = shardline_tests::amqp::channel().await?;
        let policy = FailurePolicy::default();
        for s in &self.subscriptions {
            for q in queues(s, &policy) {
                channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await?;
            }
        }
        let dlx = self.subscriptions.iter().map(|s| dead_letter_exchange(s));
        for e in self.exchanges.iter().cloned().chain(dlx) {
            channel.exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default()).await?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            eprintln!("cleanup: no tokio runtime; left {:?} {:?}", self.exchanges, self.subscriptions);
            return;
        };
        // Drop cannot await; the tests run on the multi-threaded runtime.
        if let Err(e) = tokio::task::block_in_place(|| runtime.block_on(self.delete())) {
            eprintln!("cleanup: cannot delete {:?} {:?}: {e:#}", self.exchanges, self.subscriptions);
        }
    }
}

/// A fresh topic of `partitions` named after `prefix`, and a one-partition
/// topic for the receipts of `forward` / `chaos`.
pub async fn topics(prefix: &str, partitions: i32) -> Result<(String, String)> {
    let (topic, receipts) = (unique(prefix), unique("receipts"));
    create_topic(&topic, partitions).await?;
    create_topic(&receipts, 1).await?;
    Ok((topic, receipts))
}

/// One record to produce: key, value, and the timestamp to give it (none:
/// the producer's clock).
pub type Row = (String, String, Option<i64>);

/// Produces `rows` to `topic` in order, each acknowledged before the next,
/// to `partition` or (none) by key.
pub async fn produce_rows(
    topic: &str,
    partition: Option<i32>,
    rows: impl IntoIterator<Item = Row>,
) -> Result<()> {
    let producer = shardline_tests::kafka::producer()?;
    for (key, value, timestamp) in rows {
        let mut record = FutureRecord::to(topic).key(&key).payload(&value);
        record.partition = partition;
        record.timestamp = timestamp;
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    }
    Ok(())
}
