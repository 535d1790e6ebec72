//! Handler usage per mapping, metered like Lambda: each handler attempt's
//! duration rounded up to 100 ms units (the worker rounds, per attempt).
//!
//! Workers report cumulative counters per mapping since their process
//! started; the meter keeps the last report of each worker process and adds
//! the difference to time buckets, so a lost heartbeat loses nothing and a
//! restarted worker (another incarnation, or counters back near zero)
//! counts from zero.
//!
//! Retention is bounded in time and in size: buckets are per minute for
//! [`MINUTE_RETENTION_MS`] (24 h), then rolled up into one bucket per hour
//! (keyed by the hour's start, so an hour bucket has the key its minute 0
//! had) and kept for [`RETENTION_MS`] (31 days). A bucket is
//! `(start, mapping)` whatever its width: its age says which it is, so the
//! stored layout did not change, and minute buckets written before the
//! roll-up existed are rolled up at the first pass after a restart. With
//! `M` mappings that is at most about `M × (25 × 60 + 31 × 24)` buckets.
//! The mapping names are checked against the config before they get here.
//!
//! The last reports of a worker that left (expired) are kept in a small
//! ring of [`DEPARTED`] workers, so one that comes back as the same process
//! (it was cut off, not killed) is not counted twice; workers killed for
//! good age out of it, so the meter does not grow with restarts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
/// How long minute buckets are kept before they are rolled up into hours.
pub const MINUTE_RETENTION_MS: i64 = 24 * HOUR_MS;
/// How long hour buckets are kept.
pub const RETENTION_MS: i64 = 31 * 24 * HOUR_MS;
/// Workers that left whose last reports are kept (see the module docs).
pub const DEPARTED: usize = 256;

/// Counters of one mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub handler: String,
    pub batches: u64,
    pub records: u64,
    pub handler_ms: u64,
    pub billed_units: u64,
}

impl Counts {
    /// Saturating: counters come from workers, and a huge report must not
    /// overflow (or, in debug builds, panic) the sum.
    fn add(&mut self, other: &Counts) {
        self.batches = self.batches.saturating_add(other.batches);
        self.records = self.records.saturating_add(other.records);
        self.handler_ms = self.handler_ms.saturating_add(other.handler_ms);
        self.billed_units = self.billed_units.saturating_add(other.billed_units);
    }

    /// `self - before`, or `self` when any counter went down (the worker
    /// restarted and counts from zero again).
    fn since(&self, before: &Counts) -> Counts {
        let restarted = self.batches < before.batches
            || self.records < before.records
            || self.handler_ms < before.handler_ms
            || self.billed_units < before.billed_units;
        if restarted {
            return self.clone();
        }
        Counts {
            handler: self.handler.clone(),
            batches: self.batches - before.batches,
            records: self.records - before.records,
            handler_ms: self.handler_ms - before.handler_ms,
            billed_units: self.billed_units - before.billed_units,
        }
    }

    fn is_zero(&self) -> bool {
        self.batches == 0 && self.records == 0 && self.handler_ms == 0 && self.billed_units == 0
    }
}

/// A bucket's key: its start (Unix ms; a minute, or an hour once older
/// than [`MINUTE_RETENTION_MS`]) and the mapping.
pub type BucketKey = (i64, String);

/// One worker process's last cumulative report per mapping.
#[derive(Debug, Clone, Default)]
struct Last {
    incarnation: u64,
    counts: BTreeMap<String, Counts>,
}

/// The meter; pure (the caller passes the time).
#[derive(Debug, Default)]
pub struct Meter {
    last: BTreeMap<String, Last>,
    /// Workers that left, oldest first, at most [`DEPARTED`].
    departed: VecDeque<(String, Last)>,
    buckets: BTreeMap<BucketKey, Counts>,
    dirty: BTreeSet<BucketKey>,
    /// Buckets merged into their hour or past retention, to delete from
    /// the store.
    gone: BTreeSet<BucketKey>,
}

impl Meter {
    /// Rebuilds from stored buckets (minute and hour buckets alike; the
    /// next [`Meter::take_dirty`] rolls up what is due).
    pub fn restore(buckets: Vec<(BucketKey, Counts)>) -> Self {
        Self { buckets: buckets.into_iter().collect(), ..Self::default() }
    }

    /// The start (Unix ms) of the minute holding `ms` (`i64::MIN` for the
    /// first minute's few ms: `since_ms` comes from the wire).
    pub fn minute(ms: i64) -> i64 {
        ms.saturating_sub(ms.rem_euclid(MINUTE_MS))
    }

    fn hour(ms: i64) -> i64 {
        ms - ms.rem_euclid(HOUR_MS)
    }

    /// A worker process's cumulative counters per mapping, observed at
    /// `now_ms`. Another `incarnation` than last time is a new process,
    /// which counts from zero.
    pub fn observe(
        &mut self,
        worker: &str,
        incarnation: u64,
        now_ms: i64,
        cumulative: Vec<(String, Counts)>,
    ) {
        let minute = Self::minute(now_ms);
        let last = match self.last.get_mut(worker) {
            Some(last) => last,
            None => {
                // Back after it expired, as the same process: its counters
                // go on from where they were.
                let back = self.departed.iter().position(|(w, _)| w == worker);
                let last =
                    back.and_then(|i| self.departed.remove(i)).map(|(_, last)| last).unwrap_or_default();
                self.last.entry(worker.to_owned()).or_insert(last)
            }
        };
        if last.incarnation != incarnation {
            *last = Last { incarnation, counts: BTreeMap::new() };
        }
        for (mapping, counts) in cumulative {
            let delta = match last.counts.get(&mapping) {
                Some(before) => counts.since(before),
                None => counts.clone(),
            };
            last.counts.insert(mapping.clone(), counts);
            if delta.is_zero() {
                continue;
            }
            let bucket = (minute, mapping);
            let entry = self.buckets.entry(bucket.clone()).or_default();
            entry.handler.clone_from(&delta.handler);
            entry.add(&delta);
            self.gone.remove(&bucket);
            self.dirty.insert(bucket);
        }
    }

    /// A worker left for good (deregistered): its next process starts
    /// afresh.
    pub fn forget(&mut self, worker: &str) {
        self.last.remove(worker);
        self.departed.retain(|(w, _)| w != worker);
    }

    /// A worker expired: its last reports move to the ring of departed
    /// workers (the oldest there is dropped).
    pub fn depart(&mut self, worker: &str) {
        let Some(last) = self.last.remove(worker) else { return };
        self.departed.retain(|(w, _)| w != worker);
        if self.departed.len() >= DEPARTED {
            self.departed.pop_front();
        }
        self.departed.push_back((worker.to_owned(), last));
    }

    /// [`Meter::depart`] for every worker `live` says is gone.
    pub fn depart_absent(&mut self, live: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self.last.keys().filter(|w| !live(w)).cloned().collect();
        for worker in gone {
            self.depart(&worker);
        }
    }

    /// Workers whose last reports the meter holds (live and departed).
    pub fn workers_known(&self) -> usize {
        self.last.len() + self.departed.len()
    }

    /// Buckets held (minute and hour).
    pub fn buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Totals per mapping over the buckets starting at or after `since_ms`
    /// (its minute), and the first bucket's start counted. An hour bucket
    /// that began before `since_ms` is not counted: the reply's start says
    /// where counting began.
    pub fn totals(&self, since_ms: i64) -> (Vec<(String, Counts)>, i64) {
        let from = Self::minute(since_ms);
        let mut totals: BTreeMap<String, Counts> = BTreeMap::new();
        let mut first = i64::MAX;
        for ((start, mapping), counts) in self.buckets.range((from, String::new())..) {
            first = first.min(*start);
            let t = totals.entry(mapping.clone()).or_default();
            t.handler.clone_from(&counts.handler);
            t.add(counts);
        }
        (totals.into_iter().collect(), if first == i64::MAX { from } else { first })
    }

    /// Rolls minute buckets older than [`MINUTE_RETENTION_MS`] into their
    /// hour and drops hour buckets older than [`RETENTION_MS`]; then hands
    /// out the buckets changed since the last call (to write) and those
    /// gone (to delete). A key in both lists is only written: an hour
    /// bucket takes its minute 0's key.
    pub fn take_dirty(&mut self, now_ms: i64) -> (Vec<(BucketKey, Counts)>, Vec<BucketKey>) {
        // Whole hours only: the hour holding the cut-off keeps its minutes
        // until it has passed entirely.
        let hours_from = Self::hour(now_ms - MINUTE_RETENTION_MS);
        let expired_before = Self::hour(now_ms - RETENTION_MS);
        let old: Vec<BucketKey> =
            self.buckets.range(..(hours_from, String::new())).map(|(k, _)| k.clone()).collect();
        for key in old {
            let (start, mapping) = &key;
            if *start < expired_before {
                self.buckets.remove(&key);
                self.dirty.remove(&key);
                self.gone.insert(key);
                continue;
            }
            let hour = Self::hour(*start);
            if hour == *start {
                continue; // an hour bucket already (or its minute 0)
            }
            let Some(counts) = self.buckets.remove(&key) else { continue };
            self.dirty.remove(&key);
            self.gone.insert(key.clone());
            let into = (hour, mapping.clone());
            let entry = self.buckets.entry(into.clone()).or_default();
            entry.handler.clone_from(&counts.handler);
            entry.add(&counts);
            self.gone.remove(&into);
            self.dirty.insert(into);
        }
        let dirty = std::mem::take(&mut self.dirty);
        let changed =
            dirty.into_iter().filter_map(|k| self.buckets.get(&k).map(|c| (k.clone(), c.clone()))).collect();
        let gone = std::mem::take(&mut self.gone).into_iter().collect();
        (changed, gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(batches: u64, billed: u64) -> Counts {
        Counts {
            handler: "h".into(),
            batches,
            records: batches * 10,
            handler_ms: billed * 90,
            billed_units: billed,
        }
    }

    #[test]
    fn cumulative_reports_become_deltas_and_survive_restarts_and_lost_reports() {
        let mut m = Meter::default();
        let t0 = 1_800_000_000_000;
        m.observe("w1", 1, t0, vec![("orders".into(), counts(2, 3))]);
        // A lost heartbeat: the next report still carries everything.
        m.observe("w1", 1, t0 + 2_000, vec![("orders".into(), counts(5, 7))]);
        m.observe(
            "w2",
            1,
            t0 + 61_000,
            vec![("orders".into(), counts(1, 1)), ("emails".into(), counts(4, 4))],
        );
        // w1 restarted: its counters start over.
        m.observe("w1", 1, t0 + 62_000, vec![("orders".into(), counts(1, 2))]);
        let (totals, _) = m.totals(0);
        let get = |name: &str| totals.iter().find(|(n, _)| n == name).map(|(_, c)| c.clone());
        assert_eq!(get("orders").map(|c| (c.batches, c.billed_units)), Some((5 + 1 + 1, 7 + 1 + 2)));
        assert_eq!(get("emails").map(|c| c.billed_units), Some(4));
        // Only the later minute: w2's report and w1's restart.
        let (later, from) = m.totals(t0 + 60_000);
        assert_eq!(later.iter().map(|(_, c)| c.billed_units).sum::<u64>(), 1 + 4 + 2);
        assert_eq!(from, Meter::minute(t0 + 61_000));
    }

    /// A new process under the same id counts from zero even when its
    /// counters are already above the old process's last report.
    #[test]
    fn another_incarnation_counts_from_zero() {
        let mut m = Meter::default();
        let t0 = 1_800_000_000_000;
        m.observe("w1", 1, t0, vec![("orders".into(), counts(2, 2))]);
        m.observe("w1", 2, t0 + 1_000, vec![("orders".into(), counts(5, 5))]);
        assert_eq!(m.totals(0).0.first().map(|(_, c)| c.billed_units), Some(2 + 5));
    }

    #[test]
    fn dirty_buckets_are_handed_out_once_and_old_ones_expire() {
        let mut m = Meter::default();
        let t0 = 1_800_000_000_000;
        m.observe("w1", 1, t0, vec![("orders".into(), counts(1, 1))]);
        let (changed, expired) = m.take_dirty(t0);
        assert_eq!((changed.len(), expired.len()), (1, 0));
        assert_eq!(m.take_dirty(t0).0.len(), 0);
        let later = t0 + RETENTION_MS + HOUR_MS;
        let (_, expired) = m.take_dirty(later);
        assert_eq!(expired.len(), 1);
        assert!(m.totals(0).0.is_empty());
    }

    /// A day and a half of reports every minute: the last 24 h stay per
    /// minute, what is older becomes one bucket per hour with the same
    /// totals, and the store is told to write the hours and delete the
    /// minutes merged into them (never the hour bucket itself).
    #[test]
    fn minutes_older_than_a_day_roll_up_into_hours_with_the_same_totals() {
        let mut m = Meter::default();
        let t0 = 1_800_000_000_000 - 1_800_000_000_000 % HOUR_MS;
        let mut store: BTreeMap<BucketKey, Counts> = BTreeMap::new();
        let minutes = 36 * 60;
        for i in 0..minutes {
            let now = t0 + i * MINUTE_MS + 1_000;
            m.observe("w1", 1, now, vec![("orders".into(), counts(i as u64 + 1, 2 * (i as u64 + 1)))]);
            let (changed, gone) = m.take_dirty(now);
            for k in gone {
                store.remove(&k);
            }
            store.extend(changed);
        }
        let now = t0 + (minutes - 1) * MINUTE_MS + 1_000;
        let (totals, from) = m.totals(0);
        assert_eq!(from, t0);
        assert_eq!(
            totals.first().map(|(_, c)| (c.batches, c.billed_units)),
            Some((minutes as u64, 2 * minutes as u64))
        );
        // 24 h of minutes plus the rest of the current hour at most, and
        // 12 hours or so rolled up.
        assert!(m.buckets() <= 25 * 60 + 13, "{} buckets", m.buckets());
        assert!(m.buckets() < minutes as usize - 600, "not rolled up: {} buckets", m.buckets());
        let cutoff = Meter::hour(now - MINUTE_RETENTION_MS);
        assert!(m.buckets.keys().filter(|(t, _)| *t < cutoff).all(|(t, _)| t % HOUR_MS == 0));
        // What the store holds is what the meter holds: restoring it gives
        // the same totals.
        assert_eq!(store.len(), m.buckets(), "the store was not told every write and delete");
        let restored = Meter::restore(store.into_iter().collect());
        assert_eq!(restored.totals(0), m.totals(0));
        // Minute buckets of an older build, restored, are rolled up at once.
        let mut old =
            Meter::restore((0..120).map(|i| ((t0 + i * MINUTE_MS, "orders".into()), counts(1, 1))).collect());
        let (changed, gone) = old.take_dirty(t0 + 3 * 24 * HOUR_MS);
        assert_eq!(old.buckets(), 2);
        assert_eq!((changed.len(), gone.len()), (2, 118));
        assert_eq!(old.totals(0).0.first().map(|(_, c)| c.batches), Some(120));
    }

    /// Workers that expire and never come back do not grow the meter; one
    /// that comes back as the same process is not counted twice.
    #[test]
    fn departed_workers_are_bounded_and_a_returning_process_is_not_counted_twice() {
        let mut m = Meter::default();
        let t0 = 1_800_000_000_000;
        m.observe("back", 7, t0, vec![("orders".into(), counts(3, 3))]);
        m.depart("back");
        for i in 0..1000 {
            let w = format!("w{i}");
            m.observe(&w, 1, t0, vec![("orders".into(), counts(1, 1))]);
            m.depart(&w);
        }
        assert_eq!(m.workers_known(), DEPARTED, "the ring is bounded");
        let mut m2 = Meter::default();
        m2.observe("back", 7, t0, vec![("orders".into(), counts(3, 3))]);
        m2.depart("back");
        m2.observe("back", 7, t0 + 1_000, vec![("orders".into(), counts(4, 4))]);
        assert_eq!(m2.totals(0).0.first().map(|(_, c)| c.billed_units), Some(4), "counted twice");
        m2.forget("back");
        assert_eq!(m2.workers_known(), 0);
    }

    #[test]
    fn huge_reports_saturate_instead_of_overflowing() {
        let mut m = Meter::default();
        let t0 = 1_800_000_000_000;
        let huge = Counts { billed_units: u64::MAX, ..counts(1, 1) };
        m.observe("a", 1, t0, vec![("orders".into(), huge.clone())]);
        m.observe("b", 1, t0, vec![("orders".into(), huge)]);
        assert_eq!(m.totals(0).0.first().map(|(_, c)| c.billed_units), Some(u64::MAX));
    }

    /// `since_ms` is operator input, any i64: `minute` overflowed at
    /// `i64::MIN` (seen while writing the fuzz targets).
    #[test]
    fn any_since_is_a_time() {
        let mut m = Meter::default();
        m.observe("a", 1, 1_800_000_000_000, vec![("orders".into(), counts(1, 1))]);
        assert_eq!(m.totals(i64::MIN).0.len(), 1);
        assert_eq!(m.totals(i64::MAX).0, []);
    }
}
