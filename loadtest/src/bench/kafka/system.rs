//! The whole system on the same topic: the real coordinator discovers the
//! topic from Kafka, one real worker (the `noop` handler) leases every
//! partition, reads it and checkpoints. The clock runs from starting the
//! worker process until the coordinator's checkpoints cover every record, so
//! the rate includes everything a deployment pays: start-up, registration,
//! lease grants, fetching, batching, the handler call and durable
//! checkpoints.
//!
//! Completion is read from the admin API (`ListLeases`), as an operator
//! would: a checkpoint is the next offset to process, so a partition is done
//! when its checkpoint reaches the high watermark measured after producing.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use shardline_proto::v1::{self, admin_api_client::AdminApiClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::child::{Coordinator, Discovery, Metrics, Setup, Stream, Worker, WorkerSettings};
use crate::stats::{ProcCpu, RssSampler, mib, proc_status_kib, round3};

const WORKER_ID: &str = "bench";
/// How often the coordinator reads Kafka metadata: the topic is found
/// quickly, and the reads are cheap next to the fetches.
const DISCOVERY_INTERVAL: Duration = Duration::from_millis(500);
/// How often the checkpoints are read: the end of the run is known to
/// within this (plus one call).
pub const POLL: Duration = Duration::from_millis(50);
/// How long the coordinator gets to discover the topic's partitions.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Progress is kept for the report at this resolution.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

pub struct Settings<'a> {
    pub coordinator_bin: &'a Path,
    pub worker_bin: &'a Path,
    pub brokers: &'a str,
    pub topic: &'a str,
    /// `(low, high)` per partition, measured after producing.
    pub watermarks: &'a [(i64, i64)],
    pub batch_size: u32,
    pub fetch_queue_kib: Option<u32>,
    /// `None`: the `noop` handler, so the figures are the machinery's.
    /// `Some`: the `sleep` handler with this per batch, to make the worker
    /// slower than the broker and fill its prefetch buffers (memory bound).
    pub sleep_per_batch: Option<Duration>,
    pub stall: Duration,
    pub broker_pid: Option<u32>,
}

/// What the run measured.
pub struct SystemFigures {
    /// From starting the worker to checkpoints covering every record.
    pub seconds: f64,
    pub per_s: f64,
    /// When the worker owned every lease (as the coordinator sees it).
    pub leases_owned_s: Option<f64>,
    /// When the first checkpoint past the start appeared.
    pub first_checkpoint_s: f64,
    /// The rate from the first checkpoint on: start-up left out.
    pub steady_per_s: f64,
    pub sampled_peak_rss_kib: u64,
    pub hwm_kib: Option<u64>,
    pub worker_cores: Option<f64>,
    pub coordinator_cores: Option<f64>,
    pub harness_cores: Option<f64>,
    pub broker_cores: Option<f64>,
    pub worker: WorkerMetrics,
    /// Checkpoint entries the coordinator accepted during the run.
    pub checkpoints_accepted: f64,
    /// `(seconds since the worker started, records checkpointed)`.
    pub progress: Vec<(f64, u64)>,
}

impl SystemFigures {
    pub fn peak_rss_mib(&self) -> f64 {
        mib(self.sampled_peak_rss_kib.max(self.hwm_kib.unwrap_or(0)))
    }
}

/// The worker's own view, from its metrics endpoint at the end of the run.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerMetrics {
    pub records: f64,
    pub batches: f64,
    pub checkpoint_calls: f64,
    pub mean_checkpoint_ms: f64,
    pub mean_handler_ms: f64,
}

impl WorkerMetrics {
    fn from(m: &Metrics) -> Self {
        let mean_ms = |name: &str| {
            let count = m.sum(&format!("{name}_count"));
            if count > 0.0 { m.sum(&format!("{name}_sum")) * 1000.0 / count } else { 0.0 }
        };
        Self {
            records: m.sum("shardline_records_total"),
            batches: m.sum("shardline_batches_total"),
            checkpoint_calls: m.sum("shardline_checkpoint_latency_seconds_count"),
            mean_checkpoint_ms: mean_ms("shardline_checkpoint_latency_seconds"),
            mean_handler_ms: mean_ms("shardline_handler_duration_seconds"),
        }
    }

    pub fn mean_batch(&self) -> f64 {
        if self.batches > 0.0 { self.records / self.batches } else { 0.0 }
    }
}

/// The checkpoints' state at one poll.
struct Progress {
    /// Records covered by checkpoints, over all partitions.
    done: u64,
    complete: bool,
    all_owned: bool,
}

pub async fn run(s: &Settings<'_>) -> anyhow::Result<SystemFigures> {
    let partitions = u32::try_from(s.watermarks.len()).context("too many partitions")?;
    let expected: u64 = s.watermarks.iter().map(|(low, high)| (high - low).max(0) as u64).sum();
    let (handler, handler_settings) = match s.sleep_per_batch {
        None => ("noop", vec![]),
        Some(d) => {
            ("sleep", vec![("per_batch", format!("{}ms", d.as_millis())), ("per_record", "0s".to_owned())])
        }
    };
    let streams = [Stream {
        name: s.topic,
        handler,
        partitions: None,
        batch_size: Some(s.batch_size),
        starting_position: Some("trim_horizon"),
    }];
    let setup = Setup {
        streams: &streams,
        kafka: Some(Discovery { brokers: s.brokers, interval: DISCOVERY_INTERVAL }),
        extra: None,
    };
    let mut coordinator = Coordinator::start_with(s.coordinator_bin, &setup).await?;
    let channel = coordinator.channels(1).await?.remove(0);
    let mut admin = AdminApiClient::new(channel);
    wait_for_discovery(&mut admin, &mut coordinator, s.topic, partitions).await?;
    let accepted_before = coordinator.scrape().await?.get(ACCEPTED);

    let coordinator_cpu = ProcCpu::start(coordinator.pid());
    let harness_cpu = ProcCpu::start(std::process::id());
    let broker_cpu = s.broker_pid.map(ProcCpu::start);
    let started = Instant::now();
    let settings = WorkerSettings {
        coordinator: &coordinator.url(),
        worker_id: WORKER_ID,
        kafka_brokers: s.brokers,
        handlers: &[(handler, handler_settings)],
        fetch_queue_kib: s.fetch_queue_kib,
        amqp_url: None,
        max_inflight_batches: None,
    };
    let mut worker = Worker::start(s.worker_bin, &settings)?;
    let rss = RssSampler::start(worker.pid());
    let worker_cpu = ProcCpu::start(worker.pid());

    let mut every = tokio::time::interval(POLL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leases_owned_s = None;
    let mut first_checkpoint = None;
    let mut progress = Vec::new();
    let (mut last_done, mut last_progress) = (0, Instant::now());
    let seconds = loop {
        every.tick().await;
        worker.check_alive()?;
        coordinator.check_alive()?;
        let now = started.elapsed();
        let p = read_progress(&mut admin, s.topic, s.watermarks).await?;
        if p.all_owned && leases_owned_s.is_none() {
            leases_owned_s = Some(now.as_secs_f64());
        }
        if p.done > 0 && first_checkpoint.is_none() {
            first_checkpoint = Some((now, p.done));
        }
        if progress.last().is_none_or(|(t, _)| now.as_secs_f64() - t >= PROGRESS_EVERY.as_secs_f64()) {
            progress.push((round3(now.as_secs_f64()), p.done));
        }
        if p.complete {
            progress.push((round3(now.as_secs_f64()), p.done));
            break now;
        }
        if p.done > last_done {
            (last_done, last_progress) = (p.done, Instant::now());
        } else if last_progress.elapsed() > s.stall {
            bail!(
                "checkpoints cover {} of {expected} records and have not moved for {:?}; the worker's log:\n{}",
                p.done,
                s.stall,
                worker.log_tail(20)
            );
        }
    };

    let hwm_kib = worker.peak_rss_kib();
    let worker_cores = worker_cpu.cores();
    let coordinator_cores = coordinator_cpu.cores();
    let harness_cores = harness_cpu.cores();
    let broker_cores = broker_cpu.and_then(|c| c.cores());
    let sampled_peak_rss_kib = rss.peak_kib().max(proc_status_kib(worker.pid(), "VmRSS").unwrap_or(0));
    // Figures that explain the rate, not the rate itself: a failed scrape is
    // reported as zeros rather than failing a finished measurement.
    let worker_metrics = match worker.scrape().await {
        Ok(m) => WorkerMetrics::from(&m),
        Err(e) => {
            eprintln!("warning: cannot read the worker's metrics: {e:#}");
            WorkerMetrics::default()
        }
    };
    let accepted_after = coordinator.scrape().await?.get(ACCEPTED);
    worker.stop().await?;
    coordinator.stop().await?;

    let (first_at, first_done) = first_checkpoint.unwrap_or((seconds, expected));
    let steady = seconds.saturating_sub(first_at).as_secs_f64();
    Ok(SystemFigures {
        seconds: seconds.as_secs_f64(),
        per_s: expected as f64 / seconds.as_secs_f64().max(1e-9),
        leases_owned_s,
        first_checkpoint_s: first_at.as_secs_f64(),
        steady_per_s: if steady > 0.0 { expected.saturating_sub(first_done) as f64 / steady } else { 0.0 },
        sampled_peak_rss_kib,
        hwm_kib,
        worker_cores,
        coordinator_cores,
        harness_cores,
        broker_cores,
        worker: worker_metrics,
        checkpoints_accepted: (accepted_after - accepted_before).max(0.0),
        progress,
    })
}

const ACCEPTED: &str = "shardline_checkpoints_total{result=\"accepted\"}";

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
                coordinator.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn list(admin: &mut AdminApiClient<Channel>, topic: &str) -> anyhow::Result<Vec<v1::LeaseInfo>> {
    let request = v1::ListLeasesRequest { name: topic.to_owned() };
    Ok(admin.list_leases(request).await.context("ListLeases failed")?.into_inner().leases)
}

async fn read_progress(
    admin: &mut AdminApiClient<Channel>,
    topic: &str,
    watermarks: &[(i64, i64)],
) -> anyhow::Result<Progress> {
    let leases = list(admin, topic).await?;
    Ok(progress_of(&leases, topic, watermarks))
}

/// How far the checkpoints are: per partition, the records between the
/// low watermark and the checkpoint (capped at the high watermark).
fn progress_of(leases: &[v1::LeaseInfo], topic: &str, watermarks: &[(i64, i64)]) -> Progress {
    let mut done = 0;
    let mut complete = true;
    let mut all_owned = true;
    for (index, (low, high)) in watermarks.iter().enumerate() {
        let lease = leases
            .iter()
            .find(|l| l.lease.as_ref().is_some_and(|id| id.name == topic && id.index as usize == index));
        let checkpoint = lease.and_then(|l| l.checkpoint).unwrap_or(*low);
        done += (checkpoint.clamp(*low, *high) - low) as u64;
        complete &= checkpoint >= *high;
        all_owned &= lease.is_some_and(|l| l.owner == WORKER_ID);
    }
    Progress { done, complete, all_owned }
}

impl SystemFigures {
    pub fn json(&self) -> serde_json::Value {
        let w = &self.worker;
        json!({
            "seconds": round3(self.seconds),
            "records_per_s": round3(self.per_s),
            "leases_owned_s": self.leases_owned_s.map(round3),
            "first_checkpoint_s": round3(self.first_checkpoint_s),
            "steady_records_per_s": round3(self.steady_per_s),
            "worker_peak_rss_mib": round3(self.peak_rss_mib()),
            "worker_sampled_peak_rss_mib": round3(mib(self.sampled_peak_rss_kib)),
            "worker_vm_hwm_mib": self.hwm_kib.map(|k| round3(mib(k))),
            "cores": {
                "worker": self.worker_cores.map(round3),
                "coordinator": self.coordinator_cores.map(round3),
                "harness": self.harness_cores.map(round3),
                "broker": self.broker_cores.map(round3),
            },
            "worker_metrics": {
                "records": w.records,
                "batches": w.batches,
                "mean_batch_records": round3(w.mean_batch()),
                "checkpoint_calls": w.checkpoint_calls,
                "mean_checkpoint_ms": round3(w.mean_checkpoint_ms),
                "mean_handler_ms": round3(w.mean_handler_ms),
            },
            "coordinator_checkpoints_accepted": self.checkpoints_accepted,
            "progress": self.progress,
        })
    }
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
        assert_eq!((p.done, p.complete, p.all_owned), (100, false, false));
        let p =
            progress_of(&[lease(0, WORKER_ID, Some(100)), lease(1, WORKER_ID, Some(30))], "t", &watermarks);
        assert_eq!((p.done, p.complete, p.all_owned), (120, false, true));
        let p =
            progress_of(&[lease(1, WORKER_ID, Some(50)), lease(0, WORKER_ID, Some(100))], "t", &watermarks);
        assert_eq!((p.done, p.complete), (140, true));
        let p = progress_of(&[lease(0, WORKER_ID, Some(100))], "t", &watermarks);
        assert!(!p.complete, "a missing lease is not done");
    }
}
