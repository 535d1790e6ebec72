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

use std::collections::BTreeMap;
use std::time::Instant;

use shardline_proto::LeaseId;

use super::balance::{self, LeaseWeight, Params};
use super::{Core, Instruction, LeaseState, Strategy, WorkerId};

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

    /// The eligible worker with the fewest leases (ties: lowest id); under
    /// `load`, the least utilised one first.
    fn least_loaded(&self, handler: Option<&str>, counts: &BTreeMap<WorkerId, u32>) -> Option<WorkerId> {
        // Only `load` looks at utilisation: computing it walks every lease,
        // and this runs once per unassigned lease.
        let util = match self.cfg.balancer.strategy {
            Strategy::Count => BTreeMap::new(),
            Strategy::Load => self.utilisation(),
        };
        let key = |w: &WorkerId| match self.cfg.balancer.strategy {
            Strategy::Count => 0,
            // Whole percent, so tiny measurement noise falls back to counts.
            Strategy::Load => (util.get(w).copied().unwrap_or(0.0) * 100.0) as u64,
        };
        counts
            .iter()
            .filter(|(w, _)| self.eligible(w, handler, counts))
            .min_by_key(|(w, c)| (key(w), **c, (*w).clone()))
            .map(|(w, _)| w.clone())
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
    pub(crate) fn weights(&self) -> Vec<LeaseWeight> {
        let measured: Vec<f64> = self.model.values().filter(|m| m.measured).map(|m| m.weight).collect();
        let mean =
            if measured.is_empty() { 0.0 } else { measured.iter().sum::<f64>() / measured.len() as f64 };
        self.leases
            .values()
            .filter_map(|l| {
                let owner = match &l.state {
                    LeaseState::Owned => l.record.owner.clone()?,
                    LeaseState::Releasing { to: Some(to), .. } => to.clone(),
                    _ => return None,
                };
                let m = self.model.get(&l.record.lease);
                Some(LeaseWeight {
                    lease: l.record.lease.clone(),
                    owner,
                    weight: m.filter(|m| m.measured).map_or(mean, |m| m.weight),
                    lag_growing: m.is_some_and(|m| m.lag_growing()),
                })
            })
            .collect()
    }

    pub fn utilisation(&self) -> BTreeMap<WorkerId, f64> {
        balance::utilisation(&self.capacities(), &self.weights())
    }

    fn params(&self) -> Params {
        let b = &self.cfg.balancer;
        Params { threshold: b.threshold, min_utilisation: b.min_utilisation, max_moves: b.max_moves }
    }

    /// Workers the fleet needs to stay under the target utilisation; never
    /// more than there are leases to run (a worker beyond one per lease
    /// would idle), whatever the reports say.
    pub fn desired_workers(&self) -> u32 {
        let caps = self.capacities();
        let per_worker = if caps.is_empty() { 1.0 } else { caps.values().sum::<f64>() / caps.len() as f64 };
        let total: f64 = self.weights().iter().map(|l| l.weight).sum();
        let runnable = self.leases.values().filter(|l| l.state != LeaseState::Parked).count();
        let most = u32::try_from(runnable).unwrap_or(u32::MAX).max(1);
        balance::desired_workers(total, per_worker, self.cfg.balancer.target_utilisation).min(most)
    }

    /// The `load` strategy's periodic look: a plan when some worker has
    /// stayed overloaded for `stable_for`, then a cool-down.
    pub(crate) fn rebalance_load(&mut self, now: Instant) {
        let b = self.cfg.balancer;
        if self.last_plan.is_some_and(|t| now.saturating_duration_since(t) < b.cooldown) {
            return;
        }
        // Figures of a lease that just moved are not in yet: wait.
        if self.model.values().any(|m| m.settle_until.is_some_and(|t| now < t)) {
            return;
        }
        let (caps, weights, p) = (self.capacities(), self.weights(), self.params());
        let over = balance::overloaded(&caps, &weights, &p);
        if over.is_empty() {
            self.overloaded_since = None;
            return;
        }
        let since = *self.overloaded_since.get_or_insert(now);
        if now.saturating_duration_since(since) < b.stable_for {
            return;
        }
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

    pub(crate) fn assign(&mut self, now: Instant) {
        let mut counts = self.lease_counts();

        let unassigned: Vec<(LeaseId, Option<String>)> = self
            .leases
            .values()
            .filter(|l| l.state == LeaseState::Unassigned)
            .map(|l| (l.record.lease.clone(), l.handler.clone()))
            .collect();
        for (lease, handler) in unassigned {
            if let Some(worker) = self.least_loaded(handler.as_deref(), &counts) {
                self.grant(now, &lease, &worker);
                *counts.entry(worker).or_default() += 1;
            }
        }

        // Each move lowers the sum of squared counts, so this ends; the
        // bound is a guard against a planner bug, not a tuning knob.
        for _ in 0..=self.leases.len() {
            let Some((lease, from, to)) = self.pick_move(&counts) else { break };
            let Some(l) = self.leases.get_mut(&lease) else { break };
            let epoch = l.record.epoch;
            l.state =
                LeaseState::Releasing { to: Some(to.clone()), deadline: now + self.cfg.handoff_timeout };
            l.since = now;
            self.push(&from, Instruction::Release { lease, epoch });
            self.counters.rebalance_moves += 1;
            if let Some(c) = counts.get_mut(&from) {
                *c -= 1;
            }
            *counts.entry(to).or_default() += 1;
        }
    }

    /// One lease to move from the busiest worker to a peer two or more
    /// leases lighter, if any.
    fn pick_move(&self, counts: &BTreeMap<WorkerId, u32>) -> Option<(LeaseId, WorkerId, WorkerId)> {
        let min = counts.values().copied().min()?;
        // Under `load`: a count move must leave its receiver under the
        // overload limit, or it would start a load move back.
        let (caps, weights) = match self.cfg.balancer.strategy {
            Strategy::Count => (BTreeMap::new(), Vec::new()),
            Strategy::Load => (self.capacities(), self.weights()),
        };
        let util = balance::utilisation(&caps, &weights);
        let limit = (balance::mean_utilisation(&caps, &weights) * (1.0 + self.cfg.balancer.threshold))
            .max(self.cfg.balancer.min_utilisation);
        let fits = |lease: &LeaseId, to: &WorkerId| {
            if self.cfg.balancer.strategy == Strategy::Count {
                return true;
            }
            let w = weights.iter().find(|w| &w.lease == lease).map_or(0.0, |w| w.weight);
            util.get(to).copied().unwrap_or(0.0) + w / caps.get(to).copied().unwrap_or(1.0) <= limit
        };
        let mut owned: BTreeMap<&WorkerId, Vec<&super::Lease>> = BTreeMap::new();
        for lease in self.leases.values() {
            if let (LeaseState::Owned, Some(owner)) = (&lease.state, lease.record.owner.as_ref()) {
                owned.entry(owner).or_default().push(lease);
            }
        }
        let mut by_load: Vec<(&WorkerId, u32)> = counts.iter().map(|(w, c)| (w, *c)).collect();
        by_load.sort_by_key(|(w, c)| (std::cmp::Reverse(*c), (*w).clone()));
        for (from, from_count) in by_load {
            if from_count < min + 2 {
                break; // nobody is two lighter than this worker or any after it
            }
            // Newest partitions first: they usually carry the least history.
            for lease in owned.get(from).into_iter().flatten().rev() {
                let to = counts
                    .iter()
                    .filter(|(w, c)| {
                        *w != from
                            && **c + 2 <= from_count
                            && self.eligible(w, lease.handler.as_deref(), counts)
                            && fits(&lease.record.lease, w)
                    })
                    .min_by_key(|(w, c)| (**c, (*w).clone()));
                if let Some((to, _)) = to {
                    return Some((lease.record.lease.clone(), from.clone(), to.clone()));
                }
            }
        }
        None
    }
}
