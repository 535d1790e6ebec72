//! Rate profiles as cumulative schedules: how many records should have
//! been sent by second `t`.
//!
//! The producer compares that with what it has sent and sends the
//! difference at each tick, instead of sleeping `1 / rate` between records:
//! a tick that comes late (a busy machine, a slow broker) is made up at the
//! next one, so the long-run rate is exact and the schedule never drifts.

/// Records due by some time, split by where they go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Due {
    /// Spread over all keys (and so all partitions).
    pub base: f64,
    /// A spike's extra load confined to its partitions' keys.
    pub extra: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Profile {
    Constant {
        per_second: f64,
    },
    /// `(start second, rate)`, sorted, the first at 0; each holds until the
    /// next.
    Step {
        steps: Vec<(f64, f64)>,
    },
    /// Linear from `from` to `to` over `over` seconds, then `to`.
    Ramp {
        from: f64,
        to: f64,
        over: f64,
    },
    /// `per_second`, multiplied by `factor` from `at` for `len` seconds:
    /// everywhere, or with `partitions` only on those partitions (their
    /// share of the base rate is multiplied; the others stay as they are).
    Spike {
        per_second: f64,
        factor: f64,
        at: f64,
        len: f64,
        partitions: Option<Vec<u32>>,
    },
}

/// Seconds of `[start, end)` that have passed by `t`.
fn overlap(start: f64, end: f64, t: f64) -> f64 {
    (t.min(end) - start).max(0.0)
}

impl Profile {
    /// Records due by `t` seconds. `share` is the fraction of the base load
    /// that lands on a spike's partitions (their keys' share of all keys);
    /// the extra load is that share times `factor - 1`, so those partitions
    /// run at `factor` times their normal rate.
    pub fn due(&self, t: f64, share: f64) -> Due {
        let t = t.max(0.0);
        match self {
            Profile::Constant { per_second } => Due { base: per_second * t, extra: 0.0 },
            Profile::Step { steps } => {
                let base = steps
                    .iter()
                    .enumerate()
                    .map(|(i, (start, rate))| {
                        let end = steps.get(i + 1).map_or(f64::INFINITY, |(next, _)| *next);
                        rate * overlap(*start, end, t)
                    })
                    .sum();
                Due { base, extra: 0.0 }
            }
            Profile::Ramp { from, to, over } => {
                let ramp = t.min(*over);
                let slope = if *over > 0.0 { (to - from) / over } else { 0.0 };
                let base = from * ramp + slope * ramp * ramp / 2.0 + to * (t - ramp);
                Due { base, extra: 0.0 }
            }
            Profile::Spike { per_second, factor, at, len, partitions } => {
                let spiked = overlap(*at, at + len, t);
                let extra = per_second * (factor - 1.0) * spiked;
                match partitions {
                    None => Due { base: per_second * t + extra, extra: 0.0 },
                    Some(_) => Due { base: per_second * t, extra: extra * share },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The total rate at `t`: the schedule's slope over a millisecond.
    fn rate_at(p: &Profile, t: f64, share: f64) -> f64 {
        let (a, b) = (p.due(t, share), p.due(t + 1e-3, share));
        ((b.base + b.extra) - (a.base + a.extra)) / 1e-3
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6 * b.abs().max(1.0)
    }

    #[test]
    fn constant_is_linear() {
        let p = Profile::Constant { per_second: 1000.0 };
        assert_eq!(p.due(0.0, 1.0), Due { base: 0.0, extra: 0.0 });
        assert!(close(p.due(2.5, 1.0).base, 2500.0));
        assert!(close(rate_at(&p, 7.0, 1.0), 1000.0));
        assert_eq!(p.due(-1.0, 1.0).base, 0.0, "nothing is due before the start");
    }

    #[test]
    fn steps_hold_until_the_next() {
        let p = Profile::Step { steps: vec![(0.0, 500.0), (20.0, 2000.0)] };
        assert!(close(p.due(10.0, 1.0).base, 5000.0));
        assert!(close(p.due(20.0, 1.0).base, 10_000.0));
        assert!(close(p.due(25.0, 1.0).base, 20_000.0));
        assert!(close(rate_at(&p, 19.0, 1.0), 500.0));
        assert!(close(rate_at(&p, 21.0, 1.0), 2000.0));
    }

    #[test]
    fn ramp_integrates_linearly_then_holds() {
        let p = Profile::Ramp { from: 100.0, to: 2100.0, over: 20.0 };
        // Average of 100 and 1100 over the first 10 s.
        assert!(close(p.due(10.0, 1.0).base, 6000.0));
        // Average of 100 and 2100 over 20 s, then 2100/s.
        assert!(close(p.due(20.0, 1.0).base, 22_000.0));
        assert!(close(p.due(21.0, 1.0).base, 24_100.0));
        assert!((rate_at(&p, 10.0, 1.0) - 1100.0).abs() < 1.0);
        let flat = Profile::Ramp { from: 0.0, to: 50.0, over: 0.0 };
        assert!(close(flat.due(2.0, 1.0).base, 100.0), "a zero-length ramp is its end rate");
    }

    #[test]
    fn spike_everywhere_multiplies_the_whole_rate() {
        let p = Profile::Spike { per_second: 100.0, factor: 10.0, at: 10.0, len: 5.0, partitions: None };
        assert!(close(p.due(10.0, 0.25).base, 1000.0));
        assert!(close(p.due(12.0, 0.25).base, 1200.0 + 1800.0));
        assert!(close(p.due(30.0, 0.25).base, 3000.0 + 4500.0));
        assert_eq!(p.due(30.0, 0.25).extra, 0.0);
        assert!(close(rate_at(&p, 12.0, 0.25), 1000.0));
        assert!(close(rate_at(&p, 16.0, 0.25), 100.0));
    }

    #[test]
    fn spike_on_partitions_adds_their_share_only() {
        let p = Profile::Spike {
            per_second: 800.0,
            factor: 10.0,
            at: 10.0,
            len: 20.0,
            partitions: Some(vec![0, 1]),
        };
        // Two of eight partitions get a quarter of the keys: 200/s, spiked
        // to 2000/s, so 1800/s extra; the base stays 800/s.
        let d = p.due(20.0, 0.25);
        assert!(close(d.base, 16_000.0));
        assert!(close(d.extra, 18_000.0));
        assert!(close(p.due(40.0, 0.25).extra, 36_000.0), "the extra stops with the spike");
        assert!(close(rate_at(&p, 15.0, 0.25), 2600.0));
    }
}
