//! RabbitMQ for the harnesses: named connections, one channel per call,
//! queue depths, and deleting what a run declared (the coordinator's
//! topology of a subscription included).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use shardline_config::ClientTls;
use shardline_proto::{FailurePolicy, topology};

/// How long the broker gets for one connection, declaration or deletion.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A connection named `name`, so RabbitMQ's connection list tells the
/// harness's apart from the workers' and the coordinator's.
pub async fn connect(url: &str, name: &str) -> Result<Connection> {
    connect_tls(url, None, name).await
}

/// The same, through `amqp_tls` for an `amqps://` URL: the path every
/// AMQP connection of the worker and the coordinator takes.
pub async fn connect_tls(url: &str, tls: Option<&ClientTls>, name: &str) -> Result<Connection> {
    tokio::time::timeout(TIMEOUT, shardline_config::amqp::connect(url, tls, name))
        .await
        .with_context(|| format!("RabbitMQ did not accept a connection within {TIMEOUT:?}"))?
        .with_context(|| {
            format!(
                "cannot connect to RabbitMQ at {} (running? scripts/brokers.sh up)",
                without_password(url)
            )
        })
}

/// `url` with the password left out, for messages.
pub fn without_password(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://…@{host}"),
        _ => url.to_owned(),
    }
}

/// Runs `f` on a fresh channel and closes it: RabbitMQ closes a channel on
/// any refused call (a passive declare of a missing queue, say), so one
/// channel per call keeps a failure from spoiling the next call.
pub async fn with_channel<T>(
    connection: &Connection,
    f: impl AsyncFnOnce(&Channel) -> Result<T, lapin::Error>,
) -> Result<T> {
    let call = async {
        let channel = connection.create_channel().await?;
        let result = f(&channel).await;
        if channel.status().connected()
            && let Err(e) = channel.close(200, "done".into()).await
        {
            // The result is known; a channel that cannot close dies with
            // the connection.
            eprintln!("warning: cannot close a channel: {e}");
        }
        result
    };
    tokio::time::timeout(TIMEOUT, call)
        .await
        .with_context(|| format!("RabbitMQ did not answer within {TIMEOUT:?}"))?
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
pub async fn depth(connection: &Connection, queue: &str) -> Result<Depth> {
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let q = with_channel(connection, async |ch| {
        ch.queue_declare(queue.into(), passive, FieldTable::default()).await
    })
    .await
    .with_context(|| format!("cannot read the depth of queue {queue}"))?;
    Ok(Depth { ready: u64::from(q.message_count()), consumers: q.consumer_count() })
}

/// Deletes its queues, then its exchanges, when dropped, however a test
/// ends: a failing test leaves nothing on the shared broker (queues that
/// pile up over many runs slow a small broker down: a quorum queue is a
/// Raft member with its own process and log, restarted at every boot).
pub struct Cleanup {
    url: String,
    pub queues: Vec<String>,
    pub exchanges: Vec<String>,
}

impl Cleanup {
    pub fn new(url: &str) -> Self {
        Self { url: url.to_owned(), queues: Vec::new(), exchanges: Vec::new() }
    }

    /// Adds what the coordinator declares for subscription `s` under
    /// `policy`: its queue, dead-letter and retry queues, and its
    /// dead-letter exchange.
    pub fn subscription(mut self, s: &str, policy: &FailurePolicy) -> Self {
        self.queues.extend(topology::queues(s, policy));
        self.exchanges.push(topology::dead_letter_exchange(s));
        self
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (queues, exchanges) = (&self.queues, &self.exchanges);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            eprintln!("cleanup: no tokio runtime; left {queues:?} {exchanges:?}");
            return;
        };
        let work = async { delete(&connect(&self.url, "cleanup").await?, queues, exchanges).await };
        // Drop cannot await; the tests run on the multi-threaded runtime.
        if let Err(e) = tokio::task::block_in_place(|| runtime.block_on(work)) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Deletes `queues` and then `exchanges`, each on its own channel so one
/// failure does not stop the rest; fails naming everything left.
pub async fn delete(connection: &Connection, queues: &[String], exchanges: &[String]) -> Result<()> {
    let mut left = Vec::new();
    for queue in queues {
        let result = with_channel(connection, async |ch| {
            ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await
        })
        .await;
        if let Err(e) = result {
            left.push(format!("queue {queue} ({e:#})"));
        }
    }
    for exchange in exchanges {
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
    fn a_subscriptions_clean_up_is_the_coordinators_topology() {
        let mut cleanup = Cleanup::new("amqp://127.0.0.1").subscription("q", &FailurePolicy::default());
        let (queues, exchanges) =
            (std::mem::take(&mut cleanup.queues), std::mem::take(&mut cleanup.exchanges));
        assert_eq!(&queues[..2], ["q", "q.dlq"]);
        assert!(queues[2..].iter().all(|q| q.starts_with("q.retry.")), "{queues:?}");
        assert!(queues.contains(&"q.retry.100ms".to_owned()), "the default first delay: {queues:?}");
        assert_eq!(exchanges, [topology::dead_letter_exchange("q")]);
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(without_password("amqp://guest:secret@127.0.0.1:5672/%2f"), "amqp://…@127.0.0.1:5672/%2f");
        assert_eq!(without_password("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
