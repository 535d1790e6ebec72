//! Counting receipts: what the end-to-end tests' `verify` and the load
//! harness's ledger both ask of the records a worker processed. Which ids
//! came back how often (lost: never; duplicates: every receipt past the
//! first), and whether first-time receipts came in order within a group
//! (a partition's offsets, a key's ids). A redelivery may repeat older
//! positions, so only first-time receipts are held to the order.

use std::collections::HashMap;
use std::hash::Hash;

/// How often each id (small, dense: `0..records`) was received.
#[derive(Debug, Clone, Default)]
pub struct Counts(Vec<u32>);

impl Counts {
    /// Books one receipt of `id`; true for its first.
    pub fn add(&mut self, id: u64) -> bool {
        let i = usize::try_from(id).unwrap_or(usize::MAX);
        if self.0.len() <= i {
            self.0.resize(i.saturating_add(1), 0);
        }
        self.0[i] += 1;
        self.0[i] == 1
    }

    pub fn get(&self, id: u64) -> u32 {
        usize::try_from(id).ok().and_then(|i| self.0.get(i)).copied().unwrap_or(0)
    }

    /// Receipts past each id's first.
    pub fn duplicates(&self) -> u64 {
        self.0.iter().map(|&c| u64::from(c.saturating_sub(1))).sum()
    }

    /// Ids received at least once.
    pub fn unique(&self) -> usize {
        self.0.iter().filter(|&&c| c > 0).count()
    }

    /// The ids of `0..records` never received.
    pub fn lost(&self, records: u64) -> impl Iterator<Item = u64> + '_ {
        (0..records).filter(|&id| self.get(id) == 0)
    }
}

/// First-time receipts must not go backwards within their group.
#[derive(Debug, Clone)]
pub struct Order<G, P> {
    highest: HashMap<G, P>,
    pub violations: u64,
}

impl<G: Hash + Eq, P: Ord + Copy> Default for Order<G, P> {
    fn default() -> Self {
        Self { highest: HashMap::new(), violations: 0 }
    }
}

impl<G: Hash + Eq, P: Ord + Copy> Order<G, P> {
    /// Books a first-time receipt at `position` in `group`.
    pub fn see(&mut self, group: G, position: P) {
        let highest = self.highest.entry(group).or_insert(position);
        if position < *highest {
            self.violations += 1;
        }
        *highest = (*highest).max(position);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_give_lost_duplicates_and_unique() {
        let mut c = Counts::default();
        for id in [0, 1, 1, 3, 3, 3] {
            c.add(id);
        }
        assert_eq!(c.lost(5).collect::<Vec<_>>(), [2, 4]);
        assert_eq!((c.duplicates(), c.unique(), c.get(3), c.get(99)), (3, 3, 3, 0));
        assert!(!c.add(0) && c.add(2), "first receipts are told apart");
    }

    #[test]
    fn order_is_per_group_and_counts_every_step_back() {
        let mut o = Order::default();
        for (group, position) in [(0, 5), (1, 1), (0, 6), (0, 4), (1, 0), (0, 7)] {
            o.see(group, position);
        }
        assert_eq!(o.violations, 2);
    }
}
