//! `count` assignment: sticky, and balanced to within one lease per worker.
//!
//! Unassigned leases go to the eligible worker with the fewest leases. Then,
//! while some worker holds two or more leases more than an eligible peer, one
//! of its leases is handed off gracefully to that peer. Nothing else moves,
//! so a join moves only what balance needs and a steady fleet moves nothing.
//!
//! A lease being handed off counts for its new owner already, so one pass
//! never plans the same move twice. Restored workers (not re-registered after
//! a coordinator restart) neither give nor take leases.
//!
//! Under the `load` strategy the same count moves happen only when they
//! leave the receiver under the overload limit (so counting never undoes
//! a load move), unassigned leases go to the least utilised worker, and
//! [`Core::rebalance_load`] moves leases off workers that stay overloaded
//! (see [`super::balance`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use shardline_proto::LeaseId;

use super::balance::{self, LeaseWeight, Params};
use super::{Core, Instruction, LeaseState, Strategy, WorkerId};

/// The fleet's load as [`Core::load_view`] sums it.
pub(crate) struct LoadView {
    /// Each worker that takes leases: its utilisation.
    pub util: BTreeMap<WorkerId, f64>,
    /// The fleet's mean utilisation.
    pub mean: f64,
    /// Workers holding a lease whose lag keeps growing.
    pub lagging: BTreeSet<WorkerId>,
    /// [`Core::desired_workers`].
    pub desired: u32,
}

impl Core {
    /// How many leases each registered worker has or is about to get.
    pub(crate) fn lease_counts(&self) -> BTreeMap<WorkerId, u32> {
        let mut counts: BTreeMap<WorkerId, u32> =
            self.workers.values().filter(|w| w.takes_leases()).map(|w| (w.id.clone(), 0)).collect();
        for lease in self.leases.values() {
            let holder = match &lease.state {
                LeaseState::Owned => lease.record.owner.as_ref(),
                LeaseState::Releasing { to, .. } => to.as_ref(),
                LeaseState::Unassigned | LeaseState::Parked => None,
            };
            if let Some(count) = holder.and_then(|h| counts.get_mut(h)) {
                *count += 1;
            }
        }
        counts
    }

    fn eligible(&self, worker: &str, handler: Option<&str>, counts: &BTreeMap<WorkerId, u32>) -> bool {
        let (Some(w), Some(handler)) = (self.workers.get(worker), handler) else { return false };
        w.takes_leases()
            && w.handlers.contains(handler)
            && (w.capacity == 0 || counts.get(worker).copied().unwrap_or(0) < w.capacity)
    }

    /// Each live worker's batch concurrency (its capacity in handler
    /// seconds per second).
    pub(crate) fn capacities(&self) -> BTreeMap<WorkerId, f64> {
        self.workers
            .values()
            .filter(|w| w.takes_leases())
            .map(|w| (w.id.clone(), f64::from(w.concurrency.max(1))))
            .collect()
    }

    /// Owned leases with their measured weight (unmeasured ones count as
    /// the mean of the measured, so a new lease is neither free nor huge).
    ///
    /// One ordered pass over the table and the model together (both are
    /// keyed by lease): a lookup per lease made this the loop's costliest
    /// walk at tens of thousands of leases.
    pub(crate) fn weights(&self) -> Vec<LeaseWeight> {
        let mean = self.mean_weight();
        self.placed()
            .map(|(id, owner, m)| LeaseWeight {
                lease: id.clone(),
                owner: owner.to_owned(),
                weight: m.filter(|m| m.measured).map_or(mean, |m| m.weight),
                lag_growing: m.is_some_and(|m| m.lag_growing()),
            })
            .collect()
    }

    /// The mean weight of the measured leases: what an unmeasured one
    /// counts as.
    fn mean_weight(&self) -> f64 {
        let (sum, n) = self
            .model
            .values()
            .filter(|m| m.measured)
            .fold((0.0, 0usize), |(sum, n), m| (sum + m.weight, n + 1));
        if n == 0 { 0.0 } else { sum / n as f64 }
    }

    /// Each lease that has a holder (its owner, or the worker it is being
    /// handed to), with its model: one ordered pass over the table and the
    /// model together (both are keyed by lease), since a lookup per lease
    /// made this the loop's costliest walk at tens of thousands of leases.
    fn placed(&self) -> impl Iterator<Item = (&LeaseId, &str, Option<&super::LeaseModel>)> + '_ {
        let mut models = self.model.iter().peekable();
        self.leases.iter().filter_map(move |(id, l)| {
            while models.next_if(|(k, _)| *k < id).is_some() {}
            let m = models.next_if(|(k, _)| *k == id).map(|(_, m)| m);
            let holder = match &l.state {
                LeaseState::Owned => l.record.owner.as_deref(),
                LeaseState::Releasing { to: Some(to), .. } => Some(to.as_str()),
                _ => None,
            };
            holder.map(|h| (id, h, m))
        })
    }

    pub fn utilisation(&self) -> BTreeMap<WorkerId, f64> {
        self.load_view().util
    }

    fn params(&self) -> Params {
        let b = &self.cfg.balancer;
        Params { threshold: b.threshold, min_utilisation: b.min_utilisation, max_moves: b.max_moves }
    }

    /// Workers the fleet needs to stay under the target utilisation while
    /// keeping up with what arrives and clearing each backlog within
    /// `backlog_drain` (each lease's [`balance::Demand`]; its weight, as
    /// placement sees it, until that is known); never more than there are
    /// leases to run (a worker beyond one per lease would idle), whatever
    /// the reports say.
    pub fn desired_workers(&self) -> u32 {
        self.load_view().desired
    }

    /// The fleet's load from one ordered pass over the table and the model,
    /// summing per worker without building [`Core::weights`] (a clone of
    /// two ids per lease): the gauges and the `load` strategy's look take
    /// it every second, and at 50,000 leases the vector alone cost tens of
    /// milliseconds of the loop.
    pub(crate) fn load_view(&self) -> LoadView {
        let caps = self.capacities();
        let mean_weight = self.mean_weight();
        let drain = self.cfg.balancer.backlog_drain;
        // Per worker: capacity, weight summed, a lease of it lagging.
        let mut per: HashMap<&str, (f64, f64, bool)> =
            caps.iter().map(|(w, c)| (w.as_str(), (*c, 0.0, false))).collect();
        let (mut placed_weight, mut demand) = (0.0, 0.0);
        for (_, owner, m) in self.placed() {
            let weight = m.filter(|m| m.measured).map_or(mean_weight, |m| m.weight);
            demand += m.and_then(|m| m.demand.handler_seconds(drain)).unwrap_or(weight);
            if let Some((_, load, lagging)) = per.get_mut(owner) {
                *load += weight;
                *lagging |= m.is_some_and(|m| m.lag_growing());
                placed_weight += weight;
            }
        }
        let runnable = self.leases.values().filter(|l| l.state != LeaseState::Parked).count();
        let total_cap: f64 = caps.values().sum();
        let per_worker = if caps.is_empty() { 1.0 } else { total_cap / caps.len() as f64 };
        let most = u32::try_from(runnable).unwrap_or(u32::MAX).max(1);
        let desired =
            balance::desired_workers(demand, per_worker, self.cfg.balancer.target_utilisation).min(most);
        let util =
            per.iter().map(|(w, (cap, load, _))| ((*w).to_owned(), load / cap.max(f64::EPSILON))).collect();
        let lagging = per.iter().filter(|(_, (_, _, lag))| *lag).map(|(w, _)| (*w).to_owned()).collect();
        LoadView {
            util,
            mean: if total_cap > 0.0 { placed_weight / total_cap } else { 0.0 },
            lagging,
            desired,
        }
    }

    /// The `load` strategy's periodic look: a plan when some worker has
    /// stayed overloaded for `stable_for`, then a cool-down.
    pub(crate) fn rebalance_load(&mut self, now: Instant) {
        if self.last_load_check.is_some_and(|t| now.saturating_duration_since(t) < super::LOAD_CHECK_EVERY) {
            return;
        }
        self.last_load_check = Some(now);
        let b = self.cfg.balancer;
        if self.last_plan.is_some_and(|t| now.saturating_duration_since(t) < b.cooldown) {
            return;
        }
        // Figures of a lease that just moved are not in yet: wait.
        if self.model.values().any(|m| m.settle_until.is_some_and(|t| now < t)) {
            return;
        }
        let (view, p) = (self.load_view(), self.params());
        if balance::overloaded_in(&view.util, view.mean, &view.lagging, &p).is_empty() {
            self.overloaded_since = None;
            return;
        }
        let since = *self.overloaded_since.get_or_insert(now);
        if now.saturating_duration_since(since) < b.stable_for {
            return;
        }
        // Only now the per-lease figures the planner moves.
        let (caps, weights) = (self.capacities(), self.weights());
        let moves = balance::plan(&caps, &weights, &p);
        self.overloaded_since = None;
        if moves.is_empty() {
            return;
        }
        self.last_plan = Some(now);
        let util = balance::utilisation(&caps, &weights);
        let mean = balance::mean_utilisation(&caps, &weights);
        for m in moves {
            let Some(l) = self.leases.get_mut(&m.lease) else { continue };
            if l.state != LeaseState::Owned {
                continue;
            }
            let epoch = l.record.epoch;
            l.state =
                LeaseState::Releasing { to: Some(m.to.clone()), deadline: now + self.cfg.handoff_timeout };
            l.since = now;
            let w = weights.iter().find(|w| w.lease == m.lease);
            tracing::info!(
                lease = %m.lease, from = %m.from, to = %m.to,
                weight = w.map_or(0.0, |w| w.weight), lag_growing = w.is_some_and(|w| w.lag_growing),
                from_utilisation = util.get(&m.from).copied().unwrap_or(0.0),
                to_utilisation = util.get(&m.to).copied().unwrap_or(0.0),
                mean_utilisation = mean, limit = mean * (1.0 + b.threshold),
                "load rebalance: moving a lease off an overloaded worker"
            );
            self.push(&m.from, Instruction::Release { lease: m.lease, epoch });
            self.counters.rebalance_moves += 1;
            self.counters.load_moves += 1;
        }
    }

    /// Places what is unplaced, then balances counts; held while workers
    /// keep joining (`join_window`), and the count planner runs only when
    /// something happened that can unbalance (see `rebalance_due`). One
    /// pass costs O(leases) once plus O(log workers) per lease placed or
    /// moved, whatever the fleet's size.
    pub(crate) fn assign(&mut self, now: Instant) {
        if self.joining(now) {
            return;
        }
        if self.last_join.is_some_and(|t| now.saturating_duration_since(t) < self.cfg.balancer.join_window) {
            // The hold limit ended a burst still going on: hold the rest of
            // it from now on.
            self.burst_since = Some(now);
        }
        if self.unassigned.is_empty() && !self.rebalance_due {
            return;
        }
        self.rebalance_due = false;
        let mut plan = Planner::new(self);
        let unassigned: Vec<LeaseId> = self.unassigned.iter().cloned().collect();
        for lease in unassigned {
            let handler = self.leases.get(&lease).and_then(|l| l.handler.clone());
            if let Some(worker) = plan.least_loaded(self, handler.as_deref()) {
                self.grant(now, &lease, &worker);
                plan.add(&worker, plan.weight(&lease), 1);
            }
        }
        // Each move lowers the sum of squared counts, so this ends; the
        // bound is a guard against a planner bug, not a tuning knob.
        for _ in 0..=self.leases.len() {
            let Some(m) = plan.pick_move(self) else { break };
            let w = plan.weight(&m.lease);
            plan.add(&m.from, -w, -1);
            plan.add(&m.to, w, 1);
            let Some(l) = self.leases.get_mut(&m.lease) else { break };
            let epoch = l.record.epoch;
            let deadline = now + self.cfg.handoff_timeout;
            match &mut l.state {
                // On its way to `from` already: it goes to `to` instead, the
                // same single handoff (its owner's Release is unchanged).
                LeaseState::Releasing { to, .. } if m.retarget => *to = Some(m.to.clone()),
                state => {
                    *state = LeaseState::Releasing { to: Some(m.to.clone()), deadline };
                    l.since = now;
                    self.push(&m.from, Instruction::Release { lease: m.lease.clone(), epoch });
                    self.counters.rebalance_moves += 1;
                }
            }
            plan.moved(&m);
        }
    }
}

/// A count move: release `lease` from `from` to `to`, or (`retarget`) send
/// a lease already on its way to `from` to `to` instead.
struct PlannedMove {
    lease: LeaseId,
    from: WorkerId,
    to: WorkerId,
    retarget: bool,
}

/// The working state of one placement pass: counts (a lease being handed
/// off counts for its receiver), utilisation under `load`, and per worker
/// the leases it could give (owned, newest first) or pass on (incoming).
struct Planner {
    strategy: Strategy,
    counts: BTreeMap<WorkerId, u32>,
    /// Workers ordered by (count, id), for the lightest and the heaviest.
    by_count: BTreeSet<(u32, WorkerId)>,
    /// Workers ordered for placement: (whole percent utilised under `load`,
    /// else 0; count; id).
    by_load: BTreeSet<(u64, u32, WorkerId)>,
    util: BTreeMap<WorkerId, f64>,
    caps: BTreeMap<WorkerId, f64>,
    weights: HashMap<LeaseId, f64>,
    /// The weight an unmeasured lease counts with.
    mean_weight: f64,
    limit: f64,
    owned: HashMap<WorkerId, Vec<LeaseId>>,
    incoming: HashMap<WorkerId, Vec<LeaseId>>,
}

impl Planner {
    fn new(core: &Core) -> Self {
        let strategy = core.cfg.balancer.strategy;
        let counts = core.lease_counts();
        let by_count = counts.iter().map(|(w, c)| (*c, w.clone())).collect();
        let (mut caps, mut util, mut weights, mut mean_weight, mut limit) =
            (BTreeMap::new(), BTreeMap::new(), HashMap::new(), 0.0, f64::INFINITY);
        if strategy == Strategy::Load {
            caps = core.capacities();
            let lw = core.weights();
            util = balance::utilisation(&caps, &lw);
            limit = (balance::mean_utilisation(&caps, &lw) * (1.0 + core.cfg.balancer.threshold))
                .max(core.cfg.balancer.min_utilisation);
            mean_weight = core.mean_weight();
            weights = lw.into_iter().map(|l| (l.lease, l.weight)).collect();
        }
        let mut owned: HashMap<WorkerId, Vec<LeaseId>> = HashMap::new();
        let mut incoming: HashMap<WorkerId, Vec<LeaseId>> = HashMap::new();
        for w in counts.keys() {
            for l in core.owned_by(w) {
                match &l.state {
                    LeaseState::Owned => owned.entry(w.clone()).or_default().push(l.record.lease.clone()),
                    LeaseState::Releasing { to: Some(to), .. } => {
                        incoming.entry(to.clone()).or_default().push(l.record.lease.clone());
                    }
                    _ => {}
                }
            }
        }
        // Leases of workers that take none (draining, restored) may be on
        // their way to a live one too.
        for (owner, ids) in &core.owned {
            if counts.contains_key(owner) {
                continue;
            }
            for l in ids.iter().filter_map(|id| core.leases.get(id)) {
                if let LeaseState::Releasing { to: Some(to), .. } = &l.state {
                    incoming.entry(to.clone()).or_default().push(l.record.lease.clone());
                }
            }
        }
        let mut planner = Self {
            strategy,
            counts,
            by_count,
            by_load: BTreeSet::new(),
            util,
            caps,
            weights,
            mean_weight,
            limit,
            owned,
            incoming,
        };
        planner.by_load = planner.counts.iter().map(|(w, c)| (planner.load_key(w), *c, w.clone())).collect();
        planner
    }

    /// Whole percent, so tiny measurement noise falls back to counts.
    fn load_key(&self, worker: &WorkerId) -> u64 {
        match self.strategy {
            Strategy::Count => 0,
            Strategy::Load => (self.util.get(worker).copied().unwrap_or(0.0) * 100.0) as u64,
        }
    }

    fn weight(&self, lease: &LeaseId) -> f64 {
        match self.strategy {
            Strategy::Count => 0.0,
            Strategy::Load => self.weights.get(lease).copied().unwrap_or(self.mean_weight),
        }
    }

    /// A lease (of this weight) more or less for `worker`.
    fn add(&mut self, worker: &WorkerId, weight: f64, count: i32) {
        let key = self.load_key(worker);
        let Some(c) = self.counts.get_mut(worker) else { return };
        self.by_count.remove(&(*c, worker.clone()));
        self.by_load.remove(&(key, *c, worker.clone()));
        *c = c.saturating_add_signed(count);
        let c = *c;
        self.by_count.insert((c, worker.clone()));
        if self.strategy == Strategy::Load
            && let Some(u) = self.util.get_mut(worker)
        {
            *u += weight / self.caps.get(worker).copied().unwrap_or(1.0).max(f64::EPSILON);
        }
        self.by_load.insert((self.load_key(worker), c, worker.clone()));
    }

    /// The eligible worker with the fewest leases (ties: lowest id); under
    /// `load`, the least utilised (whole percent) first.
    fn least_loaded(&self, core: &Core, handler: Option<&str>) -> Option<WorkerId> {
        self.by_load
            .iter()
            .find(|(_, _, w)| core.eligible(w, handler, &self.counts))
            .map(|(_, _, w)| w.clone())
    }

    /// Under `load`: a count move must leave its receiver under the
    /// overload limit, or it would start a load move back.
    fn fits(&self, lease: &LeaseId, to: &WorkerId) -> bool {
        self.strategy == Strategy::Count
            || self.util.get(to).copied().unwrap_or(0.0)
                + self.weight(lease) / self.caps.get(to).copied().unwrap_or(1.0).max(f64::EPSILON)
                <= self.limit
    }

    /// One lease to move from the busiest worker to a peer two or more
    /// leases lighter, if any: one already on its way to the busiest
    /// first (retargeted, no extra handoff), else one it owns, newest
    /// partition first (they usually carry the least history).
    fn pick_move(&self, core: &Core) -> Option<PlannedMove> {
        let (min, _) = self.by_count.first()?;
        let min = *min;
        for (from_count, from) in self.by_count.iter().rev() {
            if *from_count < min + 2 {
                break; // nobody is two lighter than this worker or any after it
            }
            let incoming = self.incoming.get(from).into_iter().flatten().map(|l| (l, true));
            let owned = self.owned.get(from).into_iter().flatten().rev().map(|l| (l, false));
            for (lease, retarget) in incoming.chain(owned) {
                let Some(l) = core.leases.get(lease) else { continue };
                let to = self.by_count.iter().take_while(|(c, _)| c + 2 <= *from_count).find(|(_, w)| {
                    w != from
                        && l.record.owner.as_ref() != Some(w)
                        && core.eligible(w, l.handler.as_deref(), &self.counts)
                        && self.fits(lease, w)
                });
                if let Some((_, to)) = to {
                    return Some(PlannedMove {
                        lease: lease.clone(),
                        from: from.clone(),
                        to: to.clone(),
                        retarget,
                    });
                }
            }
        }
        None
    }

    /// Keeps the per-worker lists true after a move.
    fn moved(&mut self, m: &PlannedMove) {
        let list = if m.retarget { self.incoming.get_mut(&m.from) } else { self.owned.get_mut(&m.from) };
        if let Some(list) = list {
            list.retain(|l| l != &m.lease);
        }
        self.incoming.entry(m.to.clone()).or_default().push(m.lease.clone());
    }
}
