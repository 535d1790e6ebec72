//! The benchmark's RabbitMQ side: fresh names (so no earlier run's messages
//! or slot leases leak in), publishing with confirms through the worker's
//! own [`Publisher`], the subscription queue's depth, and deleting
//! everything the run declared (the coordinator's topology included).

use std::time::Duration;

use anyhow::{Context, bail};
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use shardline_proto::{FailurePolicy, topology};
use shardline_worker::amqp::{Message, Publisher};
use tokio::time::Instant;

/// Messages per publish call: each call waits for all its confirms, so a
/// chunk keeps enough in flight to hide the round trip while bounding what
/// a failure leaves unconfirmed.
const CHUNK: u64 = 1000;
/// How long the broker gets for one declaration or deletion.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

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
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let queue = format!("shardline-bench-amqp-{}-{nanos}", std::process::id());
        Self { topic: format!("{queue}-topic"), queue }
    }

    /// Every queue the coordinator declares for the subscription: the queue,
    /// its dead-letter queue and one retry queue per delay of the default
    /// failure policy (the bench's subscription sets no retry settings).
    pub fn queues(&self) -> Vec<String> {
        let mut queues = vec![self.queue.clone(), topology::dead_letter_queue(&self.queue)];
        queues.extend(
            topology::retry_delays(&FailurePolicy::default())
                .into_iter()
                .map(|delay| topology::retry_queue(&self.queue, delay)),
        );
        queues
    }

    /// Every exchange the run declares: the topic and the dead-letter one.
    pub fn exchanges(&self) -> Vec<String> {
        vec![self.topic.clone(), topology::dead_letter_exchange(&self.queue)]
    }
}

/// A connection of the harness's own, named so it can be told apart from
/// the worker's and the coordinator's in RabbitMQ's connection list.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    tokio::time::timeout(CALL_TIMEOUT, Connection::connect(url, props))
        .await
        .with_context(|| format!("RabbitMQ did not accept a connection within {CALL_TIMEOUT:?}"))?
        .with_context(|| format!("cannot connect to RabbitMQ at {}", without_password(url)))
}

/// `url` with the password left out, for error messages.
pub fn without_password(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://…@{host}"),
        _ => url.to_owned(),
    }
}

/// Runs `f` on a fresh channel and closes it: RabbitMQ closes a channel on
/// any refused call (a passive declare of a missing queue, say), so one
/// channel per call keeps a failure from spoiling the next call.
pub(crate) async fn with_channel<T>(
    connection: &Connection,
    f: impl AsyncFnOnce(&Channel) -> Result<T, lapin::Error>,
) -> anyhow::Result<T> {
    let call = async {
        let channel = connection.create_channel().await?;
        let result = f(&channel).await;
        if channel.status().connected() {
            // The result is known; a failed close changes nothing about it.
            let _ = channel.close(200, "done".into()).await;
        }
        result
    };
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .with_context(|| format!("RabbitMQ did not answer within {CALL_TIMEOUT:?}"))?
        .map_err(anyhow::Error::from)
}

/// A queue as a passive declare reports it.
#[derive(Debug, Clone, Copy)]
pub struct Depth {
    /// Ready messages (delivered but unacknowledged ones are not counted).
    pub ready: u64,
    pub consumers: u32,
}

/// Reads `queue` with a passive declare, which never creates anything.
pub async fn depth(connection: &Connection, queue: &str) -> anyhow::Result<Depth> {
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let q = with_channel(connection, async |ch| {
        ch.queue_declare(queue.into(), passive, FieldTable::default()).await
    })
    .await
    .with_context(|| format!("cannot read the depth of queue {queue}"))?;
    Ok(Depth { ready: u64::from(q.message_count()), consumers: q.consumer_count() })
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

/// Deletes every queue and exchange of the run, each on its own channel
/// so one failure does not stop the rest; fails naming what is left.
pub async fn delete(connection: &Connection, names: &Names) -> anyhow::Result<()> {
    let mut left = Vec::new();
    for queue in names.queues() {
        let result = with_channel(connection, async |ch| {
            ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await
        })
        .await;
        if let Err(e) = result {
            left.push(format!("queue {queue} ({e:#})"));
        }
    }
    for exchange in names.exchanges() {
        let result = with_channel(connection, async |ch| {
            ch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await
        })
        .await;
        if let Err(e) = result {
            left.push(format!("exchange {exchange} ({e:#})"));
        }
    }
    if !left.is_empty() {
        bail!("cannot delete {}", left.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_the_coordinators_topology() {
        let names = Names { topic: "t".into(), queue: "q".into() };
        let queues = names.queues();
        assert_eq!(&queues[..2], ["q", "q.dlq"]);
        assert!(queues[2..].iter().all(|q| q.starts_with("q.retry.")), "{queues:?}");
        assert!(queues.contains(&"q.retry.100ms".to_owned()), "the default first delay: {queues:?}");
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

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(without_password("amqp://guest:secret@127.0.0.1:5672/%2f"), "amqp://…@127.0.0.1:5672/%2f");
        assert_eq!(without_password("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
