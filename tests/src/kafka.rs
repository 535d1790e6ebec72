//! Producing test records and reading receipts on the real broker.
//!
//! Records carry their id in the value (`id-<n>`); the `forward` handler
//! copies each processed record to a receipts topic with headers naming
//! the source partition and offset and the worker that processed it.

use std::collections::{BTreeMap, BTreeSet};

use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use shardline_testkit::receipts::{Counts, Order};

use crate::kafka_brokers;

pub fn producer() -> Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("linger.ms", "5")
        .set("acks", "all")
        .create()
        .context("kafka producer")
}

/// Produces records `from..to` with keys `key-<n % keys>` and values
/// `id-<n>`, waiting for every acknowledgement.
pub async fn produce(producer: &FutureProducer, topic: &str, from: u64, to: u64, keys: u64) -> Result<()> {
    let chunk = 1000;
    let mut n = from;
    while n < to {
        let end = (n + chunk).min(to);
        let sends: Vec<_> = (n..end)
            .map(|i| {
                let key = format!("key-{}", i % keys.max(1));
                let value = format!("id-{i}");
                async move {
                    producer
                        .send(FutureRecord::to(topic).key(&key).payload(&value), Duration::from_secs(30))
                        .await
                        .map_err(|(e, _)| anyhow::anyhow!("produce {value}: {e}"))
                }
            })
            .collect();
        for r in futures::future::join_all(sends).await {
            r?;
        }
        n = end;
    }
    Ok(())
}

/// One record as `produce_raw` writes it: what rdkafka's typed API cannot
/// express (a null value, a header name that is not UTF-8).
pub struct RawRecord<'a> {
    pub key: &'a [u8],
    /// `None`: a tombstone (null value).
    pub value: Option<&'a [u8]>,
    /// Names are raw bytes (no NUL inside).
    pub headers: &'a [(&'a [u8], &'a [u8])],
}

/// Produces `records` to partition 0 of `topic` through librdkafka's
/// `rd_kafka_produceva`, then waits until every one is acknowledged. Its
/// own producer: a `FutureProducer` expects a delivery future behind every
/// message it sees acknowledged.
pub fn produce_raw(topic: &str, records: &[RawRecord<'_>]) -> Result<()> {
    use rdkafka::bindings as rd;
    use rdkafka::producer::{BaseProducer, Producer};
    use std::ffi::CString;
    let producer: BaseProducer =
        ClientConfig::new().set("bootstrap.servers", kafka_brokers()).set("acks", "all").create()?;
    let topic = CString::new(topic).context("topic name")?;
    for r in records {
        let names: Vec<CString> = r
            .headers
            .iter()
            .map(|(name, _)| CString::new(*name))
            .collect::<Result<_, _>>()
            .context("header name")?;
        let vu = |vtype, u| rd::rd_kafka_vu_t { vtype, u };
        let mut vus = vec![
            vu(
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_TOPIC,
                rd::rd_kafka_vu_s__bindgen_ty_1 { cstr: topic.as_ptr() },
            ),
            vu(rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_PARTITION, rd::rd_kafka_vu_s__bindgen_ty_1 { i32_: 0 }),
            vu(
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_KEY,
                rd::rd_kafka_vu_s__bindgen_ty_1 {
                    mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                        ptr: r.key.as_ptr() as *mut _,
                        size: r.key.len(),
                    },
                },
            ),
        ];
        if let Some(value) = r.value {
            vus.push(vu(
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_VALUE,
                rd::rd_kafka_vu_s__bindgen_ty_1 {
                    mem: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                        ptr: value.as_ptr() as *mut _,
                        size: value.len(),
                    },
                },
            ));
        }
        for (name, (_, value)) in names.iter().zip(r.headers) {
            vus.push(vu(
                rd::rd_kafka_vtype_t::RD_KAFKA_VTYPE_HEADER,
                rd::rd_kafka_vu_s__bindgen_ty_1 {
                    header: rd::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_2 {
                        name: name.as_ptr(),
                        val: value.as_ptr().cast(),
                        size: value.len() as isize,
                    },
                },
            ));
        }
        // SAFETY: every pointer in `vus` points into `topic`, `names` or the
        // caller's slices, all alive across the call; librdkafka copies the
        // data (no RD_KAFKA_MSG_F_FREE).
        let error =
            unsafe { rd::rd_kafka_produceva(producer.client().native_ptr(), vus.as_ptr(), vus.len()) };
        anyhow::ensure!(error.is_null(), "rd_kafka_produceva failed");
    }
    producer.flush(Duration::from_secs(30)).context("flush raw records")?;
    Ok(())
}

/// One receipt: which record was processed, where it came from, by whom,
/// and when the receipt was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub id: u64,
    pub partition: u32,
    pub offset: i64,
    pub worker: String,
    pub timestamp_ms: i64,
}

fn header(m: &impl Message, key: &str) -> Option<String> {
    let headers = m.headers()?;
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Reads the receipts topic (all partitions, from the start) until `want`
/// distinct ids have been seen and the topic has been quiet for `quiet`,
/// or `timeout` passes. Returns receipts in topic order per partition.
pub fn read_receipts(topic: &str, want: usize, quiet: Duration, timeout: Duration) -> Result<Vec<Receipt>> {
    let (consumer, partitions) = reader(topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let started = std::time::Instant::now();
    let mut last_new = std::time::Instant::now();
    let mut receipts = Vec::new();
    let mut ids = BTreeSet::new();
    while started.elapsed() < timeout {
        if ids.len() >= want && last_new.elapsed() >= quiet {
            break;
        }
        let Some(m) = consumer.poll(Duration::from_millis(100)) else { continue };
        let m = m.context("receipt poll")?;
        let value = m.payload().map(String::from_utf8_lossy).unwrap_or_default();
        let id = value.strip_prefix("id-").and_then(|v| v.parse::<u64>().ok()).context("receipt id")?;
        let receipt = Receipt {
            id,
            partition: header(&m, "shardline.partition")
                .and_then(|p| p.parse().ok())
                .context("partition header")?,
            offset: header(&m, "shardline.offset").and_then(|p| p.parse().ok()).context("offset header")?,
            worker: header(&m, "shardline.worker").unwrap_or_default(),
            timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
        };
        ids.insert(id);
        receipts.push(receipt);
        last_new = std::time::Instant::now();
    }
    Ok(receipts)
}

/// A consumer for reading `topic` by hand (assigned, never committing)
/// and its partition count.
fn reader(topic: &str) -> Result<(BaseConsumer, i32)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", "shardline-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .context("topic reader")?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
    Ok((consumer, i32::try_from(partitions)?))
}

/// What the receipts say about `produced` records.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub unique: usize,
    pub duplicates: usize,
    pub lost: Vec<u64>,
    /// Source partitions whose offsets went backwards in receipt order
    /// outside a redelivery.
    pub order_violations: usize,
}

/// Checks receipts of ids `0..produced`. With a one-partition receipts
/// topic, receipt order is processing order: per source partition,
/// first-time receipts must come in offset order.
pub fn verify(receipts: &[Receipt], produced: u64) -> Verdict {
    let mut counts = Counts::default();
    let mut order = Order::default();
    for r in receipts {
        if counts.add(r.id) {
            order.see(r.partition, r.offset);
        }
    }
    Verdict {
        unique: counts.unique(),
        duplicates: counts.duplicates() as usize,
        lost: counts.lost(produced).collect(),
        order_violations: order.violations as usize,
    }
}

/// One record read back from a topic, with its key, headers and timestamp
/// (records in an `on_failure` topic; receipts whose values are not
/// `id-<n>`).
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: String,
    /// The value is null (not merely empty).
    pub tombstone: bool,
    pub headers: Vec<(String, String)>,
    pub timestamp: rdkafka::Timestamp,
}

impl Consumed {
    /// The first header named `key`.
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Reads every record of `topic` (all partitions, from the start) up to the
/// high watermarks as they are when called; records in offset order per
/// partition, partitions one after another. Fails if they have not all
/// arrived within `timeout`.
pub fn read_topic(topic: &str, timeout: Duration) -> Result<Vec<Consumed>> {
    let (consumer, partitions) = reader(topic)?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            ends.insert(p, high);
        }
    }
    let mut by_partition = BTreeMap::<i32, Vec<Consumed>>::new();
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&tpl)?;
    let started = std::time::Instant::now();
    let mut open = ends.clone();
    while !open.is_empty() {
        anyhow::ensure!(
            started.elapsed() < timeout,
            "read {topic}: partitions {open:?} not read to their high watermarks within {timeout:?}"
        );
        let Some(m) = consumer.poll(Duration::from_millis(100)) else { continue };
        let m = m.with_context(|| format!("poll {topic}"))?;
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            h.value.map(String::from_utf8_lossy).unwrap_or_default().into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (partition, offset) = (m.partition(), m.offset());
        if open.get(&partition).is_some_and(|&high| offset + 1 >= high) {
            open.remove(&partition);
        }
        if ends.get(&partition).is_some_and(|&high| offset < high) {
            by_partition.entry(partition).or_default().push(Consumed {
                partition,
                offset,
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().map(String::from_utf8_lossy).unwrap_or_default().into_owned(),
                tombstone: m.payload().is_none(),
                headers,
                timestamp: m.timestamp(),
            });
        }
    }
    Ok(by_partition.into_values().flatten().collect())
}
