//! Per-key counts per window, with shardline's tumbling windows and no
//! store of its own: each invocation adds its records' keys to the window
//! state it was given (a JSON object, key → count) and returns it; the
//! window's final invocation writes one record per key to the `topic`
//! setting's Kafka topic: `{stream, partition, window_start, window_end,
//! key, count}`, keyed `partition/window_start/key`.
//!
//! The state lives in the coordinator with the shard's checkpoint, so a
//! worker killed mid-window costs nothing: the next owner resumes the
//! window with the state of the last checkpoint and the records after it.
//! A final invocation that ran but was not checkpointed runs again: its
//! counts are written again, equal (consumers keep the last per key).
//!
//! Run it with a stream whose mapping sets `tumbling_window` (see the
//! README): `window-counts --config worker.toml`.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use shardline_worker::{Batch, BatchResponse, Handler, HandlerError, Handlers, InitContext, InitError};

/// The handler: where the counts go, and (for demos and tests) how long
/// each batch pretends to work.
struct WindowCounts {
    producer: FutureProducer,
    topic: String,
    work_per_batch: Duration,
}

/// A window's state: count per key (a record without a key counts as "").
type Counts = BTreeMap<String, u64>;

impl Handler for WindowCounts {
    async fn init(ctx: &InitContext) -> Result<Self, InitError> {
        ctx.only(&["topic", "work_per_batch"])?;
        let topic = ctx
            .string("topic")?
            .ok_or_else(|| ctx.error("`topic` (the Kafka topic the counts go to) is required"))?;
        let producer = shardline_worker::sink::kafka::producer(&ctx.kafka)
            .map_err(|e| ctx.error(format!("kafka producer: {e}")))?;
        Ok(Self { producer, topic, work_per_batch: ctx.duration("work_per_batch", Duration::ZERO)? })
    }

    async fn handle(&self, batch: &Batch) -> Result<BatchResponse, HandlerError> {
        let window = batch.window.as_ref().ok_or_else(|| {
            HandlerError::new(
                "window-counts needs `tumbling_window` on its stream's mapping: this batch has no window",
            )
        })?;
        let mut counts: Counts = match &window.state {
            Some(state) => serde_json::from_slice(state).map_err(|e| {
                HandlerError::new(format!("the window state is not a key → count object: {e}"))
            })?,
            None => Counts::new(),
        };
        for r in &batch.records {
            let key = r.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            *counts.entry(key.into_owned()).or_default() += 1;
        }
        if !self.work_per_batch.is_zero() {
            tokio::time::sleep(self.work_per_batch).await;
        }
        if window.is_final {
            self.write(batch, window, &counts).await?;
        }
        let state = serde_json::to_vec(&counts).map_err(|e| HandlerError::new(format!("state: {e}")))?;
        Ok(BatchResponse { state: Some(state), ..BatchResponse::default() })
    }
}

impl WindowCounts {
    /// One record per key, each acknowledged (acks as the `[kafka]`
    /// properties say) before the final invocation succeeds.
    async fn write(
        &self,
        batch: &Batch,
        window: &shardline_worker::window::Window,
        counts: &Counts,
    ) -> Result<(), HandlerError> {
        let partition = batch.lease.index;
        let rows: Vec<(String, Value)> = counts
            .iter()
            .map(|(key, count)| {
                let id = format!("{partition}/{}/{key}", window.start_ms);
                let row = json!({
                    "stream": batch.lease.name, "partition": partition,
                    "window_start": window.start_ms, "window_end": window.end_ms,
                    "key": key, "count": count,
                });
                (id, row)
            })
            .collect();
        let sends = rows.iter().map(|(id, row)| {
            let payload = row.to_string();
            async move {
                let record = FutureRecord::to(&self.topic).key(id).payload(&payload);
                self.producer.send(record, Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| e)
            }
        });
        for sent in futures::future::join_all(sends).await {
            sent.map_err(|e| HandlerError::new(format!("writing the counts to `{}`: {e}", self.topic)))?;
        }
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    shardline_worker::main(Handlers::new().with::<WindowCounts>("window-counts"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_worker_config_hosts_the_handler_with_its_settings() {
        let config: shardline_worker::WorkerConfig =
            toml::from_str(include_str!("../worker.toml")).unwrap_or_else(|e| panic!("{e}"));
        let settings =
            config.handlers.get("window-counts").unwrap_or_else(|| panic!("[handlers.window-counts]"));
        assert!(settings.get("topic").and_then(toml::Value::as_str).is_some_and(|t| !t.is_empty()));
    }
}
