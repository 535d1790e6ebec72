//! The one lease driver, for every source: open the lease ([`Source`]),
//! then loop cut batch → policy/handler → finalize, until the lease is
//! released (finish the batch, report the final position) or lost (stop at
//! once, finish nothing). A source that breaks is opened again. Parallel
//! lanes get bounded queues by key, so one slow key does not hold back the
//! others. The driver never names a concrete source or sink.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::batcher::{Batcher, Limits};
use crate::handler::{DynHandler, Record};
use crate::policy::{CompiledFilter, Lane, LaneStats, Tracker};
use crate::source::{End, Exit, Finalizer, Lease, Opened, RecordReader, Source};

/// Live figures of one lease, for the heartbeat's load report.
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// The next position to process; -1 until known.
    pub position: AtomicI64,
    pub lag: AtomicI64,
    pub records: AtomicU64,
    pub busy_micros: AtomicU64,
    /// Batches in the handler (one per busy lane).
    pub in_flight: AtomicU64,
}

/// Handler use per mapping since the process started, reported with every
/// heartbeat (the coordinator meters it). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct UsageMeter(Arc<Mutex<BTreeMap<String, shardline_proto::v1::MappingUsage>>>);

impl UsageMeter {
    pub fn add(&self, mapping: &str, handler: &str, records: u64, done: &LaneStats) {
        let mut table = crate::lock(&self.0);
        // Looked up before inserting: the key is copied once per mapping,
        // not once per batch.
        if !table.contains_key(mapping) {
            let usage = shardline_proto::v1::MappingUsage {
                mapping: mapping.to_owned(),
                handler: handler.to_owned(),
                ..Default::default()
            };
            table.insert(mapping.to_owned(), usage);
        }
        let Some(u) = table.get_mut(mapping) else { return };
        u.batches += 1;
        u.records += records;
        u.handler_ms += done.busy.as_millis() as u64;
        u.billed_units += done.billed_units;
        metrics::counter!("shardline_handler_billed_units_total", "handler" => handler.to_owned())
            .increment(done.billed_units);
    }

    pub fn snapshot(&self) -> Vec<shardline_proto::v1::MappingUsage> {
        crate::lock(&self.0).values().cloned().collect()
    }
}

pub struct LeaseTask {
    pub lease: Lease,
    pub handler: Arc<dyn DynHandler>,
    pub stats: Arc<LeaseStats>,
    pub usage: UsageMeter,
    /// The node's `max_inflight_batches` permits (none: no limit).
    pub inflight: Option<Arc<tokio::sync::Semaphore>>,
}

impl LeaseTask {
    /// Runs the lease on `source` until it is released, lost or fails.
    pub async fn run<S: Source>(self, source: S) -> Exit {
        let exit = self.drive(&source).await;
        // The lease is no longer this worker's to measure. Its lag left at
        // the last figure would stay served (the recorder keeps every
        // series) and count beside the next owner's wherever a lease's
        // series are added up or their maximum is taken (the dashboard).
        metrics::gauge!("shardline_lease_lag", "lease" => self.lease.id.to_string()).set(0.0);
        exit
    }

    async fn drive<S: Source>(&self, source: &S) -> Exit {
        let lease = &self.lease;
        let filter = match lease.mapping.filter.as_ref().map(CompiledFilter::new).transpose() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(lease = %lease.id, error = %e, "bad filter; giving the lease back");
                return Exit::Released(None);
            }
        };
        loop {
            let Opened { reader, finalizer, position } =
                match lease.kill.run_until_cancelled(source.open(lease)).await {
                    Some(Ok(opened)) => opened,
                    // `drain` fires with `kill`: a killed lease is never released.
                    Some(Err(exit)) if !lease.kill.is_cancelled() => return exit,
                    _ => return Exit::Killed,
                };
            let (end, next) = self.session(source, reader, &finalizer, position, filter.as_ref()).await;
            let last = finalizer.close(end, next).await;
            match end {
                End::Drained => return Exit::Released(last),
                End::Killed => return Exit::Killed,
                End::Failed => {
                    // Records were dropped undecided (a bug, logged): given
                    // back like a lease whose task died.
                    metrics::counter!("shardline_lease_task_failures_total").increment(1);
                    return Exit::Released(None);
                }
                End::Broken => {}
            }
            // The source broke (RabbitMQ requeued what it had not seen
            // acked): a short pause before reading again.
            lease.drain.run_until_cancelled(tokio::time::sleep(Duration::from_millis(200))).await;
        }
    }

    /// Reads one opened session; how it ended, and the finished prefix.
    async fn session<S: Source>(
        &self,
        source: &S,
        reader: S::Reader,
        finalizer: &S::Finalizer,
        position: i64,
        filter: Option<&CompiledFilter>,
    ) -> (End, i64) {
        let lease = &self.lease;
        self.stats.position.store(position, Ordering::Relaxed);
        let advanced = |next: i64| {
            finalizer.advanced(next);
            self.stats.position.store(next, Ordering::Relaxed);
        };
        let tracker = Tracker::new(position, &lease.kill, &advanced);
        let lane = Lane {
            handler: &*self.handler,
            name: &lease.mapping.handler,
            policy: source.policy(&lease.mapping),
            filter,
            sink: source.sink(),
            replies: source.replies(),
            hooks: source,
            drain: &lease.drain,
            lease: &lease.id,
            epoch: lease.epoch,
            tracker: &tracker,
        };
        let end = tokio::select! {
            biased;
            () = lease.kill.cancelled() => End::Killed,
            () = tracker.broken().cancelled() => End::Failed,
            end = self.batches(source.lanes(&lease.mapping), reader, finalizer, &lane) => end,
        };
        // `drain` fires with `kill`: a killed lease never reads as drained.
        let end = if lease.kill.is_cancelled() { End::Killed } else { end };
        (end, tracker.position())
    }

    async fn batches<R: RecordReader, F: Finalizer>(
        &self,
        lanes: usize,
        reader: R,
        finalizer: &F,
        lane: &Lane<'_>,
    ) -> End {
        let (lease, tracker) = (&self.lease, lane.tracker);
        let lanes = lanes.clamp(1, 10);
        let batch_size = lease.mapping.batch_size.max(1) as usize;
        let limits = Limits {
            // With parallel lanes, one cut feeds every lane a batch.
            batch_size: batch_size * lanes,
            max_batch_bytes: usize::try_from(lease.mapping.max_batch_bytes)
                .unwrap_or(usize::MAX)
                .saturating_mul(lanes),
            window: lease.mapping.batch_window,
        };
        let mut batcher = Batcher::new(reader, limits);
        // Looked up once per session, not per batch: a registry lookup
        // hashes the labels and takes a lock.
        let labels = [("handler", lease.mapping.handler.clone())];
        let records_total = metrics::counter!("shardline_records_total", &labels);
        let batches_total = metrics::counter!("shardline_batches_total", &labels);
        let lag_gauge = metrics::gauge!("shardline_lease_lag", "lease" => lease.id.to_string());
        // Runs one batch through the policy, finalizes and counts it.
        let handle = |records: Vec<Arc<Record>>| async {
            let n = records.len() as u64;
            // The node's batch budget (max_inflight_batches), shared by all leases.
            let _permit = match &self.inflight {
                Some(s) => s.clone().acquire_owned().await.ok(),
                None => None,
            };
            self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            let done = lane.process(records, self.stats.lag.load(Ordering::Relaxed)).await;
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            let done = done.map_err(|_| End::Killed)?;
            if !finalizer.settle(tracker.position()).await {
                return Err(End::Broken);
            }
            self.stats.records.fetch_add(n, Ordering::Relaxed);
            self.stats.busy_micros.fetch_add(done.busy.as_micros() as u64, Ordering::Relaxed);
            self.usage.add(&lease.id.name, &lease.mapping.handler, n, &done);
            records_total.increment(n);
            batches_total.increment(1);
            Ok::<_, End>(())
        };
        // Cuts the next batch; `None` when draining or the reader ended.
        let mut cut = async || {
            let records = batcher.next_batch(&lease.drain).await?;
            let finished = tracker.position();
            let cut_to = records.last().map_or(finished, |r| r.position() + 1);
            let lag = batcher.reader.lag(cut_to, finished);
            self.stats.lag.store(lag, Ordering::Relaxed);
            lag_gauge.set(lag as f64);
            tracker.add(&records);
            Some(records)
        };
        let drain = &lease.drain;
        let result = if lanes == 1 {
            async {
                while !drain.is_cancelled()
                    && let Some(records) = cut().await
                {
                    handle(records).await?;
                }
                Ok(())
            }
            .await
        } else {
            // One queue per lane, records routed by key: every lane works
            // through its own records as they come, and a key's records
            // stay in order.
            let (senders, receivers): (Vec<_>, Vec<_>) =
                (0..lanes).map(|_| tokio::sync::mpsc::channel::<Arc<Record>>(batch_size * 2)).unzip();
            let handle = &handle;
            let dispatch = async move {
                while !drain.is_cancelled()
                    && let Some(records) = cut().await
                {
                    for r in records {
                        if senders[lane_of(&r, lanes)].send(r).await.is_err() {
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
                    while batch.len() < batch_size
                        && let Ok(r) = rx.try_recv()
                    {
                        batch.push(r);
                    }
                    handle(batch).await?;
                }
                Ok::<_, End>(())
            });
            let ((), results) = futures::future::join(dispatch, futures::future::join_all(workers)).await;
            results.into_iter().collect::<Result<Vec<()>, End>>().map(|_| ())
        };
        match result {
            Err(end) => end,
            Ok(()) if drain.is_cancelled() => End::Drained,
            // The reader ended by itself: its source broke.
            Ok(()) => End::Broken,
        }
    }
}

/// The lane of a record: by key hash, so a key's records stay in order;
/// keyless records spread by position.
fn lane_of(r: &Record, lanes: usize) -> usize {
    match &r.key {
        Some(key) => {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut h);
            (h.finish() % lanes as u64) as usize
        }
        None => r.position().rem_euclid(lanes as i64) as usize,
    }
}
