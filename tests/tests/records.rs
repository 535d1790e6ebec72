//! Black-box tests of what broker data and topic life cycles do to workers:
//! records rdkafka's typed API cannot even write (null values, header names
//! that are not UTF-8) must flow through `forward` and `on_failure`
//! unchanged and never panic a worker, and a topic created after its
//! mapping must be read from its first record.
//!
//! Real coordinator and worker binaries, real Kafka (tansu). One test at a
//! time (`SERIAL`): each starts several processes on a small machine.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shardline_testkit::config::{hosting, settings};
use shardline_tests::kafka::{Consumed, RawRecord, produce, produce_raw, producer, read_topic};
use shardline_tests::{
    Coordinator, CoordinatorConfig, StreamConfig, create_topic, eventually, start_worker_config, unique,
};
use support::{from_start, timings};

mod support;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn read(topic: &str) -> Result<Vec<Consumed>> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_topic(&topic, Duration::from_secs(30))).await?
}

/// The checkpoints of `stream`'s leases, in partition order.
async fn checkpoints(c: &Coordinator, stream: &str) -> Result<Vec<Option<i64>>> {
    Ok(c.leases_of(stream).await?.iter().map(|l| l.checkpoint).collect())
}

/// The odd records: a tombstone, a header name that is not UTF-8, and an
/// ordinary record after them (so "reached the end" means "got past them").
fn odd_records() -> [RawRecord<'static>; 3] {
    [
        RawRecord { key: b"deleted-row", value: None, headers: &[] },
        RawRecord { key: b"k", value: Some(b"with-odd-header"), headers: &[(b"\xff\xfeodd", b"v")] },
        RawRecord { key: b"k", value: Some(b"plain"), headers: &[] },
    ]
}

/// A tombstone stays a tombstone through `forward` (receipts) and through
/// `on_failure` (every batch times out, max_retries = 0), and a header
/// named with invalid UTF-8 is read (lossily) instead of panicking the
/// worker: both streams are checkpointed past all three records, by the
/// one worker that started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_stay_null_and_odd_header_names_do_not_panic_the_worker() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (forwarded, failing, receipts, dlq) =
        (unique("tomb"), unique("tombfail"), unique("receipts"), unique("dlq"));
    for t in [&forwarded, &failing, &receipts, &dlq] {
        create_topic(t, 1).await?;
    }
    produce_raw(&forwarded, &odd_records())?;
    produce_raw(&failing, &odd_records())?;

    let dir = tempfile::tempdir()?;
    let mut sleeping = from_start(&failing, "sleep");
    sleeping.on_failure = Some(dlq.clone());
    sleeping.settings.handler_timeout = Duration::from_secs(1);
    sleeping.settings.max_retries = Some(0);
    let config =
        CoordinatorConfig { streams: vec![from_start(&forwarded, "forward"), sleeping], ..timings() };
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let mut worker = hosting("forward", &[("topic", &receipts)]);
    worker.handlers.insert("sleep".into(), settings(&[("per_batch", "5s")]));
    let mut w = start_worker_config(&c.url, "w", worker)?;
    for stream in [&forwarded, &failing] {
        eventually(Duration::from_secs(60), &format!("{stream} checkpointed past all 3 records"), || async {
            let now = checkpoints(&c, stream).await?;
            ensure!(now == vec![Some(3)], "checkpoints of {stream}: {now:?}");
            Ok(Some(()))
        })
        .await?;
    }
    ensure!(w.child_running(), "the worker died on the records");

    for (topic, what) in [(&receipts, "forward's receipts"), (&dlq, "on_failure")] {
        let got = read(topic).await?;
        let shape: Vec<(bool, &str)> = got.iter().map(|r| (r.tombstone, r.value.as_str())).collect();
        eprintln!("{what}: {shape:?}");
        ensure!(got.len() == 3, "{what} holds {} records: {shape:?}", got.len());
        ensure!(got[0].tombstone, "{what}: the tombstone became a value: {shape:?}");
        ensure!(!got[1].tombstone && got[1].value == "with-odd-header", "{what}: {shape:?}");
        ensure!(
            got[1].headers.iter().any(|(k, v)| k.ends_with("odd") && v == "v"),
            "{what}: the odd header was lost: {:?}",
            got[1].headers
        );
        ensure!(got[2].value == "plain", "{what}: {shape:?}");
    }
    let dead = read(&dlq).await?;
    ensure!(
        dead.iter().all(|r| r.header("shardline.reason").is_some()),
        "on_failure records carry their reason: {:?}",
        dead.iter().map(|r| &r.headers).collect::<Vec<_>>()
    );
    Ok(())
}

/// A mapping whose topic does not exist yet: the coordinator and a worker
/// run, the topic is created and 500 records are produced at once, then
/// 100 more a few seconds later. Every one is processed: partitions that
/// appear after their mapping was created start at the earliest offset,
/// whatever `starting_position` (here the default, `latest`) says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_after_its_mapping_is_read_from_its_first_record() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (topic, receipts) = (unique("late"), unique("receipts"));
    create_topic(&receipts, 1).await?;
    let dir = tempfile::tempdir()?;
    let config = CoordinatorConfig { streams: vec![StreamConfig::new(&topic, "forward")], ..timings() };
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let _w = start_worker_config(&c.url, "w", hosting("forward", &[("topic", &receipts)]))?;
    eventually(Duration::from_secs(20), "the worker to join", || async {
        Ok(c.workers().await?.iter().any(|w| w.worker_id == "w").then_some(()))
    })
    .await?;
    // Discovery (every 500 ms) must have looked for the topic in vain a few
    // times; nothing observable says it did, so this is a duration.
    tokio::time::sleep(Duration::from_secs(2)).await;

    create_topic(&topic, 2).await?;
    let p = producer()?;
    produce(&p, &topic, 0, 500, 10).await?;
    // The next records come once the first ones were read.
    eventually(Duration::from_secs(60), "the first 500 checkpointed", || async {
        let done: i64 = checkpoints(&c, &topic).await?.into_iter().flatten().sum();
        ensure!(done >= 500, "checkpoints add up to {done}");
        Ok(Some(()))
    })
    .await?;
    produce(&p, &topic, 500, 600, 10).await?;
    let processed = eventually(Duration::from_secs(60), "600 receipts", || async {
        let got = read(&receipts).await?;
        let ids: std::collections::BTreeSet<String> = got.iter().map(|r| r.value.clone()).collect();
        ensure!(ids.len() >= 600, "{} distinct records processed so far", ids.len());
        Ok(Some(ids))
    })
    .await
    .context("records produced right after the topic was created were skipped")?;
    for i in 0..600 {
        ensure!(processed.contains(&format!("id-{i}")), "id-{i} was never processed");
    }
    Ok(())
}
