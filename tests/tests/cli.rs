//! Black-box tests of the operator CLI `shardline`: the real CLI binary
//! against real coordinators and workers on the real brokers (tansu).
//!
//! Every test checks figures, not only exit statuses: lag against the
//! watermarks read independently from Kafka, an owner reprocessing from the
//! offset an operator set (counted in the `forward` receipts), the same
//! checkpoints online and offline, an export reproduced exactly by an
//! import, bad input leaving every checkpoint and epoch as it was, and
//! handler time metered in 100 ms units.
//!
//! The tests of this file run one at a time (`SERIAL`), like those of
//! `worker.rs`: each starts a coordinator and workers on a small machine.
//! `--json` output is read with the small JSON reader at the end of the
//! file (this crate does not depend on serde_json).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use shardline_testkit::config;
use shardline_tests::kafka::{Consumed, produce, producer, read_topic};
use shardline_tests::{
    Coordinator, CoordinatorConfig, WorkerConfig, bin, create_topic, eventually, kafka_brokers,
    start_worker_config, unique,
};

/// One test at a time in this file (see the module docs).
mod support;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Distinct keys of produced records (spread over every partition).
const KEYS: u64 = 50;

/// The export file's format marker.
const EXPORT_FORMAT: &str = "shardline.checkpoints/1";

// ------------------------------------------------------------------ setup

/// A coordinator config with one stream `topic` handled by `handler` from
/// the oldest record, in batches of `batch_size` (`None`: the default).
fn config(topic: &str, handler: &str, batch_size: Option<u32>) -> CoordinatorConfig {
    let mut stream = support::from_start(topic, handler);
    stream.settings.batch_size = batch_size.unwrap_or(stream.settings.batch_size);
    CoordinatorConfig { streams: vec![stream], ..support::timings() }
}

/// A worker config hosting `forward` writing receipts to `receipts`.
fn forward(receipts: &str) -> WorkerConfig {
    config::hosting("forward", &[("topic", receipts)])
}

/// A fresh stream of `partitions` and its one-partition receipts topic.
async fn topics(name: &str, partitions: i32) -> Result<(String, String)> {
    let (topic, receipts) = (unique(name), unique("receipts"));
    create_topic(&topic, partitions).await?;
    create_topic(&receipts, 1).await?;
    Ok((topic, receipts))
}

/// `(earliest, latest)` of each partition of `topic`, straight from Kafka.
async fn watermarks(topic: &str) -> Result<Vec<(i64, i64)>> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", kafka_brokers()).create().context("consumer")?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
        ensure!(partitions > 0, "topic {topic} has no partitions");
        (0..partitions as i32)
            .map(|p| Ok(consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?))
            .collect()
    })
    .await?
}

/// `(checkpoint, epoch)` of each lease of `stream` (keyed by partition) as
/// the admin API lists them.
async fn admin_checkpoints(c: &Coordinator, stream: &str) -> Result<BTreeMap<u32, (Option<i64>, u64)>> {
    Ok(c.leases()
        .await?
        .into_iter()
        .filter_map(|l| {
            let id = l.lease.as_ref()?;
            (id.name == stream).then_some((id.index, (l.checkpoint, l.epoch)))
        })
        .collect())
}

/// Waits until every partition's checkpoint of `stream` is at its high
/// watermark (as it is now): every record was processed and checkpointed.
/// Returns the high watermarks.
async fn caught_up(c: &Coordinator, stream: &str, timeout: Duration) -> Result<Vec<i64>> {
    let highs: Vec<i64> = watermarks(stream).await?.into_iter().map(|(_, h)| h).collect();
    let started = Instant::now();
    eventually(timeout, &format!("the checkpoints of {stream} to reach {highs:?}"), || async {
        let now = admin_checkpoints(c, stream).await?;
        let checkpoints: Vec<Option<i64>> = now.values().map(|(c, _)| *c).collect();
        let want: Vec<Option<i64>> = highs.iter().map(|h| Some(*h)).collect();
        ensure!(checkpoints == want, "checkpoints now {checkpoints:?}");
        Ok(Some(()))
    })
    .await?;
    eprintln!("{stream}: checkpoints reached {highs:?} (waited {:?})", started.elapsed());
    Ok(highs)
}

/// Every record of `topic` up to its current high watermarks.
async fn read(topic: &str) -> Result<Vec<Consumed>> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_topic(&topic, Duration::from_secs(60))).await?
}

/// Every file under `dir` with its contents (empty if `dir` is absent).
fn files(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut out = BTreeMap::new();
    if !dir.exists() {
        return Ok(out);
    }
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                out.insert(path.clone(), b"<dir>".to_vec());
                todo.push(path);
            } else {
                out.insert(path.clone(), std::fs::read(&path)?);
            }
        }
    }
    Ok(out)
}

// ------------------------------------------------------------- the CLI

/// One run of the CLI.
struct Out {
    cmd: String,
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Fails unless the CLI exited with `want`.
    fn status(&self, want: i32) -> Result<&Self> {
        ensure!(
            self.code == want,
            "`{}` exited {} (want {want})\n--- stdout\n{}--- stderr\n{}",
            self.cmd,
            self.code,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }

    fn ok(&self) -> Result<&Self> {
        self.status(0)
    }

    /// Fails unless stdout or stderr contains `needle` (case-insensitive).
    fn says(&self, needle: &str) -> Result<&Self> {
        let n = needle.to_lowercase();
        ensure!(
            self.stdout.to_lowercase().contains(&n) || self.stderr.to_lowercase().contains(&n),
            "`{}` did not say {needle:?}\n--- stdout\n{}--- stderr\n{}",
            self.cmd,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }

    /// The one JSON document on stdout of a successful run.
    fn json(&self) -> Result<Json> {
        self.ok()?;
        Json::parse(&self.stdout)
            .with_context(|| format!("`{}` printed no JSON document:\n{}", self.cmd, self.stdout))
    }
}

/// Runs `shardline ARGS` (nothing from the environment but the Kafka
/// brokers), at most 60 s.
async fn shardline(args: &[&str]) -> Result<Out> {
    let cmd = format!("shardline {}", args.join(" "));
    let child = tokio::process::Command::new(bin("shardline"))
        .args(args)
        .env_remove("SHARDLINE_COORDINATOR")
        .env_remove("SHARDLINE_TOKEN")
        .env("SHARDLINE_KAFKA_BROKERS", kafka_brokers())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .with_context(|| format!("`{cmd}` did not finish within 60 s"))?
        .with_context(|| format!("run `{cmd}` (built? cargo build --workspace --bins)"))?;
    let out = Out {
        cmd,
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("$ {} -> {}", out.cmd, out.code);
    Ok(out)
}

/// `shardline --coordinator URL ARGS`.
async fn online(c: &Coordinator, args: &[&str]) -> Result<Out> {
    let mut all = vec!["--coordinator", c.url.as_str()];
    all.extend_from_slice(args);
    shardline(&all).await
}

/// `shardline --data-dir DIR --kafka-brokers B ARGS`.
async fn offline(dir: &Path, args: &[&str]) -> Result<Out> {
    let (dir, brokers) = (dir.display().to_string(), kafka_brokers());
    let mut all = vec!["--data-dir", dir.as_str(), "--kafka-brokers", brokers.as_str()];
    all.extend_from_slice(args);
    shardline(&all).await
}

/// One shard of `checkpoints --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shard {
    checkpoint: Option<i64>,
    epoch: u64,
    earliest: Option<i64>,
    latest: Option<i64>,
    lag: Option<i64>,
}

/// Each stream's `(shards, total lag)` in `checkpoints --json`.
type Totals = BTreeMap<String, (i64, Option<i64>)>;

/// `checkpoints --json`: the shards by lease, and each stream's total lag.
fn shards(doc: &Json) -> Result<(BTreeMap<String, Shard>, Totals)> {
    let mut shards = BTreeMap::new();
    for s in doc.get("shards").items()? {
        let shard = Shard {
            checkpoint: s.get("checkpoint").opt_i64()?,
            epoch: s.get("epoch").u64()?,
            earliest: s.get("earliest").opt_i64()?,
            latest: s.get("latest").opt_i64()?,
            lag: s.get("lag").opt_i64()?,
        };
        shards.insert(s.get("lease").str()?.to_owned(), shard);
    }
    let mut streams = BTreeMap::new();
    for s in doc.get("streams").items()? {
        streams.insert(s.get("stream").str()?.to_owned(), (s.get("shards").i64()?, s.get("lag").opt_i64()?));
    }
    Ok((shards, streams))
}

/// `(checkpoint, epoch)` by lease of a `--json checkpoint get` / `leases`.
fn leases(doc: &Json) -> Result<BTreeMap<String, (Option<i64>, u64)>> {
    doc.items()?
        .iter()
        .map(|l| {
            Ok((l.get("lease").str()?.to_owned(), (l.get("checkpoint").opt_i64()?, l.get("epoch").u64()?)))
        })
        .collect()
}

/// `(checkpoint, epoch)` by lease of an export document; checks the marker.
fn exported(doc: &Json) -> Result<BTreeMap<String, (i64, u64)>> {
    ensure!(doc.get("format").str()? == EXPORT_FORMAT, "export format {:?}", doc.get("format"));
    doc.get("checkpoints")
        .items()?
        .iter()
        .map(|e| Ok((e.get("lease").str()?.to_owned(), (e.get("checkpoint").i64()?, e.get("epoch").u64()?))))
        .collect()
}

/// `shardline --json checkpoint get LEASE`: `(checkpoint, epoch)`.
async fn get(c: &Coordinator, lease: &str) -> Result<(Option<i64>, u64)> {
    let doc = online(c, &["--json", "checkpoint", "get", lease]).await?.json()?;
    let all = leases(&doc)?;
    ensure!(all.len() == 1, "checkpoint get {lease} listed {all:?}");
    all.get(lease).copied().with_context(|| format!("checkpoint get {lease} listed {all:?}"))
}

// ------------------------------------------------------------------ tests

/// 400 records on 4 partitions are processed and checkpointed; the worker
/// is killed and 100 more produced. `checkpoints` must show each shard's
/// checkpoint, the broker's watermarks (read here independently) and
/// lag = latest - checkpoint, summing to 100 for the stream, in JSON and in
/// the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_show_true_lag_against_the_brokers_watermarks() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (topic, receipts) = topics("cli-lag", 4).await?;
    let p = producer()?;
    produce(&p, &topic, 0, 400, KEYS).await?;
    let dir = tempfile::tempdir()?;
    let c = Coordinator::start_config(config(&topic, "forward", None), &dir.path().join("data"))?;
    let mut w = start_worker_config(&c.url, "a", forward(&receipts))?;
    let old_highs = caught_up(&c, &topic, Duration::from_secs(60)).await?;
    ensure!(old_highs.iter().sum::<i64>() == 400, "high watermarks {old_highs:?} do not add up to 400");
    w.kill9()?;
    let before = admin_checkpoints(&c, &topic).await?;
    produce(&p, &topic, 400, 500, KEYS).await?;
    let marks = watermarks(&topic).await?;
    eprintln!("lag: watermarks now {marks:?}, checkpoints {before:?}");

    let doc = online(&c, &["--json", "checkpoints", "--stream", &topic]).await?.json()?;
    let (shards, streams) = shards(&doc)?;
    ensure!(shards.len() == 4, "checkpoints --stream listed {} shards: {shards:?}", shards.len());
    let mut total = 0;
    for (p, (earliest, latest)) in marks.iter().enumerate() {
        let lease = format!("{topic}/{p}");
        let s = shards.get(&lease).with_context(|| format!("{lease} missing from {shards:?}"))?;
        let (checkpoint, epoch) =
            *before.get(&(p as u32)).with_context(|| format!("{lease} not listed by the admin API"))?;
        ensure!(
            s.checkpoint == checkpoint,
            "{lease}: checkpoint {:?}, the coordinator has {checkpoint:?}",
            s.checkpoint
        );
        ensure!(s.epoch == epoch, "{lease}: epoch {}, the coordinator has {epoch}", s.epoch);
        ensure!(
            s.latest == Some(*latest),
            "{lease}: latest {:?}, the broker's high watermark is {latest}",
            s.latest
        );
        ensure!(
            s.earliest == Some(*earliest),
            "{lease}: earliest {:?}, the broker says {earliest}",
            s.earliest
        );
        let lag = latest - checkpoint.unwrap_or(*earliest);
        ensure!(s.lag == Some(lag), "{lease}: lag {:?}, want {latest} - {checkpoint:?} = {lag}", s.lag);
        total += lag;
    }
    ensure!(total == 100, "the shards' lag adds up to {total}, want the 100 produced after the kill");
    ensure!(
        streams.get(&topic) == Some(&(4, Some(total))),
        "stream totals {streams:?}, want {topic}: 4 shards, lag {total}"
    );

    let table = online(&c, &["checkpoints", "--stream", &topic]).await?;
    table.ok()?.says(&topic)?;
    let mut lines = table.stdout.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    ensure!(
        header.starts_with(&["SHARD", "CHECKPOINT", "EARLIEST", "LATEST", "LAG"]),
        "table header {header:?}\n{}",
        table.stdout
    );
    for (p, (earliest, latest)) in marks.iter().enumerate() {
        let lease = format!("{topic}/{p}");
        let row = table
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(lease.as_str()))
            .with_context(|| format!("no row for {lease} in\n{}", table.stdout))?;
        let cells: Vec<&str> = row.split_whitespace().collect();
        let checkpoint = before.get(&(p as u32)).and_then(|b| b.0).unwrap_or(-1);
        let want = [
            lease.clone(),
            checkpoint.to_string(),
            earliest.to_string(),
            latest.to_string(),
            (latest - checkpoint).to_string(),
        ];
        ensure!(cells.len() >= 5 && cells[..5] == want, "row {row:?}, want it to start with {want:?}");
    }
    table.says(&format!("{topic}: 4 shards, lag {total}"))?;
    eprintln!("lag: {total} over 4 shards, as the broker's watermarks say");
    Ok(())
}

/// A worker processed all 200 records of one partition. `checkpoint set
/// S/0 --offset 50` without `--yes`, and with `--dry-run`, changes nothing;
/// with `--yes` the epoch goes up by one, the owner processes 50..199 a
/// second time (0..49 stay processed once) and the checkpoint comes back
/// to 200. The owner then carries on under the new epoch: it keeps
/// heartbeating, processes new records and meters every record it handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_set_moves_the_owner_to_the_new_offset() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (topic, receipts) = topics("cli-set", 1).await?;
    produce(&producer()?, &topic, 0, 200, KEYS).await?;
    let dir = tempfile::tempdir()?;
    let c = Coordinator::start_config(config(&topic, "forward", Some(20)), &dir.path().join("data"))?;
    let _w = start_worker_config(&c.url, "a", forward(&receipts))?;
    let lease = format!("{topic}/0");
    let (_, epoch) = eventually(Duration::from_secs(60), &format!("{lease} checkpointed at 200"), || async {
        let (checkpoint, epoch) = get(&c, &lease).await?;
        Ok((checkpoint == Some(200)).then_some((checkpoint, epoch)))
    })
    .await?;

    // Without --yes: the plan, and nothing changed.
    online(&c, &["checkpoint", "set", &lease, "--offset", "50"])
        .await?
        .ok()?
        .says("nothing changed")?
        .says("--yes")?;
    ensure!(
        get(&c, &lease).await? == (Some(200), epoch),
        "set without --yes changed {lease}: {:?}",
        get(&c, &lease).await?
    );
    // --dry-run: the same, in the table and in JSON.
    online(&c, &["checkpoint", "set", &lease, "--offset", "50", "--dry-run"])
        .await?
        .ok()?
        .says("dry run: nothing changed")?;
    let plan =
        online(&c, &["--json", "checkpoint", "set", &lease, "--offset", "50", "--dry-run"]).await?.json()?;
    ensure!(!plan.get("applied").bool()?, "dry run applied: {plan:?}");
    let change = plan.get("changes").items()?.first().context("dry run plan has no change")?.clone();
    ensure!(
        change.get("lease").str()? == lease
            && change.get("from").opt_i64()? == Some(200)
            && change.get("to").i64()? == 50
            && change.get("epoch").u64()? == epoch
            && change.get("new_epoch").u64()? == epoch + 1,
        "dry run plan {plan:?}, want {lease} 200 -> 50, epoch {epoch} -> {}",
        epoch + 1
    );
    ensure!(
        get(&c, &lease).await? == (Some(200), epoch),
        "--dry-run changed {lease}: {:?}",
        get(&c, &lease).await?
    );
    // Receipts so far: each offset once.
    let first = read(&receipts).await?;
    ensure!(first.len() == 200, "{} receipts before the set, want 200", first.len());

    // --yes: applied; the owner restarts from 50 under epoch + 1.
    let plan =
        online(&c, &["--json", "checkpoint", "set", &lease, "--offset", "50", "--yes"]).await?.json()?;
    ensure!(plan.get("applied").bool()?, "set --yes not applied: {plan:?}");
    let change = plan.get("changes").items()?.first().context("plan has no change")?.clone();
    ensure!(
        change.get("from").opt_i64()? == Some(200)
            && change.get("to").i64()? == 50
            && change.get("epoch").u64()? == epoch,
        "plan {plan:?}, want 200 -> 50 at epoch {epoch}"
    );
    let after = get(&c, &lease).await?;
    ensure!(after.1 == epoch + 1, "after set --yes {lease} is at {after:?}, want epoch {}", epoch + 1);
    eventually(Duration::from_secs(60), &format!("{lease} back at 200"), || async {
        let now = get(&c, &lease).await?;
        ensure!(now == (Some(200), epoch + 1), "{lease} now {now:?}");
        Ok(Some(()))
    })
    .await?;

    let mut seen = BTreeMap::<i64, usize>::new();
    for r in read(&receipts).await? {
        let offset: i64 =
            r.header("shardline.offset").context("receipt without shardline.offset")?.parse()?;
        *seen.entry(offset).or_default() += 1;
    }
    let wrong: Vec<(i64, usize, usize)> = (0..200)
        .map(|o| (o, seen.get(&o).copied().unwrap_or(0), if o < 50 { 1 } else { 2 }))
        .filter(|(_, n, want)| n != want)
        .collect();
    ensure!(
        wrong.is_empty() && seen.keys().all(|o| (0..200).contains(o)),
        "receipts per offset (offset, seen, want): {:?}...",
        &wrong[..wrong.len().min(20)]
    );
    eprintln!("set: 50..199 processed again, 0..49 once; epoch {epoch} -> {}", epoch + 1);

    // The owner carries on under the new epoch: still heartbeating after a
    // session timeout (3 s), processing new records, metering all of them
    // (200 + 150 again + 50 new). The claim is about time passing (a
    // session timeout), so this waits for it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let workers = online(&c, &["--json", "workers"]).await?.json()?;
    let a =
        workers.get("workers").items()?.iter().find(|w| w.get("worker_id").str().ok() == Some("a")).cloned();
    let a = a.with_context(|| format!("worker a is gone after the set: {workers:?}"))?;
    ensure!(
        a.get("leases").u64()? == 1
            && a.get("state").str()? == "healthy"
            && a.get("last_heartbeat_ms_ago").u64()? < 3000,
        "worker a after the set: {a:?}"
    );
    produce(&producer()?, &topic, 200, 250, KEYS).await?;
    eventually(Duration::from_secs(30), &format!("{lease} at 250"), || async {
        let doc = online(&c, &["--json", "leases", "--stream", &topic]).await?.json()?;
        let now = leases(&doc)?;
        ensure!(now.get(&lease) == Some(&(Some(250), epoch + 1)), "leases now {doc:?}");
        Ok(Some(()))
    })
    .await?;
    eventually(Duration::from_secs(30), "usage of 400 records", || async {
        let doc = online(&c, &["--json", "usage"]).await?.json()?;
        let row = doc
            .get("usage")
            .items()?
            .iter()
            .find(|u| u.get("mapping").str().ok() == Some(topic.as_str()))
            .cloned();
        let records = row.as_ref().map(|r| r.get("records").u64()).transpose()?;
        ensure!(records == Some(400), "usage now {doc:?}");
        Ok(Some(()))
    })
    .await?;
    Ok(())
}

/// With the coordinator running, `--data-dir` refuses its locked store
/// (exit 1, "locked"); stopped, the store reads offline with the same
/// checkpoints, a checkpoint set offline is there (epoch + 1) when the
/// coordinator starts again; a directory that is not a store is refused and
/// left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_mode_reads_a_stopped_store_and_refuses_a_locked_one() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (topic, receipts) = topics("cli-offline", 2).await?;
    produce(&producer()?, &topic, 0, 200, KEYS).await?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let cfg = config(&topic, "forward", None);
    let mut c = Coordinator::start_config(cfg.clone(), &data)?;
    let mut w = start_worker_config(&c.url, "a", forward(&receipts))?;
    let highs = caught_up(&c, &topic, Duration::from_secs(60)).await?;
    w.kill9()?;
    let (running, _) = shards(&online(&c, &["--json", "checkpoints", "--stream", &topic]).await?.json()?)?;
    ensure!(running.len() == 2, "online checkpoints {running:?}");

    // Locked while the coordinator runs: exit 1, nothing written.
    offline(&data, &["leases"]).await?.status(1)?.says("locked")?;
    let lease0 = format!("{topic}/0");
    offline(&data, &["checkpoint", "set", &lease0, "--offset", "0", "--yes"])
        .await?
        .status(1)?
        .says("locked")?;
    let (still, _) = shards(&online(&c, &["--json", "checkpoints", "--stream", &topic]).await?.json()?)?;
    ensure!(still == running, "a refused offline set changed the running store: {running:?} -> {still:?}");

    c.proc.signal(libc::SIGTERM)?;
    c.proc.wait_exit(Duration::from_secs(30))?;

    // Stopped: the same checkpoints, epochs and offsets offline.
    let (stopped, streams) =
        shards(&offline(&data, &["--json", "checkpoints", "--stream", &topic]).await?.json()?)?;
    ensure!(stopped == running, "offline checkpoints {stopped:?}, online they were {running:?}");
    ensure!(streams.get(&topic) == Some(&(2, Some(0))), "offline stream totals {streams:?}");
    let listed = leases(&offline(&data, &["--json", "leases", "--stream", &topic]).await?.json()?)?;
    let want: BTreeMap<String, (Option<i64>, u64)> =
        running.iter().map(|(l, s)| (l.clone(), (s.checkpoint, s.epoch))).collect();
    ensure!(listed == want, "offline leases {listed:?}, want {want:?}");
    offline(&data, &["workers"]).await?.status(2)?.says("needs a running coordinator")?;
    offline(&data, &["checkpoints", "--stream", "nope"]).await?.status(2)?.says("nope")?;

    // A set offline: dry run first, then applied.
    let to = highs[0] / 2;
    let to_s = to.to_string();
    offline(&data, &["checkpoint", "set", &lease0, "--offset", &to_s, "--dry-run"])
        .await?
        .ok()?
        .says("dry run")?;
    let unchanged = leases(&offline(&data, &["--json", "leases", "--stream", &topic]).await?.json()?)?;
    ensure!(unchanged == want, "offline --dry-run changed the store: {unchanged:?}, want {want:?}");
    offline(&data, &["checkpoint", "set", &lease0, "--offset", &to_s, "--yes"])
        .await?
        .ok()?
        .says("applied")?;
    let epoch0 = running.get(&lease0).context("no shard 0")?.epoch;
    let mut moved = want.clone();
    moved.insert(lease0.clone(), (Some(to), epoch0 + 1));
    let now = leases(&offline(&data, &["--json", "leases", "--stream", &topic]).await?.json()?)?;
    ensure!(now == moved, "after an offline set the store holds {now:?}, want {moved:?}");

    // The coordinator started again on the store sees it.
    let c = Coordinator::start_config(cfg, &data)?;
    let restarted = admin_checkpoints(&c, &topic).await?;
    let seen: BTreeMap<String, (Option<i64>, u64)> =
        restarted.iter().map(|(p, v)| (format!("{topic}/{p}"), *v)).collect();
    ensure!(seen == moved, "the restarted coordinator has {seen:?}, want {moved:?}");
    online(&c, &["--json", "checkpoints", "--stream", &topic]).await?.ok()?;
    drop(c);

    // Not a store: refused, named, and left exactly as it was.
    let missing = dir.path().join("no-such-dir");
    offline(&missing, &["leases"]).await?.status(2)?.says("no such directory")?;
    ensure!(!missing.exists(), "--data-dir created {}", missing.display());
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain)?;
    std::fs::write(plain.join("notes.txt"), "not a database\n")?;
    // A directory holding a file named `conf` (as a sled database does),
    // e.g. some other program's settings.
    let conf = dir.path().join("conf-file");
    std::fs::create_dir(&conf)?;
    std::fs::write(conf.join("conf"), "junk\n")?;
    for d in [&plain, &conf] {
        let before = files(d)?;
        let out = offline(d, &["checkpoint", "set", &lease0, "--offset", "0", "--yes"]).await?;
        ensure!(out.code != 0, "{} was taken for a store:\n{}", d.display(), out.stdout);
        let list = offline(d, &["leases"]).await?;
        ensure!(list.code != 0, "{} was listed as a store:\n{}", d.display(), list.stdout);
        let after = files(d)?;
        ensure!(
            after == before,
            "refusing {} changed it: files (bytes) before {:?}, after {:?}",
            d.display(),
            before.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>(),
            after.iter().map(|(k, v)| (k, v.len())).collect::<Vec<_>>()
        );
        out.says("not a shardline store")?;
        list.says("not a shardline store")?;
    }
    Ok(())
}

/// Coordinator A's checkpoints of a 3-partition stream are exported, and
/// imported into a fresh coordinator B (same stream, no workers): B's
/// export then holds exactly the same lease → checkpoint pairs. A dry run
/// (and a run without --yes) on a third fresh coordinator changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_into_a_fresh_coordinator_reproduces_every_checkpoint() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (topic, receipts) = topics("cli-export", 3).await?;
    produce(&producer()?, &topic, 0, 300, KEYS).await?;
    let dir = tempfile::tempdir()?;
    let cfg = config(&topic, "forward", None);
    let a = Coordinator::start_config(cfg.clone(), &dir.path().join("a"))?;
    let mut w = start_worker_config(&a.url, "a", forward(&receipts))?;
    let highs = caught_up(&a, &topic, Duration::from_secs(60)).await?;
    w.kill9()?;
    let file = dir.path().join("checkpoints.json");
    let file_s = file.display().to_string();
    online(&a, &["export", "-o", &file_s]).await?.ok()?;
    let from_a = exported(&Json::parse(&std::fs::read_to_string(&file)?)?)?;
    let want: BTreeMap<String, i64> =
        highs.iter().enumerate().map(|(p, h)| (format!("{topic}/{p}"), *h)).collect();
    let pairs: BTreeMap<String, i64> = from_a.iter().map(|(l, (c, _))| (l.clone(), *c)).collect();
    ensure!(pairs == want, "A's export holds {pairs:?}, want the high watermarks {want:?}");
    let epochs_a = admin_checkpoints(&a, &topic).await?;
    for (p, (_, epoch)) in &epochs_a {
        ensure!(
            from_a.get(&format!("{topic}/{p}")).map(|e| e.1) == Some(*epoch),
            "export epochs {from_a:?}, the coordinator has {epochs_a:?}"
        );
    }
    drop(a);

    // A fresh coordinator with the same stream and no workers.
    let fresh = |name: &'static str| {
        let (cfg, path, topic) = (cfg.clone(), dir.path().join(name), topic.clone());
        async move {
            let c = Coordinator::start_config(cfg, &path)?;
            eventually(Duration::from_secs(30), "3 leases discovered", || async {
                Ok((admin_checkpoints(&c, &topic).await?.len() == 3).then_some(()))
            })
            .await?;
            let none = exported(&online(&c, &["export"]).await?.json()?)?;
            ensure!(none.is_empty(), "a fresh coordinator exports {none:?}");
            Ok::<_, anyhow::Error>(c)
        }
    };
    let b = fresh("b").await?;
    let plan = online(&b, &["--json", "import", &file_s, "--yes"]).await?.json()?;
    ensure!(plan.get("applied").bool()?, "import --yes not applied: {plan:?}");
    ensure!(plan.get("changes").items()?.len() == 3, "import plan {plan:?}");
    let from_b = exported(&online(&b, &["--json", "export"]).await?.json()?)?;
    let pairs_b: BTreeMap<String, i64> = from_b.iter().map(|(l, (c, _))| (l.clone(), *c)).collect();
    ensure!(pairs_b == pairs, "after the import B exports {pairs_b:?}, A exported {pairs:?}");
    ensure!(from_b.values().all(|(_, e)| *e == 1), "imported epochs {from_b:?}, want 0 + 1 each");
    drop(b);

    let c = fresh("c").await?;
    online(&c, &["import", &file_s, "--dry-run"]).await?.ok()?.says("dry run: nothing changed")?;
    online(&c, &["import", &file_s]).await?.ok()?.says("nothing changed")?;
    let from_c = exported(&online(&c, &["export"]).await?.json()?)?;
    ensure!(from_c.is_empty(), "import --dry-run / without --yes wrote {from_c:?}");
    let untouched = admin_checkpoints(&c, &topic).await?;
    ensure!(untouched.values().all(|v| *v == (None, 0)), "after a dry run the leases are {untouched:?}");
    eprintln!("export/import: {pairs:?} reproduced");
    Ok(())
}

/// `--coordinator` takes a list: a dead coordinator first, then a serving
/// one, works (the CLI's own tests cover standbys and leader hints with
/// fake servers); when none serves, each URL is named with its error; a
/// malformed list is a usage error naming the bad entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_coordinators_is_tried_in_order() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let c = Coordinator::start_config(support::timings(), &dir.path().join("data"))?;
    let direct = online(&c, &["--json", "health"]).await?.ok()?.stdout.clone();
    let list = format!("http://127.0.0.1:1, {}", c.url);
    let via_list = shardline(&["--coordinator", &list, "--json", "health"]).await?.ok()?.stdout.clone();
    ensure!(via_list == direct, "health through `{list}`: {via_list}, directly: {direct}");
    shardline(&["--coordinator", &list, "export"]).await?.ok()?.says(EXPORT_FORMAT)?;
    shardline(&["--coordinator", &list, "workers"]).await?.ok()?;

    // None serving: each URL named with its error, exit 1.
    shardline(&["--coordinator", "http://127.0.0.1:1,http://127.0.0.1:2", "health"])
        .await?
        .status(1)?
        .says("cannot reach the coordinator")?
        .says("http://127.0.0.1:1 (")?
        .says("http://127.0.0.1:2 (")?
        .says("Connection refused")?;

    // A bad list: exit 2, naming the bad entry and what is allowed.
    for (list, entry) in
        [(format!("{},ftp://x", c.url), "ftp://x"), (format!("{0},{0}", c.url), c.url.as_str())]
    {
        shardline(&["--coordinator", &list, "health"])
            .await?
            .status(2)?
            .says(&format!("entry `{entry}`"))?
            .says("http:// or https://")?;
    }
    Ok(())
}

/// Every kind of bad input exits with its status and a line naming the
/// problem, and changes no checkpoint or epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_clear_line_and_changes_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (topic, receipts) = topics("cli-bad", 2).await?;
    produce(&producer()?, &topic, 0, 200, KEYS).await?;
    let dir = tempfile::tempdir()?;
    let c = Coordinator::start_config(config(&topic, "forward", None), &dir.path().join("data"))?;
    let mut w = start_worker_config(&c.url, "a", forward(&receipts))?;
    let highs = caught_up(&c, &topic, Duration::from_secs(60)).await?;
    ensure!(highs.iter().all(|h| *h >= 4), "a partition got almost no records: {highs:?}");
    w.kill9()?;
    let before = exported(&online(&c, &["export"]).await?.json()?)?;
    ensure!(before.len() == 2, "export before: {before:?}");
    let (l0, l1) = (format!("{topic}/0"), format!("{topic}/1"));

    let usage = |args: Vec<String>, needle: String| {
        let c = &c;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            online(c, &args).await?.status(2)?.says(&needle)?;
            Ok::<_, anyhow::Error>(())
        }
    };
    let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<String>>();
    usage(s(&["checkpoints", "--stream", "nope"]), "nope".into()).await?;
    usage(s(&["leases", "--stream", "nope"]), "nope".into()).await?;
    usage(s(&["checkpoint", "get", &format!("{topic}/99")]), format!("{topic}/99")).await?;
    usage(s(&["checkpoint", "set", &format!("{topic}/99"), "--offset", "0", "--yes"]), format!("{topic}/99"))
        .await?;
    usage(s(&["checkpoint", "set", "nope/0", "--offset", "0", "--yes"]), "nope".into()).await?;
    usage(s(&["checkpoint", "set", &l0, "--offset", "100000", "--yes"]), "allowed".into()).await?;
    usage(s(&["checkpoint", "set", &l0, "--offset=-5", "--yes"]), "negative".into()).await?;
    usage(s(&["checkpoint", "set", &l0, "--timestamp", "yesterday", "--yes"]), "yesterday".into()).await?;
    usage(
        s(&["checkpoint", "reset", "--stream", &topic, "--timestamp", "yesterday", "--yes"]),
        "yesterday".into(),
    )
    .await?;
    usage(s(&["checkpoint", "reset", "--stream", "nope", "--earliest", "--yes"]), "nope".into()).await?;
    usage(s(&["checkpoint", "set", &topic, "--offset", "0", "--yes"]), "STREAM/PARTITION".into()).await?;
    usage(s(&["checkpoint", "set", &format!("{topic}/x"), "--offset", "0", "--yes"]), "not a lease".into())
        .await?;
    usage(s(&["checkpoint", "get", "/3"]), "not a lease".into()).await?;
    usage(s(&["checkpoint", "set", &l0, "--offset", "1", "--earliest", "--yes"]), "cannot be used".into())
        .await?;
    usage(s(&["usage", "--since", "last tuesday"]), "last tuesday".into()).await?;

    // Import files: each refused whole.
    let import = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).map(|_| path.display().to_string())
    };
    let doc = |entries: &str| format!("{{\"format\": \"{EXPORT_FORMAT}\", \"checkpoints\": [{entries}]}}");
    let half = highs[0] / 2;
    let valid = format!("{{\"lease\": \"{l0}\", \"checkpoint\": {half}}}");
    let bad_files = [
        ("not-json", "checkpoints: all of them\n".to_owned(), "not JSON"),
        ("wrong-format", "{\"format\": \"kafka-offsets/2\", \"checkpoints\": []}".to_owned(), "format"),
        ("no-format", "{\"checkpoints\": []}".to_owned(), "format"),
        ("negative", doc(&format!("{{\"lease\": \"{l0}\", \"checkpoint\": -3}}")), "0 or more"),
        ("twice", doc(&format!("{valid}, {valid}")), "twice"),
        (
            "bad-lease",
            doc(&format!("{valid}, {{\"lease\": \"{topic}\", \"checkpoint\": 1}}")),
            "checkpoints[1]",
        ),
        ("unknown-lease", doc(&format!("{valid}, {{\"lease\": \"nope/0\", \"checkpoint\": 1}}")), "nope/0"),
        (
            "unknown-partition",
            doc(&format!("{valid}, {{\"lease\": \"{topic}/7\", \"checkpoint\": 1}}")),
            "/7",
        ),
        (
            "out-of-range",
            doc(&format!("{valid}, {{\"lease\": \"{l1}\", \"checkpoint\": 999999}}")),
            "allowed",
        ),
    ];
    for (name, text, needle) in bad_files {
        let path = import(name, text)?;
        online(&c, &["import", &path, "--yes"]).await?.status(2)?.says(needle)?;
        online(&c, &["import", &path, "--dry-run"]).await?.status(2)?;
    }
    let missing = dir.path().join("no-such-file.json").display().to_string();
    online(&c, &["import", &missing, "--yes"]).await?.status(2)?.says("no-such-file.json")?;

    // Unreachable coordinator: a runtime failure, exit 1.
    for args in [
        vec!["--coordinator", "http://127.0.0.1:1", "health"],
        vec!["--coordinator", "http://127.0.0.1:1", "checkpoints"],
        vec!["--coordinator", "http://127.0.0.1:1", "checkpoint", "set", &l0, "--offset", "0", "--yes"],
    ] {
        shardline(&args).await?.status(1)?.says("cannot reach the coordinator")?;
    }

    let after = exported(&online(&c, &["export"]).await?.json()?)?;
    ensure!(after == before, "bad input changed checkpoints/epochs: before {before:?}, after {after:?}");
    let admin = admin_checkpoints(&c, &topic).await?;
    let want: BTreeMap<u32, (Option<i64>, u64)> = before
        .iter()
        .map(|(l, (cp, e))| Ok((l.rsplit('/').next().unwrap_or_default().parse()?, (Some(*cp), *e))))
        .collect::<Result<_>>()?;
    ensure!(admin == want, "the coordinator holds {admin:?}, want {want:?}");
    // The same valid entry alone is accepted: the refusals above were about
    // the other entries.
    let alone = import("valid-alone", doc(&valid))?;
    online(&c, &["import", &alone, "--yes"]).await?.ok()?.says("applied")?;
    let moved = exported(&online(&c, &["export"]).await?.json()?)?;
    let epoch0 = before.get(&l0).context("no shard 0 before")?.1;
    ensure!(moved.get(&l0) == Some(&(half, epoch0 + 1)), "the valid import alone gave {moved:?}");
    Ok(())
}

/// The built-in `sleep` handler takes 150 ms per batch of at most 10:
/// `usage` must show every record, and at least 150 ms and 2 units of
/// 100 ms per batch (at most one unit more than the time per batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reports_handler_time_in_100ms_units() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let topic = unique("cli-usage");
    create_topic(&topic, 1).await?;
    let n = 100;
    produce(&producer()?, &topic, 0, n, KEYS).await?;
    let dir = tempfile::tempdir()?;
    let c = Coordinator::start_config(config(&topic, "sleep", Some(10)), &dir.path().join("data"))?;
    let _w = start_worker_config(
        &c.url,
        "a",
        config::hosting("sleep", &[("per_batch", "150ms"), ("per_record", "0ms")]),
    )?;
    caught_up(&c, &topic, Duration::from_secs(90)).await?;

    let row =
        eventually(Duration::from_secs(30), &format!("usage of {topic} to count {n} records"), || async {
            let doc = online(&c, &["--json", "usage"]).await?.json()?;
            let rows = doc.get("usage").items()?;
            let row = rows.iter().find(|u| u.get("mapping").str().ok() == Some(topic.as_str())).cloned();
            let Some(row) = row else { bail!("no usage row for {topic}: {doc:?}") };
            Ok((row.get("records").u64()? == n).then_some(row))
        })
        .await?;
    let (batches, records, handler_ms, units) = (
        row.get("batches").u64()?,
        row.get("records").u64()?,
        row.get("handler_ms").u64()?,
        row.get("billed_units").u64()?,
    );
    eprintln!("usage: {batches} batches, {records} records, {handler_ms} ms, {units} units");
    ensure!(row.get("handler").str()? == "sleep", "usage row {row:?}");
    ensure!(batches >= n / 10, "{batches} batches for {n} records in batches of at most 10");
    ensure!(records == n, "{records} records, want {n}");
    ensure!(handler_ms >= 150 * batches, "{handler_ms} ms for {batches} batches of 150 ms each");
    ensure!(units >= 2 * batches, "{units} units of 100 ms for {batches} batches of 150 ms (2 units each)");
    ensure!(
        units * 100 <= handler_ms + 100 * batches,
        "{units} units is more than {handler_ms} ms rounded up per batch ({batches} batches)"
    );
    let seconds = row.get("billed_seconds").f64()?;
    ensure!((seconds - units as f64 / 10.0).abs() < 1e-9, "billed_seconds {seconds} for {units} units");

    // The table says the same; --since filters.
    let table = online(&c, &["usage"]).await?;
    table.ok()?.says("100MS UNITS")?;
    let line = table
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(topic.as_str()))
        .with_context(|| format!("no usage row for {topic}:\n{}", table.stdout))?;
    let cells: Vec<&str> = line.split_whitespace().collect();
    let want = [topic.clone(), "sleep".into(), batches.to_string(), records.to_string()];
    ensure!(
        cells.len() >= 6 && cells[..4] == want && cells[5] == units.to_string(),
        "usage row {line:?}, want {want:?} .. {units}"
    );
    let recent = online(&c, &["--json", "usage", "--since", "1h"]).await?.json()?;
    ensure!(
        recent.get("usage").items()?.iter().any(|u| u.get("mapping").str().ok() == Some(topic.as_str())
            && u.get("billed_units").u64().ok() == Some(units)),
        "usage --since 1h: {recent:?}"
    );
    let future = online(&c, &["--json", "usage", "--since", "2999-01-01T00:00:00Z"]).await?.json()?;
    ensure!(future.get("usage").items()?.is_empty(), "usage since 2999: {future:?}");
    Ok(())
}

// ---------------------------------------------------------- JSON reading

/// A JSON value from the CLI's `--json` output, with accessors that fail
/// with the value in the message.
#[derive(Debug, Clone, PartialEq)]
struct Json(serde_json::Value);

impl Json {
    fn parse(text: &str) -> Result<Json> {
        Ok(Json(serde_json::from_str(text).with_context(|| format!("not JSON: {text}"))?))
    }

    /// The field `key` of an object; null when absent.
    fn get(&self, key: &str) -> Json {
        Json(self.0.get(key).cloned().unwrap_or(serde_json::Value::Null))
    }

    fn items(&self) -> Result<Vec<Json>> {
        match &self.0 {
            serde_json::Value::Array(items) => Ok(items.iter().cloned().map(Json).collect()),
            other => bail!("not an array: {other}"),
        }
    }

    fn str(&self) -> Result<&str> {
        self.0.as_str().with_context(|| format!("not a string: {}", self.0))
    }

    fn bool(&self) -> Result<bool> {
        self.0.as_bool().with_context(|| format!("not a boolean: {}", self.0))
    }

    fn i64(&self) -> Result<i64> {
        self.0.as_i64().with_context(|| format!("not an integer: {}", self.0))
    }

    fn u64(&self) -> Result<u64> {
        self.0.as_u64().with_context(|| format!("not an unsigned integer: {}", self.0))
    }

    fn f64(&self) -> Result<f64> {
        self.0.as_f64().with_context(|| format!("not a number: {}", self.0))
    }

    /// An integer or null.
    fn opt_i64(&self) -> Result<Option<i64>> {
        if self.0.is_null() { Ok(None) } else { self.i64().map(Some) }
    }
}
