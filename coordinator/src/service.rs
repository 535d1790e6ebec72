//! The IO loop around the pure core: one task owns the [`Core`] and the
//! store, takes commands from the gRPC handlers over a channel, ticks the
//! clock, and group-commits.
//!
//! Group commit: after each command the loop writes the core's dirty records
//! to the store (cheap, not yet durable). A reply that may reveal any write
//! (an accepted checkpoint, a grant with a new epoch) waits until a flush
//! that started after that write has completed. One flush runs at a time;
//! while it runs, new writes and replies pile up for the next one. So an
//! acknowledged checkpoint survives `kill -9`, and an epoch handed to a
//! worker is never handed out again after a restart.
//!
//! A store error (a failed write or flush) ends the loop with that error
//! (DESIGN.md rule 7, "loud storage"): the core's dirty records may not be
//! written and the replies waiting for them must never say OK, so the only
//! safe state to go on from is the durable one, after a restart. Every
//! unanswered reply is dropped with the loop, which callers see as
//! [`Closed`] (the API answers UNAVAILABLE); [`crate::serve`] then stops
//! the server and the binary exits non-zero.

use std::time::Duration;

use shardline_proto::{LeaseId, LeaseKind, WindowState};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::{
    Beat, Before, CheckpointOutcome, Core, CoreError, Instruction, Lease, Registration, Worker,
};
use crate::metrics as m;
use crate::store::{LeaseStore, StoreError};
use crate::usage::Meter;

/// How often the loop ticks the core (expiry, forced handoffs, assignment).
/// Well under a heartbeat, so failover detection adds little to the timeout.
const TICK: Duration = Duration::from_millis(100);
/// Ticks between two publications of the table's gauges (one second).
const PUBLISH_EVERY: u64 = 10;
/// Most commands taken per turn of the loop before writing and flushing.
const MAX_BATCH: usize = 1024;
/// Longest a turn goes on taking queued commands. Past it the loop writes,
/// starts a flush and, with more queued, yields to the runtime: replies
/// wait for the flush after their turn, and the tasks the turn woke (the
/// callers' replies) may sit on this worker thread until it yields. At
/// 2,000 workers turns of 1,024 checkpoint calls took 435 ms (issue 17).
const MAX_TURN: Duration = Duration::from_millis(5);

/// One checkpoint in a worker's request.
#[derive(Debug, Clone)]
pub struct CheckpointCmd {
    pub lease: LeaseId,
    pub epoch: u64,
    pub offset: i64,
    /// With tumbling windows, the window as of `offset`.
    pub window: Option<WindowState>,
}

/// A snapshot for the admin API.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub workers: Vec<Worker>,
    pub leases: Vec<Lease>,
    pub now: std::time::Instant,
    /// Each worker's utilisation as the balancer sees it.
    pub utilisation: std::collections::BTreeMap<String, f64>,
    pub desired_workers: u32,
}

type Reply<T> = oneshot::Sender<T>;

/// A request to the loop; each carries the channel its answer goes to.
#[derive(Debug)]
pub enum Command {
    Register(Registration, Reply<Vec<Instruction>>),
    Heartbeat {
        worker: String,
        beat: Beat,
        draining: bool,
        reply: Reply<Result<Vec<Instruction>, CoreError>>,
    },
    Checkpoint {
        worker: String,
        entries: Vec<CheckpointCmd>,
        reply: Reply<Vec<CheckpointOutcome>>,
    },
    ReleaseDone {
        worker: String,
        lease: LeaseId,
        epoch: u64,
        offset: Option<i64>,
        window: Option<WindowState>,
        reply: Reply<CheckpointOutcome>,
    },
    Deregister {
        worker: String,
        reply: Reply<()>,
    },
    /// Discovery: this mapping has `count` partitions or slots.
    Discovered {
        kind: LeaseKind,
        name: String,
        handler: String,
        count: u32,
    },
    /// The scaler: this subscription now has `count` queue slots.
    SetSlots {
        name: String,
        handler: String,
        count: u32,
    },
    SetCheckpoint {
        lease: LeaseId,
        offset: i64,
        reply: Reply<Result<Lease, CoreError>>,
    },
    /// An operator sets (or with `dry_run` only checks) many checkpoints,
    /// all or nothing.
    SetCheckpoints {
        changes: Vec<crate::core::Change>,
        dry_run: bool,
        reply: Reply<Result<Vec<Before>, CoreError>>,
    },
    /// Shards' high watermarks as read from Kafka (discovery, or a fresh
    /// read before a checkpoint past the known one is refused).
    Watermarks(Vec<(LeaseId, i64)>),
    /// One lease, or (unknown) the indexes its name has.
    Lease {
        lease: LeaseId,
        reply: Reply<Result<Lease, Vec<u32>>>,
    },
    /// Leases of one kind, of one name (all when `None`).
    Leases {
        kind: LeaseKind,
        name: Option<String>,
        reply: Reply<Vec<Lease>>,
    },
    /// The first of `leases` not in the table, with the indexes its name has.
    Missing {
        leases: Vec<LeaseId>,
        reply: Reply<Option<(LeaseId, Vec<u32>)>>,
    },
    /// Every shard's checkpoint, answered once every write made so far is
    /// durable: what is mirrored outside (Kafka consumer groups) is never
    /// ahead of what a restarted coordinator would load.
    DurableCheckpoints(Reply<Vec<(LeaseId, i64)>>),
    /// Live workers and leases, counted (for Health).
    Counts(Reply<(u32, u32)>),
    /// Handler usage per mapping since `since_ms`, and the first minute counted.
    Usage {
        since_ms: i64,
        reply: Reply<(Vec<(String, crate::usage::Counts)>, i64)>,
    },
    Snapshot(Reply<Snapshot>),
}

/// Milliseconds since the Unix epoch (usage buckets are wall-clock minutes).
fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A cloneable handle to the loop.
#[derive(Clone, Debug)]
pub struct Handle {
    /// Each command with when it was sent, for the queueing metric.
    tx: mpsc::Sender<(Instant, Command)>,
    /// Heartbeats, which the loop takes before anything else queued.
    beats: mpsc::Sender<(Instant, Command)>,
}

/// The loop is gone (shutting down or crashed).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the coordinator is shutting down")]
pub struct Closed;

impl Handle {
    /// Sends a command built around a fresh reply channel and waits for it.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Closed> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| Closed)
    }

    /// Heartbeats go on their own lane: they bound failure detection, so
    /// they must not queue behind a backlog of checkpoints (issue 17: at
    /// 2,000 workers they waited half a second). Taking one early is safe:
    /// every instruction is idempotent and a heartbeat's reconcile already
    /// copes with calls of one worker crossing (gRPC never ordered them).
    pub async fn send(&self, command: Command) -> Result<(), Closed> {
        let lane = if matches!(command, Command::Heartbeat { .. }) { &self.beats } else { &self.tx };
        lane.send((Instant::now(), command)).await.map_err(|_| Closed)
    }
}

/// A reply held back until the writes before it are durable.
type Deferred = Box<dyn FnOnce() + Send>;

/// Owns the core and the store; see the module docs.
pub struct Service<S: LeaseStore> {
    core: Core,
    meter: Meter,
    store: S,
    rx: mpsc::Receiver<(Instant, Command)>,
    beats: mpsc::Receiver<(Instant, Command)>,
    /// Writes made so far, and writes known durable.
    written: u64,
    durable: u64,
    /// Replies waiting for `durable >= seq`.
    waiting: Vec<(u64, Deferred)>,
    flushing: Option<u64>,
}

impl<S: LeaseStore> Service<S> {
    /// Restores the core from the store and returns the loop and its handle.
    pub fn new(store: S, cfg: crate::core::CoreConfig) -> Result<(Self, Handle), StoreError> {
        let records = store.load()?;
        let core = Core::restore(cfg, records, Instant::now().into_std());
        let meter = Meter::restore(store.load_usage()?);
        let (tx, rx) = mpsc::channel(4096);
        let (beats_tx, beats) = mpsc::channel(4096);
        let service = Self {
            core,
            meter,
            store,
            rx,
            beats,
            written: 0,
            durable: 0,
            waiting: Vec::new(),
            flushing: None,
        };
        Ok((service, Handle { tx, beats: beats_tx }))
    }

    /// Runs until `shutdown` fires (or every handle is dropped). Returns an
    /// error as soon as the store fails, which the binary treats as fatal:
    /// acknowledging without durability would break the contract, and
    /// dirty records that could not be written cannot be retried safely.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (flushed_tx, mut flushed_rx) = mpsc::channel::<(u64, Result<(), StoreError>)>(1);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some((seq, result)) = flushed_rx.recv() => {
                    result.inspect_err(store_failed)?;
                    self.flushing = None;
                    self.durable = self.durable.max(seq);
                    self.release_waiting();
                }
                // Before the commands: under a steady backlog a tick placed
                // after them would never come, and nobody would expire.
                _ = tick.tick() => {
                    let started = Instant::now();
                    self.core.tick(started.into_std());
                    // Usage baselines of workers the table dropped (expired)
                    // go to the meter's small ring of departed workers.
                    let core = &self.core;
                    self.meter.depart_absent(|w| core.worker(w).is_some());
                    self.persist().inspect_err(store_failed)?;
                    self.persist_usage().inspect_err(store_failed)?;
                    // Gauges once a second, not every tick: publishing walks
                    // the whole table (utilisation, desired workers), which
                    // at thousands of leases held requests up every tick.
                    ticks += 1;
                    if ticks.is_multiple_of(PUBLISH_EVERY) {
                        m::publish(&self.core);
                    }
                    m::loop_tick(started.elapsed());
                }
                Some(first) = self.beats.recv() => self.turn(first)?,
                command = self.rx.recv() => {
                    let Some(first) = command else { break };
                    self.turn(first)?;
                }
            }
            self.persist().inspect_err(store_failed)?;
            if self.flushing.is_none() && !self.waiting.is_empty() && self.durable < self.written {
                let seq = self.written;
                self.flushing = Some(seq);
                m::flush_records(seq - self.durable);
                let flush = self.store.flush();
                let done = flushed_tx.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let result = flush.await;
                    m::flush_done(started.elapsed());
                    // Only fails once the loop is gone, which has its own error.
                    let _ = done.send((seq, result)).await;
                });
            }
            self.release_waiting();
            if !self.beats.is_empty() || !self.rx.is_empty() {
                // A backlog: let the tasks this turn woke run first.
                tokio::task::yield_now().await;
            }
        }
        // Drain: make what was written durable before replying and exiting.
        self.persist().inspect_err(store_failed)?;
        if self.written > self.durable {
            self.store.flush().await.inspect_err(store_failed)?;
            self.durable = self.written;
            self.release_waiting();
        }
        Ok(())
    }

    /// One turn: `first` and whatever else is queued, up to [`MAX_BATCH`]
    /// commands or [`MAX_TURN`], before the loop writes and flushes.
    /// Queued heartbeats are taken before each other command, so one waits
    /// at most for the command being handled, never for the queue.
    fn turn(&mut self, (sent, first): (Instant, Command)) -> Result<(), StoreError> {
        let turn = Instant::now();
        let mut longest_wait = turn.saturating_duration_since(sent);
        self.handle(first).inspect_err(store_failed)?;
        let mut commands = 1;
        while commands < MAX_BATCH && turn.elapsed() < MAX_TURN {
            let next = match self.beats.try_recv() {
                Ok(beat) => beat,
                Err(_) => match self.rx.try_recv() {
                    Ok(command) => command,
                    Err(_) => break,
                },
            };
            let (sent, command) = next;
            longest_wait = longest_wait.max(Instant::now().saturating_duration_since(sent));
            self.handle(command).inspect_err(store_failed)?;
            commands += 1;
        }
        m::loop_turn(commands, turn.elapsed(), longest_wait);
        Ok(())
    }

    fn persist(&mut self) -> Result<(), StoreError> {
        if !self.core.has_dirty() {
            return Ok(());
        }
        for record in self.core.take_dirty() {
            self.store.put(&record)?;
            self.written += 1;
        }
        Ok(())
    }

    /// Usage buckets are written as they change and made durable by the
    /// next flush (or sled's own periodic one): a meter, not a contract.
    fn persist_usage(&mut self) -> Result<(), StoreError> {
        let (changed, expired) = self.meter.take_dirty(unix_ms());
        for (key, counts) in &changed {
            self.store.put_usage(key, Some(counts))?;
        }
        for key in &expired {
            self.store.put_usage(key, None)?;
        }
        Ok(())
    }

    fn release_waiting(&mut self) {
        let durable = self.durable;
        let (ready, pending): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|(seq, _)| *seq <= durable);
        self.waiting = pending;
        for (_, reply) in ready {
            reply();
        }
    }

    /// Answers after the writes so far are durable (now, if they are).
    fn reply<T: Send + 'static>(&mut self, tx: Reply<T>, value: T) -> Result<(), StoreError> {
        self.reply_if(true, tx, value)
    }

    /// Answers now when `reveals` is false (the reply carries nothing that
    /// depends on unflushed writes, like an empty heartbeat), so liveness
    /// never waits for someone else's fsync. A failed write drops the reply
    /// (the caller sees the loop closed, never OK) and is returned: fatal.
    fn reply_if<T: Send + 'static>(
        &mut self,
        reveals: bool,
        tx: Reply<T>,
        value: T,
    ) -> Result<(), StoreError> {
        // Persist first so `written` covers what this command changed.
        self.persist()?;
        if !reveals || self.written <= self.durable {
            answer(tx, value);
        } else {
            let seq = self.written;
            self.waiting.push((seq, Box::new(move || answer(tx, value))));
        }
        Ok(())
    }

    fn handle(&mut self, command: Command) -> Result<(), StoreError> {
        let now = Instant::now().into_std();
        match command {
            Command::Register(registration, reply) => {
                let worker = registration.worker.clone();
                let instructions = self.core.register(now, registration);
                tracing::info!(%worker, instructions = instructions.len(), "worker registered");
                self.reply(reply, instructions)?;
            }
            Command::Heartbeat { worker, mut beat, draining, reply } => {
                let usage = std::mem::take(&mut beat.load.usage);
                let incarnation = beat.incarnation;
                let result = self.core.heartbeat(now, &worker, beat);
                if result.is_ok() {
                    if draining {
                        self.core.drain(&worker);
                    }
                    self.meter.observe(&worker, incarnation, unix_ms(), usage);
                }
                let reveals = result.as_ref().is_ok_and(|i| !i.is_empty());
                self.reply_if(reveals, reply, result)?;
            }
            Command::Checkpoint { worker, entries, reply } => {
                let outcomes: Vec<CheckpointOutcome> = entries
                    .iter()
                    .map(|e| {
                        self.core.checkpoint_window(&worker, &e.lease, e.epoch, e.offset, e.window.clone())
                    })
                    .collect();
                let accepted = outcomes.iter().filter(|o| matches!(o, CheckpointOutcome::Ok { .. })).count();
                m::checkpoints(accepted as u64, (outcomes.len() - accepted) as u64);
                self.reply(reply, outcomes)?;
            }
            Command::ReleaseDone { worker, lease, epoch, offset, window, reply } => {
                let outcome = self.core.release_done(now, &worker, &lease, epoch, offset, window);
                tracing::info!(%worker, %lease, epoch, ?offset, ?outcome, "release confirmed");
                self.reply(reply, outcome)?;
            }
            Command::Deregister { worker, reply } => {
                self.core.deregister(now, &worker);
                self.meter.forget(&worker);
                tracing::info!(%worker, "worker deregistered");
                self.reply(reply, ())?;
            }
            Command::Discovered { kind, name, handler, count } => {
                let added = self.core.discovered(now, kind, &name, &handler, count);
                if added > 0 {
                    tracing::info!(stream = %name, added, total = count, "new leases discovered");
                }
            }
            Command::SetSlots { name, handler, count } => {
                let changed = self.core.set_slots(now, &name, &handler, count);
                if changed > 0 {
                    tracing::info!(subscription = %name, slots = count, changed, "queue slots set");
                }
            }
            Command::SetCheckpoint { lease, offset, reply } => {
                let result = self.core.set_checkpoint(now, &lease, offset, None);
                if result.is_ok() {
                    tracing::warn!(%lease, offset, "checkpoint set by an operator");
                }
                let result = result.and_then(|()| {
                    self.core.lease(&lease).cloned().ok_or_else(|| CoreError::UnknownLease(lease.clone()))
                });
                self.reply(reply, result)?;
            }
            Command::SetCheckpoints { changes, dry_run, reply } => {
                let result = if dry_run {
                    self.core.check_checkpoints(&changes)
                } else {
                    self.core.set_checkpoints(now, &changes)
                };
                if result.is_ok() && !dry_run {
                    tracing::warn!(leases = changes.len(), "checkpoints set by an operator");
                }
                self.reply(reply, result)?;
            }
            Command::Watermarks(highs) => {
                for (lease, high) in highs {
                    self.core.set_watermark(&lease, high);
                }
            }
            Command::Lease { lease, reply } => {
                let found = self.core.lease(&lease).cloned().ok_or_else(|| self.indexes(&lease));
                answer(reply, found);
            }
            Command::Leases { kind, name, reply } => {
                answer(reply, self.core.leases_of(kind, name.as_deref()).cloned().collect());
            }
            Command::Missing { leases, reply } => {
                let missing = leases.into_iter().find(|l| self.core.lease(l).is_none());
                answer(
                    reply,
                    missing.map(|l| {
                        let indexes = self.indexes(&l);
                        (l, indexes)
                    }),
                );
            }
            Command::DurableCheckpoints(reply) => {
                let checkpoints = self
                    .core
                    .leases_of(LeaseKind::Shard, None)
                    .filter_map(|l| l.record.checkpoint.map(|c| (l.record.lease.clone(), c)))
                    .collect();
                self.reply(reply, checkpoints)?;
            }
            Command::Counts(reply) => {
                let live = self.core.workers().filter(|w| !w.restored).count();
                let leases = self.core.leases().count();
                answer(
                    reply,
                    (u32::try_from(live).unwrap_or(u32::MAX), u32::try_from(leases).unwrap_or(u32::MAX)),
                );
            }
            Command::Usage { since_ms, reply } => {
                answer(reply, self.meter.totals(since_ms));
            }
            Command::Snapshot(reply) => {
                // One walk of the table for both load figures.
                let load = self.core.load_view();
                let snapshot = Snapshot {
                    workers: self.core.workers().cloned().collect(),
                    leases: self.core.leases().cloned().collect(),
                    now,
                    utilisation: load.util,
                    desired_workers: load.desired,
                };
                answer(reply, snapshot);
            }
        }
        Ok(())
    }
}

impl<S: LeaseStore> Service<S> {
    /// The indexes the table has under `lease`'s kind and name (for an
    /// error naming what exists).
    fn indexes(&self, lease: &LeaseId) -> Vec<u32> {
        self.core.leases_of(lease.kind, Some(&lease.name)).map(|l| l.record.lease.index).collect()
    }
}

/// Logs the store error that is about to end the loop, where it happened.
fn store_failed(e: &StoreError) {
    tracing::error!(error = %e, "store failed; stopping the coordinator (restart it on the durable state)");
}

/// Sends an answer. A send fails only when the caller gave up waiting
/// (its RPC was cancelled); what the command did stands either way, so
/// there is nothing to undo, only a note.
fn answer<T>(tx: Reply<T>, value: T) {
    if tx.send(value).is_err() {
        tracing::debug!("a caller gave up before its answer; the command stands");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::core::CoreConfig;
    use crate::store::{FailingStore, Flushes, Gate, GatedStore, MemStore};

    /// Placement at once (no join window): these tests are about the
    /// loop, and read grants from the registration reply.
    fn immediate() -> CoreConfig {
        let balancer = crate::core::Balancer { join_window: Duration::ZERO, ..Default::default() };
        CoreConfig { balancer, ..CoreConfig::default() }
    }

    async fn start(store: impl LeaseStore) -> (Handle, CancellationToken) {
        let (service, handle) = Service::new(store, immediate()).unwrap_or_else(|e| panic!("{e}"));
        let token = CancellationToken::new();
        tokio::spawn(service.run(token.clone()));
        handle
            .send(Command::Discovered {
                kind: LeaseKind::Shard,
                name: "s".into(),
                handler: "h".into(),
                count: 4,
            })
            .await
            .ok();
        (handle, token)
    }

    async fn register(handle: &Handle, worker: &str) -> Vec<Instruction> {
        let registration = Registration {
            worker: worker.into(),
            handlers: BTreeSet::from(["h".to_owned()]),
            ..Registration::default()
        };
        handle.call(|tx| Command::Register(registration, tx)).await.unwrap_or_default()
    }

    /// A heartbeat quoting every lease the table gives the worker (it runs
    /// what it is told).
    async fn heartbeat(handle: &Handle, worker: &str) -> Result<Vec<Instruction>, CoreError> {
        let snapshot = handle.call(Command::Snapshot).await.map(|s| s.leases).unwrap_or_default();
        let held = snapshot
            .into_iter()
            .filter(|l| l.record.owner.as_deref() == Some(worker))
            .map(|l| (l.record.lease, l.record.epoch))
            .collect();
        let beat = Beat { held, ..Beat::default() };
        let worker = worker.to_owned();
        handle
            .call(|reply| Command::Heartbeat { worker, beat, draining: false, reply })
            .await
            .unwrap_or(Err(CoreError::UnknownWorker("closed".into())))
    }

    async fn owners(handle: &Handle) -> Vec<Option<String>> {
        let snapshot = handle.call(Command::Snapshot).await.map(|s| s.leases).unwrap_or_default();
        snapshot.into_iter().map(|l| l.record.owner).collect()
    }

    /// Expiry under a paused clock: tokio's time only moves when we say so.
    #[tokio::test(start_paused = true)]
    async fn a_dead_worker_is_expired_by_the_loop_at_the_session_timeout() {
        let (handle, token) = start(MemStore::default()).await;
        assert_eq!(register(&handle, "a").await.len(), 4);
        register(&handle, "b").await;
        // a hands two leases to b gracefully.
        for i in heartbeat(&handle, "a").await.unwrap_or_default() {
            if let Instruction::Release { lease, epoch } = i {
                let outcome = handle
                    .call(|reply| Command::ReleaseDone {
                        worker: "a".into(),
                        lease,
                        epoch,
                        offset: None,
                        window: None,
                        reply,
                    })
                    .await;
                assert!(matches!(outcome, Ok(CheckpointOutcome::Ok { .. })));
            }
        }
        // b heartbeats every second; a is silent from now on.
        for _ in 0..9 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            heartbeat(&handle, "b").await.ok();
        }
        let alive = owners(&handle).await;
        assert_eq!(
            alive.iter().filter(|o| o.as_deref() == Some("a")).count(),
            2,
            "a alive at 9 s: {alive:?}"
        );
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            heartbeat(&handle, "b").await.ok();
        }
        let after = owners(&handle).await;
        assert!(after.iter().all(|o| o.as_deref() == Some("b")), "a expired after 10 s: {after:?}");
        assert!(heartbeat(&handle, "a").await.is_err(), "the dead worker must re-register");
        token.cancel();
    }

    /// Registers `a` on a loop over a [`FailingStore`] and returns the
    /// lease it got, with the loop's task (to see how it ended).
    async fn failing_store_with_a_lease(
        store: &FailingStore,
    ) -> (Handle, tokio::task::JoinHandle<Result<(), StoreError>>, LeaseId, u64) {
        let (service, handle) = Service::new(store.clone(), immediate()).unwrap_or_else(|e| panic!("{e}"));
        let task = tokio::spawn(service.run(CancellationToken::new()));
        let discovered =
            Command::Discovered { kind: LeaseKind::Shard, name: "s".into(), handler: "h".into(), count: 4 };
        assert!(handle.send(discovered).await.is_ok());
        let acquired = register(&handle, "a").await;
        let Some(Instruction::Acquire { lease, epoch, .. }) = acquired.first().cloned() else {
            panic!("no lease acquired: {acquired:?}")
        };
        (handle, task, lease, epoch)
    }

    async fn checkpoint(
        handle: &Handle,
        lease: &LeaseId,
        epoch: u64,
        offset: i64,
    ) -> Result<Vec<CheckpointOutcome>, Closed> {
        let entries = vec![CheckpointCmd { lease: lease.clone(), epoch, offset, window: None }];
        handle.call(|reply| Command::Checkpoint { worker: "a".into(), entries, reply }).await
    }

    /// DESIGN.md rule 7: a failed write ends the loop with the error, even
    /// when the next write would work (the dirty records it dropped are
    /// gone); the checkpoint that needed it is never answered OK, and
    /// nothing later is.
    #[tokio::test(start_paused = true)]
    async fn a_failed_store_write_stops_the_loop_and_no_reply_says_ok() {
        let store = FailingStore::default();
        let (handle, task, lease, epoch) = failing_store_with_a_lease(&store).await;
        assert!(matches!(
            checkpoint(&handle, &lease, epoch, 5).await.as_deref(),
            Ok([CheckpointOutcome::Ok { .. }])
        ));
        *store.failing_checkpoint.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(9);
        let reply = checkpoint(&handle, &lease, epoch, 9).await;
        assert!(reply.is_err(), "a checkpoint whose write failed was answered: {reply:?}");
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        let Ok(Ok(Err(e))) = ended else { panic!("the loop did not end with the store error: {ended:?}") };
        assert!(e.to_string().contains("No space left"), "{e}");
        assert!(heartbeat(&handle, "a").await.is_err(), "nobody is answered after the failure");
        assert!(store.inner.load().unwrap_or_default().iter().all(|r| r.checkpoint != Some(9)));
    }

    /// A failed flush ends the loop too: the replies waiting for it are
    /// dropped, not released as if their writes were durable.
    #[tokio::test(start_paused = true)]
    async fn a_failed_flush_stops_the_loop_and_no_reply_says_ok() {
        let store = FailingStore::default();
        let (handle, task, lease, epoch) = failing_store_with_a_lease(&store).await;
        store.failing_flushes.store(1, std::sync::atomic::Ordering::SeqCst);
        let reply = checkpoint(&handle, &lease, epoch, 9).await;
        assert!(reply.is_err(), "a checkpoint whose flush failed was answered: {reply:?}");
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        let Ok(Ok(Err(e))) = ended else { panic!("the loop did not end with the store error: {ended:?}") };
        assert!(e.to_string().contains("flush"), "{e}");
        assert!(register(&handle, "b").await.is_empty(), "nobody is answered after the failure");
    }

    /// The next flush the loop starts; fails the test if none starts.
    async fn next_flush(flushes: &mut Flushes) -> Gate {
        match tokio::time::timeout(Duration::from_secs(5), flushes.recv()).await {
            Ok(Some(gate)) => gate,
            other => panic!("no flush started: {other:?}"),
        }
    }

    /// Lets the loop run for a second of paused time (ten ticks).
    async fn idle() {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    /// A checkpoint by `a`, sent from its own task so the test can watch
    /// whether it has been answered.
    fn checkpoint_task(
        handle: &Handle,
        (lease, epoch): &(LeaseId, u64),
        offset: i64,
    ) -> tokio::task::JoinHandle<Result<Vec<CheckpointOutcome>, Closed>> {
        let (handle, lease, epoch) = (handle.clone(), lease.clone(), *epoch);
        tokio::spawn(async move { checkpoint(&handle, &lease, epoch, offset).await })
    }

    fn accepted(reply: Result<Result<Vec<CheckpointOutcome>, Closed>, tokio::task::JoinError>, at: i64) {
        assert!(
            matches!(reply.as_ref().map(|r| r.as_deref()), Ok(Ok([CheckpointOutcome::Ok { checkpoint: Some(c) }])) if *c == at),
            "checkpoint at {at}: {reply:?}"
        );
    }

    /// Group commit, step by step, on a store whose flushes the test
    /// completes: no reply that reveals a write (a grant, an accepted
    /// checkpoint) is sent before a flush that started after that write has
    /// completed; one flush runs at a time; writes that arrive while it
    /// runs wait for the next one and share it; and a reply that reveals
    /// nothing (an empty heartbeat) waits for no flush.
    #[tokio::test(start_paused = true)]
    async fn replies_wait_for_their_flush_and_writes_during_a_flush_ride_the_next_one() {
        let (store, mut flushes) = GatedStore::new();
        let (handle, token) = start(store).await;

        // Registering writes four grants: the reply waits for flush 1.
        let registering = tokio::spawn({
            let handle = handle.clone();
            async move { register(&handle, "a").await }
        });
        let first = next_flush(&mut flushes).await;
        idle().await;
        assert!(!registering.is_finished(), "grants answered before their flush completed");
        first.open();
        let acquired = registering.await.unwrap_or_default();
        let leases: Vec<(LeaseId, u64)> = acquired
            .iter()
            .filter_map(|i| match i {
                Instruction::Acquire { lease, epoch, .. } => Some((lease.clone(), *epoch)),
                _ => None,
            })
            .collect();
        assert_eq!(leases.len(), 4, "{acquired:?}");

        // A checkpoint starts flush 2.
        let a = checkpoint_task(&handle, &leases[0], 5);
        let second = next_flush(&mut flushes).await;
        // Two more arrive while flush 2 runs.
        let b = checkpoint_task(&handle, &leases[0], 6);
        let c = checkpoint_task(&handle, &leases[1], 9);
        idle().await;
        let beat = tokio::time::timeout(Duration::from_millis(500), heartbeat(&handle, "a")).await;
        assert!(
            matches!(&beat, Ok(Ok(i)) if i.is_empty()),
            "an empty heartbeat must not wait for a flush: {beat:?}"
        );
        assert!(
            !a.is_finished() && !b.is_finished() && !c.is_finished(),
            "a checkpoint was answered before any flush of it completed"
        );
        assert!(flushes.try_recv().is_err(), "a second flush started while one ran");

        // Flush 2 covers a only: b and c were written after it began.
        second.open();
        accepted(a.await, 5);
        let third = next_flush(&mut flushes).await;
        idle().await;
        assert!(
            !b.is_finished() && !c.is_finished(),
            "writes made during flush 2 were answered when it completed"
        );
        third.open();
        accepted(b.await, 6);
        accepted(c.await, 9);
        idle().await;
        assert!(flushes.try_recv().is_err(), "b and c did not share one flush");
        token.cancel();
    }

    /// What the consumer-group mirror reads is never ahead of the store:
    /// the checkpoints are answered only after a flush that covers them.
    #[tokio::test(start_paused = true)]
    async fn durable_checkpoints_are_answered_only_once_flushed() {
        let (store, mut flushes) = GatedStore::new();
        let (handle, token) = start(store).await;
        let registering = tokio::spawn({
            let handle = handle.clone();
            async move { register(&handle, "a").await }
        });
        next_flush(&mut flushes).await.open();
        let acquired = registering.await.unwrap_or_default();
        let Some(Instruction::Acquire { lease, epoch, .. }) = acquired.first().cloned() else {
            panic!("no lease acquired: {acquired:?}")
        };
        let a = checkpoint_task(&handle, &(lease.clone(), epoch), 5);
        let flush = next_flush(&mut flushes).await;
        let durable = tokio::spawn({
            let handle = handle.clone();
            async move { handle.call(Command::DurableCheckpoints).await }
        });
        idle().await;
        assert!(!durable.is_finished(), "checkpoints were handed out before they were durable");
        flush.open();
        accepted(a.await, 5);
        let got = durable.await;
        assert!(matches!(&got, Ok(Ok(v)) if *v == vec![(lease.clone(), 5)]), "{got:?}");
        token.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn checkpoints_are_acknowledged_and_stored() {
        let store = MemStore::default();
        let (handle, token) = start(store.clone()).await;
        let acquired = register(&handle, "a").await;
        let Some(Instruction::Acquire { lease, epoch, .. }) = acquired.first().cloned() else {
            panic!("no lease acquired: {acquired:?}")
        };
        let entries = vec![CheckpointCmd { lease: lease.clone(), epoch, offset: 7, window: None }];
        let outcomes = handle
            .call(|reply| Command::Checkpoint { worker: "a".into(), entries, reply })
            .await
            .unwrap_or_default();
        assert_eq!(outcomes, vec![CheckpointOutcome::Ok { checkpoint: Some(7) }]);
        let stored = store.load().unwrap_or_default();
        assert!(stored.iter().any(|r| r.lease == lease && r.checkpoint == Some(7)));
        token.cancel();
    }

    /// A heartbeat is taken before commands queued ahead of it (issue 17:
    /// behind a checkpoint backlog they waited half a second at 2,000
    /// workers, which is failure detection waiting). Here 300 reads are
    /// queued before a heartbeat that starts a drain: every read must
    /// already see the worker draining.
    #[tokio::test(start_paused = true)]
    async fn heartbeats_overtake_queued_commands() {
        let (handle, token) = start(MemStore::default()).await;
        register(&handle, "a").await;
        // Queued without yielding, so the loop sees them all at once.
        let queued = tokio::task::unconstrained(async {
            let mut reads = Vec::new();
            for _ in 0..300 {
                let (tx, rx) = oneshot::channel();
                handle.send(Command::Snapshot(tx)).await.map_err(|_| "snapshot not queued")?;
                reads.push(rx);
            }
            let (reply, beat) = oneshot::channel();
            let heartbeat =
                Command::Heartbeat { worker: "a".into(), beat: Beat::default(), draining: true, reply };
            handle.send(heartbeat).await.map_err(|_| "heartbeat not queued")?;
            Ok::<_, &str>((reads, beat))
        })
        .await;
        let (reads, beat) = queued.unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(beat.await, Ok(Ok(_))), "the heartbeat is answered");
        for (i, read) in reads.into_iter().enumerate() {
            let snapshot = read.await.unwrap_or_else(|e| panic!("read {i} unanswered: {e}"));
            let draining = snapshot.workers.iter().find(|w| w.id == "a").map(|w| w.draining);
            assert_eq!(
                draining,
                Some(true),
                "read {i} of 300 was handled before the heartbeat queued after it"
            );
        }
        token.cancel();
    }

    /// Admin reads of one lease or one stream answer just that (and an
    /// unknown lease the indexes its name has, for the error).
    #[tokio::test(start_paused = true)]
    async fn admin_reads_look_up_only_what_they_need() {
        let (handle, token) = start(MemStore::default()).await;
        register(&handle, "a").await;
        let other =
            Command::Discovered { kind: LeaseKind::Shard, name: "t".into(), handler: "h".into(), count: 2 };
        assert!(handle.send(other).await.is_ok());
        let lease = LeaseId::shard("s", 2);
        let found = handle.call(|reply| Command::Lease { lease: lease.clone(), reply }).await;
        assert!(
            matches!(&found, Ok(Ok(l)) if l.record.lease == lease && l.record.owner.as_deref() == Some("a")),
            "{found:?}"
        );
        let missing = handle.call(|reply| Command::Lease { lease: LeaseId::shard("s", 9), reply }).await;
        assert!(matches!(&missing, Ok(Err(indexes)) if indexes == &[0, 1, 2, 3]), "{missing:?}");
        let leases = vec![LeaseId::shard("t", 1), LeaseId::shard("t", 5), LeaseId::shard("s", 0)];
        let first = handle.call(|reply| Command::Missing { leases, reply }).await;
        assert!(
            matches!(&first, Ok(Some((l, i))) if *l == LeaseId::shard("t", 5) && i == &[0, 1]),
            "{first:?}"
        );
        let of_t = handle
            .call(|reply| Command::Leases { kind: LeaseKind::Shard, name: Some("t".into()), reply })
            .await;
        let names: Vec<String> =
            of_t.unwrap_or_default().iter().map(|l| l.record.lease.to_string()).collect();
        assert_eq!(names, ["t/0", "t/1"]);
        let all = handle.call(|reply| Command::Leases { kind: LeaseKind::Shard, name: None, reply }).await;
        assert_eq!(all.map(|l| l.len()).ok(), Some(6));
        assert_eq!(handle.call(Command::Counts).await.ok(), Some((1, 6)));
        token.cancel();
    }
}
