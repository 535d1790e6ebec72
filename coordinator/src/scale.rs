//! Queue-slot scaling, pure: how many slots a subscription should have,
//! from its backlog and how fast its slots drain it (Lambda's SQS scaling:
//! start small, add quickly, remove gradually, never above
//! `max_concurrency`).
//!
//! - **Up**: when the backlog would take longer than `drain_target` at the
//!   measured drain rate, grow in proportion to how far over the target it
//!   is, at most doubling per step (a rate measured on few slots is noisy).
//!   With no rate yet (slots just started, or none drained) grow by one.
//! - **Down**: when the queue has been empty and the slots' summed busy
//!   time would fit in one slot fewer at 70 % for `scale_down_after`,
//!   remove one slot, then wait another `scale_down_after`.
//! - Otherwise hold: a backlog within the target, or a busy but keeping-up
//!   fleet, changes nothing.

use std::time::{Duration, Instant};

/// A subscription's scaling bounds, from its config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
    pub drain_target: Duration,
    pub scale_down_after: Duration,
}

/// What was measured this round.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    /// Ready messages in the subscription queue.
    pub depth: u64,
    /// Messages per second finished by all slots.
    pub drain_rate: f64,
    /// Summed busy ratio of the slots (1.0 = one slot handling all the time).
    pub busy: f64,
}

/// Utilisation a slot may reach after a removal.
const SHRINK_UTILISATION: f64 = 0.7;

/// One subscription's scaling state.
#[derive(Debug, Clone)]
pub struct Scaler {
    bounds: Bounds,
    slots: u32,
    /// Since when the queue has been idle enough to shrink.
    idle_since: Option<Instant>,
}

impl Scaler {
    /// Starts at `initial` (bounded), e.g. the slots owned before a restart.
    pub fn new(bounds: Bounds, initial: u32) -> Self {
        Self { bounds, slots: initial.clamp(bounds.min, bounds.max), idle_since: None }
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// The slot count after this reading.
    pub fn next(&mut self, now: Instant, r: Reading) -> u32 {
        let b = self.bounds;
        let backlog_secs = if r.drain_rate > 0.0 { r.depth as f64 / r.drain_rate } else { f64::INFINITY };
        let target = b.drain_target.as_secs_f64();
        if r.depth > 0 && backlog_secs > target {
            self.idle_since = None;
            let wanted = if backlog_secs.is_finite() {
                (f64::from(self.slots) * backlog_secs / target).ceil() as u32
            } else {
                self.slots + 1
            };
            self.slots = wanted.clamp(self.slots + 1, self.slots * 2).min(b.max);
            return self.slots;
        }
        let fits_in_fewer = r.busy <= f64::from(self.slots.saturating_sub(1)) * SHRINK_UTILISATION;
        if r.depth == 0 && self.slots > b.min && fits_in_fewer {
            let since = *self.idle_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= b.scale_down_after {
                self.slots -= 1;
                self.idle_since = Some(now);
            }
        } else {
            self.idle_since = None;
        }
        self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        min: 1,
        max: 10,
        drain_target: Duration::from_secs(10),
        scale_down_after: Duration::from_secs(30),
    };

    fn reading(depth: u64, drain_rate: f64, busy: f64) -> Reading {
        Reading { depth, drain_rate, busy }
    }

    #[test]
    fn grows_fast_in_proportion_to_the_backlog_and_stops_at_max() {
        let t = Instant::now();
        let mut s = Scaler::new(BOUNDS, 1);
        // No rate yet: one more.
        assert_eq!(s.next(t, reading(20_000, 0.0, 0.0)), 2);
        // 20 000 at 200/s = 100 s, 10x the target: doubles (the cap per step).
        assert_eq!(s.next(t, reading(20_000, 200.0, 2.0)), 4);
        assert_eq!(s.next(t, reading(20_000, 400.0, 4.0)), 8);
        assert_eq!(s.next(t, reading(15_000, 800.0, 8.0)), 10, "bounded by max_concurrency");
        assert_eq!(s.next(t, reading(15_000, 800.0, 10.0)), 10);
        // A backlog within the target holds.
        let mut s = Scaler::new(BOUNDS, 3);
        assert_eq!(s.next(t, reading(500, 100.0, 3.0)), 3);
        // 15 s of backlog on 3 slots: 3 * 1.5 = 4.5 -> 5.
        assert_eq!(s.next(t, reading(1500, 100.0, 3.0)), 5);
    }

    #[test]
    fn shrinks_one_slot_per_idle_period_down_to_min() {
        let t = Instant::now();
        let mut s = Scaler::new(BOUNDS, 3);
        assert_eq!(s.next(t, reading(0, 0.0, 0.0)), 3, "idle starts now");
        assert_eq!(s.next(t + Duration::from_secs(29), reading(0, 0.0, 0.0)), 3);
        assert_eq!(s.next(t + Duration::from_secs(30), reading(0, 0.0, 0.0)), 2);
        assert_eq!(s.next(t + Duration::from_secs(31), reading(0, 0.0, 0.0)), 2, "one per period");
        assert_eq!(s.next(t + Duration::from_secs(60), reading(0, 0.0, 0.0)), 1);
        assert_eq!(s.next(t + Duration::from_secs(600), reading(0, 0.0, 0.0)), 1, "never below min");
    }

    #[test]
    fn a_busy_fleet_that_keeps_up_is_not_shrunk() {
        let t = Instant::now();
        let mut s = Scaler::new(BOUNDS, 4);
        // Empty queue, but 3.5 slots' worth of work: 3 slots at 70 % = 2.1 < 3.5.
        for secs in [0, 40, 80] {
            assert_eq!(s.next(t + Duration::from_secs(secs), reading(0, 1000.0, 3.5)), 4);
        }
        // A backlog resets the idle clock.
        let mut s = Scaler::new(BOUNDS, 4);
        s.next(t, reading(0, 0.0, 0.0));
        s.next(t + Duration::from_secs(20), reading(10, 100.0, 1.0));
        assert_eq!(s.next(t + Duration::from_secs(35), reading(0, 0.0, 0.0)), 4);
    }

    #[test]
    fn the_start_is_bounded() {
        assert_eq!(Scaler::new(BOUNDS, 0).slots(), 1);
        assert_eq!(Scaler::new(BOUNDS, 50).slots(), 10);
    }
}
