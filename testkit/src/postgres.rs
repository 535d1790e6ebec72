//! PostgreSQL for coordinators under test: a schema of their own per test
//! or run (so runs never see each other's leader row or leases), dropped
//! when the guard goes, and the queries tests make of the store's tables.

use anyhow::Context;
use tokio_postgres::{Client, NoTls};

/// The database tests use unless `SHARDLINE_TEST_POSTGRES` names another:
/// the local server's `test` database, trust authentication.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub fn base_url() -> String {
    std::env::var("SHARDLINE_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_URL.into())
}

/// Connects (its driver on a task of its own).
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.with_context(|| {
        format!("cannot connect to PostgreSQL at {url} (is it running? scripts/brokers.sh up starts it)")
    })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("test PostgreSQL connection ended: {e}");
        }
    });
    Ok(client)
}

/// A fresh schema; coordinators given [`Schema::url`] keep their tables
/// in it. Dropped with everything in it when the guard is.
pub struct Schema {
    pub name: String,
    base: String,
}

impl Schema {
    pub async fn create(prefix: &str) -> anyhow::Result<Self> {
        let base = base_url();
        let name = crate::unique(prefix).replace(['-', '.'], "_").to_lowercase();
        connect(&base).await?.batch_execute(&format!("CREATE SCHEMA {name}")).await?;
        Ok(Self { name, base })
    }

    /// The URL of this schema on `host:port` instead of the server's own
    /// (a proxy in front of it); an error if the server's URL does not
    /// name a host and port to replace.
    pub fn url_via(&self, authority: &str) -> anyhow::Result<String> {
        let at = self.base.find('@').map_or(self.base.find("://").map_or(0, |i| i + 3), |i| i + 1);
        let end = self.base[at..].find(['/', '?']).map_or(self.base.len(), |i| at + i);
        anyhow::ensure!(
            self.base[at..end].contains(':'),
            "cannot route {} through a proxy: it names no host:port",
            self.base
        );
        Ok(self.in_schema(&format!("{}{authority}{}", &self.base[..at], &self.base[end..])))
    }

    /// The URL of this schema on the server.
    pub fn url(&self) -> String {
        self.in_schema(&self.base)
    }

    /// `url` with this schema as its search path.
    fn in_schema(&self, url: &str) -> String {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options=-csearch_path%3D{}", self.name)
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        connect(&self.url()).await
    }

    /// The leader row: (term, address, deadline in ms since the epoch on
    /// the database's clock), once a coordinator has created it.
    pub async fn leader(&self) -> anyhow::Result<Option<(i64, String, f64)>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT term, address, (extract(epoch FROM deadline) * 1000)::float8 FROM shardline_leader WHERE id = 1",
                &[],
            )
            .await;
        match rows {
            Ok(rows) => match rows.first() {
                Some(r) => Ok(Some((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))),
                None => Ok(None),
            },
            // No table yet: no coordinator has migrated the schema.
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (base, sql) = (self.base.clone(), format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        // A runtime of its own: the test's may be shutting down.
        let dropped = std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async { Ok(connect(&base).await?.batch_execute(&sql).await?) })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test schema {}: {e:#}", self.name),
            Err(_) => eprintln!("dropping test schema {} panicked", self.name),
        }
    }
}
