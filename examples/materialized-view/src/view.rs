//! The handler: each batch is ONE PostgreSQL transaction that
//!
//! 1. locks its partition's row in `applied` (stream, partition, epoch,
//!    next_offset), creating it at the first batch;
//! 2. refuses the batch if the stored epoch is greater than the batch's:
//!    the lease was granted again since this worker got it (every grant
//!    raises the epoch by one), so this worker is a zombie, e.g. one that
//!    was frozen past its session and has not noticed yet;
//! 3. skips records below `next_offset`: an earlier owner applied them but
//!    its checkpoint never reached the coordinator (it was `kill -9`ed), so
//!    the lease's next owner is given them again;
//! 4. applies the rest to the view tables, incrementally from `before`
//!    and `after`, and stores `next_offset` and the epoch; then commits.
//!
//! So every change is in the view exactly once whoever runs the lease and
//! however often a batch is retried, and a zombie writes nothing: its
//! transaction either locks the row before the next owner does (and the
//! next owner skips what it applied) or after (and finds a greater epoch).
//! A zombie frozen *inside* its transaction holds the row lock; the server
//! ends its session after `idle_in_transaction_timeout` and the next owner
//! goes on. This needs `parallelization_factor = 1` (the default): one
//! batch of a partition at a time, in order.

use shardline_worker::{Batch, BatchResponse, Fence, Handler, HandlerError, InitContext, InitError, Origin};
use tokio_postgres::Client;

use crate::change::{Change, Delta};
use crate::pool::Pool;
use crate::settings::Settings;

pub struct View {
    pool: Pool,
    sql: Sql,
}

/// The statements, with the schema written in (it is checked to be a
/// plain identifier).
struct Sql {
    create: String,
    lock: String,
    refused: String,
    customers: String,
    customers_gone: String,
    statuses: String,
    statuses_gone: String,
    rows: String,
    rows_gone: String,
    advance: String,
}

impl Sql {
    fn new(s: &str) -> Self {
        Self {
            create: format!(
                "CREATE SCHEMA IF NOT EXISTS {s};
                 CREATE TABLE IF NOT EXISTS {s}.applied (
                     stream text NOT NULL, partition int NOT NULL,
                     epoch bigint NOT NULL, next_offset bigint NOT NULL,
                     applied bigint NOT NULL DEFAULT 0, skipped bigint NOT NULL DEFAULT 0,
                     refused bigint NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now(),
                     PRIMARY KEY (stream, partition));
                 CREATE TABLE IF NOT EXISTS {s}.orders (
                     id bigint PRIMARY KEY, version bigint NOT NULL,
                     customer text NOT NULL, amount bigint NOT NULL, status text NOT NULL);
                 CREATE TABLE IF NOT EXISTS {s}.customer_totals (
                     customer text PRIMARY KEY, orders bigint NOT NULL, amount bigint NOT NULL);
                 CREATE TABLE IF NOT EXISTS {s}.status_counts (
                     status text PRIMARY KEY, orders bigint NOT NULL);"
            ),
            // ON CONFLICT DO UPDATE locks the existing row, so this is the
            // lock and the read in one round trip.
            lock: format!(
                "INSERT INTO {s}.applied AS a (stream, partition, epoch, next_offset) VALUES ($1, $2, 0, 0)
                 ON CONFLICT (stream, partition) DO UPDATE SET stream = a.stream
                 RETURNING epoch, next_offset"
            ),
            refused: format!(
                "UPDATE {s}.applied SET refused = refused + 1 WHERE stream = $1 AND partition = $2"
            ),
            // Keys arrive sorted (BTreeMap), so concurrent batches of
            // different partitions lock shared rows in the same order and
            // cannot deadlock each other.
            customers: format!(
                "INSERT INTO {s}.customer_totals AS t (customer, orders, amount)
                 SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[])
                 ON CONFLICT (customer) DO UPDATE
                 SET orders = t.orders + EXCLUDED.orders, amount = t.amount + EXCLUDED.amount"
            ),
            customers_gone: format!(
                "DELETE FROM {s}.customer_totals WHERE customer = ANY($1) AND orders = 0 AND amount = 0"
            ),
            statuses: format!(
                "INSERT INTO {s}.status_counts AS t (status, orders)
                 SELECT * FROM unnest($1::text[], $2::int8[])
                 ON CONFLICT (status) DO UPDATE SET orders = t.orders + EXCLUDED.orders"
            ),
            statuses_gone: format!("DELETE FROM {s}.status_counts WHERE status = ANY($1) AND orders = 0"),
            rows: format!(
                "INSERT INTO {s}.orders AS o (id, version, customer, amount, status)
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[], $4::int8[], $5::text[])
                 ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, customer = EXCLUDED.customer,
                     amount = EXCLUDED.amount, status = EXCLUDED.status"
            ),
            rows_gone: format!("DELETE FROM {s}.orders WHERE id = ANY($1)"),
            advance: format!(
                "UPDATE {s}.applied SET epoch = GREATEST(epoch, $3), next_offset = GREATEST(next_offset, $4),
                     applied = applied + $5, skipped = skipped + $6, updated_at = now()
                 WHERE stream = $1 AND partition = $2"
            ),
        }
    }
}

/// What one batch's transaction did.
enum Outcome {
    Committed {
        applied: i64,
        skipped: i64,
    },
    /// The stored epoch is newer: nothing written.
    Zombie {
        stored: i64,
    },
}

/// A batch's records parsed before the database is touched: (offset,
/// change), `None` for a tombstone (Debezium's marker after a delete,
/// for log compaction: nothing to apply).
type Parsed = Vec<(i64, Option<Change>)>;

impl View {
    /// Connects and creates the schema and tables if missing: what `init`
    /// does with the handler's settings (`connections`, else
    /// `default_connections`, is the pool's size).
    pub async fn open(settings: &Settings, default_connections: usize) -> Result<Self, String> {
        let size = settings.connections.unwrap_or(default_connections);
        let pool = Pool::new(&settings.postgres, size, settings.idle_in_transaction_timeout);
        let sql = Sql::new(&settings.schema);
        // Idempotent, and serialized: several workers starting at once
        // would otherwise race on CREATE TABLE IF NOT EXISTS.
        let mut client = pool.connect().await?;
        let created = async {
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock(hashtext('shardline-example-materialized-view'))", &[])
                .await?;
            tx.batch_execute(&sql.create).await?;
            tx.commit().await
        };
        created
            .await
            .map_err(|e| format!("cannot create the view's tables in `{}`: {e}", settings.schema))?;
        tracing::info!(schema = %settings.schema, connections = size, "materialized view ready");
        Ok(View { pool, sql })
    }

    fn parse(batch: &Batch) -> Result<(i32, Parsed), HandlerError> {
        let mut partition = None;
        let mut parsed = Vec::with_capacity(batch.len());
        for record in &batch.records {
            let Origin::Kafka { partition: p, offset } = record.origin else {
                return Err(HandlerError::new(format!(
                    "{} is not a Kafka stream: the view needs a partition's offsets",
                    batch.lease
                )));
            };
            partition.get_or_insert(p);
            let change = match record.value() {
                None => None,
                Some(value) => Some(Change::parse(value).map_err(|e| {
                    HandlerError::new(format!("record {p}@{offset} of {}: {e}", batch.lease))
                })?),
            };
            parsed.push((offset, change));
        }
        let partition = i32::try_from(partition.unwrap_or(0))
            .map_err(|_| HandlerError::new(format!("{}: partition out of range", batch.lease)))?;
        Ok((partition, parsed))
    }

    async fn apply(
        &self,
        client: &mut Client,
        stream: &str,
        partition: i32,
        fence: &Fence,
        records: &Parsed,
    ) -> Result<Outcome, tokio_postgres::Error> {
        let tx = client.transaction().await?;
        let row = tx.query_one(&self.sql.lock, &[&stream, &partition]).await?;
        let (stored, next): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        // A stored epoch is one a batch quoted, so never negative.
        if fence.is_stale(u64::try_from(stored).unwrap_or(0)) {
            // Dropping the transaction rolls it back: nothing written.
            return Ok(Outcome::Zombie { stored });
        }
        let mut delta = Delta::default();
        let (mut applied, mut skipped) = (0, 0);
        for (offset, change) in records {
            if *offset < next {
                skipped += 1;
            } else if let Some(change) = change {
                delta.add(change);
                applied += 1;
            }
        }
        if !delta.is_empty() {
            let (names, totals): (Vec<&str>, Vec<_>) =
                delta.customers.iter().map(|(c, t)| (c.as_str(), *t)).unzip();
            let orders: Vec<i64> = totals.iter().map(|t| t.orders).collect();
            let amounts: Vec<i64> = totals.iter().map(|t| t.amount).collect();
            tx.execute(&self.sql.customers, &[&names, &orders, &amounts]).await?;
            tx.execute(&self.sql.customers_gone, &[&names]).await?;
            let (statuses, counts): (Vec<&str>, Vec<i64>) =
                delta.statuses.iter().map(|(s, n)| (s.as_str(), *n)).unzip();
            tx.execute(&self.sql.statuses, &[&statuses, &counts]).await?;
            tx.execute(&self.sql.statuses_gone, &[&statuses]).await?;
            let (mut ids, mut versions, mut customers, mut amounts, mut states) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut gone = Vec::new();
            for (id, (version, row)) in &delta.rows {
                match row {
                    Some(o) => {
                        ids.push(*id);
                        versions.push(*version);
                        customers.push(o.customer.as_str());
                        amounts.push(o.amount);
                        states.push(o.status.as_str());
                    }
                    None => gone.push(*id),
                }
            }
            tx.execute(&self.sql.rows, &[&ids, &versions, &customers, &amounts, &states]).await?;
            tx.execute(&self.sql.rows_gone, &[&gone]).await?;
        }
        let end = records.last().map_or(next, |(offset, _)| offset + 1);
        // Epochs fit i64 (handle checked): PostgreSQL has no unsigned type.
        let epoch = i64::try_from(fence.epoch).unwrap_or(i64::MAX);
        tx.execute(&self.sql.advance, &[&stream, &partition, &epoch, &end, &applied, &skipped]).await?;
        tx.commit().await?;
        Ok(Outcome::Committed { applied, skipped })
    }
}

impl Handler for View {
    async fn init(ctx: &InitContext) -> Result<Self, InitError> {
        let settings = Settings::from_table(&ctx.settings).map_err(|e| ctx.error(e))?;
        let size = usize::try_from(ctx.concurrency).unwrap_or(1);
        View::open(&settings, size).await.map_err(|e| ctx.error(e))
    }

    async fn handle(&self, batch: &Batch) -> Result<BatchResponse, HandlerError> {
        if batch.is_empty() {
            return Ok(BatchResponse::default());
        }
        let (partition, records) = Self::parse(batch)?;
        // The lease's fencing token: its epoch grows with every grant.
        let fence = batch.fence();
        let epoch = i64::try_from(fence.epoch)
            .map_err(|_| HandlerError::new(format!("{}: epoch {} out of range", fence.lease, fence.epoch)))?;
        let stream = batch.lease.name.as_str();
        let mut conn = self.pool.get().await.map_err(HandlerError::new)?;
        let outcome =
            self.apply(conn.client().map_err(HandlerError::new)?, stream, partition, &fence, &records).await;
        match outcome {
            Ok(Outcome::Committed { applied, skipped }) => {
                metrics::counter!("materialized_view_records_applied_total")
                    .increment(applied.unsigned_abs());
                if skipped > 0 {
                    // An earlier owner applied these; its checkpoint was lost.
                    metrics::counter!("materialized_view_records_skipped_total")
                        .increment(skipped.unsigned_abs());
                    tracing::info!(lease = %batch.lease, skipped, "skipped records an earlier owner applied");
                }
                Ok(BatchResponse::default())
            }
            Ok(Outcome::Zombie { stored }) => {
                metrics::counter!("materialized_view_zombie_batches_total").increment(1);
                if let Ok(client) = conn.client()
                    && let Err(e) = client.execute(&self.sql.refused, &[&stream, &partition]).await
                {
                    tracing::warn!(lease = %batch.lease, error = %e, "could not count a refused batch");
                }
                let message = format!(
                    "{} epoch {epoch} is a zombie: the view was written under epoch {stored}; refusing the batch",
                    batch.lease
                );
                tracing::warn!("{message}");
                Err(HandlerError::new(message))
            }
            Err(e) => {
                // Start the next batch on a fresh connection: this one may
                // be broken or mid-transaction.
                conn.discard();
                Err(HandlerError::new(format!("{}: the view's transaction failed: {e}", batch.lease)))
            }
        }
    }
}
