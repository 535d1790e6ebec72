//! The `load` strategy's planner, pure: given each worker's capacity and
//! each lease's measured weight, which leases to move so that no worker
//! stays above the fleet's mean utilisation × (1 + threshold).
//!
//! A lease's weight is the handler time it uses per second (its busy ratio,
//! smoothed); a worker's utilisation is the sum of its leases' weights over
//! its capacity (how many batches it can run at once). The planner moves
//! the fewest leases it can, many in one plan if needed (not one per round
//! like KCL), hottest worker first and, on it, leases whose lag grows
//! first, then the heaviest that fits. A move is taken only if it leaves
//! both workers strictly below the overloaded worker's utilisation, so the
//! maximum never goes up and a plan never undoes itself.

use std::collections::BTreeMap;

use shardline_proto::LeaseId;

use super::WorkerId;

/// One lease as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseWeight {
    pub lease: LeaseId,
    pub owner: WorkerId,
    /// Handler seconds per second.
    pub weight: f64,
    /// Its lag kept growing over the last reports.
    pub lag_growing: bool,
}

/// The planner's knobs (from `[balancer]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Above mean × (1 + threshold) a worker is overloaded.
    pub threshold: f64,
    /// Below this utilisation nobody is overloaded (an idle fleet never
    /// churns), unless a lease's lag is growing.
    pub min_utilisation: f64,
    /// Most moves per plan.
    pub max_moves: usize,
}

/// A planned move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub lease: LeaseId,
    pub from: WorkerId,
    pub to: WorkerId,
}

/// Utilisation per worker under the given placement.
pub fn utilisation(capacity: &BTreeMap<WorkerId, f64>, leases: &[LeaseWeight]) -> BTreeMap<WorkerId, f64> {
    let mut load: BTreeMap<WorkerId, f64> = capacity.keys().map(|w| (w.clone(), 0.0)).collect();
    for l in leases {
        if let (Some(u), Some(cap)) = (load.get_mut(&l.owner), capacity.get(&l.owner)) {
            *u += l.weight / cap.max(f64::EPSILON);
        }
    }
    load
}

/// The mean utilisation of the fleet: all weight over all capacity.
pub fn mean_utilisation(capacity: &BTreeMap<WorkerId, f64>, leases: &[LeaseWeight]) -> f64 {
    let total: f64 = capacity.values().sum();
    let weight: f64 = leases.iter().filter(|l| capacity.contains_key(&l.owner)).map(|l| l.weight).sum();
    if total > 0.0 { weight / total } else { 0.0 }
}

/// Workers overloaded now: above the limit and busy enough to matter.
pub fn overloaded(capacity: &BTreeMap<WorkerId, f64>, leases: &[LeaseWeight], p: &Params) -> Vec<WorkerId> {
    let limit = mean_utilisation(capacity, leases) * (1.0 + p.threshold);
    let util = utilisation(capacity, leases);
    // Once per call, not per worker: the fleet's leases are many.
    let lagging: std::collections::BTreeSet<&WorkerId> =
        leases.iter().filter(|l| l.lag_growing).map(|l| &l.owner).collect();
    util.iter()
        .filter(|(w, u)| **u > limit && (**u >= p.min_utilisation || lagging.contains(w)))
        .map(|(w, _)| w.clone())
        .collect()
}

/// The moves that bring every worker under the limit (or as close as
/// single-lease moves can), at most `max_moves`.
pub fn plan(capacity: &BTreeMap<WorkerId, f64>, leases: &[LeaseWeight], p: &Params) -> Vec<Move> {
    let limit = mean_utilisation(capacity, leases) * (1.0 + p.threshold);
    let mut placed: Vec<LeaseWeight> =
        leases.iter().filter(|l| capacity.contains_key(&l.owner)).cloned().collect();
    let mut moves = Vec::new();
    let mut stuck: Vec<WorkerId> = Vec::new();
    while moves.len() < p.max_moves {
        let util = utilisation(capacity, &placed);
        let lagging = |w: &WorkerId| placed.iter().any(|l| &l.owner == w && l.lag_growing);
        // The overloaded worker we have not given up on whose leases fall
        // behind, else the hottest.
        let Some((from, from_u)) = util
            .iter()
            .filter(|(w, u)| **u > limit && (**u >= p.min_utilisation || lagging(w)) && !stuck.contains(w))
            .max_by(|a, b| lagging(a.0).cmp(&lagging(b.0)).then(a.1.total_cmp(b.1)))
            .map(|(w, u)| (w.clone(), *u))
        else {
            break;
        };
        // Growing lag first, then heaviest: the lease that hurts most.
        let mut candidates: Vec<usize> = (0..placed.len()).filter(|i| placed[*i].owner == from).collect();
        candidates.sort_by(|a, b| {
            let (a, b) = (&placed[*a], &placed[*b]);
            b.lag_growing.cmp(&a.lag_growing).then(b.weight.total_cmp(&a.weight))
        });
        let mut chosen = None;
        for i in candidates {
            let l = &placed[i];
            let from_after = from_u - l.weight / capacity[&from].max(f64::EPSILON);
            // The least utilised worker it would fit on, strictly below the
            // overloaded worker's utilisation, so the maximum goes down.
            let target = util
                .iter()
                .filter(|(w, _)| **w != from)
                .map(|(w, u)| (w, u + l.weight / capacity[w].max(f64::EPSILON)))
                .filter(|(_, after)| *after < from_u && from_after < from_u)
                .min_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((to, _)) = target {
                chosen = Some((i, to.clone()));
                break;
            }
        }
        match chosen {
            Some((i, to)) => {
                moves.push(Move { lease: placed[i].lease.clone(), from: from.clone(), to: to.clone() });
                placed[i].owner = to;
            }
            None => stuck.push(from),
        }
    }
    moves
}

/// How many workers of `capacity` each keep the fleet's total weight under
/// `target` utilisation (at least 1).
pub fn desired_workers(total_weight: f64, capacity_per_worker: f64, target: f64) -> u32 {
    let per_worker = capacity_per_worker.max(f64::EPSILON) * target.clamp(0.05, 1.0);
    // Less a hair, so 2.1 / 0.7 (3.0000000000000004 in floats) needs 3.
    ((total_weight / per_worker - 1e-9).ceil() as u32).max(1)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const P: Params = Params { threshold: 0.2, min_utilisation: 0.5, max_moves: 8 };

    fn caps(n: usize, cap: f64) -> BTreeMap<WorkerId, f64> {
        (0..n).map(|i| (format!("w{i}"), cap)).collect()
    }

    fn lease(i: u32, owner: usize, weight: f64) -> LeaseWeight {
        LeaseWeight { lease: LeaseId::shard("s", i), owner: format!("w{owner}"), weight, lag_growing: false }
    }

    fn apply(leases: &mut [LeaseWeight], moves: &[Move]) {
        for m in moves {
            if let Some(l) = leases.iter_mut().find(|l| l.lease == m.lease) {
                l.owner = m.to.clone();
            }
        }
    }

    fn max_util(c: &BTreeMap<WorkerId, f64>, l: &[LeaseWeight]) -> f64 {
        utilisation(c, l).values().copied().fold(0.0, f64::max)
    }

    #[test]
    fn two_hot_shards_on_one_worker_are_split_in_one_plan() {
        // 8 shards on 3 workers by count (3/3/2); shards 0 and 1 are ×10.
        let c = caps(3, 1.0);
        let mut leases: Vec<LeaseWeight> =
            (0..8).map(|i| lease(i, (i % 3) as usize, if i < 2 { 0.8 } else { 0.08 })).collect();
        leases[1].owner = "w0".into();
        let before = max_util(&c, &leases);
        let moves = plan(&c, &leases, &P);
        assert!(!moves.is_empty(), "the drowning worker gets help");
        apply(&mut leases, &moves);
        assert!(max_util(&c, &leases) < before);
        assert!(max_util(&c, &leases) < 1.0, "nobody is over capacity: {:?}", utilisation(&c, &leases));
        assert!(plan(&c, &leases, &P).is_empty(), "a second look changes nothing");
    }

    #[test]
    fn an_idle_or_even_fleet_is_left_alone() {
        let c = caps(3, 1.0);
        let idle: Vec<LeaseWeight> =
            (0..9).map(|i| lease(i, (i % 3) as usize, 0.01 * f64::from(i))).collect();
        assert!(plan(&c, &idle, &P).is_empty(), "under min_utilisation nothing moves");
        let even: Vec<LeaseWeight> = (0..9).map(|i| lease(i, (i % 3) as usize, 0.3)).collect();
        assert!(plan(&c, &even, &P).is_empty());
    }

    #[test]
    fn a_new_empty_worker_takes_load_from_a_fleet_that_is_behind() {
        let c = caps(3, 1.0);
        let mut leases: Vec<LeaseWeight> = (0..8).map(|i| lease(i, (i % 2) as usize, 0.22)).collect();
        leases[0].lag_growing = true;
        let moves = plan(&c, &leases, &P);
        assert!(moves.len() >= 2, "several moves at once: {moves:?}");
        assert!(moves.iter().all(|m| m.to == "w2"));
        assert_eq!(moves[0].lease, LeaseId::shard("s", 0), "the lagging lease moves first");
    }

    proptest! {
        #[test]
        fn plans_never_raise_the_maximum_respect_the_limit_and_converge(
            weights in proptest::collection::vec((0.0f64..1.0, 0usize..4, any::<bool>()), 1..24),
            workers in 2usize..5,
            max_moves in 1usize..6,
        ) {
            let c = caps(workers, 1.0);
            let mut leases: Vec<LeaseWeight> = weights
                .iter()
                .enumerate()
                .map(|(i, (w, o, lag))| LeaseWeight { lag_growing: *lag, ..lease(i as u32, o % workers, *w) })
                .collect();
            let p = Params { max_moves, ..P };
            let mut rounds = 0;
            loop {
                let before = max_util(&c, &leases);
                let moves = plan(&c, &leases, &p);
                prop_assert!(moves.len() <= max_moves);
                if moves.is_empty() {
                    break;
                }
                apply(&mut leases, &moves);
                prop_assert!(max_util(&c, &leases) <= before + 1e-9, "the maximum went up");
                rounds += 1;
                // Each plan strictly lowers a worker's load or stops: bounded.
                prop_assert!(rounds <= 500, "no convergence");
            }
        }
    }

    #[test]
    fn desired_workers_covers_the_load_at_the_target() {
        assert_eq!(desired_workers(0.0, 1.0, 0.7), 1);
        assert_eq!(desired_workers(2.1, 1.0, 0.7), 3);
        assert_eq!(desired_workers(2.2, 1.0, 0.7), 4);
    }
}
