//! The materialized-view example (`examples/materialized-view`) on real
//! tansu, PostgreSQL, coordinator and three `materialized-view` workers:
//! deterministic random changes of a few hundred rows over four
//! partitions; one worker `kill -9`ed mid-run after batches it applied
//! whose checkpoints a proxy held back (so they are given again to the
//! next owner, which must skip them), another frozen (SIGSTOP) past its session and woken (a zombie,
//! whose writes the lease epoch must refuse); more changes meanwhile.
//! Once the `applied` table reaches every partition's end, the whole topic
//! is read back and the view recomputed here, independently of the
//! example's code: the view tables must equal it row for row, and every
//! change must have been applied exactly once.

mod support;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};
use shardline_testkit::config;
use shardline_testkit::postgres::{Schema, base_url};
use shardline_testkit::proxy::{Mode, Proxy};
use shardline_tests::{
    Coordinator, CoordinatorConfig, WorkerConfig, create_topic, eventually, kafka_brokers, unique,
};

const PARTITIONS: i32 = 4;
const ROWS: u64 = 300;
/// Changes produced before the workers start, and while they run.
const BEFORE: usize = 2_000;
const DURING: usize = 2_000;

/// The test's own change generator (splitmix64 over fixed seeds): creates
/// of absent rows, updates and deletes of present ones, versions counting
/// up; each change is (row id, Debezium-like JSON).
struct Changes {
    state: u64,
    rows: BTreeMap<u64, (i64, Option<Value>)>,
}

impl Changes {
    fn new(seed: u64) -> Self {
        Self { state: seed, rows: BTreeMap::new() }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn order(&mut self, id: u64) -> Value {
        let customer = format!("c{}", self.next() % 23);
        let status = ["new", "paid", "shipped", "cancelled", "returned"][(self.next() % 5) as usize];
        json!({"id": id, "customer": customer, "amount": self.next() % 50_000, "status": status})
    }

    fn change(&mut self) -> (u64, String) {
        let id = self.next() % ROWS;
        let (version, before) = self.rows.get(&id).cloned().unwrap_or((0, None));
        let version = version + 1;
        let (op, after) = match &before {
            None => ("c", Some(self.order(id))),
            Some(_) if self.next().is_multiple_of(6) => ("d", None),
            Some(b) => {
                let mut a = b.clone();
                let fresh = self.order(id);
                let field = ["customer", "amount", "status"][(self.next() % 3) as usize];
                a[field] = fresh[field].clone();
                ("u", Some(a))
            }
        };
        self.rows.insert(id, (version, after.clone()));
        (id, json!({"op": op, "before": before, "after": after, "version": version, "ts_ms": 0}).to_string())
    }

    fn rows(&mut self, n: usize) -> Vec<support::Row> {
        (0..n)
            .map(|_| {
                let (id, value) = self.change();
                (id.to_string(), value, None)
            })
            .collect()
    }
}

/// The view as a map of each table's rows, rendered as text for equality
/// and readable differences.
#[derive(Debug, Default, PartialEq, Eq)]
struct View {
    orders: BTreeMap<i64, String>,
    customers: BTreeMap<String, String>,
    statuses: BTreeMap<String, i64>,
}

/// The view recomputed from every record of the topic: each row's last
/// change (a row's changes are in one partition, in offset order) gives
/// its final state; the aggregates are counted from those.
fn recompute(records: &[Stored]) -> Result<View> {
    let mut last: BTreeMap<i64, (i64, Option<Value>)> = BTreeMap::new();
    for (partition, offset, value) in records {
        let Some(value) = value else { continue };
        let change: Value = serde_json::from_slice(value).with_context(|| format!("{partition}@{offset}"))?;
        let row = change["after"].as_object().or(change["before"].as_object()).context("no row")?;
        let id = row["id"].as_i64().context("id")?;
        let version = change["version"].as_i64().context("version")?;
        let after = (!change["after"].is_null()).then(|| change["after"].clone());
        last.insert(id, (version, after));
    }
    let mut view = View::default();
    let mut totals: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for (id, (version, row)) in last {
        let Some(row) = row else { continue };
        let (customer, amount, status) = (
            row["customer"].as_str().context("customer")?.to_owned(),
            row["amount"].as_i64().context("amount")?,
            row["status"].as_str().context("status")?.to_owned(),
        );
        view.orders.insert(id, format!("v{version} {customer} {amount} {status}"));
        let t = totals.entry(customer).or_default();
        *t = (t.0 + 1, t.1 + amount);
        *view.statuses.entry(status).or_default() += 1;
    }
    view.customers = totals.into_iter().map(|(c, (n, sum))| (c, format!("{n} orders, {sum}"))).collect();
    Ok(view)
}

async fn read_view(schema: &Schema) -> Result<View> {
    let db = schema.client().await?;
    let s = &schema.name;
    let mut view = View::default();
    for r in db.query(&format!("SELECT id, version, customer, amount, status FROM {s}.orders"), &[]).await? {
        let (id, version, customer, amount, status): (i64, i64, String, i64, String) =
            (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?);
        view.orders.insert(id, format!("v{version} {customer} {amount} {status}"));
    }
    for r in db.query(&format!("SELECT customer, orders, amount FROM {s}.customer_totals"), &[]).await? {
        let (customer, n, sum): (String, i64, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        view.customers.insert(customer, format!("{n} orders, {sum}"));
    }
    for r in db.query(&format!("SELECT status, orders FROM {s}.status_counts"), &[]).await? {
        view.statuses.insert(r.try_get(0)?, r.try_get(1)?);
    }
    Ok(view)
}

/// Per partition: (next_offset, epoch, applied, skipped, refused).
async fn applied(schema: &Schema, topic: &str) -> Result<BTreeMap<i32, [i64; 5]>> {
    let db = schema.client().await?;
    let sql = format!(
        "SELECT partition, next_offset, epoch, applied, skipped, refused FROM {}.applied WHERE stream = $1",
        schema.name
    );
    let mut out = BTreeMap::new();
    for r in db.query(&sql, &[&topic]).await? {
        out.insert(
            r.try_get(0)?,
            [r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?, r.try_get(5)?],
        );
    }
    Ok(out)
}

fn consumer() -> Result<BaseConsumer> {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique("view-check"))
        .set("enable.auto.commit", "false")
        .create()
        .context("kafka consumer")
}

/// Each partition's end (high watermark).
fn ends(topic: &str) -> Result<BTreeMap<i32, i64>> {
    let c = consumer()?;
    (0..PARTITIONS).map(|p| Ok((p, c.fetch_watermarks(topic, p, Duration::from_secs(10))?.1))).collect()
}

/// One record read back: (partition, offset, value; `None` for a tombstone).
type Stored = (i32, i64, Option<Vec<u8>>);

/// Every record of `topic` up to `ends`.
fn read_all(topic: &str, ends: &BTreeMap<i32, i64>) -> Result<Vec<Stored>> {
    let c = consumer()?;
    let mut tpl = TopicPartitionList::new();
    for p in ends.keys() {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let want: i64 = ends.values().sum();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (out.len() as i64) < want {
        ensure!(std::time::Instant::now() < deadline, "read {} of {want} records back", out.len());
        if let Some(m) = c.poll(Duration::from_millis(500)) {
            let m = m?;
            if m.offset() < ends[&m.partition()] {
                out.push((m.partition(), m.offset(), m.payload().map(<[u8]>::to_vec)));
            }
        }
    }
    out.sort_by_key(|(p, o, _)| (*p, *o));
    Ok(out)
}

/// Starts a `materialized-view` worker on the test's schema, reaching the coordinator at `coordinator`.
fn worker(
    dir: &std::path::Path,
    coordinator: &str,
    id: &str,
    schema: &Schema,
) -> Result<shardline_tests::Proc> {
    let settings = [
        ("postgres", base_url()),
        ("schema", schema.name.clone()),
        // A frozen worker's open transaction is ended soon, so the
        // partition it locked moves on within the test's patience.
        ("idle_in_transaction_timeout", "2s".to_owned()),
    ];
    let config = WorkerConfig {
        coordinator: coordinator.to_owned(),
        kafka_brokers: kafka_brokers(),
        worker_id: Some(id.to_owned()),
        ..config::hosting("materialized-view", &settings)
    };
    let path = support::config_file(dir, &format!("worker-{id}"), &config)?;
    support::spawn("materialized-view", &["--config", &path], &[], Stdio::null())
}

/// Waits until the view has applied at least `n` changes in all.
async fn progress(schema: &Schema, topic: &str, n: i64) -> Result<()> {
    eventually(Duration::from_secs(120), &format!("{n} changes applied"), || async {
        let sum: i64 = applied(schema, topic).await.unwrap_or_default().values().map(|a| a[2]).sum();
        Ok((sum >= n).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_equals_a_recomputation_of_the_whole_topic_after_kill_9_and_a_zombie() -> Result<()> {
    let schema = Schema::create("view").await?;
    let topic = unique("order-changes");
    create_topic(&topic, PARTITIONS).await?;
    let mut changes = Changes::new(19);
    support::produce_rows(&topic, None, changes.rows(BEFORE)).await?;

    let dir = tempfile::tempdir()?;
    let mut stream = support::from_start(&topic, "materialized-view");
    // Small batches: many transactions, so faults land between and inside them.
    stream.settings.batch_size = 25;
    let c = Coordinator::start_config(
        CoordinatorConfig { streams: vec![stream], ..support::timings() },
        &dir.path().join("data"),
    )?;
    // b reaches the coordinator through a proxy, so its checkpoints can be
    // held back before it dies: it then dies with applied batches the
    // coordinator never heard of, which its successor is given again.
    let proxy = Proxy::start(&c.url).await?;
    let _a = worker(dir.path(), &c.url, "a", &schema)?;
    let mut b = worker(dir.path(), proxy.url(), "b", &schema)?;
    let z = worker(dir.path(), &c.url, "z", &schema)?;

    // More changes arrive while the faults happen.
    let during = changes.rows(DURING);
    let feed_topic = topic.clone();
    let feed = tokio::spawn(async move { support::produce_rows(&feed_topic, None, during).await });

    progress(&schema, &topic, 300).await?;
    let of_b: Vec<i32> = c
        .leases_of(&topic)
        .await?
        .iter()
        .filter(|l| l.owner == "b")
        .filter_map(|l| i32::try_from(l.lease.as_ref()?.index).ok())
        .collect();
    ensure!(!of_b.is_empty(), "b holds no partition");
    let b_applied = async || -> Result<i64> {
        Ok(applied(&schema, &topic).await?.iter().filter(|(p, _)| of_b.contains(p)).map(|(_, a)| a[2]).sum())
    };
    // Frozen: b works on (for up to its 2.4 s fence) but nothing it sends
    // arrives. Once it has applied more, it dies.
    let before_freeze = b_applied().await?;
    proxy.set_mode(Mode::Frozen);
    eventually(Duration::from_secs(20), "b to apply a batch the coordinator does not hear of", || async {
        Ok((b_applied().await? > before_freeze).then_some(()))
    })
    .await?;
    b.kill9()?;
    eprintln!("view: killed b (-9) with checkpoints of partitions {of_b:?} held back");
    progress(&schema, &topic, 900).await?;
    z.signal(libc::SIGSTOP)?;
    // Past the 3 s session timeout: z's leases go to `a` under new epochs.
    let taken = eventually(Duration::from_secs(60), "z's leases to be granted to a", || async {
        let leases = c.leases_of(&topic).await?;
        let all_a = leases.len() == PARTITIONS as usize && leases.iter().all(|l| l.owner == "a");
        let epochs =
            leases.iter().filter_map(|l| Some((i32::try_from(l.lease.as_ref()?.index).ok()?, l.epoch)));
        Ok(all_a.then(|| epochs.collect::<BTreeMap<i32, u64>>()))
    })
    .await?;
    eprintln!("view: z frozen; every lease on a, epochs {taken:?}");
    // Changes of one row must reach the topic in order, so one producer at
    // a time. Then `a` writes every partition under its new epoch before
    // the zombie wakes (the zombie's batches would otherwise be legitimate).
    feed.await??;
    support::produce_rows(&topic, None, changes.rows(300)).await?;
    eventually(Duration::from_secs(120), "a to write every partition under its new epoch", || async {
        let a = applied(&schema, &topic).await?;
        let newer = taken
            .iter()
            .all(|(p, e)| a.get(p).is_some_and(|row| u64::try_from(row[1]).is_ok_and(|s| s >= *e)));
        Ok(newer.then_some(()))
    })
    .await?;
    z.signal(libc::SIGCONT)?;
    eprintln!("view: z woken");
    support::produce_rows(&topic, None, changes.rows(500)).await?;

    let ends = ends(&topic)?;
    let done = eventually(Duration::from_secs(180), "the view to reach every partition's end", || async {
        let a = applied(&schema, &topic).await?;
        let reached = ends.iter().all(|(p, end)| a.get(p).is_some_and(|row| row[0] == *end));
        Ok(reached.then_some(a))
    })
    .await?;
    let records = read_all(&topic, &ends)?;
    let total = records.len() as i64;
    let (applied_sum, skipped, refused): (i64, i64, i64) =
        done.values().fold((0, 0, 0), |(a, s, r), row| (a + row[2], s + row[3], r + row[4]));
    eprintln!(
        "view: {total} changes in {PARTITIONS} partitions (ends {ends:?}); applied {applied_sum}, skipped {skipped} \
         (redelivered after kill -9 / takeover), refused {refused} zombie batches; epochs {:?}",
        done.iter().map(|(p, a)| (*p, a[1])).collect::<BTreeMap<_, _>>()
    );
    ensure!(
        applied_sum == total,
        "{applied_sum} changes applied, but the topic holds {total}: not exactly once"
    );

    let want = recompute(&records)?;
    let got = read_view(&schema).await?;
    for (what, diff) in [
        ("orders", diff(&want.orders, &got.orders)),
        ("customer_totals", diff(&want.customers, &got.customers)),
        ("status_counts", diff(&want.statuses, &got.statuses)),
    ] {
        ensure!(diff.is_empty(), "{what} differs from the recomputation (want / got):\n{}", diff.join("\n"));
    }
    ensure!(want == got && !want.orders.is_empty(), "the view differs from the recomputation");
    eprintln!(
        "view: {} orders, {} customers, {} statuses equal the recomputation row for row",
        got.orders.len(),
        got.customers.len(),
        got.statuses.len()
    );
    Ok(())
}

/// Rows that differ between two tables, at most 20.
fn diff<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    want: &BTreeMap<K, V>,
    got: &BTreeMap<K, V>,
) -> Vec<String> {
    let keys: std::collections::BTreeSet<&K> = want.keys().chain(got.keys()).collect();
    keys.into_iter()
        .filter(|k| want.get(k) != got.get(k))
        .map(|k| format!("{k:?}: {:?} / {:?}", want.get(k), got.get(k)))
        .take(20)
        .collect()
}
