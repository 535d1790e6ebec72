//! Kafka-native lag: the coordinator commits each stream's durable
//! checkpoints as a Kafka consumer group's offsets, so Kafka's own tools
//! see shardline's progress. Read back through a plain Kafka client (a
//! consumer of the group that never joins it), the committed offsets equal
//! the coordinator's checkpoints after a run; a stream with
//! `mirror_offsets = false` commits nothing.
//!
//! Real coordinator and worker binaries, real Kafka (tansu).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use shardline_testkit::config;
use shardline_tests::kafka::{produce, producer};
use shardline_tests::{Coordinator, StreamConfig, eventually, kafka_brokers, start_worker_config};

const PARTITIONS: i32 = 3;
const RECORDS: u64 = 300;

/// The offsets `group` has committed for `topic`'s partitions (`None`
/// where it has committed nothing), as any Kafka client reads them.
fn committed(group: &str, topic: &str) -> Result<BTreeMap<i32, Option<i64>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .context("kafka consumer")?;
    let mut list = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        list.add_partition(topic, p);
    }
    let got = consumer.committed_offsets(list, Duration::from_secs(10)).context("committed offsets")?;
    Ok(got
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.partition(), offset)
        })
        .collect())
}

/// The coordinator's checkpoint of each of `topic`'s shards.
async fn checkpoints(c: &Coordinator, topic: &str) -> Result<BTreeMap<i32, Option<i64>>> {
    let leases = c.leases_of(topic).await?;
    Ok(leases
        .iter()
        .filter_map(|l| {
            let index = i32::try_from(l.lease.as_ref()?.index).ok()?;
            Some((index, l.checkpoint))
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_of_the_group_equal_the_coordinators_checkpoints() -> Result<()> {
    let (mirrored, _) = support::topics("group-mirrored", PARTITIONS).await?;
    let (private, _) = support::topics("group-private", PARTITIONS).await?;
    let group = shardline_tests::unique("tools-group");
    let producer = producer()?;
    produce(&producer, &mirrored, 0, RECORDS, 30).await?;
    produce(&producer, &private, 0, RECORDS, 30).await?;

    let dir = tempfile::tempdir()?;
    let mut config = support::timings();
    config.consumer_group_commit_interval = Duration::from_millis(200);
    config.streams = vec![
        StreamConfig { consumer_group: Some(group.clone()), ..support::from_start(&mirrored, "noop") },
        StreamConfig { mirror_offsets: false, ..support::from_start(&private, "noop") },
    ];
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let mut worker = start_worker_config(&c.url, "a", config::hosting("noop", &[] as &[(&str, &str)]))?;

    // Every record processed: the checkpoints add up to what was produced.
    let done = eventually(Duration::from_secs(60), "every record checkpointed", || async {
        let cps = checkpoints(&c, &mirrored).await?;
        let sum: i64 = cps.values().map(|c| c.unwrap_or(0)).sum();
        Ok((cps.len() == PARTITIONS as usize && sum == RECORDS as i64).then_some(cps))
    })
    .await?;

    let topic = mirrored.clone();
    let group_name = group.clone();
    let want = done.clone();
    eventually(Duration::from_secs(30), "the group's committed offsets to equal the checkpoints", || {
        let (topic, group, want) = (topic.clone(), group_name.clone(), want.clone());
        async move {
            let got = tokio::task::spawn_blocking(move || committed(&group, &topic)).await??;
            Ok((got == want).then_some(()))
        }
    })
    .await?;

    // The default group of the stream that opted out has nothing.
    let default_group = format!("shardline.{private}");
    let topic = private.clone();
    let got = tokio::task::spawn_blocking(move || committed(&default_group, &topic)).await??;
    ensure!(got.values().all(Option::is_none), "a stream with mirror_offsets = false committed {got:?}");
    // Nor did the mirrored stream's default group: its group was named.
    let topic = mirrored.clone();
    let unnamed = format!("shardline.{mirrored}");
    let got = tokio::task::spawn_blocking(move || committed(&unnamed, &topic)).await??;
    ensure!(got.values().all(Option::is_none), "the default group was used despite consumer_group: {got:?}");
    ensure!(worker.child_running(), "the worker died");
    Ok(())
}
