//! `shardline checkpoint set` and `checkpoint reset` with `--earliest`,
//! `--latest` and `--timestamp`, against a real coordinator and real tansu:
//! a two-partition topic holds records at known timestamps, so every
//! target has one right offset per partition, which the plan, the lease
//! table and (online) the owner's next records must show. Offline
//! (`--data-dir`), the same reset is written to the stopped coordinator's
//! store and found there when it starts again.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use shardline_testkit::config;
use shardline_tests::kafka::read_topic;
use shardline_tests::{
    Coordinator, CoordinatorConfig, StreamConfig, bin, eventually, kafka_brokers, start_worker_config,
};

/// 2026-01-01T00:00:00Z in Unix ms: the first record's timestamp.
const BASE: i64 = 1_767_225_600_000;

/// Record timestamps: partition 0 one a second (offsets 0..10), partition
/// 1 one every two seconds (offsets 0..6), so a time picks different
/// offsets on the two.
fn timestamps(partition: i32) -> Vec<i64> {
    match partition {
        0 => (0..10).map(|i| BASE + i * 1000).collect(),
        _ => (0..6).map(|i| BASE + i * 2000).collect(),
    }
}

/// Runs `shardline ARGS --json` and returns its JSON document; fails
/// unless it exits 0.
async fn cli(args: &[&str]) -> Result<Value> {
    let cmd = format!("shardline --json {}", args.join(" "));
    let out = tokio::process::Command::new(bin("shardline"))
        .arg("--json")
        .args(args)
        .env_remove("SHARDLINE_COORDINATOR")
        .env_remove("SHARDLINE_KAFKA_BROKERS")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out).await.context(cmd.clone())??;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "`{cmd}` exited {}\n{stdout}{stderr}", out.status);
    serde_json::from_str(&stdout).with_context(|| format!("`{cmd}` printed no JSON: {stdout}"))
}

/// `head` then `tail`, without empty strings (a flag without a value).
fn args<'a>(head: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
    head.iter().chain(tail).copied().filter(|a| !a.is_empty()).collect()
}

/// `--coordinator URL` or `--data-dir DIR`: where the CLI works.
enum At<'a> {
    Online(&'a Coordinator),
    Offline(&'a Path),
}

impl At<'_> {
    async fn run(&self, args: &[&str]) -> Result<Value> {
        let dir;
        let mut all = match self {
            At::Online(c) => vec!["--coordinator", c.url.as_str()],
            At::Offline(d) => {
                dir = d.display().to_string();
                vec!["--data-dir", dir.as_str()]
            }
        };
        all.extend_from_slice(args);
        cli(&all).await
    }

    /// `(checkpoint, epoch)` of every shard of `stream`, by partition.
    async fn shards(&self, stream: &str) -> Result<BTreeMap<u32, (Option<i64>, u64)>> {
        let doc = self.run(&["leases", "--stream", stream]).await?;
        let rows = doc.as_array().with_context(|| format!("leases: {doc}"))?;
        let mut shards = BTreeMap::new();
        for row in rows {
            let lease = row["lease"].as_str().with_context(|| format!("lease row {row}"))?;
            let partition = lease.rsplit_once('/').context("a lease without /")?.1.parse()?;
            let epoch = row["epoch"].as_u64().with_context(|| format!("lease row {row}"))?;
            shards.insert(partition, (row["checkpoint"].as_i64(), epoch));
        }
        Ok(shards)
    }

    /// Applies a `checkpoint set|reset` and checks that its plan moves each
    /// partition to `want` (in partition order) and the lease table then
    /// holds exactly that with every moved epoch one higher.
    async fn apply(&self, stream: &str, args: &[&str], want: &[(u32, i64)]) -> Result<()> {
        let before = self.shards(stream).await?;
        let mut all = args.to_vec();
        all.push("--yes");
        let plan = self.run(&all).await?;
        ensure!(plan["applied"] == Value::Bool(true), "`{}` not applied: {plan}", args.join(" "));
        let mut planned: Vec<(u32, i64)> = Vec::new();
        for change in plan["changes"].as_array().with_context(|| format!("plan {plan}"))? {
            let lease = change["lease"].as_str().with_context(|| format!("change {change}"))?;
            let partition = lease.rsplit_once('/').context("a lease without /")?.1.parse()?;
            planned.push((partition, change["to"].as_i64().with_context(|| format!("change {change}"))?));
        }
        planned.sort_unstable();
        ensure!(planned == want, "`{}` planned {planned:?}, want {want:?}", args.join(" "));
        let mut expected = before.clone();
        for (p, to) in want {
            let (_, epoch) = before.get(p).with_context(|| format!("no shard {p} in {before:?}"))?;
            expected.insert(*p, (Some(*to), epoch + 1));
        }
        let after = self.shards(stream).await?;
        ensure!(after == expected, "after `{}` the leases are {after:?}, want {expected:?}", args.join(" "));
        Ok(())
    }
}

/// Produces one record per timestamp to `partition`, values `p<P>-<offset>`.
async fn produce_at(topic: &str, partition: i32) -> Result<()> {
    let rows = timestamps(partition).into_iter().enumerate();
    support::produce_rows(
        topic,
        Some(partition),
        rows.map(|(i, ts)| ("k".into(), format!("p{partition}-{i}"), Some(ts))),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_and_reset_move_checkpoints_to_the_offsets_their_targets_name() -> Result<()> {
    let (topic, receipts) = support::topics("offsets", 2).await?;
    produce_at(&topic, 0).await?;
    produce_at(&topic, 1).await?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let config =
        CoordinatorConfig { streams: vec![StreamConfig::new(&topic, "forward")], ..support::timings() };
    let mut c = Coordinator::start_config(config.clone(), &data)?;
    eventually(Duration::from_secs(20), "2 leases discovered", || async {
        Ok((c.leases_of(&topic).await?.len() == 2).then_some(()))
    })
    .await?;
    let online = At::Online(&c);
    let (stream, p0, p1) = (topic.as_str(), format!("{topic}/0"), format!("{topic}/1"));
    let ms = |t: i64| t.to_string();

    // One shard: p0's records are at BASE + 0 s, 1 s, ... 9 s.
    for (target, to) in [
        (["--timestamp", &ms(BASE + 3001)], 4),
        (["--timestamp", "2026-01-01T00:00:07Z"], 7),
        (["--earliest", ""], 0),
        (["--latest", ""], 10),
        (["--timestamp", &ms(BASE + 3_600_000)], 10),
    ] {
        let args = args(&["checkpoint", "set", &p0], &target);
        online.apply(stream, &args, &[(0, to)]).await?;
    }

    // Every shard of the stream; p1's records are at BASE + 0 s, 2 s, ... 10 s.
    let reset = ["checkpoint", "reset", "--stream", stream];
    let before = online.shards(stream).await?;
    let plan = online.run(&args(&reset, &["--timestamp", &ms(BASE + 4500), "--dry-run"])).await?;
    ensure!(plan["applied"] == Value::Bool(false), "a dry run applied: {plan}");
    ensure!(online.shards(stream).await? == before, "a dry-run reset changed the leases");
    for (target, want) in [
        (["--timestamp", &ms(BASE - 1)], [(0, 0), (1, 0)]),
        (["--timestamp", &ms(BASE + 60_000)], [(0, 10), (1, 6)]),
        (["--latest", ""], [(0, 10), (1, 6)]),
        (["--earliest", ""], [(0, 0), (1, 0)]),
        (["--timestamp", &ms(BASE + 4500)], [(0, 5), (1, 3)]),
    ] {
        online.apply(stream, &args(&reset, &target), &want).await?;
    }

    // The owner starts where the reset put it: p0 from 5, p1 from 3.
    let mut worker = start_worker_config(&c.url, "a", config::hosting("forward", &[("topic", &receipts)]))?;
    eventually(Duration::from_secs(30), "checkpoints at the end of both partitions", || async {
        let now = online.shards(stream).await?;
        Ok(now.values().map(|(c, _)| *c).eq([Some(10), Some(6)]).then_some(()))
    })
    .await?;
    let read = receipts.clone();
    let got = tokio::task::spawn_blocking(move || read_topic(&read, Duration::from_secs(30))).await??;
    let mut processed: Vec<String> = got.into_iter().map(|r| r.value).collect();
    processed.sort_unstable();
    let mut want: Vec<String> =
        (5..10).map(|i| format!("p0-{i}")).chain((3..6).map(|i| format!("p1-{i}"))).collect();
    want.sort_unstable();
    ensure!(processed == want, "after the reset the owner processed {processed:?}, want {want:?}");
    worker.kill9()?;

    // Offline, on the stopped coordinator's store, with --kafka-brokers.
    c.proc.signal(libc::SIGTERM)?;
    c.proc.wait_exit(Duration::from_secs(30))?;
    let offline = At::Offline(&data);
    let brokers = kafka_brokers();
    let kafka = ["--kafka-brokers", brokers.as_str()];
    let target = ["--timestamp", "2026-01-01T00:00:02Z"];
    offline.apply(stream, &args(&kafka, &args(&reset, &target)), &[(0, 2), (1, 1)]).await?;
    let set = args(&kafka, &["checkpoint", "set", &p1, "--latest"]);
    offline.apply(stream, &set, &[(1, 6)]).await?;
    let stored = offline.shards(stream).await?;
    let c = Coordinator::start_config(config, &data)?;
    let restarted = At::Online(&c).shards(stream).await?;
    ensure!(restarted == stored, "the restarted coordinator has {restarted:?}, the store had {stored:?}");
    Ok(())
}
