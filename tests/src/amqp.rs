//! Publishing test messages and reading receipts and dead letters on the
//! real RabbitMQ.
//!
//! Messages carry their id in the body (`id-<n>`) and as message id. The
//! `forward` handler (or `chaos` with `exchange`) publishes a receipt per
//! processed message to a fanout exchange; a queue bound to it collects
//! the receipts, and [`drain_queue`] reads them all.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use shardline_worker::amqp::{Message, Publisher};

/// The broker's URL; `SHARDLINE_AMQP_URL` overrides.
pub fn amqp_url() -> String {
    std::env::var("SHARDLINE_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub async fn connect() -> Result<Connection> {
    shardline_testkit::amqp::connect(&amqp_url(), "shardline-tests").await
}

pub async fn channel() -> Result<(Connection, Channel)> {
    let connection = connect().await?;
    let channel = connection.create_channel().await.context("channel")?;
    Ok((connection, channel))
}

/// A publisher with confirms, as producers use it.
pub fn publisher() -> Publisher {
    Publisher::connect(&amqp_url(), "shardline-tests")
}

/// Publishes `id-<from>..id-<to>` to `exchange`, 500 per confirm round;
/// returns once RabbitMQ confirmed (and routed) every one.
pub async fn publish_ids(publisher: &Publisher, exchange: &str, from: u64, to: u64) -> Result<()> {
    let mut n = from;
    while n < to {
        let end = (n + 500).min(to);
        let messages: Vec<Message> = (n..end)
            .map(|i| Message {
                exchange: exchange.to_owned(),
                body: format!("id-{i}").into_bytes(),
                message_id: Some(format!("id-{i}")),
                ..Message::default()
            })
            .collect();
        publisher
            .publish(&messages)
            .await
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("publish {n}..{end}"))?;
        n = end;
    }
    Ok(())
}

/// A durable fanout exchange with one durable queue bound to it (of the
/// same name plus `.q`): where receipts are collected.
pub async fn receipts_exchange(channel: &Channel, name: &str) -> Result<String> {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel.exchange_declare(name.into(), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
    let queue = format!("{name}.q");
    let q = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(queue.as_str().into(), q, FieldTable::default()).await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            name.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(queue)
}

/// One message read back, with its headers as text.
#[derive(Debug, Clone)]
pub struct Got {
    pub body: String,
    pub headers: BTreeMap<String, String>,
    pub redelivered: bool,
}

impl Got {
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.get(key).map(String::as_str)
    }

    /// The id of a message `id-<n>`.
    pub fn id(&self) -> Option<u64> {
        self.body.strip_prefix("id-")?.parse().ok()
    }
}

fn text(v: &AMQPValue) -> String {
    String::from_utf8_lossy(&shardline_worker::amqp::header_bytes(v)).into_owned()
}

/// Reads (and acks) messages from `queue` until `want` were read and the
/// queue was quiet for `quiet`, or `timeout` passes.
pub async fn drain_queue(queue: &str, want: usize, quiet: Duration, timeout: Duration) -> Result<Vec<Got>> {
    let (_connection, channel) = channel().await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .with_context(|| format!("consume {queue}"))?;
    let started = Instant::now();
    let mut got = Vec::new();
    let mut last = Instant::now();
    while started.elapsed() < timeout {
        if got.len() >= want && last.elapsed() >= quiet {
            break;
        }
        let next = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await;
        let Ok(Some(delivery)) = next else { continue };
        let d = delivery.context("consume")?;
        let headers = d
            .properties
            .headers()
            .as_ref()
            .map(|h| h.inner().iter().map(|(k, v)| (k.as_str().to_owned(), text(v))).collect())
            .unwrap_or_default();
        got.push(Got {
            body: String::from_utf8_lossy(&d.data).into_owned(),
            headers,
            redelivered: d.redelivered,
        });
        d.acker.ack(BasicAckOptions::default()).await?;
        last = Instant::now();
    }
    Ok(got)
}

/// Ready messages in `queue` (a passive declare).
pub async fn depth(queue: &str) -> Result<u32> {
    let connection = connect().await?;
    let depth = shardline_testkit::amqp::depth(&connection, queue).await?;
    Ok(u32::try_from(depth.ready)?)
}

/// Deletes queues left by a test (retry and dead-letter queues too).
pub async fn delete_queues(names: &[String]) -> Result<()> {
    shardline_testkit::amqp::delete(&connect().await?, names, &[]).await
}

/// Receipts per id: how often each was processed.
pub fn counts(receipts: &[Got]) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for r in receipts {
        if let Some(id) = r.id() {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

/// Runs `rabbitmqctl ARGS` (stop_app, start_app, ...).
pub fn rabbitmqctl(args: &[&str]) -> Result<()> {
    let status = std::process::Command::new("rabbitmqctl").args(args).status().context("run rabbitmqctl")?;
    if !status.success() {
        bail!("rabbitmqctl {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// Deletes the queues a test made when dropped, however the test ends, so a
/// failing test leaves nothing behind on a shared broker: queues that pile
/// up over many runs (a quorum queue is a Raft member with its own process
/// and log, restarted at every broker boot) slow a small broker down.
pub struct QueueCleanup(pub Vec<String>);

impl Drop for QueueCleanup {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            eprintln!("cleanup: no tokio runtime; left queues {names:?}");
            return;
        };
        // Drop cannot await; the tests run on the multi-threaded runtime.
        let result = tokio::task::block_in_place(|| runtime.block_on(delete_queues(&names)));
        if let Err(e) = result {
            eprintln!("cleanup: cannot delete queues {names:?}: {e:#}");
        }
    }
}

/// The OS pid of the RabbitMQ node's Erlang VM (`beam.smp`).
pub fn rabbitmq_pid() -> Result<i32> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["eval", "list_to_integer(os:getpid())."])
        .output()
        .context("run rabbitmqctl eval")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().with_context(|| format!("RabbitMQ's pid from `{}`", text.trim()))
}

/// `kill -9` of the RabbitMQ node's Erlang VM: a crash, not a shutdown
/// (nothing is flushed, no queue is stopped cleanly). Returns once it is gone.
pub fn kill9_rabbitmq() -> Result<()> {
    let pid = rabbitmq_pid()?;
    // SAFETY: kill(2) on a pid read from the broker itself; no memory involved.
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    if rc != 0 {
        bail!("kill -9 {pid} failed: {}", std::io::Error::last_os_error());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            bail!("RabbitMQ (pid {pid}) still there 10 s after kill -9");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Does RabbitMQ accept AMQP connections (and so has finished booting)?
/// Blocking; callable from sync code and from `Drop` inside a runtime.
pub fn rabbitmq_answers() -> bool {
    // Its own thread and runtime: a runtime cannot block on another inside
    // the caller's.
    let probe = std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return false;
        };
        runtime.block_on(async {
            let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(5), connect()).await else {
                return false;
            };
            c.close(200, "probe".into()).await.is_ok()
        })
    });
    probe.join().unwrap_or(false)
}

/// Starts RabbitMQ (`rabbitmq-server -detached`) unless it answers, and
/// waits until it accepts connections, up to `timeout`.
pub fn start_rabbitmq(timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    if rabbitmq_answers() {
        return Ok(Duration::ZERO);
    }
    // A node that still runs (app stopped, booting) must not be started twice.
    let node_up = std::process::Command::new("rabbitmqctl")
        .args(["-q", "ping"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !node_up {
        let mut command = std::process::Command::new("rabbitmq-server");
        command.arg("-detached");
        // The broker must not inherit our descriptors: run under `flock
        // LOCKFILE cargo test`, this process holds the lock on an inherited
        // descriptor, and a broker that kept it would hold the lock for as
        // long as it runs, blocking every other user of the lock.
        // Marked close-on-exec rather than closed, so the pipe std uses to
        // report a failed exec keeps working.
        // SAFETY: only fcntl(2), which is async-signal-safe, runs between
        // fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                for fd in 3..1024 {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
                Ok(())
            });
        }
        let status = command.status().context("run rabbitmq-server -detached")?;
        if !status.success() {
            bail!("rabbitmq-server -detached failed: {status}");
        }
    }
    while started.elapsed() < timeout {
        if rabbitmq_answers() {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("RabbitMQ did not answer within {timeout:?} of starting it")
}

/// Brings RabbitMQ back when dropped (a test that kills it may fail before
/// it restarts it), and waits until it answers, so later tests and other
/// users of the broker find it up.
pub struct RabbitmqGuard;

impl Drop for RabbitmqGuard {
    fn drop(&mut self) {
        // Off the async workers: starting and probing block for seconds.
        let restart = || start_rabbitmq(Duration::from_secs(180));
        let result = match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(restart),
            Err(_) => restart(),
        };
        if let Err(e) = result {
            eprintln!("RabbitMQ guard: cannot bring RabbitMQ back: {e:#}");
        }
    }
}
