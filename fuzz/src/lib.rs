//! What the coordinator-side fuzz targets share: [`Call`], every gRPC
//! request the coordinator takes (decoded from arbitrary bytes, or built
//! by a structured target), and [`Harness`], which feeds them through the
//! API's own conversions (`shardline_coordinator::api`) into the core
//! against an in-memory store, the way the service loop does, on a
//! synthetic clock, and checks the table's invariants after every step.
//!
//! The harness mirrors `service.rs`'s `handle` without its channels and
//! group commit (the store here is written after every call, and a
//! restart rebuilds the core from it). Operator targets that need Kafka
//! (`earliest`, `latest`, a timestamp) resolve to fixed offsets here: the
//! broker lookups are `offsets.rs`'s, out of reach of a fuzzer.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use prost::Message;
use shardline_coordinator::api;
use shardline_coordinator::config::{Config, StreamConfig, SubscriptionConfig};
use shardline_coordinator::core::{
    Balancer, CheckpointOutcome, Core, CoreConfig, CoreError, Instruction, LeaseState, Strategy,
};
use shardline_coordinator::offsets::Target;
use shardline_coordinator::store::{LeaseStore, MemStore};
use shardline_coordinator::usage::Meter;
use shardline_proto::{LeaseId, LeaseKind, v1};

/// One request as the coordinator's gRPC services receive it.
#[derive(Debug, Clone)]
pub enum Call {
    Register(v1::RegisterRequest),
    Heartbeat(v1::HeartbeatRequest),
    Checkpoint(v1::CheckpointRequest),
    ReleaseDone(v1::ReleaseDoneRequest),
    Deregister(v1::DeregisterRequest),
    ListWorkers(v1::ListWorkersRequest),
    ListLeases(v1::ListLeasesRequest),
    GetCheckpoint(v1::GetCheckpointRequest),
    SetCheckpoint(v1::SetCheckpointRequest),
    ResetCheckpoints(v1::ResetCheckpointsRequest),
    ListCheckpoints(v1::ListCheckpointsRequest),
    ExportCheckpoints(v1::ExportCheckpointsRequest),
    ImportCheckpoints(v1::ImportCheckpointsRequest),
    Usage(v1::UsageRequest),
    Health(v1::HealthRequest),
}

impl Call {
    /// How many request kinds [`Call::decode`] knows.
    pub const KINDS: u8 = 15;

    /// `bytes` decoded as the request of RPC number `rpc % KINDS`; `None`
    /// when they are not that message (tonic answers such a request with
    /// an error before any handler runs).
    pub fn decode(rpc: u8, bytes: &[u8]) -> Option<Call> {
        fn de<M: Message + Default>(bytes: &[u8]) -> Option<M> {
            M::decode(bytes).ok()
        }
        Some(match rpc % Self::KINDS {
            0 => Call::Register(de(bytes)?),
            1 => Call::Heartbeat(de(bytes)?),
            2 => Call::Checkpoint(de(bytes)?),
            3 => Call::ReleaseDone(de(bytes)?),
            4 => Call::Deregister(de(bytes)?),
            5 => Call::ListWorkers(de(bytes)?),
            6 => Call::ListLeases(de(bytes)?),
            7 => Call::GetCheckpoint(de(bytes)?),
            8 => Call::SetCheckpoint(de(bytes)?),
            9 => Call::ResetCheckpoints(de(bytes)?),
            10 => Call::ListCheckpoints(de(bytes)?),
            11 => Call::ExportCheckpoints(de(bytes)?),
            12 => Call::ImportCheckpoints(de(bytes)?),
            13 => Call::Usage(de(bytes)?),
            _ => Call::Health(de(bytes)?),
        })
    }
}

/// Offsets the Kafka-resolved targets stand for here.
const EARLIEST: i64 = 0;
const LATEST: i64 = 1_000;

/// The streams and subscription every harness starts with (as discovery
/// and the scaler would report them).
pub const STREAMS: [&str; 2] = ["orders", "clicks"];
pub const SUBSCRIPTION: &str = "emails";
pub const HANDLERS: [&str; 2] = ["h", "g"];

/// The core, its store and the usage meter, driven on a synthetic clock.
pub struct Harness {
    /// The mappings usage may be reported for.
    config: Config,
    cfg: CoreConfig,
    core: Core,
    store: MemStore,
    meter: Meter,
    start: Instant,
    elapsed: Duration,
    /// Who each (lease, epoch) was seen owned by: never two workers.
    owners: BTreeMap<(LeaseId, u64), String>,
    /// The last epoch and checkpoint seen of each lease.
    last: BTreeMap<LeaseId, (u64, Option<i64>)>,
}

/// Milliseconds since the Unix epoch at the harness's start (usage buckets
/// are wall-clock minutes).
const UNIX_START_MS: i64 = 1_800_000_000_000;

impl Harness {
    /// A coordinator with two streams (4 and 2 partitions) and a
    /// subscription (3 slots); `strategy` 0: count, else load.
    pub fn new(strategy: u8) -> Self {
        let balancer = Balancer {
            strategy: if strategy.is_multiple_of(2) { Strategy::Count } else { Strategy::Load },
            stable_for: Duration::from_secs(1),
            cooldown: Duration::from_secs(2),
            settle: Duration::from_millis(500),
            ..Balancer::default()
        };
        let cfg = CoreConfig {
            session_timeout: Duration::from_secs(10),
            handoff_timeout: Duration::from_secs(30),
            balancer,
        };
        let start = Instant::now();
        let config = Config {
            streams: vec![StreamConfig::new(STREAMS[0], HANDLERS[0]), StreamConfig::new(STREAMS[1], HANDLERS[1])],
            subscriptions: vec![SubscriptionConfig::new(SUBSCRIPTION, "events", HANDLERS[0])],
            ..Config::default()
        };
        let mut h = Self {
            config,
            cfg,
            core: Core::new(cfg),
            store: MemStore::default(),
            meter: Meter::default(),
            start,
            elapsed: Duration::ZERO,
            owners: BTreeMap::new(),
            last: BTreeMap::new(),
        };
        h.discover(0, 4);
        h.discover(1, 2);
        h.set_slots(3);
        h
    }

    pub fn now(&self) -> Instant {
        self.start + self.elapsed
    }

    fn unix_ms(&self) -> i64 {
        UNIX_START_MS + self.elapsed.as_millis() as i64
    }

    pub fn core(&self) -> &Core {
        &self.core
    }

    /// Discovery reports `count` partitions of stream `STREAMS[stream % 2]`.
    pub fn discover(&mut self, stream: u8, count: u32) {
        let now = self.now();
        let i = usize::from(stream) % STREAMS.len();
        self.core.discovered(now, LeaseKind::Shard, STREAMS[i], HANDLERS[i], count);
        self.settle();
    }

    /// The scaler sets the subscription's slot count.
    pub fn set_slots(&mut self, count: u32) {
        let now = self.now();
        self.core.set_slots(now, SUBSCRIPTION, HANDLERS[0], count);
        self.settle();
    }

    /// Time passes (then the loop's tick).
    pub fn advance(&mut self, ms: u64) {
        self.elapsed += Duration::from_millis(ms);
        let now = self.now();
        self.core.tick(now);
        let core = &self.core;
        self.meter.depart_absent(|w| core.worker(w).is_some());
        let _ = self.meter.take_dirty(self.unix_ms());
        self.settle();
    }

    /// The coordinator restarts on what its store holds.
    pub fn restart(&mut self) {
        let records = self.store.load().unwrap_or_default();
        let usage = self.store.load_usage().unwrap_or_default();
        self.core = Core::restore(self.cfg, records, self.now());
        self.meter = Meter::restore(usage);
        self.settle();
    }

    /// The current epoch of `lease` (0 when unknown).
    pub fn epoch(&self, lease: &LeaseId) -> u64 {
        self.core.lease(lease).map_or(0, |l| l.record.epoch)
    }

    /// One request, converted as the API converts it and applied as the
    /// service loop applies it; a request the API refuses changes nothing.
    pub fn call(&mut self, call: Call) {
        let now = self.now();
        match call {
            Call::Register(req) => {
                let Ok(reg) = api::registration(req) else { return };
                let worker = reg.worker.clone();
                let reply = self.core.register(now, reg);
                // A registration reply states the whole truth: every
                // Acquire in it is of a lease the worker owns, at its epoch.
                for i in &reply {
                    if let Instruction::Acquire { lease, epoch, .. } = i {
                        let l = self.core.lease(lease);
                        assert!(
                            l.is_some_and(|l| l.record.owner.as_deref() == Some(worker.as_str())
                                && l.record.epoch == *epoch),
                            "register of {worker} replied {i:?} but the table has {:?}",
                            l.map(|l| &l.record)
                        );
                    }
                }
            }
            Call::Heartbeat(req) => {
                let Ok(api::Heartbeat { worker, mut beat, draining }) = api::heartbeat(&self.config, req) else {
                    return;
                };
                let usage = std::mem::take(&mut beat.load.usage);
                let incarnation = beat.incarnation;
                match self.core.heartbeat(now, &worker, beat) {
                    Ok(_) => {
                        if draining {
                            self.core.drain(&worker);
                        }
                        self.meter.observe(&worker, incarnation, self.unix_ms(), usage);
                    }
                    Err(CoreError::UnknownWorker(_) | CoreError::Superseded(_)) => {}
                    Err(e) => panic!("a heartbeat failed with {e}"),
                }
            }
            Call::Checkpoint(req) => {
                let Ok((worker, entries)) = api::checkpoints(&req) else { return };
                for e in entries {
                    self.checkpoint(&worker, &e.lease, e.epoch, Some(e.offset), e.window, false);
                }
            }
            Call::ReleaseDone(req) => {
                let Ok(api::Release { worker, lease, epoch, offset, window }) = api::release(&req) else { return };
                self.checkpoint(&worker, &lease, epoch, offset, window, true);
            }
            Call::Deregister(req) => {
                let Ok(worker) = api::worker_id(&req.worker_id) else { return };
                self.core.deregister(now, &worker);
                self.meter.forget(&worker);
            }
            Call::ListWorkers(_) | Call::Health(_) => {
                let _ = (self.core.utilisation(), self.core.desired_workers());
                let _: Vec<_> = self.core.workers().map(|w| (w.id.clone(), w.load.clone())).collect();
            }
            Call::ListLeases(_) | Call::ListCheckpoints(_) => {
                let _: Vec<_> = self.core.leases().map(|l| api::lease_info(l, now)).collect();
            }
            Call::GetCheckpoint(req) => {
                if let Ok(id) = LeaseId::try_from(req.lease.as_ref()) {
                    let _ = self.core.lease(&id).map(|l| api::lease_info(l, now));
                }
            }
            Call::ExportCheckpoints(_) => {
                let _: Vec<_> = self.core.leases().filter_map(|l| l.record.checkpoint).collect();
            }
            Call::SetCheckpoint(req) => {
                let Ok(lease) = LeaseId::try_from(req.lease.as_ref()) else { return };
                let Ok(target) = api::target(req.target) else { return };
                if self.core.lease(&lease).is_none() {
                    return;
                }
                let Some(offset) = resolve(target) else { return };
                self.operator(vec![(lease, offset, None)], req.dry_run);
            }
            Call::ResetCheckpoints(req) => {
                let Ok(target) = api::target(req.target) else { return };
                let Some(offset) = resolve(target) else { return };
                let changes: Vec<shardline_coordinator::core::Change> = self
                    .core
                    .leases()
                    .filter(|l| l.record.lease.kind == LeaseKind::Shard)
                    .filter(|l| req.stream.is_empty() || l.record.lease.name == req.stream)
                    .map(|l| (l.record.lease.clone(), offset, None))
                    .collect();
                self.operator(changes, req.dry_run);
            }
            Call::ImportCheckpoints(req) => {
                let mut changes = Vec::new();
                for c in &req.checkpoints {
                    let Ok(lease) = LeaseId::try_from(c.lease.as_ref()) else { return };
                    if self.core.lease(&lease).is_none() {
                        return;
                    }
                    let Some(offset) = resolve(Target::Offset(c.checkpoint)) else { return };
                    let Ok(window) = shardline_proto::window(c.window.as_ref()) else { return };
                    changes.push((lease, offset, window));
                }
                self.operator(changes, req.dry_run);
            }
            Call::Usage(req) => {
                let (totals, _from) = self.meter.totals(req.since_ms);
                let _ = api::usage_reply(totals, 0);
            }
        }
        self.settle();
    }

    /// A worker's checkpoint (or, with `release`, its release): accepted
    /// only from the owner quoting the current epoch, never backwards; its
    /// tumbling window stored with it or not at all.
    fn checkpoint(
        &mut self,
        worker: &str,
        lease: &LeaseId,
        epoch: u64,
        offset: Option<i64>,
        window: Option<shardline_proto::WindowState>,
        release: bool,
    ) {
        let before = self.core.lease(lease).map(|l| l.record.clone());
        let outcome = if release {
            self.core.release_done(self.now(), worker, lease, epoch, offset, window.clone())
        } else {
            match offset {
                Some(offset) => self.core.checkpoint_window(worker, lease, epoch, offset, window.clone()),
                None => return,
            }
        };
        let after = self.core.lease(lease).map(|l| l.record.window.clone());
        match (&outcome, &before) {
            (CheckpointOutcome::Ok { .. }, Some(b)) => {
                let moved = offset.is_some_and(|o| b.checkpoint.is_none_or(|c| o >= c));
                let expected = if moved && window.is_some() { window.clone() } else { b.window.clone() };
                assert_eq!(after, Some(expected), "window of {lease} after {offset:?} from {b:?}");
            }
            (_, Some(b)) if !release => {
                assert_eq!(after, Some(b.window.clone()), "a refused checkpoint changed the window of {lease}")
            }
            _ => {}
        }
        if let CheckpointOutcome::Ok { checkpoint } = outcome {
            let Some(before) = before else { panic!("{outcome:?} for unknown lease {lease}") };
            assert!(
                before.owner.as_deref() == Some(worker) && before.epoch == epoch,
                "{worker} at epoch {epoch} moved the checkpoint of {before:?}"
            );
            let expected = match (before.checkpoint, offset) {
                (Some(b), Some(o)) => Some(b.max(o)),
                (b, o) => b.or(o),
            };
            assert_eq!(checkpoint, expected, "checkpoint of {lease} from {before:?} with {offset:?}");
        }
    }

    /// An operator's change of many checkpoints: all or nothing.
    fn operator(&mut self, changes: Vec<shardline_coordinator::core::Change>, dry_run: bool) {
        let before: Vec<_> = self.core.leases().map(|l| l.record.clone()).collect();
        let result = if dry_run {
            self.core.check_checkpoints(&changes)
        } else {
            self.core.set_checkpoints(self.now(), &changes)
        };
        match result {
            Ok(_) if !dry_run => {
                for (lease, offset, window) in &changes {
                    let l = self.core.lease(lease).map(|l| (l.record.checkpoint, l.record.window.clone()));
                    assert_eq!(l, Some((Some(*offset), window.clone())), "operator set {lease} to {offset}");
                    // The operator moved it: backwards is allowed now.
                    if let Some(last) = self.last.get_mut(lease) {
                        last.1 = Some(*offset);
                    }
                }
            }
            _ => {
                let after: Vec<_> = self.core.leases().map(|l| l.record.clone()).collect();
                assert_eq!(before, after, "a refused or dry-run operator change changed the table");
            }
        }
    }

    /// Writes what changed to the store (as the loop does after every
    /// command) and checks the invariants.
    fn settle(&mut self) {
        for record in self.core.take_dirty() {
            if let Err(e) = self.store.put(&record) {
                panic!("the memory store failed: {e}");
            }
        }
        let stored: BTreeMap<LeaseId, _> =
            self.store.load().unwrap_or_default().into_iter().map(|r| (r.lease.clone(), r)).collect();
        for l in self.core.leases() {
            let r = &l.record;
            // Every change of a record was marked dirty, so the store has it.
            assert_eq!(stored.get(&r.lease), Some(r), "the store lags the table");
            match (&l.state, &r.owner) {
                (LeaseState::Owned | LeaseState::Releasing { .. }, Some(owner)) => {
                    assert!(
                        self.core.workers().any(|w| &w.id == owner),
                        "{} is owned by {owner}, who is not a member",
                        r.lease
                    );
                    let first =
                        self.owners.entry((r.lease.clone(), r.epoch)).or_insert_with(|| owner.clone());
                    assert_eq!(first, owner, "epoch {} of {} was granted to two workers", r.epoch, r.lease);
                }
                (LeaseState::Unassigned | LeaseState::Parked, None) => {}
                (state, owner) => panic!("{} is {state:?} with owner {owner:?}", r.lease),
            }
            if let Some((epoch, checkpoint)) = self.last.get(&r.lease) {
                assert!(r.epoch >= *epoch, "the epoch of {} went from {epoch} to {}", r.lease, r.epoch);
                assert!(
                    r.checkpoint >= *checkpoint,
                    "the checkpoint of {} went back from {checkpoint:?} to {:?}",
                    r.lease,
                    r.checkpoint
                );
            }
            self.last.insert(r.lease.clone(), (r.epoch, r.checkpoint));
        }
        assert_eq!(stored.len(), self.core.leases().count(), "the store and the table differ");
    }
}

/// An operator target as `offsets::resolve` would answer it on a
/// partition holding offsets `EARLIEST..=LATEST`; `None`: out of range.
fn resolve(target: Target) -> Option<i64> {
    match target {
        Target::Offset(o) => (EARLIEST..=LATEST).contains(&o).then_some(o),
        Target::Earliest => Some(EARLIEST),
        Target::Latest => Some(LATEST),
        Target::Timestamp(ms) => Some(ms.clamp(EARLIEST, LATEST)),
    }
}
