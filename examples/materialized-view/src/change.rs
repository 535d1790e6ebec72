//! The change envelope (Debezium's shape: `op`, `before`, `after`, plus a
//! per-row `version`) and what a run of changes does to the view: the
//! aggregates move by `after - before`, so every change is applied
//! incrementally without reading the rows it touched.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One row of the source table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: i64,
    pub customer: String,
    /// In cents.
    pub amount: i64,
    pub status: String,
}

/// What happened to the row: Debezium's `c` (create), `u` (update), `d`
/// (delete) and `r` (read: a snapshot row, applied as a create).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "c")]
    Create,
    #[serde(rename = "u")]
    Update,
    #[serde(rename = "d")]
    Delete,
    #[serde(rename = "r")]
    Read,
}

/// One change record's value. Fields a real Debezium envelope has beside
/// these (`source`, `ts_ms`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub op: Op,
    pub before: Option<Order>,
    pub after: Option<Order>,
    /// The row's version after this change (1 for its create).
    pub version: i64,
}

impl Change {
    /// Parses and checks a record's value: `before` and `after` present
    /// exactly as `op` says, both naming the same row.
    pub fn parse(value: &[u8]) -> Result<Self, String> {
        let change: Change =
            serde_json::from_slice(value).map_err(|e| format!("not a change envelope: {e}"))?;
        let (before, after) = (change.before.is_some(), change.after.is_some());
        let fits = match change.op {
            Op::Create | Op::Read => !before && after,
            Op::Update => before && after,
            Op::Delete => before && !after,
        };
        if !fits {
            return Err(format!(
                "op {:?} needs {}, got before {} and after {}",
                change.op,
                match change.op {
                    Op::Create | Op::Read => "only `after`",
                    Op::Update => "both `before` and `after`",
                    Op::Delete => "only `before`",
                },
                if before { "set" } else { "null" },
                if after { "set" } else { "null" },
            ));
        }
        if let (Some(b), Some(a)) = (&change.before, &change.after)
            && b.id != a.id
        {
            return Err(format!("`before` is row {} but `after` is row {}", b.id, a.id));
        }
        Ok(change)
    }

    /// The row this change is about.
    pub fn id(&self) -> i64 {
        self.after.as_ref().or(self.before.as_ref()).map_or(0, |o| o.id)
    }
}

/// Per-customer figures: how many orders, their amounts summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub orders: i64,
    pub amount: i64,
}

/// What a run of changes does to the view: signed moves of the
/// aggregates, and each touched row's last state (`None`: deleted) with
/// its version.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    pub customers: BTreeMap<String, Totals>,
    pub statuses: BTreeMap<String, i64>,
    pub rows: BTreeMap<i64, (i64, Option<Order>)>,
}

impl Delta {
    pub fn add(&mut self, change: &Change) {
        if let Some(b) = &change.before {
            self.count(b, -1);
        }
        if let Some(a) = &change.after {
            self.count(a, 1);
        }
        self.rows.insert(change.id(), (change.version, change.after.clone()));
    }

    fn count(&mut self, order: &Order, sign: i64) {
        let totals = self.customers.entry(order.customer.clone()).or_default();
        totals.orders += sign;
        totals.amount += sign * order.amount;
        *self.statuses.entry(order.status.clone()).or_default() += sign;
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(id: i64, customer: &str, amount: i64, status: &str) -> Order {
        Order { id, customer: customer.into(), amount, status: status.into() }
    }

    #[test]
    fn a_create_update_and_delete_leave_nothing_behind() {
        let mut d = Delta::default();
        let (a, b) = (order(1, "ann", 500, "new"), order(1, "bob", 700, "paid"));
        d.add(&Change { op: Op::Create, before: None, after: Some(a.clone()), version: 1 });
        d.add(&Change { op: Op::Update, before: Some(a), after: Some(b.clone()), version: 2 });
        assert_eq!(d.customers["ann"], Totals { orders: 0, amount: 0 });
        assert_eq!(d.customers["bob"], Totals { orders: 1, amount: 700 });
        assert_eq!((d.statuses["new"], d.statuses["paid"]), (0, 1));
        d.add(&Change { op: Op::Delete, before: Some(b), after: None, version: 3 });
        assert_eq!(d.customers["bob"], Totals::default());
        assert_eq!(d.rows[&1], (3, None));
    }

    #[test]
    fn an_envelope_that_contradicts_its_op_is_refused_with_the_reason() {
        let e = Change::parse(br#"{"op":"u","before":null,"after":{"id":1,"customer":"a","amount":1,"status":"new"},"version":2}"#);
        assert_eq!(e, Err("op Update needs both `before` and `after`, got before null and after set".into()));
        assert!(Change::parse(b"{}").is_err_and(|e| e.starts_with("not a change envelope")));
        let ok = Change::parse(
            br#"{"op":"d","before":{"id":4,"customer":"a","amount":1,"status":"new"},"after":null,"version":9,"ts_ms":1}"#,
        );
        assert_eq!(ok.map(|c| (c.id(), c.version)), Ok((4, 9)));
    }
}
