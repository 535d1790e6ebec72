//! Black-box tests of workers processing Kafka shards: real coordinator and
//! worker binaries, real Kafka (tansu), the `forward` handler writing a
//! receipt per processed record to a one-partition receipts topic.
//!
//! The tests in this file run one at a time (`SERIAL`): each starts a
//! coordinator, several workers and a producer, and the machine they run on
//! has few cores; timings (failover) mean little when they share it.
//! Tests wait for conditions (leases settled, checkpoints moving), not for
//! fixed times; the one fixed duration is a fault's (how long a zombie
//! works on unheard).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use shardline_proto::v1;
use shardline_testkit::config;
use shardline_tests::kafka::{Receipt, produce, producer, verify};
use shardline_tests::{
    Coordinator, CoordinatorConfig, WorkerConfig, create_topic, eventually, free_port, http_get, metric,
    owners, start_worker_config, unique,
};
use support::{Feed, check, receipts_of};
use tokio::task::JoinHandle;

mod support;

/// One test at a time in this file (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Distinct keys of the produced records (spread over every partition).
const KEYS: u64 = 500;

/// Records per second produced while workers run.
const RATE: u64 = 2_500;

/// A fresh 8-partition stream and its one-partition receipts topic (one
/// partition, so receipt order is processing order).
async fn topics(name: &str) -> Result<(String, String)> {
    let (topic, receipts) = (unique(name), unique("receipts"));
    create_topic(&topic, 8).await?;
    create_topic(&receipts, 1).await?;
    Ok((topic, receipts))
}

/// A worker config hosting `forward` to `receipts`.
fn forward(receipts: &str) -> WorkerConfig {
    config::hosting("forward", &[("topic", receipts)])
}

/// The same, serving metrics on `metrics`.
fn forward_with_metrics(receipts: &str, metrics: SocketAddr) -> WorkerConfig {
    WorkerConfig { metrics_listen: Some(metrics), ..forward(receipts) }
}

fn coordinator_config(topic: &str) -> CoordinatorConfig {
    stream_config(topic, "forward", 500, None)
}

/// One stream `topic` from its start, handled by `handler`, with short
/// timings and metrics on `metrics` if given.
fn stream_config(
    topic: &str,
    handler: &str,
    batch_size: u32,
    metrics: Option<SocketAddr>,
) -> CoordinatorConfig {
    let mut stream = support::from_start(topic, handler);
    stream.settings.batch_size = batch_size;
    CoordinatorConfig { metrics_listen: metrics, streams: vec![stream], ..support::timings() }
}

fn loopback() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn partition(info: &v1::LeaseInfo) -> Option<u32> {
    info.lease.as_ref().map(|l| l.index)
}

fn owned_by(leases: &[v1::LeaseInfo], worker: &str) -> BTreeSet<u32> {
    leases.iter().filter(|l| l.owner == worker).filter_map(partition).collect()
}

/// Waits until all `total` leases are owned (none releasing) and the
/// per-worker counts, largest first, are `spread`. Returns the table.
async fn settled(
    c: &Coordinator,
    total: usize,
    spread: &[usize],
    timeout: Duration,
) -> Result<Vec<v1::LeaseInfo>> {
    eventually(timeout, &format!("{total} owned leases spread {spread:?}"), || async {
        let l = c.leases().await?;
        let all_owned = l.len() == total && l.iter().all(|l| l.state == v1::LeaseState::Owned as i32);
        let mut counts: Vec<usize> = owners(&l).into_values().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        ensure!(all_owned && counts == spread, "leases now: {:?}", owners(&l));
        Ok(Some(l))
    })
    .await
}

/// Waits until `worker` owns leases and has processed records on every one
/// of them (its checkpoints are past 0); returns their partitions.
async fn processing(c: &Coordinator, worker: &str) -> Result<BTreeSet<u32>> {
    eventually(Duration::from_secs(20), &format!("{worker} to process on all its leases"), || async {
        let l = c.leases().await?;
        let mine: Vec<&v1::LeaseInfo> = l.iter().filter(|l| l.owner == worker).collect();
        let busy = !mine.is_empty() && mine.iter().all(|l| l.checkpoint.is_some_and(|c| c > 0));
        Ok(busy.then(|| mine.iter().filter_map(|l| partition(l)).collect()))
    })
    .await
}

/// The checkpoint of each of `partitions` (0 where none yet).
async fn checkpoints(c: &Coordinator, partitions: &BTreeSet<u32>) -> Result<BTreeMap<u32, i64>> {
    let l = c.leases().await?;
    Ok(l.iter()
        .filter_map(|l| Some((partition(l)?, l.checkpoint.unwrap_or(0))))
        .filter(|(p, _)| partitions.contains(p))
        .collect())
}

/// Waits until each partition of `from` is owned by someone other than
/// `not` and checkpointed past its offset in `from`: its new owner is
/// processing records.
async fn advanced_past(c: &Coordinator, from: &BTreeMap<u32, i64>, not: &str) -> Result<()> {
    eventually(Duration::from_secs(30), &format!("{from:?} to move on without {not}"), || async {
        let l = c.leases().await?;
        let behind: Vec<String> = from
            .iter()
            .filter(|(p, at)| {
                !l.iter().any(|l| {
                    partition(l) == Some(**p)
                        && l.owner != not
                        && !l.owner.is_empty()
                        && l.checkpoint > Some(**at)
                })
            })
            .map(|(p, at)| format!("{p} (from {at})"))
            .collect();
        ensure!(behind.is_empty(), "not yet moved on: {behind:?}");
        Ok(Some(()))
    })
    .await
}

fn by_worker(receipts: &[Receipt]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for r in receipts {
        *counts.entry(r.worker.as_str()).or_default() += 1;
    }
    counts
}

/// Polls ListLeases every 100 ms until stopped and records every time a
/// lease's checkpoint is lower than one seen before.
struct CheckpointWatch {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Result<(usize, Vec<String>)>>,
}

impl CheckpointWatch {
    fn start(c: &Coordinator) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (url, flag) = (c.url.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut admin = v1::admin_api_client::AdminApiClient::connect(url).await?;
            let mut highest = BTreeMap::<u32, i64>::new();
            let (mut samples, mut backwards) = (0, Vec::new());
            while !flag.load(Ordering::Relaxed) {
                let table = admin.list_leases(v1::ListLeasesRequest::default()).await?.into_inner().leases;
                samples += 1;
                for l in &table {
                    let (Some(p), Some(checkpoint)) = (partition(l), l.checkpoint) else { continue };
                    let seen = highest.entry(p).or_insert(checkpoint);
                    if checkpoint < *seen {
                        backwards.push(format!(
                            "partition {p}: checkpoint {checkpoint} after {seen} (owner {:?}, epoch {})",
                            l.owner, l.epoch
                        ));
                    }
                    *seen = (*seen).max(checkpoint);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok((samples, backwards))
        });
        Self { stop, task }
    }

    /// Stops polling; returns how many tables were read and every backward
    /// move seen.
    async fn finish(self) -> Result<(usize, Vec<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

/// 8 partitions, 2 workers, 20,000 keyed records: all processed, none
/// twice, order kept per partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_process_every_record_once_in_partition_order() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (topic, receipts) = topics("orders").await?;
    let n = 20_000;
    produce(&producer()?, &topic, 0, n, KEYS).await?;

    let dir = tempfile::tempdir()?;
    let c = Coordinator::start_config(coordinator_config(&topic), &dir.path().join("data"))?;
    let _a = start_worker_config(&c.url, "a", forward(&receipts))?;
    let _b = start_worker_config(&c.url, "b", forward(&receipts))?;

    let got = receipts_of(&receipts, n).await?;
    let v = verify(&got, n);
    check(&v, "two workers")?;
    ensure!(v.duplicates == 0, "{} duplicates", v.duplicates);
    let workers: BTreeSet<&str> = got.iter().map(|r| r.worker.as_str()).collect();
    ensure!(workers.len() == 2, "both workers processed records: {workers:?}");
    Ok(())
}

/// `kill -9` one of three workers while records keep coming: nothing is
/// lost; the only records processed twice are ones the killed worker
/// processed past its last checkpoint (read from the coordinator right
/// after the kill), so a new owner that restarted anywhere earlier fails;
/// and each of its partitions is processing on another worker within
/// session_timeout (3 s) + 2 s (+ 2 s slack for a shared 2-core machine),
/// measured by receipt timestamps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_mid_stream_loses_nothing_and_its_partitions_resume_within_the_target()
-> Result<()> {
    let _serial = SERIAL.lock().await;
    let (topic, receipts) = topics("kill9").await?;
    let dir = tempfile::tempdir()?;
    let c = Coordinator::start_config(coordinator_config(&topic), &dir.path().join("data"))?;
    let _a = start_worker_config(&c.url, "a", forward(&receipts))?;
    let mut b = start_worker_config(&c.url, "b", forward(&receipts))?;
    let _c = start_worker_config(&c.url, "c", forward(&receipts))?;
    settled(&c, 8, &[3, 3, 2], Duration::from_secs(30)).await?;

    let feed = Feed::start(&topic, RATE, KEYS);
    let victims = processing(&c, "b").await?;
    // Well into the stream: b has checkpointed work a careless new owner
    // would process again.
    eventually(Duration::from_secs(30), "b 200 records into each partition", || async {
        let at = checkpoints(&c, &victims).await?;
        Ok(at.values().all(|&o| o >= 200).then_some(()))
    })
    .await?;
    let killed_ms = now_ms();
    b.kill9()?;
    // b is gone: nothing but a checkpoint already on its way can move its
    // partitions' checkpoints before the failover, and that only raises them.
    let at_kill = checkpoints(&c, &victims).await?;
    // Keep producing until every partition of b is processing elsewhere.
    advanced_past(&c, &at_kill, "b").await?;
    let n = feed.stop().await?;

    let got = receipts_of(&receipts, n).await?;
    let v = verify(&got, n);
    check(&v, "kill -9")?;
    // What b processed past its last checkpoint: the only records a new
    // owner may process again.
    let uncheckpointed: BTreeSet<u64> = got
        .iter()
        .filter(|r| r.worker == "b" && at_kill.get(&r.partition).is_some_and(|&at| r.offset >= at))
        .map(|r| r.id)
        .collect();
    let mut seen = BTreeMap::<u64, usize>::new();
    for r in &got {
        *seen.entry(r.id).or_default() += 1;
    }
    let unexplained: Vec<u64> =
        seen.iter().filter(|(id, n)| **n > 1 && !uncheckpointed.contains(id)).map(|(id, _)| *id).collect();
    eprintln!(
        "kill -9: {} duplicates, at most {} allowed (b's work past its checkpoints {at_kill:?}); receipts by worker {:?}",
        v.duplicates,
        uncheckpointed.len(),
        by_worker(&got)
    );
    ensure!(
        unexplained.is_empty(),
        "{} records processed twice that b had checkpointed (a new owner restarted before {at_kill:?}), e.g. {:?}",
        unexplained.len(),
        &unexplained[..unexplained.len().min(10)]
    );
    ensure!(
        v.duplicates <= uncheckpointed.len(),
        "{} duplicates; b processed only {} records past its last checkpoint",
        v.duplicates,
        uncheckpointed.len()
    );

    let mut worst = 0;
    for p in &victims {
        let resumed = got
            .iter()
            .filter(|r| r.partition == *p && r.worker != "b" && r.timestamp_ms > killed_ms)
            .map(|r| r.timestamp_ms)
            .min()
            .with_context(|| {
                format!("partition {p} (b's) has no receipt from another worker after the kill")
            })?;
        eprintln!("kill -9: partition {p} resumed {} ms after the kill", resumed - killed_ms);
        worst = worst.max(resumed - killed_ms);
    }
    eprintln!(
        "kill -9: failover took {worst} ms for partitions {victims:?} (session_timeout 3 s, target 5 s)"
    );
    ensure!(worst < 7_000, "failover took {worst} ms; allowed: session_timeout (3 s) + 2 s + 2 s slack");
    Ok(())
}

/// A third worker joins while two process a stream: leases move to it by
/// graceful handoff only (no duplicate, nothing lost, nothing forced) and
/// end spread 3/3/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_joining_mid_stream_takes_leases_by_graceful_handoff_without_duplicates() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (topic, receipts) = topics("scale").await?;
    let dir = tempfile::tempdir()?;
    let metrics = loopback()?;
    let config = stream_config(&topic, "forward", 500, Some(metrics));
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let _a = start_worker_config(&c.url, "a", forward(&receipts))?;
    let _b = start_worker_config(&c.url, "b", forward(&receipts))?;
    settled(&c, 8, &[4, 4], Duration::from_secs(30)).await?;

    let feed = Feed::start(&topic, RATE, KEYS);
    processing(&c, "a").await?;
    processing(&c, "b").await?;
    let _c = start_worker_config(&c.url, "c", forward(&receipts))?;
    let table = settled(&c, 8, &[3, 3, 2], Duration::from_secs(30)).await?;
    // Records keep coming until c processes on every lease it took.
    processing(&c, "c").await?;
    let n = feed.stop().await?;
    let spread = owners(&table);
    eprintln!("scale-out: leases at the end {spread:?}");
    ensure!(spread.get("c").is_some_and(|&n| n >= 2), "c got its share: {spread:?}");

    let got = receipts_of(&receipts, n).await?;
    let v = verify(&got, n);
    check(&v, "scale-out")?;
    let counts = by_worker(&got);
    eprintln!("scale-out: receipts by worker {counts:?}");
    ensure!(v.duplicates == 0, "{} duplicates after graceful handoffs", v.duplicates);
    ensure!(counts.get("c").is_some_and(|&n| n > 0), "c processed nothing: {counts:?}");

    let body = http_get(&metrics.to_string(), "/metrics").await?;
    let moves = metric(&body, "shardline_rebalance_moves_total")?;
    let forced = metric(&body, "shardline_handoffs_forced_total")?;
    let failovers = metric(&body, "shardline_failovers_total")?;
    eprintln!(
        "scale-out: coordinator rebalance moves {moves}, forced handoffs {forced}, failovers {failovers}"
    );
    ensure!(moves >= 2.0, "the balancer moved {moves} leases; c needed 2");
    ensure!(
        forced == 0.0 && failovers == 0.0,
        "handoffs were forced: {forced} forced, {failovers} failovers"
    );
    Ok(())
}

/// A TCP proxy in front of the coordinator for one worker: it passes bytes
/// both ways, and while held it stops passing what the worker sends, which
/// then arrives late and in order when released: a zombie's requests
/// delivered after its session ended.
struct Proxy {
    url: String,
    held: Arc<tokio::sync::watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(coordinator_url: &str) -> Result<Self> {
        let upstream = coordinator_url.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let held = Arc::new(tokio::sync::watch::channel(false).0);
        let hold = held.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (upstream, hold) = (upstream.clone(), hold.subscribe());
                tokio::spawn(async move {
                    if let Err(e) = Self::pass(&mut client, &upstream, hold).await {
                        eprintln!("proxy: connection ended: {e:#}");
                    }
                });
            }
        });
        Ok(Self { url, held, task })
    }

    async fn pass(
        client: &mut tokio::net::TcpStream,
        upstream: &str,
        mut hold: tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut server = tokio::net::TcpStream::connect(upstream).await?;
        let (mut from_client, mut to_client) = client.split();
        let (mut from_server, mut to_server) = server.split();
        let upward = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = from_client.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, anyhow::Error>(());
                }
                // What the worker sends while held waits here (and the rest
                // in the socket buffers behind it).
                hold.wait_for(|held| !held).await?;
                to_server.write_all(&buf[..n]).await?;
            }
        };
        let downward = async {
            tokio::io::copy(&mut from_server, &mut to_client).await?;
            Ok(())
        };
        tokio::try_join!(upward, downward)?;
        Ok(())
    }

    fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The coordinator's refused checkpoints so far (exported, 0 included,
/// from its first checkpoint on; absent is an error).
async fn refused_checkpoints(metrics: &str) -> Result<f64> {
    metric(&http_get(metrics, "/metrics").await?, "shardline_checkpoints_total{result=\"refused\"}")
}

/// A worker frozen (SIGSTOP) mid-batch past the session timeout loses its
/// leases, and its stale checkpoints are refused: it reaches the
/// coordinator through a proxy that holds what it sends from a moment
/// before the freeze, so the checkpoints of the batches it finished in
/// that moment arrive after its leases were given to `b`, quoting the old
/// epochs. The coordinator must refuse them (its refused counter moves, no
/// checkpoint ever moves backwards). When the zombie wakes (SIGCONT) it
/// stops every lease it held (its own `shardline_leases_lost_total`),
/// registers again, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_loses_its_leases_and_cannot_move_checkpoints_when_it_wakes() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (topic, receipts) = topics("zombie").await?;
    let dir = tempfile::tempdir()?;
    let coordinator_metrics = loopback()?;
    let config = stream_config(&topic, "chaos", 500, Some(coordinator_metrics));
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    // Every batch spends 300 ms in the handler: a freeze lands mid-batch.
    let slow = config::hosting("chaos", &[("topic", receipts.as_str()), ("sleep_per_batch", "300ms")]);
    let proxy = Proxy::start(&c.url).await?;
    let zombie_metrics = loopback()?;
    let zombie_config = WorkerConfig { metrics_listen: Some(zombie_metrics), ..slow.clone() };
    let zombie = start_worker_config(&proxy.url, "z", zombie_config)?;
    let _b = start_worker_config(&c.url, "b", slow)?;
    settled(&c, 8, &[4, 4], Duration::from_secs(30)).await?;
    let watch = CheckpointWatch::start(&c);

    let feed = Feed::start(&topic, RATE, KEYS);
    let held = processing(&c, "z").await?;
    let epochs: BTreeMap<u32, u64> = c
        .leases()
        .await?
        .iter()
        .filter(|l| l.owner == "z")
        .filter_map(|l| Some((partition(l)?, l.epoch)))
        .collect();
    proxy.hold(true);
    // z works on, unheard, for less than its self-fence margin (2.4 s after
    // its last acknowledged heartbeat): each of its leases finishes a batch
    // or more and sends the checkpoint, which the proxy holds.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    zombie.signal(libc::SIGSTOP)?;
    let frozen = Instant::now();

    // Still frozen: the coordinator has taken everything from it.
    let table = eventually(Duration::from_secs(15), "z to lose every lease while frozen", || async {
        let l = c.leases().await?;
        Ok((owned_by(&l, "z").is_empty() && owners(&l).get("b") == Some(&8)).then_some(l))
    })
    .await?;
    let lost_after = frozen.elapsed();
    let gone = !c.workers().await?.iter().any(|w| w.worker_id == "z");
    eprintln!(
        "zombie: z lost {held:?} {lost_after:?} after SIGSTOP (session_timeout 3 s); still listed: {}",
        !gone
    );
    ensure!(gone, "an expired worker is no longer listed");
    ensure!(owned_by(&table, "b").is_superset(&held), "b took over z's partitions");
    let moved: Vec<String> = table
        .iter()
        .filter_map(|l| Some((partition(l)?, l.epoch)))
        .filter_map(|(p, epoch)| {
            epochs.get(&p).filter(|old| epoch <= **old).map(|old| format!("{p}: {old} -> {epoch}"))
        })
        .collect();
    ensure!(moved.is_empty(), "z's partitions went to b without a new epoch: {moved:?}");

    // Now z's held requests arrive: its checkpoints quote the old epochs.
    let refused_before = refused_checkpoints(&coordinator_metrics.to_string()).await?;
    proxy.hold(false);
    let refused = eventually(Duration::from_secs(10), "z's stale checkpoints to be refused", || async {
        let now = refused_checkpoints(&coordinator_metrics.to_string()).await?;
        Ok((now > refused_before).then_some(now - refused_before))
    })
    .await?;
    let after = c.leases().await?;
    ensure!(
        owned_by(&after, "b").is_superset(&held),
        "b lost z's old partitions to z's stale requests: {:?}",
        owners(&after)
    );
    zombie.signal(libc::SIGCONT)?;

    // It wakes up, finds its session gone (or its checkpoints refused),
    // stops every lease it held and registers again.
    eventually(Duration::from_secs(15), "z to re-register", || async {
        Ok(c.workers().await?.iter().any(|w| w.worker_id == "z").then_some(()))
    })
    .await?;
    let lost = eventually(Duration::from_secs(15), "z to count its lost leases", || async {
        let body = http_get(&zombie_metrics.to_string(), "/metrics").await?;
        let lost = metric(&body, "shardline_leases_lost_total")?;
        Ok((lost >= held.len() as f64).then_some(lost))
    })
    .await?;
    let n = feed.stop().await?;

    let got = receipts_of(&receipts, n).await?;
    let v = verify(&got, n);
    check(&v, "zombie")?;
    let (samples, backwards) = watch.finish().await?;
    eprintln!(
        "zombie: coordinator refused {refused} stale checkpoint calls' entries of z; z counted {lost} lost leases \
         (held {}); {} duplicates; receipts by worker {:?}; {samples} lease tables watched",
        held.len(),
        v.duplicates,
        by_worker(&got),
    );
    ensure!(samples >= 50, "watched only {samples} lease tables");
    ensure!(backwards.is_empty(), "checkpoints moved backwards:\n{}", backwards.join("\n"));
    drop(proxy);
    Ok(())
}

/// `init` runs once per worker process, however many leases and batches
/// it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_init_runs_once_per_worker_process() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (topic, receipts) = topics("init").await?;
    let n = 8_000;
    produce(&producer()?, &topic, 0, n, KEYS).await?;

    let dir = tempfile::tempdir()?;
    let c = Coordinator::start_config(stream_config(&topic, "forward", 50, None), &dir.path().join("data"))?;
    let addrs = [("a", loopback()?), ("b", loopback()?)];
    let mut procs = Vec::new();
    for (id, addr) in &addrs {
        procs.push(start_worker_config(&c.url, id, forward_with_metrics(&receipts, *addr))?);
    }
    let got = receipts_of(&receipts, n).await?;
    let v = verify(&got, n);
    check(&v, "init once")?;
    settled(&c, 8, &[4, 4], Duration::from_secs(30)).await?;

    for (id, addr) in &addrs {
        let body = http_get(&addr.to_string(), "/metrics").await?;
        let inits = metric(&body, "shardline_handler_inits_total{handler=\"forward\"}")?;
        let batches = metric(&body, "shardline_batches_total{handler=\"forward\"}")?;
        eprintln!("init once: worker {id}: inits {inits}, batches {batches}");
        ensure!(batches > 8.0, "worker {id} ran {batches} batches; want more than 8");
        let series: Vec<&str> = body.lines().filter(|l| l.starts_with("shardline_")).collect();
        ensure!(inits == 1.0, "worker {id}: handler inits {inits}; want exactly 1; series: {series:#?}");
    }
    Ok(())
}

/// SIGTERM: the worker drains, hands every lease over (no duplicate,
/// nothing lost, no failover by timeout) and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_leases_over_without_duplicates_and_exits_0() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (topic, receipts) = topics("term").await?;
    let dir = tempfile::tempdir()?;
    let metrics = loopback()?;
    let config = stream_config(&topic, "forward", 500, Some(metrics));
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let mut a = start_worker_config(&c.url, "a", forward(&receipts))?;
    let _b = start_worker_config(&c.url, "b", forward(&receipts))?;
    settled(&c, 8, &[4, 4], Duration::from_secs(30)).await?;

    let feed = Feed::start(&topic, RATE, KEYS);
    let moving = processing(&c, "a").await?;
    a.signal(libc::SIGTERM)?;
    let status = tokio::task::spawn_blocking(move || a.wait_exit(Duration::from_secs(30))).await??;
    ensure!(status.success(), "worker a exited with {status:?}");
    let table = settled(&c, 8, &[8], Duration::from_secs(20)).await?;
    ensure!(owned_by(&table, "b").is_superset(&moving), "b took over {moving:?}");
    // Records keep coming until b processes on every partition it took.
    advanced_past(&c, &checkpoints(&c, &moving).await?, "a").await?;
    let n = feed.stop().await?;

    let got = receipts_of(&receipts, n).await?;
    let v = verify(&got, n);
    check(&v, "sigterm")?;
    eprintln!("sigterm: receipts by worker {:?}", by_worker(&got));
    ensure!(v.duplicates == 0, "{} duplicates after a graceful stop", v.duplicates);
    let body = http_get(&metrics.to_string(), "/metrics").await?;
    let expired = metric(&body, "shardline_workers_expired_total")?;
    let failovers = metric(&body, "shardline_failovers_total")?;
    ensure!(
        expired == 0.0 && failovers == 0.0,
        "leases moved by timeout: {expired} expired, {failovers} failovers"
    );
    Ok(())
}
