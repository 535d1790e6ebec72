//! Problems this worker reports as `unhealthy` in its heartbeats (shown by
//! `shardline workers`), beside the AMQP connection's own: a function
//! whose processes cannot initialise, say. Each source sets and clears its
//! own entry.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<BTreeMap<String, String>>>);

impl Health {
    /// Records `source`'s problem, replacing its previous one.
    pub fn set(&self, source: &str, problem: impl Into<String>) {
        crate::lock(&self.0).insert(source.to_owned(), problem.into());
    }

    pub fn clear(&self, source: &str) {
        crate::lock(&self.0).remove(source);
    }

    /// Every problem as `source: problem`.
    pub fn problems(&self) -> Vec<String> {
        crate::lock(&self.0).iter().map(|(source, problem)| format!("{source}: {problem}")).collect()
    }
}
