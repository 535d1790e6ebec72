//! Deterministic random changes over a fixed set of rows: what the
//! `order-changes` producer writes, so a demo run has a stream to read.
//! Each change is valid against the row's current state (creates of absent
//! rows, updates and deletes of present ones, versions counting up).

use std::collections::BTreeMap;

use crate::change::{Change, Op, Order};

const CUSTOMERS: [&str; 7] = ["ada", "brian", "chen", "dana", "emeka", "fatima", "goran"];
const STATUSES: [&str; 4] = ["new", "paid", "shipped", "cancelled"];

pub struct Generator {
    state: u64,
    rows: i64,
    /// Each row's last version and, while it exists, its contents.
    current: BTreeMap<i64, (i64, Option<Order>)>,
}

impl Generator {
    pub fn new(seed: u64, rows: i64) -> Self {
        Self { state: seed, rows: rows.max(1), current: BTreeMap::new() }
    }

    /// splitmix64: small, fast and the same everywhere.
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }

    fn order(&mut self, id: i64) -> Order {
        Order {
            id,
            customer: CUSTOMERS[self.below(CUSTOMERS.len())].into(),
            amount: i64::try_from(self.next() % 100_000).unwrap_or(0),
            status: STATUSES[self.below(STATUSES.len())].into(),
        }
    }

    /// The next change: a create of an absent row, else an update (4 in 5)
    /// or a delete.
    pub fn change(&mut self) -> Change {
        let id = i64::try_from(self.next() % self.rows.unsigned_abs()).unwrap_or(0);
        let (version, before) = self.current.get(&id).cloned().unwrap_or((0, None));
        let version = version + 1;
        let change = match before {
            None => Change { op: Op::Create, before: None, after: Some(self.order(id)), version },
            Some(before) if self.below(5) > 0 => {
                let mut after = before.clone();
                match self.below(3) {
                    0 => after.status = STATUSES[self.below(STATUSES.len())].into(),
                    1 => after.amount = i64::try_from(self.next() % 100_000).unwrap_or(0),
                    _ => after.customer = CUSTOMERS[self.below(CUSTOMERS.len())].into(),
                }
                Change { op: Op::Update, before: Some(before), after: Some(after), version }
            }
            Some(before) => Change { op: Op::Delete, before: Some(before), after: None, version },
        };
        self.current.insert(id, (version, change.after.clone()));
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Delta;

    #[test]
    fn every_change_is_valid_and_the_deltas_sum_to_the_final_rows() {
        let mut g = Generator::new(7, 20);
        let mut delta = Delta::default();
        for _ in 0..500 {
            let c = g.change();
            let text = serde_json::to_vec(&c).unwrap_or_default();
            assert_eq!(Change::parse(&text).as_ref(), Ok(&c));
            delta.add(&c);
        }
        let live: Vec<&Order> = g.current.values().filter_map(|(_, o)| o.as_ref()).collect();
        let orders: i64 = delta.customers.values().map(|t| t.orders).sum();
        assert_eq!(orders, i64::try_from(live.len()).unwrap_or(-1));
        assert_eq!(delta.statuses.values().sum::<i64>(), orders);
        assert_eq!(
            delta.customers.values().map(|t| t.amount).sum::<i64>(),
            live.iter().map(|o| o.amount).sum::<i64>()
        );
    }
}
