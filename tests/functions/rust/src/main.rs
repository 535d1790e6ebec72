//! The Rust test fixture function of the `function` handler kind (issue 16),
//! written the way a user writes a Lambda function with the crates.io
//! `lambda_runtime` and `aws_lambda_events`. The Python and Node.js fixtures
//! behave the same; the contract is in the shared spec:
//!
//! - the event is a Kinesis (`Records[0].kinesis`), SQS (`Records[0].body`)
//!   or self-managed Kafka (top-level `records`) event; an empty `Records`
//!   list has nothing to do;
//! - per record, by its text: `poison` → reported in `batchItemFailures`;
//!   `throw` → the invocation returns an error; `crash` → the process exits
//!   with status 3 the first time (a marker file under `$MARKERS` remembers);
//!   `slow` → sleeps 30 s the first time; anything else (and crash or slow
//!   the second time) → `text\n` appended to `$RECEIPTS`;
//! - one stdout line per invocation, `handled N records`;
//! - `FAIL_INIT` set and non-empty → `main` fails before the runtime starts.
//!   `lambda_runtime` (1.5) posts `/runtime/init/error` only for SnapStart
//!   hooks; a plain function's init failure is `main` returning `Err`, which
//!   exits with status 1 before the first `/next`, and that is what users'
//!   functions do.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use aws_lambda_events::event::kafka::KafkaEvent;
use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::sqs::SqsEvent;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde::Serialize;
use serde_json::Value;

/// Lambda's partial-failure reply, the same for every event source.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Reply {
    batch_item_failures: Vec<ItemFailure>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ItemFailure {
    item_identifier: String,
}

/// One record as the contract sees it: what it says and what a reply names
/// it by.
struct Item {
    text: String,
    id: String,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    // Where a real function would load its configuration or open its
    // clients, and fail if it cannot.
    if let Some(why) = std::env::var("FAIL_INIT").ok().filter(|v| !v.is_empty()) {
        return Err(format!("init failed: FAIL_INIT={why}").into());
    }
    lambda_runtime::run(service_fn(handle)).await
}

async fn handle(event: LambdaEvent<Value>) -> Result<Reply, Error> {
    let items = items(event.payload)?;
    let mut reply = Reply::default();
    for item in &items {
        let text = item.text.as_str();
        if text.contains("poison") {
            reply.batch_item_failures.push(ItemFailure { item_identifier: item.id.clone() });
            continue;
        }
        if text.contains("throw") {
            return Err(format!("throw record {text}").into());
        }
        if text.contains("crash") && first_time("crash", text)? {
            // At once, as a segfault or an OOM kill would: no reply, no flush.
            std::process::exit(3);
        }
        if text.contains("slow") && first_time("slow", text)? {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        receipt(text)?;
    }
    println!("handled {} records", items.len());
    Ok(reply)
}

/// The records of whichever event this is, in order.
fn items(payload: Value) -> Result<Vec<Item>, Error> {
    let first = payload.get("Records").and_then(|r| r.get(0));
    if let Some(first) = first {
        if first.get("kinesis").is_some() {
            let event: KinesisEvent = serde_json::from_value(payload)?;
            return event
                .records
                .into_iter()
                .map(|r| {
                    let text = String::from_utf8(r.kinesis.data.0)?;
                    Ok(Item { text, id: r.kinesis.sequence_number })
                })
                .collect();
        }
        if first.get("body").is_some() {
            let event: SqsEvent = serde_json::from_value(payload)?;
            return Ok(event
                .records
                .into_iter()
                .map(|m| Item { text: m.body.unwrap_or_default(), id: m.message_id.unwrap_or_default() })
                .collect());
        }
        return Err(format!("an event this function does not handle: {first}").into());
    }
    if payload.get("Records").is_some_and(|r| r.as_array().is_some_and(Vec::is_empty)) {
        return Ok(Vec::new());
    }
    if payload.get("records").is_some_and(Value::is_object) {
        let event: KafkaEvent = serde_json::from_value(payload)?;
        // One topic-partition per event from an event source mapping; sorted
        // so that more than one would still be handled in a fixed order.
        let mut partitions: Vec<_> = event.records.into_iter().collect();
        partitions.sort_by(|a, b| a.0.cmp(&b.0));
        let mut items = Vec::new();
        for (_, records) in partitions {
            for r in records {
                let bytes = match r.value {
                    Some(v) => B64.decode(v)?,
                    None => Vec::new(),
                };
                items.push(Item { text: String::from_utf8(bytes)?, id: r.offset.to_string() });
            }
        }
        return Ok(items);
    }
    Err(format!("an event this function does not handle: {payload}").into())
}

/// Whether this is the first time `kind` meets `text`; marks it if so.
fn first_time(kind: &str, text: &str) -> Result<bool, Error> {
    let name: String = text.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let marker = PathBuf::from(env("MARKERS")?).join(format!("{kind}-{name}"));
    match OpenOptions::new().write(true).create_new(true).open(&marker) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(format!("marker {}: {e}", marker.display()).into()),
    }
}

/// One write per line, so that concurrent processes appending to the same
/// file never interleave inside a line.
fn receipt(text: &str) -> Result<(), Error> {
    let path = env("RECEIPTS")?;
    let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
    file.write_all(format!("{text}\n").as_bytes())?;
    file.flush()?;
    Ok(())
}

fn env(name: &str) -> Result<String, Error> {
    std::env::var(name).map_err(|_| format!("environment variable {name} is not set").into())
}
