//! The coordinator does not take a worker's word for what it cannot
//! check: the real binary on a real Kafka topic, talked to by a raw gRPC
//! client that says what a buggy or hostile worker could say.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shardline_proto::LeaseId;
use shardline_proto::v1;
use shardline_tests::kafka::{produce, producer};
use shardline_tests::{
    Coordinator, CoordinatorConfig, StreamConfig, create_topic, eventually, free_port, http_get, metric,
    unique,
};

fn entry(lease: &LeaseId, epoch: u64, offset: i64) -> v1::CheckpointEntry {
    v1::CheckpointEntry { lease: Some(lease.into()), epoch, offset, window: None }
}

/// A checkpoint past the partition's high watermark is refused with
/// INVALID_ARGUMENT naming lease, offset and watermark, and changes
/// nothing; once records are there it is accepted (the coordinator reads
/// the watermark again rather than trusting its last read). Usage for a
/// mapping the config does not name is dropped; an infinite busy ratio
/// does not reach `shardline_desired_workers`; a worker's series go when
/// it deregisters.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_cannot_checkpoint_past_the_log_or_report_what_it_does_not_hold() -> Result<()> {
    let topic = unique("hostile");
    create_topic(&topic, 1).await?;
    let dir = tempfile::tempdir()?;
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let config = CoordinatorConfig {
        streams: vec![StreamConfig::new(&topic, "noop")],
        metrics_listen: Some(metrics_addr.parse()?),
        // One read at start, then none within the test: a checkpoint past
        // that read must be checked against a fresh one.
        discovery_interval: Duration::from_secs(600),
        ..CoordinatorConfig::default()
    };
    // The test registers until a reply grants the lease: every register is
    // a join, which a join window would keep deferring.
    let mut config = config;
    config.balancer.join_window = Duration::ZERO;
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let mut api = c.worker_api().await?;
    let lease = LeaseId::shard(&topic, 0);
    let register = v1::RegisterRequest {
        worker_id: "w".into(),
        handlers: vec!["noop".into()],
        incarnation: 1,
        ..Default::default()
    };
    let epoch = eventually(Duration::from_secs(20), "the lease granted", || {
        let (mut api, register) = (api.clone(), register.clone());
        async move {
            let reply = api.register(register).await?.into_inner();
            Ok(reply.instructions.iter().find_map(|i| match &i.kind {
                Some(v1::instruction::Kind::Acquire(a)) => Some(a.epoch),
                _ => None,
            }))
        }
    })
    .await?;
    // Discovery read the (empty) partition's watermark right after it made
    // the lease; give that read a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let request =
        |offset| v1::CheckpointRequest { worker_id: "w".into(), entries: vec![entry(&lease, epoch, offset)] };
    let refused = api.checkpoint(request(1_000_000)).await;
    let status = refused.err().context("a checkpoint past the high watermark was accepted")?;
    ensure!(status.code() == tonic::Code::InvalidArgument, "{status:?}");
    let message = status.message();
    ensure!(
        message.contains(&format!("`{lease}`"))
            && message.contains("1000000")
            && message.contains("high watermark 0"),
        "{message}"
    );
    let mut admin = c.admin().await?;
    let get = v1::GetCheckpointRequest { lease: Some((&lease).into()) };
    let info = admin.get_checkpoint(get.clone()).await?.into_inner();
    ensure!(
        info.checkpoint.is_none() && info.epoch == epoch,
        "the refused checkpoint changed the lease: {info:?}"
    );

    // Five records later (the coordinator's last read still says 0).
    produce(&producer()?, &topic, 0, 5, 1).await?;
    let accepted = api.checkpoint(request(5)).await?.into_inner();
    ensure!(accepted.results.first().map(|r| r.status()) == Some(v1::CheckpointStatus::Ok), "{accepted:?}");
    let status = api.checkpoint(request(6)).await.err().context("offset 6 of 5 records accepted")?;
    ensure!(status.message().contains("high watermark 5"), "{status:?}");
    ensure!(admin.get_checkpoint(get).await?.into_inner().checkpoint == Some(5));

    // Usage: a mapping the config does not name, and a handler lied about.
    let usage = |mapping: &str| v1::MappingUsage {
        mapping: mapping.into(),
        handler: "not-noop".into(),
        batches: 1,
        records: 5,
        handler_ms: 100,
        billed_units: 1,
    };
    let load = v1::LoadReport {
        leases: vec![v1::LeaseLoad {
            lease: Some((&lease).into()),
            busy_ratio: f64::INFINITY,
            ..Default::default()
        }],
        cpu: f64::NAN,
        usage: vec![usage(&topic), usage("ghost")],
        ..Default::default()
    };
    let held = vec![v1::HeldLease { lease: Some((&lease).into()), epoch }];
    let beat = v1::HeartbeatRequest {
        worker_id: "w".into(),
        load: Some(load),
        held,
        incarnation: 1,
        ..Default::default()
    };
    api.heartbeat(beat).await?;
    let reply = admin.usage(v1::UsageRequest { since_ms: 0 }).await?.into_inner();
    let names: Vec<(&str, &str)> =
        reply.usage.iter().map(|u| (u.mapping.as_str(), u.handler.as_str())).collect();
    ensure!(names == vec![(topic.as_str(), "noop")], "usage stored: {names:?}");
    eventually(Duration::from_secs(5), "the metrics", || {
        let addr = metrics_addr.clone();
        async move {
            let body = http_get(&addr, "/metrics").await?;
            let dropped = metric(&body, "shardline_usage_unknown_mappings_total")?;
            let figures = metric(&body, "shardline_load_figures_dropped_total")?;
            let desired = metric(&body, "shardline_desired_workers")?;
            ensure!(desired == 1.0, "desired workers {desired} for one lease");
            let series = body.contains(r#"shardline_worker_utilisation{worker="w"}"#);
            Ok((dropped >= 1.0 && figures >= 2.0 && series).then_some(()))
        }
    })
    .await?;

    api.deregister(v1::DeregisterRequest { worker_id: "w".into() }).await?;
    eventually(Duration::from_secs(5), "the worker's series gone", || {
        let addr = metrics_addr.clone();
        async move {
            let body = http_get(&addr, "/metrics").await?;
            Ok((!body.contains("shardline_worker_utilisation{")).then_some(()))
        }
    })
    .await?;
    Ok(())
}
