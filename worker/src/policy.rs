//! The batch policy: what happens when a handler fails. Kafka shards and
//! (later) queue slots both run their batches through here, so the rules
//! live in one place.
//!
//! Today's rule: retry the same batch with capped exponential backoff and
//! jitter until it succeeds or the lease is stopped. A panic in the handler
//! is caught and counts as a failure; the worker keeps running. Retry
//! limits, bisect, item failures, record age, on_failure and timeouts slot
//! in here.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::handler::{Batch, BatchResponse, DynHandler, HandlerError};

/// The lease was stopped (lost or revoked) while the batch was failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// How a batch went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub response: BatchResponse,
    pub attempts: u32,
    /// Time spent inside the handler, over all attempts.
    pub busy: Duration,
}

/// Callbacks for what happens between attempts (pausing the source while
/// a batch keeps failing, so nothing more is prefetched).
pub trait Hooks: Send + Sync {
    fn failing(&self) {}
    fn recovered(&self) {}
}

impl Hooks for () {}

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

/// Runs `batch` until it succeeds, or until `stop` fires.
pub async fn run(
    handler: &dyn DynHandler,
    batch: &Batch,
    mapping_handler: &str,
    hooks: &dyn Hooks,
    stop: &CancellationToken,
) -> Result<Outcome, Stopped> {
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(30))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build();
    let mut attempts = 0;
    let mut busy = Duration::ZERO;
    loop {
        attempts += 1;
        let started = Instant::now();
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => return Err(Stopped),
            r = attempt(handler, batch) => r,
        };
        let took = started.elapsed();
        busy += took;
        metrics::histogram!("shardline_handler_duration_seconds", "handler" => mapping_handler.to_owned())
            .record(took.as_secs_f64());
        match result {
            Ok(response) => {
                if attempts > 1 {
                    hooks.recovered();
                }
                return Ok(Outcome { response, attempts, busy });
            }
            Err(e) => {
                metrics::counter!("shardline_handler_errors_total", "handler" => mapping_handler.to_owned())
                    .increment(1);
                let wait = backoff.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(
                    lease = %batch.lease, handler = mapping_handler, attempts, error = %e, ?wait,
                    "batch failed; retrying"
                );
                if attempts == 1 {
                    hooks.failing();
                }
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return Err(Stopped),
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use shardline_proto::LeaseId;

    use super::*;
    use crate::handler::Handler;

    /// Fails (by error, then by panic) until the third attempt.
    struct Flaky(AtomicU32);

    impl Handler for Flaky {
        async fn init(_: &crate::handler::InitContext) -> Result<Self, crate::handler::InitError> {
            Ok(Flaky(AtomicU32::new(0)))
        }

        async fn handle(&self, _: &Batch) -> Result<BatchResponse, HandlerError> {
            match self.0.fetch_add(1, Ordering::SeqCst) {
                0 => Err("boom".into()),
                1 => panic!("kaboom"),
                _ => Ok(BatchResponse::default()),
            }
        }
    }

    fn batch() -> Batch {
        Batch { records: vec![], lease: LeaseId::shard("s", 0), epoch: 1, lag: 0 }
    }

    #[tokio::test(start_paused = true)]
    async fn errors_and_panics_are_retried_until_success() {
        let h = Flaky(AtomicU32::new(0));
        let outcome = run(&h, &batch(), "flaky", &(), &CancellationToken::new()).await;
        assert_eq!(outcome.map(|o| o.attempts), Ok(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_lease_ends_the_retries() {
        let h = Flaky(AtomicU32::new(0));
        let stop = CancellationToken::new();
        stop.cancel();
        assert_eq!(run(&h, &batch(), "flaky", &(), &stop).await, Err(Stopped));
    }
}
