//! `bench gateway`: records per second and p99 through
//! `POST /v1/streams/{stream}/records` of the real `shardline-gateway`
//! binary, driven by `wrk` (Debian's package; scripts/wrk.sh installs it)
//! with N connections, next to a direct rdkafka producer on the same
//! broker in the same run at the same settings (acks=all, idempotence,
//! `linger.ms` 5, the gateway's own) and the same concurrency: N tasks,
//! each sending one record and awaiting its acknowledgement before the
//! next, as each wrk connection waits for its 202. The ratio of the two
//! rates is the gateway's cost (target ≥ 0.8).
//!
//! Every wrk request must be answered 202 (wrk's "Non-2xx" count is zero),
//! else the run fails: a rate of errors is no rate.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use shardline_testkit::config::GatewayConfig;
use shardline_testkit::kafka::KafkaAccess;
use shardline_worker::config::KafkaSettings;
use tokio::time::Instant;

use crate::stats::{Latency, round3};

/// The gateway's rate over the direct producer's this benchmark aims at.
const TARGET_RATIO: f64 = 0.8;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Requests (and direct sends) in flight: wrk's connections, the
    /// direct producer's tasks.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1000))]
    connections: u64,
    /// Seconds each side runs.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Bytes of each record's value (the request body).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    record_bytes: u64,
    /// Partitions of the benchmark's topic.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    partitions: u32,
    /// wrk's threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    wrk_threads: u64,
    /// Kafka bootstrap servers.
    #[arg(long, env = "SHARDLINE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// The gateway binary [default: `shardline-gateway` next to this executable].
    #[arg(long, env = "SHARDLINE_GATEWAY_BIN")]
    gateway_bin: Option<PathBuf>,
    /// Also write the figures to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One side's figures.
struct Side {
    records: u64,
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Side {
    fn json(&self) -> serde_json::Value {
        json!({
            "records": self.records,
            "per_s": round3(self.per_s),
            "p50_ms": round3(self.p50_ms),
            "p99_ms": round3(self.p99_ms),
        })
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let bin = crate::child::resolve_bin(args.gateway_bin.as_deref(), "shardline-gateway", "--gateway-bin")?;
    which_wrk()?;
    let access = KafkaAccess { brokers: args.brokers.clone(), settings: KafkaSettings::default() };
    let topic = super::kafka::topic::unique_name();
    shardline_testkit::kafka::create_topic(&access, &topic, args.partitions, false).await?;
    println!(
        "bench gateway: {} s each, {} in flight, {}-byte records, {} partitions, acks=all + idempotence, linger.ms 5",
        args.seconds, args.connections, args.record_bytes, args.partitions
    );
    let direct = direct_side(&args, &access, &topic).await.context("direct producer phase")?;
    let gateway = gateway_side(&args, &bin, &topic).await.context("gateway phase")?;
    println!("  {:<26} {:>12} {:>10} {:>10} {:>10}", "", "records", "records/s", "p50 ms", "p99 ms");
    for (name, s) in [("direct rdkafka producer", &direct), ("gateway (wrk)", &gateway)] {
        println!("  {name:<26} {:>12} {:>10.0} {:>10.2} {:>10.2}", s.records, s.per_s, s.p50_ms, s.p99_ms);
    }
    let ratio = gateway.per_s / direct.per_s;
    let verdict = if ratio >= TARGET_RATIO { "met" } else { "MISSED" };
    println!("  ratio gateway / direct      {ratio:.3}   target ≥ {TARGET_RATIO}: {verdict}");
    if let Some(path) = &args.json {
        let report = json!({
            "bench": "gateway",
            "seconds": args.seconds,
            "connections": args.connections,
            "record_bytes": args.record_bytes,
            "partitions": args.partitions,
            "direct": direct.json(),
            "gateway": gateway.json(),
            "ratio": round3(ratio),
            "target_ratio": TARGET_RATIO,
        });
        let text = serde_json::to_string_pretty(&report).context("cannot encode the JSON report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

fn which_wrk() -> anyhow::Result<()> {
    let found = std::process::Command::new("wrk").arg("--version").output();
    match found {
        Ok(_) => Ok(()),
        Err(e) => bail!("wrk cannot be run ({e}): scripts/wrk.sh install"),
    }
}

/// N tasks, each sending one record and awaiting its acknowledgement
/// before the next, for `seconds`.
async fn direct_side(args: &Args, access: &KafkaAccess, topic: &str) -> anyhow::Result<Side> {
    let producer: Arc<FutureProducer> = Arc::new(
        access
            .client_config()?
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "10000")
            .create()
            .context("cannot create a Kafka producer")?,
    );
    let value = Arc::new(vec![b'x'; usize::try_from(args.record_bytes)?]);
    let started = Instant::now();
    let until = started + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| {
            let (producer, value, topic) = (producer.clone(), value.clone(), topic.to_owned());
            tokio::spawn(async move {
                let mut latency = Latency::new()?;
                let mut sent = 0u64;
                while Instant::now() < until {
                    let t0 = Instant::now();
                    let record = FutureRecord::<(), [u8]>::to(&topic).payload(value.as_slice());
                    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
                    latency.record(t0.elapsed());
                    sent += 1;
                }
                anyhow::Ok((sent, latency))
            })
        })
        .collect();
    let mut latency = Latency::new()?;
    let mut records = 0;
    for task in tasks {
        let (sent, l) = task.await??;
        records += sent;
        latency.merge(&l)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Side {
        records,
        per_s: records as f64 / seconds,
        p50_ms: latency.quantile_ms(0.5),
        p99_ms: latency.quantile_ms(0.99),
    })
}

/// The gateway binary on a port of its own, then wrk against it (a short
/// warm-up first: the first post reads the topic's metadata).
async fn gateway_side(args: &Args, bin: &std::path::Path, topic: &str) -> anyhow::Result<Side> {
    let dir = tempfile::tempdir()?;
    let config = GatewayConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        kafka_brokers: args.brokers.clone(),
        streams: vec![topic.to_owned()],
        ..GatewayConfig::default()
    };
    let path = dir.path().join("gateway.toml");
    shardline_testkit::config::write(&path, &config)?;
    let log = std::fs::File::create(dir.path().join("gateway.log"))?;
    let starting = shardline_testkit::process::spawn_listening("gateway", bin, &path, &[], Stdio::from(log))?;
    let (_proc, addr) = tokio::task::block_in_place(|| starting.wait(Duration::from_secs(30)))?;
    let script = dir.path().join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = string.rep(\"x\", {})\nwrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n",
            args.record_bytes
        ),
    )?;
    let url = format!("http://{addr}/v1/streams/{topic}/records");
    wrk(&script, &url, 1, 2, 2).await.context("warm-up")?;
    let out = wrk(&script, &url, args.wrk_threads, args.connections, args.seconds).await?;
    parse_wrk(&out).with_context(|| format!("wrk's output:\n{out}"))
}

async fn wrk(
    script: &std::path::Path,
    url: &str,
    threads: u64,
    connections: u64,
    seconds: u64,
) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("wrk")
        .args(["-t", &threads.to_string(), "-c", &connections.to_string(), "-d", &format!("{seconds}s")])
        .args(["--latency", "--timeout", "30s", "-s"])
        .arg(script)
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run wrk (scripts/wrk.sh install)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk exited {}: {text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    if let Some(line) = text.lines().find(|l| l.contains("Non-2xx") || l.contains("Socket errors")) {
        bail!("wrk saw failed requests: {}\n{text}", line.trim());
    }
    Ok(text)
}

/// Requests, requests/s, p50 and p99 from wrk's `--latency` report.
fn parse_wrk(out: &str) -> anyhow::Result<Side> {
    let field = |prefix: &str| {
        out.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|rest| rest.split_whitespace().collect::<Vec<_>>())
    };
    let per_s: f64 =
        field("Requests/sec:").and_then(|v| v.first()?.parse().ok()).context("no Requests/sec")?;
    let records: u64 = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.trim().parse().ok()))
        .context("no `N requests in` line")?;
    let p50 = field("50%").and_then(|v| duration_ms(v.first()?)).context("no 50% latency")?;
    let p99 = field("99%").and_then(|v| duration_ms(v.first()?)).context("no 99% latency")?;
    Ok(Side { records, per_s, p50_ms: p50, p99_ms: p99 })
}

/// wrk's `812.00us`, `3.21ms`, `1.02s` in ms.
fn duration_ms(text: &str) -> Option<f64> {
    for (unit, scale) in [("us", 0.001), ("ms", 1.0), ("s", 1000.0), ("m", 60_000.0)] {
        if let Some(n) = text.strip_suffix(unit) {
            return n.parse::<f64>().ok().map(|n| n * scale);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrks_report() {
        let out = "Running 20s test @ http://127.0.0.1:1/v1/streams/t/records\n  1 threads and 32 connections\n  \
                   Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     6.10ms    2.00ms  40.00ms   90.00%\n  \
                   Latency Distribution\n     50%    5.80ms\n     75%    6.50ms\n     90%    8.00ms\n     99%   12.50ms\n  \
                   104000 requests in 20.00s, 12.00MB read\nRequests/sec:   5200.00\nTransfer/sec:    600.00KB\n";
        let side = parse_wrk(out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((side.records, side.per_s, side.p50_ms, side.p99_ms), (104_000, 5200.0, 5.8, 12.5));
        assert_eq!(duration_ms("812.00us"), Some(0.812));
        assert_eq!(duration_ms("1.50s"), Some(1500.0));
    }
}
