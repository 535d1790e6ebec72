//! Lambda's event shapes for a batch, and its partial-failure reply.
//!
//! A function written for Lambda reads the event its event source mapping
//! would give it. Per mapping, `event_format` chooses which:
//! - `kafka`: the self-managed Kafka event (`eventSource`
//!   `SelfManagedKafka`, `records` keyed `topic-partition`, base64 `key`
//!   and `value`, headers as lists of `{name: [bytes]}`, signed as Java's
//!   bytes are);
//! - `kinesis`: the Kinesis event (`Records[].kinesis.data`,
//!   `partitionKey`, `sequenceNumber` = the Kafka offset), so a function
//!   written for Kinesis runs on a Kafka topic;
//! - `sqs`, `sns`: for queue slots (`Records[].body`, `messageId`;
//!   `Records[].Sns.Message`, `MessageId`);
//! - `rmq`: Amazon MQ for RabbitMQ (`rmqMessagesByQueue`, base64 `data`).
//!
//! ARNs are shaped like AWS's (`arn:aws:SERVICE:REGION:ACCOUNT:…`, region
//! `local`, account `000000000000`) because functions split them on `:`;
//! they name the stream or subscription, nothing in AWS.
//!
//! A reply `{"batchItemFailures": [{"itemIdentifier": ID}]}` names failed
//! records by the identifier of their format (Lambda's rule): the
//! `sequenceNumber` (kinesis), the offset (kafka), the `messageId` (sqs,
//! sns, rmq). [`failures`] maps them back to record positions.

use std::borrow::Cow;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use md5::{Digest, Md5};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::{Map, Value};

use crate::handler::{Batch, Origin, Record};

/// Which Lambda event a function gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventFormat {
    Kafka,
    Kinesis,
    Sqs,
    Sns,
    Rmq,
}

impl EventFormat {
    /// Streams take `kafka` or `kinesis`, subscriptions the others.
    pub fn for_streams(self) -> bool {
        matches!(self, Self::Kafka | Self::Kinesis)
    }

    /// The name as written in config.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kafka => "kafka",
            Self::Kinesis => "kinesis",
            Self::Sqs => "sqs",
            Self::Sns => "sns",
            Self::Rmq => "rmq",
        }
    }
}

const REGION: &str = "local";
const ACCOUNT: &str = "000000000000";

/// The event for `batch` in `format`, as JSON; `brokers` fills the Kafka
/// event's `bootstrapServers`. Written straight from the records (no
/// intermediate JSON tree): this runs once per batch on the worker's
/// record path.
pub fn event(format: EventFormat, batch: &Batch, brokers: &str) -> Result<Vec<u8>, serde_json::Error> {
    let name = batch.lease.name.as_str();
    let index = batch.lease.index;
    let records = batch.records.as_slice();
    // Base64 makes values a third larger; the rest is per-record metadata.
    let size: usize = records.iter().map(|r| r.payload_len() * 4 / 3 + 512).sum();
    let mut out = Vec::with_capacity(size + 256);
    match format {
        EventFormat::Kafka => {
            let list = List(records, |r| KafkaRecord::new(name, index, r));
            let event = KafkaEvent {
                event_source: "SelfManagedKafka",
                bootstrap_servers: brokers,
                records: OneKey(format!("{name}-{index}"), list),
            };
            serde_json::to_writer(&mut out, &event)?;
        }
        EventFormat::Kinesis => {
            let arn = format!("arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{name}");
            let shard = format!("shardId-{index:012}");
            let list = List(records, |r| KinesisRecord::new(&arn, &shard, r));
            serde_json::to_writer(&mut out, &RecordsEvent { records: list })?;
        }
        EventFormat::Sqs => {
            let arn = format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}");
            let list = List(records, |r| SqsRecord::new(&arn, index, r));
            serde_json::to_writer(&mut out, &RecordsEvent { records: list })?;
        }
        EventFormat::Sns => {
            let arn = format!("arn:aws:sns:{REGION}:{ACCOUNT}:{name}");
            let subscription = format!("{arn}:shardline");
            let list = List(records, |r| SnsRecord::new(&arn, &subscription, index, r));
            serde_json::to_writer(&mut out, &RecordsEvent { records: list })?;
        }
        EventFormat::Rmq => {
            let list = List(records, |r| RmqMessage::new(index, r));
            let event = RmqEvent {
                event_source: "aws:rmq",
                event_source_arn: format!("arn:aws:mq:{REGION}:{ACCOUNT}:broker:shardline:{name}"),
                rmq_messages_by_queue: OneKey(format!("{name}::/"), list),
            };
            serde_json::to_writer(&mut out, &event)?;
        }
    }
    Ok(out)
}

/// The records of a batch, each serialised as `F` makes it.
struct List<'a, F>(&'a [Arc<Record>], F);

impl<'a, T: Serialize, F: Fn(&'a Record) -> T> Serialize for List<'a, F> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|r| (self.1)(r)))
    }
}

/// A JSON object with one member.
struct OneKey<K, V>(K, V);

impl<K: Serialize, V: Serialize> Serialize for OneKey<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        map.serialize_entry(&self.0, &self.1)?;
        map.end()
    }
}

/// Bytes as base64 text, encoded into the output without a copy.
struct Base64<'a>(&'a [u8]);

impl Serialize for Base64<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&base64::display::Base64Display::new(self.0, &B64))
    }
}

/// Anything `Display`, as a JSON string (offsets as decimal strings, ids).
struct Text<T>(T);

impl<T: std::fmt::Display> Serialize for Text<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A queue record's id in the sqs, sns and rmq events: its slot and
/// delivery tag, unique among the records of one batch.
struct MessageId(u32, i64);

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

fn message_id(slot: u32, r: &Record) -> Text<MessageId> {
    Text(MessageId(slot, r.position()))
}

/// Text of bytes that should be UTF-8 (invalid sequences replaced).
fn lossy(bytes: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KafkaEvent<'a, L> {
    event_source: &'static str,
    bootstrap_servers: &'a str,
    records: OneKey<String, L>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KafkaRecord<'a> {
    topic: &'a str,
    partition: u32,
    offset: i64,
    timestamp: i64,
    timestamp_type: &'static str,
    key: Option<Base64<'a>>,
    value: Option<Base64<'a>>,
    headers: KafkaHeaders<'a>,
}

impl<'a> KafkaRecord<'a> {
    fn new(topic: &'a str, partition: u32, r: &'a Record) -> Self {
        Self {
            topic,
            partition,
            offset: r.position(),
            timestamp: r.timestamp_ms.unwrap_or(0),
            timestamp_type: "CREATE_TIME",
            key: r.key.as_deref().map(Base64),
            value: r.value().map(Base64),
            headers: KafkaHeaders(&r.headers),
        }
    }
}

/// `[{name: [byte, ...]}, ...]`, bytes signed as Java's are: Lambda's
/// encoding, which the Rust, Go and .NET event types insist on.
struct KafkaHeaders<'a>(&'a [(String, Vec<u8>)]);

impl Serialize for KafkaHeaders<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|(name, value)| OneKey(name, Signed(value))))
    }
}

struct Signed<'a>(&'a [u8]);

impl Serialize for Signed<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|b| *b as i8))
    }
}

#[derive(Serialize)]
struct RecordsEvent<L> {
    #[serde(rename = "Records")]
    records: L,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KinesisRecord<'a> {
    kinesis: KinesisData<'a>,
    event_source: &'static str,
    event_version: &'static str,
    #[serde(rename = "eventID")]
    event_id: Text<EventId<'a>>,
    event_name: &'static str,
    invoke_identity_arn: &'static str,
    aws_region: &'static str,
    #[serde(rename = "eventSourceARN")]
    event_source_arn: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KinesisData<'a> {
    kinesis_schema_version: &'static str,
    partition_key: Cow<'a, str>,
    sequence_number: Text<i64>,
    data: Base64<'a>,
    approximate_arrival_timestamp: f64,
}

impl<'a> KinesisRecord<'a> {
    fn new(arn: &'a str, shard: &'a str, r: &'a Record) -> Self {
        Self {
            kinesis: KinesisData {
                kinesis_schema_version: "1.0",
                partition_key: r.key.as_deref().map(lossy).unwrap_or_default(),
                sequence_number: Text(r.position()),
                data: Base64(&r.value),
                approximate_arrival_timestamp: r.timestamp_ms.unwrap_or(0) as f64 / 1000.0,
            },
            event_source: "aws:kinesis",
            event_version: "1.0",
            event_id: Text(EventId(shard, r.position())),
            event_name: "aws:kinesis:record",
            invoke_identity_arn: IDENTITY_ARN,
            aws_region: REGION,
            event_source_arn: arn,
        }
    }
}

/// `shardId-000000000003:15`.
struct EventId<'a>(&'a str, i64);

impl std::fmt::Display for EventId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.0, self.1)
    }
}

const IDENTITY_ARN: &str = "arn:aws:iam::000000000000:role/shardline";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SqsRecord<'a> {
    message_id: Text<MessageId>,
    receipt_handle: Text<MessageId>,
    body: Cow<'a, str>,
    attributes: SqsAttributes,
    message_attributes: Attributes<'a>,
    md5_of_body: Text<Md5Hex>,
    event_source: &'static str,
    #[serde(rename = "eventSourceARN")]
    event_source_arn: &'a str,
    aws_region: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct SqsAttributes {
    approximate_receive_count: &'static str,
    sent_timestamp: Text<i64>,
    sender_id: &'static str,
    approximate_first_receive_timestamp: Text<i64>,
}

struct Md5Hex([u8; 16]);

impl std::fmt::Display for Md5Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl<'a> SqsRecord<'a> {
    fn new(arn: &'a str, slot: u32, r: &'a Record) -> Self {
        let sent = r.timestamp_ms.unwrap_or(0);
        Self {
            message_id: message_id(slot, r),
            receipt_handle: message_id(slot, r),
            body: lossy(&r.value),
            attributes: SqsAttributes {
                approximate_receive_count: if redelivered(r) { "2" } else { "1" },
                sent_timestamp: Text(sent),
                sender_id: "shardline",
                approximate_first_receive_timestamp: Text(sent),
            },
            message_attributes: Attributes { headers: &r.headers, sns: false },
            md5_of_body: Text(Md5Hex(Md5::digest(&r.value).into())),
            event_source: "aws:sqs",
            event_source_arn: arn,
            aws_region: REGION,
        }
    }
}

fn redelivered(r: &Record) -> bool {
    matches!(r.origin, Origin::Queue { redelivered: true, .. })
}

/// Headers as SQS (`{dataType, stringValue}`) or SNS (`{Type, Value}`)
/// message attributes of type `String`.
struct Attributes<'a> {
    headers: &'a [(String, Vec<u8>)],
    sns: bool,
}

impl Serialize for Attributes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (type_key, value_key) = if self.sns { ("Type", "Value") } else { ("dataType", "stringValue") };
        s.collect_map(
            self.headers
                .iter()
                .map(|(name, value)| (name, Attribute { type_key, value_key, value: lossy(value) })),
        )
    }
}

struct Attribute<'a> {
    type_key: &'static str,
    value_key: &'static str,
    value: Cow<'a, str>,
}

impl Serialize for Attribute<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry(self.type_key, "String")?;
        map.serialize_entry(self.value_key, &self.value)?;
        map.end()
    }
}

#[derive(Serialize)]
struct SnsRecord<'a> {
    #[serde(rename = "EventVersion")]
    event_version: &'static str,
    #[serde(rename = "EventSubscriptionArn")]
    event_subscription_arn: &'a str,
    #[serde(rename = "EventSource")]
    event_source: &'static str,
    #[serde(rename = "Sns")]
    sns: SnsMessage<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct SnsMessage<'a> {
    r#type: &'static str,
    message_id: Text<MessageId>,
    topic_arn: &'a str,
    subject: Option<&'static str>,
    message: Cow<'a, str>,
    timestamp: String,
    message_attributes: Attributes<'a>,
}

impl<'a> SnsRecord<'a> {
    fn new(arn: &'a str, subscription: &'a str, slot: u32, r: &'a Record) -> Self {
        Self {
            event_version: "1.0",
            event_subscription_arn: subscription,
            event_source: "aws:sns",
            sns: SnsMessage {
                r#type: "Notification",
                message_id: message_id(slot, r),
                topic_arn: arn,
                subject: None,
                message: lossy(&r.value),
                timestamp: rfc3339(r.timestamp_ms),
                message_attributes: Attributes { headers: &r.headers, sns: true },
            },
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RmqEvent<L> {
    event_source: &'static str,
    event_source_arn: String,
    rmq_messages_by_queue: OneKey<String, L>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RmqMessage<'a> {
    basic_properties: RmqProperties<'a>,
    redelivered: bool,
    data: Base64<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RmqProperties<'a> {
    message_id: Text<MessageId>,
    timestamp: Option<i64>,
    headers: RmqHeaders<'a>,
    body_size: usize,
}

struct RmqHeaders<'a>(&'a [(String, Vec<u8>)]);

impl Serialize for RmqHeaders<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(name, value)| (name, lossy(value))))
    }
}

impl<'a> RmqMessage<'a> {
    fn new(slot: u32, r: &'a Record) -> Self {
        Self {
            basic_properties: RmqProperties {
                message_id: message_id(slot, r),
                timestamp: r.timestamp_ms,
                headers: RmqHeaders(&r.headers),
                body_size: r.value.len(),
            },
            redelivered: redelivered(r),
            data: Base64(&r.value),
        }
    }
}

fn rfc3339(ms: Option<i64>) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.unwrap_or(0).max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

/// A reply that cannot be read as Lambda's partial-failure response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the function's batchItemFailures {0}")]
pub struct BadReply(String);

/// The positions of the records a function's reply names as failed;
/// empty when it names none (a reply without `batchItemFailures`, or
/// `null`, means the whole batch succeeded, as in Lambda). An identifier
/// that names no record of the batch fails the whole batch, as Lambda
/// treats it.
pub fn failures(format: EventFormat, batch: &Batch, reply: &Value) -> Result<Vec<i64>, BadReply> {
    let Some(list) = reply.get("batchItemFailures").filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let Some(list) = list.as_array() else {
        return Err(BadReply(format!("is not a list: {list}")));
    };
    // Each record's identifier once, not once per failed item.
    let ids: std::collections::HashMap<String, i64> =
        batch.records.iter().map(|r| (identifier(format, batch.lease.index, r), r.position())).collect();
    let mut failed = Vec::with_capacity(list.len());
    for item in list {
        let id = match item.get("itemIdentifier") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            // Lambda's Kafka form (Powertools writes it):
            // `{"partition": "topic-2", "offset": 201}`.
            Some(Value::Object(o)) if format == EventFormat::Kafka => kafka_identifier(batch, o)
                .ok_or_else(|| BadReply(format!("names {item}, which is no record of the batch")))?,
            _ => return Err(BadReply(format!("has an item without an itemIdentifier: {item}"))),
        };
        match ids.get(&id) {
            Some(position) => failed.push(*position),
            None => return Err(BadReply(format!("names `{id}`, which is no record of the batch"))),
        }
    }
    Ok(failed)
}

/// The offset a Kafka `{partition, offset}` identifier names, when its
/// partition (`topic-N`, if given) is the batch's.
fn kafka_identifier(batch: &Batch, id: &Map<String, Value>) -> Option<String> {
    let own = format!("{}-{}", batch.lease.name, batch.lease.index);
    let partition_ok = match id.get("partition") {
        None => true,
        Some(Value::String(p)) => *p == own,
        Some(Value::Number(n)) => n.as_u64() == Some(u64::from(batch.lease.index)),
        Some(_) => false,
    };
    let offset = match id.get("offset")? {
        Value::Number(n) => n.as_i64()?,
        Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    partition_ok.then(|| offset.to_string())
}

/// What a reply names a record by, in `format`.
fn identifier(format: EventFormat, index: u32, r: &Record) -> String {
    match format {
        EventFormat::Kafka | EventFormat::Kinesis => r.position().to_string(),
        EventFormat::Sqs | EventFormat::Sns | EventFormat::Rmq => MessageId(index, r.position()).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shardline_proto::LeaseId;

    use serde_json::json;

    use super::*;

    fn kafka(offset: i64, key: Option<&str>, value: Option<&str>) -> Arc<Record> {
        Arc::new(Record {
            key: key.map(|k| k.as_bytes().to_vec()),
            value: value.map(|v| v.as_bytes().to_vec()).unwrap_or_default(),
            tombstone: value.is_none(),
            headers: vec![("trace".into(), b"abc".to_vec()), ("enc".into(), "é".as_bytes().to_vec())],
            timestamp_ms: Some(1_545_084_650_987),
            origin: Origin::Kafka { partition: 3, offset },
            reply_to: None,
        })
    }

    fn queued(tag: u64, body: &str) -> Arc<Record> {
        Arc::new(Record {
            key: None,
            value: body.as_bytes().to_vec(),
            tombstone: false,
            headers: vec![("kind".into(), b"order".to_vec())],
            timestamp_ms: Some(1_545_082_649_183),
            origin: Origin::Queue { slot: 1, delivery_tag: tag, redelivered: tag == 2 },
            reply_to: None,
        })
    }

    fn json_event(format: EventFormat, batch: &Batch, brokers: &str) -> Value {
        let bytes = event(format, batch, brokers).unwrap_or_else(|e| panic!("{e}"));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}"))
    }

    fn stream_batch() -> Batch {
        let records = vec![kafka(15, Some("k1"), Some("Hello")), kafka(16, None, None)];
        Batch { records, lease: LeaseId::shard("orders", 3), epoch: 1, lag: 0, deadline_ms: 0 }
    }

    fn queue_batch() -> Batch {
        let records = vec![queued(1, "first"), queued(2, "second")];
        Batch {
            records,
            lease: LeaseId { kind: shardline_proto::LeaseKind::QueueSlot, name: "mail".into(), index: 1 },
            epoch: 1,
            lag: -1,
            deadline_ms: 0,
        }
    }

    #[test]
    fn the_kafka_event_is_lambdas_self_managed_kafka_event() {
        let e = json_event(EventFormat::Kafka, &stream_batch(), "127.0.0.1:9092");
        assert_eq!(e["eventSource"], "SelfManagedKafka");
        assert_eq!(e["bootstrapServers"], "127.0.0.1:9092");
        let records = &e["records"]["orders-3"];
        assert_eq!(records[0]["offset"], 15);
        assert_eq!(records[0]["partition"], 3);
        assert_eq!(records[0]["key"], "azE=");
        assert_eq!(records[0]["value"], "SGVsbG8=");
        assert_eq!(records[0]["headers"][0]["trace"], json!([97, 98, 99]));
        // Signed, as Lambda sends Java's bytes (its event types refuse 195).
        assert_eq!(records[0]["headers"][1]["enc"], json!([-61, -87]));
        assert_eq!(records[0]["timestamp"], 1_545_084_650_987_i64);
        assert_eq!(records[1]["value"], Value::Null, "a tombstone's value stays null");
        assert_eq!(records[1]["key"], Value::Null);
    }

    #[test]
    fn the_kinesis_event_carries_the_offset_as_sequence_number() {
        let e = json_event(EventFormat::Kinesis, &stream_batch(), "");
        let r = &e["Records"][0];
        assert_eq!(r["eventSource"], "aws:kinesis");
        assert_eq!(r["kinesis"]["sequenceNumber"], "15");
        assert_eq!(r["kinesis"]["partitionKey"], "k1");
        assert_eq!(r["kinesis"]["data"], "SGVsbG8=");
        assert_eq!(r["kinesis"]["approximateArrivalTimestamp"], 1_545_084_650.987);
        assert_eq!(r["eventSourceARN"], "arn:aws:kinesis:local:000000000000:stream/orders");
        assert_eq!(r["eventID"], "shardId-000000000003:15");
    }

    #[test]
    fn queue_events_name_messages_and_carry_bodies() {
        let batch = queue_batch();
        let sqs = json_event(EventFormat::Sqs, &batch, "");
        assert_eq!(sqs["Records"][0]["body"], "first");
        assert_eq!(sqs["Records"][0]["messageId"], "1-1");
        assert_eq!(sqs["Records"][0]["md5OfBody"], "8b04d5e3775d298e78455efc5ca404d5");
        assert_eq!(sqs["Records"][1]["attributes"]["ApproximateReceiveCount"], "2", "redelivered");
        assert_eq!(sqs["Records"][0]["messageAttributes"]["kind"]["stringValue"], "order");
        let sns = json_event(EventFormat::Sns, &batch, "");
        assert_eq!(sns["Records"][0]["Sns"]["Message"], "first");
        assert_eq!(sns["Records"][0]["Sns"]["Timestamp"], "2018-12-17T21:37:29.183Z");
        assert_eq!(sns["Records"][0]["Sns"]["MessageAttributes"]["kind"]["Value"], "order");
        let rmq = json_event(EventFormat::Rmq, &batch, "");
        assert_eq!(rmq["eventSource"], "aws:rmq");
        assert_eq!(rmq["rmqMessagesByQueue"]["mail::/"][1]["data"], "c2Vjb25k");
        assert_eq!(rmq["rmqMessagesByQueue"]["mail::/"][1]["redelivered"], true);
    }

    #[test]
    fn item_failures_map_back_to_positions_and_unknown_ids_are_refused() {
        let batch = stream_batch();
        let reply = json!({"batchItemFailures": [{"itemIdentifier": "16"}]});
        assert_eq!(failures(EventFormat::Kinesis, &batch, &reply), Ok(vec![16]));
        let numeric = json!({"batchItemFailures": [{"itemIdentifier": 15}]});
        assert_eq!(failures(EventFormat::Kafka, &batch, &numeric), Ok(vec![15]));
        // Lambda's Kafka form, as Powertools writes it.
        let object =
            json!({"batchItemFailures": [{"itemIdentifier": {"partition": "orders-3", "offset": 16}}]});
        assert_eq!(failures(EventFormat::Kafka, &batch, &object), Ok(vec![16]));
        let elsewhere =
            json!({"batchItemFailures": [{"itemIdentifier": {"partition": "orders-4", "offset": 16}}]});
        assert!(failures(EventFormat::Kafka, &batch, &elsewhere).is_err());
        assert!(
            failures(EventFormat::Kinesis, &batch, &object).is_err(),
            "only the Kafka event names records so"
        );
        for ok in
            [json!(null), json!({}), json!({"batchItemFailures": []}), json!({"batchItemFailures": null})]
        {
            assert_eq!(failures(EventFormat::Kinesis, &batch, &ok), Ok(vec![]), "{ok}");
        }
        let unknown = json!({"batchItemFailures": [{"itemIdentifier": "99"}]});
        assert!(
            failures(EventFormat::Kinesis, &batch, &unknown).is_err_and(|e| e.to_string().contains("`99`"))
        );
        let shapeless = json!({"batchItemFailures": [{"id": "15"}]});
        assert!(failures(EventFormat::Kinesis, &batch, &shapeless).is_err());
        let queue = queue_batch();
        let reply = json!({"batchItemFailures": [{"itemIdentifier": "1-2"}]});
        assert_eq!(failures(EventFormat::Sqs, &queue, &reply), Ok(vec![2]));
    }
}
