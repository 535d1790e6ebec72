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

use std::collections::BTreeMap;
use std::time::Instant;

use shardline_proto::LeaseId;

use super::{Core, Instruction, LeaseState, WorkerId};

impl Core {
    /// How many leases each registered worker has or is about to get.
    pub(crate) fn lease_counts(&self) -> BTreeMap<WorkerId, u32> {
        let mut counts: BTreeMap<WorkerId, u32> =
            self.workers.values().filter(|w| !w.restored && !w.draining).map(|w| (w.id.clone(), 0)).collect();
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
        !w.restored
            && !w.draining
            && w.handlers.contains(handler)
            && (w.capacity == 0 || counts.get(worker).copied().unwrap_or(0) < w.capacity)
    }

    /// The eligible worker with the fewest leases (ties: lowest id).
    fn least_loaded(&self, handler: Option<&str>, counts: &BTreeMap<WorkerId, u32>) -> Option<WorkerId> {
        counts
            .iter()
            .filter(|(w, _)| self.eligible(w, handler, counts))
            .min_by_key(|(w, c)| (**c, (*w).clone()))
            .map(|(w, _)| w.clone())
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
