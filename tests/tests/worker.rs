//! Black-box tests of workers processing Kafka shards: real coordinator and
//! worker binaries, real Kafka (tansu), the `forward` handler writing a
//! receipt per processed record to a one-partition receipts topic.

use std::time::Duration;

use anyhow::{Result, ensure};
use shardline_tests::kafka::{produce, producer, read_receipts, verify};
use shardline_tests::{Coordinator, create_topic, start_worker_with, unique};

fn forward(receipts: &str) -> String {
    format!("[handlers.forward]\ntopic = \"{receipts}\"\n")
}

fn coordinator_config(topic: &str) -> String {
    format!(
        "heartbeat_interval = \"300ms\"\nsession_timeout = \"3s\"\ndiscovery_interval = \"500ms\"\n\
         [[streams]]\nname = \"{topic}\"\nhandler = \"forward\"\nstarting_position = \"trim_horizon\"\n\
         batch_size = 500\n"
    )
}

/// 8 partitions, 2 workers, 20,000 keyed records: all processed, none
/// twice, order kept per partition.
#[tokio::test]
async fn two_workers_process_every_record_once_in_partition_order() -> Result<()> {
    let (topic, receipts) = (unique("orders"), unique("receipts"));
    create_topic(&topic, 8).await?;
    create_topic(&receipts, 1).await?;
    let n = 20_000;
    produce(&producer()?, &topic, 0, n, 500).await?;

    let dir = tempfile::tempdir()?;
    let c = Coordinator::start(&coordinator_config(&topic), &dir.path().join("data"))?;
    let _a = start_worker_with(&c.url, "a", &forward(&receipts))?;
    let _b = start_worker_with(&c.url, "b", &forward(&receipts))?;

    let got = read_receipts(&receipts, n as usize, Duration::from_secs(2), Duration::from_secs(90))?;
    let v = verify(&got, n);
    eprintln!("receipts: {} unique, {} duplicates, {} lost", v.unique, v.duplicates, v.lost.len());
    ensure!(v.lost.is_empty(), "lost {} records, e.g. {:?}", v.lost.len(), &v.lost[..v.lost.len().min(10)]);
    ensure!(v.duplicates == 0, "{} duplicates", v.duplicates);
    ensure!(v.order_violations == 0, "{} order violations", v.order_violations);
    let workers: std::collections::BTreeSet<&str> = got.iter().map(|r| r.worker.as_str()).collect();
    ensure!(workers.len() == 2, "both workers processed records: {workers:?}");
    Ok(())
}
