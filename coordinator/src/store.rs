//! Durable lease records behind the small [`LeaseStore`] trait, so another
//! backend (a shared table for a standby coordinator) can follow without
//! touching assignment.
//!
//! Writes are cheap and not yet durable; [`LeaseStore::flush`] makes every
//! earlier write durable. The service loop group-commits: many writes, one
//! flush, then all their acknowledgements.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};

use shardline_proto::LeaseId;

use crate::core::LeaseRecord;
use crate::usage::{BucketKey, Counts};

/// Marks a sled directory as a shardline store, with its format version.
pub const FORMAT_KEY: &[u8] = b"shardline.format";
pub const FORMAT_VERSION: u32 = 1;
const LEASES_TREE: &str = "leases";
const USAGE_TREE: &str = "usage";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (a running coordinator) holds the directory. Retrying
    /// helps once it stops.
    #[error("store {0} is locked by another process (is a coordinator running on it?)")]
    Locked(String),
    #[error("{path} is not a shardline store: {reason}")]
    Foreign { path: String, reason: String },
    #[error("store {path} has format {found}; this build reads format {FORMAT_VERSION}: upgrade shardline")]
    NewerFormat { path: String, found: u32 },
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
}

/// Where the lease table lives between restarts.
pub trait LeaseStore: Send + 'static {
    /// Every record, for [`crate::core::Core::restore`].
    fn load(&self) -> Result<Vec<LeaseRecord>, StoreError>;
    /// Writes a record; durable only after the next completed flush.
    fn put(&mut self, record: &LeaseRecord) -> Result<(), StoreError>;
    /// Makes every earlier `put` durable. Runs off the service loop, so the
    /// loop keeps taking requests while the disk works.
    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static;
    /// Every usage bucket, for [`crate::usage::Meter::restore`].
    fn load_usage(&self) -> Result<Vec<(BucketKey, Counts)>, StoreError>;
    /// Writes (or with `None` deletes) a usage bucket; durable after a flush.
    fn put_usage(&mut self, key: &BucketKey, counts: Option<&Counts>) -> Result<(), StoreError>;
}

/// The embedded default: sled, one tree of JSON lease records.
pub struct SledStore {
    db: sled::Db,
    leases: sled::Tree,
    usage: sled::Tree,
}

impl SledStore {
    /// Opens (creating if absent) a store for writing.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let fresh = !path.join("conf").exists();
        if !fresh && !path.join("db").exists() {
            return Err(StoreError::Foreign {
                path: path.display().to_string(),
                reason: "it has no sled database".into(),
            });
        }
        let db = sled::Config::new().path(path).open().map_err(|e| open_error(path, e))?;
        match db.get(FORMAT_KEY)? {
            Some(v) => check_format(path, &v)?,
            None if fresh || db.tree_names().len() <= 1 => {
                db.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes()[..])?;
                db.flush()?;
            }
            None => {
                return Err(StoreError::Foreign {
                    path: path.display().to_string(),
                    reason: "sled database without a shardline format marker".into(),
                });
            }
        }
        let leases = db.open_tree(LEASES_TREE)?;
        let usage = db.open_tree(USAGE_TREE)?;
        Ok(Self { db, leases, usage })
    }

    /// Opens an existing store for reading only: refuses to create one.
    pub fn open_existing(path: &Path) -> Result<Self, StoreError> {
        // sled creates what is missing when it opens a directory, so check it
        // looks like a sled database first: a foreign directory must be left
        // exactly as it was.
        let conf = std::fs::read(path.join("conf")).unwrap_or_default();
        let sled_like = path.join("db").is_file() && String::from_utf8_lossy(&conf).contains("segment_size");
        if !sled_like {
            return Err(StoreError::Foreign {
                path: path.display().to_string(),
                reason: "no sled database there (its `conf` and `db` files are missing or not sled's)".into(),
            });
        }
        let db = sled::Config::new().path(path).open().map_err(|e| open_error(path, e))?;
        match db.get(FORMAT_KEY)? {
            Some(v) => check_format(path, &v)?,
            None => {
                return Err(StoreError::Foreign {
                    path: path.display().to_string(),
                    reason: "sled database without a shardline format marker".into(),
                });
            }
        }
        let leases = db.open_tree(LEASES_TREE)?;
        let usage = db.open_tree(USAGE_TREE)?;
        Ok(Self { db, leases, usage })
    }
}

fn check_format(path: &Path, v: &[u8]) -> Result<(), StoreError> {
    let found = <[u8; 4]>::try_from(v).map(u32::from_be_bytes).map_err(|_| StoreError::Foreign {
        path: path.display().to_string(),
        reason: "its format marker is unreadable".into(),
    })?;
    if found > FORMAT_VERSION {
        return Err(StoreError::NewerFormat { path: path.display().to_string(), found });
    }
    Ok(())
}

fn open_error(path: &Path, e: sled::Error) -> StoreError {
    let text = e.to_string();
    if text.contains("lock") || text.contains("WouldBlock") || text.contains("temporarily unavailable") {
        StoreError::Locked(path.display().to_string())
    } else {
        StoreError::Open { path: path.display().to_string(), source: e }
    }
}

fn key(lease: &LeaseId) -> Vec<u8> {
    serde_json::to_vec(lease).unwrap_or_default()
}

/// Minute first, big-endian, so buckets sort by time.
fn usage_key((minute, mapping): &BucketKey) -> Vec<u8> {
    let mut k = minute.to_be_bytes().to_vec();
    k.extend_from_slice(mapping.as_bytes());
    k
}

impl LeaseStore for SledStore {
    fn load(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        self.leases
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    fn put(&mut self, record: &LeaseRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record)?;
        self.leases.insert(key(&record.lease), value)?;
        Ok(())
    }

    fn load_usage(&self) -> Result<Vec<(BucketKey, Counts)>, StoreError> {
        self.usage
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let corrupt = |reason: String| StoreError::Corrupt {
                    key: format!("usage/{}", String::from_utf8_lossy(&k)),
                    reason,
                };
                let minute = k
                    .get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(i64::from_be_bytes)
                    .ok_or_else(|| corrupt("short key".into()))?;
                let mapping = String::from_utf8_lossy(&k[8..]).into_owned();
                let counts = serde_json::from_slice(&v).map_err(|e| corrupt(e.to_string()))?;
                Ok(((minute, mapping), counts))
            })
            .collect()
    }

    fn put_usage(&mut self, key: &BucketKey, counts: Option<&Counts>) -> Result<(), StoreError> {
        match counts {
            Some(c) => {
                let value = serde_json::to_vec(c)?;
                self.usage.insert(usage_key(key), value)?;
            }
            None => {
                self.usage.remove(usage_key(key))?;
            }
        }
        Ok(())
    }

    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let db = self.db.clone();
        async move {
            // sled's flush blocks on fsync; keep it off the async workers.
            tokio::task::spawn_blocking(move || db.flush().map(|_| ()).map_err(StoreError::from)).await?
        }
    }
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

    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
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

    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
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

    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_foreign_or_locked_dirs_are_refused()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store");
        let record = LeaseRecord {
            lease: LeaseId::shard("orders", 3),
            epoch: 4,
            owner: Some("w1".into()),
            checkpoint: Some(1234),
            from_earliest: true,
        };
        {
            let mut store = SledStore::open(&path)?;
            store.put(&record)?;
            let rt = tokio::runtime::Builder::new_current_thread().build()?;
            rt.block_on(store.flush())?;
            // While it is open, a second opener is told it is locked.
            assert!(matches!(SledStore::open_existing(&path), Err(StoreError::Locked(_))));
        }
        let store = SledStore::open_existing(&path)?;
        assert_eq!(store.load()?, vec![record]);

        let foreign = dir.path().join("foreign");
        std::fs::create_dir_all(&foreign)?;
        std::fs::write(foreign.join("conf"), "x")?;
        assert!(matches!(SledStore::open(&foreign), Err(StoreError::Foreign { .. })));
        assert!(matches!(
            SledStore::open_existing(&dir.path().join("none")),
            Err(StoreError::Foreign { .. })
        ));
        Ok(())
    }
}
