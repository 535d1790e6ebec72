//! Lambda functions run unchanged by the `function` handler kind, through
//! the real runtime clients from the registries (installed by
//! `scripts/functions.sh install`, which scripts/test.sh runs): Python
//! through PyPI's `awslambdaric`, Node.js through npm's `aws-lambda-ric`,
//! Rust through crates.io's `lambda_runtime`, and a Python function
//! written with AWS Lambda Powertools' batch utility.
//!
//! Each runtime's fixture (`tests/functions/`) consumes a Kafka stream (in
//! the `kinesis` or `kafka` event format) and a RabbitMQ subscription (in
//! `sqs`) at once, through one worker, while records make it report item
//! failures (`poison`), raise (`throw`), crash its process mid-batch
//! (`crash`, once) and pass the deadline (`slow`, once). Every other
//! record reaches the fixture's receipts file; the poison and throwing ones
//! end in the stream's `on_failure` topic and the subscription's
//! dead-letter queue, and nowhere else. The worker's log carries the
//! function's output with request ids; a function whose init fails makes
//! its worker report itself unhealthy; SIGTERM ends the processes.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use shardline_proto::FailurePolicy;
use shardline_testkit::config;
use shardline_testkit::config::{BatchSettings, SubscriptionConfig, TopicConfig, TopicKind};
use shardline_tests::amqp::{amqp_url, drain_queue};
use shardline_tests::{
    Coordinator, CoordinatorConfig, WorkerConfig, create_topic, eventually, kafka_brokers, scrape_or_zero,
    unique,
};
use shardline_worker::amqp::Message;

/// One drill at a time: each runs a worker, its function processes and
/// a coordinator, on a machine of 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where `scripts/functions.sh install` put the runtime clients.
fn functions_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("SHARDLINE_FUNCTIONS_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/shardline/functions"),
    };
    for part in ["venv/bin/python", "node/node_modules/aws-lambda-ric/bin/index.mjs", "rust/fixture-function"]
    {
        ensure!(
            dir.join(part).exists(),
            "{} is missing: run scripts/functions.sh install (scripts/test.sh does)",
            dir.join(part).display()
        );
    }
    Ok(dir)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A runtime: the command that starts one function process, its working
/// directory, and the event format its stream gets.
struct Runtime {
    command: Vec<String>,
    working_dir: PathBuf,
    stream_format: &'static str,
}

fn runtime(name: &'static str) -> Result<Runtime> {
    let dir = functions_dir()?;
    let path = |p: &str| dir.join(p).display().to_string();
    let fixtures = repo().join("tests/functions");
    Ok(match name {
        "python" => Runtime {
            command: vec![path("venv/bin/python"), "-m".into(), "awslambdaric".into(), "app.handler".into()],
            working_dir: fixtures.join("python"),
            stream_format: "kinesis",
        },
        "node" => Runtime {
            command: vec![
                "node".into(),
                path("node/node_modules/aws-lambda-ric/bin/index.mjs"),
                "app.handler".into(),
            ],
            working_dir: fixtures.join("node"),
            stream_format: "kafka",
        },
        "rust" => Runtime {
            command: vec![path("rust/fixture-function")],
            working_dir: fixtures.join("rust"),
            stream_format: "kafka",
        },
        other => bail!("no runtime {other}"),
    })
}

/// The stream's and the subscription's record texts: `k0..k59` and
/// `q0..q39`, some marked.
fn texts(prefix: &str, n: usize, marks: &[(usize, &str)]) -> Vec<String> {
    (0..n)
        .map(|i| match marks.iter().find(|(at, _)| *at == i) {
            Some((_, mark)) => format!("{prefix}{i}-{mark}"),
            None => format!("{prefix}{i}"),
        })
        .collect()
}

/// The failure policy both mappings use: quick retries, bisect, item
/// failures, a deadline short enough for `slow` to pass it.
fn batch(s: &mut BatchSettings) {
    s.batch_size = 10;
    s.max_retries = Some(2);
    s.bisect_on_error = true;
    s.report_item_failures = true;
    s.handler_timeout = Duration::from_secs(4);
    s.retry_backoff.initial = Duration::from_secs(1);
    s.retry_backoff.max = Duration::from_secs(2);
}

fn policy() -> FailurePolicy {
    FailurePolicy {
        retry_initial: Duration::from_secs(1),
        retry_max: Duration::from_secs(2),
        ..FailurePolicy::default()
    }
}

/// A stream and a subscription, their failure destinations, and the
/// RabbitMQ names deleted when dropped.
struct Sources {
    topic: String,
    failed_topic: String,
    exchange: String,
    subscription: String,
    _cleanup: shardline_testkit::amqp::Cleanup,
}

impl Sources {
    async fn new(prefix: &str) -> Result<Self> {
        let (topic, failed_topic) = (unique(prefix), unique("failed"));
        create_topic(&topic, 2).await?;
        create_topic(&failed_topic, 1).await?;
        let (exchange, subscription) = (unique("fx"), unique("fs"));
        let mut cleanup = shardline_tests::amqp::cleanup();
        cleanup.exchanges.push(exchange.clone());
        let cleanup = cleanup.subscription(&subscription, &policy());
        Ok(Self { topic, failed_topic, exchange, subscription, _cleanup: cleanup })
    }

    /// The coordinator's mappings: the stream with `on_failure`, the
    /// subscription (whose failures go to its dead-letter queue).
    fn coordinator(&self, stream_handler: &str, queue_handler: &str) -> CoordinatorConfig {
        let mut stream = support::from_start(&self.topic, stream_handler);
        stream.on_failure = Some(self.failed_topic.clone());
        batch(&mut stream.settings);
        let mut sub = SubscriptionConfig::new(&self.subscription, &self.exchange, queue_handler);
        batch(&mut sub.settings);
        CoordinatorConfig {
            streams: vec![stream],
            topics: vec![TopicConfig { name: self.exchange.clone(), kind: TopicKind::Fanout }],
            subscriptions: vec![sub],
            ..support::timings()
        }
    }

    async fn feed(&self, stream: &[String], queue: &[String]) -> Result<()> {
        let rows = stream.iter().enumerate().map(|(i, t)| (format!("key{i}"), t.clone(), None));
        support::produce_rows(&self.topic, None, rows).await?;
        let messages: Vec<Message> = queue
            .iter()
            .map(|text| Message {
                exchange: self.exchange.clone(),
                body: text.as_bytes().to_vec(),
                ..Message::default()
            })
            .collect();
        shardline_tests::amqp::publisher().publish(&messages).await.map_err(anyhow::Error::msg)?;
        Ok(())
    }

    /// What the stream's `on_failure` topic and the subscription's
    /// dead-letter queue received, once `stream` and `queue` records
    /// arrived in them.
    async fn failed(&self, stream: usize, queue: usize) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
        let topic = self.failed_topic.clone();
        let records = eventually(Duration::from_secs(120), "the on_failure topic", || {
            let topic = topic.clone();
            async move {
                let got = tokio::task::spawn_blocking(move || {
                    shardline_tests::kafka::read_topic(&topic, Duration::from_secs(5))
                })
                .await??;
                Ok((got.len() >= stream).then_some(got))
            }
        })
        .await?;
        let dlq = shardline_proto::topology::dead_letter_queue(&self.subscription);
        let dead = drain_queue(&dlq, queue, Duration::from_millis(500), Duration::from_secs(120)).await?;
        Ok((records.into_iter().map(|r| r.value).collect(), dead.into_iter().map(|g| g.body).collect()))
    }
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// A worker whose stderr goes to a file the test reads.
struct Worker {
    proc: shardline_testkit::process::Proc,
    log: PathBuf,
    metrics: String,
}

fn start_worker(
    dir: &std::path::Path,
    coordinator: &Coordinator,
    id: &str,
    handlers: &str,
) -> Result<Worker> {
    let metrics = shardline_testkit::free_addr()?;
    let text = format!(
        "coordinator = \"{}\"\nworker_id = \"{id}\"\nkafka_brokers = \"{}\"\namqp_url = \"{}\"\n\
         metrics_listen = \"{metrics}\"\nmax_inflight_batches = 2\ndrain_timeout = \"10s\"\n{handlers}",
        coordinator.url,
        kafka_brokers(),
        amqp_url()
    );
    let config: WorkerConfig = config::parse(&text)?;
    let path = support::config_file(dir, id, &config)?;
    let log = dir.join(format!("{id}.log"));
    let proc = shardline_testkit::process::spawn(
        id,
        &shardline_tests::bin("shardline-worker"),
        ["--config", &path],
        &[],
        Stdio::null(),
        std::fs::File::create(&log)?.into(),
    )?;
    Ok(Worker { proc, log, metrics: metrics.to_string() })
}

impl Worker {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The pids of the function processes it reported initialised.
    fn function_pids(&self) -> BTreeSet<i32> {
        self.log()
            .lines()
            .filter(|l| l.contains("function process initialised"))
            .filter_map(|l| l.split("pid=").nth(1)?.split_whitespace().next()?.parse().ok())
            .collect()
    }
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The whole fault drill for one runtime.
async fn drill(name: &'static str) -> Result<()> {
    let _serial = SERIAL.lock().await;
    let rt = runtime(name)?;
    let dir = tempfile::tempdir()?;
    let (receipts, markers) = (dir.path().join("receipts"), dir.path().join("markers"));
    std::fs::create_dir_all(&markers)?;
    let sources = Sources::new(&format!("fn-{name}")).await?;
    let stream = texts("k", 60, &[(7, "poison"), (13, "crash"), (21, "slow"), (30, "throw"), (44, "poison")]);
    let queue = texts("q", 40, &[(5, "poison"), (17, "crash"), (23, "slow"), (31, "throw")]);
    let coordinator = Coordinator::start_config(sources.coordinator("fn", "fn"), &dir.path().join("data"))?;
    let handler = format!(
        "[handlers.fn]\nkind = \"function\"\ncommand = {}\nworking_dir = {:?}\nconcurrency = 2\n\
         event_format = {{ {:?} = {:?}, {:?} = \"sqs\" }}\n\
         env = {{ RECEIPTS = {:?}, MARKERS = {:?} }}\n",
        toml_list(&rt.command),
        rt.working_dir.display().to_string(),
        sources.topic,
        rt.stream_format,
        sources.subscription,
        receipts.display().to_string(),
        markers.display().to_string(),
    );
    let mut worker = start_worker(dir.path(), &coordinator, &format!("fn-{name}"), &handler)?;
    sources.feed(&stream, &queue).await?;

    let (failed_records, dead_letters) = sources.failed(3, 2).await?;
    let expected = |texts: &[String]| -> BTreeSet<String> {
        texts.iter().filter(|t| !t.contains("poison") && !t.contains("throw")).cloned().collect()
    };
    let mut wanted = expected(&stream);
    wanted.extend(expected(&queue));
    let got: BTreeSet<String> = eventually(Duration::from_secs(120), "every good record's receipt", || {
        let seen: BTreeSet<String> = lines(&receipts).into_iter().collect();
        let missing: Vec<String> = wanted.difference(&seen).cloned().collect();
        async move { if missing.is_empty() { Ok(Some(seen)) } else { bail!("missing {missing:?}") } }
    })
    .await?;
    let bad: Vec<&String> = got.iter().filter(|t| t.contains("poison") || t.contains("throw")).collect();
    ensure!(bad.is_empty(), "{name}: failed records reached the receipts: {bad:?}");
    let failed_expected: BTreeSet<String> =
        stream.iter().filter(|t| t.contains("poison") || t.contains("throw")).cloned().collect();
    ensure!(
        failed_records == failed_expected,
        "{name}: on_failure got {failed_records:?}, not {failed_expected:?}"
    );
    let dead_expected: BTreeSet<String> =
        queue.iter().filter(|t| t.contains("poison") || t.contains("throw")).cloned().collect();
    ensure!(dead_letters == dead_expected, "{name}: the DLQ got {dead_letters:?}, not {dead_expected:?}");

    // Each runtime's crash and slow records ended a process: four
    // replacements at least, and errors reported by the function.
    let series = |outcome: &str| {
        format!("shardline_function_invocations_total{{handler=\"fn\",outcome=\"{outcome}\"}}")
    };
    let died = scrape_or_zero(&worker.metrics, &series("died")).await?;
    ensure!(died >= 4.0, "{name}: {died} invocations died; a crash and a timeout per source make 4");
    let errors = scrape_or_zero(&worker.metrics, &series("error")).await?;
    ensure!(errors >= 2.0, "{name}: {errors} invocations reported errors; `throw` on each source makes 2");
    let starts = "shardline_function_process_starts_total{handler=\"fn\"}";
    let starts = scrape_or_zero(&worker.metrics, starts).await?;
    ensure!(starts >= 2.0 + died, "{name}: {starts} process starts for 2 processes and {died} replacements");
    let log = worker.log();
    for needle in ["exit status: 3", "passed its deadline", "handled "] {
        ensure!(log.contains(needle), "{name}: the worker's log has no `{needle}`:\n{log}");
    }
    ensure!(!log.contains("batchItemFailures"), "{name}: a reply was refused:\n{log}");
    // The function's own lines carry the invocation's request id.
    let tagged = log.lines().filter(|l| l.contains("handled ") && l.contains("request_id=")).count();
    let untagged = log.lines().filter(|l| l.contains("handled ") && l.contains("request_id= ")).count();
    ensure!(tagged > 0 && untagged == 0, "{name}: function output without request ids:\n{log}");

    // SIGTERM: the worker drains, the function processes get SIGTERM and
    // are gone when it exits.
    let pids = worker.function_pids();
    ensure!(pids.len() >= 2, "{name}: no function pids in the log");
    worker.proc.signal(libc::SIGTERM)?;
    let status = worker.proc.wait_exit(Duration::from_secs(30))?;
    ensure!(status.success(), "{name}: the worker exited {status} after SIGTERM");
    // SAFETY: signal 0 only asks whether the process exists.
    let alive: Vec<i32> = pids.iter().copied().filter(|p| unsafe { libc::kill(*p, 0) } == 0).collect();
    ensure!(alive.is_empty(), "{name}: function processes {alive:?} outlived their worker");
    drop(coordinator);
    Ok(())
}

/// A function whose init fails: its worker still joins, says it is
/// unhealthy (naming the function and its error), counts the failures,
/// and retries the init with backoff.
async fn broken_init(name: &'static str, expected: &str) -> Result<()> {
    let _serial = SERIAL.lock().await;
    let rt = runtime(name)?;
    let dir = tempfile::tempdir()?;
    let coordinator = Coordinator::start_config(support::timings(), &dir.path().join("data"))?;
    let handler = format!(
        "[handlers.broken]\nkind = \"function\"\ncommand = {}\nworking_dir = {:?}\nconcurrency = 1\n\
         env = {{ FAIL_INIT = \"yes\" }}\n",
        toml_list(&rt.command),
        rt.working_dir.display().to_string(),
    );
    let worker = start_worker(dir.path(), &coordinator, &format!("broken-{name}"), &handler)?;
    let unhealthy = eventually(Duration::from_secs(30), "the worker to report the init failure", || async {
        let workers = coordinator.workers().await?;
        let problems: Vec<String> = workers.into_iter().flat_map(|w| w.unhealthy).collect();
        Ok(problems.iter().any(|p| p.contains("function `broken`")).then_some(problems))
    })
    .await?;
    ensure!(
        unhealthy.iter().any(|p| p.contains(expected)),
        "{name}: unhealthy says {unhealthy:?}, not `{expected}`"
    );
    let series = "shardline_function_init_errors_total{handler=\"broken\"}";
    let retried = eventually(Duration::from_secs(20), "a second init attempt", || async {
        let n = scrape_or_zero(&worker.metrics, series).await?;
        Ok((n >= 2.0).then_some(n))
    })
    .await?;
    ensure!(retried >= 2.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_through_awslambdaric() -> Result<()> {
    drill("python").await?;
    broken_init("python", "FAIL_INIT").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_through_aws_lambda_ric() -> Result<()> {
    drill("node").await?;
    broken_init("node", "FAIL_INIT").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_through_lambda_runtime() -> Result<()> {
    drill("rust").await?;
    // lambda_runtime has no init-error call outside SnapStart: a failed
    // init is `main` returning an error, so the process exits first.
    broken_init("rust", "before asking for an invocation").await
}

/// Powertools' `BatchProcessor` + `process_partial_response`, unchanged,
/// on a Kinesis-format stream, a Kafka-format stream (whose failures it
/// names as `{partition, offset}`) and an SQS-format subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn powertools_batch_processing_reports_partial_failures() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let receipts = dir.path().join("receipts");
    let python = functions_dir()?.join("venv/bin/python").display().to_string();
    let sources = Sources::new("fn-pt").await?;
    let kafka_topic = unique("fn-pt-kafka");
    create_topic(&kafka_topic, 1).await?;
    let mut config = sources.coordinator("pt-kinesis", "pt-sqs");
    let mut second = support::from_start(&kafka_topic, "pt-kafka");
    second.on_failure = Some(sources.failed_topic.clone());
    batch(&mut second.settings);
    config.streams.push(second);
    let coordinator = Coordinator::start_config(config, &dir.path().join("data"))?;
    let workdir = repo().join("tests/functions/python").display().to_string();
    let mut handlers = String::new();
    for (handler, event_type, format) in [
        ("pt-kinesis", "KinesisDataStreams", "kinesis"),
        ("pt-kafka", "Kafka", "kafka"),
        ("pt-sqs", "SQS", "sqs"),
    ] {
        handlers += &format!(
            "[handlers.{handler}]\nkind = \"function\"\ncommand = [{python:?}, \"-m\", \"awslambdaric\", \
             \"powertools_app.handler\"]\nworking_dir = {workdir:?}\nconcurrency = 1\nevent_format = {format:?}\n\
             env = {{ RECEIPTS = {:?}, EVENT_TYPE = {event_type:?} }}\n",
            receipts.display().to_string()
        );
    }
    let worker = start_worker(dir.path(), &coordinator, "powertools", &handlers)?;
    let stream = texts("k", 30, &[(4, "poison"), (19, "poison")]);
    let kafka_texts = texts("f", 20, &[(11, "poison")]);
    let queue = texts("q", 30, &[(8, "poison")]);
    sources.feed(&stream, &queue).await?;
    let rows = kafka_texts.iter().enumerate().map(|(i, t)| (format!("key{i}"), t.clone(), None));
    support::produce_rows(&kafka_topic, None, rows).await?;

    let (failed, dead) = sources.failed(3, 1).await?;
    let all: Vec<&String> = stream.iter().chain(&kafka_texts).chain(&queue).collect();
    let wanted: BTreeSet<String> =
        all.iter().filter(|t| !t.contains("poison")).map(|t| (*t).clone()).collect();
    eventually(Duration::from_secs(60), "every good record's receipt", || {
        let seen: BTreeSet<String> = lines(&receipts).into_iter().collect();
        let missing: Vec<String> = wanted.difference(&seen).cloned().collect();
        async move { if missing.is_empty() { Ok(Some(())) } else { bail!("missing {missing:?}") } }
    })
    .await?;
    let counts = lines(&receipts).into_iter().fold(BTreeMap::<String, u32>::new(), |mut m, t| {
        *m.entry(t).or_default() += 1;
        m
    });
    ensure!(!counts.keys().any(|t| t.contains("poison")), "poison records reached the receipts: {counts:?}");
    let expected: BTreeSet<String> = ["k4-poison", "k19-poison", "f11-poison"].map(String::from).into();
    ensure!(failed == expected, "on_failure got {failed:?}, not {expected:?}");
    ensure!(dead == BTreeSet::from(["q8-poison".to_owned()]), "the DLQ got {dead:?}");
    // Each reply's item failures were understood (Kafka's name records
    // by `{partition, offset}`), not taken for a bad reply failing the
    // whole batch, which bisecting would have hidden above.
    let log = worker.log();
    ensure!(!log.contains("batchItemFailures"), "a reply was refused:\n{log}");
    Ok(())
}

#[tokio::test]
async fn a_bad_function_config_exits_2_naming_the_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let refused = |text: &str| {
        let path = dir.path().join(format!("{}.toml", unique("bad")));
        let written = std::fs::write(&path, text);
        async move {
            written?;
            support::refused("shardline-worker", &path.display().to_string(), &[]).await
        }
    };
    for (text, field) in [
        ("[handlers.f]\nkind = \"function\"\ncommand = []\n", "handlers.f.command"),
        (
            "[handlers.f]\nkind = \"function\"\ncommand = [\"x\"]\nevent_format = \"xml\"\n",
            "handlers.f.event_format",
        ),
        ("[handlers.f]\nkind = \"lambda\"\n", "handlers.f.kind"),
    ] {
        let (code, stderr) = refused(text).await?;
        ensure!(code == 2 && stderr.contains(field), "`{text}` gave {code}: {stderr}");
    }
    // A program that is not there is refused at start, by name.
    let text = "[handlers.f]\nkind = \"function\"\ncommand = [\"no-such-runtime-client\"]\n";
    let (code, stderr) = refused(text).await?;
    ensure!(code == 2 && stderr.contains("no-such-runtime-client"), "gave {code}: {stderr}");
    Ok(())
}
