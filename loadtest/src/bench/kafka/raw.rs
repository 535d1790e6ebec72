//! The baseline: a plain rdkafka consumer in this process reading the topic
//! as fast as the broker serves it. Partitions are assigned by hand from the
//! beginning (no group, no commits), records are only counted: this is the
//! ceiling any consumer on this broker and machine can reach, so shardline's
//! rate is judged against it rather than against a number from elsewhere.
//!
//! The consumer polls on a blocking thread (`BaseConsumer`), the cheapest
//! way to drain librdkafka's queue; a stop flag lets an interrupted run end
//! it within one poll.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use shardline_testkit::kafka::KafkaAccess;

use super::topic;
use crate::bench::compare::{POLL, RawFigures};
use crate::stats::ProcCpu;

/// Sets the flag when dropped: the blocking consumer sees it at its next
/// poll, so dropping the future (an interrupted run) stops the thread too.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Reads `expected` records from every partition of `topic`. `overrides`
/// are extra librdkafka properties (`key=value`), for comparing settings.
pub async fn run(
    kafka: &KafkaAccess,
    topic: &str,
    partitions: u32,
    expected: u64,
    overrides: &[(String, String)],
    stall: Duration,
    broker_pid: Option<u32>,
) -> anyhow::Result<RawFigures> {
    let mut config = kafka.client_config()?;
    config
        // Required by librdkafka even for manual assignment; never joined.
        .set("group.id", format!("shardline-bench-raw-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest");
    for (key, value) in overrides {
        config.set(key, value);
    }
    let tpl = topic::all_from_beginning(topic, partitions)?;
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(stop.clone());
    let cpu = ProcCpu::start(std::process::id());
    let broker_cpu = broker_pid.map(ProcCpu::start);
    let consume = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let consumer: BaseConsumer = config.create().context("cannot create the raw consumer")?;
        consumer.assign(&tpl).context("cannot assign the partitions")?;
        let mut count = 0u64;
        let mut payload_bytes = 0u64;
        let mut first = None;
        // `(time, count)` about one sampling interval after the first
        // record, the way the shardline side samples checkpoints: the first
        // fetch response (thousands of records) arrives at once and must not
        // count as read in no time.
        let mut steady_from = None;
        let mut last_progress = Instant::now();
        while count < expected {
            if stop.load(Ordering::Relaxed) {
                bail!("stopped after {count} of {expected} records");
            }
            // Polls no longer than the sampling interval, so the sample
            // below is taken on time even while no record arrives.
            let polled = consumer.poll(POLL);
            let now = started.elapsed();
            if steady_from.is_none() && first.is_some_and(|first| now >= first + POLL) {
                steady_from = Some((now, count));
            }
            match polled {
                Some(Ok(m)) => {
                    count += 1;
                    payload_bytes += m.payload_len() as u64;
                    first.get_or_insert(now);
                    last_progress = Instant::now();
                }
                // Transient (a broker hiccup): librdkafka retries by itself;
                // a real failure shows as a stall below.
                Some(Err(e)) => eprintln!("warning: raw consumer: {e}"),
                None if last_progress.elapsed() > stall => {
                    bail!("the raw consumer read {count} of {expected} records, then nothing for {stall:?}")
                }
                None => {}
            }
        }
        let elapsed = started.elapsed();
        Ok((elapsed, first.unwrap_or_default(), steady_from.unwrap_or((elapsed, count)), payload_bytes))
    });
    let (elapsed, first, (steady_at, steady_count), payload_bytes) =
        consume.await.context("the raw consumer panicked")??;
    let seconds = elapsed.as_secs_f64();
    let steady = elapsed.saturating_sub(steady_at).as_secs_f64();
    Ok(RawFigures {
        seconds,
        per_s: expected as f64 / seconds.max(1e-9),
        first_s: first.as_secs_f64(),
        steady_per_s: if steady > 0.0 { expected.saturating_sub(steady_count) as f64 / steady } else { 0.0 },
        payload_bytes,
        batches: None,
        redelivered: None,
        cores: cpu.cores(),
        broker_cores: broker_cpu.and_then(|c| c.cores()),
    })
}
