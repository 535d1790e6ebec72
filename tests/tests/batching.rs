//! Batch limits and the fate of a failing record, observed from outside:
//! the `chaos` handler forwards every record of a successful batch to a
//! receipts topic with the batch's invocation time, so the receipts tell
//! which records ran together and when (see `support::invocations`).
//!
//! - `max_batch_bytes`: no batch has more key + value bytes than the limit,
//!   except a record larger than the limit, which runs alone.
//! - `max_inflight_batches`: over all leases of a worker (Kafka shards and
//!   RabbitMQ queue slots), never more batches in the handler at once.
//! - No `on_failure`: a record that keeps failing is discarded after its
//!   retries, counted in `shardline_records_discarded_total`, and the
//!   checkpoint moves past it.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use shardline_testkit::config::{self, Backoff};
use shardline_tests::amqp::{depth, publish_ids, publisher};
use shardline_tests::kafka::{Consumed, produce, producer, read_topic};
use shardline_tests::{
    Coordinator, CoordinatorConfig, WorkerConfig, eventually, free_port, scrape, start_worker_config,
};
use support::{Topology, from_start, invocations, peak_overlap, produce_rows, timings, topics};

/// Every record of `topic` once `want` have arrived.
async fn receipts(topic: &str, want: usize) -> Result<Vec<Consumed>> {
    let read =
        |topic: String| tokio::task::spawn_blocking(move || read_topic(&topic, Duration::from_secs(30)));
    eventually(Duration::from_secs(40), &format!("{want} receipts in {topic}"), || async {
        let got = read(topic.to_owned()).await??;
        Ok((got.len() >= want).then_some(got))
    })
    .await
}

/// 30 records of 300 bytes (key + value) with one of 2000 bytes at offset
/// 12, under `max_batch_bytes = 1024` and a 1 s window (so a batch is cut
/// by bytes, not by time): batches of three 300-byte records (a fourth
/// would make 1200), the big record alone, every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_batch_passes_max_batch_bytes_and_a_larger_record_runs_alone() -> Result<()> {
    let (topic, receipts_topic) = topics("bytes", 1).await?;
    let width = |offset| if offset == 12 { 1999 } else { 299 };
    let rows = (0..31).map(|o| ("k".to_owned(), format!("{o:0>w$}", w = width(o)), None));
    produce_rows(&topic, None, rows).await?;
    let dir = tempfile::tempdir()?;
    let mut stream = from_start(&topic, "chaos");
    stream.settings.batch_size = 100;
    stream.settings.max_batch_bytes = 1024;
    stream.settings.batch_window = Duration::from_secs(1);
    let c = Coordinator::start_config(
        CoordinatorConfig { streams: vec![stream], ..timings() },
        &dir.path().join("data"),
    )?;
    let chaos = config::hosting("chaos", &[("topic", receipts_topic.as_str()), ("sleep_per_batch", "20ms")]);
    let _w = start_worker_config(&c.url, "a", chaos)?;
    let got = receipts(&receipts_topic, 31).await?;
    let all = invocations(&got, Duration::from_millis(20))?;
    for b in all.iter().filter(|b| b.offsets.len() > 1) {
        ensure!(b.bytes <= 1024, "a batch of {} bytes under max_batch_bytes = 1024: {b:?}", b.bytes);
    }
    let batches: Vec<Vec<i64>> = all.into_iter().map(|b| b.offsets).collect();
    let mut want: Vec<Vec<i64>> = (0..12).collect::<Vec<i64>>().chunks(3).map(<[i64]>::to_vec).collect();
    want.push(vec![12]);
    want.extend((13..31).collect::<Vec<i64>>().chunks(3).map(<[i64]>::to_vec));
    ensure!(batches == want, "batches (offsets) {batches:?}, want {want:?}");
    Ok(())
}

/// A worker with `max_inflight_batches = 2` holds two Kafka shards and
/// two RabbitMQ queue slots, each with a backlog; every batch takes 300 ms.
/// At no moment do more than two batches run, and two do run at once (the
/// limit is reached, so the test would see a third).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_inflight_batches_bounds_batches_in_handlers_across_leases() -> Result<()> {
    let (topic, receipts_topic) = topics("inflight", 2).await?;
    produce(&producer()?, &topic, 0, 20, 20).await?;
    let t = Topology::new(1, 1);
    let dir = tempfile::tempdir()?;
    let mut config = t.config("chaos");
    let subscription = &mut config.subscriptions[0];
    (subscription.settings.batch_size, subscription.min_slots, subscription.max_concurrency) = (5, 2, 2);
    config.streams = vec![from_start(&topic, "chaos")];
    config.streams[0].settings.batch_size = 5;
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    eventually(Duration::from_secs(20), "the subscription queue", || async {
        Ok(depth(&t.subscriptions[0]).await.is_ok().then_some(()))
    })
    .await?;
    publish_ids(&publisher(), &t.exchanges[0], 100, 120).await?;
    let chaos = config::hosting("chaos", &[("topic", receipts_topic.as_str()), ("sleep_per_batch", "300ms")]);
    let _w = start_worker_config(&c.url, "a", WorkerConfig { max_inflight_batches: 2, ..chaos })?;
    let got = receipts(&receipts_topic, 40).await?;
    let all = invocations(&got, Duration::from_millis(300))?;
    let leases: BTreeSet<(&str, u32)> = all.iter().map(|b| (b.stream.as_str(), b.partition)).collect();
    ensure!(leases.len() == 4, "batches ran on {leases:?}, want 2 shards and 2 slots");
    let peak = peak_overlap(&all);
    eprintln!("{} batches on {leases:?}, at most {peak} at once", all.len());
    ensure!(peak <= 2, "{peak} batches ran at once under max_inflight_batches = 2: {all:#?}");
    ensure!(peak == 2, "never 2 batches at once: the limit was not reached, so the test shows nothing");
    Ok(())
}

/// Without `on_failure`, a poison record fails through its retries (bisect
/// isolates it, `max_retries = 1`), is discarded and counted as
/// `shardline_records_discarded_total{reason="retries_exhausted"}` = 1; the
/// other nine are processed once and the checkpoint reaches the end of the
/// partition, past the discarded record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_on_failure_a_failing_record_is_discarded_counted_and_passed() -> Result<()> {
    let (topic, receipts_topic) = topics("discard", 1).await?;
    let value = |i| if i == 4 { "id-4-poison".to_owned() } else { format!("id-{i}") };
    produce_rows(&topic, None, (0..10).map(|i| ("k".to_owned(), value(i), None))).await?;
    let dir = tempfile::tempdir()?;
    let mut stream = from_start(&topic, "chaos");
    let s = &mut stream.settings;
    (s.batch_size, s.max_retries, s.bisect_on_error) = (10, Some(1), true);
    let ms = Duration::from_millis;
    s.retry_backoff = Backoff { initial: ms(10), max: ms(50), multiplier: 2.0, jitter: false };
    let c = Coordinator::start_config(
        CoordinatorConfig { streams: vec![stream], ..timings() },
        &dir.path().join("data"),
    )?;
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let chaos = config::hosting("chaos", &[("topic", receipts_topic.as_str()), ("poison", "poison")]);
    let _w = start_worker_config(&c.url, "a", WorkerConfig { metrics_listen: Some(metrics), ..chaos })?;
    let metrics = metrics.to_string();
    eventually(Duration::from_secs(30), "the checkpoint past the poison record, at 10", || async {
        Ok((c.leases_of(&topic).await?.first().and_then(|l| l.checkpoint) == Some(10)).then_some(()))
    })
    .await?;
    let discarded =
        scrape(&metrics, "shardline_records_discarded_total{reason=\"retries_exhausted\"}").await?;
    ensure!(
        discarded == 1.0,
        "shardline_records_discarded_total{{reason=\"retries_exhausted\"}} is {discarded}, want 1"
    );
    let mut values: Vec<String> = receipts(&receipts_topic, 9).await?.into_iter().map(|r| r.value).collect();
    values.sort_unstable();
    let mut want: Vec<String> = (0..10).filter(|i| *i != 4).map(|i| format!("id-{i}")).collect();
    want.sort_unstable();
    ensure!(values == want, "processed {values:?}, want every record but the poison one, once");
    Ok(())
}
