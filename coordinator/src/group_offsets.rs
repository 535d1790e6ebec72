//! Kafka-native lag: each stream's durable checkpoints are committed, every
//! `consumer_group_commit_interval`, as the committed offsets of a Kafka
//! consumer group (`consumer_group`, by default `shardline.<stream>`), so
//! `kafka-consumer-groups`, Burrow, Kafka UIs and KEDA's Kafka scaler see
//! shardline's lag without knowing shardline.
//!
//! The offsets come from [`Command::DurableCheckpoints`], answered only once
//! the store has made them durable: a committed offset is never ahead of
//! what a restarted coordinator resumes from. The mirror is one-way and
//! best effort: a failed commit is logged and counted, retried next round,
//! and never touches the lease table. Only changed offsets are sent (all of
//! them again after a failure, and at the start of each term).
//!
//! The commits are those of a "simple" consumer (no group membership,
//! generation -1), which Kafka accepts for a group with no active members;
//! a group that real consumers have joined refuses them, which the error
//! names.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use shardline_proto::LeaseId;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::service::{Command, Handle};

/// One stream's group and the offsets last committed to it.
struct Mirror {
    group: String,
    client: Option<Arc<BaseConsumer>>,
    committed: HashMap<u32, i64>,
}

/// Commits the streams' durable checkpoints to their consumer groups until
/// `shutdown` (or until the loop behind `handle` closes).
pub async fn run(config: Arc<Config>, handle: Handle, shutdown: CancellationToken) {
    let mut mirrors: BTreeMap<String, Mirror> = config
        .streams
        .iter()
        .filter_map(|s| {
            let group = s.mirror_group()?;
            metrics::counter!("shardline_consumer_group_commit_errors_total", "stream" => s.name.clone())
                .increment(0);
            Some((s.name.clone(), Mirror { group, client: None, committed: HashMap::new() }))
        })
        .collect();
    if mirrors.is_empty() {
        return;
    }
    let mut interval = tokio::time::interval(config.consumer_group_commit_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        let checkpoints = tokio::select! {
            () = shutdown.cancelled() => return,
            answer = handle.call(Command::DurableCheckpoints) => match answer {
                Ok(c) => c,
                Err(_) => return,
            },
        };
        let by_stream = changed(&mirrors, checkpoints);
        for (stream, offsets) in by_stream {
            let Some(mirror) = mirrors.get_mut(&stream) else { continue };
            let timeout = config.consumer_group_commit_interval.max(Duration::from_secs(5));
            match commit(&config, &stream, mirror, &offsets, timeout).await {
                Ok(()) => {
                    metrics::counter!("shardline_consumer_group_commits_total", "stream" => stream.clone())
                        .increment(offsets.len() as u64);
                    mirror.committed.extend(offsets);
                }
                Err(e) => {
                    metrics::counter!("shardline_consumer_group_commit_errors_total", "stream" => stream.clone())
                        .increment(1);
                    tracing::warn!(%stream, group = %mirror.group, error = %e,
                        "could not commit checkpoints to the Kafka consumer group; retrying next round");
                    // Unknown what reached the broker: send every offset again.
                    mirror.committed.clear();
                }
            }
        }
    }
}

/// The offsets that differ from the last ones committed, per mirrored stream.
fn changed(mirrors: &BTreeMap<String, Mirror>, checkpoints: Vec<(LeaseId, i64)>) -> BTreeMap<String, Vec<(u32, i64)>> {
    let mut out: BTreeMap<String, Vec<(u32, i64)>> = BTreeMap::new();
    for (lease, offset) in checkpoints {
        let Some(mirror) = mirrors.get(&lease.name) else { continue };
        if mirror.committed.get(&lease.index) != Some(&offset) {
            out.entry(lease.name).or_default().push((lease.index, offset));
        }
    }
    out
}

/// One synchronous commit of `offsets` to the stream's group, on the
/// blocking pool (librdkafka blocks until the group coordinator answers).
async fn commit(
    config: &Config,
    stream: &str,
    mirror: &mut Mirror,
    offsets: &[(u32, i64)],
    timeout: Duration,
) -> Result<(), String> {
    let client = match &mirror.client {
        Some(c) => c.clone(),
        None => {
            let mut c = config.kafka.client_config(&config.kafka_brokers).map_err(|e| e.to_string())?;
            c.set("group.id", &mirror.group)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("allow.auto.create.topics", "false")
                .set("socket.timeout.ms", timeout.as_millis().to_string());
            let client = Arc::new(c.create::<BaseConsumer>().map_err(|e| e.to_string())?);
            mirror.client = Some(client.clone());
            client
        }
    };
    let mut list = TopicPartitionList::new();
    for &(partition, offset) in offsets {
        let partition = i32::try_from(partition).map_err(|_| format!("partition {partition} is out of Kafka's range"))?;
        list.add_partition_offset(stream, partition, Offset::Offset(offset)).map_err(|e| e.to_string())?;
    }
    tokio::task::spawn_blocking(move || client.commit(&list, CommitMode::Sync))
        .await
        .map_err(|e| format!("the commit task failed: {e}"))?
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(committed: &[(u32, i64)]) -> Mirror {
        Mirror { group: "g".into(), client: None, committed: committed.iter().copied().collect() }
    }

    #[test]
    fn only_changed_offsets_of_mirrored_streams_are_sent() {
        let mirrors = BTreeMap::from([("a".to_owned(), mirror(&[(0, 10), (1, 5)]))]);
        let got = changed(
            &mirrors,
            vec![
                (LeaseId::shard("a", 0), 10),
                (LeaseId::shard("a", 1), 7),
                (LeaseId::shard("a", 2), 1),
                (LeaseId::shard("not-mirrored", 0), 3),
            ],
        );
        assert_eq!(got, BTreeMap::from([("a".to_owned(), vec![(1, 7), (2, 1)])]));
    }
}
