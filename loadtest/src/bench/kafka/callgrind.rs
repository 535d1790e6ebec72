//! `bench kafka --callgrind`: instructions per record of the worker's
//! record path and of the raw consumer, counted by valgrind's callgrind on
//! a fixed input. Wall-clock rates on a shared two-core machine move by
//! tens of percent between runs; an instruction count of the same work does
//! not, so this is the figure to compare changes of the hot path by.
//!
//! One run: a fresh topic gets `--records` records; then each side runs
//! as a child of this binary under `valgrind --tool=callgrind` (the hidden
//! `--callgrind-side`), reads every record once, and prints what it read.
//! What makes the count repeatable:
//! - each side first waits until librdkafka has fetched *every* record
//!   into its queues (`queued.min.messages` and the buffer sized for the
//!   whole topic), and only then starts counting, so no read finds an empty
//!   queue and batches are cut the same way every time;
//! - only the reading thread's work is counted (`--toggle-collect` on one
//!   function per side): librdkafka's fetcher threads, whose work depends
//!   on how fetch responses happen to be split, are left out on both sides;
//! - the worker side is the real driver ([`LeaseTask::run`]: batcher,
//!   policy with the `noop` handler, tracker, per-batch accounting) on the
//!   real [`PartitionReader`], one lease per partition; only the
//!   coordinator is left out (the finalizer records the finished position
//!   instead of sending checkpoints).
//!
//! [`PartitionReader`]: shardline_worker::source::kafka::PartitionReader

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;
use shardline_proto::{LeaseId, Mapping, Start};
use shardline_testkit::kafka::{self, KafkaAccess};
use shardline_worker::builtin::Noop;
use shardline_worker::driver::{LeaseStats, LeaseTask, UsageMeter};
use shardline_worker::policy::Hooks;
use shardline_worker::sink::{Discard, FailureSink};
use shardline_worker::source::kafka::{ConsumerSettings, KafkaSource, PartitionReader};
use shardline_worker::source::{End, Exit, Finalizer, Lease, Opened, Source};
use tokio_util::sync::CancellationToken;

use super::{Args, topic};

/// Which consumer a child counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    Raw,
    Worker,
}

/// The functions whose calls are counted (callgrind's `--toggle-collect`):
/// the one that drains the raw consumer, and the poll of the worker's lease
/// tasks. Nothing else matches them.
const COUNTED: [&str; 2] = ["*callgrind_counted_drain*", "*CallgrindCounted*poll*"];
/// How long a child waits for librdkafka to have fetched every record.
const PREFETCH_TIMEOUT: Duration = Duration::from_secs(300);
/// What a child prints for the parent: records read, reads that found no
/// record buffered.
const REPORT: &str = "callgrind-side:";

/// The parent: produces the input, runs both sides under callgrind and
/// prints instructions per record.
pub async fn run(args: &Args, access: &KafkaAccess) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let topic = topic::unique_name();
    println!(
        "kafka callgrind: topic {topic}, {} partitions, {} records of {} B, batch_size {}",
        args.partitions, args.records, args.record_bytes, args.batch_size
    );
    kafka::create_topic(access, &topic, args.partitions, false).await?;
    let result = async {
        let record_bytes = usize::try_from(args.record_bytes).context("--record-bytes is too large")?;
        topic::produce(access, &topic, args.records, record_bytes).await.context("producing failed")?;
        let dir = tempfile::tempdir().context("cannot make a directory for callgrind's output")?;
        let mut figures = Vec::new();
        for side in [Side::Raw, Side::Worker] {
            let mut runs = Vec::new();
            for run in 0..args.callgrind_runs {
                let out = dir.path().join(format!("{side:?}.{run}.out"));
                let counted = child(&exe, args, &topic, side, &out).await?;
                println!(
                    "  {side:?} run {}: {} instructions, {:.0} per record",
                    run + 1,
                    counted.instructions,
                    counted.per_record(args.records)
                );
                runs.push(counted);
            }
            figures.push((side, runs));
        }
        Ok::<_, anyhow::Error>(figures)
    }
    .await;
    if args.delete_topic
        && let Err(e) = kafka::delete_topic(access, &topic).await
    {
        eprintln!("warning: {e:#}");
    }
    let figures = result?;
    let per_record = |side: Side| -> Vec<f64> {
        figures
            .iter()
            .filter(|(s, _)| *s == side)
            .flat_map(|(_, runs)| runs.iter().map(|c| c.per_record(args.records)))
            .collect()
    };
    let (raw, worker) = (per_record(Side::Raw), per_record(Side::Worker));
    let median = |v: &[f64]| {
        let mut sorted = v.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
    };
    let spread = |v: &[f64]| {
        let (min, max) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(*x), b.max(*x)));
        format!("{:.0} (min {min:.0}, max {max:.0})", median(v))
    };
    println!();
    println!("instructions per record (callgrind, reading thread only, everything prefetched):");
    super::row("raw rdkafka consumer", spread(&raw));
    super::row("shardline worker record path", spread(&worker));
    let ratio = median(&worker) / median(&raw).max(1e-9);
    super::row("ratio worker / raw", format!("{ratio:.2}"));
    if let Some(path) = &args.common.json {
        let report = json!({
            "topic": topic,
            "records": args.records,
            "partitions": args.partitions,
            "record_bytes": args.record_bytes,
            "batch_size": args.batch_size,
            "raw_instructions_per_record": raw,
            "worker_instructions_per_record": worker,
            "ratio": ratio,
        });
        let text = serde_json::to_string_pretty(&report).context("cannot encode the JSON report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

/// One side's count.
struct Counted {
    instructions: u64,
}

impl Counted {
    fn per_record(&self, records: u64) -> f64 {
        self.instructions as f64 / records.max(1) as f64
    }
}

/// Runs one side under callgrind and reads its count.
async fn child(exe: &Path, args: &Args, topic: &str, side: Side, out: &Path) -> anyhow::Result<Counted> {
    let mut command = tokio::process::Command::new("valgrind");
    command
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .args(COUNTED.iter().map(|f| format!("--toggle-collect={f}")))
        .arg(exe)
        .args(["bench", "kafka", "--callgrind-side"])
        .arg(match side {
            Side::Raw => "raw",
            Side::Worker => "worker",
        })
        .args(["--callgrind-topic", topic])
        .arg(format!("--records={}", args.records))
        .arg(format!("--partitions={}", args.partitions))
        .arg(format!("--batch-size={}", args.batch_size))
        .arg(format!("--brokers={}", args.brokers))
        .args(args.kafka_properties.iter().map(|p| format!("--kafka-property={p}")))
        .kill_on_drop(true);
    let output = command.output().await.context("cannot run valgrind (is it installed?)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "the {side:?} side under callgrind failed ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(REPORT))
        .with_context(|| format!("the {side:?} side printed no `{REPORT}` line:\n{stdout}"))?;
    let read: u64 = line.trim().parse().with_context(|| format!("`{line}` is not a record count"))?;
    if read != args.records {
        bail!("the {side:?} side read {read} records of {}", args.records);
    }
    let text = std::fs::read_to_string(out).with_context(|| format!("cannot read {}", out.display()))?;
    Ok(Counted { instructions: total_instructions(&text)? })
}

/// The `Ir` total of a callgrind output file (its `totals:` line, else the
/// `summary:` line).
fn total_instructions(text: &str) -> anyhow::Result<u64> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("totals:"))
        .or_else(|| text.lines().find_map(|l| l.strip_prefix("summary:")))
        .context("callgrind's output has no totals")?;
    let first = line.split_whitespace().next().context("callgrind's totals are empty")?;
    let total: u64 = first.parse().with_context(|| format!("`{first}` is not an instruction count"))?;
    if total == 0 {
        bail!("callgrind counted nothing: the counted functions were not entered (were they inlined?)");
    }
    Ok(total)
}

/// A child: reads every record of the topic once, the way `side` does.
pub async fn side(args: &Args, access: &KafkaAccess, side: Side, topic: &str) -> anyhow::Result<()> {
    let watermarks = topic::watermarks(access, topic, args.partitions).await?;
    let read = match side {
        Side::Raw => raw_side(args, access, topic, &watermarks).await?,
        Side::Worker => worker_side(args, access, topic, &watermarks).await?,
    };
    println!("{REPORT} {read}");
    Ok(())
}

/// Properties that make librdkafka fetch the whole topic ahead: no lower
/// mark to stop at below the partition's size.
fn prefetch_all(args: &Args) -> [(String, String); 1] {
    [("queued.min.messages".to_owned(), (args.records + 1).min(10_000_000).to_string())]
}

/// Waits until `buffered()` reaches `expected`.
async fn wait_prefetched(expected: usize, buffered: impl Fn() -> usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + PREFETCH_TIMEOUT;
    loop {
        let now = buffered();
        if now >= expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("librdkafka fetched {now} of {expected} records within {PREFETCH_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn raw_side(
    args: &Args,
    access: &KafkaAccess,
    topic: &str,
    watermarks: &[(i64, i64)],
) -> anyhow::Result<u64> {
    let mut config = access.client_config()?;
    config
        .set("group.id", format!("shardline-bench-callgrind-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest");
    for (key, value) in prefetch_all(args) {
        config.set(key, value);
    }
    let consumer: BaseConsumer = config.create().context("cannot create the raw consumer")?;
    consumer.assign(&topic::all_from_beginning(topic, args.partitions)?)?;
    let expected: u64 = watermarks.iter().map(|(low, high)| (high - low).max(0) as u64).sum();
    // Every partition's fetch queue forwards to the consumer's queue.
    let rk = consumer.client().native_ptr();
    wait_prefetched(expected as usize, || {
        use rdkafka::bindings as rd;
        // SAFETY: `rk` is the live consumer; the queue reference is released.
        unsafe {
            let queue = rd::rd_kafka_queue_get_consumer(rk);
            if queue.is_null() {
                return 0;
            }
            let length = rd::rd_kafka_queue_length(queue);
            rd::rd_kafka_queue_destroy(queue);
            length
        }
    })
    .await?;
    tokio::task::spawn_blocking(move || callgrind_counted_drain(&consumer, expected))
        .await
        .context("the raw consumer panicked")?
}

/// What callgrind counts on the raw side: the raw bench's loop (poll,
/// count, add the payload's length) until every record is read.
#[inline(never)]
fn callgrind_counted_drain(consumer: &BaseConsumer, expected: u64) -> anyhow::Result<u64> {
    let (mut count, mut payload_bytes) = (0u64, 0u64);
    let deadline = Instant::now() + PREFETCH_TIMEOUT;
    while count < expected {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                count += 1;
                payload_bytes += m.payload_len() as u64;
            }
            Some(Err(e)) => bail!("raw consumer: {e}"),
            None if Instant::now() > deadline => bail!("read {count} of {expected} records"),
            None => {}
        }
    }
    std::hint::black_box(payload_bytes);
    Ok(count)
}

async fn worker_side(
    args: &Args,
    access: &KafkaAccess,
    topic: &str,
    watermarks: &[(i64, i64)],
) -> anyhow::Result<u64> {
    let mut access = access.clone();
    let extra: Vec<String> = prefetch_all(args).iter().map(|(k, v)| format!("{k}={v}")).collect();
    access.settings =
        access.settings.with_args(extra.iter().map(String::as_str)).map_err(anyhow::Error::msg)?;
    // The whole partition fits in its buffer (key, value and librdkafka's
    // own overhead per record, generously).
    let per_partition = args.records.div_ceil(u64::from(args.partitions));
    let kib = (per_partition * (args.record_bytes + 512) / 1024).clamp(1024, 1 << 20);
    let stop = CancellationToken::new();
    let settings = ConsumerSettings {
        worker_id: "callgrind",
        fetch_queue_kib: kib as u32,
        health: shardline_worker::health::Health::default(),
    };
    let (source, events) = KafkaSource::new(&access, settings, stop.clone())?;
    let mut leases = Vec::new();
    for (partition, &(low, high)) in watermarks.iter().enumerate() {
        let partition = u32::try_from(partition).context("too many partitions")?;
        if high <= low {
            continue; // nothing to read: the lease would wait forever
        }
        let reader = source.open_reader(topic, partition, low)?;
        leases.push((partition, low, high, reader));
    }
    for (partition, low, high, _) in &leases {
        let expected = (high - low).max(0) as usize;
        wait_prefetched(expected, || source.buffered(topic, *partition)).await?;
    }
    let done = Arc::new(AtomicU64::new(0));
    let tasks = leases.into_iter().map(|(partition, low, high, reader)| {
        let mut mapping = Mapping::new("noop");
        mapping.batch_size = args.batch_size;
        let drain = CancellationToken::new();
        let lease = Lease {
            window: None,
            id: LeaseId::shard(topic, partition),
            epoch: 1,
            mapping,
            start: Start::Checkpoint(low),
            kill: CancellationToken::new(),
            drain: drain.clone(),
        };
        let task = LeaseTask {
            lease,
            handler: Arc::new(Noop),
            stats: Arc::new(LeaseStats::default()),
            usage: UsageMeter::default(),
            inflight: None,
        };
        let source = OneReader { reader: std::sync::Mutex::new(Some(reader)), low, high, drain };
        let done = done.clone();
        CallgrindCounted(Box::pin(async move {
            match task.run(source).await {
                Exit::Released(Some(end)) => {
                    done.fetch_add((end - low).max(0) as u64, Ordering::Relaxed);
                    Ok(())
                }
                other => Err(anyhow::anyhow!("lease {partition} ended as {other:?}")),
            }
        }))
    });
    let results = futures::future::join_all(tasks).await;
    stop.cancel();
    events.await.context("the consumer's event task panicked")?;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(done.load(Ordering::Relaxed))
}

/// A future whose every poll callgrind counts (its name is in [`COUNTED`]).
struct CallgrindCounted<F>(Pin<Box<F>>);

impl<F: Future> Future for CallgrindCounted<F> {
    type Output = F::Output;

    #[inline(never)]
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        self.0.as_mut().poll(cx)
    }
}

/// A source of one already-open partition reader, drained once every
/// record up to `high` is finished.
struct OneReader {
    reader: std::sync::Mutex<Option<PartitionReader>>,
    low: i64,
    high: i64,
    drain: CancellationToken,
}

impl Hooks for OneReader {}

impl Source for OneReader {
    type Reader = PartitionReader;
    type Finalizer = UpTo;

    async fn open(&self, _lease: &Lease) -> Result<Opened<PartitionReader, UpTo>, Exit> {
        let reader = self.reader.lock().ok().and_then(|mut r| r.take()).ok_or(Exit::Released(None))?;
        let finalizer = UpTo { high: self.high, drain: self.drain.clone(), last: AtomicI64::new(self.low) };
        Ok(Opened { reader, finalizer, position: self.low })
    }

    fn sink(&self) -> &dyn FailureSink {
        &Discard
    }
}

/// Drains the lease once the finished prefix reaches `high`.
struct UpTo {
    high: i64,
    drain: CancellationToken,
    last: AtomicI64,
}

impl Finalizer for UpTo {
    fn advanced(&self, next: i64) {
        self.last.store(next, Ordering::Relaxed);
        if next >= self.high {
            self.drain.cancel();
        }
    }

    async fn close(self, _how: End, next: i64) -> Option<i64> {
        Some(next.max(self.last.load(Ordering::Relaxed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_read_from_callgrinds_output() {
        let text = "events: Ir\nfn=main\n1 5\nsummary: 1234\ntotals: 1234\n";
        assert_eq!(total_instructions(text).ok(), Some(1234));
        assert_eq!(total_instructions("events: Ir\nsummary: 77\n").ok(), Some(77));
        assert!(total_instructions("events: Ir\ntotals: 0\n").is_err(), "nothing counted is an error");
        assert!(total_instructions("events: Ir\n").is_err());
    }
}
