//! The RabbitMQ names and retry delays of a subscription, in one place so
//! the coordinator (which declares them) and the worker (which publishes to
//! them) cannot disagree.
//!
//! For a subscription `S` bound to a topic exchange:
//!
//! - `S` is the durable queue its slots consume;
//! - `S.dlx` is a fanout exchange and `S.dlq` the queue bound to it: records
//!   that gave up end there (the queue `S` dead-letters there too, so what
//!   the broker itself rejects is kept, not dropped);
//! - `S.retry.<ms>ms` is one queue per retry delay with a queue-wide TTL of
//!   `<ms>` that dead-letters back to `S` through the default exchange. A
//!   queue per delay (not per-message TTLs in one queue) because RabbitMQ
//!   expires messages only at the head of a queue: a 30 s retry would hold
//!   back a 100 ms one behind it. They are quorum queues with at-least-once
//!   dead-lettering (see the coordinator's `amqp` module), so the hop back
//!   to `S` survives a broker crash.
//! - `S.retry.<ms>` (no unit) is the earlier layout: classic retry queues,
//!   whose dead-lettering RabbitMQ does at most once. The new names let an
//!   upgrade declare the new queues beside the old ones (which keep sending
//!   what they hold back to `S`) instead of failing on a queue that exists
//!   with other arguments; the coordinator reports old ones still there.

use std::time::Duration;

use crate::FailurePolicy;

/// The dead-letter exchange of a subscription.
pub fn dead_letter_exchange(subscription: &str) -> String {
    format!("{subscription}.dlx")
}

/// The dead-letter queue of a subscription.
pub fn dead_letter_queue(subscription: &str) -> String {
    format!("{subscription}.dlq")
}

/// The retry queue that holds messages for `delay` before they go back.
pub fn retry_queue(subscription: &str, delay: Duration) -> String {
    format!("{subscription}.retry.{}ms", delay.as_millis())
}

/// The classic retry queue of earlier releases for `delay` (at-most-once
/// dead-lettering), which may still exist on a broker and hold messages.
pub fn legacy_retry_queue(subscription: &str, delay: Duration) -> String {
    format!("{subscription}.retry.{}", delay.as_millis())
}

/// Every queue the coordinator declares for a subscription with `policy`:
/// the queue, its dead-letter queue and its retry queues (for cleanup).
pub fn queues(subscription: &str, policy: &FailurePolicy) -> Vec<String> {
    let mut queues = vec![subscription.to_owned(), dead_letter_queue(subscription)];
    queues.extend(retry_delays(policy).into_iter().map(|d| retry_queue(subscription, d)));
    queues
}

/// Every `shardline.*` header a worker writes, named once: the worker
/// writes them, tests and operators read them.
pub mod headers {
    /// How many times the record has failed so far.
    pub const ATTEMPTS: &str = "shardline.attempts";
    /// When each attempt of a queue message failed (Unix ms, comma-separated).
    pub const ATTEMPTS_FAILED_AT: &str = "shardline.attempts_failed_at";
    /// Why a record gave up: `retries_exhausted`, `too_old`, `handler_timeout`.
    pub const REASON: &str = "shardline.reason";
    /// The last error of a record that failed.
    pub const ERROR: &str = "shardline.error";
    /// When a record gave up (RFC 3339).
    pub const FAILED_AT: &str = "shardline.failed_at";
    /// Where a record that gave up came from: a Kafka stream...
    pub const SOURCE_STREAM: &str = "shardline.source.stream";
    pub const SOURCE_PARTITION: &str = "shardline.source.partition";
    pub const SOURCE_OFFSET: &str = "shardline.source.offset";
    /// ...or a subscription.
    pub const SOURCE_SUBSCRIPTION: &str = "shardline.source.subscription";
    /// The worker that wrote the copy.
    pub const WORKER: &str = "shardline.worker";
    /// `forward`'s receipts: the lease's stream (or subscription), its
    /// partition (or slot), the record's offset (or delivery tag), and when
    /// the handler invocation began (Unix ms).
    pub const STREAM: &str = "shardline.stream";
    pub const PARTITION: &str = "shardline.partition";
    pub const OFFSET: &str = "shardline.offset";
    pub const INVOKED_AT_MS: &str = "shardline.invoked_at_ms";
    /// A reply to a synchronous invocation: the handler's status (an AMQP
    /// integer), the HTTP status the gateway answers with.
    pub const STATUS: &str = "shardline.status";
    /// The request's content type, as a header a handler can read (the
    /// AMQP `content_type` property is not part of a record).
    pub const CONTENT_TYPE: &str = "content-type";
}

/// The pseudo-queue of RabbitMQ's direct reply-to: a requester (the
/// gateway) consumes it and names it as `reply_to`; the addresses RabbitMQ
/// hands out start with it (the worker publishes replies to them).
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Most distinct retry delays per subscription (so most retry queues).
const MAX_TIERS: usize = 16;

/// The delays between attempts of a failing message: `retry_initial`,
/// growing by `retry_multiplier` up to `retry_max`. Attempt `n` (1-based)
/// waits `delays[min(n, len) - 1]`. Jitter does not apply: each delay is a
/// queue, so the set must be finite and known to both sides.
pub fn retry_delays(policy: &FailurePolicy) -> Vec<Duration> {
    let mut delays = Vec::new();
    let mut delay = policy.retry_initial.max(Duration::from_millis(1));
    while delays.len() < MAX_TIERS {
        // Whole milliseconds: the delay is a queue name and an x-message-ttl.
        let ms = Duration::from_millis(delay.as_millis().max(1) as u64);
        if ms >= policy.retry_max || delays.len() + 1 == MAX_TIERS {
            delays.push(Duration::from_millis(policy.retry_max.as_millis().max(1) as u64));
            break;
        }
        delays.push(ms);
        if policy.retry_multiplier <= 1.0 {
            break;
        }
        delay = delay.mul_f64(policy.retry_multiplier);
    }
    delays.dedup();
    delays
}

/// The delay before attempt `attempt` (1-based) of a failing message.
pub fn retry_delay(delays: &[Duration], attempt: u32) -> Duration {
    let i = (attempt.max(1) as usize - 1).min(delays.len().saturating_sub(1));
    delays.get(i).copied().unwrap_or(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(initial_ms: u64, max_ms: u64, multiplier: f64) -> FailurePolicy {
        FailurePolicy {
            retry_initial: Duration::from_millis(initial_ms),
            retry_max: Duration::from_millis(max_ms),
            retry_multiplier: multiplier,
            ..FailurePolicy::default()
        }
    }

    #[test]
    fn delays_grow_to_the_cap_and_stay_there() {
        let ms = |v: &[u64]| v.iter().map(|m| Duration::from_millis(*m)).collect::<Vec<_>>();
        let d = retry_delays(&policy(100, 30_000, 2.0));
        assert_eq!(d, ms(&[100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000]));
        assert_eq!(retry_delay(&d, 1), Duration::from_millis(100));
        assert_eq!(retry_delay(&d, 3), Duration::from_millis(400));
        assert_eq!(retry_delay(&d, 50), Duration::from_millis(30_000));
        // A multiplier of 1: one delay; initial == max: one delay.
        assert_eq!(retry_delays(&policy(500, 30_000, 1.0)), ms(&[500]));
        assert_eq!(retry_delays(&policy(500, 500, 2.0)), ms(&[500]));
        // A tiny multiplier cannot make hundreds of queues.
        assert!(retry_delays(&policy(1, 900_000, 1.01)).len() <= MAX_TIERS);
    }

    #[test]
    fn names_are_derived_from_the_subscription() {
        assert_eq!(dead_letter_exchange("emails"), "emails.dlx");
        assert_eq!(dead_letter_queue("emails"), "emails.dlq");
        assert_eq!(retry_queue("emails", Duration::from_millis(400)), "emails.retry.400ms");
        assert_eq!(legacy_retry_queue("emails", Duration::from_millis(400)), "emails.retry.400");
        let all = queues("emails", &policy(100, 400, 2.0));
        assert_eq!(
            all,
            ["emails", "emails.dlq", "emails.retry.100ms", "emails.retry.200ms", "emails.retry.400ms"]
        );
    }
}
