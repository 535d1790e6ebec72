//! A small connection pool: one PostgreSQL connection per batch the worker
//! runs at once, each behind its own lock, (re)connected on first use and
//! after it breaks. Every connection gets the session settings that keep a
//! frozen worker from holding a partition's row lock for ever.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::{Client, NoTls};

pub struct Pool {
    url: String,
    session: String,
    slots: Vec<Mutex<Option<Client>>>,
    next: AtomicUsize,
}

/// A connection taken from the pool; back in it when dropped.
pub struct Conn<'a>(MutexGuard<'a, Option<Client>>);

impl Conn<'_> {
    pub fn client(&mut self) -> Result<&mut Client, String> {
        self.0.as_mut().ok_or_else(|| "no connection (this is a bug: Pool::get connects)".to_owned())
    }

    /// Drops a connection that failed mid-transaction, so the next user
    /// connects afresh instead of finding it in an aborted state.
    pub fn discard(&mut self) {
        *self.0 = None;
    }
}

impl Pool {
    pub fn new(url: &str, size: usize, idle_in_transaction: Duration) -> Self {
        let ms = idle_in_transaction.as_millis();
        Self {
            url: url.to_owned(),
            session: format!("SET idle_in_transaction_session_timeout = {ms}; SET statement_timeout = '60s'"),
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// A free connection if there is one, else waits for the next in turn.
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
            .map_err(|e| format!("cannot connect to PostgreSQL at {}: {e}", without_password(&self.url)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "a PostgreSQL connection of the view ended");
            }
        });
        client.batch_execute(&self.session).await.map_err(|e| format!("session settings: {e}"))?;
        Ok(client)
    }
}

/// The URL for messages: a password in it replaced by `***`.
fn without_password(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if scheme < at => {
            let user = &url[scheme + 3..at];
            match user.split_once(':') {
                Some((name, _)) => format!("{}{name}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(super::without_password("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(super::without_password("postgres://u@h/db"), "postgres://u@h/db");
    }
}
