//! One lease's life on a worker: open the partition at the checkpoint (or
//! the mapping's starting position), then loop cut batch → policy/handler →
//! checkpoint, until the lease is released (finish the batch, report the
//! final offset) or lost (stop at once, checkpoint nothing).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardline_proto::{LeaseId, Mapping};
use tokio_util::sync::CancellationToken;

use crate::batcher::{Batcher, Limits};
use crate::checkpointer::Checkpointer;
use crate::handler::{DynHandler, Record};
use crate::policy::{CompiledFilter, Completion, FailureSink, Hooks, Lane, Stopped};
use crate::source::kafka::{KafkaSource, Start};

/// Live figures of one lease, read by the heartbeat's load report.
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// The next offset to process; -1 until known.
    pub position: AtomicI64,
    pub lag: AtomicI64,
    pub records: AtomicU64,
    pub busy_micros: AtomicU64,
    /// 1 while a batch is in the handler.
    pub in_flight: AtomicU64,
}

/// Everything a lease task needs.
pub struct LeaseTask {
    pub lease: LeaseId,
    pub epoch: u64,
    pub mapping: Mapping,
    /// The checkpoint to start from; `None`: the mapping's starting position.
    pub start: Option<i64>,
    pub handler: Arc<dyn DynHandler>,
    /// Where records that gave up go (on_failure, or discard).
    pub sink: Arc<dyn FailureSink>,
    pub source: KafkaSource,
    pub checkpointer: Checkpointer,
    pub stats: Arc<LeaseStats>,
    /// Fires on release or shutdown: finish the in-flight batch, then stop.
    pub drain: CancellationToken,
    /// Fires when the lease is lost or revoked: stop at once.
    pub kill: CancellationToken,
}

/// How a lease task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Drained: the final checkpoint (`None` if it never got a position).
    Released(Option<i64>),
    /// Lost or revoked: nothing more may be checkpointed.
    Killed,
}

struct PauseOnFailure<'a> {
    source: &'a KafkaSource,
    topic: &'a str,
    partition: u32,
}

impl Hooks for PauseOnFailure<'_> {
    fn failing(&self) {
        self.source.pause(self.topic, self.partition);
    }

    fn recovered(&self) {
        self.source.resume(self.topic, self.partition);
    }
}

impl LeaseTask {
    pub async fn run(self) -> Exit {
        let Some((reader, opened_at)) = self.open().await else {
            return if self.kill.is_cancelled() { Exit::Killed } else { Exit::Released(self.start) };
        };
        self.stats.position.store(opened_at, Ordering::Relaxed);
        if self.start != Some(opened_at) {
            // Pin the resolved start (e.g. `latest`), so a later owner
            // continues here even if nothing is processed before a handoff.
            self.checkpointer.submit(&self.lease, self.epoch, opened_at);
        }
        let lanes = self.mapping.parallelization_factor.clamp(1, 10) as usize;
        let batch_size = self.mapping.batch_size as usize;
        let limits = Limits {
            // With parallel lanes, one cut feeds every lane a batch.
            batch_size: batch_size * lanes,
            max_batch_bytes: usize::try_from(self.mapping.max_batch_bytes)
                .unwrap_or(usize::MAX)
                .saturating_mul(lanes),
            window: self.mapping.batch_window,
        };
        let filter = match self.mapping.filter.as_ref().map(CompiledFilter::new).transpose() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(lease = %self.lease, error = %e, "bad filter; stopping the lease");
                return Exit::Released(Some(opened_at));
            }
        };
        let topic = reader.topic.clone();
        let partition = reader.partition;
        let mut batcher = Batcher::new(reader, limits);
        let hooks = PauseOnFailure { source: &self.source, topic: &topic, partition };
        let completion = Mutex::new(Completion::new(opened_at));
        let progress = |position: i64| {
            self.checkpointer.submit(&self.lease, self.epoch, position);
            self.stats.position.store(position, Ordering::Relaxed);
        };
        let labels = [("handler", self.mapping.handler.clone())];
        loop {
            let position = completion.lock().map_or(opened_at, |c| c.position());
            if self.drain.is_cancelled() {
                return Exit::Released(Some(position));
            }
            let records = tokio::select! {
                biased;
                () = self.kill.cancelled() => return Exit::Killed,
                b = batcher.next_batch(&self.drain) => b,
            };
            let Some(records) = records else { return Exit::Released(Some(position)) };
            let n = records.len() as u64;
            let last = records.last().map_or(position, |r| r.offset + 1);
            let lag = self.source.high_watermark(&topic, partition).map_or(-1, |h| (h - last).max(0));
            if let Ok(mut c) = completion.lock() {
                c.add(records.iter().map(|r| r.offset));
            }
            let lane = Lane {
                handler: &*self.handler,
                name: &self.mapping.handler,
                policy: &self.mapping.policy,
                filter: filter.as_ref(),
                sink: &*self.sink,
                hooks: &hooks,
                stop: &self.kill,
                lease: &self.lease,
                epoch: self.epoch,
                lag,
                completion: &completion,
                progress: &progress,
            };
            self.stats.in_flight.store(lanes as u64, Ordering::Relaxed);
            let done = run_lanes(&lane, records, lanes, batch_size).await;
            self.stats.in_flight.store(0, Ordering::Relaxed);
            let Ok(busy) = done else { return Exit::Killed };
            self.stats.lag.store(lag, Ordering::Relaxed);
            self.stats.records.fetch_add(n, Ordering::Relaxed);
            self.stats.busy_micros.fetch_add(busy.as_micros() as u64, Ordering::Relaxed);
            metrics::counter!("shardline_records_total", &labels).increment(n);
            metrics::counter!("shardline_batches_total", &labels).increment(1);
            metrics::gauge!("shardline_lease_lag", "lease" => self.lease.to_string()).set(lag as f64);
        }
    }

    /// Opens the partition, retrying with backoff while the broker or topic
    /// is unavailable. `None`: killed or drained before it opened.
    async fn open(&self) -> Option<(crate::source::kafka::PartitionReader, i64)> {
        let start = match self.start {
            Some(offset) => Start::Offset(offset),
            None => Start::Position(self.mapping.starting_position, self.mapping.starting_timestamp_ms),
        };
        let mut wait = Duration::from_millis(100);
        loop {
            match self.source.open(&self.lease.name, self.lease.index, start).await {
                Ok(opened) => return Some(opened),
                Err(e) => {
                    tracing::warn!(lease = %self.lease, error = %e, ?wait, "cannot open partition; retrying");
                    metrics::counter!("shardline_source_errors_total").increment(1);
                }
            }
            tokio::select! {
                () = self.kill.cancelled() => return None,
                () = self.drain.cancelled() => return None,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    }
}

/// Runs one cut of records through `lanes` concurrent lanes. Records are
/// assigned to lanes by key, so records of one key stay in order; keyless
/// records spread by offset. Each lane handles its records in batches of
/// `batch_size`, one after another. Returns the time spent in handlers.
async fn run_lanes(
    lane: &Lane<'_>,
    records: Vec<Record>,
    lanes: usize,
    batch_size: usize,
) -> Result<std::time::Duration, Stopped> {
    let mut split: Vec<Vec<Record>> = (0..lanes).map(|_| Vec::new()).collect();
    for r in records {
        let i = match &r.key {
            Some(key) if lanes > 1 => {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                key.hash(&mut h);
                (h.finish() % lanes as u64) as usize
            }
            _ => r.offset.rem_euclid(lanes as i64) as usize,
        };
        split[i].push(r);
    }
    let runs = split.into_iter().filter(|l| !l.is_empty()).map(|mut records| async move {
        let mut busy = std::time::Duration::ZERO;
        while !records.is_empty() {
            let rest = records.split_off(records.len().min(batch_size.max(1)));
            busy += lane.process(records).await?.busy;
            records = rest;
        }
        Ok::<_, Stopped>(busy)
    });
    let mut busy = std::time::Duration::ZERO;
    for r in futures::future::join_all(runs).await {
        busy += r?;
    }
    Ok(busy)
}
