//! One lease's life on a worker: open the partition at the checkpoint (or
//! the mapping's starting position), make that start durable in the
//! coordinator, then loop cut batch → policy/handler → checkpoint, until the
//! lease is released (finish the batch, report the final offset) or lost
//! (stop at once, checkpoint nothing).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardline_proto::{LeaseId, Mapping, Start, StartingPosition};
use tokio_util::sync::CancellationToken;

use crate::batcher::{Batcher, Limits};
use crate::checkpointer::Checkpointer;
use crate::handler::{DynHandler, Record};
use crate::membership::{Session, SessionError};
use crate::policy::{CompiledFilter, Completion, FailureSink, Hooks, Lane, Stopped};
use crate::source::kafka::{self, KafkaSource};

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

/// Handler use per mapping since the process started, reported with every
/// heartbeat (the coordinator meters it). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct UsageMeter(Arc<Mutex<std::collections::BTreeMap<String, shardline_proto::v1::MappingUsage>>>);

impl UsageMeter {
    /// Adds one processed batch of `mapping`.
    pub fn add(&self, mapping: &str, handler: &str, records: u64, done: &crate::policy::LaneStats) {
        let Ok(mut table) = self.0.lock() else { return };
        let u = table.entry(mapping.to_owned()).or_insert_with(|| shardline_proto::v1::MappingUsage {
            mapping: mapping.to_owned(),
            handler: handler.to_owned(),
            ..Default::default()
        });
        u.batches += 1;
        u.records += records;
        u.handler_ms += done.busy.as_millis() as u64;
        u.billed_units += done.billed_units;
        metrics::counter!("shardline_handler_billed_units_total", "handler" => handler.to_owned())
            .increment(done.billed_units);
    }

    pub fn snapshot(&self) -> Vec<shardline_proto::v1::MappingUsage> {
        self.0.lock().map(|t| t.values().cloned().collect()).unwrap_or_default()
    }
}

/// Everything a lease task needs.
pub struct LeaseTask {
    pub lease: LeaseId,
    pub epoch: u64,
    pub mapping: Mapping,
    /// Where to start: the checkpoint, or the mapping's starting position,
    /// or (a partition that appeared after the mapping) the earliest offset.
    pub start: Start,
    pub handler: Arc<dyn DynHandler>,
    /// Where records that gave up go (on_failure, or discard).
    pub sink: Arc<dyn FailureSink>,
    pub source: KafkaSource,
    /// For making the resolved start durable before the first batch.
    pub session: Session,
    pub checkpointer: Checkpointer,
    pub stats: Arc<LeaseStats>,
    pub usage: UsageMeter,
    /// The node's `max_inflight_batches` permits (none: no limit).
    pub inflight: Option<Arc<tokio::sync::Semaphore>>,
    /// Fires on release or shutdown: finish the in-flight batch, then stop.
    pub drain: CancellationToken,
    /// Fires when the lease is lost or revoked: stop at once.
    pub kill: CancellationToken,
}

/// Whether the start of a lease became durable.
enum Pinned {
    Yes,
    /// Fenced or revoked meanwhile.
    Lost,
    /// Released before it could start.
    Drained,
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
            return if self.kill.is_cancelled() {
                Exit::Killed
            } else {
                Exit::Released(self.start.checkpoint())
            };
        };
        self.stats.position.store(opened_at, Ordering::Relaxed);
        if self.start != Start::Checkpoint(opened_at) {
            // The resolved start (e.g. `latest`) is acknowledged as the
            // checkpoint before the first batch runs: a later owner then
            // continues here even if this worker dies before its first
            // checkpoint, instead of at the *then* latest offset.
            match self.pin(opened_at).await {
                Pinned::Yes => {}
                Pinned::Lost => return Exit::Killed,
                Pinned::Drained => return Exit::Released(self.start.checkpoint()),
            }
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
        let lag_now = AtomicI64::new(-1);
        let lane = |lag: i64| Lane {
            handler: &*self.handler,
            name: &self.mapping.handler,
            policy: &self.mapping.policy,
            filter: filter.as_ref(),
            sink: &*self.sink,
            hooks: &hooks,
            stop: &self.kill,
            drain: &self.drain,
            lease: &self.lease,
            epoch: self.epoch,
            lag,
            completion: &completion,
            progress: &progress,
        };
        // Runs one batch through the policy and counts it.
        let handle = |records: Vec<Record>| async {
            let n = records.len() as u64;
            // The node's batch budget (max_inflight_batches), shared by all leases.
            let _permit = match &self.inflight {
                Some(s) => s.clone().acquire_owned().await.ok(),
                None => None,
            };
            self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            let done = lane(lag_now.load(Ordering::Relaxed)).process(records).await;
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            let done = done?;
            self.stats.records.fetch_add(n, Ordering::Relaxed);
            self.stats.busy_micros.fetch_add(done.busy.as_micros() as u64, Ordering::Relaxed);
            self.usage.add(&self.lease.name, &self.mapping.handler, n, &done);
            metrics::counter!("shardline_records_total", &labels).increment(n);
            metrics::counter!("shardline_batches_total", &labels).increment(1);
            Ok::<_, Stopped>(())
        };
        // Cuts the next batch; `None` when draining.
        let mut cut = async || {
            let records = batcher.next_batch(&self.drain).await?;
            let position = completion.lock().map_or(opened_at, |c| c.position());
            let last = records.last().map_or(position, |r| r.offset + 1);
            let lag = self.source.high_watermark(&topic, partition).map_or(-1, |h| (h - last).max(0));
            lag_now.store(lag, Ordering::Relaxed);
            self.stats.lag.store(lag, Ordering::Relaxed);
            metrics::gauge!("shardline_lease_lag", "lease" => self.lease.to_string()).set(lag as f64);
            if let Ok(mut c) = completion.lock() {
                c.add(records.iter().map(|r| r.offset));
            }
            Some(records)
        };
        let finished = if lanes == 1 {
            let sequential = async {
                while !self.drain.is_cancelled() {
                    let Some(records) = cut().await else { break };
                    handle(records).await?;
                }
                Ok::<_, Stopped>(())
            };
            tokio::select! {
                biased;
                () = self.kill.cancelled() => Err(Stopped),
                r = sequential => r,
            }
        } else {
            // One queue per lane, records routed by key: every lane works
            // through its own records as they come, so one slow key does not
            // hold back the others, and a key's records stay in order.
            let (senders, receivers): (Vec<_>, Vec<_>) =
                (0..lanes).map(|_| tokio::sync::mpsc::channel::<Record>(batch_size * 2)).unzip();
            let (drain, handle) = (&self.drain, &handle);
            let dispatch = async move {
                while !drain.is_cancelled() {
                    let Some(records) = cut().await else { break };
                    for r in records {
                        let i = lane_of(&r, lanes);
                        if senders[i].send(r).await.is_err() {
                            return; // that lane stopped: the lease is ending
                        }
                    }
                }
            };
            let workers = receivers.into_iter().map(|mut rx| async move {
                while let Some(first) = rx.recv().await {
                    if drain.is_cancelled() {
                        // Only the batch in flight finishes on a drain; what
                        // waits in the lane is the next owner's.
                        break;
                    }
                    let mut batch = vec![first];
                    while batch.len() < batch_size {
                        match rx.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    handle(batch).await?;
                }
                Ok::<_, Stopped>(())
            });
            tokio::select! {
                biased;
                () = self.kill.cancelled() => Err(Stopped),
                ((), results) = futures::future::join(dispatch, futures::future::join_all(workers)) => {
                    results.into_iter().collect::<Result<Vec<()>, Stopped>>().map(|_| ())
                }
            }
        };
        match finished {
            Ok(()) => Exit::Released(Some(completion.lock().map_or(opened_at, |c| c.position()))),
            Err(Stopped) => Exit::Killed,
        }
    }

    /// Checkpoints the resolved start and waits for the acknowledgement,
    /// retrying while the coordinator is unreachable.
    async fn pin(&self, offset: i64) -> Pinned {
        let mut wait = Duration::from_millis(100);
        loop {
            let call = self.session.checkpoint(vec![(self.lease.clone(), self.epoch, offset)]);
            let result = tokio::select! {
                () = self.kill.cancelled() => return Pinned::Lost,
                () = self.drain.cancelled() => return Pinned::Drained,
                result = call => result,
            };
            match result.map(|mut r| r.pop()) {
                Ok(Some(Ok(()))) => return Pinned::Yes,
                Ok(Some(Err(SessionError::Fenced { .. }))) => return Pinned::Lost,
                Ok(other) => {
                    tracing::warn!(lease = %self.lease, ?other, "start checkpoint refused; retrying")
                }
                Err(e) => {
                    tracing::warn!(lease = %self.lease, error = %e, "start checkpoint failed; retrying")
                }
            }
            tokio::select! {
                () = self.kill.cancelled() => return Pinned::Lost,
                () = self.drain.cancelled() => return Pinned::Drained,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    /// Opens the partition, retrying with backoff while the broker or topic
    /// is unavailable. `None`: killed or drained before it opened.
    async fn open(&self) -> Option<(crate::source::kafka::PartitionReader, i64)> {
        let start = match self.start {
            Start::Checkpoint(offset) => kafka::Start::Offset(offset),
            Start::MappingDefault => {
                kafka::Start::Position(self.mapping.starting_position, self.mapping.starting_timestamp_ms)
            }
            Start::Earliest => kafka::Start::Position(StartingPosition::TrimHorizon, 0),
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

/// The lane of a record: by key hash, so a key's records stay in order;
/// keyless records spread by offset.
fn lane_of(r: &Record, lanes: usize) -> usize {
    match &r.key {
        Some(key) => {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut h);
            (h.finish() % lanes as u64) as usize
        }
        None => r.offset.rem_euclid(lanes as i64) as usize,
    }
}
