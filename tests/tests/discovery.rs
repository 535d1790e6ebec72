//! Discovery from the real broker (tansu on 127.0.0.1:9092).
//!
//! In its own test binary on purpose: tansu 0.6.0 has no CreatePartitions,
//! so growing a topic means deleting and re-creating it, and its
//! DeleteTopics removes *every* topic of the cluster, and a fetch from a
//! deleted topic panics its storage layer. Cargo runs test binaries one at
//! a time, so no other test is fetching while this one re-creates its topic;
//! it holds [`broker_outage`] so no other outage overlaps it.

use std::time::Duration;

use anyhow::{Result, ensure};
use shardline_proto::{LeaseId, v1};
use shardline_tests::serial::broker_outage;
use shardline_tests::{
    Coordinator, CoordinatorConfig, StreamConfig, add_partitions, create_topic, eventually, unique,
};

fn id(info: &v1::LeaseInfo) -> Result<LeaseId> {
    LeaseId::try_from(info.lease.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// An 8-partition topic becomes 8 leases on a worker, and a partition added
/// while running gets a lease too. The worker is a gRPC client that only
/// holds leases: nothing fetches from the topic while it is re-created.
#[tokio::test]
async fn discovers_partitions_from_kafka_including_ones_added_while_running() -> Result<()> {
    let _outage = broker_outage().await?;
    let topic = unique("disc");
    create_topic(&topic, 8).await?;
    let dir = tempfile::tempdir()?;
    let config = CoordinatorConfig {
        discovery_interval: Duration::from_millis(300),
        streams: vec![StreamConfig::new(&topic, "noop")],
        ..CoordinatorConfig::default()
    };
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let mut api = c.worker_api().await?;
    let reply = api
        .register(v1::RegisterRequest {
            worker_id: "w1".into(),
            handlers: vec!["noop".into()],
            ..Default::default()
        })
        .await?
        .into_inner();
    // It runs what it is told, and says so in every heartbeat (the
    // coordinator takes back leases a worker does not report running).
    let mut held = std::collections::BTreeMap::new();
    follow(&mut held, reply.instructions);
    let heartbeats = tokio::spawn(async move {
        loop {
            let request = v1::HeartbeatRequest {
                worker_id: "w1".into(),
                held: held
                    .iter()
                    .map(|(l, e): (&(String, u32), &u64)| v1::HeldLease {
                        lease: Some(v1::LeaseId {
                            kind: v1::LeaseKind::Shard as i32,
                            name: l.0.clone(),
                            index: l.1,
                        }),
                        epoch: *e,
                    })
                    .collect(),
                ..Default::default()
            };
            match api.heartbeat(request).await {
                Ok(reply) => follow(&mut held, reply.into_inner().instructions),
                Err(_) => return,
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

/// Applies instructions to the set of (stream, partition) → epoch a worker
/// runs.
fn follow(held: &mut std::collections::BTreeMap<(String, u32), u64>, instructions: Vec<v1::Instruction>) {
    use v1::instruction::Kind;
    for i in instructions {
        match i.kind {
            Some(Kind::Acquire(a)) => {
                if let Some(l) = a.lease {
                    held.insert((l.name, l.index), a.epoch);
                }
            }
            Some(
                Kind::Release(v1::Release { lease: Some(l), .. })
                | Kind::Revoke(v1::Revoke { lease: Some(l), .. }),
            ) => {
                held.remove(&(l.name, l.index));
            }
            _ => {}
        }
    }
}
