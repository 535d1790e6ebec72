//! The `json-sum` example (`examples/src/bin/json-sum.rs`) run as its docs
//! say, `json-sum --config WORKER_CONFIG.toml` with a `[handlers.json-sum]`
//! table and a coordinator mapping a stream to `json-sum`, on real Kafka:
//! its per-batch lines add up to the records produced, the setting `field`
//! is honoured, a poison record is bisected out and given up *and the
//! worker logs it* (its `main` is `shardline_worker::main`, which installs
//! the logging), and SIGTERM drains it and exits 0 (as Ctrl-C does).

mod support;

use std::io::BufRead;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use shardline_testkit::config;
use shardline_tests::{Coordinator, CoordinatorConfig, WorkerConfig, create_topic, kafka_brokers, unique};

/// One line `json-sum` prints per batch: `LEASE: N records, +SUM, total T`.
#[derive(Debug)]
struct Line {
    records: u64,
    sum: i64,
    total: i64,
}

fn parse(line: &str) -> Result<Line> {
    let bad = || format!("json-sum printed {line:?}");
    let (_, rest) = line.rsplit_once(": ").with_context(bad)?;
    let mut parts = rest.split(", ");
    let records = parts.next().and_then(|p| p.strip_suffix(" records")).with_context(bad)?;
    let sum = parts.next().and_then(|p| p.strip_prefix('+')).with_context(bad)?;
    let total = parts.next().and_then(|p| p.strip_prefix("total ")).with_context(bad)?;
    Ok(Line { records: records.parse()?, sum: sum.parse()?, total: total.parse()? })
}

/// 40 records `{"cents": i, "amount": 1000}` (i = 1..=40) on two
/// partitions, and `field = "cents"`: the batches cover 40 records, their
/// sums add up to 820 and the running total reaches 820 (the default field
/// `amount` would give 40000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_sum_sums_the_configured_field_of_every_record() -> Result<()> {
    let topic = unique("json-sum");
    create_topic(&topic, 2).await?;
    let rows = (1..=40).map(|i| (format!("k{i}"), format!("{{\"cents\": {i}, \"amount\": 1000}}"), None));
    let poison = std::iter::once(("k7".to_owned(), "not json".to_owned(), None));
    support::produce_rows(&topic, None, rows.chain(poison)).await?;
    let dir = tempfile::tempdir()?;
    let mut stream = support::from_start(&topic, "json-sum");
    stream.settings.batch_size = 10;
    // The poison record: bisected out, given up at once (no destination).
    stream.settings.bisect_on_error = true;
    stream.settings.max_retries = Some(0);
    let config = CoordinatorConfig { streams: vec![stream], ..support::timings() };
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let config = WorkerConfig {
        coordinator: c.url.clone(),
        kafka_brokers: kafka_brokers(),
        ..config::hosting("json-sum", &[("field", "cents")])
    };
    let log = dir.path().join("json-sum.log");
    let mut worker = shardline_testkit::process::spawn(
        "json-sum",
        &shardline_tests::bin("json-sum"),
        ["--config", &support::config_file(dir.path(), "worker", &config)?],
        &[],
        Stdio::piped(),
        std::fs::File::create(&log)?.into(),
    )?;
    let stdout = worker.child.stdout.take().context("json-sum stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    while lines.iter().map(|l: &Line| l.records).sum::<u64>() < 40 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(parse(&line)?),
            Err(e) => bail!("json-sum printed {lines:?}, not all 40 records ({e})"),
        }
    }
    let (sum, total) = (lines.iter().map(|l| l.sum).sum::<i64>(), lines.iter().map(|l| l.total).max());
    ensure!(
        sum == 820 && total == Some(820) && lines.iter().map(|l| l.records).sum::<u64>() == 40,
        "json-sum printed {lines:?}: want 40 records summing to 820"
    );

    // The poison record was given up, and the worker said so (before
    // `shardline_worker::main`, this binary logged nothing at all).
    let logged =
        shardline_tests::eventually(Duration::from_secs(20), "json-sum logs the poison record", || async {
            let text = std::fs::read_to_string(&log)?;
            Ok((text.contains("is not JSON") && text.contains("bisecting")).then_some(()))
        })
        .await;
    ensure!(logged.is_ok(), "json-sum's log: {}", std::fs::read_to_string(&log).unwrap_or_default());

    // An orchestrator's stop: SIGTERM drains, the process exits 0.
    worker.signal(libc::SIGTERM)?;
    let status = worker.wait_exit(Duration::from_secs(15))?;
    ensure!(status.success(), "json-sum after SIGTERM exited {status}");
    Ok(())
}
