//! Checkpoint throughput: one worker owns every lease of a stream and runs
//! one caller per lease, each sending a one-entry Checkpoint and waiting for
//! the (durable) acknowledgement before the next. This is the worst case for
//! the coordinator's group commit: many small requests, each of which must
//! wait for a flush. Target: 20,000 acknowledged checkpoints/s.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use shardline_proto::v1::{self, worker_api_client::WorkerApiClient};
use shardline_testkit::config::{Store, StreamConfig};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::{GroupCommit, HANDLER, STREAM, check_calls, verdict};
use crate::child::Coordinator;
use crate::stats::{CpuMeter, CpuUse, Latency, RssSampler, Summary, mib, round3};

const TARGET_PER_S: f64 = 20_000.0;
const WORKER_ID: &str = "bench-checkpointer";

pub struct Settings {
    pub leases: u32,
    pub channels: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// What one run measured.
pub struct Figures {
    acknowledged: u64,
    per_s: f64,
    latency: Summary,
    errors: u64,
    heartbeat_errors: u64,
    peak_rss_kib: u64,
    cpu: CpuUse,
    group_commit: GroupCommit,
}

/// One lease as granted by the coordinator.
struct Granted {
    lease: v1::LeaseId,
    epoch: u64,
    offset: i64,
}

/// What one caller task measured.
struct CallerStats {
    latency: Latency,
    acknowledged: u64,
    errors: u64,
    first_error: Option<String>,
}

pub async fn run(bin: &Path, store: Store, settings: &Settings) -> anyhow::Result<Figures> {
    let stream = StreamConfig { partitions: Some(settings.leases), ..StreamConfig::new(STREAM, HANDLER) };
    let mut coordinator = Coordinator::start_on(bin, vec![stream], store).await?;
    let rss = RssSampler::start(coordinator.pid());
    let channels = coordinator.channels(settings.channels).await?;
    let mut client = WorkerApiClient::new(channels[0].clone());

    // A failed call may mean the coordinator died: then say how.
    let granted = match acquire_all(&mut client, settings.leases).await {
        Ok(granted) => granted,
        Err(e) => return Err(super::with_death(&mut coordinator, e)),
    };

    // Keeps the session alive for the whole run (10 s default timeout).
    let heartbeat_errors = Arc::new(AtomicU64::new(0));
    let heartbeats = tokio::spawn(heartbeat_loop(client.clone(), held(&granted), heartbeat_errors.clone()));

    let measure_from = Instant::now() + settings.warmup;
    let until = measure_from + settings.duration;
    let mut callers = tokio::task::JoinSet::new();
    for (i, lease) in granted.into_iter().enumerate() {
        let client = WorkerApiClient::new(channels[i % channels.len()].clone());
        callers.spawn(caller(client, lease, measure_from, until));
    }
    tokio::time::sleep_until(measure_from).await;
    let cpu = CpuMeter::start(coordinator.pid());
    let metrics_before = coordinator.scrape().await?;
    let mut latency = Latency::new()?;
    let (mut acknowledged, mut errors, mut first_error) = (0, 0, None);
    while let Some(joined) = callers.join_next().await {
        let stats = joined.context("a checkpoint caller panicked")??;
        latency.merge(&stats.latency)?;
        acknowledged += stats.acknowledged;
        errors += stats.errors;
        first_error = first_error.or(stats.first_error);
    }
    let cpu = cpu.stop();
    let metrics_after = coordinator.scrape().await?;
    heartbeats.abort();

    coordinator.check_alive()?;
    let peak_rss_kib = rss.peak_kib().max(coordinator.peak_rss_kib().unwrap_or(0));
    coordinator.stop()?;
    check_calls("checkpoint calls", acknowledged, errors, first_error.as_deref())?;
    Ok(Figures {
        acknowledged,
        per_s: acknowledged as f64 / settings.duration.as_secs_f64(),
        latency: latency.summary(),
        errors,
        heartbeat_errors: heartbeat_errors.load(Ordering::Relaxed),
        peak_rss_kib,
        cpu,
        group_commit: GroupCommit::between(&metrics_before, &metrics_after, settings.duration)?,
    })
}

/// Registers the worker and collects an Acquire for every lease. The static
/// stream reaches the lease table just after the coordinator starts serving,
/// so the register reply may come before it: heartbeats pick up the rest.
async fn acquire_all(client: &mut WorkerApiClient<Channel>, leases: u32) -> anyhow::Result<Vec<Granted>> {
    let request = v1::RegisterRequest {
        worker_id: WORKER_ID.into(),
        handlers: vec![HANDLER.into()],
        ..Default::default()
    };
    let reply = client.register(request).await.context("Register failed")?.into_inner();
    let mut granted = Vec::new();
    collect_acquires(reply.instructions, &mut granted)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while granted.len() < leases as usize {
        if Instant::now() > deadline {
            bail!("only {} of {leases} leases granted within 10 s of registering", granted.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let request =
            v1::HeartbeatRequest { worker_id: WORKER_ID.into(), held: held(&granted), ..Default::default() };
        let reply = client.heartbeat(request).await.context("Heartbeat failed")?.into_inner();
        collect_acquires(reply.instructions, &mut granted)?;
    }
    Ok(granted)
}

fn collect_acquires(instructions: Vec<v1::Instruction>, granted: &mut Vec<Granted>) -> anyhow::Result<()> {
    use v1::instruction::Kind;
    for instruction in instructions {
        match instruction.kind {
            Some(Kind::Acquire(a)) => granted.push(Granted {
                lease: a.lease.context("an Acquire without a lease")?,
                epoch: a.epoch,
                offset: a.start.and_then(|s| s.checkpoint()).unwrap_or(0),
            }),
            // A lone worker is never asked to give anything up.
            other => bail!("unexpected instruction for the only worker: {other:?}"),
        }
    }
    Ok(())
}

/// What the worker runs, as its heartbeats quote it (so the coordinator
/// re-sends nothing).
fn held(granted: &[Granted]) -> Vec<v1::HeldLease> {
    granted.iter().map(|g| v1::HeldLease { lease: Some(g.lease.clone()), epoch: g.epoch }).collect()
}

async fn heartbeat_loop(
    mut client: WorkerApiClient<Channel>,
    held: Vec<v1::HeldLease>,
    errors: Arc<AtomicU64>,
) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let request =
            v1::HeartbeatRequest { worker_id: WORKER_ID.into(), held: held.clone(), ..Default::default() };
        match client.heartbeat(request).await {
            // Instructions would mean a lease moved: the checkpoints of that
            // lease then fail as stale and are counted as errors there.
            Ok(_) => {}
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Checkpoints one lease back to back until `until`; calls started before
/// `measure_from` are warm-up and not counted.
async fn caller(
    mut client: WorkerApiClient<Channel>,
    mut lease: Granted,
    measure_from: Instant,
    until: Instant,
) -> anyhow::Result<CallerStats> {
    let mut stats = CallerStats { latency: Latency::new()?, acknowledged: 0, errors: 0, first_error: None };
    loop {
        let started = Instant::now();
        if started >= until {
            return Ok(stats);
        }
        lease.offset += 1;
        let request = v1::CheckpointRequest {
            worker_id: WORKER_ID.into(),
            entries: vec![v1::CheckpointEntry {
                window: None,
                lease: Some(lease.lease.clone()),
                epoch: lease.epoch,
                offset: lease.offset,
            }],
        };
        let result = client.checkpoint(request).await;
        let elapsed = started.elapsed();
        let outcome = match result {
            Ok(reply) => match reply.into_inner().results.first() {
                Some(r) if r.status() == v1::CheckpointStatus::Ok => Ok(()),
                Some(r) => Err(format!("checkpoint status {:?}", r.status())),
                None => Err("a checkpoint reply without results".to_owned()),
            },
            Err(status) => Err(format!("Checkpoint call failed: {status}")),
        };
        let measured = started >= measure_from;
        match outcome {
            Ok(()) if measured => {
                stats.latency.record(elapsed);
                stats.acknowledged += 1;
            }
            Ok(()) => {}
            Err(e) => {
                if measured {
                    stats.errors += 1;
                }
                stats.first_error.get_or_insert(e);
                // Do not spin on a failing coordinator.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

impl Figures {
    /// Acknowledged checkpoints/s and their p99 latency (ms).
    pub fn headline(&self) -> (Option<f64>, Option<f64>) {
        (Some(self.per_s), Some(self.latency.p99_ms))
    }

    pub fn print(&self, s: &Settings) {
        println!();
        println!(
            "coordinator checkpoints: 1 worker, {} leases, one caller each, {} channels, {} s after {} s warm-up",
            s.leases,
            s.channels,
            s.duration.as_secs(),
            s.warmup.as_secs()
        );
        println!(
            "  {:<32} {:>12.0}   target >= {:.0}/s: {}",
            "acknowledged checkpoints/s",
            self.per_s,
            TARGET_PER_S,
            verdict(self.per_s >= TARGET_PER_S)
        );
        println!("  {:<32} {:>12}", "acknowledged checkpoints", self.acknowledged);
        println!("  {:<32} {:>12}", "latency p50 / p99 / max", self.latency.line());
        println!("  {:<32} {:>12}", "errors", self.errors);
        println!("  {:<32} {:>12}", "heartbeat errors", self.heartbeat_errors);
        println!("  {:<32} {:>12.1}", "coordinator peak RSS (MiB)", mib(self.peak_rss_kib));
        println!("  {:<32} {:>12}", "cores used coordinator / harness", self.cpu.line());
        self.group_commit.print();
    }

    pub fn json(&self, s: &Settings) -> serde_json::Value {
        json!({
            "leases": s.leases,
            "channels": s.channels,
            "warmup_s": s.warmup.as_secs_f64(),
            "duration_s": s.duration.as_secs_f64(),
            "acknowledged": self.acknowledged,
            "acknowledged_per_s": round3(self.per_s),
            "target_per_s": TARGET_PER_S,
            "target_met": self.per_s >= TARGET_PER_S,
            "latency": self.latency.json(),
            "errors": self.errors,
            "heartbeat_errors": self.heartbeat_errors,
            "peak_rss_mib": round3(mib(self.peak_rss_kib)),
            "cpu": self.cpu.json(),
            "group_commit": self.group_commit.json(),
        })
    }
}
