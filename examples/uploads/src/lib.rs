//! The uploads example's handler: S3 `ObjectCreated` notifications (the
//! S3 event JSON, delivered raw from a RabbitMQ topic as S3 → SNS → SQS
//! would) become a thumbnail and a metadata JSON per uploaded image.
//!
//! Each record is one notification; each of its `Records` names an object,
//! read through `object_store` from S3 (or any S3-compatible endpoint) or,
//! for trying it out, a local directory whose subdirectories are buckets.
//! A record whose object cannot be made into a thumbnail (not an image, a
//! truncated one, not an S3 event) fails alone: the handler names it in
//! `BatchResponse::failed` with its error, the subscription
//! (`report_item_failures = true`) retries it through its retry queues and
//! then dead-letters it with that error in `shardline.error`, while the
//! rest of the batch is done.
//!
//! Settings (`[handlers.uploads]` in the worker's config):
//!
//! | key | meaning |
//! |---|---|
//! | `endpoint` | an S3 endpoint URL (`http://127.0.0.1:9000`); absent: `root` |
//! | `root` | local directory whose subdirectories are the buckets (when no `endpoint`) |
//! | `region` | S3 region (default `us-east-1`) |
//! | `access_key_id`, `secret_access_key` | S3 credentials; default: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` |
//! | `output_bucket` | where thumbnails and metadata go (required; not the source bucket: a write there would notify again) |
//! | `max_side` | the thumbnail's longer side at most, pixels (default 128) |
//! | `max_bytes` | larger objects fail without being read whole (default 32 MiB) |

pub mod derive;
pub mod event;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use shardline_worker::{Batch, BatchResponse, Handler, HandlerError, InitContext, InitError, Record};

use crate::derive::{Metadata, Source, Thumbnail};
use crate::event::{Event, EventRecord};

/// Settings the handler accepts (`InitContext::only`).
pub const SETTINGS: &[&str] = &[
    "endpoint",
    "root",
    "region",
    "access_key_id",
    "secret_access_key",
    "output_bucket",
    "max_side",
    "max_bytes",
];

/// Where buckets live.
#[derive(Debug, Clone)]
enum Backend {
    S3 { endpoint: String, region: String, key_id: Option<String>, secret: Option<String> },
    Local { root: std::path::PathBuf },
}

/// The handler: one per worker process, shared by every batch of every
/// queue slot it runs.
pub struct Uploads {
    backend: Backend,
    output_bucket: String,
    max_side: u32,
    max_bytes: u64,
    /// Objects processed at once in one batch (the node's concurrency).
    parallel: usize,
    /// One client per bucket (object_store's S3 client is per bucket),
    /// made on first use and kept: its connection pool is reused.
    stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

/// The derived objects' keys for a source object.
pub fn thumbnail_key(source_bucket: &str, key: &str) -> String {
    format!("thumbnails/{source_bucket}/{key}.png")
}

pub fn metadata_key(source_bucket: &str, key: &str) -> String {
    format!("metadata/{source_bucket}/{key}.json")
}

impl Handler for Uploads {
    async fn init(ctx: &InitContext) -> Result<Self, InitError> {
        ctx.only(SETTINGS)?;
        let backend = match (ctx.string("endpoint")?, ctx.string("root")?) {
            (Some(endpoint), None) => Backend::S3 {
                endpoint,
                region: ctx.string("region")?.unwrap_or_else(|| "us-east-1".into()),
                key_id: ctx.string("access_key_id")?.or_else(|| std::env::var("AWS_ACCESS_KEY_ID").ok()),
                secret: ctx
                    .string("secret_access_key")?
                    .or_else(|| std::env::var("AWS_SECRET_ACCESS_KEY").ok()),
            },
            (None, Some(root)) => {
                let root = std::path::PathBuf::from(root);
                if !root.is_dir() {
                    return Err(ctx.error(format!("`root` = {root:?} is not a directory")));
                }
                Backend::Local { root }
            }
            _ => {
                return Err(
                    ctx.error("set exactly one of `endpoint` (an S3 URL) and `root` (a local directory)")
                );
            }
        };
        let output_bucket = ctx.string("output_bucket")?.ok_or_else(|| {
            ctx.error("`output_bucket` is required: the bucket thumbnails and metadata go to")
        })?;
        let max_side = integer(ctx, "max_side", 128, 1..=4096)?;
        let max_bytes = integer(ctx, "max_bytes", 32 << 20, 1..=1 << 30)?;
        let uploads = Uploads {
            backend,
            output_bucket,
            max_side: u32::try_from(max_side).map_err(|e| ctx.error(e.to_string()))?,
            max_bytes,
            parallel: usize::try_from(ctx.concurrency).unwrap_or(1).max(1),
            stores: Mutex::new(HashMap::new()),
        };
        // The output bucket is reached now (a HEAD of a key that need not
        // exist), so a wrong endpoint, bucket or credentials stop the worker
        // at start (exit 2) instead of failing every record.
        let output = uploads.store(&uploads.output_bucket).map_err(|e| ctx.error(e))?;
        match output.head(&Path::from(".uploads-probe")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(ctx.error(format!("output bucket {:?}: {e}", uploads.output_bucket))),
        }
        Ok(uploads)
    }

    async fn handle(&self, batch: &Batch) -> Result<BatchResponse, HandlerError> {
        // The futures are made before the stream (not in a closure of it),
        // so the handler's future stays `Send` for the worker's runtime.
        let each: Vec<_> = batch.records.iter().map(|r| self.positioned(r)).collect();
        let outcomes: Vec<(i64, Result<usize, String>)> =
            futures::stream::iter(each).buffer_unordered(self.parallel).collect().await;
        let mut response = BatchResponse::default();
        let mut made = 0;
        for (position, outcome) in outcomes {
            match outcome {
                Ok(n) => made += n,
                Err(error) => {
                    tracing::warn!(lease = %batch.lease, position, %error, "upload failed");
                    response.fail(position, error);
                }
            }
        }
        tracing::info!(
            lease = %batch.lease,
            records = batch.len(),
            thumbnails = made,
            failed = response.failed.len(),
            "batch done"
        );
        Ok(response)
    }
}

/// An integer setting within `range`; `default` when absent.
fn integer(
    ctx: &InitContext,
    key: &str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, InitError> {
    let value = match ctx.settings.get(key) {
        None => return Ok(default),
        Some(toml::Value::Integer(n)) => u64::try_from(*n).ok().filter(|n| range.contains(n)),
        Some(other) => return Err(ctx.error(format!("`{key}` must be an integer, not {}", other.type_str()))),
    };
    value.ok_or_else(|| ctx.error(format!("`{key}` must be within {}..={}", range.start(), range.end())))
}

impl Uploads {
    /// The client of `bucket`, made on first use.
    fn store(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>, String> {
        let mut stores = self.stores.lock().unwrap_or_else(|poisoned| {
            tracing::error!("the store cache's lock was poisoned by a panic elsewhere; going on with it");
            self.stores.clear_poison();
            poisoned.into_inner()
        });
        if let Some(store) = stores.get(bucket) {
            return Ok(store.clone());
        }
        let store: Arc<dyn ObjectStore> = match &self.backend {
            Backend::S3 { endpoint, region, key_id, secret } => {
                let mut builder = AmazonS3Builder::new()
                    .with_endpoint(endpoint)
                    .with_region(region)
                    .with_bucket_name(bucket)
                    // A few quick retries: a record that still fails is
                    // retried by the subscription's retry queues, so the
                    // handler never sits out its timeout on a dead endpoint.
                    .with_retry(RetryConfig {
                        max_retries: 3,
                        retry_timeout: Duration::from_secs(10),
                        ..RetryConfig::default()
                    })
                    // (These options replace the builder's whole set,
                    // `allow_http` included: it is set here.)
                    .with_client_options(
                        ClientOptions::new()
                            .with_timeout(Duration::from_secs(30))
                            .with_allow_http(endpoint.starts_with("http://")),
                    );
                match (key_id, secret) {
                    (Some(id), Some(secret)) => {
                        builder = builder.with_access_key_id(id).with_secret_access_key(secret);
                    }
                    _ => builder = builder.with_skip_signature(true),
                }
                Arc::new(builder.build().map_err(|e| format!("S3 bucket {bucket:?} at {endpoint}: {e}"))?)
            }
            Backend::Local { root } => {
                let dir = root.join(bucket);
                std::fs::create_dir_all(&dir).map_err(|e| format!("bucket directory {dir:?}: {e}"))?;
                Arc::new(
                    LocalFileSystem::new_with_prefix(&dir)
                        .map_err(|e| format!("bucket directory {dir:?}: {e}"))?,
                )
            }
        };
        stores.insert(bucket.to_owned(), store.clone());
        Ok(store)
    }

    async fn positioned(&self, r: &Record) -> (i64, Result<usize, String>) {
        (r.position(), self.record(r).await)
    }

    /// One notification: every created object in it; how many thumbnails
    /// were written. The first object that fails fails the record (with
    /// the object named); thumbnails already written for others in it are
    /// written again on its retry, to the same keys.
    async fn record(&self, r: &Record) -> Result<usize, String> {
        let event = Event::parse(&r.value).map_err(|e| e.to_string())?;
        let mut made = 0;
        for object in event.records.iter().filter(|o| o.is_object_created()) {
            self.object(object).await?;
            made += 1;
        }
        Ok(made)
    }

    async fn object(&self, e: &EventRecord) -> Result<(), String> {
        let bucket = &e.s3.bucket.name;
        let key = e.s3.object.decoded_key().map_err(|e| e.to_string())?;
        let at = format!("s3://{bucket}/{key}");
        let path = Path::parse(&key).map_err(|e| format!("{at}: not a usable object key: {e}"))?;
        let source = self.store(bucket)?;
        let meta = source.head(&path).await.map_err(|e| format!("{at}: {e}"))?;
        if meta.size > self.max_bytes {
            return Err(format!("{at}: {} bytes, larger than max_bytes ({})", meta.size, self.max_bytes));
        }
        let bytes = source.get(&path).await.map_err(|e| format!("{at}: {e}"))?;
        let bytes = bytes.bytes().await.map_err(|e| format!("{at}: {e}"))?;
        let size = bytes.len() as u64;
        let max_side = self.max_side;
        // Decoding is CPU-bound: off the async threads, which also carry
        // the worker's heartbeats and acks.
        let derived = tokio::task::spawn_blocking(move || derive::derive(&bytes, max_side))
            .await
            .map_err(|e| format!("{at}: decoding panicked or was cancelled: {e}"))?
            .map_err(|e| format!("{at}: {e}"))?;

        let output = self.store(&self.output_bucket)?;
        let thumb_key = thumbnail_key(bucket, &key);
        let thumb_path = Path::parse(&thumb_key).map_err(|e| format!("{at}: thumbnail key: {e}"))?;
        let metadata = Metadata {
            source: Source {
                bucket: bucket.clone(),
                key: key.clone(),
                size,
                etag: e.s3.object.e_tag.clone(),
                sequencer: e.s3.object.sequencer.clone(),
                event_time: e.event_time.clone(),
            },
            format: derive::format_name(derived.format).to_owned(),
            width: derived.width,
            height: derived.height,
            color: derived.color,
            thumbnail: Thumbnail {
                bucket: self.output_bucket.clone(),
                key: thumb_key.clone(),
                width: derived.thumb_width,
                height: derived.thumb_height,
                format: "png".into(),
            },
        };
        let json = serde_json::to_vec_pretty(&metadata).map_err(|e| format!("{at}: metadata: {e}"))?;
        // The thumbnail first: metadata present means its thumbnail is.
        output
            .put(&thumb_path, PutPayload::from(derived.png))
            .await
            .map_err(|e| format!("{at}: writing s3://{}/{thumb_key}: {e}", self.output_bucket))?;
        let meta_key = metadata_key(bucket, &key);
        let meta_path = Path::parse(&meta_key).map_err(|e| format!("{at}: metadata key: {e}"))?;
        output
            .put(&meta_path, PutPayload::from(json))
            .await
            .map_err(|e| format!("{at}: writing s3://{}/{meta_key}: {e}", self.output_bucket))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_worker::ConfigFile;

    /// The shipped worker config loads through the worker's own config
    /// type, and its `[handlers.uploads]` names only settings the handler
    /// knows (its `init` refuses any other).
    #[test]
    fn the_shipped_worker_config_is_valid_and_names_known_settings() {
        let c = shardline_worker::WorkerConfig::parse(include_str!("../worker.toml")).unwrap();
        assert_eq!(c.validate(), Ok(()));
        let settings = &c.handlers["uploads"];
        assert!(settings.keys().all(|k| SETTINGS.contains(&k.as_str())), "{settings:?}");
        assert!(settings.contains_key("output_bucket") && settings.contains_key("root"));
    }

    #[test]
    fn derived_keys_keep_the_source_bucket_and_key() {
        assert_eq!(thumbnail_key("in", "a b/c.jpg"), "thumbnails/in/a b/c.jpg.png");
        assert_eq!(metadata_key("in", "a b/c.jpg"), "metadata/in/a b/c.jpg.json");
    }
}
