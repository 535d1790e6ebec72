//! A simulated fleet: many workers share one large stream, each
//! heartbeating once a second with a load report of its leases and
//! checkpointing all of them in one call once a second, as real workers do.
//! They follow the protocol (Release → ReleaseDone, Revoke, re-register on
//! NOT_FOUND) so rebalancing completes as it would in production.
//!
//! Measured once every lease is owned and the fleet is steady: heartbeat
//! latency (it bounds failure detection) and the coordinator's peak memory
//! over the whole run, joins included. Target: peak RSS <= 150 MiB.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use shardline_proto::LeaseId;
use shardline_proto::v1::{self, admin_api_client::AdminApiClient, worker_api_client::WorkerApiClient};
use shardline_testkit::config::{Store, StreamConfig};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::{GroupCommit, HANDLER, STREAM, check_calls, verdict};
use crate::child::Coordinator;
use crate::stats::{CpuMeter, CpuUse, Latency, RssSampler, Summary, mib, round3};

const TARGET_RSS_MIB: f64 = 150.0;
/// Time between two workers' registrations: quick, but not one burst, so
/// the joins look like a rolling deploy rather than a synthetic spike...
const STAGGER: Duration = Duration::from_millis(10);
/// ...and all of them within this, however large the fleet (2,000 workers
/// join 1 ms apart).
const JOIN_SPREAD: Duration = Duration::from_secs(2);
/// Longest wait for the registrations and then for every lease to be owned.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// After settling, two heartbeat rounds let the last Acquires reach their
/// workers before anything is measured.
const WARMUP: Duration = Duration::from_secs(2);
/// Heartbeat and checkpoint alternate on this tick: each once a second.
const HALF_PERIOD: Duration = Duration::from_millis(500);
/// ReleaseDone calls in flight per worker: the first workers are asked to
/// give up thousands of leases as the fleet joins.
const RELEASE_CONCURRENCY: usize = 16;

pub struct Settings {
    pub workers: u32,
    pub partitions: u32,
    pub channels: usize,
    pub duration: Duration,
}

/// What one run measured.
pub struct Figures {
    registered_s: f64,
    settled_s: f64,
    stagger: Duration,
    /// Graceful handoffs confirmed from the first join until settled.
    handoffs_to_settle: u64,
    heartbeat: Summary,
    checkpoint_call: Summary,
    checkpoints_per_s: f64,
    leases_min: u32,
    leases_max: u32,
    not_owned_at_end: usize,
    sampled_peak_rss_kib: u64,
    hwm_kib: Option<u64>,
    cpu: CpuUse,
    group_commit: GroupCommit,
    totals: Totals,
}

impl Figures {
    fn peak_rss_mib(&self) -> f64 {
        mib(self.sampled_peak_rss_kib.max(self.hwm_kib.unwrap_or(0)))
    }
}

/// State the workers and the driver share.
#[derive(Default)]
struct Shared {
    /// The measurement window, set once the fleet is steady; workers stop at
    /// its end.
    window: OnceLock<(Instant, Instant)>,
    registered: AtomicU32,
    /// Leases held across the fleet, as the workers see it: settling is
    /// complete only when this matches the coordinator's table.
    held: AtomicI64,
    /// Releases the workers were asked for (each a graceful handoff).
    released: AtomicU64,
}

impl Shared {
    fn in_window(&self, t: Instant) -> bool {
        self.window.get().is_some_and(|(from, until)| t >= *from && t < *until)
    }

    fn over(&self) -> bool {
        self.window.get().is_some_and(|(_, until)| Instant::now() >= *until)
    }
}

/// Counters of one worker, summed over the fleet.
#[derive(Debug, Default, Clone)]
struct Totals {
    heartbeats: u64,
    heartbeat_errors: u64,
    checkpoint_calls: u64,
    checkpoint_errors: u64,
    /// Checkpoint entries acknowledged inside the window.
    checkpoints_in_window: u64,
    /// Entries or releases refused as stale: the lease had moved on.
    stale: u64,
    releases: u64,
    release_errors: u64,
    reregistrations: u64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.heartbeats += o.heartbeats;
        self.heartbeat_errors += o.heartbeat_errors;
        self.checkpoint_calls += o.checkpoint_calls;
        self.checkpoint_errors += o.checkpoint_errors;
        self.checkpoints_in_window += o.checkpoints_in_window;
        self.stale += o.stale;
        self.releases += o.releases;
        self.release_errors += o.release_errors;
        self.reregistrations += o.reregistrations;
    }
}

/// What a worker task hands back.
struct WorkerResult {
    heartbeat: Latency,
    checkpoint: Latency,
    totals: Totals,
    first_error: Option<String>,
}

pub async fn run(bin: &Path, store: Store, settings: &Settings) -> anyhow::Result<Figures> {
    let stream = StreamConfig { partitions: Some(settings.partitions), ..StreamConfig::new(STREAM, HANDLER) };
    let mut coordinator = Coordinator::start_on(bin, vec![stream], store).await?;
    let rss = RssSampler::start(coordinator.pid());
    let channels = coordinator.channels(settings.channels).await?;
    let mut admin = AdminApiClient::new(channels[0].clone());
    let shared = Arc::new(Shared::default());

    let started = Instant::now();
    let mut workers = JoinSet::new();
    let stagger = STAGGER.min(JOIN_SPREAD / settings.workers.max(1));
    for i in 0..settings.workers {
        let client = WorkerApiClient::new(channels[i as usize % channels.len()].clone());
        let worker = SimWorker::new(worker_id(i), client, shared.clone())?;
        workers.spawn(worker.run(stagger * i));
    }

    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while shared.registered.load(Ordering::Relaxed) < settings.workers {
        // A refused connection may mean the coordinator died: say how.
        wait_step(&mut workers, deadline, "the workers to register")
            .await
            .map_err(|e| super::with_death(&mut coordinator, e))?;
    }
    let registered_s = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let leases = list_leases(&mut admin).await?;
        let owned = leases.iter().filter(|l| l.state() == v1::LeaseState::Owned).count();
        let held = shared.held.load(Ordering::Relaxed);
        if owned == settings.partitions as usize && leases.len() == owned && held == owned as i64 {
            break;
        }
        wait_step(&mut workers, deadline, "every lease to be owned")
            .await
            .map_err(|e| super::with_death(&mut coordinator, e))?;
    }
    let settled_s = started.elapsed().as_secs_f64();
    let handoffs_to_settle = shared.released.load(Ordering::Relaxed);

    let from = Instant::now() + WARMUP;
    let until = from + settings.duration;
    shared.window.set((from, until)).map_err(|_| anyhow::anyhow!("the measurement window was set twice"))?;
    tokio::time::sleep_until(from).await;
    let cpu = CpuMeter::start(coordinator.pid());
    let metrics_before = coordinator.scrape().await?;
    tokio::time::sleep_until(until).await;
    let cpu = cpu.stop();
    let group_commit =
        GroupCommit::between(&metrics_before, &coordinator.scrape().await?, settings.duration)?;

    let mut heartbeat = Latency::new()?;
    let mut checkpoint = Latency::new()?;
    let mut totals = Totals::default();
    let (mut first_error, mut lost_workers) = (None, 0u32);
    // A worker busy in a call at the window's end gets the call timeout.
    let joined = tokio::time::timeout(Duration::from_secs(40), async {
        let mut results = Vec::new();
        while let Some(joined) = workers.join_next().await {
            results.push(joined);
        }
        results
    })
    .await
    .context("the simulated workers did not stop within 40 s of the window's end")?;
    for result in joined {
        match result.context("a simulated worker panicked")? {
            Ok(w) => {
                heartbeat.merge(&w.heartbeat)?;
                checkpoint.merge(&w.checkpoint)?;
                totals.add(&w.totals);
                first_error = first_error.or(w.first_error);
            }
            Err(e) => {
                lost_workers += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    if lost_workers > 0 {
        bail!("{lost_workers} simulated workers failed; first error: {}", first_error.unwrap_or_default());
    }

    let leases = list_leases(&mut admin).await?;
    // Every simulated worker counts, so an idle one shows up as min 0.
    let mut per_worker: BTreeMap<String, u32> = (0..settings.workers).map(|i| (worker_id(i), 0)).collect();
    for lease in &leases {
        if let Some(count) = per_worker.get_mut(lease.owner.as_str()) {
            *count += 1;
        }
    }
    let not_owned_at_end = leases.iter().filter(|l| l.state() != v1::LeaseState::Owned).count();

    coordinator.check_alive()?;
    let hwm_kib = coordinator.peak_rss_kib();
    let sampled_peak_rss_kib = rss.peak_kib();
    coordinator.stop()?;

    check_calls("heartbeats", totals.heartbeats, totals.heartbeat_errors, first_error.as_deref())?;
    check_calls(
        "checkpoint calls",
        totals.checkpoint_calls,
        totals.checkpoint_errors,
        first_error.as_deref(),
    )?;
    Ok(Figures {
        registered_s,
        settled_s,
        stagger,
        handoffs_to_settle,
        heartbeat: heartbeat.summary(),
        checkpoint_call: checkpoint.summary(),
        checkpoints_per_s: totals.checkpoints_in_window as f64 / settings.duration.as_secs_f64(),
        leases_min: per_worker.values().copied().min().unwrap_or(0),
        leases_max: per_worker.values().copied().max().unwrap_or(0),
        not_owned_at_end,
        sampled_peak_rss_kib,
        hwm_kib,
        cpu,
        group_commit,
        totals,
    })
}

fn worker_id(i: u32) -> String {
    format!("bench-w{i:04}")
}

/// Waits a little for the fleet to progress; fails at `deadline` or as soon
/// as a worker task ends early (they only end early on a harness error).
async fn wait_step(
    workers: &mut JoinSet<anyhow::Result<WorkerResult>>,
    deadline: Instant,
    what: &str,
) -> anyhow::Result<()> {
    if let Some(joined) = workers.try_join_next() {
        match joined.context("a simulated worker panicked")? {
            Err(e) => return Err(e.context(format!("while waiting for {what}"))),
            Ok(_) => bail!("a simulated worker stopped before the measurement"),
        }
    }
    if Instant::now() >= deadline {
        bail!("timed out after {SETTLE_TIMEOUT:?} waiting for {what}");
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    Ok(())
}

async fn list_leases(admin: &mut AdminApiClient<Channel>) -> anyhow::Result<Vec<v1::LeaseInfo>> {
    let request = v1::ListLeasesRequest { name: STREAM.into() };
    Ok(admin.list_leases(request).await.context("ListLeases failed")?.into_inner().leases)
}

/// A lease a simulated worker runs.
struct Held {
    wire: v1::LeaseId,
    epoch: u64,
    /// The next offset "to process": moves by one per checkpoint round.
    offset: i64,
}

/// One simulated worker: its lease set follows the coordinator's
/// instructions, like a real worker's.
struct SimWorker {
    id: String,
    client: WorkerApiClient<Channel>,
    shared: Arc<Shared>,
    held: BTreeMap<LeaseId, Held>,
    heartbeat: Latency,
    checkpoint: Latency,
    totals: Totals,
    first_error: Option<String>,
    /// ReleaseDone calls in flight, and the limit on them.
    confirming: JoinSet<Result<v1::CheckpointStatus, tonic::Status>>,
    release_permits: Arc<Semaphore>,
}

impl SimWorker {
    fn new(id: String, client: WorkerApiClient<Channel>, shared: Arc<Shared>) -> anyhow::Result<Self> {
        Ok(Self {
            id,
            client,
            shared,
            held: BTreeMap::new(),
            heartbeat: Latency::new()?,
            checkpoint: Latency::new()?,
            totals: Totals::default(),
            first_error: None,
            confirming: JoinSet::new(),
            release_permits: Arc::new(Semaphore::new(RELEASE_CONCURRENCY)),
        })
    }

    async fn run(mut self, delay: Duration) -> anyhow::Result<WorkerResult> {
        tokio::time::sleep(delay).await;
        self.join().await?;
        self.shared.registered.fetch_add(1, Ordering::Relaxed);
        let mut tick = tokio::time::interval(HALF_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beat = true;
        loop {
            tick.tick().await;
            self.count_releases(false).await;
            if self.shared.over() {
                break;
            }
            if beat {
                self.heartbeat().await;
            } else {
                self.checkpoint().await;
            }
            beat = !beat;
        }
        self.count_releases(true).await;
        Ok(WorkerResult {
            heartbeat: self.heartbeat,
            checkpoint: self.checkpoint,
            totals: self.totals,
            first_error: self.first_error,
        })
    }

    /// The first registration, retried briefly: the coordinator is local,
    /// so persistent failure is a harness failure.
    async fn join(&mut self) -> anyhow::Result<()> {
        let mut attempt = 0;
        loop {
            match self.register().await {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= 4 => {
                    return Err(e.context(format!("worker {} cannot register", self.id)));
                }
                Err(_) => attempt += 1,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn register(&mut self) -> anyhow::Result<()> {
        let held = self
            .held
            .values()
            .map(|h| v1::HeldLease { lease: Some(h.wire.clone()), epoch: h.epoch })
            .collect();
        let request = v1::RegisterRequest {
            worker_id: self.id.clone(),
            address: String::new(),
            handlers: vec![HANDLER.into()],
            capacity: 0,
            held,
            concurrency: 1,
            incarnation: 0,
        };
        let reply = self.client.register(request).await.context("Register failed")?.into_inner();
        // The reply is the authoritative set: Acquire for every lease kept
        // or granted. Start from nothing and apply it.
        let before = self.held.len();
        self.held.clear();
        self.shared.held.fetch_sub(before as i64, Ordering::Relaxed);
        let releases = self.apply(reply.instructions)?;
        self.confirm_releases(releases);
        Ok(())
    }

    async fn heartbeat(&mut self) {
        let leases = self
            .held
            .values()
            .map(|h| v1::LeaseLoad {
                lease: Some(h.wire.clone()),
                epoch: h.epoch,
                position: h.offset,
                lag: 0,
                records_in_per_s: 100.0,
                records_out_per_s: 100.0,
                busy_ratio: 0.1,
            })
            .collect();
        let held = self
            .held
            .values()
            .map(|h| v1::HeldLease { lease: Some(h.wire.clone()), epoch: h.epoch })
            .collect();
        let request = v1::HeartbeatRequest {
            worker_id: self.id.clone(),
            load: Some(v1::LoadReport { leases, cpu: 0.1, inflight_batches: 0, usage: vec![] }),
            draining: false,
            unhealthy: vec![],
            held,
            incarnation: 0,
        };
        let started = Instant::now();
        let result = self.client.heartbeat(request).await;
        if self.shared.in_window(started) {
            self.heartbeat.record(started.elapsed());
        }
        match result {
            Ok(reply) => {
                self.totals.heartbeats += 1;
                match self.apply(reply.into_inner().instructions) {
                    Ok(releases) => self.confirm_releases(releases),
                    Err(e) => self.failed(format!("{e:#}")),
                }
            }
            // Expired (the coordinator was too slow for our heartbeats):
            // register again, as a real worker must, and count it.
            Err(status) if status.code() == tonic::Code::NotFound => {
                self.totals.reregistrations += 1;
                if let Err(e) = self.register().await {
                    self.totals.heartbeat_errors += 1;
                    self.failed(format!("{e:#}"));
                }
            }
            Err(status) => {
                self.totals.heartbeat_errors += 1;
                self.failed(format!("Heartbeat failed: {status}"));
            }
        }
    }

    /// One call with every held lease, each one offset further.
    async fn checkpoint(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut ids = Vec::with_capacity(self.held.len());
        let mut entries = Vec::with_capacity(self.held.len());
        for (id, h) in &mut self.held {
            h.offset += 1;
            ids.push(id.clone());
            entries.push(v1::CheckpointEntry {
                window: None,
                lease: Some(h.wire.clone()),
                epoch: h.epoch,
                offset: h.offset,
            });
        }
        let request = v1::CheckpointRequest { worker_id: self.id.clone(), entries };
        let started = Instant::now();
        let result = self.client.checkpoint(request).await;
        let in_window = self.shared.in_window(started);
        if in_window {
            self.checkpoint.record(started.elapsed());
        }
        let results = match result {
            Ok(reply) => reply.into_inner().results,
            Err(status) => {
                self.totals.checkpoint_errors += 1;
                return self.failed(format!("Checkpoint failed: {status}"));
            }
        };
        self.totals.checkpoint_calls += 1;
        if results.len() != ids.len() {
            self.totals.checkpoint_errors += 1;
            return self.failed(format!("{} checkpoint results for {} entries", results.len(), ids.len()));
        }
        for (id, result) in ids.iter().zip(results) {
            match result.status() {
                v1::CheckpointStatus::Ok if in_window => self.totals.checkpoints_in_window += 1,
                v1::CheckpointStatus::Ok => {}
                // The lease moved on (a forced handoff): stop running it.
                v1::CheckpointStatus::StaleEpoch => {
                    self.totals.stale += 1;
                    self.drop_lease(id);
                }
                other => {
                    self.totals.checkpoint_errors += 1;
                    self.failed(format!("checkpoint of {id}: {other:?}"));
                }
            }
        }
    }

    /// Follows instructions; returns the releases to confirm.
    fn apply(&mut self, instructions: Vec<v1::Instruction>) -> anyhow::Result<Vec<(v1::LeaseId, u64, i64)>> {
        use v1::instruction::Kind;
        let mut releases = Vec::new();
        for instruction in instructions {
            match instruction.kind {
                Some(Kind::Acquire(a)) => {
                    let wire = a.lease.context("an Acquire without a lease")?;
                    let id = LeaseId::try_from(&wire).context("an Acquire with a bad lease")?;
                    let offset = a.start.and_then(|s| s.checkpoint()).unwrap_or(0);
                    if self.held.insert(id, Held { wire, epoch: a.epoch, offset }).is_none() {
                        self.shared.held.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Kind::Release(r)) => {
                    let wire = r.lease.context("a Release without a lease")?;
                    let id = LeaseId::try_from(&wire).context("a Release with a bad lease")?;
                    let offset = self.held.get(&id).map_or(0, |h| h.offset);
                    if self.held.contains_key(&id) {
                        self.shared.released.fetch_add(1, Ordering::Relaxed);
                    }
                    self.drop_lease(&id);
                    releases.push((wire, r.epoch, offset));
                }
                Some(Kind::Revoke(r)) => {
                    let wire = r.lease.context("a Revoke without a lease")?;
                    let id = LeaseId::try_from(&wire).context("a Revoke with a bad lease")?;
                    // A revoke of an older epoch must not stop a newer grant.
                    if self.held.get(&id).is_some_and(|h| h.epoch <= r.epoch) {
                        self.drop_lease(&id);
                    }
                }
                None => bail!("an instruction without a kind"),
            }
        }
        Ok(releases)
    }

    fn drop_lease(&mut self, id: &LeaseId) {
        if self.held.remove(id).is_some() {
            self.shared.held.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Confirms releases with their final offset in the background, a few
    /// at a time: like a real worker, a long handoff (the first workers give
    /// up thousands of leases as the fleet joins) must not delay heartbeats,
    /// or the worker would expire.
    fn confirm_releases(&mut self, releases: Vec<(v1::LeaseId, u64, i64)>) {
        for (lease, epoch, offset) in releases {
            let mut client = self.client.clone();
            let permits = self.release_permits.clone();
            let request = v1::ReleaseDoneRequest {
                window: None,
                worker_id: self.id.clone(),
                lease: Some(lease),
                epoch,
                offset: Some(offset),
            };
            self.confirming.spawn(async move {
                // The semaphore is never closed, so this only waits.
                let _permit = permits.acquire().await;
                client.release_done(request).await.map(|r| r.into_inner().status())
            });
        }
    }

    /// Counts the release confirmations that have finished; with `all`,
    /// waits for the rest first.
    async fn count_releases(&mut self, all: bool) {
        loop {
            let joined =
                if all { self.confirming.join_next().await } else { self.confirming.try_join_next() };
            let Some(joined) = joined else { return };
            match joined {
                Ok(Ok(v1::CheckpointStatus::Ok)) => self.totals.releases += 1,
                Ok(Ok(v1::CheckpointStatus::StaleEpoch)) => self.totals.stale += 1,
                Ok(Ok(other)) => {
                    self.totals.release_errors += 1;
                    self.failed(format!("ReleaseDone: {other:?}"));
                }
                Ok(Err(status)) => {
                    self.totals.release_errors += 1;
                    self.failed(format!("ReleaseDone failed: {status}"));
                }
                Err(e) => {
                    self.totals.release_errors += 1;
                    self.failed(format!("a ReleaseDone task failed: {e}"));
                }
            }
        }
    }

    fn failed(&mut self, error: String) {
        self.first_error.get_or_insert(error);
    }
}

impl Figures {
    /// The fleet's heartbeat p99 (ms) and the coordinator's peak RSS (MiB).
    pub fn headline(&self) -> (Option<f64>, Option<f64>) {
        (Some(self.heartbeat.p99_ms), Some(self.peak_rss_mib()))
    }

    pub fn print(&self, s: &Settings) {
        let t = &self.totals;
        println!();
        println!(
            "coordinator fleet: {} workers, {} partitions, {} channels, {} s after settling + {} s warm-up",
            s.workers,
            s.partitions,
            s.channels,
            s.duration.as_secs(),
            WARMUP.as_secs()
        );
        println!(
            "  {:<32} {:>12.1}   target <= {:.0} MiB: {}",
            "coordinator peak RSS (MiB)",
            self.peak_rss_mib(),
            TARGET_RSS_MIB,
            verdict(self.peak_rss_mib() <= TARGET_RSS_MIB)
        );
        println!(
            "  {:<32} {:>12}",
            "  sampled VmRSS / VmHWM (MiB)",
            format!(
                "{:.1} / {}",
                mib(self.sampled_peak_rss_kib),
                self.hwm_kib.map_or("n/a".to_owned(), |k| format!("{:.1}", mib(k)))
            )
        );
        println!("  {:<32} {:>12}", "heartbeat p50 / p99 / max", self.heartbeat.line());
        println!("  {:<32} {:>12}", "cores used coordinator / harness", self.cpu.line());
        self.group_commit.print();
        println!("  {:<32} {:>12}", "heartbeats measured", self.heartbeat.count);
        println!(
            "  {:<32} {:>12}",
            "leases per worker min / max",
            format!("{} / {}", self.leases_min, self.leases_max)
        );
        println!("  {:<32} {:>12.0}", "acknowledged checkpoints/s", self.checkpoints_per_s);
        println!("  {:<32} {:>12}", "checkpoint call p50 / p99 / max", self.checkpoint_call.line());
        println!(
            "  {:<32} {:>12}",
            "registered / settled after (s)",
            format!("{:.1} / {:.1}", self.registered_s, self.settled_s)
        );
        println!(
            "  {:<32} {:>12}",
            "  joins spaced (ms)",
            format!("{:.1}", self.stagger.as_secs_f64() * 1000.0)
        );
        println!(
            "  {:<32} {:>12}",
            "settled after the last join (s)",
            format!("{:.1}", self.settled_s - self.registered_s)
        );
        println!(
            "  {:<32} {:>12}",
            "handoffs to settle, per lease",
            format!(
                "{}, {:.2}",
                self.handoffs_to_settle,
                self.handoffs_to_settle as f64 / f64::from(s.partitions.max(1))
            )
        );
        println!("  {:<32} {:>12}", "handoffs confirmed", t.releases);
        println!(
            "  {:<32} {:>12}",
            "errors hb / ckpt / release",
            format!("{} / {} / {}", t.heartbeat_errors, t.checkpoint_errors, t.release_errors)
        );
        println!("  {:<32} {:>12}", "stale, re-registrations", format!("{}, {}", t.stale, t.reregistrations));
        if self.not_owned_at_end > 0 {
            println!("  {:<32} {:>12}", "leases not owned at the end", self.not_owned_at_end);
        }
    }

    pub fn json(&self, s: &Settings) -> serde_json::Value {
        let t = &self.totals;
        json!({
            "workers": s.workers,
            "partitions": s.partitions,
            "channels": s.channels,
            "duration_s": s.duration.as_secs_f64(),
            "warmup_s": WARMUP.as_secs_f64(),
            "registered_after_s": round3(self.registered_s),
            "settled_after_s": round3(self.settled_s),
            "settled_after_last_join_s": round3(self.settled_s - self.registered_s),
            "join_stagger_ms": round3(self.stagger.as_secs_f64() * 1000.0),
            "handoffs_to_settle": self.handoffs_to_settle,
            "handoffs_per_lease": round3(self.handoffs_to_settle as f64 / f64::from(s.partitions.max(1))),
            "peak_rss_mib": round3(self.peak_rss_mib()),
            "sampled_peak_rss_mib": round3(mib(self.sampled_peak_rss_kib)),
            "vm_hwm_mib": self.hwm_kib.map(|k| round3(mib(k))),
            "target_rss_mib": TARGET_RSS_MIB,
            "target_met": self.peak_rss_mib() <= TARGET_RSS_MIB,
            "heartbeat_latency": self.heartbeat.json(),
            "cpu": self.cpu.json(),
            "group_commit": self.group_commit.json(),
            "checkpoint_call_latency": self.checkpoint_call.json(),
            "acknowledged_checkpoints_per_s": round3(self.checkpoints_per_s),
            "leases_per_worker": { "min": self.leases_min, "max": self.leases_max },
            "leases_not_owned_at_end": self.not_owned_at_end,
            "heartbeats": t.heartbeats,
            "heartbeat_errors": t.heartbeat_errors,
            "checkpoint_calls": t.checkpoint_calls,
            "checkpoint_errors": t.checkpoint_errors,
            "handoffs_confirmed": t.releases,
            "release_errors": t.release_errors,
            "stale": t.stale,
            "reregistrations": t.reregistrations,
        })
    }
}
