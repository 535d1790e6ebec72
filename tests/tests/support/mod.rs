//! Helpers shared by test files (`offsets.rs`, `process.rs`, `batching.rs`, `failover.rs`, `coordinator.rs`,
//! `topics.rs`, `examples.rs`, `example_view.rs`, `example_fanout.rs`, `cli.rs`, `worker.rs`): coordinator configs
//! with short timings, starting the binaries with a chosen environment,
//! telling batches apart in receipts, and naming a RabbitMQ topology that
//! is removed however a test ends.
//!
//! Each test file compiles this module and uses a part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rdkafka::producer::FutureRecord;
use shardline_proto::{FailurePolicy, StartingPosition};
use shardline_testkit::amqp::Cleanup;
use shardline_testkit::config::{self, SubscriptionConfig, TopicConfig, TopicKind};
use shardline_testkit::process;
use shardline_tests::kafka::{Consumed, Receipt, Verdict, produce, producer, read_receipts};
use shardline_tests::{Coordinator, CoordinatorConfig, Proc, StreamConfig, bin, create_topic, unique};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::task::JoinHandle;

/// A coordinator config with short timings, so that leases are granted
/// and moved within a second or two.
pub fn timings() -> CoordinatorConfig {
    CoordinatorConfig {
        heartbeat_interval: Duration::from_millis(300),
        session_timeout: Duration::from_secs(3),
        discovery_interval: Duration::from_millis(500),
        scale_interval: Duration::from_millis(500),
        // At most half the workers' 2.4 s fence time (PostgreSQL only).
        leadership_timeout: Duration::from_secs(1),
        ..CoordinatorConfig::default()
    }
}

/// A stream of `topic` from its oldest record, handled by `handler`.
pub fn from_start(topic: &str, handler: &str) -> StreamConfig {
    StreamConfig { starting_position: StartingPosition::TrimHorizon, ..StreamConfig::new(topic, handler) }
}

/// Starts `shardline-coordinator` on `config` exactly as given (nothing is
/// added: the caller sets `listen`, `data_dir`, brokers) with `env` as its
/// only `SHARDLINE_*` variables, and waits for its `listening ADDR`.
pub fn coordinator_with_env(
    dir: &Path,
    config: &CoordinatorConfig,
    env: &[(&str, &str)],
) -> Result<Coordinator> {
    let path = config_file(dir, &unique("coordinator"), config)?;
    let bin = bin("shardline-coordinator");
    let (proc, addr) =
        process::start_coordinator(&bin, Path::new(&path), env, Stdio::inherit(), Duration::from_secs(30))?;
    Ok(Coordinator { proc, url: format!("http://{addr}"), data_dir: dir.to_owned() })
}

/// Writes `config` to `dir/NAME.toml`; returns its path.
pub fn config_file(dir: &Path, name: &str, config: &impl serde::Serialize) -> Result<String> {
    let path = dir.join(format!("{name}.toml"));
    config::write(&path, config)?;
    path.into_os_string().into_string().map_err(|p| anyhow::anyhow!("a temp path that is not UTF-8: {p:?}"))
}

/// Starts a binary (`shardline-worker`, `json-sum`, ...) with `args`,
/// `env` as its only `SHARDLINE_*` variables and stdout as given (for
/// `json-sum`'s lines); killed when dropped.
pub fn spawn(name: &str, args: &[&str], env: &[(&str, &str)], stdout: Stdio) -> Result<Proc> {
    process::spawn(name, &bin(name), args, env, stdout, Stdio::inherit())
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
/// when the test fails): each subscription's queues and dead-letter
/// exchange (for the default failure policy), and the topic exchanges.
pub struct Topology {
    pub exchanges: Vec<String>,
    pub subscriptions: Vec<String>,
    _cleanup: Cleanup,
}

impl Topology {
    pub fn new(exchanges: usize, subscriptions: usize) -> Self {
        let exchanges: Vec<String> = (0..exchanges).map(|_| unique("t")).collect();
        let subscriptions: Vec<String> = (0..subscriptions).map(|_| unique("s")).collect();
        let mut cleanup = shardline_tests::amqp::cleanup();
        cleanup.exchanges.clone_from(&exchanges);
        let policy = FailurePolicy::default();
        let cleanup = subscriptions.iter().fold(cleanup, |c, s| c.subscription(s, &policy));
        Self { exchanges, subscriptions, _cleanup: cleanup }
    }

    /// [`timings`] with the topic exchanges (fanout) and each subscription
    /// on the first, handled by `handler`.
    pub fn config(&self, handler: &str) -> CoordinatorConfig {
        let topics = self.exchanges.iter().map(|e| TopicConfig { name: e.clone(), kind: TopicKind::Fanout });
        let subscriptions =
            self.subscriptions.iter().map(|s| SubscriptionConfig::new(s, &self.exchanges[0], handler));
        CoordinatorConfig { topics: topics.collect(), subscriptions: subscriptions.collect(), ..timings() }
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

/// Records produced in the background at a steady rate until stopped.
pub struct Feed {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Result<u64>>,
}

impl Feed {
    /// Produces ids `0, 1, ...` in chunks of `per_s / 10` every 100 ms
    /// (slower if the broker is slower).
    pub fn start(topic: &str, per_s: u64, keys: u64) -> Self {
        let (topic, stop) = (topic.to_owned(), Arc::new(AtomicBool::new(false)));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let producer = producer()?;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0;
            while !flag.load(Ordering::Relaxed) {
                tick.tick().await;
                produce(&producer, &topic, n, n + per_s / 10, keys).await?;
                n += per_s / 10;
            }
            Ok(n)
        });
        Self { stop, task }
    }

    /// Stops producing; returns how many records were produced (ids
    /// `0..n`, every one acknowledged).
    pub async fn stop(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

/// Reads receipts until all `produced` ids are there and the topic has been
/// quiet for 3 s (late duplicates), at most 90 s.
pub async fn receipts_of(topic: &str, produced: u64) -> Result<Vec<Receipt>> {
    let topic = topic.to_owned();
    let want = usize::try_from(produced)?;
    tokio::task::spawn_blocking(move || {
        read_receipts(&topic, want, Duration::from_secs(3), Duration::from_secs(90))
    })
    .await?
}

/// Prints the verdict and checks that nothing was lost and first
/// deliveries kept partition order.
pub fn check(v: &Verdict, what: &str) -> Result<()> {
    eprintln!(
        "{what}: {} unique, {} duplicates, {} lost, {} order violations",
        v.unique,
        v.duplicates,
        v.lost.len(),
        v.order_violations
    );
    ensure!(v.lost.is_empty(), "lost {} records, e.g. {:?}", v.lost.len(), &v.lost[..v.lost.len().min(10)]);
    ensure!(v.order_violations == 0, "{} order violations", v.order_violations);
    Ok(())
}

/// Runs the CLI against `url` (one URL or a comma-separated list) with
/// `args`, nothing from the environment; returns its exit code and stdout +
/// stderr.
pub async fn cli(url: &str, args: &[&str]) -> Result<(i32, String)> {
    let out = tokio::process::Command::new(bin("shardline"))
        .arg("--coordinator")
        .arg(url)
        .args(args)
        .env_remove("SHARDLINE_TOKEN")
        .env_remove("SHARDLINE_COORDINATOR")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out).await.context("the CLI hung")??;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code().unwrap_or(-1), text))
}
