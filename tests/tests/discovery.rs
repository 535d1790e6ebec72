//! Discovery from the real broker (tansu on 127.0.0.1:9092).
//!
//! In its own test binary on purpose: tansu 0.6.0 has no CreatePartitions,
//! so growing a topic means deleting and re-creating it, and its
//! DeleteTopics removes *every* topic of the cluster, and a fetch from a
//! deleted topic panics its storage layer. Cargo runs test binaries one at
//! a time, so no other test is fetching while this one re-creates its topic.

use std::time::Duration;

use anyhow::{Result, ensure};
use shardline_proto::{LeaseId, v1};
use shardline_tests::{Coordinator, add_partitions, create_topic, eventually, unique};

fn id(info: &v1::LeaseInfo) -> Result<LeaseId> {
    LeaseId::try_from(info.lease.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// An 8-partition topic becomes 8 leases on a worker, and a partition added
/// while running gets a lease too. The worker is a gRPC client that only
/// holds leases: nothing fetches from the topic while it is re-created.
#[tokio::test]
async fn discovers_partitions_from_kafka_including_ones_added_while_running() -> Result<()> {
    let topic = unique("disc");
    create_topic(&topic, 8).await?;
    let dir = tempfile::tempdir()?;
    let config =
        format!("discovery_interval = \"300ms\"\n[[streams]]\nname = \"{topic}\"\nhandler = \"noop\"\n");
    let c = Coordinator::start(&config, &dir.path().join("data"))?;
    let mut api = c.worker_api().await?;
    api.register(v1::RegisterRequest {
        worker_id: "w1".into(),
        handlers: vec!["noop".into()],
        ..Default::default()
    })
    .await?;
    let heartbeats = tokio::spawn(async move {
        loop {
            let request = v1::HeartbeatRequest { worker_id: "w1".into(), load: None, ..Default::default() };
            if api.heartbeat(request).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    eventually(Duration::from_secs(20), "8 owned leases", || async {
        let l = c.leases().await?;
        Ok((l.len() == 8 && l.iter().all(|l| l.owner == "w1")).then_some(()))
    })
    .await?;

    add_partitions(&topic, 9).await?;
    let found = eventually(Duration::from_secs(20), "the 9th partition's lease", || async {
        let l = c.leases().await?;
        let ninth = l.iter().find(|l| id(l).is_ok_and(|i| i == LeaseId::shard(&topic, 8))).cloned();
        Ok(ninth.filter(|n| n.owner == "w1"))
    })
    .await?;
    ensure!(found.epoch == 1, "a new lease starts at epoch 1: {found:?}");
    heartbeats.abort();
    Ok(())
}
