//! The uploads example (`examples/uploads`) end to end: the real
//! coordinator, two `uploads` worker binaries, RabbitMQ, and an
//! S3-compatible endpoint (the `s3s-fs` server, installed by
//! `scripts/s3s.sh install`, serving a temporary directory).
//!
//! The test uploads images it makes (PNG and JPEG, colour, grey and
//! alpha, from a few pixels to 900 px, keys with spaces, `+` and non-ASCII
//! letters) and poison files (text, a truncated PNG and JPEG, random bytes
//! named `.png`, an empty `.jpg`) to the bucket through the S3 API, publishes one
//! S3 `ObjectCreated:Put` notification per object (plus one message that
//! is no notification at all) to the topic, and kills one of the two
//! workers with `kill -9` while they work. Then: every good upload has a
//! PNG thumbnail that decodes and fits the configured bound, and a metadata
//! JSON naming its dimensions, format, size and ETag; the dead-letter queue
//! holds exactly the bad ones, each with `retries_exhausted` and its own
//! decode error in `shardline.error`; no bad one has a thumbnail.
//!
//! Why the s3s-fs binary and not the crate in-process: the server runs as
//! it would for a user (its own process, its own pinned lock file through
//! `cargo install --locked`), and its dependencies (s3s, hyper's server
//! side) stay out of the workspace's build.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use image::{DynamicImage, ImageFormat, ImageReader};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use shardline_proto::FailurePolicy;
use shardline_testkit::config::{self, Backoff, SubscriptionConfig, TopicConfig, TopicKind};
use shardline_testkit::process::{self, Proc};
use shardline_tests::amqp::{Got, drain_queue, publisher};
use shardline_tests::{Coordinator, CoordinatorConfig, WorkerConfig, eventually, free_port, unique};
use shardline_worker::amqp::Message;

mod support;

const KEY_ID: &str = "shardline-test";
const SECRET: &str = "shardline-test-secret";
const SOURCE: &str = "incoming";
const OUTPUT: &str = "derived";
/// The thumbnail bound the test configures (`max_side`; the default is 128).
const MAX_SIDE: u32 = 96;

/// The s3s-fs binary: `$SHARDLINE_S3S_BIN`, else where scripts/s3s.sh
/// installs it.
fn s3s_bin() -> Result<PathBuf> {
    let path = match std::env::var_os("SHARDLINE_S3S_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let dir = std::env::var_os("SHARDLINE_S3S_DIR").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/shardline/s3s")
            });
            dir.join("bin/s3s-fs")
        }
    };
    ensure!(
        path.is_file(),
        "no s3s-fs at {}: run scripts/s3s.sh install (scripts/test.sh does)",
        path.display()
    );
    Ok(path)
}

/// s3s-fs serving `root` (buckets are its subdirectories) on a free port,
/// with one key pair; killed on drop.
fn start_s3(root: &std::path::Path) -> Result<(Proc, String)> {
    let port = free_port()?;
    let port_text = port.to_string();
    let root_text = root.to_str().context("temp dir not UTF-8")?;
    let args = [
        "--host",
        "127.0.0.1",
        "--port",
        &port_text,
        "--access-key",
        KEY_ID,
        "--secret-key",
        SECRET,
        root_text,
    ];
    let proc = process::spawn("s3s-fs", &s3s_bin()?, args, &[], Stdio::null(), Stdio::inherit())?;
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(started.elapsed() < Duration::from_secs(30), "s3s-fs did not listen on {port} within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((proc, format!("http://127.0.0.1:{port}")))
}

fn bucket(endpoint: &str, name: &str) -> Result<Arc<dyn ObjectStore>> {
    let store = AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_bucket_name(name)
        .with_access_key_id(KEY_ID)
        .with_secret_access_key(SECRET)
        .build()?;
    Ok(Arc::new(store))
}

/// One image the test makes: its pixels differ per index so no two
/// uploads are the same bytes.
fn make_image(i: u32, width: u32, height: u32, format: ImageFormat, kind: u32) -> Result<Vec<u8>> {
    let pixel =
        |x: u32, y: u32| [((x * 7 + i) % 256) as u8, ((y * 3 + i * 5) % 256) as u8, ((x ^ y) % 256) as u8];
    let image = match kind % 3 {
        0 => DynamicImage::ImageRgb8(image::RgbImage::from_fn(width, height, |x, y| image::Rgb(pixel(x, y)))),
        1 => DynamicImage::ImageLuma8(image::GrayImage::from_fn(width, height, |x, y| {
            image::Luma([pixel(x, y)[0]])
        })),
        // JPEG has no alpha: the RGBA ones are PNG.
        _ if format == ImageFormat::Png => {
            DynamicImage::ImageRgba8(image::RgbaImage::from_fn(width, height, |x, y| {
                let [r, g, b] = pixel(x, y);
                image::Rgba([r, g, b, (x % 256) as u8])
            }))
        }
        _ => DynamicImage::ImageRgb8(image::RgbImage::from_fn(width, height, |x, y| image::Rgb(pixel(x, y)))),
    };
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), format)?;
    Ok(out)
}

/// S3's URL encoding of a key in notifications (a space is `+`).
fn encode_key(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The notification S3 sends for a `PutObject` of `key` (eventVersion
/// 2.1, the shape of the S3 user guide's example), written out here, not
/// by the example, so the test checks the example reads S3's format.
fn notification(key: &str, size: usize, etag: &str, sequencer: usize) -> String {
    format!(
        r#"{{"Records":[{{"eventVersion":"2.1","eventSource":"aws:s3","awsRegion":"us-east-1","eventTime":"2026-01-01T00:00:00.000Z","eventName":"ObjectCreated:Put","userIdentity":{{"principalId":"AWS:AIDAEXAMPLE"}},"requestParameters":{{"sourceIPAddress":"127.0.0.1"}},"responseElements":{{"x-amz-request-id":"C3D13FE58DE4C810","x-amz-id-2":"FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"}},"s3":{{"s3SchemaVersion":"1.0","configurationId":"thumbnails","bucket":{{"name":"{SOURCE}","ownerIdentity":{{"principalId":"A3NL1KOZZKExample"}},"arn":"arn:aws:s3:::{SOURCE}"}},"object":{{"key":"{}","size":{size},"eTag":"{etag}","sequencer":"{sequencer:018X}"}}}}}}]}}"#,
        encode_key(key)
    )
}

/// What the test expects of one good upload.
#[derive(Debug)]
struct Good {
    key: String,
    format: &'static str,
    width: u32,
    height: u32,
    size: usize,
    etag: String,
}

/// A poison upload and the words its dead letter's error must contain.
#[derive(Debug)]
struct Bad {
    key: String,
    error: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thumbnails_for_every_good_upload_and_each_poison_file_dead_lettered_with_its_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let s3_root = dir.path().join("s3");
    for b in [SOURCE, OUTPUT] {
        std::fs::create_dir_all(s3_root.join(b))?;
    }
    let (_s3, endpoint) = start_s3(&s3_root)?;
    let source = bucket(&endpoint, SOURCE)?;
    let output = bucket(&endpoint, OUTPUT)?;

    // The topology, deleted however the test ends: the retry queues are
    // named after the delays of the subscription's backoff.
    let (topic, sub) = (unique("uploads"), unique("thumbnails"));
    let (initial, max) = (Duration::from_millis(500), Duration::from_secs(1));
    let policy = FailurePolicy { retry_initial: initial, retry_max: max, ..FailurePolicy::default() };
    let mut cleanup = shardline_tests::amqp::cleanup().subscription(&sub, &policy);
    cleanup.exchanges.push(topic.clone());

    let mut subscription = SubscriptionConfig::new(&sub, &topic, "uploads");
    (subscription.min_slots, subscription.max_concurrency) = (2, 2);
    let s = &mut subscription.settings;
    (s.batch_size, s.report_item_failures, s.max_retries) = (4, true, Some(2));
    s.retry_backoff = Backoff { initial, max, multiplier: 2.0, ..Backoff::default() };
    let config = CoordinatorConfig {
        topics: vec![TopicConfig { name: topic.clone(), kind: TopicKind::Fanout }],
        subscriptions: vec![subscription],
        ..support::timings()
    };
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let mut worker = config::hosting(
        "uploads",
        &[
            ("endpoint", endpoint.as_str()),
            ("access_key_id", KEY_ID),
            ("secret_access_key", SECRET),
            ("output_bucket", OUTPUT),
        ],
    );
    if let Some(settings) = worker.handlers.get_mut("uploads") {
        settings.insert("max_side".into(), toml::Value::Integer(i64::from(MAX_SIDE)));
    }
    let mut workers = vec![
        start_uploads(dir.path(), &c.url, "w1", &worker)?,
        start_uploads(dir.path(), &c.url, "w2", &worker)?,
    ];
    consuming(&c, &sub, 2).await?;
    // One slot per worker, so the one killed below holds work.
    let owners = shardline_tests::owners(&c.leases().await?);
    ensure!(owners.len() == 2, "one slot per worker: {owners:?}");

    // The uploads: 48 images, every fourth a JPEG, sizes from 3 px to
    // 900 px, and 5 poison files among them.
    let mut goods = Vec::new();
    let mut uploads: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..48u32 {
        let (width, height) =
            [(640, 480), (3, 5), (900, 120), (96, 96), (97, 40), (50, 700), (300, 300), (128, 64)]
                [i as usize % 8];
        let format = if i % 4 == 3 { ImageFormat::Jpeg } else { ImageFormat::Png };
        let ext = if format == ImageFormat::Jpeg { "jpg" } else { "png" };
        let key = match i % 5 {
            0 => format!("photos/summer trip/img {i}.{ext}"),
            1 => format!("photos/café+{i}.{ext}"),
            _ => format!("photos/{i}.{ext}"),
        };
        let bytes = make_image(i, width, height, format, i / 4)?;
        goods.push(Good {
            key: key.clone(),
            format: if format == ImageFormat::Jpeg { "jpeg" } else { "png" },
            width,
            height,
            size: bytes.len(),
            etag: String::new(),
        });
        uploads.push((key, bytes));
    }
    let whole = make_image(1, 400, 300, ImageFormat::Png, 0)?;
    let photo = make_image(2, 400, 300, ImageFormat::Jpeg, 0)?;
    let bads = vec![
        (
            Bad { key: "docs/readme.txt".into(), error: "not an image" },
            b"just some notes, no picture".to_vec(),
        ),
        (
            Bad { key: "photos/cut short.png".into(), error: "cannot decode the png image" },
            whole[..whole.len() / 2].to_vec(),
        ),
        (
            Bad { key: "photos/cut short.jpg".into(), error: "cannot decode the jpeg image: truncated" },
            photo[..photo.len() * 2 / 3].to_vec(),
        ),
        (
            Bad { key: "photos/noise.png".into(), error: "not an image" },
            (0..2048u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect(),
        ),
        (Bad { key: "photos/empty.jpg".into(), error: "not an image" }, Vec::new()),
    ];
    let mut etags = BTreeMap::new();
    for (key, bytes) in
        uploads.iter().map(|(k, bytes)| (k, bytes)).chain(bads.iter().map(|(b, bytes)| (&b.key, bytes)))
    {
        let put = source.put(&ObjectPath::parse(key)?, PutPayload::from(bytes.clone())).await?;
        // S3 quotes the ETag in its headers, not in notifications.
        let etag = put.e_tag.context("s3s-fs returned no ETag")?;
        etags.insert(key.clone(), etag.trim_matches('"').to_owned());
    }
    for g in &mut goods {
        g.etag = etags[&g.key].clone();
    }

    // One notification per object, the poison among the good ones, and one
    // message that is not a notification at all.
    let mut messages = Vec::new();
    let mut bad_iter = bads.iter();
    for (i, (key, bytes)) in uploads.iter().enumerate() {
        messages.push(event_message(&topic, key, bytes.len(), &etags[key], i));
        if i % 10 == 5
            && let Some((b, bytes)) = bad_iter.next()
        {
            messages.push(event_message(&topic, &b.key, bytes.len(), &etags[&b.key], 1000 + i));
        }
    }
    let not_an_event = r#"{"hello": "world"}"#;
    messages.push(Message {
        exchange: topic.clone(),
        body: not_an_event.as_bytes().to_vec(),
        message_id: Some("not-an-event".into()),
        ..Message::default()
    });
    ensure!(bad_iter.next().is_none(), "every poison file published");
    publisher().publish(&messages).await.map_err(anyhow::Error::msg).context("publish the notifications")?;
    println!(
        "published {} notifications: {} images, {} poison files, 1 not a notification",
        messages.len(),
        goods.len(),
        bads.len()
    );

    // kill -9 of one worker once thumbnails are being written.
    eventually(Duration::from_secs(120), "the first metadata written", || async {
        Ok((count(&output, "metadata").await? >= 4).then_some(()))
    })
    .await?;
    workers[0].kill9()?;
    let killed_at = Instant::now();
    println!("killed w1 after {} metadata documents", count(&output, "metadata").await?);

    // Every good upload: thumbnail and metadata.
    let done = eventually(Duration::from_secs(240), "metadata for every good upload", || async {
        Ok((count(&output, "metadata").await? >= goods.len()).then_some(()))
    })
    .await;
    ensure!(
        done.is_ok(),
        "{} of {} metadata documents after the kill",
        count(&output, "metadata").await?,
        goods.len()
    );
    println!("every good upload derived {:?} after the kill", killed_at.elapsed());
    for g in &goods {
        check_derived(&output, g).await?;
    }

    // The dead letters: exactly the poison files and the stray message,
    // each with its own error.
    let dlq = shardline_proto::topology::dead_letter_queue(&sub);
    let want = bads.len() + 1;
    let dead = drain_queue(&dlq, want, Duration::from_secs(3), Duration::from_secs(180)).await?;
    let by_id: BTreeMap<String, Vec<&Got>> = dead.iter().fold(BTreeMap::new(), |mut m, d| {
        m.entry(dead_key(d)).or_default().push(d);
        m
    });
    for d in &dead {
        println!(
            "dead letter {}: reason {:?}, attempts {:?}, error {:?}",
            dead_key(d),
            d.header("shardline.reason"),
            d.header("shardline.attempts"),
            d.header("shardline.error")
        );
    }
    let expected: BTreeSet<String> =
        bads.iter().map(|(b, _)| encode_key(&b.key)).chain([not_an_event.to_owned()]).collect();
    let got: BTreeSet<String> = by_id.keys().cloned().collect();
    ensure!(got == expected, "the dead-letter queue holds {got:?}, want exactly {expected:?}");
    let duplicates = dead.len() - by_id.len();
    // A dead letter is written again only if its worker died between the
    // broker's confirm and its ack of the original: at most the killed
    // worker's in-flight batch.
    ensure!(duplicates <= 4, "{duplicates} dead letters written twice");
    for (b, _) in &bads {
        for d in &by_id[&encode_key(&b.key)] {
            check_dead(d, &b.key, b.error)?;
        }
        let thumb = ObjectPath::parse(shardline_example_thumbnail_key(&b.key))?;
        ensure!(output.head(&thumb).await.is_err(), "{} has a thumbnail", b.key);
    }
    for d in &by_id[not_an_event] {
        check_dead(d, not_an_event, "not an S3 event notification")?;
    }
    ensure!(count(&output, "metadata").await? == goods.len(), "metadata only for the good uploads");
    drop(workers);
    drop(c);
    drop(cleanup);
    Ok(())
}

/// `uploads --config FILE` for worker `id`, with the tests' broker.
fn start_uploads(dir: &std::path::Path, coordinator: &str, id: &str, config: &WorkerConfig) -> Result<Proc> {
    let config = WorkerConfig {
        coordinator: coordinator.to_owned(),
        worker_id: Some(id.to_owned()),
        amqp_url: shardline_tests::amqp::amqp_url(),
        kafka_brokers: shardline_tests::kafka_brokers(),
        ..config.clone()
    };
    let path = support::config_file(dir, &format!("worker-{id}"), &config)?;
    process::start_worker(&shardline_tests::bin("uploads"), std::path::Path::new(&path), id, Stdio::inherit())
}

/// Waits until the subscription's slots consume (the coordinator declared
/// the topology and each worker holds a slot).
async fn consuming(c: &Coordinator, name: &str, consumers: u32) -> Result<()> {
    eventually(Duration::from_secs(60), "slots consuming", || async {
        let reply =
            c.admin().await?.list_subscriptions(shardline_proto::v1::ListSubscriptionsRequest {}).await?;
        let s = reply.into_inner().subscriptions.into_iter().find(|s| s.name == name).context("listed")?;
        ensure!(s.error.is_empty(), "topology error: {}", s.error);
        Ok((s.consumers >= consumers).then_some(()))
    })
    .await
}

fn event_message(topic: &str, key: &str, size: usize, etag: &str, sequencer: usize) -> Message {
    Message {
        exchange: topic.to_owned(),
        body: notification(key, size, etag, sequencer).into_bytes(),
        message_id: Some(key.to_owned()),
        ..Message::default()
    }
}

/// The object key a dead letter's notification names (as notifications
/// encode it), or its whole body when it is no notification.
fn dead_key(d: &Got) -> String {
    let parsed: Option<String> = serde_json::from_str::<serde_json::Value>(&d.body)
        .ok()
        .and_then(|v| v.pointer("/Records/0/s3/object/key")?.as_str().map(str::to_owned));
    parsed.unwrap_or_else(|| d.body.clone())
}

fn check_dead(d: &Got, key: &str, error: &str) -> Result<()> {
    ensure!(
        d.header("shardline.reason") == Some("retries_exhausted"),
        "{key}: reason {:?}",
        d.header("shardline.reason")
    );
    ensure!(
        d.header("shardline.attempts") == Some("3"),
        "{key}: attempts {:?} (1 + max_retries 2)",
        d.header("shardline.attempts")
    );
    let text = d.header("shardline.error").unwrap_or_default();
    ensure!(text.contains(error), "{key}: error {text:?} does not say {error:?}");
    Ok(())
}

/// The example's thumbnail key for a source object in [`SOURCE`].
fn shardline_example_thumbnail_key(key: &str) -> String {
    format!("thumbnails/{SOURCE}/{key}.png")
}

async fn count(store: &Arc<dyn ObjectStore>, prefix: &str) -> Result<usize> {
    use futures::TryStreamExt;
    let listed: Vec<_> = store.list(Some(&ObjectPath::from(prefix))).try_collect().await?;
    Ok(listed.len())
}

/// The thumbnail decodes as PNG within the bound with the source's aspect
/// ratio; the metadata names the source and what it is.
async fn check_derived(output: &Arc<dyn ObjectStore>, g: &Good) -> Result<()> {
    let thumb_key = shardline_example_thumbnail_key(&g.key);
    let bytes =
        output.get(&ObjectPath::parse(&thumb_key)?).await.with_context(|| thumb_key.clone())?.bytes().await?;
    let thumb = ImageReader::with_format(Cursor::new(bytes), ImageFormat::Png)
        .decode()
        .with_context(|| thumb_key.clone())?;
    let (w, h) = (thumb.width(), thumb.height());
    ensure!(w <= MAX_SIDE && h <= MAX_SIDE && w >= 1 && h >= 1, "{thumb_key}: {w}x{h} not within {MAX_SIDE}");
    if g.width <= MAX_SIDE && g.height <= MAX_SIDE {
        ensure!(
            (w, h) == (g.width, g.height),
            "{thumb_key}: {w}x{h}, a small image is kept at {}x{}",
            g.width,
            g.height
        );
    } else {
        ensure!(w.max(h) == MAX_SIDE, "{thumb_key}: {w}x{h}, the longer side should be {MAX_SIDE}");
        // The aspect ratio kept to within a pixel of rounding on either side.
        let skew = (i64::from(w) * i64::from(g.height) - i64::from(h) * i64::from(g.width)).abs();
        ensure!(
            skew <= i64::from(g.width.max(g.height)),
            "{thumb_key}: {w}x{h} for {}x{}",
            g.width,
            g.height
        );
    }
    let meta_key = format!("metadata/{SOURCE}/{}.json", g.key);
    let bytes =
        output.get(&ObjectPath::parse(&meta_key)?).await.with_context(|| meta_key.clone())?.bytes().await?;
    let m: serde_json::Value = serde_json::from_slice(&bytes).with_context(|| meta_key.clone())?;
    let field = |p: &str| m.pointer(p).cloned().unwrap_or(serde_json::Value::Null);
    ensure!(
        field("/source/bucket") == SOURCE && field("/source/key") == g.key.as_str(),
        "{meta_key}: source {m}"
    );
    ensure!(
        field("/source/size") == g.size && field("/source/etag") == g.etag.as_str(),
        "{meta_key}: size/etag {m}, want {} {}",
        g.size,
        g.etag
    );
    ensure!(field("/format") == g.format, "{meta_key}: format {m}, want {}", g.format);
    ensure!(
        field("/width") == g.width && field("/height") == g.height,
        "{meta_key}: {m}, want {}x{}",
        g.width,
        g.height
    );
    ensure!(
        field("/thumbnail/key") == thumb_key.as_str()
            && field("/thumbnail/width") == w
            && field("/thumbnail/height") == h,
        "{meta_key}: thumbnail {m}"
    );
    if field("/source/sequencer").is_null() {
        bail!("{meta_key}: no sequencer {m}");
    }
    Ok(())
}
