//! The benchmark's RabbitMQ side: fresh names (so no earlier run's messages
//! or slot leases leak in), publishing with confirms through the worker's
//! own [`Publisher`], the subscription queue's depth, and deleting
//! everything the run declared (the coordinator's topology included).

use anyhow::bail;
use lapin::Connection;
use shardline_proto::{FailurePolicy, topology};
pub use shardline_testkit::amqp::{self, connect, depth, without_password};
use shardline_worker::amqp::{Message, Publisher};
use tokio::time::Instant;

/// Messages per publish call: each call waits for all its confirms, so a
/// chunk keeps enough in flight to hide the round trip while bounding what
/// a failure leaves unconfirmed.
const CHUNK: u64 = 1000;

/// The topic exchange and the subscription queue of one run.
#[derive(Debug, Clone)]
pub struct Names {
    /// The fanout exchange producers publish to (`[[topics]]`).
    pub topic: String,
    /// The subscription queue (`[[subscriptions]]`), also the slot lease name.
    pub queue: String,
}

impl Names {
    /// Names no earlier run used; only characters the coordinator's config
    /// allows for topics and subscriptions.
    pub fn unique() -> Self {
        let queue = shardline_testkit::unique("shardline-bench-amqp");
        Self { topic: format!("{queue}-topic"), queue }
    }

    /// Every exchange the run declares: the topic and the dead-letter one.
    pub fn exchanges(&self) -> Vec<String> {
        vec![self.topic.clone(), topology::dead_letter_exchange(&self.queue)]
    }
}

/// What publishing measured.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    pub seconds: f64,
    pub per_s: f64,
}

/// Publishes `messages` persistent messages of `size` bytes to `exchange`,
/// [`CHUNK`] at a time, each chunk confirmed and routed before the next.
pub async fn publish(
    publisher: &Publisher,
    exchange: &str,
    messages: u64,
    size: usize,
) -> anyhow::Result<Published> {
    let mut body = vec![b'x'; size];
    let started = Instant::now();
    let mut next = 0u64;
    while next < messages {
        let end = (next + CHUNK).min(messages);
        let chunk: Vec<Message> = (next..end)
            .map(|i| {
                // The index at the front keeps bodies distinct (nothing
                // downstream can deduplicate or compress them away).
                let digits = i.to_string();
                let n = digits.len().min(body.len());
                body[..n].copy_from_slice(&digits.as_bytes()[..n]);
                Message { exchange: exchange.to_owned(), body: body.clone(), ..Message::default() }
            })
            .collect();
        publisher
            .publish(&chunk)
            .await
            .map_err(|e| anyhow::anyhow!("messages {next}..{end} were not confirmed: {e}"))?;
        next = end;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Published { seconds, per_s: messages as f64 / seconds.max(1e-9) })
}

/// Fails unless `queue` holds exactly `expected` ready messages: a count
/// off here would make every rate after it wrong.
pub async fn check_depth(connection: &Connection, queue: &str, expected: u64) -> anyhow::Result<()> {
    let d = depth(connection, queue).await?;
    if d.ready != expected {
        bail!("queue {queue} holds {} ready messages where {expected} were confirmed", d.ready);
    }
    Ok(())
}

/// Empties `queue` after a consumer closed, and checks that it stays
/// empty; how many messages it held. A quorum queue can put back messages
/// whose acks were sent just before the consumer's connection closed (the
/// close reaches the queue before the acks are applied), so the baseline's
/// last batch may come back although it was counted: those are purged, not
/// taken for a count off. Waits for the consumer to be gone first, so
/// nothing more comes back after the purge.
pub async fn purge_leftovers(connection: &Connection, queue: &str) -> anyhow::Result<u64> {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let d = depth(connection, queue).await?;
        if d.consumers == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("queue {queue} still has {} consumers 30 s after the baseline closed", d.consumers);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut purged = 0;
    // Purged until two reads a little apart find it empty.
    for _ in 0..20 {
        let n = amqp::with_channel(connection, async |ch| {
            ch.queue_purge(queue.into(), lapin::options::QueuePurgeOptions::default()).await
        })
        .await?;
        purged += u64::from(n);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        if depth(connection, queue).await?.ready == 0 {
            return Ok(purged);
        }
    }
    bail!(
        "queue {queue} keeps filling up after purges ({purged} purged): is something else publishing to it?"
    )
}

/// Deletes every queue and exchange of the run (the coordinator's
/// topology of the subscription included).
pub async fn delete(connection: &Connection, names: &Names) -> anyhow::Result<()> {
    let queues = topology::queues(&names.queue, &FailurePolicy::default());
    amqp::delete(connection, &queues, &names.exchanges()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_the_coordinators_exchanges() {
        let names = Names { topic: "t".into(), queue: "q".into() };
        assert_eq!(names.exchanges(), ["t", "q.dlx"]);
    }

    #[test]
    fn unique_names_are_valid_subscription_names() {
        let names = Names::unique();
        for name in [&names.topic, &names.queue] {
            assert!(
                name.len() <= 200 && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            );
        }
        assert_ne!(names.topic, names.queue);
    }
}
