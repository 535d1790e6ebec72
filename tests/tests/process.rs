//! The binaries as an operator runs them: the `SHARDLINE_*` environment
//! overrides the README documents (each set over a config file whose own
//! value leads nowhere, so the test passes only if the variable took
//! effect), bad values in them refused with exit 2 and the field named, and
//! a second SIGTERM stopping a draining worker at once.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use shardline_testkit::config;
use shardline_tests::amqp::{amqp_url, depth, publish_ids, publisher};
use shardline_tests::kafka::{produce, producer, read_receipts};
use shardline_tests::{
    Coordinator, CoordinatorConfig, StreamConfig, WorkerConfig, bin, create_topic, eventually, kafka_brokers,
    start_worker_config, unique,
};
use support::Topology;

/// Nothing listens on port 1: a config value that leads nowhere.
const DEAD_KAFKA: &str = "127.0.0.1:1";
const DEAD_AMQP: &str = "amqp://guest:guest@127.0.0.1:1/%2f";
const DEAD_COORDINATOR: &str = "http://127.0.0.1:1";
const TOKEN: &str = "env-s3cret";
/// The coordinator on a port the OS chooses.
const LOOPBACK_ANY: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// The coordinator's config file names brokers that do not answer and no
/// token; `SHARDLINE_KAFKA_BROKERS`, `SHARDLINE_AMQP_URL` and
/// `SHARDLINE_TOKEN` name the real ones and a token. The stream's
/// partitions are discovered (Kafka from the environment), the
/// subscription's queue is declared on the real RabbitMQ, and the admin API
/// refuses another token. The CLI is pointed at it by
/// `SHARDLINE_COORDINATOR` and `SHARDLINE_TOKEN`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_takes_brokers_and_token_from_the_environment() -> Result<()> {
    let topic = unique("env-c");
    create_topic(&topic, 2).await?;
    let t = Topology::new(1, 1);
    let dir = tempfile::tempdir()?;
    let config = CoordinatorConfig {
        listen: LOOPBACK_ANY,
        data_dir: dir.path().join("data"),
        kafka_brokers: DEAD_KAFKA.into(),
        amqp_url: DEAD_AMQP.into(),
        streams: vec![StreamConfig::new(&topic, "noop")],
        ..t.config("noop")
    };
    let (brokers, amqp) = (kafka_brokers(), amqp_url());
    let env = [
        ("SHARDLINE_KAFKA_BROKERS", brokers.as_str()),
        ("SHARDLINE_AMQP_URL", amqp.as_str()),
        ("SHARDLINE_TOKEN", TOKEN),
    ];
    let c = support::coordinator_with_env(dir.path(), &config, &env)?;

    // The CLI finds the coordinator and the token in the environment too.
    let leases = |token: &str| {
        let mut cli = tokio::process::Command::new(bin("shardline"));
        cli.args(["--json", "leases", "--stream", &topic]).env("SHARDLINE_COORDINATOR", &c.url);
        cli.env("SHARDLINE_TOKEN", token).stdin(Stdio::null()).kill_on_drop(true).output()
    };
    let refused = leases("wrong").await?;
    ensure!(
        refused.status.code() == Some(1) && String::from_utf8_lossy(&refused.stderr).contains("token"),
        "a token other than SHARDLINE_TOKEN's was not refused: {refused:?}"
    );
    eventually(
        Duration::from_secs(20),
        "the 2 partitions discovered through SHARDLINE_KAFKA_BROKERS",
        || async {
            let out = leases(TOKEN).await?;
            let listed: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
            let shards = listed.as_ref().and_then(serde_json::Value::as_array).map_or(0, Vec::len);
            ensure!(out.status.success() || out.status.code() == Some(2), "shardline leases: {out:?}");
            Ok((shards == 2).then_some(()))
        },
    )
    .await?;
    eventually(
        Duration::from_secs(20),
        "the subscription queue declared through SHARDLINE_AMQP_URL",
        || async { Ok(depth(&t.subscriptions[0]).await.is_ok().then_some(())) },
    )
    .await?;
    Ok(())
}

/// The worker's config file names a coordinator, Kafka and RabbitMQ that
/// do not answer and no token; `SHARDLINE_COORDINATOR`, `SHARDLINE_TOKEN`
/// (which the coordinator requires), `SHARDLINE_KAFKA_BROKERS` and
/// `SHARDLINE_AMQP_URL` name the real ones. It processes both a Kafka
/// record and a RabbitMQ message (receipts through `forward`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_takes_coordinator_token_and_brokers_from_the_environment() -> Result<()> {
    let (topic, receipts) = support::topics("env-w", 1).await?;
    let t = Topology::new(1, 1);
    let dir = tempfile::tempdir()?;
    let config = CoordinatorConfig {
        auth_token: Some(TOKEN.into()),
        streams: vec![support::from_start(&topic, "forward")],
        ..t.config("forward")
    };
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let worker = WorkerConfig {
        coordinator: DEAD_COORDINATOR.into(),
        worker_id: Some("env".into()),
        kafka_brokers: DEAD_KAFKA.into(),
        amqp_url: DEAD_AMQP.into(),
        ..config::hosting("forward", &[("topic", &receipts)])
    };
    let path = support::config_file(dir.path(), "worker", &worker)?;
    let (brokers, amqp) = (kafka_brokers(), amqp_url());
    let env = [
        ("SHARDLINE_COORDINATOR", c.url.as_str()),
        ("SHARDLINE_TOKEN", TOKEN),
        ("SHARDLINE_KAFKA_BROKERS", brokers.as_str()),
        ("SHARDLINE_AMQP_URL", amqp.as_str()),
    ];
    let _worker = support::spawn("shardline-worker", &["--config", &path], &env, Stdio::null())?;
    produce(&producer()?, &topic, 0, 5, 1).await?;
    eventually(Duration::from_secs(20), "the subscription queue", || async {
        Ok(depth(&t.subscriptions[0]).await.is_ok().then_some(()))
    })
    .await?;
    publish_ids(&publisher(), &t.exchanges[0], 100, 105).await?;
    let got = tokio::task::spawn_blocking(move || {
        read_receipts(&receipts, 10, Duration::from_millis(500), Duration::from_secs(40))
    })
    .await??;
    let ids: BTreeSet<u64> = got.iter().map(|r| r.id).collect();
    let want: BTreeSet<u64> = (0..5).chain(100..105).collect();
    ensure!(ids == want, "receipts for ids {ids:?}, want {want:?} (0..5 from Kafka, 100..105 from RabbitMQ)");
    Ok(())
}

/// A bad value in an environment override stops the binary before it
/// starts anything: exit 2, and stderr names the field and the value. The
/// same config without the variable starts (so the refusal is the
/// variable's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_value_in_the_environment_exits_2_naming_the_field() -> Result<()> {
    let t = Topology::new(1, 1);
    let dir = tempfile::tempdir()?;
    let config = CoordinatorConfig {
        listen: LOOPBACK_ANY,
        data_dir: dir.path().join("data"),
        streams: vec![StreamConfig::new(unique("env-bad"), "noop")],
        ..t.config("noop")
    };
    let coordinator = support::config_file(dir.path(), "coordinator", &config)?;
    let worker = WorkerConfig { coordinator: DEAD_COORDINATOR.into(), ..WorkerConfig::hosting(["noop"]) };
    let worker = support::config_file(dir.path(), "worker", &worker)?;
    let cases = [
        ("shardline-coordinator", &coordinator, "SHARDLINE_AMQP_URL", "http://127.0.0.1:5672", "amqp_url"),
        ("shardline-coordinator", &coordinator, "SHARDLINE_KAFKA_BROKERS", " ", "kafka_brokers"),
        ("shardline-worker", &worker, "SHARDLINE_COORDINATOR", "ftp://127.0.0.1:7400", "coordinator"),
        ("shardline-worker", &worker, "SHARDLINE_AMQP_URL", "127.0.0.1:5672", "amqp_url"),
        ("shardline-worker", &worker, "SHARDLINE_KAFKA_BROKERS", " ", "kafka_brokers"),
    ];
    let mut unclear = Vec::new();
    for (bin, config, var, value, field) in cases {
        let (code, stderr) = support::refused(bin, config, &[(var, value)]).await?;
        eprintln!("{bin} with {var}={value:?}: exit {code}: {stderr}");
        if code != 2 || !stderr.contains(&format!("`{field}`")) || !stderr.contains(value.trim()) {
            unclear.push(format!("{bin} with {var}={value:?} exited {code}, stderr: {}", stderr.trim()));
        }
    }
    ensure!(
        unclear.is_empty(),
        "want exit 2 and stderr naming the field and the bad value:\n{}",
        unclear.join("\n")
    );
    // Without the variables both start: the coordinator serves, the worker
    // keeps trying to reach its (absent) coordinator.
    drop(support::coordinator_with_env(dir.path(), &config, &[])?);
    let mut w = support::spawn("shardline-worker", &["--config", &worker], &[], Stdio::null())?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(w.child_running(), "the worker without the bad variables exited: {:?}", w.child.try_wait());
    Ok(())
}

/// A worker is in the middle of a 30 s batch when SIGTERM comes: it drains
/// (tells the coordinator, keeps running for the batch). A second SIGTERM
/// ends it at once, not with a finished drain's status 0, and the
/// unfinished batch is not checkpointed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_a_draining_worker_at_once() -> Result<()> {
    let topic = unique("sigterm");
    create_topic(&topic, 1).await?;
    produce(&producer()?, &topic, 0, 1, 1).await?;
    let dir = tempfile::tempdir()?;
    let config =
        CoordinatorConfig { streams: vec![support::from_start(&topic, "chaos")], ..support::timings() };
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let chaos = config::hosting("chaos", &[("sleep_per_batch", "30s")]);
    let mut w =
        start_worker_config(&c.url, "a", WorkerConfig { drain_timeout: Duration::from_secs(60), ..chaos })?;
    let worker = |draining: bool| {
        let c = &c;
        async move {
            let a = c.workers().await?.into_iter().find(|w| w.worker_id == "a");
            let busy = a.as_ref().and_then(|a| a.load.as_ref()).is_some_and(|l| l.inflight_batches == 1);
            Ok((busy && a.is_some_and(|a| a.draining == draining)).then_some(()))
        }
    };
    eventually(Duration::from_secs(20), "worker a running its batch", || worker(false)).await?;

    w.signal(libc::SIGTERM)?;
    eventually(Duration::from_secs(5), "worker a draining, its batch still running", || worker(true)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(w.child_running(), "the first SIGTERM did not drain: the worker exited {:?}", w.child.try_wait());

    w.signal(libc::SIGTERM)?;
    let signalled = Instant::now();
    let status = w.wait_exit(Duration::from_secs(2))?;
    eprintln!("second SIGTERM: exited {status} after {:?}", signalled.elapsed());
    ensure!(!status.success(), "the second SIGTERM let the worker finish its drain: {status}");
    let checkpoint = c.leases_of(&topic).await?.first().and_then(|l| l.checkpoint);
    ensure!(checkpoint.is_none_or(|o| o < 1), "the unfinished batch was checkpointed: {checkpoint:?}");
    Ok(())
}
