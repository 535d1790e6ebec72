//! Handlers built into `shardline-worker`, so the system runs with no user
//! code: `log` prints records, `forward` copies them to another Kafka topic
//! or RabbitMQ exchange (the load-test harness reads those as receipts),
//! `sleep` simulates work, `noop` does nothing (for benchmarks of the
//! machinery itself), `chaos` injects failures, `echo` answers synchronous
//! invocations with their own body.

use std::time::Duration;

use rdkafka::producer::FutureProducer;
use shardline_proto::topology::headers;

use crate::amqp::{Message, PublishError, Publisher};
use crate::handler::{
    Batch, BatchResponse, Handler, HandlerError, Handlers, InitContext, InitError, Record, Reply,
};

pub fn handlers() -> Handlers {
    Handlers::new()
        .with::<Log>("log")
        .with::<Forward>("forward")
        .with::<Sleep>("sleep")
        .with::<Noop>("noop")
        .with::<Chaos>("chaos")
        .with::<Echo>("echo")
}

/// Answers every record that carries `reply_to` with its own value and
/// content type, status `status` (default 200): the gateway's synchronous
/// invocation end to end, with no user code.
pub struct Echo {
    status: u16,
}

impl Handler for Echo {
    async fn init(ctx: &InitContext) -> Result<Self, InitError> {
        ctx.only(&["status"])?;
        let status = match ctx.settings.get("status") {
            None => 200,
            Some(toml::Value::Integer(n)) if (100..=599).contains(n) => *n as u16,
            Some(other) => {
                return Err(ctx.error(format!("`status` must be an HTTP status 100..=599, not {other}")));
            }
        };
        Ok(Echo { status })
    }

    async fn handle(&self, batch: &Batch) -> Result<BatchResponse, HandlerError> {
        let replies = batch
            .records
            .iter()
            .filter(|r| r.reply_to.is_some())
            .map(|r| {
                let reply = Reply::new(r, self.status, r.value.clone());
                let content_type =
                    r.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(headers::CONTENT_TYPE));
                match content_type {
                    Some((_, v)) => reply.header(headers::CONTENT_TYPE, String::from_utf8_lossy(v)),
                    None => reply,
                }
            })
            .collect();
        Ok(BatchResponse { replies, ..BatchResponse::default() })
    }
}

/// Fault injection for tests: a record whose value contains `poison` fails
/// its batch (or, with `report_items`, is reported as failed);
/// `sleep_per_batch` / `sleep_per_record` simulate work. The records that
/// succeed are forwarded to `topic` or `exchange` as receipts, like `forward`.
pub struct Chaos {
    forward: Option<Forward>,
    poison: Option<String>,
    report_items: bool,
    per_batch: Duration,
    per_record: Duration,
}

impl Handler for Chaos {
    async fn init(ctx: &InitContext) -> Result<Self, InitError> {
        ctx.only(&["topic", "exchange", "poison", "report_items", "sleep_per_batch", "sleep_per_record"])?;
        let mut to = ctx.clone();
        to.settings.retain(|k, _| k == "topic" || k == "exchange");
        let forward = if to.settings.is_empty() { None } else { Some(Forward::init(&to).await?) };
        let report_items = match ctx.settings.get("report_items") {
            None => false,
            Some(toml::Value::Boolean(b)) => *b,
            Some(other) => {
                return Err(ctx.error(format!("`report_items` must be true or false, not {other}")));
            }
        };
        Ok(Chaos {
            forward,
            poison: ctx.string("poison")?,
            report_items,
            per_batch: ctx.duration("sleep_per_batch", Duration::ZERO)?,
            per_record: ctx.duration("sleep_per_record", Duration::ZERO)?,
        })
    }

    async fn handle(&self, batch: &Batch) -> Result<BatchResponse, HandlerError> {
        // Before the simulated work: the receipts say when the invocation
        // began, not when its forwarding did.
        let invoked_at_ms = crate::unix_ms();
        tokio::time::sleep(self.per_batch + self.per_record * batch.len() as u32).await;
        let is_poison =
            |r: &Record| self.poison.as_ref().is_some_and(|p| String::from_utf8_lossy(&r.value).contains(p));
        let poisoned: Vec<i64> =
            batch.records.iter().filter(|r| is_poison(r)).map(|r| r.position()).collect();
        if !poisoned.is_empty() && !self.report_items {
            return Err(HandlerError::new(format!("poison records at offsets {poisoned:?}")));
        }
        if let Some(forward) = &self.forward {
            let records = batch.records.iter().filter(|r| !is_poison(r)).cloned().collect();
            forward.send(&Batch { records, ..batch.clone() }, invoked_at_ms).await?;
        }
        Ok(BatchResponse::failed(poisoned))
    }
}

/// Prints each record as one line on stdout.
pub struct Log;

impl Handler for Log {
    async fn init(ctx: &InitContext) -> Result<Self, InitError> {
        ctx.only(&[])?;
        Ok(Log)
    }

    async fn handle(&self, batch: &Batch) -> Result<BatchResponse, HandlerError> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for r in &batch.records {
            let key = r.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            let line = writeln!(
                out,
                "{}/{}@{} key={key} value={}",
                batch.lease.name,
                r.shard(),
                r.position(),
                String::from_utf8_lossy(&r.value)
            );
            line.map_err(|e| HandlerError::new(format!("stdout: {e}")))?;
        }
        Ok(BatchResponse::default())
    }
}

/// Writes each record to Kafka `topic` or to RabbitMQ `exchange` (exactly
/// one), keeping key and headers and adding `shardline.stream`,
/// `shardline.partition` (or slot), `shardline.offset` (or delivery tag),
/// `shardline.worker` and `shardline.invoked_at_ms` (when the invocation
/// began: the load-test harness tells a zombie's work from a lease
/// holder's by it) headers; done once the broker took every record.
pub struct Forward {
    to: Destination,
    worker: String,
}

enum Destination {
    Kafka { producer: FutureProducer, topic: String },
    Amqp { publisher: Publisher, exchange: String },
}

impl Handler for Forward {
    async fn init(ctx: &InitContext) -> Result<Self, InitError> {
        ctx.only(&["topic", "exchange"])?;
        let to = match (ctx.string("topic")?, ctx.string("exchange")?) {
            (Some(topic), None) => {
                let producer = crate::sink::kafka::producer(&ctx.kafka)
                    .map_err(|e| ctx.error(format!("kafka producer: {e}")))?;
                Destination::Kafka { producer, topic }
            }
            (None, Some(exchange)) => {
                Destination::Amqp { publisher: Publisher::new(ctx.amqp.clone()), exchange }
            }
            _ => return Err(ctx.error("set exactly one of `topic` (Kafka) or `exchange` (RabbitMQ)")),
        };
        Ok(Forward { to, worker: ctx.worker_id.clone() })
    }

    async fn handle(&self, batch: &Batch) -> Result<BatchResponse, HandlerError> {
        self.send(batch, crate::unix_ms()).await
    }
}

impl Forward {
    /// Forwards `batch` with the source headers, stamping `invoked_at_ms`
    /// (the caller's invocation start: `chaos` sleeps before forwarding).
    async fn send(&self, batch: &Batch, invoked_at_ms: u64) -> Result<BatchResponse, HandlerError> {
        let invoked_at_ms = invoked_at_ms.to_string();
        let source = |r: &Record| {
            vec![
                (headers::STREAM, batch.lease.name.clone()),
                (headers::PARTITION, r.shard().to_string()),
                (headers::OFFSET, r.position().to_string()),
                (headers::WORKER, self.worker.clone()),
                (headers::INVOKED_AT_MS, invoked_at_ms.clone()),
            ]
        };
        match &self.to {
            Destination::Kafka { producer, topic } => {
                crate::sink::kafka::copy_to(producer, topic, &batch.records, source)
                    .await
                    .map_err(|e| HandlerError::new(e.to_string()))?;
            }
            Destination::Amqp { publisher, exchange } => {
                let messages = batch.records.iter().map(|r| forwarded(exchange, r, &source(r)));
                let messages: Vec<Message> = messages
                    .collect::<Result<_, _>>()
                    .map_err(|e| HandlerError::new(format!("cannot forward to RabbitMQ: {e}")))?;
                publisher.publish(&messages).await.map_err(|e| HandlerError::new(e.to_string()))?;
            }
        }
        Ok(BatchResponse::default())
    }
}

/// The RabbitMQ copy of `r` that `forward` publishes to `exchange`: its
/// headers and `added`, the key as message id. A Kafka record's key or
/// header name may be longer than AMQP allows (255 bytes): an error, which
/// fails the batch like any handler error. Public for the fuzz targets
/// (`fuzz/`).
pub fn forwarded(exchange: &str, r: &Record, added: &[(&str, String)]) -> Result<Message, PublishError> {
    let ours = added.iter().map(|(k, v)| (*k, v.as_bytes()));
    let headers = r.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
    let message_id = r.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned());
    if let Some(id) = &message_id {
        crate::sink::publish::short_string("the record's key (the message id)", id)?;
    }
    Ok(Message {
        exchange: exchange.to_owned(),
        body: r.value.clone(),
        headers: crate::amqp::field_table(headers.chain(ours))?,
        message_id,
        timestamp: r.timestamp_ms.map(|ms| (ms / 1000) as u64),
        ..Message::default()
    })
}

/// Sleeps `per_batch` plus `per_record` × records: simulated work.
pub struct Sleep {
    per_batch: Duration,
    per_record: Duration,
}

impl Handler for Sleep {
    async fn init(ctx: &InitContext) -> Result<Self, InitError> {
        ctx.only(&["per_batch", "per_record"])?;
        Ok(Sleep {
            per_batch: ctx.duration("per_batch", Duration::ZERO)?,
            per_record: ctx.duration("per_record", Duration::from_millis(1))?,
        })
    }

    async fn handle(&self, batch: &Batch) -> Result<BatchResponse, HandlerError> {
        tokio::time::sleep(self.per_batch + self.per_record * batch.len() as u32).await;
        Ok(BatchResponse::default())
    }
}

/// Does nothing; measures the machinery.
pub struct Noop;

impl Handler for Noop {
    async fn init(ctx: &InitContext) -> Result<Self, InitError> {
        ctx.only(&[])?;
        Ok(Noop)
    }

    async fn handle(&self, _batch: &Batch) -> Result<BatchResponse, HandlerError> {
        Ok(BatchResponse::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::Origin;
    use crate::sink::publish::properties;

    fn kafka(key: Option<Vec<u8>>, headers: Vec<(String, Vec<u8>)>) -> Record {
        Record {
            key,
            value: b"v".to_vec(),
            tombstone: false,
            headers,
            timestamp_ms: Some(1_800_000_000_000),
            origin: Origin::Kafka { partition: 0, offset: 7 },
            reply_to: None,
        }
    }

    /// Found by the `worker_records` fuzz target: a Kafka key or header
    /// name longer than an AMQP short string (255 bytes) panicked the
    /// lease task forwarding it to RabbitMQ (lapin's `ShortString::from`),
    /// again on every re-grant: the partition stalled. Now the batch fails
    /// with an error naming what is too long.
    #[test]
    fn a_key_or_header_name_longer_than_amqp_allows_is_an_error_not_a_panic() {
        let long = "k".repeat(256);
        let added = [(headers::OFFSET, "7".to_owned())];
        let e = forwarded("out", &kafka(Some(long.clone().into_bytes()), Vec::new()), &added).map(|_| ());
        assert!(
            e.as_ref().is_err_and(|e| e.to_string().contains("key (the message id) is 256 bytes")),
            "{e:?}"
        );
        let e = forwarded("out", &kafka(None, vec![(long, b"v".to_vec())]), &added).map(|_| ());
        assert!(e.as_ref().is_err_and(|e| e.to_string().contains("header name `kkk")), "{e:?}");
        assert!(e.is_err_and(|e| !e.retryable()), "publishing it again cannot help");
        let fits =
            forwarded("out", &kafka(Some(vec![b'k'; 255]), vec![("h".repeat(255), Vec::new())]), &added);
        let props = fits.and_then(|m| properties(&m, 0));
        assert!(props.is_ok_and(|p| p.message_id().as_ref().is_some_and(|id| id.as_str().len() == 255)));
    }
}
