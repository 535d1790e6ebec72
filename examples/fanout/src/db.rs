//! PostgreSQL for both handlers: a small pool (one connection per batch the
//! worker runs at once, each behind its own lock, connected on first use
//! and again after it breaks) and the tables, created at `init`.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::{Client, NoTls};

pub struct Pool {
    url: String,
    slots: Vec<Mutex<Option<Client>>>,
    next: AtomicUsize,
}

/// A connection taken from the pool; back in it when dropped.
pub struct Conn<'a>(MutexGuard<'a, Option<Client>>);

impl Conn<'_> {
    pub fn client(&self) -> Result<&Client, String> {
        self.0.as_ref().ok_or_else(|| "no connection (a bug: Pool::get connects)".to_owned())
    }

    /// Drops a connection whose statement failed: the next user connects
    /// afresh rather than find it broken.
    pub fn discard(&mut self) {
        *self.0 = None;
    }
}

impl Pool {
    pub fn new(url: &str, size: usize) -> Self {
        Self {
            url: url.to_owned(),
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// A free connection if there is one, else the next in turn once it
    /// is free; connected on first use and again after it broke.
    pub async fn get(&self) -> Result<Conn<'_>, String> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let free = (0..n).find_map(|k| self.slots[(start + k) % n].try_lock().ok());
        let mut guard = match free {
            Some(guard) => guard,
            None => self.slots[start].lock().await,
        };
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(self.connect().await?);
        }
        Ok(Conn(guard))
    }

    pub async fn connect(&self) -> Result<Client, String> {
        let (client, connection) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .map_err(|e| format!("cannot connect to PostgreSQL ({}): {e}", host_of(&self.url)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "a PostgreSQL connection ended");
            }
        });
        Ok(client)
    }
}

/// What follows the `@` of a URL (or the URL if it has none): no password
/// in messages.
fn host_of(url: &str) -> &str {
    url.rsplit_once('@').map_or(url, |(_, host)| host)
}

/// Creates `schema` and both handlers' tables if missing; serialized by an
/// advisory lock, since several workers (and both handlers of one) start
/// at once and `CREATE TABLE IF NOT EXISTS` races with itself.
pub async fn create(client: &mut Client, schema: &str) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext('shardline-example-fanout'))", &[]).await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.audit_log (
             message_id text PRIMARY KEY, body text NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE IF NOT EXISTS {schema}.notified (
             message_id text PRIMARY KEY, recipient text NOT NULL, sent_at timestamptz NOT NULL DEFAULT now());"
    ))
    .await?;
    tx.commit().await
}
