//! The embedded default store: sled, one tree of JSON lease records and
//! one of usage buckets, with a format marker so a foreign or newer
//! directory is refused rather than overwritten.

use std::future::Future;
use std::path::Path;

use shardline_proto::LeaseId;

use super::{LeaseStore, StoreError};
use crate::core::LeaseRecord;
use crate::usage::{BucketKey, Counts};

/// Marks a sled directory as a shardline store, with its format version.
pub const FORMAT_KEY: &[u8] = b"shardline.format";
pub const FORMAT_VERSION: u32 = 1;
const LEASES_TREE: &str = "leases";
const USAGE_TREE: &str = "usage";

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
        // A new directory, or a database with nothing in it yet, gets the
        // marker; one with trees but no marker is someone else's.
        Self::open_marked(path, |db| fresh || db.tree_names().len() <= 1)
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
        Self::open_marked(path, |_| false)
    }

    /// Opens the database and checks its format marker; one without a
    /// marker gets it if `may_mark` says so, else is refused as foreign.
    fn open_marked(path: &Path, may_mark: impl Fn(&sled::Db) -> bool) -> Result<Self, StoreError> {
        let db = sled::Config::new().path(path).open().map_err(|e| open_error(path, e))?;
        match db.get(FORMAT_KEY)? {
            Some(v) => check_format(path, &v)?,
            None if may_mark(&db) => {
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
}

fn check_format(path: &Path, v: &[u8]) -> Result<(), StoreError> {
    let found = <[u8; 4]>::try_from(v).map(u32::from_be_bytes).map_err(|_| StoreError::Foreign {
        path: path.display().to_string(),
        reason: "its format marker is unreadable".into(),
    })?;
    if found > FORMAT_VERSION {
        return Err(StoreError::NewerFormat {
            path: path.display().to_string(),
            found,
            newest: FORMAT_VERSION,
        });
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

    fn flush(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let db = self.db.clone();
        async move {
            // sled's flush blocks on fsync; keep it off the async workers.
            tokio::task::spawn_blocking(move || db.flush().map(|_| ()).map_err(StoreError::from)).await?
        }
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
            // A window's state comes back byte for byte.
            window: Some(shardline_proto::WindowState {
                state: Some(vec![0, 1, 255]),
                ..shardline_proto::WindowState::open(60_000, 120_000)
            }),
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
