//! The batch policy: what happens when a handler fails (DESIGN.md "Batches
//! and handler semantics"), in one place for every source ([`Lane::process`]).
//!
//! A lane does not return until every record is *finished* (handled,
//! filtered out, or given up to the lease's [`FailureSink`]) or, on a
//! drain, *left* for the next owner. Records owed a decision are held in a
//! [`Work`], the only way to finish them (in the lease's [`Tracker`], whose
//! contiguous prefix may be checkpointed or acked); one dropped undecided
//! while the lease is not killed is a bug that stops the lease, loudly,
//! rather than skip or redo records quietly.
//!
//! The rules, in Lambda's terms:
//!
//! - records older than `max_record_age` skip the handler and give up;
//! - an attempt that errs, panics, times out (`handler_timeout`) or names a
//!   record not in the batch fails the whole sub-batch;
//! - with `bisect_on_error` a failing sub-batch is split in two, down to
//!   single records (a split is not a retry);
//! - otherwise it is retried after a backoff until `max_retries` is used up
//!   (`None`: until its records are too old), then gives up;
//! - with `report_item_failures` the records before the first one the
//!   handler names are finished, the rest retried from it;
//! - once the lease drains, no retry, split or further attempt starts:
//!   failing records are left for the next owner, so a drain ends within
//!   one `handler_timeout`.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::FutureExt;
use shardline_proto::{FailurePolicy, Filter, FilterTest, LeaseId};
use tokio_util::sync::CancellationToken;

use crate::handler::{Batch, BatchResponse, DynHandler, HandlerError, Record};
use crate::sink::{FailureSink, GaveUp, Reason};

/// The lease was stopped (lost or revoked) before the records finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// Callbacks between attempts (pausing the source while a batch keeps
/// failing, so nothing more is prefetched).
pub trait Hooks: Send + Sync {
    fn failing(&self) {}
    fn recovered(&self) {}
}

/// Which records of one lease are finished, shared by its lanes, and what
/// happens when the finished prefix moves. Positions may have gaps
/// (compaction, transaction markers): the prefix is the position of the
/// first unfinished record, or one past the last one seen.
///
/// The lanes of a lease are futures of one task, so this lock is never
/// contended; it is a lock and not a `RefCell` only because the task must be
/// `Send` to run on tokio's threads, and a future holding `&RefCell` is not.
pub struct Tracker<'a> {
    state: Mutex<Pending>,
    /// Called with the new prefix on every advance (must not wait).
    advanced: &'a (dyn Fn(i64) + Send + Sync),
    kill: CancellationToken,
    broken: CancellationToken,
}

/// Records cut and not yet in the prefix, by position, with whether each is
/// finished; and the prefix. Records are cut in position order, so this is
/// a sorted queue: adding appends, the prefix pops from the front, and a
/// finished record is found by binary search (the next record of a batch
/// usually sits right after the previous one, which is tried first). No
/// allocation per record once the queue has grown to a batch or two.
struct Pending {
    records: VecDeque<(i64, bool)>,
    position: i64,
}

impl Pending {
    fn add(&mut self, p: i64) {
        match self.records.back() {
            None => self.records.push_back((p, false)),
            Some(&(last, _)) if p > last => self.records.push_back((p, false)),
            // Not after the last one (no source cuts so, but a position
            // seen twice must not be tracked twice).
            Some(_) => {
                if let Err(at) = self.records.binary_search_by_key(&p, |&(q, _)| q) {
                    self.records.insert(at, (p, false));
                }
            }
        }
    }

    /// Marks `p` finished; `hint` is where the previous one was found.
    fn finish(&mut self, p: i64, hint: usize) -> Option<usize> {
        let at = match self.records.get(hint) {
            Some(&(q, _)) if q == p => hint,
            _ => self.records.binary_search_by_key(&p, |&(q, _)| q).ok()?,
        };
        self.records[at].1 = true;
        Some(at)
    }

    /// Moves the prefix past the finished records at the front.
    fn advance(&mut self) {
        while let Some(&(p, done)) = self.records.front() {
            if !done {
                self.position = self.position.max(p);
                return;
            }
            self.records.pop_front();
            self.position = p + 1;
        }
    }
}

impl<'a> Tracker<'a> {
    /// Starts at `position`; `kill` is the lease's: records dropped once it
    /// fired are not finished, and that is no error.
    pub fn new(position: i64, kill: &CancellationToken, advanced: &'a (dyn Fn(i64) + Send + Sync)) -> Self {
        let state = Mutex::new(Pending { records: VecDeque::new(), position });
        Self { state, advanced, kill: kill.clone(), broken: CancellationToken::new() }
    }

    pub fn add(&self, records: &[Arc<Record>]) {
        let mut state = crate::lock(&self.state);
        for r in records {
            state.add(r.position());
        }
    }

    pub fn position(&self) -> i64 {
        crate::lock(&self.state).position
    }

    /// Fires when records were dropped undecided (a bug): the lease stops.
    pub fn broken(&self) -> &CancellationToken {
        &self.broken
    }

    fn claim(&self, records: Vec<Arc<Record>>) -> Work<'_> {
        Work { records, attempts: 0, tracker: self }
    }

    fn finish(&self, records: &[Arc<Record>]) {
        let mut state = crate::lock(&self.state);
        let before = state.position;
        let mut hint = 0;
        for r in records {
            if let Some(at) = state.finish(r.position(), hint) {
                hint = at + 1;
            }
        }
        state.advance();
        let moved = (state.position != before).then_some(state.position);
        drop(state);
        if let Some(p) = moved {
            (self.advanced)(p);
        }
    }
}

/// Records a lane owes a decision on.
#[must_use]
struct Work<'t> {
    records: Vec<Arc<Record>>,
    attempts: u32,
    tracker: &'t Tracker<'t>,
}

impl<'t> Work<'t> {
    /// Moves the records `keep` rejects into a `Work` of their own;
    /// `split_off`, those from `at` on.
    fn split_by(&mut self, keep: impl Fn(&Record) -> bool) -> Work<'t> {
        let (kept, out) = std::mem::take(&mut self.records).into_iter().partition(|r| keep(r));
        self.records = kept;
        Work { records: out, attempts: self.attempts, tracker: self.tracker }
    }

    fn split_off(&mut self, at: usize) -> Work<'t> {
        Work { records: self.records.split_off(at), attempts: self.attempts, tracker: self.tracker }
    }

    /// Handled, filtered, or safely in the sink; how many.
    fn finish(mut self) -> u64 {
        self.tracker.finish(&self.records);
        std::mem::take(&mut self.records).len() as u64
    }

    /// Left unfinished for the next owner (a drain); how many.
    fn leave(mut self) -> u64 {
        std::mem::take(&mut self.records).len() as u64
    }
}

impl Drop for Work<'_> {
    fn drop(&mut self) {
        // Once the lease is killed nothing may be finished: no error then.
        if !self.records.is_empty() && !self.tracker.kill.is_cancelled() {
            let records = self.records.len();
            tracing::error!(
                records,
                "records dropped without being finished or left (a bug); stopping the lease"
            );
            self.tracker.broken.cancel();
        }
    }
}

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

/// What one attempt came to: the handler's answer or why it failed;
/// `Err(Stopped)`: the lease was killed during it.
type Attempt = Result<Result<BatchResponse, (HandlerError, Reason)>, Stopped>;

/// One per lease, shared by its lanes.
pub struct Lane<'a> {
    pub handler: &'a dyn DynHandler,
    pub name: &'a str,
    pub policy: &'a FailurePolicy,
    pub filter: Option<&'a CompiledFilter>,
    pub sink: &'a dyn FailureSink,
    /// Where replies to synchronous invocations go (queue slots only).
    pub replies: Option<&'a crate::amqp::Publisher>,
    pub hooks: &'a dyn Hooks,
    /// The lease drains: start no retry (see the module docs).
    pub drain: &'a CancellationToken,
    pub lease: &'a LeaseId,
    pub epoch: u64,
    pub tracker: &'a Tracker<'a>,
}

/// Leaves failing records (and whatever else of their batch waits) for the
/// next owner; how many.
fn abandon(failed: Work<'_>, queue: &mut VecDeque<Work<'_>>, lease: &LeaseId, error: &HandlerError) -> u64 {
    let n = failed.leave() + queue.drain(..).map(Work::leave).sum::<u64>();
    tracing::warn!(%lease, records = n, error = %error, "batch failed while draining; left for the next owner");
    n
}

impl Lane<'_> {
    /// Runs `records` (cut when the source was `lag` behind) until every
    /// one is finished, or left on a drain.
    pub async fn process(&self, records: Vec<Arc<Record>>, lag: i64) -> Result<LaneStats, Stopped> {
        let mut paused = false;
        let result = self.run(self.tracker.claim(records), lag, &mut paused).await;
        // However the failing records ended (retried to success, bisected,
        // given up), the source must fetch again.
        if paused {
            self.hooks.recovered();
        }
        result
    }

    async fn run(&self, mut work: Work<'_>, lag: i64, paused: &mut bool) -> Result<LaneStats, Stopped> {
        let mut stats = LaneStats::default();
        if let Some(filter) = self.filter {
            let skipped = work.split_by(|r| filter.matches(&r.value));
            stats.filtered = skipped.finish();
            if stats.filtered > 0 {
                metrics::counter!("shardline_records_filtered_total", "handler" => self.name.to_owned())
                    .increment(stats.filtered);
            }
        }
        let mut queue = VecDeque::from([work]);
        while let Some(mut work) = queue.pop_front() {
            if self.tracker.kill.is_cancelled() {
                return Err(Stopped);
            }
            if let Some(max_age) = self.policy.max_record_age {
                let limit = crate::unix_ms() as i64 - max_age.as_millis() as i64;
                let expired = work.split_by(|r| r.timestamp_ms.is_none_or(|t| t >= limit));
                if !expired.records.is_empty() {
                    let why = GaveUp {
                        reason: Reason::TooOld,
                        attempts: work.attempts,
                        error: "record too old".into(),
                    };
                    stats.gave_up += self.give_up(expired, &why).await?;
                }
            }
            if work.records.is_empty() {
                continue;
            }
            let attempts = work.attempts + 1;
            stats.attempts += 1;
            let started = Instant::now();
            // The records go into the batch and come back: not copied.
            let (records, result) = self.attempt(std::mem::take(&mut work.records), lag).await;
            work.records = records;
            let result = result?;
            let took = started.elapsed();
            stats.busy += took;
            stats.billed_units += took.as_millis().div_ceil(100).max(1) as u64;
            let (error, reason, named) = match result {
                Ok(response) if response.failed.is_empty() || !self.policy.report_item_failures => {
                    crate::sink::reply::send(self.replies, self.lease, &work.records, &response.replies)
                        .await;
                    stats.handled += work.finish();
                    continue;
                }
                Ok(response) => {
                    let known =
                        response.failed.iter().all(|p| work.records.iter().any(|r| r.position() == *p));
                    match work.records.iter().position(|r| response.failed.contains(&r.position())) {
                        Some(first) if known => {
                            // Lambda's ReportBatchItemFailures: finished up to
                            // the first failure, retried from it.
                            let failed = work.split_off(first);
                            let handled = std::mem::replace(&mut work, failed);
                            crate::sink::reply::send(
                                self.replies,
                                self.lease,
                                &handled.records,
                                &response.replies,
                            )
                            .await;
                            stats.handled += handled.finish();
                            let error = HandlerError::new("the handler reported failed records");
                            (error, Reason::RetriesExhausted, Some(response))
                        }
                        _ => {
                            let error =
                                HandlerError::new("the handler named records that are not in the batch");
                            (error, Reason::RetriesExhausted, None)
                        }
                    }
                }
                Err((e, reason)) => (e, reason, None),
            };
            metrics::counter!("shardline_handler_errors_total", "handler" => self.name.to_owned())
                .increment(1);
            if !*paused {
                self.hooks.failing();
                *paused = true;
            }
            if self.drain.is_cancelled() {
                stats.abandoned += abandon(work, &mut queue, self.lease, &error);
                return Ok(stats);
            }
            if self.policy.bisect_on_error && work.records.len() > 1 {
                let second = work.split_off(work.records.len() / 2);
                tracing::warn!(lease = %self.lease, error = %error, sizes = ?(work.records.len(), second.records.len()), "batch failed; bisecting");
                queue.push_front(second);
                queue.push_front(work);
                continue;
            }
            if self.policy.max_retries.is_some_and(|max| attempts > max) {
                // With item failures, only the records the handler named in
                // its last answer gave up; the others it handled then (and
                // their replies go). Each carries the error the handler gave
                // it, if any.
                if let Some(named) = &named {
                    let handled = work.split_by(|r| named.failed.contains(&r.position()));
                    crate::sink::reply::send(self.replies, self.lease, &handled.records, &named.replies)
                        .await;
                    stats.handled += handled.finish();
                    let own = |r: &Record| named.errors.get(&r.position());
                    while let Some(message) = work.records.iter().find_map(|r| own(r)) {
                        let group = work.split_by(|r| own(r) != Some(message));
                        let why = GaveUp { reason, attempts, error: message.clone() };
                        stats.gave_up += self.give_up(group, &why).await?;
                    }
                    if work.records.is_empty() {
                        continue;
                    }
                }
                let why = GaveUp { reason, attempts, error: error.message };
                stats.gave_up += self.give_up(work, &why).await?;
                continue;
            }
            let wait = self.backoff(attempts);
            metrics::counter!("shardline_retries_total", "handler" => self.name.to_owned()).increment(1);
            tracing::warn!(lease = %self.lease, attempts, error = %error, ?wait, records = work.records.len(), "batch failed; retrying");
            tokio::select! {
                biased;
                () = self.tracker.kill.cancelled() => return Err(Stopped),
                () = self.drain.cancelled() => {
                    stats.abandoned += abandon(work, &mut queue, self.lease, &error);
                    return Ok(stats);
                }
                () = tokio::time::sleep(wait) => {}
            }
            work.attempts = attempts;
            queue.push_front(work);
        }
        Ok(stats)
    }

    /// One attempt, with the handler's panics and timeout turned into errors.
    /// The records are moved into the batch and handed back with the
    /// outcome, whatever it is.
    async fn attempt(&self, records: Vec<Arc<Record>>, lag: i64) -> (Vec<Arc<Record>>, Attempt) {
        let timeout = u64::try_from(self.policy.handler_timeout.as_millis()).unwrap_or(u64::MAX);
        let deadline_ms = crate::unix_ms().saturating_add(timeout);
        let batch = Batch { records, lease: self.lease.clone(), epoch: self.epoch, lag, deadline_ms };
        let started = Instant::now();
        let run = AssertUnwindSafe(self.handler.handle(&batch)).catch_unwind();
        let run = tokio::time::timeout(self.policy.handler_timeout, run);
        let result = self.tracker.kill.run_until_cancelled(run).await;
        let Some(result) = result else { return (batch.records, Err(Stopped)) };
        metrics::histogram!("shardline_handler_duration_seconds", "handler" => self.name.to_owned())
            .record(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(e))) => Err((e, Reason::RetriesExhausted)),
            Ok(Err(panic)) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into());
                Err((HandlerError::new(format!("handler panicked: {message}")), Reason::RetriesExhausted))
            }
            Err(_) => Err((
                HandlerError::new(format!("handler timed out after {:?}", self.policy.handler_timeout)),
                Reason::HandlerTimeout,
            )),
        };
        (batch.records, Ok(outcome))
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
    /// them (never finish a record that is nowhere); how many.
    async fn give_up(&self, work: Work<'_>, why: &GaveUp) -> Result<u64, Stopped> {
        let mut wait = Duration::from_millis(100);
        loop {
            match self.sink.send(self.lease, &work.records, why).await {
                Ok(()) => return Ok(work.finish()),
                Err(e) if e.retryable() => {
                    tracing::warn!(lease = %self.lease, error = %e, ?wait, "failure destination failed; retrying");
                }
                Err(e) => {
                    // Nothing here may drop the records: they wait, loudly,
                    // for an operator to fix the destination.
                    wait = Duration::from_secs(10);
                    tracing::error!(lease = %self.lease, error = %e, ?wait, "failure destination refuses the records; retrying until it takes them");
                }
            }
            self.tracker.kill.run_until_cancelled(tokio::time::sleep(wait)).await.ok_or(Stopped)?;
            wait = (wait * 2).min(Duration::from_secs(10));
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
