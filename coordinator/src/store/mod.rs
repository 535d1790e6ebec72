//! Durable lease records behind the small [`LeaseStore`] trait:
//! [`SledStore`] (the embedded default, one machine) and [`PgStore`]
//! (PostgreSQL, shared by a leader and its standbys; every write
//! transaction checks the leader's term).
//!
//! Writes are cheap and not yet durable; [`LeaseStore::flush`] makes every
//! earlier write durable. The service loop group-commits: many writes, one
//! flush, then all their acknowledgements.

mod pg_store;
mod sled_store;

pub use self::pg_store::{PgStore, Postgres, SCHEMA_VERSION, Term};
pub use self::sled_store::{FORMAT_KEY, FORMAT_VERSION, SledStore};

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use shardline_proto::LeaseId;

use crate::core::LeaseRecord;
use crate::usage::{BucketKey, Counts};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (a running coordinator) holds the directory. Retrying
    /// helps once it stops.
    #[error("store {0} is locked by another process (is a coordinator running on it?)")]
    Locked(String),
    #[error("{path} is not a shardline store: {reason}")]
    Foreign { path: String, reason: String },
    #[error("store {path} has format {found}; this build reads format {newest} at most: upgrade shardline")]
    NewerFormat { path: String, found: u32, newest: u32 },
    /// sled could not open the directory (other than its lock).
    #[error("cannot open store {path}: {source}")]
    Open { path: String, source: sled::Error },
    /// A read, write or flush failed: the disk or the file system.
    #[error("store I/O failed: {0}")]
    Io(#[from] sled::Error),
    /// A record could not be encoded (a bug, not the disk).
    #[error("cannot encode a store record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("store record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// A task doing store work (a flush, the service loop) panicked or was
    /// cancelled, so what it wrote may not be durable.
    #[error("a store task died: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A lock around the in-memory store was poisoned by a panic.
    #[error("store lock poisoned")]
    Poisoned,
    /// PostgreSQL refused a statement or the connection failed.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A PostgreSQL statement or transaction took longer than allowed (the
    /// database or the network to it is stuck).
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The write was refused because this coordinator no longer leads: the
    /// term it was elected with is over (a standby took over, or its
    /// deadline passed). Nothing of the transaction was written.
    /// The TLS setup for PostgreSQL failed.
    #[error("PostgreSQL TLS: {0}")]
    Tls(String),
    #[error("write refused: term {term} is over (this coordinator no longer leads)")]
    Deposed { term: u64 },
}

/// Where the lease table lives between restarts.
pub trait LeaseStore: Send + 'static {
    /// Every record, for [`crate::core::Core::restore`].
    fn load(&self) -> Result<Vec<LeaseRecord>, StoreError>;
    /// Writes a record; durable only after the next completed flush.
    fn put(&mut self, record: &LeaseRecord) -> Result<(), StoreError>;
    /// Makes every earlier `put` durable. Runs off the service loop, so the
    /// loop keeps taking requests while the disk works; the loop runs one
    /// flush at a time.
    fn flush(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static;
    /// Every usage bucket, for [`crate::usage::Meter::restore`].
    fn load_usage(&self) -> Result<Vec<(BucketKey, Counts)>, StoreError>;
    /// Writes (or with `None` deletes) a usage bucket; durable after a flush.
    fn put_usage(&mut self, key: &BucketKey, counts: Option<&Counts>) -> Result<(), StoreError>;
}

/// An in-memory store: for tests of the service loop under a paused clock,
/// where a real fsync would let tokio's auto-advance race the disk.
#[derive(Clone, Default)]
pub struct MemStore {
    records: Arc<Mutex<BTreeMap<LeaseId, LeaseRecord>>>,
    usage: Arc<Mutex<BTreeMap<BucketKey, Counts>>>,
}

impl LeaseStore for MemStore {
    fn load(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        let records = self.records.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(records.values().cloned().collect())
    }

    fn put(&mut self, record: &LeaseRecord) -> Result<(), StoreError> {
        let mut records = self.records.lock().map_err(|_| StoreError::Poisoned)?;
        records.insert(record.lease.clone(), record.clone());
        Ok(())
    }

    fn flush(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        std::future::ready(Ok(()))
    }

    fn load_usage(&self) -> Result<Vec<(BucketKey, Counts)>, StoreError> {
        let usage = self.usage.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(usage.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn put_usage(&mut self, key: &BucketKey, counts: Option<&Counts>) -> Result<(), StoreError> {
        let mut usage = self.usage.lock().map_err(|_| StoreError::Poisoned)?;
        match counts {
            Some(c) => usage.insert(key.clone(), c.clone()),
            None => usage.remove(key),
        };
        Ok(())
    }
}

/// A [`MemStore`] whose writes or flushes fail once on demand, for tests
/// of what the service loop does when the disk fails (once: a transient
/// error must be as fatal as a lasting one, since the records it dropped
/// are gone).
#[cfg(test)]
#[derive(Clone, Default)]
pub struct FailingStore {
    pub inner: MemStore,
    /// The write of a record with this checkpoint fails (once), so a test
    /// hits the write of one particular command, not a tick's.
    pub failing_checkpoint: Arc<Mutex<Option<i64>>>,
    /// How many of the next flushes fail.
    pub failing_flushes: Arc<std::sync::atomic::AtomicU32>,
}

#[cfg(test)]
impl FailingStore {
    fn check(counter: &std::sync::atomic::AtomicU32, what: &str) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if counter.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(injected_full(what));
        }
        Ok(())
    }
}

/// What sled reports on a full disk.
#[cfg(test)]
fn injected_full(what: &str) -> StoreError {
    let e = std::io::Error::new(
        std::io::ErrorKind::StorageFull,
        format!("{what}: No space left on device (injected)"),
    );
    StoreError::Io(sled::Error::Io(e))
}

#[cfg(test)]
impl LeaseStore for FailingStore {
    fn load(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        self.inner.load()
    }

    fn put(&mut self, record: &LeaseRecord) -> Result<(), StoreError> {
        let mut failing = self.failing_checkpoint.lock().map_err(|_| StoreError::Poisoned)?;
        if record.checkpoint.is_some() && *failing == record.checkpoint {
            *failing = None;
            return Err(injected_full("write"));
        }
        self.inner.put(record)
    }

    fn flush(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        std::future::ready(Self::check(&self.failing_flushes, "flush"))
    }

    fn load_usage(&self) -> Result<Vec<(BucketKey, Counts)>, StoreError> {
        self.inner.load_usage()
    }

    fn put_usage(&mut self, key: &BucketKey, counts: Option<&Counts>) -> Result<(), StoreError> {
        self.inner.put_usage(key, counts)
    }
}

/// A [`MemStore`] whose flushes complete only when the test says so: each
/// flush hands the test a [`Gate`] through [`Flushes`] and waits for it to
/// be opened. So a test of the service loop sees exactly when a flush
/// starts, and what is answered before and after it completes (group
/// commit), without a disk or a race.
#[cfg(test)]
#[derive(Clone)]
pub struct GatedStore {
    pub inner: MemStore,
    started: tokio::sync::mpsc::UnboundedSender<Gate>,
}

/// One flush in progress: [`Gate::open`] completes it.
#[cfg(test)]
#[derive(Debug)]
pub struct Gate(tokio::sync::oneshot::Sender<()>);

#[cfg(test)]
impl Gate {
    pub fn open(self) {
        // The flush future is gone only if the loop ended, which the test
        // then sees in its replies.
        if self.0.send(()).is_err() {
            tracing::error!("a gated flush was opened after its loop ended");
        }
    }
}

/// The flushes a [`GatedStore`] started, in order.
#[cfg(test)]
pub type Flushes = tokio::sync::mpsc::UnboundedReceiver<Gate>;

#[cfg(test)]
impl GatedStore {
    pub fn new() -> (Self, Flushes) {
        let (started, flushes) = tokio::sync::mpsc::unbounded_channel();
        (Self { inner: MemStore::default(), started }, flushes)
    }
}

#[cfg(test)]
impl LeaseStore for GatedStore {
    fn load(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        self.inner.load()
    }

    fn put(&mut self, record: &LeaseRecord) -> Result<(), StoreError> {
        self.inner.put(record)
    }

    fn flush(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let (open, opened) = tokio::sync::oneshot::channel();
        let announced = self.started.send(Gate(open));
        async move {
            // A test that stops watching or drops a gate fails the flush.
            let failed = |what: &str| {
                StoreError::Io(sled::Error::Io(std::io::Error::other(format!("flush: {what} (gated)"))))
            };
            announced.map_err(|_| failed("the test stopped watching"))?;
            opened.await.map_err(|_| failed("gate dropped unopened"))
        }
    }

    fn load_usage(&self) -> Result<Vec<(BucketKey, Counts)>, StoreError> {
        self.inner.load_usage()
    }

    fn put_usage(&mut self, key: &BucketKey, counts: Option<&Counts>) -> Result<(), StoreError> {
        self.inner.put_usage(key, counts)
    }
}
