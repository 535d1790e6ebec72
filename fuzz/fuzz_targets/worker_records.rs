//! Record decoding in the worker, from arbitrary broker data: a Kafka
//! message (key, value or null value, headers with any bytes, null header
//! values) and a RabbitMQ delivery (its content-header properties parsed
//! from raw bytes as lapin parses them, and a body) become SDK records;
//! each is then matched against a mapping's `filter` (decoded from a wire
//! `Mapping`, as workers receive it), copied as `forward` copies records
//! to RabbitMQ, and (a delivery) republished as a retry or dead letter.
//! Nothing may panic, and a tombstone stays null.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use shardline_proto::{FailurePolicy, Filter, FilterTest, Mapping, v1};
use shardline_worker::builtin::forwarded;
use shardline_worker::handler::{Origin, Record, Reply};
use shardline_worker::policy::CompiledFilter;
use shardline_worker::sink::publish::{Publisher, properties};
use shardline_worker::sink::reply;
use shardline_worker::sink::retry::RetrySink;
use shardline_worker::sink::{GaveUp, Reason};
use shardline_worker::source::{amqp, kafka};

#[derive(Debug, Arbitrary)]
struct Input {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    timestamp_ms: Option<i64>,
    partition: u32,
    offset: i64,
    amqp_properties: Vec<u8>,
    body: Vec<u8>,
    delivery_tag: u64,
    redelivered: bool,
    slot: u32,
    /// A filter given directly, or a wire mapping carrying one.
    filter: (String, u8, String),
    mapping: Vec<u8>,
    attempts: u32,
    reason: u8,
    max_retries: Option<u32>,
}

fn check(r: &Record, filters: &[CompiledFilter]) {
    let _ = (r.payload_len(), r.position(), r.shard());
    if r.tombstone {
        assert_eq!(r.value(), None, "a tombstone's value is null");
    }
    for f in filters {
        let _ = f.matches(&r.value);
    }
    // `forward`'s copy to RabbitMQ: refused only when the key or a header
    // name does not fit an AMQP short string.
    let added = [("shardline.stream", "s".to_owned()), ("shardline.offset", r.position().to_string())];
    let copy = forwarded("out", r, &added).and_then(|m| properties(&m, 1_800_000_000));
    let fits = r.key.as_ref().is_none_or(|k| String::from_utf8_lossy(k).len() <= 255)
        && r.headers.iter().all(|(name, _)| name.len() <= 255);
    assert_eq!(copy.is_ok(), fits, "{copy:?}");
}

fuzz_target!(|input: Input| {
    let mut filters = Vec::new();
    let (field, test, arg) = &input.filter;
    let test = match test % 3 {
        0 => FilterTest::Equals(arg.clone()),
        1 => FilterTest::Exists,
        _ => FilterTest::Prefix(arg.clone()),
    };
    filters.extend(CompiledFilter::new(&Filter { field: field.clone(), test }).ok());
    let mapping = v1::Mapping::decode(input.mapping.as_slice()).ok();
    let mapping = mapping.and_then(|m| Mapping::try_from(&m).ok());
    filters
        .extend(mapping.as_ref().and_then(|m| m.filter.as_ref()).and_then(|f| CompiledFilter::new(f).ok()));

    // Kafka: librdkafka's header names end at their first NUL.
    let names: Vec<&[u8]> =
        input.headers.iter().map(|(n, _)| n.split(|b| *b == 0).next().unwrap_or_default()).collect();
    let headers: Vec<(&[u8], Option<&[u8]>)> =
        names.iter().zip(&input.headers).map(|(n, (_, v))| (*n, v.as_deref())).collect();
    let r = kafka::record(kafka::RawMessage {
        key: input.key.as_deref(),
        payload: input.payload.as_deref(),
        headers: &headers,
        timestamp_ms: input.timestamp_ms,
        partition: input.partition,
        offset: input.offset,
    });
    assert_eq!(r.tombstone, input.payload.is_none(), "a null value and only that is a tombstone");
    check(&r, &filters);

    // RabbitMQ: properties as lapin parses a content header.
    let Ok((_, props)) = lapin::protocol::basic::parse_properties(input.amqp_properties.as_slice()) else {
        return;
    };
    let origin =
        Origin::Queue { slot: input.slot, delivery_tag: input.delivery_tag, redelivered: input.redelivered };
    let r = amqp::record(&props, input.body.clone(), origin);
    check(&r, &filters);
    // A reply to a request: its address and correlation id came in as AMQP
    // short strings, so the reply always fits.
    if let Some(to) = &r.reply_to {
        let reply = Reply::new(&r, 200, r.value.clone()).header("content-type", "text/plain");
        match reply::message(to, &reply) {
            Ok(m) => {
                if let Err(e) = properties(&m, 1_800_000_000) {
                    panic!("a reply cannot be written: {e}");
                }
            }
            Err(e) => panic!("a reply to a delivery cannot be built: {e}"),
        }
    }
    let policy =
        FailurePolicy { max_retries: input.max_retries, ..mapping.map(|m| m.policy).unwrap_or_default() };
    let sink = RetrySink::new(Publisher::connect("amqp://127.0.0.1:1/%2f", "fuzz"), "emails", &policy, "w0");
    if let Ok(mut kept) = sink.properties.lock() {
        kept.insert(input.delivery_tag, props);
    }
    let reason = match input.reason % 3 {
        0 => Reason::RetriesExhausted,
        1 => Reason::TooOld,
        _ => Reason::HandlerTimeout,
    };
    let why = GaveUp { reason, attempts: input.attempts, error: "boom".into() };
    // A delivery's own headers and message id always fit: its republished
    // copy is always written.
    match sink.message(&r, &why, 1_800_000_000_000, "2027-01-15T08:00:00Z") {
        Ok((message, _to_dlq)) => {
            if let Err(e) = properties(&message, 1_800_000_000) {
                panic!("a delivery's retry cannot be written: {e}");
            }
        }
        Err(e) => panic!("a delivery's retry cannot be built: {e}"),
    }
});
