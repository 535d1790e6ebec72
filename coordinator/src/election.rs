//! Leader election through PostgreSQL (ARCHITECTURE.md, "Leader
//! election"). Leadership is one row: a term, the holder, its address and
//! a deadline on the database's clock. The leader renews the deadline
//! every quarter of `leadership_timeout`; a standby takes over, with the
//! term plus one, only once the deadline has passed. Every write of a
//! leader checks its term and deadline in the same transaction
//! ([`crate::store::PgStore`]), so a deposed leader never writes.
//!
//! A leader steps down by itself, before its deadline, when it has not
//! renewed for three quarters of `leadership_timeout` (counted from when
//! the last successful renewal was *sent*, so the database's deadline is
//! at least a quarter later): it stops answering workers at once, drops
//! its lease table and becomes a standby.

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::store::{Postgres, StoreError, Term};

/// The database's view of who leads, as a standby sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Campaign {
    /// This coordinator now leads, under this term; the deadline was set
    /// by the statement sent at `sent`.
    Won { term: Term, sent: Instant },
    /// Another leads (its advertised URL), or nobody does yet.
    Lost { leader: Option<String> },
}

/// One coordinator's side of the election, over its own connection (a
/// slow flush never delays a renewal's send).
pub struct Election {
    pg: Postgres,
    client: Option<Client>,
    holder: String,
    address: String,
}

impl Election {
    /// `address`: the URL standbys give clients while this one leads.
    pub fn new(pg: Postgres, address: String) -> Self {
        Self { pg, client: None, holder: holder(), address }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Every statement is bounded by a quarter of the leadership timeout
    /// (one renewal period); a failed or timed-out one drops the connection
    /// so the next call starts on a fresh one.
    async fn run<T>(
        &mut self,
        statement: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, StoreError> {
        let limit = self.period();
        let result = async {
            let client = match self.client.take() {
                Some(client) if !client.is_closed() => self.client.insert(client),
                _ => {
                    // Connecting has its own bound (the connect timeout).
                    let client = self.pg.connect().await?;
                    // A takeover waits at most this long for a lock (a write
                    // in flight); it is tried again next period.
                    let wait = limit.as_millis().max(10);
                    client.batch_execute(&format!("SET lock_timeout = {wait}")).await?;
                    self.client.insert(client)
                }
            };
            match tokio::time::timeout(limit, statement(client)).await {
                Ok(done) => done.map_err(StoreError::from),
                Err(_) => Err(StoreError::Timeout(limit)),
            }
        }
        .await;
        if result.is_err() {
            self.client = None;
        }
        result
    }

    /// How often a leader renews and a standby tries to take over.
    pub fn period(&self) -> Duration {
        self.pg.timeout / 4
    }

    /// Takes the lead if the deadline has passed; otherwise says who leads.
    pub async fn campaign(&mut self) -> Result<Campaign, StoreError> {
        let (holder, address, ms) = (self.holder.clone(), self.address.clone(), self.timeout_ms());
        let sent = Instant::now();
        let won = self
            .run(async |c| {
                c.query_opt(
                    "UPDATE shardline_leader
                     SET term = term + 1, holder = $1, address = $2,
                         deadline = clock_timestamp() + $3 * interval '1 millisecond'
                     WHERE id = 1 AND deadline < clock_timestamp() RETURNING term",
                    &[&holder, &address, &ms],
                )
                .await
            })
            .await?;
        if let Some(row) = won {
            let term: i64 = row.get(0);
            return Ok(Campaign::Won { term: Term { term: term as u64, holder }, sent });
        }
        let row = self
            .run(async |c| {
                c.query_one(
                    "SELECT address, deadline > clock_timestamp() FROM shardline_leader WHERE id = 1",
                    &[],
                )
                .await
            })
            .await?;
        let (address, current): (String, bool) = (row.get(0), row.get(1));
        Ok(Campaign::Lost { leader: (current && !address.is_empty()).then_some(address) })
    }

    /// Moves the deadline on; `Ok(false)` if the term is over (another took
    /// over, or the deadline passed first).
    pub async fn renew(&mut self, term: &Term) -> Result<bool, StoreError> {
        let (t, holder, ms) = (term.term as i64, term.holder.clone(), self.timeout_ms());
        let renewed = self
            .run(async |c| {
                c.execute(
                    "UPDATE shardline_leader SET deadline = clock_timestamp() + $3 * interval '1 millisecond'
                     WHERE id = 1 AND term = $1 AND holder = $2 AND deadline > clock_timestamp()",
                    &[&t, &holder, &ms],
                )
                .await
            })
            .await?;
        Ok(renewed == 1)
    }

    /// Ends the term now, so a standby takes over at its next try instead
    /// of waiting for the deadline (a graceful stop, a failed store).
    pub async fn resign(&mut self, term: &Term) -> Result<(), StoreError> {
        let (t, holder) = (term.term as i64, term.holder.clone());
        self.run(async |c| {
            c.execute(
                "UPDATE shardline_leader SET deadline = '-infinity' WHERE id = 1 AND term = $1 AND holder = $2",
                &[&t, &holder],
            )
            .await
        })
        .await?;
        Ok(())
    }

    fn timeout_ms(&self) -> f64 {
        self.pg.timeout.as_secs_f64() * 1000.0
    }

    /// Renews `term` until `stop`, or until it cannot: then cancels `lost`
    /// (a quarter of the timeout before the database's deadline at the
    /// latest) and returns. `sent`: when the statement that set the current
    /// deadline was sent.
    pub async fn keep(
        &mut self,
        term: &Term,
        mut sent: Instant,
        stop: &CancellationToken,
        lost: &CancellationToken,
    ) {
        let timeout = self.pg.timeout;
        loop {
            let step_down_at = sent + timeout * 3 / 4;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(step_down_at) => {
                    tracing::error!(term = term.term, ?timeout, "could not renew leadership in time: stepping down");
                    lost.cancel();
                    return;
                }
                () = tokio::time::sleep(self.period()) => {}
            }
            let attempt = Instant::now();
            let renewed = tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(step_down_at) => continue,
                renewed = self.renew(term) => renewed,
            };
            match renewed {
                Ok(true) => sent = attempt,
                Ok(false) => {
                    tracing::error!(
                        term = term.term,
                        "leadership lost: another coordinator took over; stepping down"
                    );
                    lost.cancel();
                    return;
                }
                Err(e) => tracing::warn!(term = term.term, error = %e, "cannot renew leadership; retrying"),
            }
        }
    }
}

/// A name no other coordinator process draws: host, pid, start time.
fn holder() -> String {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::process::id().hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    format!("{}-{:016x}", std::process::id(), h.finish())
}

#[cfg(test)]
mod tests {
    //! Against the real PostgreSQL (`SHARDLINE_TEST_POSTGRES`, default the
    //! local `test` database), each test in a schema of its own.

    use super::*;
    use crate::core::LeaseRecord;
    use crate::store::{LeaseStore, PgStore};
    use shardline_proto::LeaseId;

    type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

    /// A fresh schema, dropped when the test ends (passed or not).
    struct Schema {
        base: String,
        name: String,
        url: String,
    }

    impl Schema {
        async fn new() -> Result<Self> {
            let base = std::env::var("SHARDLINE_TEST_POSTGRES")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
            let admin = Postgres::new(&base, Duration::from_secs(5))?.connect().await?;
            let name = format!("t_election_{}", holder().replace('-', "_"));
            admin.batch_execute(&format!("CREATE SCHEMA {name}")).await?;
            let url = format!("{base}?options=-csearch_path%3D{name}");
            Ok(Self { base, name, url })
        }

        fn pg(&self, timeout: Duration) -> Result<Postgres> {
            Ok(Postgres::new(&self.url, timeout)?)
        }
    }

    impl Drop for Schema {
        fn drop(&mut self) {
            let (base, sql) = (self.base.clone(), format!("DROP SCHEMA {} CASCADE", self.name));
            // Its own runtime: the test's may be gone or busy by now.
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                rt.block_on(async {
                    let client = Postgres::new(&base, Duration::from_secs(5)).ok()?.connect().await.ok()?;
                    client.batch_execute(&sql).await.ok()
                })
            })
            .join();
            if !matches!(dropped, Ok(Some(()))) {
                eprintln!("could not drop test schema {}", self.name);
            }
        }
    }

    fn record(partition: u32, checkpoint: i64) -> LeaseRecord {
        LeaseRecord {
            lease: LeaseId::shard("orders", partition),
            epoch: 1,
            owner: Some("w1".into()),
            checkpoint: Some(checkpoint),
            from_earliest: false,
            window: None,
        }
    }

    async fn won(election: &mut Election) -> Term {
        match election.campaign().await {
            Ok(Campaign::Won { term, .. }) => term,
            other => panic!("expected to win: {other:?}"),
        }
    }

    const TIMEOUT: Duration = Duration::from_millis(800);

    #[tokio::test]
    async fn migrations_run_once_under_concurrency_and_a_newer_schema_is_refused() -> Result {
        let schema = Schema::new().await?;
        let (a, b) = (schema.pg(TIMEOUT)?, schema.pg(TIMEOUT)?);
        let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
        ra?;
        rb?;
        let client = a.connect().await?;
        let versions = client.query("SELECT version FROM shardline_schema", &[]).await?;
        assert_eq!(versions.len() as u32, crate::store::SCHEMA_VERSION, "each migration recorded once");
        client.execute("INSERT INTO shardline_schema VALUES (99)", &[]).await?;
        let refused = a.migrate().await;
        assert!(
            matches!(refused, Err(StoreError::NewerFormat { found: 99, .. })),
            "a newer schema must be refused: {refused:?}"
        );
        Ok(())
    }

    /// One leads; a standby learns its address and takes over (term + 1)
    /// only after the deadline; the old leader can then no longer renew.
    #[tokio::test]
    async fn one_leads_and_a_standby_takes_over_only_after_the_deadline() -> Result {
        let schema = Schema::new().await?;
        schema.pg(TIMEOUT)?.migrate().await?;
        let mut a = Election::new(schema.pg(TIMEOUT)?, "http://a:1".into());
        let mut b = Election::new(schema.pg(TIMEOUT)?, "http://b:1".into());
        let first = won(&mut a).await;
        assert_eq!(b.campaign().await?, Campaign::Lost { leader: Some("http://a:1".into()) });
        // Renewed past the first deadline, a stays leader.
        for _ in 0..4 {
            tokio::time::sleep(TIMEOUT / 2).await;
            assert!(a.renew(&first).await?, "the leader could not renew");
            assert!(matches!(b.campaign().await?, Campaign::Lost { .. }), "took over from a live leader");
        }
        tokio::time::sleep(TIMEOUT + TIMEOUT / 4).await;
        let second = won(&mut b).await;
        assert_eq!(second.term, first.term + 1);
        assert!(!a.renew(&first).await?, "a deposed leader renewed its term");
        assert_eq!(a.campaign().await?, Campaign::Lost { leader: Some("http://b:1".into()) });
        // Resigning hands over at once.
        b.resign(&second).await?;
        assert_eq!(won(&mut a).await.term, second.term + 1);
        Ok(())
    }

    /// Every write checks the term: after a takeover the old leader's flush
    /// is refused and writes nothing; the new leader loads what the old one
    /// made durable.
    #[tokio::test]
    async fn a_deposed_leaders_writes_are_refused_and_the_new_leader_loads_the_rest() -> Result {
        let schema = Schema::new().await?;
        let pg = schema.pg(TIMEOUT)?;
        pg.migrate().await?;
        let mut a = Election::new(schema.pg(TIMEOUT)?, "http://a:1".into());
        let mut b = Election::new(schema.pg(TIMEOUT)?, "http://b:1".into());
        let term_a = won(&mut a).await;
        let mut store_a = PgStore::open(&pg, term_a.clone()).await?;
        store_a.put(&record(0, 10))?;
        store_a.put(&record(1, 20))?;
        store_a.put(&record(0, 11))?;
        store_a.put_usage(&(60, "orders".into()), Some(&crate::usage::Counts::default()))?;
        store_a.flush().await?;

        tokio::time::sleep(TIMEOUT + TIMEOUT / 4).await;
        // Past the deadline, even with nobody else leading yet, a write is refused.
        store_a.put(&record(1, 21))?;
        let late = store_a.flush().await;
        assert!(matches!(late, Err(StoreError::Deposed { .. })), "a write after the deadline: {late:?}");

        let term_b = won(&mut b).await;
        store_a.put(&record(1, 22))?;
        let refused = store_a.flush().await;
        assert!(
            matches!(refused, Err(StoreError::Deposed { term }) if term == term_a.term),
            "a write with an old term must be refused: {refused:?}"
        );
        let refused_open = PgStore::open(&pg, term_a).await;
        assert!(matches!(refused_open, Err(StoreError::Deposed { .. })), "{:?}", refused_open.err());

        let store_b = PgStore::open(&pg, term_b).await?;
        let mut loaded = store_b.load()?;
        loaded.sort_by_key(|r| r.lease.index);
        assert_eq!(loaded, vec![record(0, 11), record(1, 20)], "the refused writes left nothing");
        assert_eq!(store_b.load_usage()?.len(), 1);
        Ok(())
    }

    /// A leader that cannot renew (here: its renewals find another term)
    /// says so through `lost`, and `keep` returns.
    #[tokio::test]
    async fn keep_reports_a_lost_term() -> Result {
        let schema = Schema::new().await?;
        schema.pg(TIMEOUT)?.migrate().await?;
        let mut a = Election::new(schema.pg(TIMEOUT)?, "http://a:1".into());
        let sent = Instant::now();
        let term = won(&mut a).await;
        let (stop, lost) = (CancellationToken::new(), CancellationToken::new());
        let kept = tokio::time::timeout(Duration::from_secs(5), async {
            // While kept, the term outlives several timeouts.
            tokio::select! {
                () = a.keep(&term, sent, &stop, &lost) => {}
                () = tokio::time::sleep(TIMEOUT * 2) => {}
            }
        })
        .await;
        assert!(kept.is_ok() && !lost.is_cancelled(), "a renewable term was reported lost");
        let mut b = Election::new(schema.pg(TIMEOUT)?, "http://b:1".into());
        assert!(matches!(b.campaign().await?, Campaign::Lost { .. }));
        // Taken over behind its back: the next renewal fails and keep ends.
        let client = schema.pg(TIMEOUT)?.connect().await?;
        client.execute("UPDATE shardline_leader SET term = term + 1, holder = 'x'", &[]).await?;
        let ended =
            tokio::time::timeout(Duration::from_secs(2), a.keep(&term, Instant::now(), &stop, &lost)).await;
        assert!(ended.is_ok() && lost.is_cancelled(), "a lost term was not reported");
        Ok(())
    }
}
