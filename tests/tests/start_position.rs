//! `starting_position = "at_timestamp"` with a time after every record of
//! a shard: the shard starts at the end of its log, as Kafka's answer to
//! `offsets_for_times` (-1: no record at or after the time) means. tansu
//! 0.6.0 answers offset 0 instead, which would rewind the shard to its
//! first record; the worker checks the record the broker names.
//!
//! Real coordinator and worker binaries, real Kafka (tansu).

mod support;

use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Result, ensure};
use shardline_proto::StartingPosition;
use shardline_testkit::config;
use shardline_tests::kafka::read_topic;
use shardline_tests::{Coordinator, StreamConfig, eventually, start_worker_config};

/// 2026-01-01T00:00:00Z in Unix ms: the first old record's timestamp.
const BASE: i64 = 1_767_225_600_000;

/// The shard's checkpoint once a worker owns it.
async fn owned_checkpoint(c: &Coordinator, topic: &str) -> Result<Option<i64>> {
    let leases = c.leases_of(topic).await?;
    Ok(leases.first().and_then(|l| l.checkpoint.filter(|_| !l.owner.is_empty())))
}

/// Ten records stamped a second apart from [`BASE`], a stream starting an
/// hour after the newest of them (still in the past): the lease pins the
/// end of the log (10) as its start, nothing is processed until a new
/// record arrives, and then only that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_timestamp_after_every_record_starts_at_the_end_of_the_log() -> Result<()> {
    let (topic, receipts) = support::topics("at-ts-end", 1).await?;
    let old = (0..10).map(|i| ("k".to_owned(), format!("old-{i}"), Some(BASE + i * 1000)));
    support::produce_rows(&topic, Some(0), old).await?;

    let dir = tempfile::tempdir()?;
    let mut config = support::timings();
    config.streams = vec![StreamConfig {
        starting_position: StartingPosition::AtTimestamp,
        // An hour after the newest old record, still in the past.
        starting_timestamp: Some(UNIX_EPOCH + Duration::from_millis(BASE as u64 + 3_600_000)),
        ..StreamConfig::new(&topic, "forward")
    }];
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let mut worker = start_worker_config(&c.url, "a", config::hosting("forward", &[("topic", &receipts)]))?;
    // The resolved start is checkpointed before the first batch runs.
    let pinned = eventually(Duration::from_secs(30), "the shard to start and pin its start", || async {
        owned_checkpoint(&c, &topic).await
    })
    .await?;
    ensure!(pinned == 10, "the shard started at offset {pinned}, want 10 (the end of the log)");

    support::produce_rows(&topic, Some(0), [("k".to_owned(), "new".to_owned(), None)]).await?;
    eventually(Duration::from_secs(30), "the checkpoint past the new record", || async {
        Ok((owned_checkpoint(&c, &topic).await? == Some(11)).then_some(()))
    })
    .await?;
    let read = receipts.clone();
    let got = tokio::task::spawn_blocking(move || read_topic(&read, Duration::from_secs(30))).await??;
    let processed: Vec<String> = got.into_iter().map(|r| r.value).collect();
    ensure!(processed == ["new"], "the worker processed {processed:?}, want only the new record");
    ensure!(worker.child_running(), "the worker died");
    Ok(())
}
