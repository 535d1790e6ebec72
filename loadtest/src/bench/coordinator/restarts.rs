//! Worker restarts: a coordinator's memory must not grow with the workers
//! that came and went. Workers join one after another on a small stream,
//! each heartbeating (with a load report of its leases and a usage report)
//! and checkpointing the leases it is given, then dies as pods do: every
//! other one deregisters, the rest go silent (`kill -9`) and expire after
//! the session timeout. Each new worker has a new id, as a new pod has.
//!
//! Measured: the coordinator's RSS (`VmRSS`) and the `shardline_worker_*`
//! series on `/metrics` before the first restart, after 100, 1,000 and
//! 3,000 (as far as the run goes) and after all of them, each time once
//! every silent worker has expired. Flat is the
//! target: what a worker leaves behind when it is gone is a leak.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use shardline_proto::LeaseId;
use shardline_proto::v1::{self, admin_api_client::AdminApiClient, worker_api_client::WorkerApiClient};
use shardline_testkit::config::{CoordinatorConfig, Store, StreamConfig};
use tonic::transport::Channel;

use super::{HANDLER, STREAM};
use crate::child::Coordinator;
use crate::stats::{mib, proc_status_kib};

/// Short, so the silent workers expire within the run.
const SESSION_TIMEOUT: Duration = Duration::from_secs(2);
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Partitions of the stream the workers share.
const PARTITIONS: u32 = 16;
/// Samples are taken after these many restarts (and after the last).
const SAMPLE_AT: &[u32] = &[100, 1000, 3000];

pub struct Settings {
    pub restarts: u32,
}

/// One measurement point.
#[derive(Debug, Clone)]
struct Sample {
    restarts: u32,
    rss_kib: u64,
    worker_series: usize,
    workers_listed: usize,
}

pub struct Figures {
    samples: Vec<Sample>,
    took_s: f64,
    refused: u64,
}

impl Figures {
    pub fn print(&self, settings: &Settings) {
        println!();
        println!(
            "worker restarts: {} workers joined and died in turn (half deregistered, half expired), {:.1} s",
            settings.restarts, self.took_s
        );
        println!(
            "  {:>10} {:>12} {:>24} {:>16}",
            "restarts", "RSS MiB", "shardline_worker_* series", "workers listed"
        );
        for s in &self.samples {
            println!(
                "  {:>10} {:>12.1} {:>24} {:>16}",
                s.restarts,
                mib(s.rss_kib),
                s.worker_series,
                s.workers_listed
            );
        }
        if let (Some(first), Some(last)) = (self.samples.get(1), self.samples.last()) {
            let growth = mib(last.rss_kib.saturating_sub(first.rss_kib));
            println!(
                "  RSS growth from {} to {} restarts: {growth:.1} MiB; refused calls: {}",
                first.restarts, last.restarts, self.refused
            );
        }
    }

    pub fn headline(&self) -> Option<f64> {
        self.samples.last().map(|s| mib(s.rss_kib))
    }

    pub fn json(&self, settings: &Settings) -> serde_json::Value {
        json!({
            "restarts": settings.restarts,
            "took_s": crate::stats::round3(self.took_s),
            "refused_calls": self.refused,
            "samples": self.samples.iter().map(|s| json!({
                "restarts": s.restarts,
                "rss_mib": crate::stats::round3(mib(s.rss_kib)),
                "worker_series": s.worker_series,
                "workers_listed": s.workers_listed,
            })).collect::<Vec<_>>(),
        })
    }
}

pub async fn run(bin: &Path, store: Store, settings: &Settings) -> anyhow::Result<Figures> {
    let stream = StreamConfig { partitions: Some(PARTITIONS), ..StreamConfig::new(STREAM, HANDLER) };
    let config = CoordinatorConfig {
        streams: vec![stream],
        store,
        session_timeout: SESSION_TIMEOUT,
        heartbeat_interval: HEARTBEAT_INTERVAL,
        // At most half the workers' fence time (PostgreSQL's election).
        leadership_timeout: Duration::from_millis(500),
        ..CoordinatorConfig::default()
    };
    let mut coordinator = Coordinator::start_with(bin, config).await?;
    coordinator.wait_leading(Duration::from_secs(20)).await?;
    let channel = coordinator.channels(1).await?.into_iter().next().context("no channel")?;
    let client = WorkerApiClient::new(channel.clone());
    let mut admin = AdminApiClient::new(channel);
    let started = tokio::time::Instant::now();
    let mut refused = 0u64;

    let mut current = Sim::join(client.clone(), 0).await?;
    refused += settle(&mut current).await?;
    let mut samples = vec![sample(&coordinator, &mut admin, 0).await?];
    for i in 1..=settings.restarts {
        let mut next = Sim::join(client.clone(), i).await?;
        // The old one hears of the newcomer (releases what balance asks),
        // then dies.
        refused += current.round().await?;
        if i % 2 == 0 {
            current.deregister().await?;
        }
        // else: silent from now on, like a killed pod; it expires.
        refused += next.round().await?;
        refused += next.round().await?;
        current = next;
        if SAMPLE_AT.contains(&i) || i == settings.restarts {
            refused += settle(&mut current).await?;
            coordinator.check_alive()?;
            samples.push(sample(&coordinator, &mut admin, i).await?);
        }
    }
    let took_s = started.elapsed().as_secs_f64();
    coordinator.check_alive()?;
    coordinator.stop()?;
    Ok(Figures { samples, took_s, refused })
}

/// Two session timeouts of the live worker's rounds: every silent worker
/// has expired after it (and the metrics were published).
async fn settle(live: &mut Sim) -> anyhow::Result<u64> {
    let mut refused = 0;
    let until = tokio::time::Instant::now() + SESSION_TIMEOUT * 2;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(HEARTBEAT_INTERVAL / 2).await;
        refused += live.round().await?;
    }
    Ok(refused)
}

async fn sample(
    coordinator: &Coordinator,
    admin: &mut AdminApiClient<Channel>,
    restarts: u32,
) -> anyhow::Result<Sample> {
    let rss_kib =
        proc_status_kib(coordinator.pid(), "VmRSS").context("cannot read the coordinator's VmRSS")?;
    let text = coordinator.metrics_text().await?;
    let worker_series = text.lines().filter(|l| l.starts_with("shardline_worker_")).count();
    let workers = admin.list_workers(v1::ListWorkersRequest {}).await.context("ListWorkers failed")?;
    Ok(Sample { restarts, rss_kib, worker_series, workers_listed: workers.into_inner().workers.len() })
}

/// One short-lived worker: it runs what it is told and reports load and
/// usage, as a real one does.
struct Sim {
    id: String,
    incarnation: u64,
    client: WorkerApiClient<Channel>,
    held: BTreeMap<LeaseId, (v1::LeaseId, u64, i64)>,
    batches: u64,
}

impl Sim {
    async fn join(client: WorkerApiClient<Channel>, i: u32) -> anyhow::Result<Self> {
        // A pod-like name: each restart is a new id.
        let id = format!("shardline-worker-7d9f8c6b5-{i:05}");
        let mut sim = Self { id, incarnation: u64::from(i) + 1, client, held: BTreeMap::new(), batches: 0 };
        let request = v1::RegisterRequest {
            worker_id: sim.id.clone(),
            address: String::new(),
            handlers: vec![HANDLER.into()],
            capacity: 0,
            held: vec![],
            concurrency: 4,
            incarnation: sim.incarnation,
        };
        let reply = sim.client.register(request).await.context("Register failed")?.into_inner();
        sim.apply(reply.instructions).await?;
        Ok(sim)
    }

    /// A heartbeat and a checkpoint of every held lease; returns the calls
    /// refused as stale (the lease had moved on).
    async fn round(&mut self) -> anyhow::Result<u64> {
        self.batches += 1;
        let leases = self
            .held
            .values()
            .map(|(wire, epoch, offset)| v1::LeaseLoad {
                lease: Some(wire.clone()),
                epoch: *epoch,
                position: *offset,
                lag: 3,
                records_in_per_s: 50.0,
                records_out_per_s: 50.0,
                busy_ratio: 0.1,
            })
            .collect();
        let usage = vec![v1::MappingUsage {
            mapping: STREAM.into(),
            handler: HANDLER.into(),
            batches: self.batches,
            records: self.batches * 10,
            handler_ms: self.batches * 20,
            billed_units: self.batches,
        }];
        let request = v1::HeartbeatRequest {
            worker_id: self.id.clone(),
            load: Some(v1::LoadReport { leases, cpu: 0.2, inflight_batches: 1, usage }),
            draining: false,
            unhealthy: vec![],
            held: self
                .held
                .values()
                .map(|(w, e, _)| v1::HeldLease { lease: Some(w.clone()), epoch: *e })
                .collect(),
            incarnation: self.incarnation,
        };
        let reply =
            self.client.heartbeat(request).await.with_context(|| format!("{}: Heartbeat failed", self.id))?;
        self.apply(reply.into_inner().instructions).await?;
        if self.held.is_empty() {
            return Ok(0);
        }
        let entries = self
            .held
            .values_mut()
            .map(|(wire, epoch, offset)| {
                *offset += 10;
                v1::CheckpointEntry {
                    window: None,
                    lease: Some(wire.clone()),
                    epoch: *epoch,
                    offset: *offset,
                }
            })
            .collect();
        let request = v1::CheckpointRequest { worker_id: self.id.clone(), entries };
        let reply = self.client.checkpoint(request).await.context("Checkpoint failed")?.into_inner();
        let stale = reply.results.iter().filter(|r| r.status() != v1::CheckpointStatus::Ok).count();
        Ok(stale as u64)
    }

    async fn apply(&mut self, instructions: Vec<v1::Instruction>) -> anyhow::Result<()> {
        use v1::instruction::Kind;
        for i in instructions {
            match i.kind {
                Some(Kind::Acquire(a)) => {
                    let wire = a.lease.context("Acquire without a lease")?;
                    let id = LeaseId::try_from(Some(&wire)).map_err(|e| anyhow::anyhow!("{e}"))?;
                    self.held.insert(id, (wire, a.epoch, 0));
                }
                Some(Kind::Release(r)) => {
                    let wire = r.lease.context("Release without a lease")?;
                    let id = LeaseId::try_from(Some(&wire)).map_err(|e| anyhow::anyhow!("{e}"))?;
                    let offset = self.held.remove(&id).map(|(_, _, o)| o);
                    let request = v1::ReleaseDoneRequest {
                        window: None,
                        worker_id: self.id.clone(),
                        lease: Some(wire),
                        epoch: r.epoch,
                        offset: offset.filter(|o| *o > 0),
                    };
                    self.client.release_done(request).await.context("ReleaseDone failed")?;
                }
                Some(Kind::Revoke(r)) => {
                    let wire = r.lease.context("Revoke without a lease")?;
                    let id = LeaseId::try_from(Some(&wire)).map_err(|e| anyhow::anyhow!("{e}"))?;
                    if self.held.get(&id).is_some_and(|(_, e, _)| *e == r.epoch) {
                        self.held.remove(&id);
                    }
                }
                None => bail!("an instruction without a kind"),
            }
        }
        Ok(())
    }

    async fn deregister(&mut self) -> anyhow::Result<()> {
        let request = v1::DeregisterRequest { worker_id: self.id.clone() };
        self.client.deregister(request).await.context("Deregister failed")?;
        Ok(())
    }
}
