//! The pure core of the coordinator: membership, the lease table and `count`
//! assignment.
//!
//! Nothing here does IO or reads a clock: every event method takes `now`, and
//! its effects are (a) the reply it returns, (b) instructions queued in the
//! per-worker outbox (delivered with the next heartbeat or register reply) and
//! (c) lease records marked dirty for the store ([`Core::take_dirty`]). This
//! is what makes assignment property-testable and lease expiry testable
//! without sleeping.
//!
//! Fencing rests on one rule: the epoch of a lease goes up by one on every
//! grant, and a checkpoint or release is accepted only from the lease's
//! current owner quoting its current epoch.

mod assign;
pub mod balance;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shardline_proto::{LeaseId, LeaseKind, Start, WindowState};

pub type WorkerId = String;

/// The timeouts and balancing knobs the core needs; the rest of the config
/// lives in the IO layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoreConfig {
    /// A worker silent this long is dead and loses its leases.
    pub session_timeout: Duration,
    /// A graceful handoff not confirmed within this is forced (epoch + 1).
    pub handoff_timeout: Duration,
    pub balancer: Balancer,
}

/// How leases are placed (`[balancer] strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Lease counts within one per worker (KCL 2.x, Kafka's sticky assignors).
    Count,
    /// Counts as far as load allows, and load moves when a worker drowns.
    #[default]
    Load,
}

/// The `[balancer]` settings (see [`balance`]), parsed straight from the
/// coordinator's config: these defaults are the only ones.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Balancer {
    pub strategy: Strategy,
    /// A worker above the fleet's mean utilisation × (1 + threshold) is
    /// overloaded (0.05..5).
    pub threshold: f64,
    /// Below this utilisation no worker counts as overloaded (0..1).
    pub min_utilisation: f64,
    /// Most leases one plan moves (1..1000).
    pub max_moves: usize,
    /// A worker must stay overloaded this long before a plan.
    #[serde(with = "humantime_serde")]
    pub stable_for: Duration,
    /// No new plan this long after one.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// A lease's reports are ignored this long after it changed owner.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// Weight of the newest report in the moving average (0.01..1).
    pub ema_alpha: f64,
    /// Utilisation `desired_workers` plans for (0.05..1).
    pub target_utilisation: f64,
    /// `desired_workers` asks for enough workers to clear each lease's
    /// backlog within this long, on top of what keeps up with arrivals
    /// (1 s..1 h; see [`balance::Demand`]).
    #[serde(with = "humantime_serde")]
    pub backlog_drain: Duration,
    /// Placement waits while workers keep joining: until none joined for
    /// this long (at most [`JOIN_HOLD_LIMIT`] after the first of the
    /// burst), so a fleet that starts or scales out one worker at a time is
    /// planned once, each lease granted or moved once, not once per join.
    #[serde(with = "humantime_serde")]
    pub join_window: Duration,
}

/// Longest a stream of joins holds placement back: a fleet that never
/// stops joining still gets its leases planned this often.
pub const JOIN_HOLD_LIMIT: Duration = Duration::from_secs(5);

impl Default for Balancer {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            threshold: 0.2,
            min_utilisation: 0.5,
            max_moves: 8,
            stable_for: Duration::from_secs(5),
            cooldown: Duration::from_secs(10),
            settle: Duration::from_secs(3),
            ema_alpha: 0.3,
            target_utilisation: 0.7,
            backlog_drain: Duration::from_secs(30),
            join_window: Duration::from_millis(500),
        }
    }
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            session_timeout: Duration::from_secs(10),
            handoff_timeout: Duration::from_secs(30),
            balancer: Balancer::default(),
        }
    }
}

/// What the core knows of a lease's load, from its owner's heartbeats.
#[derive(Debug, Clone, Default)]
pub struct LeaseModel {
    /// Handler seconds per second, smoothed.
    pub weight: f64,
    /// Whether any report has been taken in yet.
    pub measured: bool,
    /// The last few lag reports, oldest first.
    pub lags: std::collections::VecDeque<i64>,
    /// Reports before this are ignored (the lease just moved).
    pub settle_until: Option<Instant>,
    /// What it asks of the fleet: arrivals, backlog, cost per record.
    pub demand: balance::Demand,
}

impl LeaseModel {
    /// Lag rose on each of the last reports.
    pub fn lag_growing(&self) -> bool {
        self.lags.len() >= 3 && self.lags.iter().zip(self.lags.iter().skip(1)).all(|(a, b)| b > a)
    }
}

/// What the store keeps of a lease. The handoff state is deliberately not
/// persisted: after a restart the owner simply keeps the lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub lease: LeaseId,
    pub epoch: u64,
    pub owner: Option<WorkerId>,
    /// The next offset to process; `None` until the first checkpoint.
    pub checkpoint: Option<i64>,
    /// A partition that appeared after its mapping was created: without a
    /// checkpoint it starts at the oldest record, not at the mapping's
    /// `starting_position` (which is for the partitions present when the
    /// mapping was created).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_earliest: bool,
    /// With tumbling windows: the window as of `checkpoint`, with its state;
    /// written with the checkpoint, in the same record, by the same
    /// fenced call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowState>,
}

impl LeaseRecord {
    /// A lease nobody has held yet.
    pub fn new(lease: LeaseId) -> Self {
        Self { lease, epoch: 0, owner: None, checkpoint: None, from_earliest: false, window: None }
    }

    /// Where its next owner starts.
    pub fn start(&self) -> Start {
        match self.checkpoint {
            Some(offset) => Start::Checkpoint(offset),
            None if self.from_earliest => Start::Earliest,
            None => Start::MappingDefault,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    Unassigned,
    Owned,
    /// The owner was asked to release; `to` gets the lease once it confirms
    /// (or at `deadline`, forced). `to == None`: back to unassigned.
    Releasing {
        to: Option<WorkerId>,
        deadline: Instant,
    },
    /// A queue slot above its subscription's current slot count: kept (with
    /// its epoch) for when the subscription grows again, never assigned.
    Parked,
}

#[derive(Debug, Clone)]
pub struct Lease {
    pub record: LeaseRecord,
    /// The handler of the mapping this lease belongs to; `None` while the
    /// lease is known only from the store (its mapping is not configured).
    pub handler: Option<String>,
    pub state: LeaseState,
    pub since: Instant,
    /// Heartbeats in a row in which its owner did not report running it
    /// (after an Acquire was sent again each time).
    pub unrun: u32,
}

/// An operator's checkpoint change: the lease, its new checkpoint, and (an
/// import) the tumbling window that goes with it.
pub type Change = (LeaseId, i64, Option<WindowState>);

/// What a worker is told to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// Start processing from `start` (with tumbling windows, resuming
    /// `window`). Idempotent: a worker already running the lease under
    /// `epoch` ignores it.
    Acquire { lease: LeaseId, epoch: u64, start: Start, window: Option<WindowState> },
    /// Finish the in-flight batch, checkpoint, then confirm with
    /// release_done (at once, with no offset, when not running it).
    Release { lease: LeaseId, epoch: u64 },
    /// Stop at once without checkpointing (a no-op unless running `epoch`).
    Revoke { lease: LeaseId, epoch: u64 },
}

impl Instruction {
    pub fn lease(&self) -> &LeaseId {
        match self {
            Instruction::Acquire { lease, .. }
            | Instruction::Release { lease, .. }
            | Instruction::Revoke { lease, .. } => lease,
        }
    }
}

/// One heartbeat: liveness, what the worker runs, and its load.
#[derive(Debug, Clone, Default)]
pub struct Beat {
    /// The incarnation the worker registered with.
    pub incarnation: u64,
    /// Every lease the worker runs now, with its epoch: the table is
    /// reconciled against it, so any lost instruction is sent again.
    pub held: BTreeMap<LeaseId, u64>,
    pub load: WorkerLoad,
}

/// Per-lease figures from a worker's heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LeaseLoad {
    pub position: i64,
    pub lag: i64,
    pub records_in_per_s: f64,
    pub records_out_per_s: f64,
    pub busy_ratio: f64,
}

/// A worker's load report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerLoad {
    pub cpu: f64,
    pub inflight_batches: u32,
    pub leases: BTreeMap<LeaseId, LeaseLoad>,
    /// The worker's own health report (e.g. its broker connection is down);
    /// empty when healthy.
    pub unhealthy: Vec<String>,
    /// Handler use per mapping, cumulative since the worker started.
    pub usage: Vec<(String, crate::usage::Counts)>,
}

#[derive(Debug, Clone)]
pub struct Worker {
    pub id: WorkerId,
    pub address: String,
    pub handlers: BTreeSet<String>,
    /// Most leases it takes; 0 = no limit.
    pub capacity: u32,
    pub last_seen: Instant,
    /// Known only from the store after a coordinator restart; it keeps its
    /// leases until it registers again or its session times out.
    pub restored: bool,
    /// Shutting down: gets no new leases, keeps releasing its own.
    pub draining: bool,
    pub load: WorkerLoad,
    /// Batches it runs at once: the denominator of its utilisation.
    pub concurrency: u32,
    /// The process that registered last under this id; `None` for a worker
    /// known only from the store (restored), which keeps its epochs when it
    /// comes back whatever its incarnation.
    pub incarnation: Option<u64>,
    /// It did not take up leases sent to it (its replies are lost, or it
    /// fenced itself): it gets none until then, like a draining worker.
    pub suspect_until: Option<Instant>,
}

impl Worker {
    /// Whether new leases (and handoffs) may go to it: not known only from
    /// the store, not shutting down, not leaving leases un-run.
    pub fn takes_leases(&self) -> bool {
        !self.restored && !self.draining && self.suspect_until.is_none()
    }
}

/// A worker joining (or re-joining).
#[derive(Debug, Clone, Default)]
pub struct Registration {
    pub worker: WorkerId,
    pub address: String,
    pub handlers: BTreeSet<String>,
    pub capacity: u32,
    /// Batches it runs at once (its node's concurrency); 0: unknown (1).
    pub concurrency: u32,
    /// Leases the worker still runs, with the epoch it runs them under.
    pub held: Vec<(LeaseId, u64)>,
    /// Drawn once per process: another value under a known id is a new
    /// process, whose leases get new epochs.
    pub incarnation: u64,
}

/// A lease as it was before an operator changed its checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Before {
    pub lease: LeaseId,
    pub owner: Option<WorkerId>,
    pub epoch: u64,
    pub checkpoint: Option<i64>,
}

/// The answer to a checkpoint or a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointOutcome {
    /// Accepted; the stored checkpoint (never lower than before).
    Ok {
        checkpoint: Option<i64>,
    },
    /// The caller is not the owner under this epoch: it lost the lease.
    Stale {
        current_epoch: u64,
    },
    UnknownLease,
    /// The offset is past the partition's high watermark as the
    /// coordinator last read it from Kafka; nothing changed. The IO layer
    /// reads the watermark again before it refuses (it may have moved).
    BeyondWatermark {
        high: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("unknown worker `{0}`: register again")]
    UnknownWorker(WorkerId),
    /// Another process registered under the same worker id since: this one
    /// is fenced and must stop (two live processes must not share an id).
    #[error("worker `{0}` was superseded by a newer process registered under the same id")]
    Superseded(WorkerId),
    #[error("unknown lease `{0}`")]
    UnknownLease(LeaseId),
    #[error("`{0}` is a queue slot; only shards have checkpoints")]
    NotAShard(LeaseId),
    #[error("`{0}`: offset {1} is negative; allowed: 0 or more")]
    NegativeOffset(LeaseId, i64),
    #[error("`{0}` is listed twice")]
    Duplicate(LeaseId),
}

/// Counters the IO layer turns into metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Workers declared dead after their session timed out.
    pub expired_workers: u64,
    /// Leases granted again after their owner died or a handoff was forced.
    pub failovers: u64,
    /// Graceful handoffs started by the balancer.
    pub rebalance_moves: u64,
    pub forced_handoffs: u64,
    /// Moves planned by the `load` strategy (also in `rebalance_moves`).
    pub load_moves: u64,
    /// Load figures ignored: about leases the reporter does not hold, or
    /// not finite and non-negative.
    pub load_figures_dropped: u64,
}

/// Heartbeats in a row a worker may leave an owned lease un-run (its
/// Acquire sent again each time) before the lease is taken back.
pub const UNRUN_LIMIT: u32 = 3;

/// How often the `load` strategy looks at the fleet's figures. They change
/// only with heartbeats (one a second per worker), and a look walks the
/// whole table: at every tick it held heartbeats up for tens of
/// milliseconds at 5,000 leases (issue 17). `stable_for` and `cooldown` are
/// seconds long, so a look a second delays a plan by under a second.
pub const LOAD_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The lease table and membership.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    workers: BTreeMap<WorkerId, Worker>,
    leases: BTreeMap<LeaseId, Lease>,
    outbox: BTreeMap<WorkerId, Vec<Instruction>>,
    dirty: BTreeSet<LeaseId>,
    counters: Counters,
    /// Each subscription's current slot count: slots at or above it park.
    slot_limits: BTreeMap<String, u32>,
    /// Load per lease, for the `load` strategy.
    model: BTreeMap<LeaseId, LeaseModel>,
    /// Since when some worker has been overloaded, and when the last load
    /// plan was made.
    overloaded_since: Option<Instant>,
    last_plan: Option<Instant>,
    /// When the `load` strategy last looked ([`LOAD_CHECK_EVERY`]).
    last_load_check: Option<Instant>,
    /// The high watermark of each shard, as the coordinator last read it
    /// from Kafka itself (never what a worker reports): a checkpoint may
    /// not go past it. Only leases in the table, so bounded by it.
    watermarks: BTreeMap<LeaseId, i64>,
    /// Streams discovery has reported at least once (with or without
    /// partitions): a partition that appears later starts at the earliest
    /// offset. Rebuilt on restore from the streams with leases.
    known_streams: BTreeSet<String>,
    /// Index: the leases each worker owns (`record.owner`), so per-worker
    /// work (heartbeat reconcile, register) costs the worker's share, not
    /// the table. Kept by [`Core::set_owner`], the one place owners change.
    owned: BTreeMap<WorkerId, BTreeSet<LeaseId>>,
    /// Index: the leases in [`LeaseState::Unassigned`], so placement costs
    /// what there is to place. Kept by [`Core::set_state`].
    unassigned: BTreeSet<LeaseId>,
    /// Something changed that count balance may have to answer (a worker
    /// came or went or changed eligibility, a lease was placed); without
    /// it, placement after an event that cannot unbalance (a confirmed
    /// handoff) skips the count planner.
    rebalance_due: bool,
    /// The last registration, and the first of the current burst of them:
    /// placement is held while they keep coming (`join_window`).
    last_join: Option<Instant>,
    burst_since: Option<Instant>,
}

impl Core {
    pub fn new(cfg: CoreConfig) -> Self {
        Self {
            cfg,
            workers: BTreeMap::new(),
            leases: BTreeMap::new(),
            outbox: BTreeMap::new(),
            dirty: BTreeSet::new(),
            counters: Counters::default(),
            slot_limits: BTreeMap::new(),
            model: BTreeMap::new(),
            overloaded_since: None,
            last_plan: None,
            last_load_check: None,
            watermarks: BTreeMap::new(),
            known_streams: BTreeSet::new(),
            owned: BTreeMap::new(),
            unassigned: BTreeSet::new(),
            rebalance_due: false,
            last_join: None,
            burst_since: None,
        }
    }

    /// Rebuilds the table from the store after a restart. Owners become
    /// restored workers that keep their leases for one session timeout, so
    /// a coordinator restart causes no rebalance storm.
    pub fn restore(cfg: CoreConfig, records: Vec<LeaseRecord>, now: Instant) -> Self {
        let mut core = Self::new(cfg);
        for record in records {
            let state = match &record.owner {
                Some(owner) => {
                    core.workers.entry(owner.clone()).or_insert_with(|| Worker {
                        id: owner.clone(),
                        address: String::new(),
                        handlers: BTreeSet::new(),
                        capacity: 0,
                        last_seen: now,
                        restored: true,
                        draining: false,
                        load: WorkerLoad::default(),
                        concurrency: 1,
                        incarnation: None,
                        suspect_until: None,
                    });
                    LeaseState::Owned
                }
                None => LeaseState::Unassigned,
            };
            if record.lease.kind == LeaseKind::Shard {
                core.known_streams.insert(record.lease.name.clone());
            }
            if let Some(owner) = &record.owner {
                core.owned.entry(owner.clone()).or_default().insert(record.lease.clone());
            }
            if state == LeaseState::Unassigned {
                core.unassigned.insert(record.lease.clone());
            }
            core.leases
                .insert(record.lease.clone(), Lease { record, handler: None, state, since: now, unrun: 0 });
        }
        core
    }

    pub fn config(&self) -> CoreConfig {
        self.cfg
    }

    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values()
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    pub fn lease(&self, id: &LeaseId) -> Option<&Lease> {
        self.leases.get(id)
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Lease records changed since the last call; the IO layer writes them
    /// to the store before acknowledging anything that depends on them.
    pub fn take_dirty(&mut self) -> Vec<LeaseRecord> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty.iter().filter_map(|id| self.leases.get(id).map(|l| l.record.clone())).collect()
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Leases a worker owns (including those it is releasing).
    pub fn owned_by<'a>(&'a self, worker: &'a str) -> impl Iterator<Item = &'a Lease> + 'a {
        self.owned.get(worker).into_iter().flatten().filter_map(|id| self.leases.get(id))
    }

    // ------------------------------------------------------------ events

    /// A worker joins, or re-joins after a coordinator restart or a lost
    /// session. The reply is the worker's authoritative lease set.
    ///
    /// A registration under a known id with another incarnation is a new
    /// process: every lease the id owns gets epoch + 1 (and one it was
    /// releasing goes on to its receiver), so the older process, if it is
    /// still alive, is fenced from checkpointing and told it was superseded.
    pub fn register(&mut self, now: Instant, reg: Registration) -> Vec<Instruction> {
        let id = reg.worker.clone();
        let known = self.workers.get(&id).and_then(|w| w.incarnation);
        let restored = self.workers.get(&id).is_some_and(|w| w.restored);
        let worker = self.workers.entry(id.clone()).or_insert_with(|| Worker {
            id: id.clone(),
            address: String::new(),
            handlers: BTreeSet::new(),
            capacity: 0,
            last_seen: now,
            restored: false,
            draining: false,
            load: WorkerLoad::default(),
            concurrency: 1,
            incarnation: None,
            suspect_until: None,
        });
        worker.draining = false;
        worker.concurrency = reg.concurrency.max(1);
        worker.address = reg.address;
        worker.handlers = reg.handlers;
        worker.capacity = reg.capacity;
        worker.last_seen = now;
        worker.restored = false;
        worker.incarnation = Some(reg.incarnation);
        // The reply replaces whatever was queued: it states the whole truth.
        self.outbox.remove(&id);
        self.note_join(now);
        let held: BTreeMap<LeaseId, u64> = reg.held.into_iter().collect();
        if known.is_some_and(|k| k != reg.incarnation) {
            self.new_incarnation(now, &id, &BTreeMap::new());
        } else if restored {
            // Known only from the store: which process ran these is unknown,
            // so only what it quotes keeps its epoch.
            self.new_incarnation(now, &id, &held);
        }

        let mut reply = Vec::new();
        for (lease, epoch) in &held {
            let keeps = self
                .leases
                .get(lease)
                .is_some_and(|l| l.record.owner.as_deref() == Some(id.as_str()) && l.record.epoch == *epoch);
            if !keeps {
                reply.push(Instruction::Revoke { lease: lease.clone(), epoch: *epoch });
            }
        }
        let owned: Vec<LeaseId> = self.owned_by(&id).map(|l| l.record.lease.clone()).collect();
        for lease_id in owned {
            let Some(lease) = self.leases.get(&lease_id) else { continue };
            let running = held.get(&lease_id) == Some(&lease.record.epoch);
            match lease.state.clone() {
                LeaseState::Releasing { to, .. } if !running => {
                    // It does not run the lease any more: the handoff is done.
                    self.finish_release(now, &lease_id, to);
                }
                LeaseState::Releasing { .. } => {
                    let epoch = lease.record.epoch;
                    reply.push(Instruction::Acquire {
                        lease: lease_id.clone(),
                        epoch,
                        start: lease.record.start(),
                        window: lease.record.window.clone(),
                    });
                    reply.push(Instruction::Release { lease: lease_id, epoch });
                }
                _ => reply.push(Instruction::Acquire {
                    lease: lease_id,
                    epoch: lease.record.epoch,
                    start: lease.record.start(),
                    window: lease.record.window.clone(),
                }),
            }
        }
        self.assign(now);
        reply.extend(self.outbox.remove(&id).unwrap_or_default());
        reply
    }

    /// A worker (re)joined: placement waits for the burst to pass (see
    /// `join_window`).
    fn note_join(&mut self, now: Instant) {
        let window = self.cfg.balancer.join_window;
        if self.last_join.is_none_or(|t| now.saturating_duration_since(t) >= window) {
            self.burst_since = Some(now);
        }
        self.last_join = Some(now);
        self.rebalance_due = true;
    }

    /// Whether placement is held: a worker joined within `join_window`, in
    /// a burst younger than [`JOIN_HOLD_LIMIT`].
    pub(crate) fn joining(&self, now: Instant) -> bool {
        let window = self.cfg.balancer.join_window;
        !window.is_zero()
            && self.last_join.is_some_and(|t| now.saturating_duration_since(t) < window)
            && self.burst_since.is_some_and(|t| now.saturating_duration_since(t) < JOIN_HOLD_LIMIT)
    }

    /// Another process took over a worker id: what the id owns gets a new
    /// epoch (the new process is told in the registration reply) unless the
    /// registration quotes it in `keep` under its current epoch; what it was
    /// releasing goes on to its receiver, since the new process never ran it.
    fn new_incarnation(&mut self, now: Instant, worker: &str, keep: &BTreeMap<LeaseId, u64>) {
        let owned: Vec<(LeaseId, LeaseState)> = self
            .owned_by(worker)
            .filter(|l| keep.get(&l.record.lease) != Some(&l.record.epoch))
            .map(|l| (l.record.lease.clone(), l.state.clone()))
            .collect();
        for (id, state) in owned {
            match state {
                LeaseState::Releasing { to, .. } => self.finish_release(now, &id, to),
                _ => {
                    if let Some(l) = self.leases.get_mut(&id) {
                        l.record.epoch += 1;
                        l.since = now;
                        self.dirty.insert(id);
                    }
                }
            }
        }
    }

    /// Liveness and load; returns the instructions for the worker: those
    /// queued since its last heartbeat, plus whatever its `held` set shows
    /// it missed (replies get lost; every instruction is idempotent, so
    /// sending one twice is harmless).
    pub fn heartbeat(
        &mut self,
        now: Instant,
        worker: &str,
        beat: Beat,
    ) -> Result<Vec<Instruction>, CoreError> {
        let concurrency = match self.workers.get(worker) {
            Some(w) if w.incarnation.is_some_and(|i| i != beat.incarnation) => {
                return Err(CoreError::Superseded(worker.to_owned()));
            }
            Some(w) if !w.restored => w.concurrency.max(1),
            // A restored worker must register so we learn what it still runs.
            _ => return Err(CoreError::UnknownWorker(worker.to_owned())),
        };
        let mut beat = beat;
        let dropped = self.admit_load(worker, concurrency, &mut beat.load);
        if dropped > 0 {
            self.counters.load_figures_dropped += dropped as u64;
            tracing::warn!(
                %worker, dropped,
                "load report: figures of leases it does not hold, or not finite and non-negative, ignored"
            );
        }
        let alpha = self.cfg.balancer.ema_alpha.clamp(0.01, 1.0);
        for (lease, l) in &beat.load.leases {
            // Only leases the worker owns are left: entries stay bounded by
            // the table.
            let m = self.model.entry(lease.clone()).or_default();
            if m.settle_until.is_some_and(|t| now < t) {
                continue;
            }
            m.weight =
                if m.measured { alpha * l.busy_ratio + (1.0 - alpha) * m.weight } else { l.busy_ratio };
            m.measured = true;
            m.lags.push_back(l.lag);
            while m.lags.len() > 3 {
                m.lags.pop_front();
            }
            m.demand.observe(now, l, alpha);
        }
        if let Some(w) = self.workers.get_mut(worker) {
            w.last_seen = now;
            w.load = beat.load;
        }
        self.reconcile(now, worker, &beat.held);
        Ok(self.outbox.remove(worker).unwrap_or_default())
    }

    /// Keeps of a worker's load report only what it may say: figures of
    /// leases it owns, each finite and not negative. A figure that is not
    /// is no evidence, so it is dropped (not clamped to 0, which would
    /// teach the model that the lease is idle); a busy ratio above the
    /// worker's concurrency (more handler time than it can run) counts as
    /// that much. Returns how many figures were dropped.
    fn admit_load(&self, worker: &str, concurrency: u32, load: &mut WorkerLoad) -> usize {
        let before = load.leases.len();
        let sane = |x: f64| x.is_finite() && x >= 0.0;
        load.leases.retain(|lease, l| {
            self.leases.get(lease).is_some_and(|x| x.record.owner.as_deref() == Some(worker))
                && sane(l.busy_ratio)
                && sane(l.records_in_per_s)
                && sane(l.records_out_per_s)
        });
        for l in load.leases.values_mut() {
            l.busy_ratio = l.busy_ratio.min(f64::from(concurrency));
        }
        let mut dropped = before - load.leases.len();
        if !sane(load.cpu) {
            load.cpu = 0.0;
            dropped += 1;
        }
        dropped
    }

    /// Compares what a worker runs with what the table gives it and queues
    /// what makes them agree: Acquire for an owned lease it does not run
    /// (a lost Acquire), Release again for one being released (a lost
    /// Release; a worker not running it confirms at once), Revoke for one
    /// it runs under an epoch that is no longer its own (a lost Revoke).
    /// Leases with an instruction already queued are left to it.
    ///
    /// A lease its owner still does not run after [`UNRUN_LIMIT`]
    /// heartbeats (it gets no replies, or fenced itself) is taken back and
    /// the worker gets nothing for a `session_timeout`: the table never
    /// keeps a lease on a worker that does not report running it.
    fn reconcile(&mut self, now: Instant, worker: &str, held: &BTreeMap<LeaseId, u64>) {
        let queued: BTreeSet<LeaseId> =
            self.outbox.get(worker).into_iter().flatten().map(|i| i.lease().clone()).collect();
        let mut missing = Vec::new();
        let mut take_back = Vec::new();
        let owned: Vec<LeaseId> = self.owned.get(worker).into_iter().flatten().cloned().collect();
        for id in owned {
            let Some(l) = self.leases.get_mut(&id) else { continue };
            if l.record.owner.as_deref() != Some(worker) || queued.contains(&l.record.lease) {
                continue;
            }
            let (lease, epoch) = (l.record.lease.clone(), l.record.epoch);
            let runs = held.get(&lease) == Some(&epoch);
            match l.state {
                LeaseState::Owned if runs => l.unrun = 0,
                LeaseState::Owned => {
                    l.unrun += 1;
                    if l.unrun > UNRUN_LIMIT {
                        take_back.push(lease);
                    } else {
                        let (start, window) = (l.record.start(), l.record.window.clone());
                        missing.push(Instruction::Acquire { lease, epoch, start, window });
                    }
                }
                LeaseState::Releasing { .. } if runs => {
                    l.unrun = 0;
                    missing.push(Instruction::Release { lease, epoch });
                }
                LeaseState::Releasing { .. } => {
                    // Not run: a worker confirms such a release at once,
                    // unless the Release never reaches it.
                    l.unrun += 1;
                    if l.unrun > UNRUN_LIMIT {
                        take_back.push(lease);
                    } else {
                        missing.push(Instruction::Release { lease, epoch });
                    }
                }
                _ => {}
            }
        }
        for (lease, epoch) in held.iter().filter(|(lease, _)| !queued.contains(*lease)) {
            // An owned lease under another epoch got its Acquire above, which
            // replaces the old run on the worker.
            let ours = self.leases.get(lease).is_some_and(|l| l.record.owner.as_deref() == Some(worker));
            if !ours {
                missing.push(Instruction::Revoke { lease: lease.clone(), epoch: *epoch });
            }
        }
        for instruction in missing {
            self.push(worker, instruction);
        }
        if !take_back.is_empty() {
            if let Some(w) = self.workers.get_mut(worker) {
                w.suspect_until = Some(now + self.cfg.session_timeout);
            }
            self.rebalance_due = true;
            self.counters.failovers += take_back.len() as u64;
            for lease in &take_back {
                // A lease being released goes on to its receiver.
                let to = match self.leases.get(lease).map(|l| &l.state) {
                    Some(LeaseState::Releasing { to, .. }) => to.clone(),
                    _ => None,
                };
                self.finish_release(now, lease, to);
            }
            self.assign(now);
        }
    }

    /// The worker is shutting down: it gets no new leases (nor handoffs)
    /// while it finishes and releases what it has.
    pub fn drain(&mut self, worker: &str) {
        if let Some(w) = self.workers.get_mut(worker)
            && !w.draining
        {
            w.draining = true;
            self.rebalance_due = true;
        }
    }

    /// Moves a checkpoint forward; fenced by owner and epoch.
    pub fn checkpoint(
        &mut self,
        worker: &str,
        lease: &LeaseId,
        epoch: u64,
        offset: i64,
    ) -> CheckpointOutcome {
        self.checkpoint_window(worker, lease, epoch, offset, None)
    }

    /// [`Core::checkpoint`] of a windowed lease: `window` (`Some`: the
    /// mapping has tumbling windows) is the window as of `offset`, stored
    /// with it when the checkpoint is accepted and does not go back (a
    /// window closing at the same offset is news; one from an older offset
    /// is not).
    pub fn checkpoint_window(
        &mut self,
        worker: &str,
        lease: &LeaseId,
        epoch: u64,
        offset: i64,
        window: Option<WindowState>,
    ) -> CheckpointOutcome {
        let Some(l) = self.leases.get_mut(lease) else { return CheckpointOutcome::UnknownLease };
        if l.record.owner.as_deref() != Some(worker) || l.record.epoch != epoch {
            return CheckpointOutcome::Stale { current_epoch: l.record.epoch };
        }
        if let Some(high) = self.watermarks.get(lease).copied()
            && offset > high
        {
            return CheckpointOutcome::BeyondWatermark { high };
        }
        if let Some(window) = window
            && l.record.checkpoint.is_none_or(|c| offset >= c)
            && l.record.window.as_ref() != Some(&window)
        {
            l.record.window = Some(window);
            self.dirty.insert(lease.clone());
        }
        if l.record.checkpoint.is_none_or(|c| offset > c) {
            l.record.checkpoint = Some(offset);
            self.dirty.insert(lease.clone());
        }
        CheckpointOutcome::Ok { checkpoint: l.record.checkpoint }
    }

    /// A shard's high watermark as the coordinator read it from Kafka;
    /// ignored for a lease not in the table.
    pub fn set_watermark(&mut self, lease: &LeaseId, high: i64) {
        if lease.kind == LeaseKind::Shard && self.leases.contains_key(lease) {
            self.watermarks.insert(lease.clone(), high);
        }
    }

    /// A worker the table knows (live or restored).
    pub fn worker(&self, id: &str) -> Option<&Worker> {
        self.workers.get(id)
    }

    /// Leases of one kind and name (every name when `None`), in order.
    pub fn leases_of<'a>(
        &'a self,
        kind: LeaseKind,
        name: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Lease> + 'a {
        let range = match name {
            Some(n) => {
                let (from, to) = (
                    LeaseId { kind, name: n.to_owned(), index: 0 },
                    LeaseId { kind, name: n.to_owned(), index: u32::MAX },
                );
                self.leases.range(from..=to)
            }
            None => self.leases.range(..),
        };
        range.map(|(_, l)| l).filter(move |l| l.record.lease.kind == kind)
    }

    /// The owner confirms a release (asked for, or its own on shutdown),
    /// with its final position.
    pub fn release_done(
        &mut self,
        now: Instant,
        worker: &str,
        lease: &LeaseId,
        epoch: u64,
        offset: Option<i64>,
        window: Option<WindowState>,
    ) -> CheckpointOutcome {
        if let Some(offset) = offset {
            let outcome = self.checkpoint_window(worker, lease, epoch, offset, window);
            if !matches!(outcome, CheckpointOutcome::Ok { .. }) {
                return outcome;
            }
        }
        let Some(l) = self.leases.get(lease) else { return CheckpointOutcome::UnknownLease };
        if l.record.owner.as_deref() != Some(worker) || l.record.epoch != epoch {
            return CheckpointOutcome::Stale { current_epoch: l.record.epoch };
        }
        let to = match &l.state {
            LeaseState::Releasing { to, .. } => to.clone(),
            _ => None,
        };
        let checkpoint = l.record.checkpoint;
        self.finish_release(now, lease, to);
        self.assign(now);
        CheckpointOutcome::Ok { checkpoint }
    }

    /// A worker leaves; what it still owns is reassigned at once.
    pub fn deregister(&mut self, now: Instant, worker: &str) {
        self.remove_worker(now, worker);
        self.assign(now);
    }

    /// Time passes: expire silent workers, force overdue handoffs, assign.
    pub fn tick(&mut self, now: Instant) {
        for w in self.workers.values_mut() {
            if w.suspect_until.is_some_and(|t| t <= now) {
                w.suspect_until = None;
                self.rebalance_due = true;
            }
        }
        let dead: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| now.saturating_duration_since(w.last_seen) > self.cfg.session_timeout)
            .map(|w| w.id.clone())
            .collect();
        for worker in dead {
            self.counters.expired_workers += 1;
            let lost = self.owned_by(&worker).count() as u64;
            self.counters.failovers += lost;
            self.remove_worker(now, &worker);
        }
        let overdue: Vec<(LeaseId, Option<WorkerId>)> = self
            .leases
            .values()
            .filter_map(|l| match &l.state {
                LeaseState::Releasing { to, deadline } if *deadline <= now => {
                    Some((l.record.lease.clone(), to.clone()))
                }
                _ => None,
            })
            .collect();
        for (lease, to) in overdue {
            self.counters.forced_handoffs += 1;
            self.counters.failovers += 1;
            if let Some(l) = self.leases.get(&lease)
                && let Some(owner) = l.record.owner.clone()
            {
                let epoch = l.record.epoch;
                self.push(&owner, Instruction::Revoke { lease: lease.clone(), epoch });
            }
            self.finish_release(now, &lease, to);
        }
        self.assign(now);
        if self.cfg.balancer.strategy == Strategy::Load {
            self.rebalance_load(now);
        }
    }

    /// Discovery found `count` partitions (or configured `count` slots) of a
    /// mapping. New leases start unassigned with epoch 0; none is removed.
    pub fn discovered(
        &mut self,
        now: Instant,
        kind: LeaseKind,
        name: &str,
        handler: &str,
        count: u32,
    ) -> u32 {
        let mut added = 0;
        // The mapping's first discovery is its creation: those partitions
        // start at its starting_position; any that appear later (or a topic
        // created after the mapping) start at the earliest offset.
        let created_before = !self.known_streams.insert(name.to_owned()) && kind == LeaseKind::Shard;
        for index in 0..count {
            let id = LeaseId { kind, name: name.to_owned(), index };
            let lease = self.leases.entry(id.clone()).or_insert_with(|| {
                added += 1;
                self.dirty.insert(id.clone());
                self.unassigned.insert(id.clone());
                Lease {
                    record: LeaseRecord { from_earliest: created_before, ..LeaseRecord::new(id.clone()) },
                    handler: None,
                    state: LeaseState::Unassigned,
                    since: now,
                    unrun: 0,
                }
            });
            lease.handler = Some(handler.to_owned());
        }
        if added > 0 {
            self.assign(now);
        }
        added
    }

    /// A subscription now has `count` queue slots (the scaler's decision).
    /// Missing slots are created, parked ones below `count` become
    /// assignable; slots at or above `count` park: unassigned ones at once,
    /// owned ones after a graceful release (the owner finishes its batch
    /// and acks, so nothing is redelivered). Returns the slots that changed.
    pub fn set_slots(&mut self, now: Instant, name: &str, handler: &str, count: u32) -> u32 {
        self.slot_limits.insert(name.to_owned(), count);
        let mut changed = 0;
        for index in 0..count {
            let id = LeaseId::slot(name, index);
            let lease = self.leases.entry(id.clone()).or_insert_with(|| {
                self.dirty.insert(id.clone());
                Lease {
                    record: LeaseRecord::new(id.clone()),
                    handler: None,
                    state: LeaseState::Parked,
                    since: now,
                    unrun: 0,
                }
            });
            lease.handler = Some(handler.to_owned());
            if lease.state == LeaseState::Parked {
                lease.state = LeaseState::Unassigned;
                lease.since = now;
                self.unassigned.insert(id);
                changed += 1;
            }
        }
        let above: Vec<LeaseId> = self
            .leases
            .range(LeaseId::slot(name, count)..)
            .take_while(|(id, _)| id.kind == LeaseKind::QueueSlot && id.name == name)
            .map(|(id, _)| id.clone())
            .collect();
        for id in above {
            let Some(l) = self.leases.get_mut(&id) else { continue };
            l.handler = Some(handler.to_owned());
            match (&mut l.state, l.record.owner.clone()) {
                (LeaseState::Unassigned, _) => {
                    l.state = LeaseState::Parked;
                    l.since = now;
                    self.unassigned.remove(&id);
                    changed += 1;
                }
                (LeaseState::Owned, Some(owner)) => {
                    let epoch = l.record.epoch;
                    l.state = LeaseState::Releasing { to: None, deadline: now + self.cfg.handoff_timeout };
                    l.since = now;
                    self.push(&owner, Instruction::Release { lease: id, epoch });
                    changed += 1;
                }
                (LeaseState::Releasing { to, .. }, _) => *to = None,
                _ => {}
            }
            // A slot parking (or no longer handed on) leaves a count short.
            self.rebalance_due = true;
        }
        self.assign(now);
        changed
    }

    /// Whether a queue slot is above its subscription's slot count.
    fn over_limit(&self, lease: &LeaseId) -> bool {
        lease.kind == LeaseKind::QueueSlot
            && self.slot_limits.get(&lease.name).is_some_and(|limit| lease.index >= *limit)
    }

    /// An operator sets a checkpoint (backwards too). The epoch goes up so
    /// the current owner cannot overwrite it; the owner is told to restart
    /// from the new position. A tumbling window's state belongs to the old
    /// position: it goes, unless `window` (an import) brings the one that
    /// goes with the new position.
    pub fn set_checkpoint(
        &mut self,
        now: Instant,
        lease: &LeaseId,
        offset: i64,
        window: Option<WindowState>,
    ) -> Result<(), CoreError> {
        let l = self.leases.get_mut(lease).ok_or_else(|| CoreError::UnknownLease(lease.clone()))?;
        l.record.checkpoint = Some(offset);
        l.record.window = window.clone();
        l.record.epoch += 1;
        self.dirty.insert(lease.clone());
        let epoch = l.record.epoch;
        match (l.state.clone(), l.record.owner.clone()) {
            (LeaseState::Owned, Some(owner)) => {
                let start = Start::Checkpoint(offset);
                self.push(&owner, Instruction::Acquire { lease: lease.clone(), epoch, start, window });
            }
            (LeaseState::Releasing { to, .. }, owner) => {
                if let Some(owner) = owner {
                    self.push(&owner, Instruction::Revoke { lease: lease.clone(), epoch: epoch - 1 });
                }
                self.finish_release(now, lease, to);
                self.assign(now);
            }
            _ => {}
        }
        Ok(())
    }

    /// Sets many checkpoints at once (an operator reset or import): every
    /// lease is checked first (it exists and is a shard, and appears once),
    /// so either all change or none does. Returns each lease's state before
    /// the change: (lease, owner, epoch, checkpoint).
    pub fn set_checkpoints(&mut self, now: Instant, changes: &[Change]) -> Result<Vec<Before>, CoreError> {
        let before = self.check_checkpoints(changes)?;
        for (lease, offset, window) in changes {
            self.set_checkpoint(now, lease, *offset, window.clone())?;
        }
        Ok(before)
    }

    /// What [`Core::set_checkpoints`] checks, without changing anything (a
    /// dry run).
    pub fn check_checkpoints(&self, changes: &[Change]) -> Result<Vec<Before>, CoreError> {
        let mut seen = BTreeSet::new();
        let mut before = Vec::with_capacity(changes.len());
        for (lease, offset, _) in changes {
            let l = self.leases.get(lease).ok_or_else(|| CoreError::UnknownLease(lease.clone()))?;
            if lease.kind != LeaseKind::Shard {
                return Err(CoreError::NotAShard(lease.clone()));
            }
            if *offset < 0 {
                return Err(CoreError::NegativeOffset(lease.clone(), *offset));
            }
            if !seen.insert(lease.clone()) {
                return Err(CoreError::Duplicate(lease.clone()));
            }
            before.push(Before {
                lease: lease.clone(),
                owner: l.record.owner.clone(),
                epoch: l.record.epoch,
                checkpoint: l.record.checkpoint,
            });
        }
        Ok(before)
    }

    // ------------------------------------------------------------ internals

    fn push(&mut self, worker: &str, instruction: Instruction) {
        if self.workers.contains_key(worker) {
            self.outbox.entry(worker.to_owned()).or_default().push(instruction);
        }
    }

    /// Gives a lease to a worker under a new epoch.
    fn grant(&mut self, now: Instant, lease: &LeaseId, worker: &str) {
        let settle = self.cfg.balancer.settle;
        let m = self.model.entry(lease.clone()).or_default();
        m.settle_until = Some(now + settle);
        m.lags.clear();
        m.demand.rebase();
        let Some(l) = self.leases.get_mut(lease) else { return };
        l.record.epoch += 1;
        l.state = LeaseState::Owned;
        l.since = now;
        l.unrun = 0;
        self.unassigned.remove(lease);
        self.set_owner(lease, Some(worker));
        self.dirty.insert(lease.clone());
        let Some(l) = self.leases.get(lease) else { return };
        let instruction = Instruction::Acquire {
            lease: lease.clone(),
            epoch: l.record.epoch,
            start: l.record.start(),
            window: l.record.window.clone(),
        };
        self.push(worker, instruction);
    }

    /// Sets a lease's owner and keeps the `owned` index: the only place an
    /// owner changes after restore.
    fn set_owner(&mut self, lease: &LeaseId, owner: Option<&str>) {
        let Some(l) = self.leases.get_mut(lease) else { return };
        let old = std::mem::replace(&mut l.record.owner, owner.map(str::to_owned));
        if old.as_deref() == owner {
            return;
        }
        if let Some(old) = old
            && let Some(set) = self.owned.get_mut(&old)
        {
            set.remove(lease);
            if set.is_empty() {
                self.owned.remove(&old);
            }
        }
        if let Some(new) = owner {
            self.owned.entry(new.to_owned()).or_default().insert(lease.clone());
        }
    }

    fn unassign(&mut self, now: Instant, lease: &LeaseId) {
        let parked = self.over_limit(lease);
        if let Some(l) = self.leases.get_mut(lease) {
            l.state = if parked { LeaseState::Parked } else { LeaseState::Unassigned };
            l.since = now;
            if !parked {
                self.unassigned.insert(lease.clone());
            }
            // Parked or not, it left its owner's count.
            self.rebalance_due = true;
            self.set_owner(lease, None);
            self.dirty.insert(lease.clone());
        }
    }

    /// Ends a release: the lease goes to `to` if it is still a live,
    /// registered worker, else back to unassigned.
    fn finish_release(&mut self, now: Instant, lease: &LeaseId, to: Option<WorkerId>) {
        let to = to.filter(|_| !self.over_limit(lease));
        match to.filter(|w| self.workers.get(w).is_some_and(Worker::takes_leases)) {
            Some(to) => self.grant(now, lease, &to),
            None => self.unassign(now, lease),
        }
    }

    fn remove_worker(&mut self, now: Instant, worker: &str) {
        self.workers.remove(worker);
        self.outbox.remove(worker);
        self.rebalance_due = true;
        let owned: Vec<LeaseId> = self.owned.get(worker).into_iter().flatten().cloned().collect();
        for id in owned {
            self.unassign(now, &id);
        }
        // Handoffs on their way to it end with the owner keeping nothing
        // for it: they go back to unassigned when confirmed.
        for l in self.leases.values_mut() {
            if let LeaseState::Releasing { to, .. } = &mut l.state
                && to.as_deref() == Some(worker)
            {
                *to = None;
            }
        }
    }

    /// Checks the indexes against the table (tests).
    #[cfg(test)]
    pub(crate) fn check_indexes(&self) {
        let mut owned: BTreeMap<WorkerId, BTreeSet<LeaseId>> = BTreeMap::new();
        for l in self.leases.values() {
            if let Some(o) = &l.record.owner {
                owned.entry(o.clone()).or_default().insert(l.record.lease.clone());
            }
        }
        assert_eq!(owned, self.owned, "owned index");
        let unassigned: BTreeSet<LeaseId> = self
            .leases
            .values()
            .filter(|l| l.state == LeaseState::Unassigned)
            .map(|l| l.record.lease.clone())
            .collect();
        assert_eq!(unassigned, self.unassigned, "unassigned index");
    }
}
