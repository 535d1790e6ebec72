//! `audit`: records every message of its subscription once in
//! `audit_log`, keyed by message id. RabbitMQ delivers at least once (a
//! worker killed mid-batch gets its messages redelivered), so the insert
//! ignores an id already there: each message is in the log exactly once.
//! Its subscription never gives up (`max_retries = -1`): while PostgreSQL
//! is down every batch fails and waits in the retry queues, none is
//! dead-lettered.

use shardline_worker::{Batch, BatchResponse, Handler, HandlerError, InitContext, InitError, Record};

use crate::db::{self, Pool};
use crate::settings::AuditSettings;

pub struct Audit {
    pool: Pool,
    insert: String,
}

/// The message id, or for a message published without one a hash of its
/// body (so a redelivery still finds its row).
pub fn message_id(record: &Record) -> String {
    match record.key.as_deref().map(String::from_utf8_lossy) {
        Some(id) if !id.is_empty() => id.into_owned(),
        _ => {
            // FNV-1a, 64 bits: stable across processes and versions.
            let hash = record.value.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
            format!("body-{hash:016x}")
        }
    }
}

impl Handler for Audit {
    async fn init(ctx: &InitContext) -> Result<Self, InitError> {
        let settings = AuditSettings::from_table(&ctx.settings).map_err(|e| ctx.error(e))?;
        let pool = Pool::new(&settings.postgres, usize::try_from(ctx.concurrency).unwrap_or(1));
        let mut client = pool.connect().await.map_err(|e| ctx.error(e))?;
        db::create(&mut client, &settings.schema)
            .await
            .map_err(|e| ctx.error(format!("cannot create the tables in `{}`: {e}", settings.schema)))?;
        let insert = format!(
            "INSERT INTO {}.audit_log (message_id, body) SELECT * FROM unnest($1::text[], $2::text[])
             ON CONFLICT (message_id) DO NOTHING",
            settings.schema
        );
        Ok(Audit { pool, insert })
    }

    async fn handle(&self, batch: &Batch) -> Result<BatchResponse, HandlerError> {
        let ids: Vec<String> = batch.records.iter().map(|r| message_id(r)).collect();
        let bodies: Vec<String> =
            batch.records.iter().map(|r| String::from_utf8_lossy(&r.value).into_owned()).collect();
        let mut conn = self.pool.get().await.map_err(HandlerError::new)?;
        let inserted =
            match conn.client().map_err(HandlerError::new)?.execute(&self.insert, &[&ids, &bodies]).await {
                Ok(n) => n,
                Err(e) => {
                    conn.discard();
                    // The whole batch fails and is retried: nothing is dropped.
                    return Err(HandlerError::new(format!(
                        "{}: cannot write the audit log: {e}",
                        batch.lease
                    )));
                }
            };
        metrics::counter!("fanout_audit_recorded_total").increment(inserted);
        let again = (batch.len() as u64).saturating_sub(inserted);
        if again > 0 {
            metrics::counter!("fanout_audit_redelivered_total").increment(again);
            tracing::info!(lease = %batch.lease, again, "messages already in the audit log (redelivered)");
        }
        Ok(BatchResponse::default())
    }
}
