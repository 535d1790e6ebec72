//! `notify`: a slow notifier (`per_message` of simulated sending each)
//! that may give up. A recipient at `bounce_domain` bounces every time:
//! that message is reported failed on its own (`report_item_failures`),
//! retried a few times through its subscription's retry queues, then
//! dead-lettered with the error, while the rest of its batch counts as
//! sent. Sent notifications are recorded in `notified` (once per message
//! id, however often RabbitMQ delivers it).

use serde::Deserialize;
use shardline_worker::{Batch, BatchResponse, Handler, HandlerError, InitContext, InitError};

use crate::audit::message_id;
use crate::db::{self, Pool};
use crate::settings::NotifySettings;

pub struct Notify {
    pool: Pool,
    settings: NotifySettings,
    insert: String,
}

/// The part of a notification the notifier reads.
#[derive(Deserialize)]
struct Notification {
    recipient: String,
}

impl Handler for Notify {
    async fn init(ctx: &InitContext) -> Result<Self, InitError> {
        let settings = NotifySettings::from_table(&ctx.settings).map_err(|e| ctx.error(e))?;
        let pool = Pool::new(&settings.postgres, usize::try_from(ctx.concurrency).unwrap_or(1));
        let mut client = pool.connect().await.map_err(|e| ctx.error(e))?;
        db::create(&mut client, &settings.schema)
            .await
            .map_err(|e| ctx.error(format!("cannot create the tables in `{}`: {e}", settings.schema)))?;
        let insert = format!(
            "INSERT INTO {}.notified (message_id, recipient) SELECT * FROM unnest($1::text[], $2::text[])
             ON CONFLICT (message_id) DO NOTHING",
            settings.schema
        );
        Ok(Notify { pool, settings, insert })
    }

    async fn handle(&self, batch: &Batch) -> Result<BatchResponse, HandlerError> {
        let bounce = format!("@{}", self.settings.bounce_domain);
        let (mut ids, mut recipients, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        for record in &batch.records {
            // The slow part: talking to the mail or push service.
            tokio::time::sleep(self.settings.per_message).await;
            match serde_json::from_slice::<Notification>(&record.value) {
                Ok(n) if n.recipient.ends_with(&bounce) => {
                    tracing::info!(lease = %batch.lease, recipient = %n.recipient, "notification bounced");
                    failed.push(record.position());
                }
                Ok(n) => {
                    ids.push(message_id(record));
                    recipients.push(n.recipient);
                }
                Err(e) => {
                    tracing::warn!(lease = %batch.lease, error = %e, "not a notification; giving it up");
                    failed.push(record.position());
                }
            }
        }
        let mut conn = self.pool.get().await.map_err(HandlerError::new)?;
        let written =
            conn.client().map_err(HandlerError::new)?.execute(&self.insert, &[&ids, &recipients]).await;
        if let Err(e) = written {
            conn.discard();
            // Fail the batch: the sent ones are recorded on the retry.
            return Err(HandlerError::new(format!("{}: cannot record sent notifications: {e}", batch.lease)));
        }
        metrics::counter!("fanout_notify_sent_total").increment(ids.len() as u64);
        metrics::counter!("fanout_notify_failed_total").increment(failed.len() as u64);
        Ok(BatchResponse::failed(failed))
    }
}
