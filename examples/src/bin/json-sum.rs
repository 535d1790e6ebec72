//! A worker with a user handler: sums the `amount` field of JSON records
//! and prints a running total per batch.
//!
//! `init` runs once per worker process (here it just reads a setting); every
//! batch of every lease on the process shares the result. A record that is
//! not JSON fails the batch, which the worker retries (later: bisects and
//! sends to on_failure, per the mapping's policy).
//!
//! Run: `cargo run -p shardline-examples --bin json-sum -- --config worker.toml`
//! with a worker config containing `[handlers.json-sum]` and optionally
//! `field = "amount"`, and a coordinator mapping a stream to `json-sum`.

use std::sync::atomic::{AtomicI64, Ordering};

use shardline_worker::{Batch, BatchResponse, Handler, HandlerError, Handlers, InitContext, InitError};

struct JsonSum {
    field: String,
    total: AtomicI64,
}

impl Handler for JsonSum {
    async fn init(ctx: &InitContext) -> Result<Self, InitError> {
        ctx.only(&["field"])?;
        let field = ctx.string("field")?.unwrap_or_else(|| "amount".into());
        Ok(JsonSum { field, total: AtomicI64::new(0) })
    }

    async fn handle(&self, batch: &Batch) -> Result<BatchResponse, HandlerError> {
        let mut sum = 0;
        for record in &batch.records {
            let value: serde_json::Value = serde_json::from_slice(&record.value)
                .map_err(|e| HandlerError::new(format!("record {} is not JSON: {e}", record.position())))?;
            sum += value.get(&self.field).and_then(serde_json::Value::as_i64).unwrap_or(0);
        }
        let total = self.total.fetch_add(sum, Ordering::Relaxed) + sum;
        println!("{}: {} records, +{sum}, total {total}", batch.lease, batch.len());
        Ok(BatchResponse::default())
    }
}

fn main() -> std::process::ExitCode {
    // The stock worker's command line, logging, metrics, signal handling
    // and exit codes, hosting this handler.
    shardline_worker::main(Handlers::new().with::<JsonSum>("json-sum"))
}
