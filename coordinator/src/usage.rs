//! Handler usage per mapping, metered like Lambda: each handler attempt's
//! duration rounded up to 100 ms units (the worker rounds, per attempt).
//!
//! Workers report cumulative counters per mapping since their process
//! started; the meter keeps the last report of each worker and adds the
//! difference to one-minute buckets, so a lost heartbeat loses nothing and
//! a restarted worker (counters back near zero) counts from zero. Buckets
//! are persisted with the lease records and kept for [`RETENTION`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// How long minute buckets are kept.
pub const RETENTION_MINUTES: i64 = 31 * 24 * 60;

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
    fn add(&mut self, other: &Counts) {
        self.batches += other.batches;
        self.records += other.records;
        self.handler_ms += other.handler_ms;
        self.billed_units += other.billed_units;
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

/// A bucket's key: the minute (Unix ms of its start) and the mapping.
pub type BucketKey = (i64, String);

/// The meter; pure (the caller passes the minute).
#[derive(Debug, Default)]
pub struct Meter {
    last: BTreeMap<(String, String), Counts>,
    buckets: BTreeMap<BucketKey, Counts>,
    dirty: BTreeSet<BucketKey>,
}

impl Meter {
    /// Rebuilds from stored buckets.
    pub fn restore(buckets: Vec<(BucketKey, Counts)>) -> Self {
        Self { buckets: buckets.into_iter().collect(), ..Self::default() }
    }

    /// The start (Unix ms) of the minute holding `ms`.
    pub fn minute(ms: i64) -> i64 {
        ms - ms.rem_euclid(60_000)
    }

    /// A worker's cumulative counters per mapping, observed at `now_ms`.
    pub fn observe(&mut self, worker: &str, now_ms: i64, cumulative: Vec<(String, Counts)>) {
        let minute = Self::minute(now_ms);
        for (mapping, counts) in cumulative {
            let key = (worker.to_owned(), mapping.clone());
            let delta = match self.last.get(&key) {
                Some(before) => counts.since(before),
                None => counts.clone(),
            };
            self.last.insert(key, counts);
            if delta.is_zero() {
                continue;
            }
            let bucket = (minute, mapping);
            let entry = self.buckets.entry(bucket.clone()).or_default();
            entry.handler.clone_from(&delta.handler);
            entry.add(&delta);
            self.dirty.insert(bucket);
        }
    }

    /// A worker left: its next report (if it comes back) starts afresh.
    pub fn forget(&mut self, worker: &str) {
        self.last.retain(|(w, _), _| w != worker);
    }

    /// Totals per mapping from `since_ms` on, and the first minute counted.
    pub fn totals(&self, since_ms: i64) -> (Vec<(String, Counts)>, i64) {
        let from = Self::minute(since_ms);
        let mut totals: BTreeMap<String, Counts> = BTreeMap::new();
        let mut first = i64::MAX;
        for ((minute, mapping), counts) in self.buckets.range((from, String::new())..) {
            first = first.min(*minute);
            let t = totals.entry(mapping.clone()).or_default();
            t.handler.clone_from(&counts.handler);
            t.add(counts);
        }
        (totals.into_iter().collect(), if first == i64::MAX { from } else { first })
    }

    /// Buckets changed since the last call, and buckets older than the
    /// retention (to delete).
    pub fn take_dirty(&mut self, now_ms: i64) -> (Vec<(BucketKey, Counts)>, Vec<BucketKey>) {
        let cutoff = Self::minute(now_ms) - RETENTION_MINUTES * 60_000;
        let expired: Vec<BucketKey> =
            self.buckets.range(..(cutoff, String::new())).map(|(k, _)| k.clone()).collect();
        for k in &expired {
            self.buckets.remove(k);
        }
        let dirty = std::mem::take(&mut self.dirty);
        let changed =
            dirty.into_iter().filter_map(|k| self.buckets.get(&k).map(|c| (k.clone(), c.clone()))).collect();
        (changed, expired)
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
        m.observe("w1", t0, vec![("orders".into(), counts(2, 3))]);
        // A lost heartbeat: the next report still carries everything.
        m.observe("w1", t0 + 2_000, vec![("orders".into(), counts(5, 7))]);
        m.observe("w2", t0 + 61_000, vec![("orders".into(), counts(1, 1)), ("emails".into(), counts(4, 4))]);
        // w1 restarted: its counters start over.
        m.observe("w1", t0 + 62_000, vec![("orders".into(), counts(1, 2))]);
        let (totals, _) = m.totals(0);
        let get = |name: &str| totals.iter().find(|(n, _)| n == name).map(|(_, c)| c.clone());
        assert_eq!(get("orders").map(|c| (c.batches, c.billed_units)), Some((5 + 1 + 1, 7 + 1 + 2)));
        assert_eq!(get("emails").map(|c| c.billed_units), Some(4));
        // Only the later minute: w2's report and w1's restart.
        let (later, from) = m.totals(t0 + 60_000);
        assert_eq!(later.iter().map(|(_, c)| c.billed_units).sum::<u64>(), 1 + 4 + 2);
        assert_eq!(from, Meter::minute(t0 + 61_000));
    }

    #[test]
    fn dirty_buckets_are_handed_out_once_and_old_ones_expire() {
        let mut m = Meter::default();
        let t0 = 1_800_000_000_000;
        m.observe("w1", t0, vec![("orders".into(), counts(1, 1))]);
        let (changed, expired) = m.take_dirty(t0);
        assert_eq!((changed.len(), expired.len()), (1, 0));
        assert_eq!(m.take_dirty(t0).0.len(), 0);
        let later = t0 + (RETENTION_MINUTES + 1) * 60_000;
        let (_, expired) = m.take_dirty(later);
        assert_eq!(expired.len(), 1);
        assert!(m.totals(0).0.is_empty());
    }
}
