//! The replicated store: PostgreSQL, shared by every coordinator of a
//! cluster. One of them leads (see [`crate::election`]); it opens a
//! [`PgStore`] for its [`Term`], and every flush is one transaction that
//! first checks, under a row lock on the leader row, that the term is
//! still current and its deadline not passed. A deposed leader (paused,
//! cut off from the database, replaced) therefore never writes: its
//! transaction finds another term and writes nothing
//! ([`StoreError::Deposed`]); a takeover waits for a write in progress to
//! commit, and the new leader loads the table after its takeover, so it
//! sees every write the old leader made.
//!
//! The schema is created and migrated by the coordinators themselves
//! (versioned, under an advisory lock so several starting at once do not
//! race); a database of a newer schema is refused, as sled refuses a newer
//! format. Tables live in the connection's schema (`search_path`, which a
//! URL sets with `?options=-csearch_path%3Dname`).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls};

use super::{LeaseStore, StoreError};
use crate::core::LeaseRecord;
use crate::usage::{BucketKey, Counts};

/// The newest schema this build knows. Each entry of [`MIGRATIONS`] takes
/// the schema from its index to its index + 1.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// In order; never edit a released one, append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: leases (with the term that wrote each and when, for audits and
    // the failover tests), usage buckets, the leader row.
    "CREATE TABLE shardline_leases (
        lease text PRIMARY KEY,
        record jsonb NOT NULL,
        term bigint NOT NULL,
        written_at timestamptz NOT NULL
     );
     CREATE TABLE shardline_usage (
        minute bigint NOT NULL,
        mapping text NOT NULL,
        counts jsonb NOT NULL,
        PRIMARY KEY (minute, mapping)
     );
     CREATE TABLE shardline_leader (
        id smallint PRIMARY KEY CHECK (id = 1),
        term bigint NOT NULL,
        holder text NOT NULL,
        address text NOT NULL,
        deadline timestamptz NOT NULL
     );
     INSERT INTO shardline_leader VALUES (1, 0, '', '', '-infinity');",
];

/// Serialises schema changes of every coordinator on one database.
const MIGRATION_LOCK: i64 = 0x5348_4152_444c_494e; // "SHARDLIN"

/// The leader row is current for this term, this holder, and its deadline
/// has not passed; `FOR SHARE` makes a takeover wait until the transaction
/// that checked it has committed.
const CHECK_TERM: &str = "SELECT 1 FROM shardline_leader
     WHERE id = 1 AND term = $1 AND holder = $2 AND deadline > clock_timestamp() FOR SHARE";

/// A whole flush: the same check as [`CHECK_TERM`] (term $3, holder $4),
/// and only if it finds the row, the lease upserts ($1 keys, $2 records),
/// the usage upserts ($5 minutes, $6 mappings, $7 counts) and deletions ($8,
/// $9). Returns how many leader rows matched: 0 means deposed, nothing
/// written. Data-modifying CTEs all run, each gated on the check.
const FLUSH: &str = "WITH ok AS (
       SELECT 1 FROM shardline_leader
       WHERE id = 1 AND term = $3 AND holder = $4 AND deadline > clock_timestamp() FOR SHARE
     ), leases AS (
       INSERT INTO shardline_leases (lease, record, term, written_at)
       SELECT k, v::jsonb, $3, clock_timestamp() FROM unnest($1::text[], $2::text[]) AS t(k, v)
       WHERE EXISTS (SELECT 1 FROM ok)
       ON CONFLICT (lease) DO UPDATE
       SET record = EXCLUDED.record, term = EXCLUDED.term, written_at = EXCLUDED.written_at
       RETURNING 1
     ), usage_set AS (
       INSERT INTO shardline_usage (minute, mapping, counts)
       SELECT m, k, c::jsonb FROM unnest($5::int8[], $6::text[], $7::text[]) AS t(m, k, c)
       WHERE EXISTS (SELECT 1 FROM ok)
       ON CONFLICT (minute, mapping) DO UPDATE SET counts = EXCLUDED.counts
       RETURNING 1
     ), usage_gone AS (
       DELETE FROM shardline_usage
       WHERE EXISTS (SELECT 1 FROM ok) AND (minute, mapping) IN (SELECT * FROM unnest($8::int8[], $9::text[]))
       RETURNING 1
     )
     SELECT count(*) FROM ok";

/// A leader's term: what every write of it quotes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    pub term: u64,
    /// This coordinator process (random per start), so two processes can
    /// never both believe they hold one term.
    pub holder: String,
}

/// How to reach the database: the parsed URL, TLS, and the session
/// settings every connection gets.
#[derive(Clone)]
pub struct Postgres {
    config: Config,
    /// The URL with its password masked, for errors and logs.
    shown: String,
    /// Bounds every statement and transaction of the election and of a
    /// flush: a database that does not answer within it is stuck.
    pub timeout: Duration,
}

impl Postgres {
    /// `timeout` is the leadership timeout: nothing this coordinator does
    /// on the database as a leader may take longer.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let mut config: Config = url.parse()?;
        config.connect_timeout(timeout.max(Duration::from_secs(1)));
        config.application_name("shardline-coordinator");
        Ok(Self { config, shown: shardline_config::mask_password(url), timeout })
    }

    pub fn url(&self) -> &str {
        &self.shown
    }

    /// A new connection; its driver runs on its own task until the client
    /// is dropped or the connection breaks. With `sslmode=require` the
    /// connection is TLS, verified against the system's root certificates.
    pub async fn connect(&self) -> Result<Client, StoreError> {
        let shown = self.shown.clone();
        let log = move |e: tokio_postgres::Error| tracing::warn!(url = %shown, error = %e, "PostgreSQL connection ended");
        let client = if self.config.get_ssl_mode() == SslMode::Require {
            let (client, connection) = self.config.connect(tls()?).await?;
            tokio::spawn(async move { connection.await.map_err(log) });
            client
        } else {
            let (client, connection) = self.config.connect(NoTls).await?;
            tokio::spawn(async move { connection.await.map_err(log) });
            client
        };
        // A transaction left open by a frozen or dead client must not keep
        // the leader row locked: the server ends such a session itself.
        let idle = self.timeout.as_millis().max(100) / 2;
        client
            .batch_execute(&format!(
                "SET idle_in_transaction_session_timeout = {idle}; SET client_min_messages = warning"
            ))
            .await?;
        Ok(client)
    }

    /// Creates or upgrades the schema; refuses one newer than this build.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.connect().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS shardline_schema (version integer NOT NULL)").await?;
        let found: Option<i32> = tx.query_one("SELECT max(version) FROM shardline_schema", &[]).await?.get(0);
        let found = found.map_or(0, |v| v.max(0) as u32);
        if found > SCHEMA_VERSION {
            return Err(StoreError::NewerFormat { path: self.shown.clone(), found, newest: SCHEMA_VERSION });
        }
        for (version, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            tx.batch_execute(sql).await?;
            tx.execute("INSERT INTO shardline_schema VALUES ($1)", &[&(version as i32 + 1)]).await?;
            tracing::info!(url = %self.shown, version = version + 1, "PostgreSQL schema migrated");
        }
        tx.commit().await?;
        Ok(())
    }
}

/// rustls with the system's roots (ring, as the rest of the workspace).
fn tls() -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        // A system certificate rustls cannot parse is skipped, as the
        // system's own TLS libraries skip it.
        if let Err(e) = roots.add(cert) {
            tracing::debug!(error = %e, "skipping a system root certificate");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The lease table of one term, on PostgreSQL. Opening it reads the whole
/// table (under the term check), so [`LeaseStore::load`] hands out what was
/// read; writes are buffered (the newest per key) until the next flush.
pub struct PgStore {
    client: Arc<tokio::sync::Mutex<Client>>,
    /// [`FLUSH`], prepared once: a flush is then a single round trip.
    flush_statement: tokio_postgres::Statement,
    term: Term,
    timeout: Duration,
    records: Vec<LeaseRecord>,
    usage: Vec<(BucketKey, Counts)>,
    /// Lease key (JSON of the id) → record JSON.
    pending: BTreeMap<String, String>,
    /// Usage bucket → counts JSON, or `None` to delete it.
    pending_usage: BTreeMap<BucketKey, Option<String>>,
}

impl PgStore {
    /// Opens the table for `term`, reading it whole; `Deposed` if the term
    /// is already over.
    pub async fn open(pg: &Postgres, term: Term) -> Result<Self, StoreError> {
        let mut client = pg.connect().await?;
        let read = async {
            let tx = client.transaction().await?;
            check_term(&tx, &term).await?;
            let rows = tx.query("SELECT lease, record::text FROM shardline_leases", &[]).await?;
            let records = rows
                .iter()
                .map(|row| {
                    let (key, value): (String, String) = (row.get(0), row.get(1));
                    serde_json::from_str(&value)
                        .map_err(|e| StoreError::Corrupt { key, reason: e.to_string() })
                })
                .collect::<Result<Vec<LeaseRecord>, _>>()?;
            let rows = tx.query("SELECT minute, mapping, counts::text FROM shardline_usage", &[]).await?;
            let usage = rows
                .iter()
                .map(|row| {
                    let (minute, mapping, value): (i64, String, String) =
                        (row.get(0), row.get(1), row.get(2));
                    let counts = serde_json::from_str(&value).map_err(|e| StoreError::Corrupt {
                        key: format!("usage/{minute}/{mapping}"),
                        reason: e.to_string(),
                    })?;
                    Ok(((minute, mapping), counts))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            tx.commit().await?;
            Ok::<_, StoreError>((records, usage))
        };
        let (records, usage) = bounded(pg.timeout, read).await?;
        let flush_statement = bounded(pg.timeout, async { Ok(client.prepare(FLUSH).await?) }).await?;
        Ok(Self {
            flush_statement,
            client: Arc::new(tokio::sync::Mutex::new(client)),
            term,
            timeout: pg.timeout,
            records,
            usage,
            pending: BTreeMap::new(),
            pending_usage: BTreeMap::new(),
        })
    }
}

async fn check_term(tx: &tokio_postgres::Transaction<'_>, term: &Term) -> Result<(), StoreError> {
    let current = tx.query_opt(CHECK_TERM, &[&(term.term as i64), &term.holder]).await?;
    match current {
        Some(_) => Ok(()),
        None => Err(StoreError::Deposed { term: term.term }),
    }
}

/// `work`, or [`StoreError::Timeout`] after `limit`.
async fn bounded<T>(
    limit: Duration,
    work: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, work).await.unwrap_or(Err(StoreError::Timeout(limit)))
}

impl LeaseStore for PgStore {
    fn load(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        Ok(self.records.clone())
    }

    fn put(&mut self, record: &LeaseRecord) -> Result<(), StoreError> {
        let key = serde_json::to_string(&record.lease)?;
        self.pending.insert(key, serde_json::to_string(record)?);
        Ok(())
    }

    fn load_usage(&self) -> Result<Vec<(BucketKey, Counts)>, StoreError> {
        Ok(self.usage.clone())
    }

    fn put_usage(&mut self, key: &BucketKey, counts: Option<&Counts>) -> Result<(), StoreError> {
        let value = counts.map(serde_json::to_string).transpose()?;
        self.pending_usage.insert(key.clone(), value);
        Ok(())
    }

    /// One statement, so one round trip and one commit: the term check
    /// (`FOR SHARE` on the leader row) guards every buffered write, as one
    /// batched upsert per table; nothing is written if the term is over.
    fn flush(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (client, statement, term, limit) =
            (self.client.clone(), self.flush_statement.clone(), self.term.clone(), self.timeout);
        let (keys, values): (Vec<String>, Vec<String>) =
            std::mem::take(&mut self.pending).into_iter().unzip();
        let (mut set, mut gone) = ((vec![], vec![], vec![]), (vec![], vec![]));
        for ((minute, mapping), counts) in std::mem::take(&mut self.pending_usage) {
            match counts {
                Some(c) => {
                    set.0.push(minute);
                    set.1.push(mapping);
                    set.2.push(c);
                }
                None => {
                    gone.0.push(minute);
                    gone.1.push(mapping);
                }
            }
        }
        async move {
            let client = client.lock().await;
            bounded(limit, async {
                let t = term.term as i64;
                let row = client
                    .query_one(
                        &statement,
                        &[&keys, &values, &t, &term.holder, &set.0, &set.1, &set.2, &gone.0, &gone.1],
                    )
                    .await?;
                match row.try_get::<_, i64>(0)? {
                    0 => Err(StoreError::Deposed { term: term.term }),
                    _ => Ok(()),
                }
            })
            .await
        }
    }
}
