//! Tests of the pure core: worked examples, then property tests that drive
//! random sequences of joins, leaves, expiries, restarts and checkpoints
//! through simulated workers and check the lease-table invariants.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::Strategy;
use shardline_proto::{LeaseId, LeaseKind, WindowState};

use super::*;

const H: &str = "h";

/// The `count` strategy: what the worked examples and the first property
/// test's balance check are about (the default is `load`).
fn count() -> CoreConfig {
    CoreConfig {
        balancer: Balancer {
            strategy: super::Strategy::Count,
            join_window: Duration::ZERO,
            ..Balancer::default()
        },
        ..CoreConfig::default()
    }
}

fn reg(worker: &str) -> Registration {
    Registration {
        worker: worker.into(),
        handlers: BTreeSet::from([H.to_owned()]),
        ..Registration::default()
    }
}

/// What a worker that does as it is told runs: every lease the table gives
/// it, under its epoch, except those whose instruction is still on its way.
fn obedient(core: &Core, worker: &str) -> BTreeMap<LeaseId, u64> {
    let queued: BTreeSet<&LeaseId> =
        core.outbox.get(worker).into_iter().flatten().map(Instruction::lease).collect();
    core.owned_by(worker)
        .filter(|l| !queued.contains(&l.record.lease))
        .map(|l| (l.record.lease.clone(), l.record.epoch))
        .collect()
}

/// A heartbeat from an obedient worker of the first incarnation.
fn beat(
    core: &mut Core,
    now: Instant,
    worker: &str,
    load: WorkerLoad,
) -> Result<Vec<Instruction>, CoreError> {
    let held = obedient(core, worker);
    core.heartbeat(now, worker, Beat { incarnation: 0, held, load })
}

fn core_with(partitions: u32, now: Instant) -> Core {
    let mut core = Core::new(count());
    core.discovered(now, LeaseKind::Shard, "s", H, partitions);
    core
}

fn acquired(instructions: &[Instruction]) -> Vec<(LeaseId, u64)> {
    instructions
        .iter()
        .filter_map(|i| match i {
            Instruction::Acquire { lease, epoch, .. } => Some((lease.clone(), *epoch)),
            _ => None,
        })
        .collect()
}

#[test]
fn first_worker_gets_every_lease_with_epoch_one() {
    let now = Instant::now();
    let mut core = core_with(4, now);
    let got = acquired(&core.register(now, reg("a")));
    assert_eq!(got.len(), 4);
    assert!(got.iter().all(|(_, e)| *e == 1));
}

#[test]
fn a_join_moves_only_what_balance_needs_and_by_graceful_handoff() {
    let now = Instant::now();
    let mut core = core_with(8, now);
    core.register(now, reg("a"));
    let b = core.register(now, reg("b"));
    assert!(acquired(&b).is_empty(), "b gets leases only after a releases them");
    let released: Vec<(LeaseId, u64)> = beat(&mut core, now, "a", WorkerLoad::default())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| match i {
            Instruction::Release { lease, epoch } => Some((lease, epoch)),
            _ => None,
        })
        .collect();
    assert_eq!(released.len(), 4, "exactly half moves");
    for (lease, epoch) in &released {
        assert_eq!(core.checkpoint("a", lease, *epoch, 10), CheckpointOutcome::Ok { checkpoint: Some(10) });
        assert!(matches!(
            core.release_done(now, "a", lease, *epoch, Some(11), None),
            CheckpointOutcome::Ok { .. }
        ));
    }
    let got = beat(&mut core, now, "b", WorkerLoad::default()).unwrap_or_default();
    assert_eq!(got.len(), 4);
    for i in got {
        let Instruction::Acquire { epoch, start, .. } = i else { panic!("expected acquire, got {i:?}") };
        assert_eq!(
            (epoch, start),
            (2, Start::Checkpoint(11)),
            "the new owner starts where the old one stopped"
        );
    }
}

#[test]
fn a_silent_worker_expires_after_the_session_timeout_and_its_leases_move() {
    let t0 = Instant::now();
    let mut core = core_with(4, t0);
    core.register(t0, reg("a"));
    core.register(t0, reg("b"));
    // Let the initial handoff settle: a confirms every release.
    for i in beat(&mut core, t0, "a", WorkerLoad::default()).unwrap_or_default() {
        if let Instruction::Release { lease, epoch } = i {
            core.release_done(t0, "a", &lease, epoch, None, None);
        }
    }
    let timeout = core.config().session_timeout;
    // b keeps heartbeating; a falls silent.
    let just_before = t0 + timeout;
    beat(&mut core, just_before, "b", WorkerLoad::default()).ok();
    core.tick(just_before);
    assert_eq!(core.owned_by("a").count(), 2, "not dead before the timeout");
    let after = t0 + timeout + Duration::from_millis(1);
    core.tick(after);
    assert_eq!(core.owned_by("a").count(), 0);
    assert_eq!(core.owned_by("b").count(), 4);
    assert_eq!(core.counters().failovers, 2);
    // The zombie is fenced: its old epoch is refused.
    let lease = LeaseId::shard("s", 3);
    let l = core.lease(&lease).map(|l| l.record.clone());
    assert!(matches!(core.checkpoint("a", &lease, 1, 99), CheckpointOutcome::Stale { .. }), "{l:?}");
    assert_eq!(beat(&mut core, after, "a", WorkerLoad::default()), Err(CoreError::UnknownWorker("a".into())));
}

#[test]
fn an_unconfirmed_handoff_is_forced_after_the_handoff_timeout() {
    let t0 = Instant::now();
    let mut core = core_with(2, t0);
    core.register(t0, reg("a"));
    core.register(t0, reg("b"));
    let released = beat(&mut core, t0, "a", WorkerLoad::default()).unwrap_or_default();
    assert_eq!(released.len(), 1);
    let t1 = t0 + core.config().handoff_timeout;
    beat(&mut core, t1, "a", WorkerLoad::default()).ok();
    beat(&mut core, t1, "b", WorkerLoad::default()).ok();
    core.tick(t1);
    assert_eq!(core.owned_by("b").count(), 1);
    assert_eq!(core.counters().forced_handoffs, 1);
    let to_a = beat(&mut core, t1, "a", WorkerLoad::default()).unwrap_or_default();
    assert!(matches!(to_a.as_slice(), [Instruction::Revoke { .. }]), "{to_a:?}");
}

#[test]
fn restart_keeps_leases_of_workers_that_come_back_and_frees_the_rest() {
    let t0 = Instant::now();
    let mut core = core_with(4, t0);
    core.register(t0, reg("a"));
    core.checkpoint("a", &LeaseId::shard("s", 0), 1, 42);
    let records = core.take_dirty();

    let mut core = Core::restore(count(), records, t0);
    core.discovered(t0, LeaseKind::Shard, "s", H, 4);
    // The worker comes back holding all four leases.
    let mut r = reg("a");
    r.held = (0..4).map(|p| (LeaseId::shard("s", p), 1)).collect();
    let reply = core.register(t0, r);
    assert_eq!(acquired(&reply).len(), 4);
    assert!(acquired(&reply).iter().all(|(_, e)| *e == 1), "kept under the same epoch: {reply:?}");
    assert_eq!(core.lease(&LeaseId::shard("s", 0)).and_then(|l| l.record.checkpoint), Some(42));

    // A second restart where the worker never returns.
    let records = core.leases().map(|l| l.record.clone()).collect();
    let mut core = Core::restore(count(), records, t0);
    core.discovered(t0, LeaseKind::Shard, "s", H, 4);
    core.register(t0, reg("b"));
    assert_eq!(core.owned_by("b").count(), 0, "a's leases wait for a");
    let later = t0 + core.config().session_timeout + Duration::from_millis(1);
    beat(&mut core, later, "b", WorkerLoad::default()).ok();
    core.tick(later);
    assert_eq!(core.owned_by("b").count(), 4);
}

#[test]
fn operator_set_bumps_the_epoch_and_restarts_the_owner() {
    let t0 = Instant::now();
    let mut core = core_with(1, t0);
    core.register(t0, reg("a"));
    let lease = LeaseId::shard("s", 0);
    core.checkpoint("a", &lease, 1, 100);
    assert_eq!(core.set_checkpoint(t0, &lease, 5, None), Ok(()));
    assert!(matches!(core.checkpoint("a", &lease, 1, 101), CheckpointOutcome::Stale { current_epoch: 2 }));
    let to_a = beat(&mut core, t0, "a", WorkerLoad::default()).unwrap_or_default();
    assert_eq!(
        to_a,
        vec![Instruction::Acquire {
            lease: lease.clone(),
            epoch: 2,
            start: Start::Checkpoint(5),
            window: None
        }]
    );
    assert_eq!(core.checkpoint("a", &lease, 2, 6), CheckpointOutcome::Ok { checkpoint: Some(6) });
    assert_eq!(
        core.set_checkpoint(t0, &LeaseId::shard("nope", 0), 1, None),
        Err(CoreError::UnknownLease(LeaseId::shard("nope", 0)))
    );
}

/// A windowed lease's window travels with its checkpoint: stored by the
/// same fenced call, handed to the next owner with the lease, never taken
/// from a zombie, never set back by a late answer about an older offset,
/// dropped by an operator's reset and brought back by an import.
#[test]
fn a_window_is_stored_with_its_checkpoint_fenced_and_resumed_by_the_next_owner() {
    let t0 = Instant::now();
    let mut core = core_with(1, t0);
    core.register(t0, reg("a"));
    let lease = LeaseId::shard("s", 0);
    let window =
        |state: &str| WindowState { state: Some(state.into()), ..WindowState::open(60_000, 120_000) };
    let ok = core.checkpoint_window("a", &lease, 1, 10, Some(window("3")));
    assert_eq!(ok, CheckpointOutcome::Ok { checkpoint: Some(10) });
    assert_eq!(core.lease(&lease).and_then(|l| l.record.window.clone()), Some(window("3")));
    // An answer about an older offset does not set the window back; a
    // window closing at the same offset (a final invocation with no
    // records) is news.
    core.checkpoint_window("a", &lease, 1, 9, Some(window("2")));
    assert_eq!(core.lease(&lease).and_then(|l| l.record.window.clone()), Some(window("3")));
    let closed = WindowState { closed: true, ..WindowState::open(60_000, 120_000) };
    core.checkpoint_window("a", &lease, 1, 10, Some(closed.clone()));
    assert_eq!(core.lease(&lease).and_then(|l| l.record.window.clone()), Some(closed));
    core.checkpoint_window("a", &lease, 1, 12, Some(window("1")));
    // A checkpoint of a mapping without windows leaves the window alone.
    core.checkpoint("a", &lease, 1, 12);
    assert_eq!(core.lease(&lease).and_then(|l| l.record.window.clone()), Some(window("1")));

    // a dies; b gets the lease with the window of the last checkpoint.
    let later = t0 + core.config().session_timeout + Duration::from_millis(1);
    core.register(later, reg("b"));
    core.tick(later);
    let to_b = beat(&mut core, later, "b", WorkerLoad::default()).unwrap_or_default();
    assert!(
        to_b.contains(&Instruction::Acquire {
            lease: lease.clone(),
            epoch: 2,
            start: Start::Checkpoint(12),
            window: Some(window("1")),
        }),
        "{to_b:?}"
    );
    // a, a zombie, cannot write its window over b's.
    let zombie = core.checkpoint_window("a", &lease, 1, 20, Some(window("zombie")));
    assert!(matches!(zombie, CheckpointOutcome::Stale { current_epoch: 2 }));
    assert_eq!(core.lease(&lease).and_then(|l| l.record.window.clone()), Some(window("1")));
    core.release_done(later, "b", &lease, 2, Some(15), Some(window("4")));
    assert_eq!(
        core.lease(&lease).and_then(|l| l.record.window.clone()),
        Some(window("4")),
        "with the release"
    );

    // An operator's reset: the state belonged to the old position.
    core.set_checkpoints(later, &[(lease.clone(), 0, None)]).map(|_| ()).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(core.lease(&lease).and_then(|l| l.record.window.clone()), None);
    // An import brings the window that goes with its checkpoint.
    core.set_checkpoints(later, &[(lease.clone(), 15, Some(window("4")))])
        .map(|_| ())
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(core.lease(&lease).and_then(|l| l.record.window.clone()), Some(window("4")));
}

#[test]
fn a_draining_worker_gets_nothing_new_and_its_releases_go_to_others() {
    let t0 = Instant::now();
    let mut core = core_with(4, t0);
    core.register(t0, reg("a"));
    core.drain("a");
    core.register(t0, reg("b"));
    assert_eq!(core.owned_by("b").count(), 0, "no handoff is planned from a draining worker");
    let lease = LeaseId::shard("s", 0);
    assert!(matches!(core.release_done(t0, "a", &lease, 1, Some(5), None), CheckpointOutcome::Ok { .. }));
    let l = core.lease(&lease).map(|l| (l.record.owner.clone(), l.record.epoch, l.record.checkpoint));
    assert_eq!(l, Some((Some("b".into()), 2, Some(5))), "released to a live peer, not back to a");
}

#[test]
fn workers_only_get_leases_of_handlers_they_host() {
    let t0 = Instant::now();
    let mut core = core_with(2, t0);
    core.discovered(t0, LeaseKind::QueueSlot, "q", "other", 1);
    core.register(t0, reg("a"));
    assert_eq!(core.owned_by("a").count(), 2);
    assert!(core.lease(&LeaseId::slot("q", 0)).is_some_and(|l| l.record.owner.is_none()));
}

#[test]
fn a_lost_reply_is_made_good_by_the_next_heartbeat() {
    let t0 = Instant::now();
    let mut core = core_with(2, t0);
    core.register(t0, reg("a"));
    core.register(t0, reg("b"));
    // a's reply with its Release is lost; it still runs both leases.
    let lost = beat(&mut core, t0, "a", WorkerLoad::default()).unwrap_or_default();
    let [Instruction::Release { lease, epoch }] = lost.as_slice() else { panic!("one release: {lost:?}") };
    let held: BTreeMap<LeaseId, u64> = (0..2).map(|p| (LeaseId::shard("s", p), 1)).collect();
    let again = core.heartbeat(t0, "a", Beat { held: held.clone(), ..Beat::default() }).unwrap_or_default();
    assert_eq!(again, vec![Instruction::Release { lease: lease.clone(), epoch: *epoch }], "sent again");
    core.release_done(t0, "a", lease, *epoch, Some(7), None);
    // b's reply with the Acquire is lost too: it runs nothing.
    let lost = core.heartbeat(t0, "b", Beat::default()).unwrap_or_default();
    assert!(matches!(lost.as_slice(), [Instruction::Acquire { .. }]), "{lost:?}");
    let again = core.heartbeat(t0, "b", Beat::default()).unwrap_or_default();
    assert_eq!(
        again,
        vec![Instruction::Acquire {
            lease: lease.clone(),
            epoch: 2,
            start: Start::Checkpoint(7),
            window: None
        }]
    );
    // a lost its Revoke-free view: it still reports the lease it gave away.
    let stale = core.heartbeat(t0, "a", Beat { held, ..Beat::default() }).unwrap_or_default();
    assert_eq!(stale, vec![Instruction::Revoke { lease: lease.clone(), epoch: 1 }]);
}

/// A worker that heartbeats but never takes up its leases (every reply to
/// it is lost, or it fenced itself) does not keep them: after
/// `UNRUN_LIMIT` re-sent Acquires they go to a worker that runs them, and
/// it gets nothing more for a session.
#[test]
fn leases_a_worker_does_not_run_are_taken_back_after_a_few_heartbeats() {
    let t0 = Instant::now();
    let mut core = core_with(2, t0);
    core.register(t0, reg("a"));
    core.register(t0, reg("b"));
    let mut now = t0;
    // One more round than the limit: the lease a was asked to release had its
    // Release in the first reply.
    for _ in 0..UNRUN_LIMIT + 2 {
        now += Duration::from_secs(1);
        beat(&mut core, now, "b", WorkerLoad::default()).ok();
        core.heartbeat(now, "a", Beat::default()).ok();
        core.tick(now);
    }
    assert_eq!(core.owned_by("a").count(), 0, "a runs nothing and keeps nothing");
    assert_eq!(core.owned_by("b").count(), 2);
    assert!(core.lease(&LeaseId::shard("s", 0)).is_some_and(|l| l.record.epoch >= 2), "a new epoch");
    // Suspect for one session: nothing goes back to it, even to balance.
    core.tick(now + Duration::from_secs(1));
    assert_eq!(core.owned_by("a").count(), 0);
    core.tick(now + core.config().session_timeout);
    assert!(core.workers().any(|w| w.id == "a" && w.takes_leases()), "a takes leases again later");
}

#[test]
fn a_second_process_under_one_id_gets_new_epochs_and_the_first_is_superseded() {
    let t0 = Instant::now();
    let mut core = core_with(2, t0);
    let first = Registration { incarnation: 11, ..reg("a") };
    assert!(acquired(&core.register(t0, first)).iter().all(|(_, e)| *e == 1));
    let second = Registration { incarnation: 22, ..reg("a") };
    let got = acquired(&core.register(t0, second));
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|(_, e)| *e == 2), "new epochs for the new process: {got:?}");
    let lease = LeaseId::shard("s", 0);
    assert!(matches!(core.checkpoint("a", &lease, 1, 5), CheckpointOutcome::Stale { current_epoch: 2 }));
    let old = core.heartbeat(t0, "a", Beat { incarnation: 11, ..Beat::default() });
    assert_eq!(old, Err(CoreError::Superseded("a".into())));
    let new =
        core.heartbeat(t0, "a", Beat { incarnation: 22, held: obedient(&core, "a"), ..Beat::default() });
    assert_eq!(new, Ok(vec![]));
}

#[test]
fn partitions_that_appear_after_the_mapping_start_at_the_earliest_offset() {
    let t0 = Instant::now();
    let mut core = Core::new(count());
    // Created while its topic does not exist yet: the topic's partitions
    // all come later.
    core.discovered(t0, LeaseKind::Shard, "late", H, 0);
    core.discovered(t0, LeaseKind::Shard, "s", H, 2);
    core.discovered(t0, LeaseKind::Shard, "late", H, 2);
    core.discovered(t0, LeaseKind::Shard, "s", H, 3);
    let starts: BTreeMap<LeaseId, Start> = core
        .register(t0, reg("a"))
        .into_iter()
        .filter_map(|i| match i {
            Instruction::Acquire { lease, start, .. } => Some((lease, start)),
            _ => None,
        })
        .collect();
    assert_eq!(starts[&LeaseId::shard("s", 0)], Start::MappingDefault);
    assert_eq!(starts[&LeaseId::shard("s", 1)], Start::MappingDefault);
    assert_eq!(starts[&LeaseId::shard("s", 2)], Start::Earliest, "added later");
    assert_eq!(starts[&LeaseId::shard("late", 0)], Start::Earliest, "topic created after the mapping");
    // A restart keeps that: the records say so.
    let records = core.leases().map(|l| l.record.clone()).collect();
    let mut core = Core::restore(count(), records, t0);
    core.discovered(t0, LeaseKind::Shard, "s", H, 4);
    assert_eq!(core.lease(&LeaseId::shard("s", 3)).map(|l| l.record.start()), Some(Start::Earliest));
    assert_eq!(core.lease(&LeaseId::shard("s", 2)).map(|l| l.record.start()), Some(Start::Earliest));
}

// ---------------------------------------------------------------- properties

#[derive(Debug, Clone)]
enum Op {
    Join(u8),
    /// `lost`: the reply never reaches the worker (timeout, reset).
    Heartbeat {
        worker: u8,
        lost: bool,
    },
    /// A second process starts under the worker's id; the first lives on
    /// as a zombie that must be fenced.
    Reincarnate(u8),
    /// The worker confirms every release it has been asked for.
    Confirm(u8),
    Checkpoint {
        worker: u8,
        lease: u8,
        advance: u8,
        stale: bool,
    },
    Leave(u8),
    Advance(u16),
    Tick,
    Restart,
    AddPartitions(u8),
    OperatorSet {
        lease: u8,
        offset: u8,
    },
    /// The scaler gives the subscription this many slots.
    SetSlots(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0u8..5).prop_map(Op::Join),
        4 => (0u8..5, prop::bool::weighted(0.25)).prop_map(|(worker, lost)| Op::Heartbeat { worker, lost }),
        1 => (0u8..5).prop_map(Op::Reincarnate),
        2 => (0u8..5).prop_map(Op::Confirm),
        4 => (0u8..5, 0u8..16, 0u8..20, any::<bool>())
            .prop_map(|(worker, lease, advance, stale)| Op::Checkpoint { worker, lease, advance, stale }),
        1 => (0u8..5).prop_map(Op::Leave),
        3 => (0u16..15_000).prop_map(Op::Advance),
        3 => Just(Op::Tick),
        1 => Just(Op::Restart),
        1 => (1u8..4).prop_map(Op::AddPartitions),
        1 => (0u8..16, 0u8..50).prop_map(|(lease, offset)| Op::OperatorSet { lease, offset }),
        1 => (1u8..7).prop_map(Op::SetSlots),
    ]
}

/// A worker as the coordinator's instructions leave it: what it runs, under
/// which epoch, and where it is.
#[derive(Debug, Default, Clone)]
struct SimWorker {
    running: BTreeMap<LeaseId, (u64, i64)>,
    to_release: Vec<(LeaseId, u64)>,
    incarnation: u64,
}

impl SimWorker {
    fn apply(
        &mut self,
        instructions: Vec<Instruction>,
        grants: &mut BTreeMap<(LeaseId, u64), String>,
        me: &str,
    ) {
        for i in instructions {
            match i {
                Instruction::Acquire { lease, epoch, start, .. } => {
                    let previous = grants.insert((lease.clone(), epoch), me.to_owned());
                    assert!(
                        previous.as_deref().is_none_or(|p| p == me),
                        "epoch {epoch} of {lease} granted to {previous:?} and to {me}"
                    );
                    // Idempotent: a lease already run under this epoch keeps its position.
                    if self.running.get(&lease).is_none_or(|(e, _)| *e != epoch) {
                        self.running.insert(lease, (epoch, start.checkpoint().unwrap_or(0)));
                    }
                }
                Instruction::Release { lease, epoch } => self.to_release.push((lease, epoch)),
                Instruction::Revoke { lease, epoch } => {
                    if self.running.get(&lease).is_some_and(|(e, _)| *e == epoch) {
                        self.running.remove(&lease);
                    }
                }
            }
        }
    }
}

struct Model {
    core: Core,
    now: Instant,
    /// What the store holds: every dirty record written after each step.
    store: BTreeMap<LeaseId, LeaseRecord>,
    workers: BTreeMap<String, SimWorker>,
    /// Every (lease, epoch) ever granted, and to whom.
    grants: BTreeMap<(LeaseId, u64), String>,
    /// The highest checkpoint acknowledged per lease (reset by operator sets).
    acked: BTreeMap<LeaseId, i64>,
    partitions: u32,
    /// Queue slots of subscription `q`.
    slots: u32,
    /// Heartbeats report load (busy ratios; shards 0 and 1 hot).
    loaded: bool,
    /// Older processes of reincarnated workers, still running what they ran.
    zombies: Vec<SimWorker>,
}

impl Model {
    fn new() -> Self {
        Self::with(count())
    }

    /// The `load` strategy, with heartbeats that report load.
    fn loaded() -> Self {
        let balancer = Balancer {
            strategy: super::Strategy::Load,
            stable_for: Duration::from_millis(500),
            cooldown: Duration::from_secs(1),
            settle: Duration::from_millis(300),
            join_window: Duration::ZERO,
            ..Balancer::default()
        };
        let mut model = Self::with(CoreConfig { balancer, ..CoreConfig::default() });
        model.loaded = true;
        model
    }

    fn with(cfg: CoreConfig) -> Self {
        let now = Instant::now();
        let mut model = Self {
            core: Core::new(cfg),
            now,
            store: BTreeMap::new(),
            workers: BTreeMap::new(),
            grants: BTreeMap::new(),
            acked: BTreeMap::new(),
            partitions: 4,
            slots: 2,
            loaded: false,
            zombies: Vec::new(),
        };
        model.core.discovered(now, LeaseKind::Shard, "s", H, model.partitions);
        model.core.set_slots(now, "q", H, model.slots);
        model
    }

    fn name(w: u8) -> String {
        format!("w{w}")
    }

    fn lease(&self, l: u8) -> LeaseId {
        LeaseId::shard("s", u32::from(l) % self.partitions)
    }

    fn step(&mut self, op: Op) {
        let now = self.now;
        match op {
            Op::Join(w) => self.join(&Self::name(w)),
            Op::Reincarnate(w) => {
                let name = Self::name(w);
                let Some(sim) = self.workers.get_mut(&name) else { return };
                let fresh = SimWorker { incarnation: sim.incarnation + 1, ..SimWorker::default() };
                let old = std::mem::replace(sim, fresh);
                self.join(&name);
                for (lease, (epoch, _)) in &old.running {
                    let l = self.core.lease(lease).map(|l| (l.record.owner.clone(), l.record.epoch));
                    assert!(
                        l != Some((Some(name.clone()), *epoch)),
                        "{lease}: the new process of {name} shares epoch {epoch} with the old one"
                    );
                }
                self.zombies.push(old);
            }
            Op::Heartbeat { worker: w, lost } => {
                let name = Self::name(w);
                let mut load = WorkerLoad::default();
                if self.loaded
                    && let Some(sim) = self.workers.get(&name)
                {
                    for (lease, (_, position)) in &sim.running {
                        let hot = lease.kind == LeaseKind::Shard && lease.index < 2;
                        let busy = if hot { 0.9 } else { 0.1 };
                        let l = LeaseLoad {
                            position: *position,
                            lag: 0,
                            busy_ratio: busy,
                            ..LeaseLoad::default()
                        };
                        load.leases.insert(lease.clone(), l);
                    }
                }
                let Some(sim) = self.workers.get_mut(&name) else { return };
                let held = sim.running.iter().map(|(l, (e, _))| (l.clone(), *e)).collect();
                match self.core.heartbeat(now, &name, Beat { incarnation: sim.incarnation, held, load }) {
                    Ok(_) if lost => {}
                    Ok(instructions) => sim.apply(instructions, &mut self.grants, &name),
                    // Expired: it registers again, as the real worker does.
                    Err(CoreError::UnknownWorker(_)) if !lost => self.join(&name),
                    Err(_) => {}
                }
            }
            Op::Confirm(w) => {
                let name = Self::name(w);
                let Some(sim) = self.workers.get_mut(&name) else { return };
                for (lease, epoch) in std::mem::take(&mut sim.to_release) {
                    let position = sim.running.remove(&lease).map(|(_, p)| p);
                    let outcome = self.core.release_done(now, &name, &lease, epoch, position, None);
                    if let (CheckpointOutcome::Ok { .. }, Some(p)) = (outcome, position) {
                        let acked = self.acked.entry(lease).or_insert(p);
                        *acked = (*acked).max(p);
                    }
                }
            }
            Op::Checkpoint { worker, lease, advance, stale } => {
                let name = Self::name(worker);
                let lease = self.lease(lease);
                let Some((epoch, position)) =
                    self.workers.get(&name).and_then(|s| s.running.get(&lease)).copied()
                else {
                    return;
                };
                let epoch = if stale { epoch.saturating_sub(1) } else { epoch };
                let offset = position + i64::from(advance);
                let current = self.core.lease(&lease).map(|l| (l.record.epoch, l.record.owner.clone()));
                let outcome = self.core.checkpoint(&name, &lease, epoch, offset);
                let legit = current == Some((epoch, Some(name.clone())));
                match outcome {
                    CheckpointOutcome::Ok { checkpoint } => {
                        assert!(legit, "accepted {name} epoch {epoch} on {lease} owned {current:?}");
                        assert!(checkpoint >= Some(offset));
                        let acked = self.acked.entry(lease.clone()).or_insert(offset);
                        *acked = (*acked).max(offset);
                        if let Some(sim) = self.workers.get_mut(&name) {
                            sim.running.insert(lease, (epoch, offset));
                        }
                    }
                    CheckpointOutcome::Stale { .. } => {
                        assert!(!legit, "refused the owner {name} epoch {epoch} on {lease}");
                        // "Lease lost": the worker stops it at once.
                        if let Some(sim) = self.workers.get_mut(&name) {
                            sim.running.remove(&lease);
                        }
                    }
                    CheckpointOutcome::UnknownLease => panic!("{lease} exists"),
                    CheckpointOutcome::BeyondWatermark { .. } => panic!("no watermark is known here"),
                }
            }
            Op::Leave(w) => {
                let name = Self::name(w);
                if self.workers.remove(&name).is_some() {
                    self.core.deregister(now, &name);
                }
            }
            Op::Advance(ms) => self.now += Duration::from_millis(u64::from(ms)),
            Op::Tick => self.core.tick(now),
            Op::Restart => {
                self.persist();
                let records = self.store.values().cloned().collect();
                self.core = Core::restore(self.core.config(), records, now);
                self.core.discovered(now, LeaseKind::Shard, "s", H, self.partitions);
                self.core.set_slots(now, "q", H, self.slots);
            }
            Op::AddPartitions(n) => {
                self.partitions = (self.partitions + u32::from(n)).min(16);
                self.core.discovered(now, LeaseKind::Shard, "s", H, self.partitions);
            }
            Op::OperatorSet { lease, offset } => {
                let lease = self.lease(lease);
                if self.core.set_checkpoint(now, &lease, i64::from(offset), None).is_ok() {
                    self.acked.insert(lease, i64::from(offset));
                }
            }
            Op::SetSlots(n) => {
                self.slots = u32::from(n);
                self.core.set_slots(now, "q", H, self.slots);
            }
        }
        self.persist();
        self.check();
    }

    /// Registers (again), quoting what the worker runs.
    fn join(&mut self, name: &str) {
        let sim = self.workers.entry(name.to_owned()).or_default();
        let mut r = reg(name);
        r.held = sim.running.iter().map(|(l, (e, _))| (l.clone(), *e)).collect();
        r.incarnation = sim.incarnation;
        let reply = self.core.register(self.now, r);
        sim.running.clear();
        sim.to_release.clear();
        sim.apply(reply, &mut self.grants, name);
    }

    /// Two rounds in which every worker heartbeats (no reply lost) and
    /// confirms its releases, with no time passing, and a last heartbeat
    /// each; then every lease the
    /// table gives a worker runs there under its epoch, and no worker runs a
    /// lease the table does not give it: nothing lost stays lost.
    fn check_reconciled(&mut self) {
        let names: Vec<u8> = (0..5).filter(|w| self.workers.contains_key(&Self::name(*w))).collect();
        for _ in 0..2 {
            for w in &names {
                self.step(Op::Heartbeat { worker: *w, lost: false });
                self.step(Op::Confirm(*w));
            }
        }
        // Releases confirmed late in the last round grant leases to workers
        // that heartbeated earlier in it: one more heartbeat delivers them.
        for w in &names {
            self.step(Op::Heartbeat { worker: *w, lost: false });
        }
        for lease in self.core.leases() {
            let r = &lease.record;
            if let (Some(owner), LeaseState::Owned) = (&r.owner, &lease.state) {
                let runs = self.workers.get(owner).and_then(|s| s.running.get(&r.lease)).map(|(e, _)| *e);
                assert_eq!(
                    runs,
                    Some(r.epoch),
                    "{} is {owner}'s (epoch {}) but not run there",
                    r.lease,
                    r.epoch
                );
            }
        }
        for (name, sim) in &self.workers {
            for (lease, (epoch, _)) in &sim.running {
                let l = self.core.lease(lease).map(|l| (l.record.owner.clone(), l.record.epoch));
                assert_eq!(l, Some((Some(name.clone()), *epoch)), "{name} still runs {lease} at {epoch}");
            }
        }
    }

    fn persist(&mut self) {
        for record in self.core.take_dirty() {
            self.store.insert(record.lease.clone(), record);
        }
    }

    fn check(&self) {
        self.core.check_indexes();
        for lease in self.core.leases() {
            let r = &lease.record;
            // At most one owner, and it is a known worker.
            if let Some(owner) = &r.owner {
                assert!(self.core.workers().any(|w| &w.id == owner), "{} owned by gone {owner}", r.lease);
            } else {
                assert!(matches!(lease.state, LeaseState::Unassigned | LeaseState::Parked), "{lease:?}");
            }
            // Slots above the subscription's count are parked or on their way
            // out; the others are never parked.
            if r.lease.kind == LeaseKind::QueueSlot {
                let above = r.lease.index >= self.slots;
                match &lease.state {
                    LeaseState::Parked => assert!(above, "{} parked below {}", r.lease, self.slots),
                    LeaseState::Releasing { to, .. } if above => {
                        assert!(to.is_none(), "{} handed on", r.lease)
                    }
                    LeaseState::Releasing { .. } => {}
                    other => assert!(!above, "{} is {other:?} above {} slots", r.lease, self.slots),
                }
            }
            // No acknowledged checkpoint is lost or regresses.
            if let Some(acked) = self.acked.get(&r.lease) {
                assert!(r.checkpoint >= Some(*acked), "{}: {:?} < acked {acked}", r.lease, r.checkpoint);
            }
            // The store agrees with the table.
            assert_eq!(self.store.get(&r.lease), Some(r), "store out of date for {}", r.lease);
        }
        // At most one worker can move a lease's checkpoint: the owner under the
        // current epoch. Any other simulated holder quotes an older epoch.
        for lease in self.core.leases() {
            let current: Vec<&SimWorker> = self
                .workers
                .values()
                .chain(&self.zombies)
                .filter(|s| s.running.get(&lease.record.lease).is_some_and(|(e, _)| *e == lease.record.epoch))
                .collect();
            assert!(current.len() <= 1, "{} run under its current epoch by {current:?}", lease.record.lease);
        }
    }

    /// Within one lease per worker once no handoff is in flight (a pending
    /// handoff's lease already counts for its new owner, but a worker whose
    /// leases are all still arriving has none to give on).
    fn check_balanced(&self) {
        if self.core.leases().any(|l| matches!(l.state, LeaseState::Releasing { .. })) {
            return;
        }
        let counts = self.core.lease_counts();
        if let (Some(min), Some(max)) = (counts.values().min(), counts.values().max()) {
            assert!(max - min <= 1, "unbalanced after assignment: {counts:?}");
        }
    }
}

/// The model's balance check only applies once handoffs settle; make sure
/// ordinary traffic does settle, so the property test is not vacuous.
#[test]
fn handoffs_settle_into_balance_under_ordinary_traffic() {
    let mut model = Model::new();
    model.step(Op::AddPartitions(3));
    for w in 0..3 {
        model.step(Op::Join(w));
    }
    for _ in 0..3 {
        for w in 0..3 {
            model.step(Op::Heartbeat { worker: w, lost: false });
            model.step(Op::Confirm(w));
        }
        model.step(Op::Tick);
    }
    assert!(model.core.leases().all(|l| l.state == LeaseState::Owned), "settled");
    let counts = model.core.lease_counts();
    assert_eq!(counts.values().sum::<u32>(), 9, "7 shards and 2 queue slots");
    assert!(counts.values().all(|c| *c == 3), "{counts:?}");
    model.check_balanced();
}

/// Shrinking a subscription parks its top slots only after their owners
/// confirm (they finish their batch and ack); growing it again reuses them.
#[test]
fn slots_park_gracefully_and_come_back() {
    let mut model = Model::new();
    model.step(Op::Join(0));
    model.step(Op::SetSlots(4));
    let slot = |m: &Model, i: u32| m.core.lease(&LeaseId::slot("q", i)).map(|l| l.state.clone());
    assert_eq!(slot(&model, 3), Some(LeaseState::Owned));
    model.step(Op::SetSlots(1));
    assert!(matches!(slot(&model, 3), Some(LeaseState::Releasing { to: None, .. })), "asked, not taken");
    model.step(Op::Heartbeat { worker: 0, lost: false });
    model.step(Op::Confirm(0));
    for i in 1..4 {
        assert_eq!(slot(&model, i), Some(LeaseState::Parked), "slot {i}");
    }
    assert_eq!(slot(&model, 0), Some(LeaseState::Owned));
    let epoch = model.core.lease(&LeaseId::slot("q", 2)).map(|l| l.record.epoch);
    model.step(Op::SetSlots(3));
    assert_eq!(slot(&model, 2), Some(LeaseState::Owned));
    assert_eq!(model.core.lease(&LeaseId::slot("q", 2)).map(|l| l.record.epoch), epoch.map(|e| e + 1));
    assert_eq!(slot(&model, 3), Some(LeaseState::Parked));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn lease_table_invariants_hold(ops in proptest::collection::vec(op(), 1..120)) {
        let mut model = Model::new();
        for op in ops {
            let ticked = matches!(op, Op::Tick);
            model.step(op);
            if ticked {
                model.check_balanced();
            }
        }
        model.check_reconciled();
    }

    /// Fencing, ownership, checkpoints and slots hold under `load` too (its
    /// moves are graceful handoffs like any other).
    #[test]
    fn lease_table_invariants_hold_under_the_load_strategy(ops in proptest::collection::vec(op(), 1..120)) {
        let mut model = Model::loaded();
        for op in ops {
            model.step(op);
        }
        model.check_reconciled();
    }
}

/// The `load` strategy on the real core: an overload must last
/// `stable_for` before a plan, the plan splits the hot leases, and a steady
/// load afterwards moves nothing more.
#[test]
fn load_moves_wait_for_a_stable_overload_and_then_hold_still() {
    let balancer = Balancer {
        strategy: super::Strategy::Load,
        stable_for: Duration::from_secs(1),
        cooldown: Duration::from_secs(5),
        settle: Duration::ZERO,
        join_window: Duration::ZERO,
        ..Balancer::default()
    };
    let t = Instant::now();
    let mut core = Core::new(CoreConfig { balancer, ..CoreConfig::default() });
    core.discovered(t, LeaseKind::Shard, "s", H, 4);
    core.register(t, reg("w0"));
    core.register(t, reg("w1"));
    // w0 hands two shards to w1 (count balance, before any load is known).
    for i in beat(&mut core, t, "w0", WorkerLoad::default()).unwrap_or_default() {
        if let Instruction::Release { lease, epoch } = i {
            core.release_done(t, "w0", &lease, epoch, None, None);
        }
    }
    let on = |core: &Core, w: &str| -> BTreeSet<u32> {
        core.leases().filter(|l| l.record.owner.as_deref() == Some(w)).map(|l| l.record.lease.index).collect()
    };
    assert_eq!((on(&core, "w0").len(), on(&core, "w1").len()), (2, 2), "counts first");
    // Both of w0's shards run hot; w1's are light.
    let report = |core: &Core, w: &str, now: Instant| {
        let leases = on(core, w)
            .into_iter()
            .map(|i| {
                let busy = if w == "w0" { 0.9 } else { 0.1 };
                (LeaseId::shard("s", i), LeaseLoad { busy_ratio: busy, ..LeaseLoad::default() })
            })
            .collect();
        (now, WorkerLoad { leases, ..WorkerLoad::default() })
    };
    let loaded_beat = |core: &mut Core, w: &str, now: Instant| {
        let (now, load) = report(core, w, now);
        beat(core, now, w, load).unwrap_or_default()
    };
    loaded_beat(&mut core, "w0", t);
    loaded_beat(&mut core, "w1", t);
    core.tick(t);
    core.tick(t + Duration::from_millis(500));
    assert_eq!(core.counters().load_moves, 0, "not before stable_for");
    core.tick(t + Duration::from_secs(1));
    assert_eq!(core.counters().load_moves, 1, "one hot shard moves");
    let released = loaded_beat(&mut core, "w0", t + Duration::from_secs(1));
    let Some(Instruction::Release { lease, epoch }) = released.first().cloned() else {
        panic!("w0 is asked to release: {released:?}");
    };
    core.release_done(t + Duration::from_secs(1), "w0", &lease, epoch, None, None);
    assert_eq!(core.lease(&lease).and_then(|l| l.record.owner.clone()).as_deref(), Some("w1"));
    // The same load from here on: nothing more moves.
    for s in 2..30 {
        let now = t + Duration::from_secs(s);
        loaded_beat(&mut core, "w0", now);
        loaded_beat(&mut core, "w1", now);
        core.tick(now);
    }
    assert_eq!(core.counters().load_moves, 1, "no flapping under a steady load");
    // 0.9 + 3 × 0.1 of handler time at 0.7 per worker.
    assert_eq!(core.desired_workers(), 2);
}

/// A worker joining a busy fleet gets its share within two heartbeats: its
/// peers are asked to release at their next heartbeat, and it is granted
/// what they confirm at its own next one (releases here confirm at once;
/// a real worker first finishes its in-flight batch).
#[test]
fn a_joining_worker_fills_within_two_heartbeats_under_load() {
    let balancer = Balancer {
        strategy: super::Strategy::Load,
        settle: Duration::ZERO,
        join_window: Duration::ZERO,
        ..Balancer::default()
    };
    let t = Instant::now();
    let mut core = Core::new(CoreConfig { balancer, ..CoreConfig::default() });
    core.discovered(t, LeaseKind::Shard, "s", H, 9);
    for w in ["w0", "w1"] {
        core.register(t, reg(w));
    }
    let settle_round = |core: &mut Core, now: Instant| {
        for w in ["w0", "w1", "w2"] {
            let busy = |i: u32| LeaseLoad { busy_ratio: 0.05 * f64::from(i % 3 + 1), ..LeaseLoad::default() };
            let leases = core
                .leases()
                .filter(|l| l.record.owner.as_deref() == Some(w))
                .map(|l| (l.record.lease.clone(), busy(l.record.lease.index)))
                .collect();
            for i in beat(core, now, w, WorkerLoad { leases, ..WorkerLoad::default() }).unwrap_or_default() {
                if let Instruction::Release { lease, epoch } = i {
                    core.release_done(now, w, &lease, epoch, None, None);
                }
            }
        }
        core.tick(now);
    };
    for s in 0..3 {
        settle_round(&mut core, t + Duration::from_secs(s));
    }
    core.register(t + Duration::from_secs(3), reg("w2"));
    let owned = |core: &Core| core.leases().filter(|l| l.record.owner.as_deref() == Some("w2")).count();
    let mut beats = 0;
    while owned(&core) < 3 && beats < 5 {
        beats += 1;
        settle_round(&mut core, t + Duration::from_secs(3 + beats));
    }
    println!("the joining worker owned its 3 of 9 leases after {beats} heartbeat round(s)");
    assert_eq!(owned(&core), 3, "its share");
    assert!(beats <= 2, "took {beats} heartbeat rounds");
}

// ------------------------------------------------- hostile worker input

/// A `load` core with 8 shards, all on `a` (settle off, so reports count
/// at once).
fn loaded_core(t: Instant) -> Core {
    load_core_on(t, 8, reg("a"))
}

/// A `load` core (settle off, no join window) with `n` shards, all on the
/// one worker `registration` registers.
fn load_core_on(t: Instant, n: u32, registration: Registration) -> Core {
    let balancer = Balancer {
        strategy: super::Strategy::Load,
        settle: Duration::ZERO,
        join_window: Duration::ZERO,
        ..Balancer::default()
    };
    let mut core = Core::new(CoreConfig { balancer, ..CoreConfig::default() });
    core.discovered(t, LeaseKind::Shard, "s", H, n);
    core.register(t, registration);
    core
}

/// A report of `busy` for every lease `worker` owns.
fn every_lease_at(core: &Core, worker: &str, busy: f64) -> WorkerLoad {
    let leases = core
        .owned_by(worker)
        .map(|l| (l.record.lease.clone(), LeaseLoad { busy_ratio: busy, ..LeaseLoad::default() }))
        .collect();
    WorkerLoad { leases, ..WorkerLoad::default() }
}

/// NaN, infinite or negative figures are no evidence: they are dropped
/// (the model keeps what honest reports taught it), so
/// `shardline_desired_workers`, which an autoscaler follows, stays what the
/// honest load needs: 8 × 0.3 of handler time at 0.7 per worker is 4.
#[test]
fn nonsense_load_figures_do_not_poison_the_model_or_desired_workers() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -5.0] {
        let t = Instant::now();
        let mut core = loaded_core(t);
        let load = every_lease_at(&core, "a", bad);
        beat(&mut core, t, "a", load).unwrap_or_default();
        assert!(
            core.model.values().all(|m| m.weight.is_finite() && m.weight >= 0.0),
            "busy_ratio {bad}: the model took it: {:?}",
            core.model.values().map(|m| m.weight).collect::<Vec<_>>()
        );
        for s in 1..4 {
            let load = every_lease_at(&core, "a", 0.3);
            beat(&mut core, t + Duration::from_secs(s), "a", load).unwrap_or_default();
        }
        assert_eq!(core.desired_workers(), 4, "after busy_ratio {bad} and honest reports of 0.3");
        let shown = core.workers().find(|w| w.id == "a").map(|w| w.load.clone()).unwrap_or_default();
        assert!(shown.leases.values().all(|l| l.busy_ratio.is_finite()), "{shown:?}");
    }
}

/// An infinite report alone (nothing honest after it) must not ask for
/// u32::MAX workers either; a figure above what the worker can run (its
/// concurrency) counts as that much.
#[test]
fn desired_workers_is_bounded_by_the_leases() {
    let t = Instant::now();
    let mut core = loaded_core(t);
    let load = every_lease_at(&core, "a", f64::INFINITY);
    beat(&mut core, t, "a", load).unwrap_or_default();
    assert!(core.desired_workers() <= 8, "{} workers for 8 leases", core.desired_workers());
    let load = every_lease_at(&core, "a", 1e300);
    beat(&mut core, t + Duration::from_secs(1), "a", load).unwrap_or_default();
    assert!(core.model.values().all(|m| m.weight <= 1.0), "clamped to the concurrency (1)");
    assert_eq!(core.desired_workers(), 8, "8 leases each using a whole worker need 8, not more");
}

/// A load core with `n` shards, all on `a` (one batch at a time, so one
/// unit of capacity).
fn one_worker_with(n: u32, t: Instant) -> Core {
    load_core_on(t, n, Registration { concurrency: 1, ..reg("a") })
}

/// `a` reports every lease at `out` records/s, `busy` of its time and
/// `lag` records behind, at `now`.
fn report_all(core: &mut Core, now: Instant, (out, busy, lag): (f64, f64, i64)) {
    let leases = core
        .owned_by("a")
        .map(|l| {
            let figures = LeaseLoad { lag, records_out_per_s: out, busy_ratio: busy, ..LeaseLoad::default() };
            (l.record.lease.clone(), figures)
        })
        .collect();
    beat(core, now, "a", WorkerLoad { leases, ..WorkerLoad::default() }).unwrap_or_default();
}

/// The spike `shardline_desired_workers` must answer in one step: 24
/// shards on one worker that gets through 100 records/s (10 ms each, all
/// it has) while 500/s arrive. Handler time says 1 worker's worth (so
/// 1 / 0.7: 2 workers, then 3 once those are busy, and so on); the lags
/// growing 400/s say 5 to keep up, plus 0.4 to clear the 1,200 behind in
/// 30 s: 5.4 at 0.7 each is 8 workers, at once.
#[test]
fn desired_workers_asks_for_a_spike_s_whole_load_in_one_step() {
    let t = Instant::now();
    let mut core = one_worker_with(24, t);
    let s = |k: u64| t + Duration::from_secs(k);
    report_all(&mut core, s(0), (100.0 / 24.0, 1.0 / 24.0, 0));
    assert_eq!(core.desired_workers(), 2, "handler time alone: one busy worker over 0.7");
    for k in 1..=3 {
        let behind = i64::try_from(k).unwrap_or(0) * 400 / 24;
        report_all(&mut core, s(k), (100.0 / 24.0, 1.0 / 24.0, behind));
    }
    let weights: f64 = core.weights().iter().map(|l| l.weight).sum();
    assert!((weights - 1.0).abs() < 1e-9, "placement still sees one worker's handler time: {weights}");
    assert_eq!(core.desired_workers(), 8);
    // The backlog cleared and arrivals back to 50/s: 0.5 of handler time.
    for k in 4..=20 {
        report_all(&mut core, s(k), (50.0 / 24.0, 0.5 / 24.0, 0));
    }
    assert_eq!(core.desired_workers(), 1, "back to one worker once the backlog is gone");
}

/// An idle fleet asks for one worker; a lease with a huge backlog but no
/// record processed yet (its cost unknown) counts as its measured handler
/// time, not as whatever its lag would cost at a guessed price; and
/// nothing asks for more workers than there are leases.
#[test]
fn desired_workers_stays_sane_when_idle_unmeasured_or_overwhelmed() {
    let t = Instant::now();
    let s = |k: u64| t + Duration::from_secs(k);
    let mut idle = one_worker_with(8, t);
    for k in 0..5 {
        report_all(&mut idle, s(k), (0.0, 0.0, 0));
    }
    assert_eq!(idle.desired_workers(), 1, "idle");
    let mut stuck = one_worker_with(8, t);
    for k in 0..5 {
        report_all(&mut stuck, s(k), (0.0, 0.0, 1_000_000_000 * i64::try_from(k).unwrap_or(0)));
    }
    assert_eq!(stuck.desired_workers(), 1, "no cost measured: no guess");
    let mut flood = one_worker_with(8, t);
    for k in 0..5 {
        report_all(&mut flood, s(k), (10.0, 1.0 / 8.0, 1_000_000 * i64::try_from(k).unwrap_or(0)));
    }
    assert_eq!(flood.desired_workers(), 8, "never more workers than leases");
}

/// Load for a lease the worker does not own (unknown, or another's) creates
/// nothing: no model entry, nothing shown as its load.
#[test]
fn load_for_leases_a_worker_does_not_hold_creates_no_state() {
    let t = Instant::now();
    let mut core = loaded_core(t);
    core.register(t, reg("b"));
    let before = core.model.len();
    let mut load = WorkerLoad::default();
    for i in 0..100 {
        load.leases.insert(LeaseId::shard("ghost", i), LeaseLoad { busy_ratio: 0.5, ..LeaseLoad::default() });
    }
    // A lease `a` owns, reported by `b`.
    let theirs = core.owned_by("a").next().map(|l| l.record.lease.clone());
    if let Some(l) = &theirs {
        load.leases.insert(l.clone(), LeaseLoad { busy_ratio: 0.9, ..LeaseLoad::default() });
    }
    beat(&mut core, t, "b", load).unwrap_or_default();
    assert_eq!(core.model.len(), before, "model entries made for leases b does not hold");
    assert!(core.model.keys().all(|l| l.name == "s"));
    if let Some(l) = &theirs {
        assert!(core.model.get(l).is_none_or(|m| !m.measured), "b's report about a's lease was taken");
    }
    let shown = core.workers().find(|w| w.id == "b").map(|w| w.load.leases.len());
    assert_eq!(shown, Some(0), "b's load lists leases it does not hold");
}

/// A checkpoint for a lease the caller does not own is refused and
/// changes nothing, whatever epoch it quotes; one for an unknown lease
/// creates no lease.
#[test]
fn a_checkpoint_for_a_lease_the_worker_does_not_own_changes_nothing() {
    let t = Instant::now();
    let mut core = core_with(2, t);
    core.register(t, reg("a"));
    core.register(t, reg("b"));
    core.take_dirty();
    let Some(lease) = core.owned_by("a").next().map(|l| (l.record.lease.clone(), l.record.epoch)) else {
        panic!("a owns nothing")
    };
    let outcome = core.checkpoint("b", &lease.0, lease.1, 1_000);
    assert_eq!(outcome, CheckpointOutcome::Stale { current_epoch: lease.1 });
    assert_eq!(core.lease(&lease.0).and_then(|l| l.record.checkpoint), None);
    let ghost = LeaseId::shard("ghost", 0);
    assert_eq!(core.checkpoint("b", &ghost, 1, 5), CheckpointOutcome::UnknownLease);
    assert!(core.lease(&ghost).is_none());
    assert!(core.take_dirty().is_empty(), "refused checkpoints wrote records");
}

/// A checkpoint (or a release's final offset) past the high watermark the
/// coordinator read from Kafka is refused and changes nothing; up to it is
/// accepted. Watermarks are kept only for leases in the table.
#[test]
fn a_checkpoint_past_the_known_high_watermark_changes_nothing() {
    let t = Instant::now();
    let mut core = core_with(2, t);
    core.register(t, reg("a"));
    let lease = LeaseId::shard("s", 0);
    let epoch = core.lease(&lease).map_or(0, |l| l.record.epoch);
    core.set_watermark(&lease, 100);
    core.set_watermark(&LeaseId::shard("ghost", 0), 5);
    assert_eq!(core.watermarks.len(), 1, "a watermark kept for a lease not in the table");
    core.take_dirty();
    assert_eq!(core.checkpoint("a", &lease, epoch, 101), CheckpointOutcome::BeyondWatermark { high: 100 });
    assert_eq!(
        core.release_done(t, "a", &lease, epoch, Some(1_000_000), None),
        CheckpointOutcome::BeyondWatermark { high: 100 }
    );
    assert!(core.take_dirty().is_empty(), "a refused checkpoint wrote");
    let l = core.lease(&lease).map(|l| (l.record.checkpoint, l.record.owner.clone(), l.state.clone()));
    assert_eq!(l, Some((None, Some("a".to_owned()), LeaseState::Owned)), "the refused release released");
    assert_eq!(core.checkpoint("a", &lease, epoch, 100), CheckpointOutcome::Ok { checkpoint: Some(100) });
    // Not the owner: stale first, whatever the offset.
    assert!(matches!(core.checkpoint("b", &lease, epoch, 500), CheckpointOutcome::Stale { .. }));
}

/// Workers joining one after another are placed once, after the burst:
/// nothing is granted while they keep coming, then each gets its share
/// straight away, so no lease is handed from one worker to the next.
#[test]
fn a_burst_of_joins_is_placed_once_without_handoffs() {
    let balancer = Balancer { strategy: super::Strategy::Count, ..Balancer::default() };
    let t = Instant::now();
    let mut core = Core::new(CoreConfig { balancer, ..CoreConfig::default() });
    core.discovered(t, LeaseKind::Shard, "s", H, 12);
    let step = Duration::from_millis(100);
    let mut instructions = Vec::new();
    for (i, w) in ["a", "b", "c", "d"].into_iter().enumerate() {
        let now = t + step * i as u32;
        instructions.extend(core.register(now, reg(w)));
        core.tick(now);
    }
    assert!(instructions.is_empty(), "nothing placed during the burst: {instructions:?}");
    let after = t + step * 3 + balancer.join_window;
    core.tick(after);
    for w in ["a", "b", "c", "d"] {
        let got = beat(&mut core, after, w, WorkerLoad::default()).unwrap_or_default();
        assert_eq!(acquired(&got).len(), 3, "{w}: {got:?}");
        assert!(got.iter().all(|i| matches!(i, Instruction::Acquire { .. })), "{w}: {got:?}");
    }
    assert_eq!(core.counters().rebalance_moves, 0, "no handoff");
}
