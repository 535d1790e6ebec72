//! The baseline: a plain lapin consumer in this process draining the
//! subscription queue as fast as RabbitMQ delivers, consuming the way a
//! queue slot does and nothing more: prefetch twice the batch size, batches
//! cut from what is already buffered (`batch_window = 0`), one multiple-ack
//! per batch. Messages are only counted, so this is the ceiling any
//! consumer with these settings reaches on this broker and machine, and
//! shardline's rate is judged against it rather than a number from
//! elsewhere.

use std::time::Duration;

use anyhow::{Context, bail};
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::time::Instant;

use super::queue;
use crate::bench::compare::RawFigures;
use crate::stats::ProcCpu;

/// What the baseline consumes.
pub struct Settings<'a> {
    pub url: &'a str,
    pub queue: &'a str,
    /// Messages to consume before stopping.
    pub expected: u64,
    pub batch_size: u32,
    /// Fail when nothing arrives for this long.
    pub stall: Duration,
    pub broker_pid: Option<u32>,
}

/// What the consume loop counted; times are since connecting.
struct Consumed {
    first: Duration,
    last: Duration,
    batches: u64,
    payload_bytes: u64,
    redelivered: u64,
}

pub async fn run(s: &Settings<'_>) -> anyhow::Result<RawFigures> {
    let prefetch = u16::try_from(s.batch_size.saturating_mul(2)).unwrap_or(u16::MAX);
    let cpu = ProcCpu::start(std::process::id());
    let broker_cpu = s.broker_pid.map(ProcCpu::start);
    let started = Instant::now();
    let connection = queue::connect(s.url, "shardline-bench-raw").await?;
    let consumed = async {
        let channel = connection.create_channel().await.context("cannot open a channel")?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.context("basic.qos failed")?;
        let mut consumer = channel
            .basic_consume(s.queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .with_context(|| format!("basic.consume on {} failed", s.queue))?;
        let consumed = consume(&channel, &mut consumer, s, started).await?;
        // A synchronous round trip after the last ack: once the cancel is
        // confirmed the broker has taken every ack sent before it, so
        // closing does not put the last batch back (see
        // `queue::purge_leftovers`, which still checks).
        let tag = consumer.tag();
        channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
            .context("basic.cancel failed")?;
        Ok::<_, anyhow::Error>(consumed)
    }
    .await;
    // Closed before returning, success or not: the worker must be the
    // queue's only consumer, and anything still unacknowledged goes back.
    if let Err(e) = connection.close(200, "baseline done".into()).await {
        eprintln!("warning: cannot close the raw consumer's connection: {e}");
    }
    let c = consumed?;
    let seconds = c.last.as_secs_f64();
    let steady = c.last.saturating_sub(c.first).as_secs_f64();
    Ok(RawFigures {
        seconds,
        per_s: s.expected as f64 / seconds.max(1e-9),
        first_s: c.first.as_secs_f64(),
        // The first delivery marks the start, so it is not counted.
        steady_per_s: if steady > 0.0 { s.expected.saturating_sub(1) as f64 / steady } else { 0.0 },
        batches: Some(c.batches),
        payload_bytes: c.payload_bytes,
        redelivered: Some(c.redelivered),
        cores: cpu.cores(),
        broker_cores: broker_cpu.and_then(|c| c.cores()),
    })
}

/// Batches until `expected` messages are acked.
async fn consume(
    channel: &Channel,
    consumer: &mut Consumer,
    s: &Settings<'_>,
    started: Instant,
) -> anyhow::Result<Consumed> {
    let batch_size = u64::from(s.batch_size.max(1));
    let mut count = 0u64;
    let mut c = Consumed {
        first: Duration::ZERO,
        last: Duration::ZERO,
        batches: 0,
        payload_bytes: 0,
        redelivered: 0,
    };
    while count < s.expected {
        // The batch's first message is waited for; the rest are only what
        // is already buffered, as a queue slot with `batch_window = 0`.
        let delivery = match tokio::time::timeout(s.stall, consumer.next()).await {
            Ok(Some(delivery)) => delivery.context("the consumer failed")?,
            Ok(None) => bail!("the broker cancelled the consumer after {count} of {} messages", s.expected),
            Err(_) => bail!(
                "the raw consumer got {count} of {} messages, then nothing for {:?}",
                s.expected,
                s.stall
            ),
        };
        if count == 0 {
            c.first = started.elapsed();
        }
        let mut n = 1;
        let mut last_tag = delivery.delivery_tag;
        c.payload_bytes += delivery.data.len() as u64;
        c.redelivered += u64::from(delivery.redelivered);
        while n < batch_size && count + n < s.expected {
            match consumer.next().now_or_never() {
                Some(Some(delivery)) => {
                    let delivery = delivery.context("the consumer failed")?;
                    n += 1;
                    last_tag = delivery.delivery_tag;
                    c.payload_bytes += delivery.data.len() as u64;
                    c.redelivered += u64::from(delivery.redelivered);
                }
                // Nothing buffered, or the consumer ended (the next wait
                // above reports that): the batch is what we have.
                Some(None) | None => break,
            }
        }
        channel.basic_ack(last_tag, BasicAckOptions { multiple: true }).await.context("basic.ack failed")?;
        count += n;
        c.batches += 1;
    }
    c.last = started.elapsed();
    Ok(c)
}
