//! The window-counts example (`examples/window-counts`) on real tansu and
//! the real coordinator: two partitions of records with known timestamps
//! over six 10 s tumbling windows each; the worker holding a window that is
//! open with state is `kill -9`ed mid-window, and a worker that joins later
//! takes a lease over in a graceful handoff. The counts written at each
//! window's final invocation must equal counts computed here from the
//! records produced: every record counted once, in its window. A final
//! invocation that ran again after a crash writes the same counts again;
//! every copy must agree.

mod support;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use shardline_proto::v1;
use shardline_testkit::config;
use shardline_tests::{
    Coordinator, CoordinatorConfig, WorkerConfig, create_topic, eventually, kafka_brokers, unique,
};

const PARTITIONS: i32 = 2;
const WINDOW_MS: i64 = 10_000;
/// 2026-01-01T00:00:00Z: windows start on it.
const BASE: i64 = 1_767_225_600_000;
/// Records per partition, 100 ms apart: six windows of 100 records.
const PER_PARTITION: i64 = 600;
const KEYS: u64 = 7;

/// The key of record `i` of `partition` (splitmix-style, fixed).
fn key(partition: i32, i: i64) -> String {
    let mut z = (partition as u64) << 32 | i as u64;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    format!("k{}", (z ^ (z >> 31)) % KEYS)
}

/// (partition, window start, key) → count.
type Counts = BTreeMap<(i32, i64, String), u64>;

fn worker(dir: &std::path::Path, coordinator: &str, id: &str, out: &str) -> Result<shardline_tests::Proc> {
    // Slow batches, so the faults land inside windows.
    let config = WorkerConfig {
        coordinator: coordinator.to_owned(),
        kafka_brokers: kafka_brokers(),
        worker_id: Some(id.to_owned()),
        ..config::hosting("window-counts", &[("topic", out), ("work_per_batch", "60ms")])
    };
    let path = support::config_file(dir, &format!("worker-{id}"), &config)?;
    support::spawn("window-counts", &["--config", &path], &[], Stdio::null())
}

async fn shards(c: &Coordinator, topic: &str) -> Result<Vec<v1::ShardCheckpoint>> {
    let req = v1::ListCheckpointsRequest { stream: topic.to_owned() };
    Ok(c.admin().await?.list_checkpoints(req).await?.into_inner().shards)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_counts_equal_the_source_after_kill_9_and_a_handoff_mid_window() -> Result<()> {
    let (topic, out) = (unique("clicks"), unique("counts"));
    create_topic(&topic, PARTITIONS).await?;
    create_topic(&out, 1).await?;
    let mut expected = Counts::new();
    for p in 0..PARTITIONS {
        let rows: Vec<support::Row> = (0..PER_PARTITION)
            .map(|i| {
                let ts = BASE + i * 100;
                *expected.entry((p, ts - ts.rem_euclid(WINDOW_MS), key(p, i))).or_default() += 1;
                (key(p, i), format!("click {i}"), Some(ts))
            })
            .collect();
        support::produce_rows(&topic, Some(p), rows).await?;
    }

    let dir = tempfile::tempdir()?;
    let mut stream = support::from_start(&topic, "window-counts");
    stream.tumbling_window = Duration::from_millis(WINDOW_MS as u64);
    stream.window_grace = Duration::from_secs(1);
    stream.settings.batch_size = 10;
    let config = CoordinatorConfig { streams: vec![stream], ..support::timings() };
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let mut a = worker(dir.path(), &c.url, "a", &out)?;
    let mut b = worker(dir.path(), &c.url, "b", &out)?;

    // A window open with state on a shard: its owner dies mid-window.
    let (victim, lease) = eventually(Duration::from_secs(60), "a shard mid-window with state", || async {
        let open = shards(&c, &topic).await?.into_iter().find_map(|s| {
            let w = s.window.as_ref()?;
            let l = s.lease.as_ref()?;
            (!w.closed && w.state_bytes > 0 && !l.owner.is_empty())
                .then(|| (l.owner.clone(), l.lease.clone()))
        });
        Ok(open)
    })
    .await?;
    match victim.as_str() {
        "a" => a.kill9()?,
        _ => b.kill9()?,
    }
    eprintln!("windows: killed {victim} (-9) holding {lease:?} mid-window");
    // A third worker joins: a lease moves to it by a graceful handoff.
    let _c3 = worker(dir.path(), &c.url, "c", &out)?;
    eventually(Duration::from_secs(60), "the new worker to take a lease over", || async {
        let leases = c.leases_of(&topic).await?;
        Ok(leases.iter().any(|l| l.owner == "c").then_some(()))
    })
    .await?;

    // Done: every shard at its end, its last window closed (idle past its end).
    eventually(Duration::from_secs(180), "every window closed at the end of each partition", || async {
        let s = shards(&c, &topic).await?;
        let done = s.len() == PARTITIONS as usize
            && s.iter().all(|s| {
                s.lease.as_ref().and_then(|l| l.checkpoint) == Some(PER_PARTITION)
                    && s.window.as_ref().is_some_and(|w| w.closed && w.start_ms == BASE + 5 * WINDOW_MS)
            });
        Ok(done.then_some(()))
    })
    .await?;

    let written = shardline_tests::kafka::read_topic(&out, Duration::from_secs(60))?;
    let mut got = Counts::new();
    let mut copies = 0;
    for r in &written {
        let row: Value = serde_json::from_str(&r.value).with_context(|| format!("a count: {}", r.value))?;
        let at = (
            i32::try_from(row["partition"].as_i64().context("partition")?)?,
            row["window_start"].as_i64().context("window_start")?,
            row["key"].as_str().context("key")?.to_owned(),
        );
        ensure!(row["window_end"].as_i64() == Some(at.1 + WINDOW_MS), "a window of 10 s: {row}");
        let count = row["count"].as_u64().context("count")?;
        if let Some(earlier) = got.insert(at.clone(), count) {
            copies += 1;
            ensure!(earlier == count, "{at:?} written twice with different counts: {earlier} and {count}");
        }
    }
    eprintln!(
        "windows: {} counts written ({copies} repeated by a final invocation run again), {} expected",
        written.len(),
        expected.len()
    );
    let differ: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), *v, got.get(k).copied()))
        .take(10)
        .collect();
    ensure!(differ.is_empty(), "counts that differ (window, expected, written): {differ:?}");
    ensure!(got.len() == expected.len(), "{} counts written, {} expected", got.len(), expected.len());
    Ok(())
}
