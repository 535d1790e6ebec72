//! The Kafka source: one rdkafka consumer per worker process, partitions
//! assigned by hand (the coordinator is the group; no offsets committed to
//! Kafka), one partition queue per [`Shard`]. Memory is bounded on purpose:
//! each partition buffers at most `fetch_queue_kib`; a slow handler fills
//! it and librdkafka stops fetching that partition (backpressure).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::client::ClientContext;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use shardline_config::SetDefault;
use shardline_proto::{LeaseId, Mapping, Start, StartingPosition};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{End, Exit, Finalizer, Lease, Opened, RecordReader, Source};
use crate::checkpointer::Checkpointer;
use crate::handler::{Origin, Record};
use crate::health::Health;
use crate::membership::{Session, SessionError};
use crate::policy::Hooks;
use crate::sink::FailureSink;
use crate::sink::kafka::{KafkaAccess, transient};

/// Why the source could not do something.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("kafka: the call resolving a start position died: {0}")]
    Blocking(#[from] tokio::task::JoinError),
    #[error("partition {topic}/{partition} is already open on this worker")]
    AlreadyOpen { topic: String, partition: u32 },
}

impl SourceError {
    /// Whether trying again can help: a broker down, a topic briefly
    /// missing, a partition still open (its old run is stopping) may pass.
    pub fn retryable(&self) -> bool {
        match self {
            SourceError::Kafka(e) => transient(e),
            SourceError::Blocking(e) => !e.is_panic(),
            SourceError::AlreadyOpen { .. } => true,
        }
    }
}

/// Keeps the high watermarks librdkafka reports in its statistics, so lag
/// costs no extra broker round trip, and reports to the worker's
/// [`Health`] while no broker is connected: from librdkafka's "all broker
/// connections are down" until its statistics show a broker up again.
pub struct SourceContext {
    high: Mutex<HashMap<(String, i32), i64>>,
    health: Health,
}

/// The [`Health`] source Kafka's connection problems are reported under.
const HEALTH_SOURCE: &str = "kafka";

impl ClientContext for SourceContext {
    fn stats(&self, statistics: Statistics) {
        let brokers = statistics.brokers.values();
        if any_up(brokers.map(|b| (b.source.as_str(), b.state.as_str()))) {
            self.health.clear(HEALTH_SOURCE);
        }
        let mut high = crate::lock(&self.high);
        for (topic, t) in statistics.topics {
            for (partition, p) in t.partitions {
                if partition >= 0 && p.hi_offset >= 0 {
                    high.insert((topic.clone(), partition), p.hi_offset);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::error!(%error, reason, "librdkafka");
        if let Some(problem) = connection_problem(&error, reason) {
            self.health.set(HEALTH_SOURCE, problem);
        }
    }
}

/// The problem a client error means for the worker's health: none but
/// "every broker connection is down" (one broker failing while another
/// serves is librdkafka's to route around).
fn connection_problem(error: &KafkaError, reason: &str) -> Option<String> {
    (error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown))
        .then(|| format!("no broker connected ({reason})"))
}

/// Whether any broker, by the (source, state) of each in the statistics,
/// is connected. librdkafka connects only to brokers it needs, and a
/// failed one goes back to `INIT` before the next sample: a state other
/// than `UP` says nothing, only `UP` does.
fn any_up<'a>(mut brokers: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
    brokers.any(|(source, state)| source != "internal" && state == "UP")
}

impl ConsumerContext for SourceContext {}

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct KafkaSource {
    consumer: Arc<StreamConsumer<SourceContext>>,
    kafka: Arc<KafkaAccess>,
}

/// The worker's consumer: whose it is, how much it buffers, where it
/// reports that no broker is reachable.
pub struct ConsumerSettings<'a> {
    pub worker_id: &'a str,
    /// Most KiB fetched ahead per partition (`fetch_queue_kib`).
    pub fetch_queue_kib: u32,
    pub health: Health,
}

impl KafkaSource {
    /// The consumer, and the task that serves its main queue (client
    /// events; records all go to partition queues) until `stop`.
    pub fn new(
        kafka: &KafkaAccess,
        settings: ConsumerSettings<'_>,
        stop: CancellationToken,
    ) -> Result<(Self, JoinHandle<()>), SourceError> {
        let ConsumerSettings { worker_id, fetch_queue_kib, health } = settings;
        let consumer: StreamConsumer<SourceContext> = kafka
            .client_config()?
            .set_default("client.id", format!("shardline-{worker_id}"))
            // librdkafka wants a group id even for manual assignment; it is
            // never used to join a group or commit.
            .set("group.id", format!("shardline-worker-{worker_id}"))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // A checkpoint older than the retention: start from the oldest
            // record still there (at least once, never a silent skip ahead).
            .set("auto.offset.reset", "earliest")
            .set("queued.max.messages.kbytes", fetch_queue_kib.to_string())
            .set_default("queued.min.messages", "10000")
            .set_default("fetch.wait.max.ms", "100")
            .set("statistics.interval.ms", "1000")
            .create_with_context(SourceContext { high: Mutex::default(), health })?;
        let consumer = Arc::new(consumer);
        let main = consumer.clone();
        let events = tokio::spawn(async move {
            while let Some(event) = stop.run_until_cancelled(main.recv()).await {
                match event {
                    Ok(m) => tracing::warn!(
                        topic = m.topic(),
                        partition = m.partition(),
                        "record on the main queue"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "kafka client error");
                        metrics::counter!("shardline_kafka_errors_total").increment(1);
                        stop.run_until_cancelled(tokio::time::sleep(Duration::from_millis(200))).await;
                    }
                }
            }
        });
        Ok((Self { consumer, kafka: Arc::new(kafka.clone()) }, events))
    }
}

impl KafkaSource {
    /// Starts fetching `topic`/`partition` from `offset` into a partition
    /// queue of its own; dropping the reader stops it. Public for the load
    /// test's instruction count (`bench kafka --callgrind`), which runs the
    /// driver on it without a coordinator.
    pub fn open_reader(
        &self,
        topic: &str,
        partition: u32,
        offset: i64,
    ) -> Result<PartitionReader, SourceError> {
        let queue = self
            .consumer
            .split_partition_queue(topic, partition as i32)
            .ok_or_else(|| SourceError::AlreadyOpen { topic: topic.into(), partition })?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(offset))?;
        self.consumer.incremental_assign(&tpl)?;
        Ok(PartitionReader {
            queue,
            source: self.clone(),
            key: (topic.to_owned(), partition as i32),
            topic: topic.into(),
            partition,
        })
    }
}

impl KafkaSource {
    /// Messages librdkafka holds fetched for `topic`/`partition` and not yet
    /// read (the length of the partition's fetch queue, which follows its
    /// forwarding to a split queue); 0 for a partition it does not know.
    /// For the load test's instruction count, which starts counting only
    /// once every record is buffered, so the figure does not depend on how
    /// fetches and reads interleave.
    pub fn buffered(&self, topic: &str, partition: u32) -> usize {
        use rdkafka::bindings as rd;
        let Ok(name) = std::ffi::CString::new(topic) else { return 0 };
        let rk = self.consumer.client().native_ptr();
        // SAFETY: `rk` is this live client; librdkafka returns a new
        // reference to the partition's queue (or null), released below.
        let queue = unsafe { rd::rd_kafka_queue_get_partition(rk, name.as_ptr(), partition as i32) };
        if queue.is_null() {
            return 0;
        }
        // SAFETY: `queue` is the live reference taken above.
        let length = unsafe { rd::rd_kafka_queue_length(queue) };
        // SAFETY: the reference taken above, released once.
        unsafe { rd::rd_kafka_queue_destroy(queue) };
        length
    }
}

/// Is the first record from `offset` on stamped before `timestamp_ms` (none
/// there, or no timestamp: no)? Blocking; a consumer of its own, as the
/// worker's fetches each partition once, for its lease.
fn stamped_before(
    kafka: &KafkaAccess,
    topic: &str,
    p: i32,
    offset: i64,
    timestamp_ms: i64,
) -> Result<bool, KafkaError> {
    let consumer: BaseConsumer = kafka
        .client_config()?
        .set("group.id", "shardline-worker-start")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, p, Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(record)) => return Ok(record.timestamp().to_millis().is_some_and(|t| t < timestamp_ms)),
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(false),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    Err(KafkaError::OffsetFetch(RDKafkaErrorCode::OperationTimedOut))
}

fn tpl(topic: &str, partition: u32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition as i32);
    tpl
}

/// Dropping it stops fetching the partition.
/// Polls of an empty partition queue 1 ms apart before the reader backs
/// off (see [`PartitionReader::next`]): a partition read steadily stays
/// within them; an idle one soon polls only every 64 ms.
const BUSY_POLLS: u32 = 32;

pub struct PartitionReader {
    // A stream per `recv` (rdkafka's way) costs two lock operations per
    // record; keeping one stream would make the reader borrow from itself,
    // which only `unsafe` can express: not worth it on the record path.
    queue: StreamPartitionQueue<SourceContext>,
    source: KafkaSource,
    /// `(topic, partition)`: the key of the high watermarks, built once
    /// rather than per lag reading.
    key: (String, i32),
    pub topic: String,
    pub partition: u32,
}

impl RecordReader for PartitionReader {
    /// Transient client errors are logged and waited out; this never ends
    /// on its own (the lease is stopped from outside).
    async fn next(&mut self) -> Option<Record> {
        // A parked split-queue stream is woken by librdkafka's edge-triggered
        // "queue became non-empty" callback, and that edge is missed often
        // enough (rust-rdkafka #665, #840) to hold records for hundreds of
        // milliseconds: `bench latency` measured a p50 of ~300 ms between
        // producer and handler at 2,000 records/s. So the queue is also
        // polled on a timer: every millisecond for a while after the last
        // record, then backing off to 64 ms while it stays empty. A busy
        // lease is never held back; an idle one costs ~16 polls a second.
        let mut polls = 0u32;
        loop {
            // Every millisecond for the first BUSY_POLLS, then backing off.
            let wait = Duration::from_millis(1 << polls.saturating_sub(BUSY_POLLS).min(6));
            let polled = tokio::select! {
                r = self.queue.recv() => r,
                () = tokio::time::sleep(wait) => {
                    polls += 1;
                    continue;
                }
            };
            match polled {
                Ok(m) => return Some(record_of(&m, self.partition)),
                Err(e) => {
                    tracing::warn!(topic = %self.topic, partition = self.partition, error = %e, "fetch error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn try_next(&mut self) -> Option<Record> {
        match self.queue.recv().now_or_never()? {
            Ok(m) => Some(record_of(&m, self.partition)),
            Err(_) => None,
        }
    }

    fn lag(&self, cut_to: i64, _finished: i64) -> i64 {
        let high = crate::lock(&self.source.consumer.context().high);
        high.get(&self.key).map_or(-1, |h| (h - cut_to).max(0))
    }
}

/// The record of a message of `partition`.
fn record_of(m: &rdkafka::message::BorrowedMessage<'_>, partition: u32) -> Record {
    let raw = raw_headers(m);
    let headers: Vec<_> = raw.iter().map(|(name, value)| (name.to_bytes(), *value)).collect();
    record(RawMessage {
        key: m.key(),
        payload: m.payload(),
        headers: &headers,
        timestamp_ms: m.timestamp().to_millis(),
        partition,
        offset: m.offset(),
    })
}

/// A Kafka message as librdkafka hands it over, borrowed from it.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawMessage<'a> {
    pub key: Option<&'a [u8]>,
    /// `None`: a null value (a tombstone), not an empty one.
    pub payload: Option<&'a [u8]>,
    /// Header names (the bytes before their NUL) and values (`None`: null).
    pub headers: &'a [(&'a [u8], Option<&'a [u8]>)],
    pub timestamp_ms: Option<i64>,
    pub partition: u32,
    pub offset: i64,
}

/// The record a handler sees. Header names that are not UTF-8 are
/// converted lossily and a null header value becomes empty: broker data
/// must never panic a worker. Public for the fuzz targets (`fuzz/`).
pub fn record(m: RawMessage<'_>) -> Record {
    Record {
        key: m.key.map(<[u8]>::to_vec),
        value: m.payload.map(<[u8]>::to_vec).unwrap_or_default(),
        tombstone: m.payload.is_none(),
        headers: m
            .headers
            .iter()
            .map(|(name, value)| {
                (String::from_utf8_lossy(name).into_owned(), value.unwrap_or_default().to_vec())
            })
            .collect(),
        timestamp_ms: m.timestamp_ms,
        origin: Origin::Kafka { partition: m.partition, offset: m.offset },
        reply_to: None,
    }
}

/// The record's headers as librdkafka holds them. rdkafka's own accessor
/// panics on a header name that is not UTF-8 (it unwraps the conversion),
/// so they are read here and converted by [`record`].
fn raw_headers<'m>(
    m: &'m rdkafka::message::BorrowedMessage<'_>,
) -> Vec<(&'m std::ffi::CStr, Option<&'m [u8]>)> {
    use rdkafka::bindings as rd;
    let ok = rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is the live message `m` borrows; librdkafka points
    // `hdrs` at headers the message owns, valid as long as `m` is.
    if unsafe { rd::rd_kafka_message_headers(m.ptr(), &mut hdrs) } != ok || hdrs.is_null() {
        return Vec::new();
    }
    // SAFETY: `hdrs` is valid (above).
    let count = unsafe { rd::rd_kafka_header_cnt(hdrs) };
    (0..count)
        .filter_map(|idx| {
            let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
            // SAFETY: `idx` < count; the out pointers are valid locals.
            let err = unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
            if err != ok || name.is_null() {
                return None;
            }
            // SAFETY: librdkafka's header names are NUL-terminated and live
            // as long as the message.
            let key = unsafe { std::ffi::CStr::from_ptr(name) };
            let value = if value.is_null() {
                None
            } else if size == 0 {
                Some(&[][..])
            } else {
                // SAFETY: `value` points at `size` bytes owned by the message.
                Some(unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) })
            };
            Some((key, value))
        })
        .collect()
}

impl Drop for PartitionReader {
    fn drop(&mut self) {
        if let Err(e) = self.source.consumer.incremental_unassign(&tpl(&self.topic, self.partition)) {
            tracing::warn!(topic = %self.topic, partition = self.partition, error = %e, "unassign failed");
        }
    }
}

pub struct Shard {
    pub client: KafkaSource,
    pub session: Session,
    pub checkpointer: Checkpointer,
    pub sink: Box<dyn FailureSink>,
    pub topic: String,
    pub partition: u32,
}

/// A failing batch is being retried: no point prefetching more.
impl Hooks for Shard {
    fn failing(&self) {
        if let Err(e) = self.client.consumer.pause(&tpl(&self.topic, self.partition)) {
            tracing::debug!(topic = %self.topic, partition = self.partition, error = %e, "pause failed");
        }
    }

    fn recovered(&self) {
        if let Err(e) = self.client.consumer.resume(&tpl(&self.topic, self.partition)) {
            tracing::debug!(topic = %self.topic, partition = self.partition, error = %e, "resume failed");
        }
    }
}

impl Source for Shard {
    type Reader = PartitionReader;
    type Finalizer = Checkpoints;

    async fn open(&self, lease: &Lease) -> Result<Opened<PartitionReader, Checkpoints>, Exit> {
        let released = Exit::Released(lease.start.checkpoint());
        let (reader, opened_at) = self.open_partition(lease).await.ok_or(released)?;
        if lease.start != Start::Checkpoint(opened_at) {
            // The resolved start (e.g. `latest`) is acknowledged as the
            // checkpoint before the first batch runs: a later owner then
            // continues here even if this worker dies before its first
            // checkpoint, instead of at the *then* latest offset.
            self.pin(lease, opened_at).await?;
        }
        let finalizer = Checkpoints {
            checkpointer: self.checkpointer.clone(),
            lease: lease.id.clone(),
            epoch: lease.epoch,
        };
        Ok(Opened { reader, finalizer, position: opened_at })
    }

    fn lanes(&self, mapping: &Mapping) -> usize {
        mapping.parallelization_factor as usize
    }

    fn sink(&self) -> &dyn FailureSink {
        &*self.sink
    }
}

impl Shard {
    /// Resolves the lease's start to a concrete offset (see [`Start`]) and
    /// starts fetching the partition from there.
    async fn try_open(&self, lease: &Lease) -> Result<(PartitionReader, i64), SourceError> {
        let offset = self.resolve(lease).await?;
        Ok((self.client.open_reader(&self.topic, self.partition, offset)?, offset))
    }

    async fn resolve(&self, lease: &Lease) -> Result<i64, SourceError> {
        let position = match lease.start {
            Start::Checkpoint(offset) => return Ok(offset),
            Start::Earliest => StartingPosition::TrimHorizon,
            Start::MappingDefault => lease.mapping.starting_position,
        };
        let (consumer, kafka) = (self.client.consumer.clone(), self.client.kafka.clone());
        let (topic, p, ts) = (self.topic.clone(), self.partition as i32, lease.mapping.starting_timestamp_ms);
        let resolved = tokio::task::spawn_blocking(move || {
            let watermarks = || consumer.fetch_watermarks(&topic, p, TIMEOUT);
            match position {
                StartingPosition::Latest => watermarks().map(|(_, high)| high),
                StartingPosition::TrimHorizon => watermarks().map(|(low, _)| low),
                StartingPosition::AtTimestamp => {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition_offset(&topic, p, Offset::Offset(ts))?;
                    let found = consumer.offsets_for_times(tpl, TIMEOUT)?;
                    match found.find_partition(&topic, p).map(|e| e.offset()) {
                        // Kafka answers -1 when every record is older than
                        // the time; tansu 0.6.0 answers 0, which would
                        // rewind the shard to its start. So the answer
                        // stands only if the record it names is not older
                        // (as the coordinator's `Offsets::at_time` checks).
                        Some(Offset::Offset(o)) if o >= 0 && !stamped_before(&kafka, &topic, p, o, ts)? => {
                            Ok(o)
                        }
                        // No record at or after the time: start at the end.
                        _ => watermarks().map(|(_, high)| high),
                    }
                }
            }
        });
        Ok(resolved.await??)
    }

    /// Opens the partition, retrying with backoff while the broker or topic
    /// is unavailable. `None`: drained before it opened, or it cannot open.
    async fn open_partition(&self, lease: &Lease) -> Option<(PartitionReader, i64)> {
        let backoff = (Duration::from_millis(100), Duration::from_secs(10));
        let opened = crate::persist(&lease.drain, backoff, |wait| async move {
            match self.try_open(lease).await {
                Ok(opened) => Some(Some(opened)),
                Err(e) if !e.retryable() => {
                    tracing::error!(lease = %lease.id, error = %e, "cannot open the partition; giving the lease back");
                    Some(None)
                }
                Err(e) => {
                    tracing::warn!(lease = %lease.id, error = %e, ?wait, "cannot open partition; retrying");
                    metrics::counter!("shardline_source_errors_total").increment(1);
                    None
                }
            }
        });
        opened.await.flatten()
    }

    /// Checkpoints the resolved start, retrying until it is acknowledged.
    async fn pin(&self, lease: &Lease, offset: i64) -> Result<(), Exit> {
        let backoff = (Duration::from_millis(100), Duration::from_secs(2));
        let pinned = crate::persist(&lease.drain, backoff, |_| async move {
            let entry = vec![(lease.id.clone(), lease.epoch, offset)];
            match self.session.checkpoint(entry).await.map(|mut r| r.pop()) {
                Ok(Some(Ok(()))) => Some(Ok(())),
                Ok(Some(Err(SessionError::Fenced { .. }))) => Some(Err(Exit::Killed)),
                failed => {
                    tracing::warn!(lease = %lease.id, result = ?failed, "start checkpoint failed; retrying");
                    None
                }
            }
        });
        pinned.await.unwrap_or(Err(Exit::Released(lease.start.checkpoint())))
    }
}

/// Every advance of the finished prefix is a checkpoint; the last goes in
/// the release.
pub struct Checkpoints {
    checkpointer: Checkpointer,
    lease: LeaseId,
    epoch: u64,
}

impl Finalizer for Checkpoints {
    fn advanced(&self, next: i64) {
        self.checkpointer.submit(&self.lease, self.epoch, next);
    }

    async fn close(self, how: End, next: i64) -> Option<i64> {
        // The final position travels in the release alone: a pending
        // checkpoint of it is dropped.
        self.checkpointer.forget(&self.lease);
        (how == End::Drained).then_some(next)
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    use super::{any_up, connection_problem};

    #[test]
    fn only_every_broker_down_is_a_problem() {
        let down = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        assert_eq!(
            connection_problem(&down, "1/1 brokers are down").as_deref(),
            Some("no broker connected (1/1 brokers are down)")
        );
        let one = KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure);
        assert_eq!(connection_problem(&one, "k:9092/1: Connection refused"), None);
    }

    #[test]
    fn a_broker_up_in_the_statistics_is_connected_and_nothing_else_is() {
        let up = [("logical", "INIT"), ("configured", "INIT"), ("learned", "UP")];
        assert!(any_up(up.into_iter()));
        let idle = [("logical", "INIT"), ("configured", "INIT"), ("learned", "TRY_CONNECT")];
        assert!(!any_up(idle.into_iter()));
        assert!(!any_up([("internal", "UP")].into_iter()), "librdkafka's own broker is not one");
        assert!(!any_up(std::iter::empty()));
    }
}
