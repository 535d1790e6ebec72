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
//!
//! How many workers the fleet needs ([`desired_workers`], for an HPA or
//! KEDA) counts each lease's [`Demand`]: the handler time it needs per
//! second to keep up with what arrives *and* clear its backlog within
//! `backlog_drain`, as KEDA's Kafka scaler and Lambda's event source
//! mappings scale on lag. Handler time alone cannot see a spike: a
//! saturated worker reports at most its own capacity, so the figure would
//! grow by `1 / target_utilisation` per round.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use shardline_proto::LeaseId;

use super::{LeaseLoad, WorkerId};

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
    // Once per call, not per worker: the fleet's leases are many.
    let lagging: BTreeSet<WorkerId> =
        leases.iter().filter(|l| l.lag_growing).map(|l| l.owner.clone()).collect();
    overloaded_in(&utilisation(capacity, leases), mean_utilisation(capacity, leases), &lagging, p)
}

/// [`overloaded`] from figures already summed: each worker's utilisation,
/// the fleet's mean, and the workers with a lease whose lag grows.
pub fn overloaded_in(
    util: &BTreeMap<WorkerId, f64>,
    mean: f64,
    lagging: &BTreeSet<WorkerId>,
    p: &Params,
) -> Vec<WorkerId> {
    let limit = mean * (1.0 + p.threshold);
    util.iter()
        .filter(|(w, u)| **u > limit && (**u >= p.min_utilisation || lagging.contains(*w)))
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

/// Reports closer together than this carry no rate: the lag's change
/// over a zero interval would divide by zero.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// What one lease asks of the fleet, learnt from its owner's reports.
///
/// Records arrive at `arrival` per second and each costs `cost` seconds of
/// handler time; the lease needs `cost × (arrival + backlog / drain)`
/// handler seconds per second. Arrival is not what the worker read
/// (`records_in_per_s` is what it fetched, as fast as it could, so a
/// saturated worker reports its own pace): it is what was processed plus
/// how much the backlog grew, `records_out_per_s + Δlag / Δt` between two
/// reports, so a lease falling behind shows its whole load, not the share
/// it gets through. Both figures are smoothed like the weights
/// (`ema_alpha`). The cost is a ratio of the same interval's figures
/// (busy time over records finished), so it holds while the rate moves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Demand {
    /// Handler seconds per record; `None` until a report with records done.
    pub cost: Option<f64>,
    /// Records arriving per second; `None` until two reports with a known
    /// lag.
    pub arrival: Option<f64>,
    /// Records behind at the last report with a known lag.
    pub backlog: f64,
    /// That report: when, and its lag (the next one's growth counts from
    /// here).
    last: Option<(Instant, i64)>,
}

impl Demand {
    /// Takes in one report of the lease's owner (its figures already
    /// checked finite and non-negative; a negative lag means unknown).
    pub fn observe(&mut self, now: Instant, l: &LeaseLoad, alpha: f64) {
        let smooth = |old: Option<f64>, new: f64| old.map_or(new, |old| alpha * new + (1.0 - alpha) * old);
        if l.records_out_per_s > 0.0 {
            let cost = l.busy_ratio / l.records_out_per_s;
            if cost.is_finite() {
                self.cost = Some(smooth(self.cost, cost));
            }
        }
        if l.lag < 0 {
            return;
        }
        match self.last {
            Some((then, _)) if now.saturating_duration_since(then) < MIN_INTERVAL => return,
            Some((then, lag)) => {
                let dt = now.saturating_duration_since(then).as_secs_f64();
                // As floats: lags are any i64 a worker sends.
                let growth = (l.lag as f64 - lag as f64) / dt;
                let arrival = l.records_out_per_s + growth;
                if arrival.is_finite() {
                    self.arrival = Some(smooth(self.arrival, arrival));
                }
            }
            None => {}
        }
        self.backlog = l.lag as f64;
        self.last = Some((now, l.lag));
    }

    /// The lease has a new owner: its first report counts the backlog,
    /// not growth since the previous owner's last (the gap between them
    /// had no report of records done).
    pub fn rebase(&mut self) {
        self.last = None;
    }

    /// Handler seconds per second the lease needs to keep up and to clear
    /// its backlog within `drain`; `None` until its cost and arrival rate
    /// are known (or when they make no sense together).
    pub fn handler_seconds(&self, drain: Duration) -> Option<f64> {
        let (cost, arrival) = (self.cost?, self.arrival?);
        let drain = drain.as_secs_f64().max(MIN_INTERVAL.as_secs_f64());
        let need = cost * (arrival.max(0.0) + self.backlog.max(0.0) / drain);
        // 0 × ∞ from absurd reports: no estimate rather than NaN.
        (!need.is_nan()).then_some(need.min(f64::MAX))
    }
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

    /// Reports one second apart: (records out per second, busy ratio, lag).
    fn demand_of(reports: &[(f64, f64, i64)]) -> Demand {
        let t = Instant::now();
        let mut d = Demand::default();
        for (i, (out, busy, lag)) in reports.iter().enumerate() {
            let l =
                LeaseLoad { lag: *lag, records_out_per_s: *out, busy_ratio: *busy, ..LeaseLoad::default() };
            d.observe(t + Duration::from_secs(i as u64), &l, 0.3);
        }
        d
    }

    const DRAIN: Duration = Duration::from_secs(30);

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn a_lease_keeping_up_needs_its_handler_time() {
        // 50 records/s at 10 ms each, lag steady at 30: half a worker, plus
        // 30 records over 30 s.
        let d = demand_of(&[(50.0, 0.5, 30); 5]);
        assert!(close(d.cost, 0.01) && close(d.arrival, 50.0), "{d:?}");
        assert!(close(d.handler_seconds(DRAIN), 0.5 + 0.01), "{:?}", d.handler_seconds(DRAIN));
    }

    #[test]
    fn a_saturated_lease_whose_lag_grows_shows_its_whole_load() {
        // It gets through 100/s (all its worker has), its lag grows 900/s:
        // 1,000/s arrive, ten times what its busy ratio of 1 shows.
        let reports: Vec<(f64, f64, i64)> = (0..4).map(|i| (100.0, 1.0, 900 * i)).collect();
        let d = demand_of(&reports);
        assert!(close(d.arrival, 1000.0), "{d:?}");
        // 10 to keep up, and 2,700 behind over 30 s: 0.9 more.
        assert!(close(d.handler_seconds(DRAIN), 10.9), "{:?}", d.handler_seconds(DRAIN));
        // A backlog shrinking after the spike asks for less than the
        // handler time spent on it: it will be gone soon.
        let draining = demand_of(&[(300.0, 1.0, 3000), (300.0, 1.0, 2800), (300.0, 1.0, 2600)]);
        let need = draining.handler_seconds(DRAIN).unwrap_or(f64::NAN);
        assert!(need < 1.0, "{need}: 100/s arrive, 2,600 behind");
    }

    #[test]
    fn no_estimate_without_measurements() {
        assert_eq!(Demand::default().handler_seconds(DRAIN), None);
        // A huge backlog but nothing processed yet: the cost is unknown.
        assert_eq!(demand_of(&[(0.0, 0.0, 1_000_000_000); 3]).handler_seconds(DRAIN), None);
        // Records processed but the lag never known: no arrival rate.
        assert_eq!(demand_of(&[(100.0, 1.0, -1); 3]).handler_seconds(DRAIN), None);
        // One report has a lag but no growth yet.
        assert_eq!(demand_of(&[(100.0, 1.0, 5)]).handler_seconds(DRAIN), None);
    }

    #[test]
    fn reports_at_the_same_instant_or_across_owners_are_no_growth() {
        let t = Instant::now();
        let l =
            |lag: i64| LeaseLoad { lag, records_out_per_s: 10.0, busy_ratio: 0.1, ..LeaseLoad::default() };
        let mut d = Demand::default();
        d.observe(t, &l(0), 0.3);
        d.observe(t, &l(1_000_000), 0.3);
        d.observe(t + Duration::from_secs(1), &l(10), 0.3);
        assert!(close(d.arrival, 20.0), "measured from the first report at t: {d:?}");
        // A new owner: its first report is a new baseline, not growth.
        d.rebase();
        d.observe(t + Duration::from_secs(5), &l(5000), 0.3);
        assert!(close(d.arrival, 20.0), "{d:?}");
        assert_eq!(d.backlog, 5000.0);
    }

    proptest! {
        /// Whatever a worker reports (checked finite and non-negative, lags
        /// any i64), the estimate is a number of handler seconds or none:
        /// never NaN, never negative.
        #[test]
        fn demand_is_never_nan_or_negative(
            reports in proptest::collection::vec(
                (0u64..3_000, any::<i64>(), 0.0f64..1e12, 0.0f64..1e3, prop_oneof![Just(0.0), 0.0f64..1e300]),
                1..12,
            ),
        ) {
            let t = Instant::now();
            let mut d = Demand::default();
            let mut at = t;
            for (gap_ms, lag, out, busy, huge) in reports {
                at += Duration::from_millis(gap_ms);
                let l = LeaseLoad { lag, records_out_per_s: out.max(huge), busy_ratio: busy, ..LeaseLoad::default() };
                d.observe(at, &l, 0.3);
                if let Some(need) = d.handler_seconds(DRAIN) {
                    prop_assert!(need >= 0.0 && !need.is_nan(), "{need} from {d:?}");
                }
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
