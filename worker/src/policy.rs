//! The batch policy: what happens when a handler fails (DESIGN.md "Batches
//! and handler semantics"). Kafka shards and queue slots both run their
//! batches through [`Lane::process`], so the rules live in one place.
//!
//! A lane takes records in order and does not return until every record is
//! *finished*: handled successfully, filtered out, or given up on (sent to
//! `on_failure`, or discarded when there is none). Finished records are
//! marked in a [`Completion`], whose contiguous prefix is what may be
//! checkpointed. The rules, in Lambda's terms:
//!
//! - records older than `max_record_age` skip the handler and give up;
//! - an attempt that errs, panics, times out (`handler_timeout`) or names a
//!   record that is not in the batch fails the whole sub-batch;
//! - with `bisect_on_error` a failing sub-batch is split in two and each half
//!   tried on its own, down to single records (a split is not a retry);
//! - otherwise it is retried after a backoff until `max_retries` is used up
//!   (`None`: until its records are too old), then gives up;
//! - with `report_item_failures` the handler names failed records: those
//!   before the first failure are finished, the rest are retried from it;
//! - once the lease drains (released to another worker, or shutdown), no
//!   retry, split or further attempt starts: failing records are left
//!   unfinished, the lease checkpoints the finished prefix, and the next
//!   owner retries the rest. So a drain ends within one `handler_timeout`.

use std::collections::{BTreeMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::FutureExt;
use shardline_proto::{FailurePolicy, Filter, FilterTest, LeaseId};
use tokio_util::sync::CancellationToken;

use crate::handler::{Batch, BatchResponse, BoxFuture, DynHandler, HandlerError, Record};

/// The lease was stopped (lost or revoked) before the records finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// Why records gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    RetriesExhausted,
    TooOld,
    HandlerTimeout,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RetriesExhausted => "retries_exhausted",
            Reason::TooOld => "too_old",
            Reason::HandlerTimeout => "handler_timeout",
        }
    }
}

/// What is known about records that gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GaveUp {
    pub reason: Reason,
    pub attempts: u32,
    pub error: String,
}

/// Where records that gave up go. `Ok` only once they are safely there:
/// the shard may checkpoint past them only then.
pub trait FailureSink: Send + Sync {
    fn send<'a>(&'a self, records: &'a [Record], why: &'a GaveUp) -> BoxFuture<'a, Result<(), String>>;
}

/// No `on_failure`: records that gave up are dropped (counted and logged),
/// as Lambda discards them.
pub struct Discard;

impl FailureSink for Discard {
    fn send<'a>(&'a self, records: &'a [Record], why: &'a GaveUp) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            metrics::counter!("shardline_records_discarded_total", "reason" => why.reason.as_str())
                .increment(records.len() as u64);
            for r in records {
                tracing::error!(
                    stream = %r.stream, partition = r.partition, offset = r.offset, reason = why.reason.as_str(),
                    attempts = why.attempts, error = %why.error, "record discarded (no on_failure destination)"
                );
            }
            Ok(())
        })
    }
}

/// Callbacks between attempts (pausing the source while a batch keeps
/// failing, so nothing more is prefetched).
pub trait Hooks: Send + Sync {
    fn failing(&self) {}
    fn recovered(&self) {}
}

impl Hooks for () {}

/// Which records of a shard are finished, in offset order. Offsets may have
/// gaps (compaction, transaction markers): the checkpoint is the offset of
/// the first unfinished record, or one past the last record seen.
#[derive(Debug, Default)]
pub struct Completion {
    pending: BTreeMap<i64, bool>,
    position: i64,
}

impl Completion {
    pub fn new(position: i64) -> Self {
        Self { pending: BTreeMap::new(), position }
    }

    /// Records about to be processed.
    pub fn add(&mut self, offsets: impl IntoIterator<Item = i64>) {
        for o in offsets {
            self.pending.insert(o, false);
        }
    }

    /// Marks a record finished; returns the new checkpoint if it moved.
    pub fn finish(&mut self, offset: i64) -> Option<i64> {
        if let Some(done) = self.pending.get_mut(&offset) {
            *done = true;
        }
        let before = self.position;
        while let Some((&o, &done)) = self.pending.first_key_value() {
            if !done {
                self.position = self.position.max(o);
                break;
            }
            self.pending.pop_first();
            self.position = o + 1;
        }
        (self.position != before).then_some(self.position)
    }

    pub fn position(&self) -> i64 {
        self.position
    }
}

/// Counts of what a lane did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaneStats {
    pub handled: u64,
    pub filtered: u64,
    pub gave_up: u64,
    pub attempts: u64,
    pub busy: Duration,
    /// Each attempt's duration rounded up to 100 ms, summed (Lambda's
    /// metering unit).
    pub billed_units: u64,
    /// Left unfinished because the lease drains: the next owner retries them.
    pub abandoned: u64,
}

/// Everything a lane needs; shared by the lanes of one lease.
pub struct Lane<'a> {
    pub handler: &'a dyn DynHandler,
    /// The handler's name, for metrics.
    pub name: &'a str,
    pub policy: &'a FailurePolicy,
    pub filter: Option<&'a CompiledFilter>,
    pub sink: &'a dyn FailureSink,
    pub hooks: &'a dyn Hooks,
    pub stop: &'a CancellationToken,
    /// The lease drains: start no retry (see the module docs).
    pub drain: &'a CancellationToken,
    pub lease: &'a LeaseId,
    pub epoch: u64,
    pub lag: i64,
    pub completion: &'a Mutex<Completion>,
    /// Called with the new checkpoint whenever the finished prefix grows.
    pub progress: &'a (dyn Fn(i64) + Send + Sync),
}

struct Work {
    records: Vec<Record>,
    attempts: u32,
}

/// Leaves failing records (and whatever else of their batch waits) for the
/// next owner; how many.
fn abandon(failed: &[Record], queue: &VecDeque<Work>, lease: &LeaseId, error: &HandlerError) -> u64 {
    let n = (failed.len() + queue.iter().map(|w| w.records.len()).sum::<usize>()) as u64;
    tracing::warn!(%lease, records = n, error = %error, "batch failed while draining; left for the next owner");
    n
}

impl Lane<'_> {
    fn finish(&self, records: &[Record]) {
        let Ok(mut completion) = self.completion.lock() else { return };
        let mut moved = None;
        for r in records {
            if let Some(p) = completion.finish(r.offset) {
                moved = Some(p);
            }
        }
        drop(completion);
        if let Some(p) = moved {
            (self.progress)(p);
        }
    }

    /// Runs `records` (in order) until every one is finished.
    pub async fn process(&self, records: Vec<Record>) -> Result<LaneStats, Stopped> {
        let mut paused = false;
        let result = self.run(records, &mut paused).await;
        // However the failing records ended (retried to success, bisected,
        // given up), the source must fetch again.
        if paused {
            self.hooks.recovered();
        }
        result
    }

    async fn run(&self, records: Vec<Record>, paused: &mut bool) -> Result<LaneStats, Stopped> {
        let mut stats = LaneStats::default();
        let (records, skipped): (Vec<Record>, Vec<Record>) =
            records.into_iter().partition(|r| self.filter.is_none_or(|f| f.matches(&r.value)));
        if !skipped.is_empty() {
            stats.filtered = skipped.len() as u64;
            metrics::counter!("shardline_records_filtered_total", "handler" => self.name.to_owned())
                .increment(stats.filtered);
            self.finish(&skipped);
        }
        let mut queue = VecDeque::from([Work { records, attempts: 0 }]);
        while let Some(work) = queue.pop_front() {
            if self.stop.is_cancelled() {
                return Err(Stopped);
            }
            let (fresh, expired) = self.split_expired(work.records);
            if !expired.is_empty() {
                let why = GaveUp {
                    reason: Reason::TooOld,
                    attempts: work.attempts,
                    error: "record too old".into(),
                };
                stats.gave_up += expired.len() as u64;
                self.give_up(&expired, &why).await?;
            }
            if fresh.is_empty() {
                continue;
            }
            let attempts = work.attempts + 1;
            stats.attempts += 1;
            let started = Instant::now();
            let result = self.attempt(&fresh).await?;
            let took = started.elapsed();
            stats.busy += took;
            stats.billed_units += took.as_millis().div_ceil(100).max(1) as u64;
            let failure = match result {
                Ok(response) if response.failed.is_empty() || !self.policy.report_item_failures => {
                    stats.handled += fresh.len() as u64;
                    self.finish(&fresh);
                    continue;
                }
                Ok(response) => match fresh.iter().position(|r| response.failed.contains(&r.offset)) {
                    Some(first) if response.failed.iter().all(|o| fresh.iter().any(|r| r.offset == *o)) => {
                        // Lambda's ReportBatchItemFailures: finished up to the
                        // first failure, retried from it.
                        let mut rest = fresh;
                        let failed = rest.split_off(first);
                        stats.handled += rest.len() as u64;
                        self.finish(&rest);
                        let named = Some(response.failed);
                        (
                            failed,
                            HandlerError::new("the handler reported failed records"),
                            Reason::RetriesExhausted,
                            named,
                        )
                    }
                    _ => (
                        fresh,
                        HandlerError::new("the handler named records that are not in the batch"),
                        Reason::RetriesExhausted,
                        None,
                    ),
                },
                Err((e, reason)) => (fresh, e, reason, None),
            };
            let (failed, error, reason, named) = failure;
            metrics::counter!("shardline_handler_errors_total", "handler" => self.name.to_owned())
                .increment(1);
            if !*paused {
                self.hooks.failing();
                *paused = true;
            }
            if self.drain.is_cancelled() {
                stats.abandoned += abandon(&failed, &queue, self.lease, &error);
                return Ok(stats);
            }
            if self.policy.bisect_on_error && failed.len() > 1 {
                let mut first = failed;
                let second = first.split_off(first.len() / 2);
                tracing::warn!(lease = %self.lease, error = %error, sizes = ?(first.len(), second.len()), "batch failed; bisecting");
                queue.push_front(Work { records: second, attempts: work.attempts });
                queue.push_front(Work { records: first, attempts: work.attempts });
                continue;
            }
            let exhausted = self.policy.max_retries.is_some_and(|max| attempts > max);
            if exhausted {
                // With item failures, only the records the handler named in
                // its last answer gave up; the others it handled then.
                let (gave_up, handled): (Vec<Record>, Vec<Record>) = match &named {
                    Some(named) => failed.into_iter().partition(|r| named.contains(&r.offset)),
                    None => (failed, Vec::new()),
                };
                stats.handled += handled.len() as u64;
                self.finish(&handled);
                let why = GaveUp { reason, attempts, error: error.message };
                stats.gave_up += gave_up.len() as u64;
                self.give_up(&gave_up, &why).await?;
                continue;
            }
            let wait = self.backoff(attempts);
            metrics::counter!("shardline_retries_total", "handler" => self.name.to_owned()).increment(1);
            tracing::warn!(lease = %self.lease, attempts, error = %error, ?wait, records = failed.len(), "batch failed; retrying");
            tokio::select! {
                biased;
                () = self.stop.cancelled() => return Err(Stopped),
                () = self.drain.cancelled() => {
                    stats.abandoned += abandon(&failed, &queue, self.lease, &error);
                    return Ok(stats);
                }
                () = tokio::time::sleep(wait) => {}
            }
            queue.push_front(Work { records: failed, attempts });
        }
        Ok(stats)
    }

    /// One attempt, with the handler's panics and timeout turned into errors.
    async fn attempt(
        &self,
        records: &[Record],
    ) -> Result<Result<BatchResponse, (HandlerError, Reason)>, Stopped> {
        let batch =
            Batch { records: records.to_vec(), lease: self.lease.clone(), epoch: self.epoch, lag: self.lag };
        let started = Instant::now();
        let run = tokio::time::timeout(self.policy.handler_timeout, attempt(self.handler, &batch));
        let result = tokio::select! {
            biased;
            () = self.stop.cancelled() => return Err(Stopped),
            r = run => r,
        };
        metrics::histogram!("shardline_handler_duration_seconds", "handler" => self.name.to_owned())
            .record(started.elapsed().as_secs_f64());
        Ok(match result {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err((e, Reason::RetriesExhausted)),
            Err(_) => Err((
                HandlerError::new(format!("handler timed out after {:?}", self.policy.handler_timeout)),
                Reason::HandlerTimeout,
            )),
        })
    }

    fn split_expired(&self, records: Vec<Record>) -> (Vec<Record>, Vec<Record>) {
        let Some(max_age) = self.policy.max_record_age else { return (records, Vec::new()) };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let limit = now_ms - max_age.as_millis() as i64;
        records.into_iter().partition(|r| r.timestamp_ms.is_none_or(|t| t >= limit))
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let mut builder = ExponentialBuilder::default()
            .with_min_delay(self.policy.retry_initial)
            .with_max_delay(self.policy.retry_max)
            .with_factor(self.policy.retry_multiplier as f32)
            .without_max_times();
        if self.policy.retry_jitter {
            builder = builder.with_jitter();
        }
        builder.build().nth(attempts.saturating_sub(1) as usize).unwrap_or(self.policy.retry_max)
    }

    /// Sends records that gave up to the sink, retrying until it takes
    /// them (never checkpoint past a record that is nowhere).
    async fn give_up(&self, records: &[Record], why: &GaveUp) -> Result<(), Stopped> {
        let mut wait = Duration::from_millis(100);
        loop {
            match self.sink.send(records, why).await {
                Ok(()) => {
                    self.finish(records);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(lease = %self.lease, error = %e, ?wait, "on_failure destination failed; retrying");
                    tokio::select! {
                        biased;
                        () = self.stop.cancelled() => return Err(Stopped),
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// Runs one attempt, turning a panic into an error.
pub async fn attempt(handler: &dyn DynHandler, batch: &Batch) -> Result<BatchResponse, HandlerError> {
    match AssertUnwindSafe(handler.handle(batch)).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            Err(HandlerError::new(format!("handler panicked: {message}")))
        }
    }
}

/// A mapping's filter, with the JSON to compare against parsed once.
#[derive(Debug, Clone)]
pub struct CompiledFilter {
    path: Vec<String>,
    test: Test,
}

#[derive(Debug, Clone)]
enum Test {
    Equals(serde_json::Value),
    Exists,
    Prefix(String),
}

impl CompiledFilter {
    pub fn new(filter: &Filter) -> Result<Self, String> {
        let test = match &filter.test {
            FilterTest::Equals(json) => Test::Equals(
                serde_json::from_str(json).map_err(|e| format!("filter value `{json}` is not JSON: {e}"))?,
            ),
            FilterTest::Exists => Test::Exists,
            FilterTest::Prefix(p) => Test::Prefix(p.clone()),
        };
        Ok(Self { path: filter.field.split('.').map(str::to_owned).collect(), test })
    }

    /// Whether a record's value passes. A value that is not a JSON object
    /// never does (like Lambda's data filters).
    pub fn matches(&self, value: &[u8]) -> bool {
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(value) else { return false };
        let field = self.path.iter().try_fold(&json, |v, key| v.get(key));
        match (&self.test, field) {
            (Test::Exists, Some(_)) => true,
            (Test::Equals(want), Some(got)) => want == got,
            (Test::Prefix(p), Some(serde_json::Value::String(s))) => s.starts_with(p.as_str()),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests;
