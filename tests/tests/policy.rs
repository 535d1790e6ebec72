//! Black-box tests of the batch policy, one per mapping setting: the real
//! coordinator and worker binaries, real Kafka (tansu), and the built-in
//! `chaos` handler (poison records, item failures, simulated work) writing
//! a receipt per processed record to a one-partition receipts topic.
//!
//! Each test fails if its setting is ignored. Completion is judged by the
//! coordinator's checkpoints reaching the partitions' high watermarks: a
//! checkpoint moves only after the handler's receipts (and the on_failure
//! writes) were acknowledged, so from then on both topics can be read to
//! their ends.
//!
//! The tests in this file run one at a time (`SERIAL`), like those of
//! `worker.rs`: each starts a coordinator and workers on a small machine.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use shardline_proto::StartingPosition;
use shardline_testkit::config::{Backoff, BatchSettings, FilterConfig, hosting};
use shardline_tests::kafka::{Consumed, produce, producer, read_topic};
use shardline_tests::{
    Coordinator, CoordinatorConfig, Proc, StreamConfig, WorkerConfig, create_topic, eventually,
    kafka_brokers, start_worker_config, unique,
};

mod support;

/// One test at a time in this file (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Distinct keys of records made by `produce`.
const KEYS: u64 = 50;

/// The poison of tests with 1,000 records `id-0..id-999`: only `id-777`
/// contains it (`id-7770` would too, but is never produced).
const POISON: &str = "id-777";

/// A stream, its one-partition receipts topic (receipt order is processing
/// order) and its on_failure topic.
struct Topics {
    stream: String,
    receipts: String,
    dlq: String,
}

async fn topics(name: &str, partitions: i32) -> Result<Topics> {
    let t = Topics { stream: unique(name), receipts: unique("receipts"), dlq: unique("dlq") };
    create_topic(&t.stream, partitions).await?;
    create_topic(&t.receipts, 1).await?;
    create_topic(&t.dlq, 1).await?;
    Ok(t)
}

/// A stream mapping `topic` to `chaos` from its oldest record, with
/// `settings`.
fn stream(topic: &str, settings: BatchSettings) -> StreamConfig {
    StreamConfig { settings, ..support::from_start(topic, "chaos") }
}

/// [`stream`] of `t.stream` giving up records to `t.dlq`.
fn failing(t: &Topics, settings: BatchSettings) -> StreamConfig {
    StreamConfig { on_failure: Some(t.dlq.clone()), ..stream(&t.stream, settings) }
}

/// A worker config hosting `chaos` writing receipts to `receipts`, with
/// string `settings`.
fn chaos(receipts: &str, settings: &[(&str, &str)]) -> WorkerConfig {
    hosting("chaos", &[&[("topic", receipts)], settings].concat())
}

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// A coordinator and its workers, all killed on drop (workers first).
struct Run {
    workers: Vec<Proc>,
    c: Coordinator,
    _dir: tempfile::TempDir,
}

impl Run {
    /// Starts a coordinator with `streams` and one worker per id, each
    /// with the config `worker`.
    fn start(streams: Vec<StreamConfig>, worker: &WorkerConfig, ids: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = CoordinatorConfig { streams, ..support::timings() };
        let c = Coordinator::start_config(config, &dir.path().join("data"))?;
        let workers =
            ids.iter().map(|id| start_worker_config(&c.url, id, worker.clone())).collect::<Result<_>>()?;
        Ok(Self { workers, c, _dir: dir })
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// `ms` since the epoch as RFC 3339 in UTC with milliseconds, e.g.
/// `2026-11-27T10:00:00.123Z` (fixed width: such strings sort by time).
fn rfc3339(ms: i64) -> String {
    let (secs, millis) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The high watermark of each partition of `topic`.
async fn high_watermarks(topic: &str) -> Result<Vec<i64>> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", kafka_brokers()).create().context("consumer")?;
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
        (0..partitions as i32)
            .map(|p| Ok(consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?.1))
            .collect()
    })
    .await?
}

/// Waits until the checkpoints of `stream` add up to its high watermarks
/// (as they are now): every record was finished and checkpointed past.
async fn caught_up(c: &Coordinator, stream: &str, timeout: Duration) -> Result<i64> {
    let highs = high_watermarks(stream).await?;
    let end: i64 = highs.iter().sum();
    let started = Instant::now();
    eventually(timeout, &format!("the checkpoints of {stream} to reach {highs:?}"), || async {
        let leases = c.leases_of(stream).await?;
        let checkpoints: Vec<Option<i64>> = leases.iter().map(|l| l.checkpoint).collect();
        let sum: i64 = checkpoints.iter().flatten().sum();
        let done = leases.len() == highs.len() && sum == end;
        ensure!(
            done,
            "checkpoints now {checkpoints:?}, owners {:?}",
            leases.iter().map(|l| l.owner.as_str()).collect::<Vec<_>>()
        );
        Ok(Some(sum))
    })
    .await?;
    eprintln!("{stream}: checkpoints reached {highs:?} (waited {:?})", started.elapsed());
    Ok(end)
}

/// Every record of `topic` up to its current high watermarks.
async fn read(topic: &str) -> Result<Vec<Consumed>> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_topic(&topic, Duration::from_secs(30))).await?
}

/// The id of a record: values `id-<n>` or JSON `{"id":<n>,...}`.
fn id_of(value: &str) -> Option<u64> {
    if let Some(n) = value.strip_prefix("id-") {
        return n.parse().ok();
    }
    let rest = value.split("\"id\":").nth(1)?;
    rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse().ok()
}

fn ids(records: &[Consumed]) -> Result<Vec<u64>> {
    records.iter().map(|r| id_of(&r.value).with_context(|| format!("no id in {:?}", r.value))).collect()
}

/// How many times each id occurs.
fn counts(records: &[Consumed]) -> Result<BTreeMap<u64, usize>> {
    let mut counts = BTreeMap::new();
    for id in ids(records)? {
        *counts.entry(id).or_default() += 1;
    }
    Ok(counts)
}

/// At most 20 ids, for messages.
fn few(ids: &[u64]) -> String {
    if ids.len() <= 20 { format!("{ids:?}") } else { format!("{:?}... ({} in all)", &ids[..20], ids.len()) }
}

/// Checks that `counts` holds exactly the ids `want`, each once.
fn exactly_once(counts: &BTreeMap<u64, usize>, want: &BTreeSet<u64>, what: &str) -> Result<()> {
    let missing: Vec<u64> = want.iter().filter(|i| !counts.contains_key(i)).copied().collect();
    let extra: Vec<u64> = counts.keys().filter(|i| !want.contains(i)).copied().collect();
    let twice: Vec<u64> = counts.iter().filter(|(_, c)| **c > 1).map(|(i, _)| *i).collect();
    ensure!(
        missing.is_empty() && extra.is_empty() && twice.is_empty(),
        "{what}: missing {}, unexpected {}, more than once {}",
        few(&missing),
        few(&extra),
        few(&twice)
    );
    Ok(())
}

/// Checks one on_failure record: unchanged (key, value and headers of the
/// source record its headers name) and headers saying where it came from
/// and why it gave up. `since` is an RFC 3339 time before it could fail.
fn check_failed(
    r: &Consumed,
    stream: &str,
    source: &[Consumed],
    (reason, attempts): (&str, &str),
    since: &str,
) -> Result<()> {
    let h = |key: &str| {
        r.header(key)
            .with_context(|| format!("on_failure record {:?}: no {key} header in {:?}", r.value, r.headers))
    };
    ensure!(h("shardline.source.stream")? == stream, "{:?}: source stream {:?}", r.value, r.headers);
    let partition: i32 = h("shardline.source.partition")?.parse()?;
    let offset: i64 = h("shardline.source.offset")?.parse()?;
    let original = source
        .iter()
        .find(|s| s.partition == partition && s.offset == offset)
        .with_context(|| format!("{:?}: no source record at {partition}@{offset}", r.value))?;
    ensure!(
        original.value == r.value && original.key == r.key,
        "on_failure record {:?} (key {:?}) is not the source record {:?} (key {:?}) at {partition}@{offset}",
        r.value,
        r.key,
        original.value,
        original.key
    );
    for (key, value) in &original.headers {
        ensure!(r.header(key) == Some(value.as_str()), "{:?}: source header {key} = {value:?} lost", r.value);
    }
    ensure!(
        h("shardline.reason")? == reason,
        "{:?}: reason {:?}, want {reason}",
        r.value,
        r.header("shardline.reason")
    );
    ensure!(
        h("shardline.attempts")? == attempts,
        "{:?}: attempts {:?}, want {attempts}",
        r.value,
        r.header("shardline.attempts")
    );
    ensure!(!h("shardline.error")?.is_empty(), "{:?}: empty shardline.error", r.value);
    let failed_at = h("shardline.failed_at")?;
    let now = rfc3339(now_ms() + 1000);
    ensure!(
        failed_at.len() == now.len()
            && failed_at.ends_with('Z')
            && since <= failed_at
            && failed_at <= now.as_str(),
        "{:?}: shardline.failed_at {failed_at:?} is not an RFC 3339 time between {since} and {now}",
        r.value
    );
    Ok(())
}

/// 1,000 records, one poison: bisect_on_error splits the failing batch down
/// to the poison record, which alone goes to on_failure after max_retries
/// (3 retries: 4 attempts), unchanged and with its provenance headers. The
/// other 999 are processed exactly once, and the checkpoint reaches the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bisect_on_error_sends_only_the_poison_record_to_on_failure_after_max_retries() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let t = topics("bisect", 1).await?;
    let n = 1000;
    produce(&producer()?, &t.stream, 0, n, KEYS).await?;
    let since = rfc3339(now_ms());
    let settings = BatchSettings {
        bisect_on_error: true,
        max_retries: Some(3),
        retry_backoff: Backoff { initial: ms(50), max: ms(400), ..Backoff::default() },
        ..BatchSettings::default()
    };
    let run = Run::start(vec![failing(&t, settings)], &chaos(&t.receipts, &[("poison", POISON)]), &["a"])?;
    caught_up(&run.c, &t.stream, Duration::from_secs(30)).await?;

    let source = read(&t.stream).await?;
    let failed = read(&t.dlq).await?;
    eprintln!(
        "bisect: on_failure holds {:?} with headers {:?}",
        failed.iter().map(|r| &r.value).collect::<Vec<_>>(),
        failed.first().map(|r| &r.headers)
    );
    ensure!(
        failed.len() == 1,
        "on_failure holds {} records, want only the poison: {:?}",
        failed.len(),
        ids(&failed)?
    );
    let poison = &failed[0];
    ensure!(poison.value == POISON, "on_failure holds {:?}, want {POISON}", poison.value);
    check_failed(poison, &t.stream, &source, ("retries_exhausted", "4"), &since)?;

    let receipts = counts(&read(&t.receipts).await?)?;
    let others: BTreeSet<u64> = (0..n).filter(|&i| i != 777).collect();
    exactly_once(&receipts, &others, "bisect: receipts of the 999 healthy records")?;
    eprintln!("bisect: {} records processed once each, the poison never", receipts.len());
    Ok(())
}

/// report_item_failures: the handler names the poison record; records
/// before it are finished once and never processed again, the poison is
/// retried (max_retries = 2) and goes to on_failure, every other record is
/// processed at least once, and the checkpoint reaches the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_item_failures_retries_from_the_failed_record_and_never_reprocesses_earlier_ones() -> Result<()>
{
    let _serial = SERIAL.lock().await;
    let t = topics("items", 1).await?;
    let n = 1000;
    produce(&producer()?, &t.stream, 0, n, KEYS).await?;
    let since = rfc3339(now_ms());
    let settings = BatchSettings {
        report_item_failures: true,
        max_retries: Some(2),
        retry_backoff: Backoff { initial: ms(50), max: ms(400), ..Backoff::default() },
        ..BatchSettings::default()
    };
    let mut worker = chaos(&t.receipts, &[("poison", POISON)]);
    worker.handlers.entry("chaos".into()).or_default().insert("report_items".into(), true.into());
    let run = Run::start(vec![failing(&t, settings)], &worker, &["a"])?;
    caught_up(&run.c, &t.stream, Duration::from_secs(30)).await?;

    let source = read(&t.stream).await?;
    let failed = read(&t.dlq).await?;
    let failed_ids = ids(&failed)?;
    eprintln!("item failures: on_failure holds ids {}", few(&failed_ids));
    ensure!(failed_ids.contains(&777), "the poison is not in on_failure: {}", few(&failed_ids));
    let early: Vec<u64> = failed_ids.iter().filter(|&&i| i < 777).copied().collect();
    ensure!(early.is_empty(), "records before the poison went to on_failure: {}", few(&early));
    for r in &failed {
        check_failed(r, &t.stream, &source, ("retries_exhausted", "3"), &since)?;
    }

    let receipts = counts(&read(&t.receipts).await?)?;
    let before: Vec<u64> = (0..777).filter(|i| receipts.get(i) != Some(&1)).collect();
    ensure!(before.is_empty(), "records before the poison not processed exactly once: {}", few(&before));
    ensure!(!receipts.contains_key(&777), "the poison reached the receipts");
    let after: Vec<u64> = (778..n).filter(|i| !receipts.contains_key(i)).collect();
    ensure!(after.is_empty(), "records after the poison never processed: {}", few(&after));
    let again: Vec<u64> = receipts.iter().filter(|(_, c)| **c > 1).map(|(i, _)| *i).collect();
    eprintln!(
        "item failures: 0..776 once each; processed again (after the poison, in its batch): {}",
        few(&again)
    );
    Ok(())
}

/// Without bisect, a batch with a poison record is retried whole and gives
/// up whole after max_retries: all its 10 records go to on_failure with
/// reason retries_exhausted, the batches around it are processed, and
/// records produced after the give-up are processed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_retries_without_bisect_gives_up_the_whole_batch_and_later_batches_flow() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let t = topics("retries", 1).await?;
    let p = producer()?;
    produce(&p, &t.stream, 0, 300, KEYS).await?;
    let since = rfc3339(now_ms());
    // A window, so every batch is a full 10 (offsets 150..159 together).
    let settings = BatchSettings {
        batch_size: 10,
        batch_window: ms(500),
        max_retries: Some(2),
        retry_backoff: Backoff { initial: ms(100), max: ms(200), multiplier: 2.0, jitter: false },
        ..BatchSettings::default()
    };
    let run = Run::start(vec![failing(&t, settings)], &chaos(&t.receipts, &[("poison", "id-155")]), &["a"])?;
    caught_up(&run.c, &t.stream, Duration::from_secs(30)).await?;
    // The partition went through a failing batch: new records still flow.
    produce(&p, &t.stream, 300, 400, KEYS).await?;
    caught_up(&run.c, &t.stream, Duration::from_secs(20)).await?;

    let source = read(&t.stream).await?;
    let failed = read(&t.dlq).await?;
    let failed_ids = ids(&failed)?;
    eprintln!("max retries: on_failure holds ids {failed_ids:?}");
    ensure!(
        failed_ids == (150..160).collect::<Vec<u64>>(),
        "on_failure holds {failed_ids:?}, want 150..=159"
    );
    for r in &failed {
        check_failed(r, &t.stream, &source, ("retries_exhausted", "3"), &since)?;
    }
    let receipts = counts(&read(&t.receipts).await?)?;
    let healthy: BTreeSet<u64> = (0..400).filter(|i| !(150..160).contains(i)).collect();
    exactly_once(&receipts, &healthy, "max retries: receipts")?;
    Ok(())
}

/// handler_timeout = 1s with a handler that takes 3 s and max_retries = 0:
/// every batch times out once and goes to on_failure with reason
/// handler_timeout; nothing is processed; the worker stays healthy (it
/// keeps taking new records) and the checkpoint reaches the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_timeout_fails_slow_batches_to_on_failure_and_the_worker_keeps_going() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let t = topics("timeout", 1).await?;
    let p = producer()?;
    produce(&p, &t.stream, 0, 30, KEYS).await?;
    let since = rfc3339(now_ms());
    let settings = BatchSettings {
        batch_size: 10,
        batch_window: ms(300),
        handler_timeout: Duration::from_secs(1),
        max_retries: Some(0),
        ..BatchSettings::default()
    };
    let mut run =
        Run::start(vec![failing(&t, settings)], &chaos(&t.receipts, &[("sleep_per_batch", "3s")]), &["a"])?;
    let started = Instant::now();
    caught_up(&run.c, &t.stream, Duration::from_secs(30)).await?;
    let first = started.elapsed();
    produce(&p, &t.stream, 30, 40, KEYS).await?;
    caught_up(&run.c, &t.stream, Duration::from_secs(20)).await?;

    let source = read(&t.stream).await?;
    let failed = read(&t.dlq).await?;
    let failed_ids = ids(&failed)?;
    eprintln!(
        "timeout: first 30 records given up after {first:?}; on_failure holds ids {}",
        few(&failed_ids)
    );
    ensure!(failed_ids == (0..40).collect::<Vec<u64>>(), "on_failure holds {}, want 0..40", few(&failed_ids));
    for r in &failed {
        check_failed(r, &t.stream, &source, ("handler_timeout", "1"), &since)?;
    }
    let receipts = read(&t.receipts).await?;
    ensure!(receipts.is_empty(), "timed-out batches left {} receipts", receipts.len());
    let status = run.workers.first_mut().context("worker")?.child.try_wait()?;
    ensure!(status.is_none(), "the worker exited: {status:?}");
    let workers = run.c.workers().await?;
    ensure!(workers.iter().any(|w| w.worker_id == "a"), "the worker left the fleet");
    Ok(())
}

/// max_record_age = 60s: records with a CreateTime two hours old go to
/// on_failure with reason too_old without reaching the handler; fresh
/// records interleaved with them are processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_record_age_sends_old_records_to_on_failure_without_calling_the_handler() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let t = topics("age", 1).await?;
    let old_ms = now_ms() - 2 * 3600 * 1000;
    let p = producer()?;
    // Even ids are two hours old; every record carries a header of its own.
    let sends: Vec<_> = (0..100u64)
        .map(|i| {
            let (key, value, trace) = (format!("key-{}", i % 10), format!("id-{i}"), format!("trace-{i}"));
            let p = &p;
            let stream = &t.stream;
            async move {
                let headers = OwnedHeaders::new().insert(Header { key: "trace", value: Some(&trace) });
                let mut record = FutureRecord::to(stream).key(&key).payload(&value).headers(headers);
                if i.is_multiple_of(2) {
                    record = record.timestamp(old_ms + i as i64);
                }
                p.send(record, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!("produce {value}: {e}"))
            }
        })
        .collect();
    for r in futures::future::join_all(sends).await {
        r?;
    }
    // The broker must keep producer timestamps for this test to mean anything.
    let source = read(&t.stream).await?;
    for r in source.iter().take(4) {
        eprintln!("age: source record {} at offset {} has timestamp {:?}", r.value, r.offset, r.timestamp);
    }
    for r in &source {
        let id = id_of(&r.value).context("source id")?;
        let ts = r.timestamp.to_millis().unwrap_or(-1);
        let kept = if id.is_multiple_of(2) { ts == old_ms + id as i64 } else { ts > old_ms + 3_600_000 };
        ensure!(kept, "the broker did not keep the producer's CreateTime of {}: {:?}", r.value, r.timestamp);
    }
    let since = rfc3339(now_ms());
    let settings =
        BatchSettings { max_record_age: Some(Duration::from_secs(60)), ..BatchSettings::default() };
    let run = Run::start(vec![failing(&t, settings)], &chaos(&t.receipts, &[]), &["a"])?;
    caught_up(&run.c, &t.stream, Duration::from_secs(30)).await?;

    let failed = read(&t.dlq).await?;
    let failed_ids: BTreeSet<u64> = ids(&failed)?.into_iter().collect();
    let old: BTreeSet<u64> = (0..100).step_by(2).collect();
    eprintln!("age: on_failure holds ids {}", few(&failed_ids.iter().copied().collect::<Vec<_>>()));
    ensure!(
        failed.len() == old.len() && failed_ids == old,
        "on_failure holds {failed_ids:?}, want the even ids"
    );
    for r in &failed {
        check_failed(r, &t.stream, &source, ("too_old", "0"), &since)?;
    }
    let receipts = counts(&read(&t.receipts).await?)?;
    let fresh: BTreeSet<u64> = (1..100).step_by(2).collect();
    exactly_once(&receipts, &fresh, "age: receipts (the fresh, odd ids only)")?;
    Ok(())
}

/// filter = { field = "kind", equals = "a" }: only records whose JSON
/// value has kind "a" reach the handler; the others are skipped, and the
/// checkpoint still reaches the end of the partition, even though its last
/// 20 records are all filtered out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_passes_only_matching_records_and_checkpoints_past_the_others() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let t = topics("filter", 1).await?;
    let n = 200u64;
    let kind = |i: u64| if i.is_multiple_of(3) && i < n - 20 { "a" } else { "b" };
    let p = producer()?;
    let sends: Vec<_> = (0..n)
        .map(|i| {
            let (key, value) =
                (format!("key-{}", i % 10), format!("{{\"id\":{i},\"kind\":\"{}\"}}", kind(i)));
            let (p, stream) = (&p, &t.stream);
            async move {
                p.send(FutureRecord::to(stream).key(&key).payload(&value), Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!("produce {value}: {e}"))
            }
        })
        .collect();
    for r in futures::future::join_all(sends).await {
        r?;
    }
    let filter = FilterConfig { field: "kind".into(), equals: Some("a".into()), exists: None, prefix: None };
    let settings = BatchSettings { batch_size: 25, filter: Some(filter), ..BatchSettings::default() };
    let run = Run::start(vec![stream(&t.stream, settings)], &chaos(&t.receipts, &[]), &["a"])?;
    let end = caught_up(&run.c, &t.stream, Duration::from_secs(30)).await?;
    ensure!(end == n as i64, "the partition holds {end} records, want {n}");

    let receipts = read(&t.receipts).await?;
    if let Some(r) = receipts.first() {
        eprintln!("filter: first receipt {:?}", r.value);
    }
    let wanted: BTreeSet<u64> = (0..n).filter(|&i| kind(i) == "a").collect();
    exactly_once(&counts(&receipts)?, &wanted, "filter: receipts (kind a only)")?;
    eprintln!("filter: {} of {n} records reached the handler", wanted.len());
    Ok(())
}

/// The receipts of keyed records, checked: every id of `0..n` there, and
/// for each key, first deliveries in increasing source offset. Returns the
/// time from the first to the last first delivery and the duplicates.
fn check_keyed(receipts: &[Consumed], n: u64, what: &str) -> Result<(Duration, usize)> {
    let mut seen = BTreeSet::new();
    let mut last = BTreeMap::<String, i64>::new();
    let mut violations = Vec::new();
    let (mut first_ms, mut last_ms) = (i64::MAX, i64::MIN);
    for r in receipts {
        let id = id_of(&r.value).with_context(|| format!("{what}: no id in {:?}", r.value))?;
        if !seen.insert(id) {
            continue; // a redelivery may repeat older offsets
        }
        let key = r.key.clone().with_context(|| format!("{what}: receipt {:?} has no key", r.value))?;
        let offset: i64 = r.header("shardline.offset").context("offset header")?.parse()?;
        let previous = last.insert(key.clone(), offset);
        if previous.is_some_and(|p| p >= offset) {
            violations.push(format!("{key}: offset {offset} after {previous:?}"));
        }
        let ts = r.timestamp.to_millis().unwrap_or(0);
        (first_ms, last_ms) = (first_ms.min(ts), last_ms.max(ts));
    }
    let lost: Vec<u64> = (0..n).filter(|i| !seen.contains(i)).collect();
    ensure!(lost.is_empty(), "{what}: lost {}", few(&lost));
    ensure!(violations.is_empty(), "{what}: per-key order broken: {violations:?}");
    let span = Duration::from_millis(u64::try_from(last_ms - first_ms).unwrap_or(0));
    Ok((span, receipts.len() - seen.len()))
}

/// One run of 400 records (40 keys) on a fresh one-partition stream with a
/// 200 ms handler, batch_size 10. With `kill`, two workers run and the
/// lease's owner is killed with SIGKILL mid-run. Returns the processing
/// span (first to last receipt).
async fn parallel_run(factor: u32, kill: bool) -> Result<Duration> {
    let what = format!("factor {factor}{}", if kill { " with kill -9" } else { "" });
    let t = topics("parallel", 1).await?;
    let n = 400;
    produce(&producer()?, &t.stream, 0, n, 40).await?;
    let settings = BatchSettings { batch_size: 10, ..BatchSettings::default() };
    let parallel = StreamConfig { parallelization_factor: factor, ..stream(&t.stream, settings) };
    let ids: &[&str] = if kill { &["a", "b"] } else { &["a"] };
    let mut run = Run::start(vec![parallel], &chaos(&t.receipts, &[("sleep_per_batch", "200ms")]), ids)?;
    let started = Instant::now();
    // The killed worker and the checkpoint right after its death.
    let mut killed = None;
    if kill {
        let (owner, at) = eventually(Duration::from_secs(20), "the lease to be 100 records in", || async {
            let leases = run.c.leases_of(&t.stream).await?;
            let l = leases.first().context("no lease")?;
            Ok(l.checkpoint.filter(|&c| c >= 100).map(|c| (l.owner.clone(), c)))
        })
        .await?;
        let victim = run.workers.iter_mut().find(|w| w.name == owner).context("owner is not ours")?;
        victim.kill9()?;
        // It is gone: nothing but a checkpoint already on its way can move
        // the lease's checkpoint before the failover, and that only raises it.
        let at_kill = run.c.leases_of(&t.stream).await?.first().and_then(|l| l.checkpoint).unwrap_or(at);
        eprintln!("{what}: killed {owner} with the checkpoint at {at_kill} (seen at {at} before)");
        let survivor = eventually(Duration::from_secs(20), "another worker to take the lease", || async {
            let leases = run.c.leases_of(&t.stream).await?;
            Ok(leases.first().filter(|l| !l.owner.is_empty() && l.owner != owner).map(|l| l.owner.clone()))
        })
        .await?;
        eprintln!("{what}: {survivor} took the lease {:?} after the start", started.elapsed());
        killed = Some((owner, at_kill));
    }
    caught_up(&run.c, &t.stream, Duration::from_secs(40)).await?;
    let wall = started.elapsed();
    let receipts = read(&t.receipts).await?;
    let (span, duplicates) = check_keyed(&receipts, n, &what)?;
    eprintln!(
        "{what}: {n} records processed in {span:?} (first to last receipt; {wall:?} from the start), {duplicates} duplicates"
    );
    match killed {
        Some((owner, at_kill)) => uncheckpointed_only(&receipts, &owner, at_kill, duplicates, &what)?,
        None => ensure!(duplicates == 0, "{what}: {duplicates} duplicates without any failure"),
    }
    Ok(span)
}

/// Checks the `duplicates` of a run whose one partition's owner was killed
/// with the checkpoint at `at_kill`: only records the killed worker
/// processed at or after that checkpoint may come twice (a new owner
/// resumes from it), and no more than those.
fn uncheckpointed_only(
    receipts: &[Consumed],
    owner: &str,
    at_kill: i64,
    duplicates: usize,
    what: &str,
) -> Result<()> {
    let mut uncheckpointed = BTreeSet::new();
    for r in receipts.iter().filter(|r| r.header("shardline.worker") == Some(owner)) {
        let offset: i64 = r.header("shardline.offset").context("offset header")?.parse()?;
        if offset >= at_kill {
            uncheckpointed
                .insert(id_of(&r.value).with_context(|| format!("{what}: no id in {:?}", r.value))?);
        }
    }
    let unexplained: Vec<u64> = counts(receipts)?
        .into_iter()
        .filter(|(id, n)| *n > 1 && !uncheckpointed.contains(id))
        .map(|(id, _)| id)
        .collect();
    eprintln!(
        "{what}: {duplicates} duplicates, at most {} allowed ({owner}'s work at or after its checkpoint {at_kill})",
        uncheckpointed.len()
    );
    ensure!(
        unexplained.is_empty(),
        "{what}: records processed twice that {owner} had checkpointed (a new owner restarted before {at_kill}): {}",
        few(&unexplained)
    );
    ensure!(
        duplicates <= uncheckpointed.len(),
        "{what}: {duplicates} duplicates; {owner} processed only {} records at or after its last checkpoint",
        uncheckpointed.len()
    );
    Ok(())
}

/// The speed-up factor 4 must show over factor 1. Ideal is 4× (40 batches
/// of 200 ms in 4 lanes instead of 1), no concurrency is 1×; 1.5× leaves
/// clear slack for a shared 2-core machine while no sequential run reaches it.
const MIN_SPEEDUP: f64 = 1.5;

/// parallelization_factor = 4: the same slow work runs several batches of a
/// shard at once (at least [`MIN_SPEEDUP`] over factor 1), order is kept per
/// key, and a kill -9 of the worker mid-run loses nothing and repeats only
/// what it processed past its checkpoint (a second worker takes over from
/// the contiguous checkpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallelization_factor_runs_batches_concurrently_keeping_key_order_and_survives_kill_9() -> Result<()>
{
    let _serial = SERIAL.lock().await;
    let one = parallel_run(1, false).await?;
    let four = parallel_run(4, false).await?;
    let speedup = one.as_secs_f64() / four.as_secs_f64().max(0.001);
    eprintln!("parallelization: factor 1 took {one:?}, factor 4 took {four:?}: speed-up {speedup:.2}x");
    ensure!(
        speedup > MIN_SPEEDUP,
        "parallelization_factor = 4 sped a slow handler up only {speedup:.2}x (want > {MIN_SPEEDUP}x, ideal 4x)"
    );
    parallel_run(4, true).await?;
    Ok(())
}

/// Where the broker says `at_timestamp` starts for `ms` on partition 0:
/// `None` for "no record at or after it" (Kafka's offset -1).
async fn offset_for_time(topic: &str, ms: i64) -> Result<Option<i64>> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", kafka_brokers()).create().context("consumer")?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(ms))?;
        let found = consumer.offsets_for_times(tpl, Duration::from_secs(10))?;
        Ok(match found.find_partition(&topic, 0).map(|e| e.offset()) {
            Some(Offset::Offset(o)) if o >= 0 => Some(o),
            _ => None,
        })
    })
    .await?
}

/// Produces ids `from..to` one at a time, so offsets follow ids.
async fn produce_in_order(p: &FutureProducer, topic: &str, from: u64, to: u64) -> Result<()> {
    for i in from..to {
        let (key, value) = (format!("key-{}", i % 10), format!("id-{i}"));
        p.send(FutureRecord::to(topic).key(&key).payload(&value), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce {value}: {e}"))?;
    }
    Ok(())
}

/// starting_position, for shards without a checkpoint:
/// - `at_timestamp` with T between two waves of 100 records: only the
///   second wave is processed;
/// - `latest`: records produced before the lease started are not
///   processed, those produced after it are;
/// - `at_timestamp` with T after every record: like `latest` (no record at
///   or after T: start at the end), also on tansu 0.6.0, which answers that
///   lookup with offset 0 instead of Kafka's -1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_position_at_timestamp_and_latest_skip_older_records() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let p = producer()?;
    let at = topics("at-ts", 1).await?;
    let (latest, after) = (unique("latest"), unique("at-ts-after"));
    create_topic(&latest, 1).await?;
    create_topic(&after, 1).await?;

    produce_in_order(&p, &at.stream, 0, 100).await?;
    // Clock distance (not a wait for anything): T lies 2 s from either wave,
    // far beyond any skew between this clock and the broker's timestamps.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = now_ms();
    tokio::time::sleep(Duration::from_secs(2)).await;
    produce_in_order(&p, &at.stream, 100, 200).await?;
    produce_in_order(&p, &latest, 1000, 1050).await?;
    produce_in_order(&p, &after, 2000, 2050).await?;
    let t_after = now_ms() + 1;

    let broker_at_t = offset_for_time(&at.stream, t).await?;
    let broker_after = offset_for_time(&after, t_after).await?;
    eprintln!(
        "starting position: the broker finds offset {broker_at_t:?} at T = {} (want Some(100)) and {broker_after:?} \
         after the newest record ({}; Kafka: None, i.e. offset -1)",
        rfc3339(t),
        rfc3339(t_after)
    );

    let at_time = |topic: &str, ms: i64| -> Result<StreamConfig> {
        Ok(StreamConfig {
            starting_position: StartingPosition::AtTimestamp,
            starting_timestamp: Some(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms)?)),
            ..StreamConfig::new(topic, "chaos")
        })
    };
    let streams = vec![
        at_time(&at.stream, t)?,
        StreamConfig { starting_position: StartingPosition::Latest, ..StreamConfig::new(&latest, "chaos") },
        at_time(&after, t_after)?,
    ];
    let run = Run::start(streams, &chaos(&at.receipts, &[]), &["a"])?;
    // The latest stream's lease pins where it started (the high watermark).
    let pinned =
        eventually(Duration::from_secs(20), "the leases to start and pin their checkpoints", || async {
            let mut pinned = Vec::new();
            for s in [&latest, &after] {
                let leases = run.c.leases_of(s).await?;
                pinned.push(leases.first().and_then(|l| l.checkpoint.filter(|_| !l.owner.is_empty())));
            }
            Ok(pinned.iter().all(Option::is_some).then_some(pinned))
        })
        .await?;
    eprintln!(
        "starting position: latest started at {:?}, at_timestamp after the end at {:?}",
        pinned[0], pinned[1]
    );
    ensure!(pinned[0] == Some(50), "latest started at {:?}, want 50 (the high watermark)", pinned[0]);
    ensure!(pinned[1] == Some(50), "at_timestamp after the end started at {:?}, want 50", pinned[1]);
    produce_in_order(&p, &latest, 1050, 1100).await?;
    produce_in_order(&p, &after, 2050, 2100).await?;
    for s in [&at.stream, &latest, &after] {
        caught_up(&run.c, s, Duration::from_secs(30)).await?;
    }

    let receipts = read(&at.receipts).await?;
    let of = |s: &str| -> Result<BTreeMap<u64, usize>> {
        let mine: Vec<Consumed> =
            receipts.iter().filter(|r| r.header("shardline.stream") == Some(s)).cloned().collect();
        counts(&mine)
    };
    exactly_once(&of(&at.stream)?, &(100..200).collect(), "at_timestamp: receipts")?;
    exactly_once(&of(&latest)?, &(1050..1100).collect(), "latest: receipts")?;
    let after_ids = of(&after)?;
    exactly_once(&after_ids, &(2050..2100).collect(), "at_timestamp after the end: receipts")?;
    Ok(())
}
