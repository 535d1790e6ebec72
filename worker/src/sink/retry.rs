//! Where failing queue messages go: the retry queue of their next delay
//! (`S.retry.<ms>ms`, which brings them back to `S`), or the dead-letter
//! exchange once `max_retries` is used up or they are too old.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use shardline_proto::topology::{self, headers};
use shardline_proto::{FailurePolicy, LeaseId};

use super::publish::{Message, PublishError, Publisher};
use super::{FailureSink, GaveUp, Reason, Sent};
use crate::amqp::{field_table, is_broker_header};
use crate::handler::Record;

/// Each delivery's original properties by delivery tag, kept by the slot
/// that consumes so a failing message is republished faithfully.
pub type Properties = Arc<Mutex<HashMap<u64, BasicProperties>>>;

pub struct RetrySink {
    pub publisher: Publisher,
    pub subscription: String,
    pub delays: Vec<Duration>,
    pub max_retries: Option<u32>,
    pub properties: Properties,
    pub worker: String,
}

impl RetrySink {
    pub fn new(publisher: Publisher, subscription: &str, policy: &FailurePolicy, worker: &str) -> Self {
        Self {
            publisher,
            subscription: subscription.to_owned(),
            delays: topology::retry_delays(policy),
            max_retries: policy.max_retries,
            properties: Properties::default(),
            worker: worker.to_owned(),
        }
    }

    /// The republished copy of `r`, to the retry queue or the dead letters
    /// (`true`). Public for the fuzz targets (`fuzz/`).
    pub fn message(
        &self,
        r: &Record,
        why: &GaveUp,
        now_ms: u128,
        failed_at: &str,
    ) -> Result<(Message, bool), PublishError> {
        // Attempts before this delivery, and this one's.
        let before: u32 = r
            .headers
            .iter()
            .find(|(k, _)| k == headers::ATTEMPTS)
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse().ok())
            .unwrap_or(0);
        // Saturating: the header is whatever the publisher wrote.
        let attempts = before.saturating_add(why.attempts.max(1));
        let to_dlq = why.reason == Reason::TooOld || self.max_retries.is_some_and(|max| attempts > max);
        let ours =
            |k: &str| is_broker_header(k) || k == headers::ATTEMPTS || k == headers::ATTEMPTS_FAILED_AT;
        let kept = r.headers.iter().filter(|(k, _)| !ours(k));
        let mut table = field_table(kept.map(|(k, v)| (k.as_str(), v.as_slice())))?;
        let original = crate::lock(&self.properties).get(&(r.position() as u64)).cloned();
        if let Some(h) = original.as_ref().and_then(|p| p.headers().as_ref()) {
            // Keep the original header types (not the byte copies).
            for (k, v) in h.inner().iter().filter(|(k, _)| !ours(k.as_str())) {
                table.insert(k.clone(), v.clone());
            }
        }
        table.insert(headers::ATTEMPTS.into(), AMQPValue::LongLongInt(i64::from(attempts)));
        // When each attempt failed (Unix ms), oldest first: the retry
        // history travels with the message into the dead-letter queue.
        let history = match r.headers.iter().find(|(k, _)| k == headers::ATTEMPTS_FAILED_AT) {
            Some((_, before)) => format!("{},{now_ms}", String::from_utf8_lossy(before)),
            None => now_ms.to_string(),
        };
        table.insert(headers::ATTEMPTS_FAILED_AT.into(), AMQPValue::LongString(history.into()));
        table.insert(headers::ERROR.into(), AMQPValue::LongString(why.error.clone().into()));
        let (exchange, routing_key) = if to_dlq {
            for (k, v) in [
                (headers::REASON, why.reason.as_str()),
                (headers::FAILED_AT, failed_at),
                (headers::SOURCE_SUBSCRIPTION, self.subscription.as_str()),
                (headers::WORKER, self.worker.as_str()),
            ] {
                table.insert(k.into(), AMQPValue::LongString(v.to_owned().into()));
            }
            (topology::dead_letter_exchange(&self.subscription), String::new())
        } else {
            let delay = topology::retry_delay(&self.delays, attempts);
            (String::new(), topology::retry_queue(&self.subscription, delay))
        };
        // The original's properties, or (none kept) what the record says.
        let message = Message {
            exchange,
            routing_key,
            body: r.value.clone(),
            headers: table,
            message_id: r
                .key
                .as_ref()
                .filter(|_| original.is_none())
                .map(|k| String::from_utf8_lossy(k).into()),
            timestamp: original
                .as_ref()
                .map_or(r.timestamp_ms.map(|ms| (ms / 1000) as u64), |p| *p.timestamp()),
            properties: original.map(|p| p.with_headers(FieldTable::default())),
            unroutable_ok: false,
        };
        Ok((message, to_dlq))
    }
}

impl FailureSink for RetrySink {
    fn send<'a>(&'a self, _lease: &'a LeaseId, records: &'a [Arc<Record>], why: &'a GaveUp) -> Sent<'a> {
        Box::pin(async move {
            let now = std::time::SystemTime::now();
            let failed_at = humantime::format_rfc3339_millis(now).to_string();
            let now_ms = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
            let (mut messages, mut dead) = (Vec::with_capacity(records.len()), 0u64);
            for r in records {
                let (message, to_dlq) = self.message(r, why, now_ms, &failed_at)?;
                dead += u64::from(to_dlq);
                messages.push(message);
            }
            self.publisher.publish(&messages).await?;
            let subscription = self.subscription.clone();
            metrics::counter!("shardline_retries_total", "subscription" => subscription.clone())
                .increment(messages.len() as u64 - dead);
            metrics::counter!("shardline_dead_lettered_total", "subscription" => subscription)
                .increment(dead);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::Origin;
    use crate::sink::Reason;

    fn sink(max_retries: Option<u32>) -> RetrySink {
        let policy = FailurePolicy { max_retries, ..FailurePolicy::default() };
        RetrySink::new(Publisher::connect("amqp://127.0.0.1:1/%2f", "test"), "emails", &policy, "w0")
    }

    fn delivery(headers: Vec<(String, Vec<u8>)>) -> Record {
        Record {
            key: None,
            value: b"v".to_vec(),
            tombstone: false,
            headers,
            timestamp_ms: None,
            origin: Origin::Queue { slot: 0, delivery_tag: 1, redelivered: true },
            reply_to: None,
        }
    }

    /// `shardline.attempts` arrives with the message, so anyone who
    /// publishes may set it: u32::MAX attempts plus this one overflowed (a
    /// panic in debug builds; in release it wrapped to 0, and the message
    /// went back to the retry queue forever instead of the dead letters).
    #[test]
    fn a_huge_attempts_header_dead_letters_the_message() {
        let why = GaveUp { reason: Reason::RetriesExhausted, attempts: 1, error: "boom".into() };
        let r = delivery(vec![(headers::ATTEMPTS.to_owned(), u32::MAX.to_string().into_bytes())]);
        let sent = sink(Some(3)).message(&r, &why, 0, "then");
        let Ok((message, to_dlq)) = sent else { panic!("{sent:?}") };
        assert!(to_dlq, "retries are used up");
        assert_eq!(
            message.headers.inner().get(headers::ATTEMPTS),
            Some(&AMQPValue::LongLongInt(i64::from(u32::MAX)))
        );
        let r = delivery(vec![(headers::ATTEMPTS.to_owned(), b"2".to_vec())]);
        let sent = sink(Some(3)).message(&r, &why, 0, "then");
        assert!(sent.is_ok_and(|(_, to_dlq)| !to_dlq), "the third attempt may retry");
    }
}
