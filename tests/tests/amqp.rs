//! RabbitMQ as SNS/SQS, end to end: the real coordinator and worker
//! binaries against the real RabbitMQ. The coordinator declares the
//! topology from its config; messages are published with confirms; the
//! built-in `forward` / `chaos` handlers publish a receipt per processed
//! message to a receipts exchange, whose queue the test reads back.
//!
//! One test at a time (`SERIAL`): all of them start several processes on a
//! small machine. The two that take RabbitMQ down (`stop_app`, `kill -9`)
//! also hold [`broker_outage`], the lock of every test that disrupts a
//! shared broker. Run them under `flock /tmp/shardline-e2e.lock` where
//! other users share the broker. Every test deletes the queues and
//! exchanges it made, also when it fails (the kit's `Cleanup`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use shardline_proto::v1;
use shardline_testkit::amqp::Cleanup;
use shardline_testkit::broker;
use shardline_testkit::config::{self, Backoff, QueueType, SubscriptionConfig, TopicConfig, TopicKind};
use shardline_tests::amqp::{
    self, Got, channel, counts, depth, drain_queue, publish_ids, publisher, receipts_exchange,
};
use shardline_tests::serial::broker_outage;
use shardline_tests::{
    Coordinator, CoordinatorConfig, Proc, WorkerConfig, eventually, free_port, scrape, start_worker_config,
    unique,
};

mod support;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Names of one test's topology, deleted at the end.
struct Names {
    topic: String,
    subs: Vec<String>,
    receipts: Vec<String>,
}

impl Names {
    fn new(subs: usize) -> Self {
        Self {
            topic: unique("t"),
            subs: (0..subs).map(|_| unique("s")).collect(),
            receipts: (0..subs).map(|_| unique("r")).collect(),
        }
    }

    /// Every queue and exchange the test makes (the coordinator's retry and
    /// dead-letter queues included, for subscriptions with `policy`),
    /// deleted when the guard drops.
    fn cleanup(&self, policy: &shardline_proto::FailurePolicy) -> Cleanup {
        let mut cleanup = amqp::cleanup();
        cleanup.queues.extend(self.receipts.iter().map(|r| format!("{r}.q")));
        cleanup.exchanges.push(self.topic.clone());
        cleanup.exchanges.extend(self.receipts.iter().cloned());
        self.subs.iter().fold(cleanup, |c, s| c.subscription(s, policy))
    }
}

/// A coordinator and its workers, killed on drop (workers first).
struct Run {
    workers: Vec<Proc>,
    c: Coordinator,
    _dir: tempfile::TempDir,
}

impl Run {
    fn start(config: CoordinatorConfig, worker: &WorkerConfig, ids: &[&str]) -> Result<Self> {
        let workers: Vec<(&str, WorkerConfig)> = ids.iter().map(|id| (*id, worker.clone())).collect();
        Self::start_each(config, workers)
    }

    /// One worker per (id, config).
    fn start_each(config: CoordinatorConfig, workers: Vec<(&str, WorkerConfig)>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let c = Coordinator::start_config(config, &dir.path().join("data"))?;
        let workers = workers
            .into_iter()
            .map(|(id, cfg)| start_worker_config(&c.url, id, cfg))
            .collect::<Result<_>>()?;
        Ok(Self { workers, c, _dir: dir })
    }

    async fn subscription(&self, name: &str) -> Result<v1::SubscriptionInfo> {
        let reply = self.c.admin().await?.list_subscriptions(v1::ListSubscriptionsRequest {}).await?;
        reply.into_inner().subscriptions.into_iter().find(|s| s.name == name).context("subscription listed")
    }

    /// Waits until the coordinator has declared the topology and the
    /// subscription's slots are consuming.
    async fn consuming(&self, name: &str, consumers: u32) -> Result<()> {
        eventually(Duration::from_secs(30), "slots consuming", || async {
            let s = self.subscription(name).await?;
            ensure!(s.error.is_empty(), "topology error: {}", s.error);
            ensure!(s.consumers >= consumers, "{} consumers of {consumers}", s.consumers);
            Ok(Some(()))
        })
        .await
    }
}

/// Short timings, the fanout `topic` and one subscription to it per
/// (name, handler), with the defaults; tests set what they need.
fn topology(topic: &str, subs: &[(&str, &str)]) -> CoordinatorConfig {
    CoordinatorConfig {
        topics: vec![TopicConfig { name: topic.to_owned(), kind: TopicKind::Fanout }],
        subscriptions: subs
            .iter()
            .map(|(name, handler)| SubscriptionConfig::new(*name, topic, *handler))
            .collect(),
        ..support::timings()
    }
}

/// A retry backoff from `initial` doubling up to `max`.
fn backoff(initial: Duration, max: Duration) -> Backoff {
    Backoff { initial, max, multiplier: 2.0, ..Backoff::default() }
}

/// A subscription's slots: `min_slots` and `max_concurrency`.
fn slots(s: &mut SubscriptionConfig, min: u32, max: u32) {
    (s.min_slots, s.max_concurrency) = (min, max);
}

/// Reads receipts until every id in `0..n` was seen (or `timeout`).
async fn receipts(queue: &str, n: u64, timeout: Duration) -> Result<Vec<Got>> {
    let got = drain_queue(queue, n as usize, Duration::from_secs(2), timeout).await?;
    let seen = counts(&got);
    let missing: Vec<u64> = (0..n).filter(|i| !seen.contains_key(i)).take(10).collect();
    ensure!(missing.is_empty(), "{queue}: {} of {n} ids seen; missing e.g. {missing:?}", seen.len());
    Ok(got)
}

/// RabbitMQ's own count of consumers on `queue` (a passive declare): the
/// slots that really consume, whatever the coordinator meant to run.
async fn consumers(queue: &str) -> Result<u32> {
    let (_connection, ch) = channel().await?;
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let q = ch
        .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
        .await
        .with_context(|| format!("queue {queue}"))?;
    Ok(q.consumer_count())
}

fn duplicates(got: &[Got]) -> usize {
    got.len() - counts(got).len()
}

async fn declare_receipts(names: &Names) -> Result<()> {
    let (_connection, ch) = channel().await?;
    for r in &names.receipts {
        receipts_exchange(&ch, r).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fan_out_delivers_every_message_to_each_subscription() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let names = Names::new(2);
    let _cleanup = names.cleanup(&shardline_proto::FailurePolicy::default());
    declare_receipts(&names).await?;
    let (a, b) = (&names.subs[0], &names.subs[1]);
    let mut config = topology(&names.topic, &[(a, "forward"), (b, "chaos")]);
    slots(&mut config.subscriptions[0], 2, 2);
    config.subscriptions[0].settings.batch_size = 100;
    config.subscriptions[1].settings.batch_size = 10;
    let mut worker = config::hosting("forward", &[("exchange", &names.receipts[0])]);
    worker.handlers.insert("chaos".into(), config::settings(&[("exchange", &names.receipts[1])]));
    let run = Run::start(config, &worker, &["w1", "w2"])?;
    run.consuming(a, 2).await?;
    run.consuming(b, 1).await?;

    let n = 10_000;
    let started = Instant::now();
    publish_ids(&publisher(), &names.topic, 0, n).await?;
    println!("published {n} with confirms in {:?}", started.elapsed());
    let got_a = receipts(&format!("{}.q", names.receipts[0]), n, Duration::from_secs(120)).await?;
    let got_b = receipts(&format!("{}.q", names.receipts[1]), n, Duration::from_secs(120)).await?;
    println!(
        "subscription {a} (forward): {} receipts, {} duplicates; subscription {b} (chaos): {} receipts, {} duplicates; {:?}",
        got_a.len(),
        duplicates(&got_a),
        got_b.len(),
        duplicates(&got_b),
        started.elapsed()
    );
    // The receipts name the subscription each message came through.
    ensure!(
        got_a.iter().all(|g| g.header("shardline.stream") == Some(a.as_str())),
        "receipts of {a} say {a}"
    );
    ensure!(
        got_b.iter().all(|g| g.header("shardline.stream") == Some(b.as_str())),
        "receipts of {b} say {b}"
    );
    ensure!(depth(a).await? == 0 && depth(b).await? == 0, "both subscription queues drained");
    // Nothing failed and no slot moved abruptly: each message once per subscription.
    ensure!(
        duplicates(&got_a) == 0 && duplicates(&got_b) == 0,
        "duplicates without any failure: {} in {a}, {} in {b}",
        duplicates(&got_a),
        duplicates(&got_b)
    );
    drop(run);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_batch_loses_nothing_and_counts_redeliveries() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let names = Names::new(1);
    let _cleanup = names.cleanup(&shardline_proto::FailurePolicy::default());
    declare_receipts(&names).await?;
    let sub = &names.subs[0];
    let batch = 20;
    let mut config = topology(&names.topic, &[(sub, "chaos")]);
    slots(&mut config.subscriptions[0], 2, 2);
    config.subscriptions[0].settings.batch_size = batch;
    let worker =
        config::hosting("chaos", &[("exchange", names.receipts[0].as_str()), ("sleep_per_batch", "40ms")]);
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let survivor = WorkerConfig { metrics_listen: Some(metrics), ..worker.clone() };
    let mut run = Run::start_each(config, vec![("w1", worker), ("w2", survivor)])?;
    let metrics = metrics.to_string();
    run.consuming(sub, 2).await?;
    let leases = run.c.leases().await?;
    ensure!(
        shardline_tests::owners(&leases).len() == 2,
        "one slot per worker: {:?}",
        shardline_tests::owners(&leases)
    );

    let n = 4_000;
    publish_ids(&publisher(), &names.topic, 0, n).await?;
    // Mid-stream: some processed, most still queued.
    eventually(Duration::from_secs(60), "processing under way", || async {
        let d = depth(sub).await?;
        ensure!(d < (n as u32) * 3 / 4, "depth {d}");
        Ok(Some(()))
    })
    .await?;
    run.workers[0].kill9()?;
    let killed_at = Instant::now();
    println!("killed w1 with {} messages still queued", depth(sub).await?);

    let got = receipts(&format!("{}.q", names.receipts[0]), n, Duration::from_secs(180)).await?;
    let dups = duplicates(&got);
    let redelivered = scrape(&metrics, "shardline_redeliveries_total").await?;
    println!(
        "{n} published, {} distinct processed, 0 lost; {redelivered} redelivered to w2 after the kill -9, \
         {dups} of them processed twice; all done {:?} after the kill",
        counts(&got).len(),
        killed_at.elapsed()
    );
    // The killed worker held a prefetch it had not acked: RabbitMQ gave it
    // to the survivor, marked redelivered.
    ensure!(redelivered >= 1.0, "no redelivery counted after killing a consuming worker");
    // Only what the killed slot held unacknowledged can come twice: its
    // in-flight batch and its prefetch (2 batches).
    let most = 2 * batch as usize;
    ensure!(dups <= most, "{dups} duplicates; at most {most} were unacked by the killed worker");
    drop(run);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_message_retries_with_growing_delays_then_dead_letters_while_others_flow() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let names = Names::new(1);
    // The retry queues of the subscription's own backoff below.
    let policy = shardline_proto::FailurePolicy {
        retry_initial: Duration::from_secs(1),
        retry_max: Duration::from_secs(8),
        ..shardline_proto::FailurePolicy::default()
    };
    let _cleanup = names.cleanup(&policy);
    declare_receipts(&names).await?;
    let sub = &names.subs[0];
    let mut config = topology(&names.topic, &[(sub, "chaos")]);
    let s = &mut config.subscriptions[0].settings;
    (s.batch_size, s.max_retries, s.bisect_on_error) = (20, Some(3), true);
    s.retry_backoff = backoff(Duration::from_secs(1), Duration::from_secs(8));
    let worker = config::hosting("chaos", &[("exchange", names.receipts[0].as_str()), ("poison", "id-777")]);
    let run = Run::start(config, &worker, &["w1"])?;
    run.consuming(sub, 1).await?;
    let receipts_q = format!("{}.q", names.receipts[0]);
    let dlq = shardline_proto::topology::dead_letter_queue(sub);

    // 1,000 messages, one of them poison (only id-777 contains "id-777").
    publish_ids(&publisher(), &names.topic, 0, 1000).await?;
    let first = drain_queue(&receipts_q, 999, Duration::from_millis(500), Duration::from_secs(60)).await?;
    // More traffic while the poison waits out its retries.
    publish_ids(&publisher(), &names.topic, 1000, 1500).await?;
    let second = drain_queue(&receipts_q, 500, Duration::from_millis(500), Duration::from_secs(60)).await?;
    let in_retry = depth(&dlq).await?;
    let mut all = first;
    all.extend(second);
    let seen = counts(&all);
    let healthy: BTreeSet<u64> = (0..1500).filter(|i| *i != 777).collect();
    ensure!(healthy.iter().all(|i| seen.contains_key(i)), "every healthy message processed");
    ensure!(!seen.contains_key(&777), "the poison was never reported processed");
    ensure!(in_retry == 0, "the poison was still retrying while 1,499 others flowed (dlq depth {in_retry})");

    // Then it gives up: 1 + 3 retries, in the dead-letter queue; and
    // nothing else is there (2 s more of reading finds no second one).
    let dead = drain_queue(&dlq, 1, Duration::from_secs(2), Duration::from_secs(60)).await?;
    let dead_ids: Vec<Option<u64>> = dead.iter().map(Got::id).collect();
    println!("dead letters: {:?}", dead.iter().map(|d| (&d.body, &d.headers)).collect::<Vec<_>>());
    ensure!(dead_ids == [Some(777)], "the dead-letter queue holds {dead_ids:?}, want exactly [777]");
    let d = &dead[0];
    ensure!(
        d.header("shardline.attempts") == Some("4"),
        "attempts header {:?}",
        d.header("shardline.attempts")
    );
    ensure!(
        d.header("shardline.reason") == Some("retries_exhausted"),
        "reason {:?}",
        d.header("shardline.reason")
    );
    ensure!(
        d.header("shardline.error").is_some_and(|e| e.contains("poison")),
        "error {:?}",
        d.header("shardline.error")
    );
    ensure!(d.header("shardline.source.subscription") == Some(sub.as_str()), "source header");
    let times: Vec<u64> = d
        .header("shardline.attempts_failed_at")
        .context("attempt history header")?
        .split(',')
        .map(|t| t.parse().context("a time"))
        .collect::<Result<_>>()?;
    ensure!(times.len() == 4, "four failed attempts: {times:?}");
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    println!("gaps between attempts (ms): {gaps:?} (retry delays 1000, 2000, 4000)");
    for (gap, delay) in gaps.iter().zip([1000, 2000, 4000]) {
        ensure!(*gap >= delay, "gap {gap} ms shorter than the {delay} ms retry delay: {gaps:?}");
    }
    ensure!(gaps.windows(2).all(|w| w[1] > w[0]), "delays grow: {gaps:?}");
    drop(run);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_recover_from_a_rabbitmq_restart_without_restarting_and_lose_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let _outage = broker_outage().await?;
    let names = Names::new(1);
    let _cleanup = names.cleanup(&shardline_proto::FailurePolicy::default());
    declare_receipts(&names).await?;
    let sub = &names.subs[0];
    let mut config = topology(&names.topic, &[(sub, "chaos")]);
    slots(&mut config.subscriptions[0], 2, 2);
    config.subscriptions[0].settings.batch_size = 20;
    let worker =
        config::hosting("chaos", &[("exchange", names.receipts[0].as_str()), ("sleep_per_batch", "30ms")]);
    let mut run = Run::start(config, &worker, &["w1", "w2"])?;
    run.consuming(sub, 2).await?;

    let n = 4_000;
    publish_ids(&publisher(), &names.topic, 0, n).await?;
    eventually(Duration::from_secs(60), "processing under way", || async {
        let d = depth(sub).await?;
        ensure!(d < (n as u32) * 3 / 4, "depth {d}");
        Ok(Some(()))
    })
    .await?;
    let healthy = async || {
        let workers = run.c.workers().await?;
        ensure!(workers.len() == 2 && workers.iter().all(|w| w.unhealthy.is_empty()), "{workers:?}");
        Ok(Some(()))
    };
    eventually(Duration::from_secs(20), "healthy workers", healthy).await?;
    let stopped_app = broker::AppStopped::arm();
    broker::rabbitmqctl("stop_app").await?;
    let stopped = Instant::now();
    // The workers notice and say so in their heartbeats.
    let unhealthy = eventually(Duration::from_secs(20), "a worker reports unhealthy", || async {
        let workers = run.c.workers().await?;
        let sick: Vec<String> = workers
            .iter()
            .filter(|w| !w.unhealthy.is_empty())
            .map(|w| format!("{}: {:?}", w.worker_id, w.unhealthy))
            .collect();
        ensure!(!sick.is_empty(), "all healthy");
        Ok(Some(sick))
    })
    .await?;
    println!("while RabbitMQ was down: {unhealthy:?}");
    // The fault's duration (not a wait for anything): down a while longer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stopped_app.start().await?;
    println!("RabbitMQ app stopped for {:?}", stopped.elapsed());

    let got = receipts(&format!("{}.q", names.receipts[0]), n, Duration::from_secs(180)).await?;
    println!("{n} published, {} processed, 0 lost, {} processed twice", counts(&got).len(), duplicates(&got));
    for w in &mut run.workers {
        ensure!(w.child_running(), "worker {} kept running through the restart", w.name());
    }
    eventually(Duration::from_secs(20), "healthy again", healthy).await?;
    drop(run);
    Ok(())
}

/// A 20,000-message backlog grows the slots that consume (RabbitMQ's own
/// consumer count on the queue, not the coordinator's target) to 3 or
/// more, they go back to one after the drain, and nothing is processed
/// twice on the way up or down.
#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_adds_slots_and_they_go_back_down_after_the_drain() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let names = Names::new(1);
    let _cleanup = names.cleanup(&shardline_proto::FailurePolicy::default());
    declare_receipts(&names).await?;
    let sub = &names.subs[0];
    let mut config = topology(&names.topic, &[(sub, "chaos")]);
    let s = &mut config.subscriptions[0];
    slots(s, 1, 4);
    s.settings.batch_size = 10;
    (s.drain_target, s.scale_down_after) = (Duration::from_secs(2), Duration::from_secs(3));
    let worker =
        config::hosting("chaos", &[("exchange", names.receipts[0].as_str()), ("sleep_per_batch", "20ms")]);
    let run = Run::start(config, &worker, &["w1", "w2"])?;
    run.consuming(sub, 1).await?;
    let topic = names.topic.clone();

    let n = 20_000;
    let started = Instant::now();
    let publishing = tokio::spawn(async move { publish_ids(&publisher(), &topic, 0, n).await });
    // (ms, the coordinator's slots, RabbitMQ's consumers, depth)
    let mut history: Vec<(u64, u32, u32, u64)> = Vec::new();
    let mut peak = 0;
    // Sample every 500 ms until drained and back to one consumer (or give up).
    while started.elapsed() < Duration::from_secs(240) {
        let s = run.subscription(sub).await?;
        let consuming = consumers(sub).await?;
        if history.last().is_none_or(|(_, slots, c, _)| (*slots, *c) != (s.slots, consuming)) {
            println!(
                "t={:>5.1}s slots={} consumers={consuming} depth={}",
                started.elapsed().as_secs_f64(),
                s.slots,
                s.depth
            );
        }
        history.push((started.elapsed().as_millis() as u64, s.slots, consuming, s.depth));
        peak = peak.max(consuming);
        if peak > 1 && consuming == 1 && s.depth == 0 && publishing.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    publishing.await??;
    println!("over time (ms, slots, consumers, depth): {history:?}");
    ensure!(peak >= 3, "the backlog grew the consumers on {sub} to only {peak}");
    let last = history.last().map_or(0, |h| h.2);
    ensure!(last == 1, "consumers back to min_slots after the drain (now {last})");
    let got = receipts(&format!("{}.q", names.receipts[0]), n, Duration::from_secs(60)).await?;
    println!("{n} processed with a peak of {peak} consumers; {} duplicates", duplicates(&got));
    // Slots are added and parked gracefully (a parked slot acks what it
    // processed before it stops): no message is processed twice.
    ensure!(duplicates(&got) == 0, "{} duplicates while slots scaled up and down", duplicates(&got));
    // Parked slots are not owned by anyone.
    let leases = run.c.leases().await?;
    let owned = leases
        .iter()
        .filter(|l| l.lease.as_ref().is_some_and(|id| &id.name == sub) && !l.owner.is_empty())
        .count();
    ensure!(owned == 1, "one slot owned after scaling down, {owned} are");
    drop(run);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_that_exists_with_other_arguments_is_reported_not_redeclared() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let names = Names::new(1);
    let _cleanup = names.cleanup(&shardline_proto::FailurePolicy::default());
    let sub = &names.subs[0];
    // Someone made the queue by hand, classic and without a dead-letter
    // exchange; the config asks for a quorum queue.
    let (_connection, ch) = channel().await?;
    let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(sub.as_str().into(), durable, lapin::types::FieldTable::default()).await?;
    let mut config = topology(&names.topic, &[(sub, "noop")]);
    config.subscriptions[0].queue_type = QueueType::Quorum;
    let run = Run::start(config, &WorkerConfig::hosting(["noop"]), &[])?;
    let error = eventually(Duration::from_secs(30), "the conflict reported", || async {
        let s = run.subscription(sub).await?;
        ensure!(!s.error.is_empty(), "no error yet");
        Ok(Some(s.error))
    })
    .await?;
    println!("reported: {error}");
    ensure!(
        error.contains(sub.as_str()) && error.contains("inequivalent"),
        "names the queue and the conflict: {error}"
    );
    ensure!(error.contains("exists with other arguments"), "says what to do: {error}");
    // The queue was left as it was: still classic, still there.
    let passive = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    ch.queue_declare(sub.as_str().into(), passive, lapin::types::FieldTable::default()).await?;
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("classic".into()));
    ch.queue_declare(sub.as_str().into(), durable, args).await.context("still a classic queue")?;
    drop(run);
    Ok(())
}

/// Retries are at least once end to end (DESIGN.md rule 6): a failing
/// message is acked only once its copy is confirmed in a retry queue, and
/// the hop from the retry queue back to the subscription (RabbitMQ's own
/// dead-lettering on expiry) must survive a broker crash too.
///
/// Hundreds of messages fail and wait in the retry queues; RabbitMQ's
/// Erlang VM is killed with `kill -9` (no clean stop: nothing flushed, no
/// queue stopped) while they wait, and kept down past every delay, so at
/// boot the retry queues expire all of them at once, back into a
/// subscription queue that is itself still recovering. Every message must
/// end processed (healthy ones) or in the dead-letter queue (poison ones,
/// after their retries): none lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_rabbitmq_crash_while_messages_wait_in_retry_queues_loses_none() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let _outage = broker_outage().await?;
    let names = Names::new(1);
    let policy = shardline_proto::FailurePolicy {
        retry_initial: Duration::from_secs(2),
        retry_max: Duration::from_secs(4),
        ..shardline_proto::FailurePolicy::default()
    };
    let _cleanup = names.cleanup(&policy);
    declare_receipts(&names).await?;
    let sub = &names.subs[0];
    // Ids with a 7 in them are poison (about a quarter of 0..2000); the
    // handler names them, so the healthy ones of a batch are acked at once.
    let mut config = topology(&names.topic, &[(sub, "chaos")]);
    slots(&mut config.subscriptions[0], 2, 2);
    let s = &mut config.subscriptions[0].settings;
    (s.batch_size, s.max_retries, s.report_item_failures) = (50, Some(2), true);
    s.retry_backoff = backoff(Duration::from_secs(2), Duration::from_secs(4));
    let exchange = names.receipts[0].as_str();
    let mut worker = config::hosting("chaos", &[("exchange", exchange), ("poison", "7")]);
    // A boolean setting: the handler refuses the string "true".
    worker.handlers.entry("chaos".into()).or_default().insert("report_items".into(), true.into());
    let run = Run::start(config, &worker, &["w1", "w2"])?;
    run.consuming(sub, 2).await?;
    let receipts_q = format!("{}.q", names.receipts[0]);
    let dlq = shardline_proto::topology::dead_letter_queue(sub);
    let retry_queues: Vec<String> = shardline_proto::topology::retry_delays(&policy)
        .into_iter()
        .map(|d| shardline_proto::topology::retry_queue(sub, d))
        .collect();

    let n: u64 = 2000;
    let poison: BTreeSet<u64> = (0..n).filter(|i| i.to_string().contains('7')).collect();
    publish_ids(&publisher(), &names.topic, 0, n).await?;
    // Wait until (nearly) every poison message failed once and waits in a
    // retry queue, and the subscription queue is drained.
    let waiting = eventually(Duration::from_secs(60), "poison waiting in retry queues", || async {
        let mut waiting = 0;
        for q in &retry_queues {
            waiting += depth(q).await?;
        }
        let main = depth(sub).await?;
        ensure!(
            main == 0 && u64::from(waiting) * 10 >= poison.len() as u64 * 9,
            "{waiting} of {} waiting, {main} in {sub}",
            poison.len()
        );
        Ok(Some(waiting))
    })
    .await?;

    let killed = broker::kill_rabbitmq().await?;
    let killed_at = Instant::now();
    println!("kill -9 of RabbitMQ with {waiting} of {} poison messages in retry queues", poison.len());
    // Down longer than every delay: they are all due when the broker boots.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let restarted = Instant::now();
    killed.restart().await?;
    let boot = restarted.elapsed();
    println!("RabbitMQ answering again after {boot:?} ({:?} after the kill)", killed_at.elapsed());

    // Everything ends somewhere: healthy ids processed, poison ones dead-lettered.
    let healthy = n - poison.len() as u64;
    let mut got = Vec::new();
    let mut dead = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // Two seconds of reading each (no count to stop at).
        got.extend(drain_queue(&receipts_q, usize::MAX, Duration::ZERO, Duration::from_secs(2)).await?);
        dead.extend(drain_queue(&dlq, usize::MAX, Duration::ZERO, Duration::from_secs(2)).await?);
        let (seen, gave_up) = (counts(&got), counts(&dead));
        let done = (0..n).filter(|i| seen.contains_key(i) || gave_up.contains_key(i)).count() as u64;
        let mut left = 0;
        for q in retry_queues.iter().chain(std::iter::once(sub)) {
            left += depth(q).await?;
        }
        if done == n || (Instant::now() > deadline && left == 0) {
            break;
        }
        ensure!(Instant::now() < deadline + Duration::from_secs(60), "still {left} messages queued");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (seen, gave_up) = (counts(&got), counts(&dead));
    let lost: Vec<u64> = (0..n).filter(|i| !seen.contains_key(i) && !gave_up.contains_key(i)).collect();
    let lost_poison = lost.iter().filter(|i| poison.contains(i)).count();
    println!(
        "{n} published ({} poison): {} processed, {} dead-lettered, {} lost ({lost_poison} of them poison \
         waiting in retry queues at the kill), {} processed twice, {} dead-lettered twice",
        poison.len(),
        seen.len(),
        gave_up.len(),
        lost.len(),
        got.len() - seen.len(),
        dead.len() - gave_up.len(),
    );
    ensure!(lost.is_empty(), "{} messages lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(10)]);
    ensure!(
        (0..n).filter(|i| !poison.contains(i)).all(|i| seen.contains_key(&i)),
        "every one of the {healthy} healthy ids processed"
    );
    ensure!(gave_up.keys().all(|i| poison.contains(i)), "only poison ids dead-lettered");
    for d in dead.iter().take(3) {
        ensure!(
            d.header("shardline.attempts") == Some("3")
                && d.header("shardline.reason") == Some("retries_exhausted"),
            "dead letters after 1 + 2 attempts: {:?}",
            d.headers
        );
    }
    drop(run);
    Ok(())
}

/// Upgrading from the classic retry queues of earlier releases (named
/// `S.retry.<ms>`): they are left alone (still classic, still holding what
/// waits in them, which they return to `S` as before), the new quorum ones
/// are declared beside them, and what the old ones hold counts as retrying.
#[tokio::test(flavor = "multi_thread")]
async fn an_old_classic_retry_queue_is_kept_and_counted_beside_the_new_one() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let names = Names::new(1);
    let policy = shardline_proto::FailurePolicy {
        retry_initial: Duration::from_secs(60),
        retry_max: Duration::from_secs(60),
        ..shardline_proto::FailurePolicy::default()
    };
    let mut cleanup = names.cleanup(&policy);
    let sub = &names.subs[0];
    let delay = Duration::from_secs(60);
    let old = shardline_proto::topology::legacy_retry_queue(sub, delay);
    cleanup.queues.push(old.clone());
    // The old layout: a classic queue, TTL = the delay, back to `S`.
    let (_connection, ch) = channel().await?;
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("classic".into()));
    args.insert("x-message-ttl".into(), lapin::types::AMQPValue::LongLongInt(60_000));
    args.insert("x-dead-letter-exchange".into(), lapin::types::AMQPValue::LongString("".into()));
    args.insert("x-dead-letter-routing-key".into(), lapin::types::AMQPValue::LongString(sub.as_str().into()));
    let durable = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(old.as_str().into(), durable, args.clone()).await?;
    let waiting: Vec<shardline_worker::amqp::Message> = (0..3)
        .map(|i| shardline_worker::amqp::Message {
            routing_key: old.clone(),
            body: format!("id-{i}").into_bytes(),
            ..Default::default()
        })
        .collect();
    publisher().publish(&waiting).await.map_err(anyhow::Error::msg)?;

    let mut config = topology(&names.topic, &[(sub, "noop")]);
    let minute = Duration::from_secs(60);
    config.subscriptions[0].settings.retry_backoff =
        Backoff { initial: minute, max: minute, ..Backoff::default() };
    let run = Run::start(config, &WorkerConfig::hosting(["noop"]), &[])?;
    let s = eventually(Duration::from_secs(30), "the old queue counted as retrying", || async {
        let s = run.subscription(sub).await?;
        ensure!(s.error.is_empty(), "topology error: {}", s.error);
        ensure!(s.retrying == 3, "retrying {}", s.retrying);
        Ok(Some(s))
    })
    .await?;
    println!("subscription {}: retrying {} (the old classic queue's messages)", s.name, s.retrying);
    // The old queue is as it was; the new one is a quorum queue.
    ch.queue_declare(old.as_str().into(), durable, args).await.context("the old queue is unchanged")?;
    ensure!(depth(&old).await? == 3, "the old queue keeps its messages");
    // Declaring it again with the arguments of an at-least-once quorum
    // retry queue succeeds only if it has exactly those.
    let new = shardline_proto::topology::retry_queue(sub, delay);
    let mut quorum = lapin::types::FieldTable::default();
    for (k, v) in [
        ("x-queue-type", "quorum"),
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", sub.as_str()),
        ("x-dead-letter-strategy", "at-least-once"),
        ("x-overflow", "reject-publish"),
    ] {
        quorum.insert(k.into(), lapin::types::AMQPValue::LongString(v.into()));
    }
    quorum.insert("x-message-ttl".into(), lapin::types::AMQPValue::LongLongInt(60_000));
    let (_c2, ch2) = channel().await?;
    ch2.queue_declare(new.as_str().into(), durable, quorum)
        .await
        .context("the new retry queue is quorum, at least once")?;
    drop(run);
    Ok(())
}

/// Synchronous invocation without the gateway: requests published straight
/// to a subscription's queue with RabbitMQ direct reply-to get the `echo`
/// handler's replies (status, content type, their own body, their own
/// correlation id) on the requester's channel; a request whose requester is
/// gone is still handled (the queue drains) and its reply counted as
/// `requester_gone`, and one without `reply_to` gets none.
#[tokio::test(flavor = "multi_thread")]
async fn a_handler_answers_requests_through_direct_reply_to() -> Result<()> {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
    use lapin::types::{AMQPValue, FieldTable};

    let _serial = SERIAL.lock().await;
    let names = Names::new(1);
    let _cleanup = names.cleanup(&shardline_proto::FailurePolicy::default());
    let sub = &names.subs[0];
    let mut config = topology(&names.topic, &[(sub, "echo")]);
    config.subscriptions[0].settings.batch_size = 10;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let mut worker =
        WorkerConfig { metrics_listen: Some(metrics.parse()?), ..config::hosting("echo", &[("", ""); 0]) };
    let echo = worker.handlers.get_mut("echo").context("the echo handler's table")?;
    echo.insert("status".into(), toml::Value::Integer(201));
    let run = Run::start(config, &worker, &["w1"])?;
    run.consuming(sub, 1).await?;

    let (_connection, ch) = channel().await?;
    // Direct reply-to: consume the pseudo-queue (no-ack) on the channel
    // that publishes, before publishing.
    let consume = BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() };
    let mut replies = ch
        .basic_consume("amq.rabbitmq.reply-to".into(), "req".into(), consume, FieldTable::default())
        .await?;
    let n = 200;
    for i in 0..n {
        let mut headers = FieldTable::default();
        headers.insert("content-type".into(), AMQPValue::LongString("text/x-test".into()));
        let props = lapin::BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id(format!("c-{i}").into())
            .with_headers(headers);
        let publish = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        ch.basic_publish("".into(), sub.as_str().into(), publish, format!("body-{i}").as_bytes(), props)
            .await?;
    }
    let mut seen = BTreeSet::new();
    while seen.len() < n {
        let delivery = tokio::time::timeout(Duration::from_secs(60), replies.next())
            .await
            .with_context(|| format!("{} of {n} replies within 60 s", seen.len()))?
            .context("reply consumer ended")??;
        let id = delivery.properties.correlation_id().as_ref().context("a correlation id")?.to_string();
        let i: usize = id.trim_start_matches("c-").parse()?;
        ensure!(delivery.data == format!("body-{i}").as_bytes(), "reply {id} carries its request's body");
        let status =
            delivery.properties.headers().as_ref().and_then(|h| h.inner().get("shardline.status").cloned());
        ensure!(status == Some(AMQPValue::LongInt(201)), "reply {id}: status 201, got {status:?}");
        let content_type = delivery.properties.content_type().as_ref().map(|c| c.to_string());
        ensure!(content_type.as_deref() == Some("text/x-test"), "reply {id}: content type {content_type:?}");
        ensure!(seen.insert(i), "reply {id} twice");
    }

    // A requester that is gone (its reply queue no longer exists) and a
    // request with no `reply_to`: both handled, neither fails its batch.
    let props = lapin::BasicProperties::default()
        .with_reply_to(unique("gone").into())
        .with_correlation_id("gone".into());
    ch.basic_publish("".into(), sub.as_str().into(), BasicPublishOptions::default(), b"orphan", props)
        .await?;
    let plain = lapin::BasicProperties::default();
    ch.basic_publish("".into(), sub.as_str().into(), BasicPublishOptions::default(), b"plain", plain).await?;
    eventually(Duration::from_secs(60), "the orphaned reply counted, the queue drained", || async {
        let m = shardline_testkit::metrics::scrape(&metrics).await?;
        let gone = m.get_or_zero("shardline_replies_total{outcome=\"requester_gone\"}");
        let sent = m.get_or_zero("shardline_replies_total{outcome=\"sent\"}");
        ensure!(gone >= 1.0 && sent >= n as f64, "replies: {sent} sent, {gone} to a gone requester");
        ensure!(depth(sub).await? == 0, "subscription queue drained");
        Ok(Some(()))
    })
    .await?;
    let extra = tokio::time::timeout(Duration::from_secs(2), replies.next()).await;
    ensure!(extra.is_err(), "no reply for the request without reply_to: {extra:?}");
    ensure!(
        shardline_testkit::metrics::scrape(&metrics).await?.sum_or_zero("shardline_handler_errors_total")
            == 0.0,
        "no batch failed"
    );
    drop(run);
    Ok(())
}
