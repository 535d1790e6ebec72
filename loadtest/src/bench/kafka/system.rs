//! The whole system on the same topic: the real coordinator discovers the
//! topic from Kafka, one real worker (the `noop` handler, or the handler
//! the caller names) leases every partition, reads it and checkpoints. The
//! clock runs from starting the worker process until the coordinator's
//! checkpoints cover every record, so the rate includes everything a
//! deployment pays: start-up, registration, lease grants, fetching,
//! batching, the handler call and durable checkpoints.
//!
//! Completion is read from the admin API (`ListLeases`), as an operator
//! would: a checkpoint is the next offset to process, so a partition is done
//! when its checkpoint reaches the high watermark measured after producing.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use shardline_proto::StartingPosition;
use shardline_proto::v1::{self, admin_api_client::AdminApiClient};
use shardline_testkit::config::{CoordinatorConfig, StreamConfig, WorkerConfig};
use shardline_testkit::kafka::KafkaAccess;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::bench::compare::{Sample, SystemFigures, WORKER_ID, run_system};
use crate::child::{Coordinator, Worker};

/// How often the coordinator reads Kafka metadata: the topic is found
/// quickly, and the reads are cheap next to the fetches.
const DISCOVERY_INTERVAL: Duration = Duration::from_millis(500);
/// How long the coordinator gets to discover the topic's partitions.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(30);
const ACCEPTED: &str = "shardline_checkpoints_total{result=\"accepted\"}";

pub struct Settings<'a> {
    pub coordinator_bin: &'a Path,
    pub worker_bin: &'a Path,
    pub kafka: &'a KafkaAccess,
    pub topic: &'a str,
    /// `(low, high)` per partition, measured after producing.
    pub watermarks: &'a [(i64, i64)],
    pub batch_size: u32,
    pub fetch_queue_kib: Option<u32>,
    /// The handler the stream names and the worker hosts: its name and
    /// settings ([`builtin`] for `bench kafka`'s).
    pub handler: (&'a str, toml::Table),
    /// The worker's `max_inflight_batches` (0: no limit, its default).
    pub max_inflight_batches: u32,
    /// The stream's `tumbling_window` (`None`: off).
    pub tumbling_window: Option<Duration>,
    pub stall: Duration,
    pub broker_pid: Option<u32>,
}

/// A handler compiled into the worker. `None`: `noop`, so the figures are
/// the machinery's. `Some`: `sleep` with this per batch, to make the
/// worker slower than the broker and fill its prefetch buffers (memory
/// bound).
pub fn builtin(sleep_per_batch: Option<Duration>) -> (&'static str, toml::Table) {
    match sleep_per_batch {
        None => ("noop", toml::Table::new()),
        Some(d) => (
            "sleep",
            shardline_testkit::config::settings(&[
                ("per_batch", format!("{}ms", d.as_millis())),
                ("per_record", "0s".to_owned()),
            ]),
        ),
    }
}

/// The system side's figures, and the checkpoint entries the coordinator
/// accepted during the run. `at_end` sees the worker once every record is
/// checkpointed, before it is stopped (what only a live worker shows: its
/// function processes).
pub async fn run(
    s: &Settings<'_>,
    mut at_end: impl AsyncFnMut(&Worker) -> anyhow::Result<()>,
) -> anyhow::Result<(SystemFigures, f64)> {
    let partitions = u32::try_from(s.watermarks.len()).context("too many partitions")?;
    let expected: u64 = s.watermarks.iter().map(|(low, high)| (high - low).max(0) as u64).sum();
    let (handler, handler_settings) = (s.handler.0, &s.handler.1);
    let mut stream = StreamConfig {
        starting_position: StartingPosition::TrimHorizon,
        ..StreamConfig::new(s.topic, handler)
    };
    stream.settings.batch_size = s.batch_size;
    if let Some(window) = s.tumbling_window {
        stream.tumbling_window = window;
    }
    let config = CoordinatorConfig {
        kafka_brokers: s.kafka.brokers.clone(),
        kafka: s.kafka.settings.clone(),
        discovery_interval: DISCOVERY_INTERVAL,
        streams: vec![stream],
        ..CoordinatorConfig::default()
    };
    let mut coordinator = Coordinator::start_with(s.coordinator_bin, config).await?;
    let channel = coordinator.channels(1).await?.remove(0);
    let mut admin = AdminApiClient::new(channel);
    wait_for_discovery(&mut admin, &mut coordinator, s.topic, partitions).await?;
    // Created at the first checkpoint, which may not have come yet.
    let accepted_before = coordinator.scrape().await?.get_or_zero(ACCEPTED);

    let default = WorkerConfig::default();
    let settings = WorkerConfig {
        coordinator: coordinator.url(),
        worker_id: Some(WORKER_ID.to_owned()),
        kafka_brokers: s.kafka.brokers.clone(),
        kafka: s.kafka.settings.clone(),
        handlers: [(handler.to_owned(), handler_settings.clone())].into(),
        fetch_queue_kib: s.fetch_queue_kib.unwrap_or(default.fetch_queue_kib),
        max_inflight_batches: s.max_inflight_batches,
        ..default
    };
    let figures =
        run_system(coordinator, s.worker_bin, &settings, expected, s.stall, s.broker_pid, async |worker| {
            let leases = list(&mut admin, s.topic).await?;
            let progress = progress_of(&leases, s.topic, s.watermarks);
            if progress.complete {
                at_end(worker).await?;
            }
            Ok(progress)
        })
        .await?;
    let accepted = (figures.coordinator_metrics.get(ACCEPTED)? - accepted_before).max(0.0);
    Ok((figures, accepted))
}

/// Waits until the coordinator lists a lease for every partition, so the
/// worker is granted them all when it registers and discovery's delay is
/// not measured as the worker's.
async fn wait_for_discovery(
    admin: &mut AdminApiClient<Channel>,
    coordinator: &mut Coordinator,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + DISCOVERY_TIMEOUT;
    loop {
        coordinator.check_alive()?;
        let leases = list(admin, topic).await?;
        if leases.len() >= partitions as usize {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the coordinator lists {} of {partitions} partitions of {topic} after {DISCOVERY_TIMEOUT:?}; \
                 its log:\n{}",
                leases.len(),
                coordinator.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn list(admin: &mut AdminApiClient<Channel>, topic: &str) -> anyhow::Result<Vec<v1::LeaseInfo>> {
    let request = v1::ListLeasesRequest { name: topic.to_owned() };
    Ok(admin.list_leases(request).await.context("ListLeases failed")?.into_inner().leases)
}

/// How far the checkpoints are: per partition, the records between the
/// low watermark and the checkpoint (capped at the high watermark); ready
/// once the worker owns every partition.
fn progress_of(leases: &[v1::LeaseInfo], topic: &str, watermarks: &[(i64, i64)]) -> Sample {
    let mut done = 0;
    let mut open = 0;
    let mut all_owned = true;
    for (index, (low, high)) in watermarks.iter().enumerate() {
        let lease = leases
            .iter()
            .find(|l| l.lease.as_ref().is_some_and(|id| id.name == topic && id.index as usize == index));
        let checkpoint = lease.and_then(|l| l.checkpoint).unwrap_or(*low);
        done += (checkpoint.clamp(*low, *high) - low) as u64;
        open += usize::from(checkpoint < *high);
        all_owned &= lease.is_some_and(|l| l.owner == WORKER_ID);
    }
    Sample { done, complete: open == 0, ready: all_owned, state: format!("{open} partitions behind") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(index: u32, owner: &str, checkpoint: Option<i64>) -> v1::LeaseInfo {
        v1::LeaseInfo {
            lease: Some(v1::LeaseId { kind: v1::LeaseKind::Shard as i32, name: "t".into(), index }),
            owner: owner.into(),
            checkpoint,
            ..Default::default()
        }
    }

    #[test]
    fn progress_counts_from_the_low_watermark_and_needs_every_partition() {
        let watermarks = [(0, 100), (10, 50)];
        let p = progress_of(&[lease(0, WORKER_ID, Some(100)), lease(1, "", None)], "t", &watermarks);
        assert_eq!((p.done, p.complete, p.ready), (100, false, false));
        let p =
            progress_of(&[lease(0, WORKER_ID, Some(100)), lease(1, WORKER_ID, Some(30))], "t", &watermarks);
        assert_eq!((p.done, p.complete, p.ready), (120, false, true));
        let p =
            progress_of(&[lease(1, WORKER_ID, Some(50)), lease(0, WORKER_ID, Some(100))], "t", &watermarks);
        assert_eq!((p.done, p.complete), (140, true));
        let p = progress_of(&[lease(0, WORKER_ID, Some(100))], "t", &watermarks);
        assert!(!p.complete, "a missing lease is not done");
    }
}
