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

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use md5::{Digest, Md5};
use serde_json::{Map, Value, json};

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

/// The event for `batch` in `format`; `brokers` fills the Kafka event's
/// `bootstrapServers`.
pub fn event(format: EventFormat, batch: &Batch, brokers: &str) -> Value {
    let name = &batch.lease.name;
    let records = batch.records.iter().map(|r| r.as_ref());
    match format {
        EventFormat::Kafka => {
            let key = format!("{name}-{}", batch.lease.index);
            let list: Vec<Value> = records.map(|r| kafka_record(name, batch.lease.index, r)).collect();
            let mut by_partition = Map::new();
            by_partition.insert(key, Value::Array(list));
            json!({
                "eventSource": "SelfManagedKafka",
                "bootstrapServers": brokers,
                "records": by_partition,
            })
        }
        EventFormat::Kinesis => {
            let arn = format!("arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{name}");
            let shard = format!("shardId-{:012}", batch.lease.index);
            let list: Vec<Value> = records.map(|r| kinesis_record(&arn, &shard, r)).collect();
            json!({ "Records": list })
        }
        EventFormat::Sqs => {
            let arn = format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}");
            let list: Vec<Value> = records.map(|r| sqs_record(&arn, batch.lease.index, r)).collect();
            json!({ "Records": list })
        }
        EventFormat::Sns => {
            let arn = format!("arn:aws:sns:{REGION}:{ACCOUNT}:{name}");
            let list: Vec<Value> = records.map(|r| sns_record(&arn, batch.lease.index, r)).collect();
            json!({ "Records": list })
        }
        EventFormat::Rmq => {
            let list: Vec<Value> = records.map(|r| rmq_message(batch.lease.index, r)).collect();
            let mut by_queue = Map::new();
            by_queue.insert(format!("{name}::/"), Value::Array(list));
            json!({
                "eventSource": "aws:rmq",
                "eventSourceArn": format!("arn:aws:mq:{REGION}:{ACCOUNT}:broker:shardline:{name}"),
                "rmqMessagesByQueue": by_queue,
            })
        }
    }
}

fn kafka_record(topic: &str, partition: u32, r: &Record) -> Value {
    let headers: Vec<Value> = r
        .headers
        .iter()
        .map(|(name, value)| {
            let mut h = Map::new();
            h.insert(name.clone(), Value::Array(value.iter().map(|b| Value::from(*b as i8)).collect()));
            Value::Object(h)
        })
        .collect();
    json!({
        "topic": topic,
        "partition": partition,
        "offset": r.position(),
        "timestamp": r.timestamp_ms.unwrap_or(0),
        "timestampType": "CREATE_TIME",
        "key": r.key.as_ref().map(|k| B64.encode(k)),
        "value": r.value().map(|v| B64.encode(v)),
        "headers": headers,
    })
}

fn kinesis_record(arn: &str, shard: &str, r: &Record) -> Value {
    let sequence = r.position().to_string();
    json!({
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": r.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
            "sequenceNumber": sequence,
            "data": B64.encode(&r.value),
            "approximateArrivalTimestamp": r.timestamp_ms.unwrap_or(0) as f64 / 1000.0,
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": format!("{shard}:{sequence}"),
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": format!("arn:aws:iam::{ACCOUNT}:role/shardline"),
        "awsRegion": REGION,
        "eventSourceARN": arn,
    })
}

/// A queue record's id in the sqs, sns and rmq events: its slot and
/// delivery tag, unique among the records of one batch.
fn message_id(slot: u32, r: &Record) -> String {
    format!("{slot}-{}", r.position())
}

fn sqs_record(arn: &str, slot: u32, r: &Record) -> Value {
    let redelivered = matches!(r.origin, Origin::Queue { redelivered: true, .. });
    let sent = r.timestamp_ms.unwrap_or(0).to_string();
    json!({
        "messageId": message_id(slot, r),
        "receiptHandle": message_id(slot, r),
        "body": String::from_utf8_lossy(&r.value),
        "attributes": {
            "ApproximateReceiveCount": if redelivered { "2" } else { "1" },
            "SentTimestamp": sent,
            "SenderId": "shardline",
            "ApproximateFirstReceiveTimestamp": sent,
        },
        "messageAttributes": attributes(r, "stringValue", "String"),
        "md5OfBody": format!("{:x}", Md5::digest(&r.value)),
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": REGION,
    })
}

fn sns_record(arn: &str, slot: u32, r: &Record) -> Value {
    json!({
        "EventVersion": "1.0",
        "EventSubscriptionArn": format!("{arn}:shardline"),
        "EventSource": "aws:sns",
        "Sns": {
            "Type": "Notification",
            "MessageId": message_id(slot, r),
            "TopicArn": arn,
            "Subject": Value::Null,
            "Message": String::from_utf8_lossy(&r.value),
            "Timestamp": rfc3339(r.timestamp_ms),
            "MessageAttributes": attributes(r, "Value", "String"),
        },
    })
}

fn rmq_message(slot: u32, r: &Record) -> Value {
    let mut headers = Map::new();
    for (name, value) in &r.headers {
        headers.insert(name.clone(), Value::from(String::from_utf8_lossy(value).into_owned()));
    }
    json!({
        "basicProperties": {
            "messageId": message_id(slot, r),
            "timestamp": r.timestamp_ms,
            "headers": headers,
            "bodySize": r.value.len(),
        },
        "redelivered": matches!(r.origin, Origin::Queue { redelivered: true, .. }),
        "data": B64.encode(&r.value),
    })
}

/// Headers as SQS/SNS message attributes of type `String`.
fn attributes(r: &Record, value_key: &str, type_key: &str) -> Value {
    let mut out = Map::new();
    for (name, value) in &r.headers {
        let text = String::from_utf8_lossy(value).into_owned();
        let attribute = if value_key == "Value" {
            json!({ "Type": type_key, "Value": text })
        } else {
            json!({ "dataType": type_key, "stringValue": text })
        };
        out.insert(name.clone(), attribute);
    }
    Value::Object(out)
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
        let found = batch.records.iter().find(|r| identifier(format, batch.lease.index, r) == id);
        match found {
            Some(r) => failed.push(r.position()),
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
        EventFormat::Sqs | EventFormat::Sns | EventFormat::Rmq => message_id(index, r),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shardline_proto::LeaseId;

    use super::*;

    fn kafka(offset: i64, key: Option<&str>, value: Option<&str>) -> Arc<Record> {
        Arc::new(Record {
            key: key.map(|k| k.as_bytes().to_vec()),
            value: value.map(|v| v.as_bytes().to_vec()).unwrap_or_default(),
            tombstone: value.is_none(),
            headers: vec![("trace".into(), b"abc".to_vec()), ("enc".into(), "é".as_bytes().to_vec())],
            timestamp_ms: Some(1_545_084_650_987),
            origin: Origin::Kafka { partition: 3, offset },
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
        })
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
        let e = event(EventFormat::Kafka, &stream_batch(), "127.0.0.1:9092");
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
        let e = event(EventFormat::Kinesis, &stream_batch(), "");
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
        let sqs = event(EventFormat::Sqs, &batch, "");
        assert_eq!(sqs["Records"][0]["body"], "first");
        assert_eq!(sqs["Records"][0]["messageId"], "1-1");
        assert_eq!(sqs["Records"][0]["md5OfBody"], "8b04d5e3775d298e78455efc5ca404d5");
        assert_eq!(sqs["Records"][1]["attributes"]["ApproximateReceiveCount"], "2", "redelivered");
        assert_eq!(sqs["Records"][0]["messageAttributes"]["kind"]["stringValue"], "order");
        let sns = event(EventFormat::Sns, &batch, "");
        assert_eq!(sns["Records"][0]["Sns"]["Message"], "first");
        assert_eq!(sns["Records"][0]["Sns"]["Timestamp"], "2018-12-17T21:37:29.183Z");
        assert_eq!(sns["Records"][0]["Sns"]["MessageAttributes"]["kind"]["Value"], "order");
        let rmq = event(EventFormat::Rmq, &batch, "");
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
