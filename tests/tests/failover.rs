//! Standby coordinators on the real PostgreSQL (127.0.0.1:5432, a schema
//! of its own per test) with real workers on real Kafka: a killed leader is
//! replaced by a standby with no lease moved and nothing lost; a leader cut
//! off from the database steps down and writes nothing after its deadline;
//! the CLI works against any coordinator's URL; a sled coordinator's
//! checkpoints move to a PostgreSQL one by `export` / `import`.
//!
//! One test at a time (`SERIAL`): each runs several coordinators and
//! workers on a machine with few cores.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use shardline_proto::v1;
use shardline_testkit::config::{self, Store};
use shardline_testkit::postgres::Schema;
use shardline_testkit::proxy::{Mode, Proxy};
use shardline_tests::kafka::verify;
use shardline_tests::{
    Coordinator, CoordinatorConfig, WorkerConfig, create_topic, eventually, free_port, http_get, scrape,
    start_worker_config, unique,
};
use support::{Feed, check, cli, receipts_of};

mod support;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Records per second while coordinators fail.
const RATE: u64 = 500;
const KEYS: u64 = 200;

/// Milliseconds since the epoch, as the database's clock on this machine counts.
fn wall_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn loopback() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// One coordinator of the cluster: its process and its HTTP endpoint.
struct Node {
    coordinator: Coordinator,
    metrics: SocketAddr,
}

impl Node {
    /// Starts a coordinator on `store` with `base`'s streams and timings.
    fn start(base: &CoordinatorConfig, store: &str, dir: &std::path::Path) -> Result<Self> {
        let metrics = loopback()?;
        let config = CoordinatorConfig {
            store: Store::Postgres(store.to_owned()),
            metrics_listen: Some(metrics),
            ..base.clone()
        };
        let coordinator = Coordinator::start_config(config, &dir.join(unique("unused-sled")))?;
        Ok(Self { coordinator, metrics })
    }

    /// `/readyz` answers 200: this one leads.
    async fn leads(&self) -> bool {
        http_get(&self.metrics.to_string(), "/readyz").await.is_ok()
    }

    fn url(&self) -> &str {
        &self.coordinator.url
    }
}

/// The index of the one coordinator that leads, once exactly one does.
async fn leader(nodes: &[Option<Node>], within: Duration) -> Result<usize> {
    eventually(within, "exactly one coordinator leads", || async {
        let mut leading = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            if let Some(node) = node
                && node.leads().await
            {
                leading.push(i);
            }
        }
        Ok((leading.len() == 1).then(|| leading[0]))
    })
    .await
}

/// (lease, owner, epoch) of every lease, from whichever coordinator answers.
async fn table(node: &Node) -> Result<BTreeMap<String, (String, u64)>> {
    Ok(node
        .coordinator
        .leases()
        .await?
        .into_iter()
        .map(|l| {
            let id = l.lease.as_ref().map(|l| format!("{}/{}", l.name, l.index)).unwrap_or_default();
            (id, (l.owner, l.epoch))
        })
        .collect())
}

/// A worker hosting `forward` to `receipts`, given every coordinator's URL.
fn worker(urls: &str, id: &str, receipts: &str, metrics: SocketAddr) -> Result<shardline_tests::Proc> {
    let config =
        WorkerConfig { metrics_listen: Some(metrics), ..config::hosting("forward", &[("topic", receipts)]) };
    start_worker_config(urls, id, config)
}

/// `kill -9` of the leader of three under load, at the default timings: a
/// standby leads within a few seconds (printed), no lease moves (owners
/// and epochs as before), no worker fences itself, nothing is lost; the
/// CLI works against a standby's URL and a list starting with a dead one.
#[tokio::test]
async fn kill_9_of_the_leader_under_load_moves_no_lease_and_loses_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let schema = Schema::create("failover").await?;
    let (topic, receipts) = (unique("failover"), unique("receipts"));
    create_topic(&topic, 6).await?;
    create_topic(&receipts, 1).await?;
    let base = CoordinatorConfig {
        discovery_interval: Duration::from_millis(500),
        streams: vec![support::from_start(&topic, "forward")],
        ..CoordinatorConfig::default()
    };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(Some(Node::start(&base, &schema.url(), dir.path())?));
    }
    let urls: Vec<String> = nodes.iter().flatten().map(|n| n.url().to_owned()).collect();
    let list = urls.join(",");
    let first = leader(&nodes, Duration::from_secs(15)).await?;

    let worker_metrics = [loopback()?, loopback()?];
    let _a = worker(&list, "a", &receipts, worker_metrics[0])?;
    let _b = worker(&list, "b", &receipts, worker_metrics[1])?;
    let feed = Feed::start(&topic, RATE, KEYS);
    let leading = nodes[first].as_ref().context("the leader")?;
    let before = eventually(Duration::from_secs(30), "3 and 3, owned", || async {
        let t = table(leading).await?;
        let mut per = BTreeMap::<&str, usize>::new();
        for (owner, _) in t.values() {
            *per.entry(owner.as_str()).or_default() += 1;
        }
        Ok((t.len() == 6 && per.get("a") == Some(&3) && per.get("b") == Some(&3)).then_some(t))
    })
    .await?;
    // Let checkpoints move under load first.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The CLI against a standby, and against a list whose first URL is dead.
    let standby = (first + 1) % 3;
    let (code, out) = cli(&urls[standby], &["leases"]).await?;
    ensure!(code == 0 && out.contains(&topic), "CLI against a standby: exit {code}: {out}");
    let (code, out) =
        cli(&format!("http://127.0.0.1:{},{}", free_port()?, urls[standby]), &["health"]).await?;
    ensure!(code == 0, "CLI with a dead URL first: exit {code}: {out}");

    let killed_at = Instant::now();
    nodes[first].as_mut().context("the leader")?.coordinator.proc.kill9()?;
    nodes[first] = None;
    let second = leader(&nodes, Duration::from_secs(15)).await?;
    let takeover = killed_at.elapsed();
    eprintln!("kill -9 of the leader: a standby leads after {takeover:?}");
    let new_leader = nodes[second].as_ref().context("the new leader")?;
    // Both workers re-register with the new leader ...
    eventually(Duration::from_secs(15), "both workers registered with the new leader", || async {
        let w = new_leader.coordinator.workers().await?;
        Ok((w.len() == 2 && w.iter().all(|w| !w.restored)).then_some(()))
    })
    .await?;
    // ... and past a session timeout nothing has moved: the claim is about
    // time passing, so this waits for it.
    tokio::time::sleep(base.session_timeout + Duration::from_secs(1)).await;
    let after = table(new_leader).await?;
    ensure!(before == after, "leases moved in the takeover:\nbefore {before:?}\nafter  {after:?}");
    for m in worker_metrics {
        let fenced = scrape(&m.to_string(), "shardline_self_fenced_total").await.unwrap_or(0.0);
        ensure!(fenced == 0.0, "worker at {m} fenced itself {fenced} times");
    }

    let produced = feed.stop().await?;
    let receipts = receipts_of(&receipts, produced).await?;
    let verdict = verify(&receipts, produced);
    check(&verdict, "leader killed")?;
    ensure!(takeover < base.session_timeout, "takeover took {takeover:?}");
    Ok(())
}

/// A leader cut off from PostgreSQL (a proxy the test owns, frozen) steps
/// down before its deadline; a standby leads; no lease row is written with
/// the old term after the old deadline, and the records keep flowing.
///
/// Multi-threaded: the proxy runs on the test's runtime while the test
/// blocks starting a coordinator through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_database_steps_down_and_writes_nothing_after_its_deadline() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let schema = Schema::create("cutoff").await?;
    let (topic, receipts) = (unique("cutoff"), unique("receipts"));
    create_topic(&topic, 4).await?;
    create_topic(&receipts, 1).await?;
    // Fence after 4 s, so a 2 s leadership: A steps down 1.5 s after its
    // last renewal was sent, half a second before its deadline.
    let base = CoordinatorConfig {
        heartbeat_interval: Duration::from_millis(500),
        session_timeout: Duration::from_secs(5),
        leadership_timeout: Duration::from_secs(2),
        discovery_interval: Duration::from_millis(500),
        streams: vec![support::from_start(&topic, "forward")],
        ..CoordinatorConfig::default()
    };
    let proxy = Proxy::start("http://127.0.0.1:5432").await?;
    let via = proxy.url().trim_start_matches("http://").to_owned();
    let a = Node::start(&base, &schema.url_via(&via)?, dir.path())?;
    eventually(Duration::from_secs(15), "A leads", || async { Ok(a.leads().await.then_some(())) }).await?;
    let b = Node::start(&base, &schema.url(), dir.path())?;
    let list = format!("{},{}", a.url(), b.url());
    let worker_metrics = loopback()?;
    let _w = worker(&list, "w", &receipts, worker_metrics)?;
    let feed = Feed::start(&topic, RATE, KEYS);
    eventually(Duration::from_secs(20), "A's workers checkpoint", || async {
        let t = a.coordinator.leases().await?;
        Ok((t.len() == 4 && t.iter().all(|l| l.checkpoint.is_some_and(|c| c > 0))).then_some(()))
    })
    .await?;
    let Some((term_a, _, _)) = schema.leader().await? else { bail!("no leader row") };

    proxy.set_mode(Mode::Frozen);
    let frozen_at = Instant::now();
    // No renewal of A passes any more: its deadline is what it last set.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let Some((term, _, deadline_a)) = schema.leader().await? else { bail!("no leader row") };
    ensure!(term == term_a, "the term changed before A was cut off");
    // Watched closely: the moment A is seen standing down is at most a poll
    // later than the moment it did.
    let mut stepped_down_ms = None;
    for _ in 0..200 {
        if !a.leads().await {
            stepped_down_ms = Some(wall_ms());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stepped_down_ms = stepped_down_ms.context("A still leads 4 s after it was cut off")?;
    let stepped_down = frozen_at.elapsed();
    eventually(Duration::from_secs(10), "B leads", || async { Ok(b.leads().await.then_some(())) }).await?;
    eprintln!(
        "cut off: A stepped down after {stepped_down:?} ({:.0} ms before its deadline), B leads after {:?}",
        deadline_a - stepped_down_ms,
        frozen_at.elapsed()
    );
    ensure!(
        stepped_down_ms < deadline_a,
        "A stopped answering only {:.0} ms after its deadline",
        stepped_down_ms - deadline_a
    );
    // The worker carries on with B.
    eventually(Duration::from_secs(15), "the worker registered with B", || async {
        let w = b.coordinator.workers().await?;
        Ok((w.len() == 1 && !w[0].restored).then_some(()))
    })
    .await?;
    // Heal the cut: whatever A had in flight reaches the database now.
    proxy.set_mode(Mode::Pass);
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(!a.leads().await, "A leads again while B holds the term");

    let produced = feed.stop().await?;
    let receipts = receipts_of(&receipts, produced).await?;
    check(&verify(&receipts, produced), "leader cut off")?;

    let client = schema.client().await?;
    let late = client
        .query_one(
            "SELECT count(*) FROM shardline_leases WHERE term = $1 AND (extract(epoch FROM written_at) * 1000)::float8 > $2",
            &[&term_a, &deadline_a],
        )
        .await?
        .get::<_, i64>(0);
    ensure!(late == 0, "{late} lease rows were written with A's term after its deadline");
    let by_b = client
        .query_one("SELECT count(*) FROM shardline_leases WHERE term > $1", &[&term_a])
        .await?
        .get::<_, i64>(0);
    ensure!(by_b > 0, "B wrote no checkpoint");
    Ok(())
}

/// The documented migration: `shardline export` from a sled coordinator,
/// `shardline import` into a PostgreSQL one; the checkpoints arrive.
#[tokio::test]
async fn checkpoints_move_from_sled_to_postgres_by_export_and_import() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let schema = Schema::create("migrate").await?;
    let topic = unique("migrate");
    create_topic(&topic, 3).await?;
    let stream = support::from_start(&topic, "noop");
    let sled = CoordinatorConfig { streams: vec![stream.clone()], ..support::timings() };
    let old = Coordinator::start_config(sled, &dir.path().join("sled"))?;
    eventually(Duration::from_secs(15), "3 leases discovered", || async {
        Ok((old.leases().await?.len() == 3).then_some(()))
    })
    .await?;
    let producer = shardline_tests::kafka::producer()?;
    shardline_tests::kafka::produce(&producer, &topic, 0, 300, 30).await?;
    let wanted = [3_i64, 5, 7];
    for (partition, offset) in wanted.iter().enumerate() {
        let lease = format!("{topic}/{partition}");
        let (code, out) =
            cli(&old.url, &["checkpoint", "set", &lease, "--offset", &offset.to_string(), "--yes"]).await?;
        ensure!(code == 0, "checkpoint set: {out}");
    }
    let export = dir.path().join("export.json");
    let (code, out) = cli(&old.url, &["export", "--output", &export.display().to_string()]).await?;
    ensure!(code == 0, "export: {out}");
    drop(old);

    let node = Node::start(
        &CoordinatorConfig { streams: vec![stream], ..support::timings() },
        &schema.url(),
        dir.path(),
    )?;
    eventually(Duration::from_secs(15), "3 leases discovered on PostgreSQL", || async {
        Ok((node.coordinator.leases().await?.len() == 3).then_some(()))
    })
    .await?;
    let (code, out) = cli(node.url(), &["import", &export.display().to_string(), "--yes"]).await?;
    ensure!(code == 0, "import: {out}");
    let leases = node.coordinator.leases_of(&topic).await?;
    let checkpoints: Vec<Option<i64>> = leases.iter().map(|l: &v1::LeaseInfo| l.checkpoint).collect();
    ensure!(checkpoints == wanted.map(Some), "imported checkpoints: {checkpoints:?}, exported {wanted:?}");
    Ok(())
}

/// SIGTERM of the leader hands over at once: it drains, resigns, and a
/// standby leads before the deadline the leader had last set (which it
/// would have to wait for after a crash).
#[tokio::test]
async fn a_gracefully_stopped_leader_hands_over_before_its_deadline() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let schema = Schema::create("handover").await?;
    let stream = shardline_tests::StreamConfig {
        partitions: Some(2),
        ..shardline_tests::StreamConfig::new("fixed", "noop")
    };
    let base = CoordinatorConfig { streams: vec![stream], ..CoordinatorConfig::default() };
    let mut a = Node::start(&base, &schema.url(), dir.path())?;
    eventually(Duration::from_secs(15), "A leads", || async { Ok(a.leads().await.then_some(())) }).await?;
    let b = Node::start(&base, &schema.url(), dir.path())?;
    let Some((term_a, _, deadline_a)) = schema.leader().await? else { bail!("no leader row") };
    a.coordinator.proc.signal(libc::SIGTERM)?;
    eventually(Duration::from_secs(10), "B leads", || async { Ok(b.leads().await.then_some(())) }).await?;
    let led_ms = wall_ms();
    let Some((term_b, _, _)) = schema.leader().await? else { bail!("no leader row") };
    eprintln!("graceful stop: B leads {:.0} ms before A's deadline", deadline_a - led_ms);
    ensure!(term_b == term_a + 1, "terms {term_a} then {term_b}");
    ensure!(
        led_ms < deadline_a,
        "B led only {:.0} ms after A's deadline: A did not resign",
        led_ms - deadline_a
    );
    let status = a.coordinator.proc.wait_exit(Duration::from_secs(10))?;
    ensure!(status.success(), "A exited with {status}");
    Ok(())
}
