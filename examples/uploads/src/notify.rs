//! `uploads-notify`: publishes the S3 `ObjectCreated:Put` notification of
//! objects already in a local bucket directory to a RabbitMQ topic, as S3
//! would publish to an SNS topic with raw message delivery. For trying the
//! example without S3; any S3 (or MinIO, Ceph, ...) bucket notifying an
//! exchange works the same.
//!
//! `uploads-notify --root DIR --bucket BUCKET --topic uploads [--amqp-url URL] [--samples N] KEY...`
//! (the URL defaults to `SHARDLINE_AMQP_URL`, else RabbitMQ on localhost).
//! `--samples N` first writes N generated images (PNG and JPEG, several
//! sizes) and one poison file (`not-an-image.png`, text) into the bucket
//! and notifies them too: what `run.sh` does when given no files.

use std::process::ExitCode;

use md5::{Digest, Md5};
use shardline_worker::amqp::{Message, Publisher};

struct Args {
    root: std::path::PathBuf,
    bucket: String,
    topic: String,
    amqp_url: String,
    keys: Vec<String>,
    samples: u32,
}

const USAGE: &str =
    "usage: uploads-notify --root DIR --bucket BUCKET --topic TOPIC [--amqp-url URL] [--samples N] KEY...";

fn args() -> Result<Args, String> {
    let (mut root, mut bucket, mut topic, mut keys, mut samples) = (None, None, None, Vec::new(), 0);
    let mut amqp_url = std::env::var("SHARDLINE_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--root" => root = Some(value()?.into()),
            "--bucket" => bucket = Some(value()?),
            "--topic" => topic = Some(value()?),
            "--amqp-url" => amqp_url = value()?,
            "--samples" => {
                let n = value()?;
                samples = n.parse().map_err(|_| format!("--samples {n}: not a count\n{USAGE}"))?;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}\n{USAGE}")),
            key => keys.push(key.to_owned()),
        }
    }
    let missing = |what: &str| format!("{what} is required\n{USAGE}");
    if keys.is_empty() && samples == 0 {
        return Err(format!("no KEY (or --samples N) given\n{USAGE}"));
    }
    Ok(Args {
        root: root.ok_or_else(|| missing("--root"))?,
        bucket: bucket.ok_or_else(|| missing("--bucket"))?,
        topic: topic.ok_or_else(|| missing("--topic"))?,
        amqp_url,
        keys,
        samples,
    })
}

/// S3's URL encoding of a key in notifications: unreserved characters and
/// `/` kept, a space as `+`, everything else `%XX`.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The notification of one object of `size` bytes with `etag`, as S3
/// writes it (eventVersion 2.1).
fn event(bucket: &str, key: &str, size: u64, etag: &str, sequencer: u64, time: &str) -> serde_json::Value {
    serde_json::json!({
        "Records": [{
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-east-1",
            "eventTime": time,
            "eventName": "ObjectCreated:Put",
            "userIdentity": { "principalId": "uploads-notify" },
            "requestParameters": { "sourceIPAddress": "127.0.0.1" },
            "responseElements": {},
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "uploads",
                "bucket": { "name": bucket, "ownerIdentity": { "principalId": "uploads-notify" }, "arn": format!("arn:aws:s3:::{bucket}") },
                "object": { "key": encode_key(key), "size": size, "eTag": etag, "sequencer": format!("{sequencer:018X}") }
            }
        }]
    })
}

/// Writes `n` sample images and one poison file into the bucket; their keys.
fn samples(dir: &std::path::Path, n: u32) -> Result<Vec<String>, String> {
    use image::{DynamicImage, ImageFormat, RgbImage};
    std::fs::create_dir_all(dir.join("samples")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut keys = Vec::new();
    for i in 0..n {
        let (w, h) = [(640, 480), (1024, 256), (200, 900), (64, 64)][i as usize % 4];
        let (format, ext) = if i % 2 == 0 { (ImageFormat::Png, "png") } else { (ImageFormat::Jpeg, "jpg") };
        let img = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, (i * 40) as u8])
        });
        let key = format!("samples/sample {i}.{ext}");
        let mut bytes = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut bytes), format)
            .map_err(|e| format!("{key}: {e}"))?;
        std::fs::write(dir.join(&key), bytes).map_err(|e| format!("{key}: {e}"))?;
        keys.push(key);
    }
    let poison = "samples/not-an-image.png".to_owned();
    std::fs::write(dir.join(&poison), "this is text, not a PNG\n").map_err(|e| format!("{poison}: {e}"))?;
    keys.push(poison);
    Ok(keys)
}

async fn run(mut args: Args) -> Result<(), String> {
    if args.samples > 0 {
        args.keys.extend(samples(&args.root.join(&args.bucket), args.samples)?);
    }
    let now = std::time::SystemTime::now();
    // S3's `eventTime` form: `2026-01-01T00:00:00.000Z`.
    let time = humantime::format_rfc3339_millis(now).to_string();
    let base = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    let mut messages = Vec::new();
    for (i, key) in args.keys.iter().enumerate() {
        let file = args.root.join(&args.bucket).join(key);
        let bytes = std::fs::read(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let etag = format!("{:x}", Md5::digest(&bytes));
        let body = event(&args.bucket, key, bytes.len() as u64, &etag, base + i as u64, &time);
        messages.push(Message {
            exchange: args.topic.clone(),
            body: body.to_string().into_bytes(),
            message_id: Some(format!("{}/{key}", args.bucket)),
            ..Message::default()
        });
    }
    let publisher = Publisher::connect(&args.amqp_url, "uploads-notify");
    publisher.publish(&messages).await.map_err(|e| format!("publishing to {}: {e}", args.topic))?;
    println!("published {} ObjectCreated:Put notifications to {}", messages.len(), args.topic);
    Ok(())
}

fn main() -> ExitCode {
    let args = match args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("uploads-notify: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uploads-notify: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_as_s3_encodes_them_and_decode_back() {
        assert_eq!(encode_key("holiday photos/café+1.jpg"), "holiday+photos/caf%C3%A9%2B1.jpg");
        let body = event("b", "a b/ü+.png", 3, "e", 1, "1970-01-01T00:00:00.000Z").to_string();
        let parsed = shardline_example_uploads::event::Event::parse(body.as_bytes()).unwrap();
        assert_eq!(parsed.records[0].s3.object.decoded_key().unwrap(), "a b/ü+.png");
    }
}
