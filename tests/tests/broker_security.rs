//! Broker security passthrough with the real binaries: `amqps://` with
//! `amqp_tls` (through a TLS-terminating proxy in front of the tests'
//! plain RabbitMQ, its certificate from a throwaway CA), `[kafka]
//! properties` reaching the coordinator's, the worker's and the CLI's
//! Kafka clients (with `security.protocol = "ssl"` each opens its
//! connection with a TLS handshake, seen by a listener standing in for the
//! broker), and Kafka over real TLS end to end (a second tansu behind a
//! TLS-terminating proxy it advertises); bad settings are exit 2 naming
//! the field.

mod support;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use shardline_proto::v1;
use shardline_testkit::amqp::connect_tls;
use shardline_testkit::config::{self as kit_config};
use shardline_testkit::kafka::KafkaAccess;
use shardline_testkit::process::Proc;
use shardline_testkit::proxy::Proxy;
use shardline_testkit::tls::Pki;
use shardline_tests::StreamConfig;
use shardline_tests::amqp::{
    Got, amqp_url, channel, depth, drain_queue, publish_ids, publisher, receipts_exchange,
};
use shardline_tests::{Coordinator, WorkerConfig, bin, eventually, start_worker_config, unique};
use shardline_worker::config::{ClientTls, KafkaSettings};
use support::{Topology, config_file, from_start, refused, timings};
use tokio::io::AsyncReadExt;

/// `host:port` of the tests' RabbitMQ, as a `tcp://` URL for the proxy.
fn rabbit_target() -> Result<String> {
    let url = amqp_url();
    let rest = url.rsplit_once('@').map_or(url.as_str(), |(_, r)| r);
    let rest = rest.split_once("://").map_or(rest, |(_, r)| r);
    let authority = rest.split('/').next().context("no host in the AMQP URL")?;
    Ok(format!("tcp://{authority}"))
}

fn ca(path: &std::path::Path) -> ClientTls {
    ClientTls { ca: path.to_owned(), cert: None, key: None }
}

/// The coordinator declares, and a worker consumes, over `amqps://` with
/// the CA in `amqp_tls`; the same connection with another CA fails naming
/// the certificate, in the connect function both binaries use, in a
/// worker's health report and in a coordinator's subscription status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_the_brokers_ca_delivers_and_a_wrong_ca_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pki, other) = (Pki::new(dir.path(), "rabbit")?, Pki::new(dir.path(), "other")?);
    let proxy = Proxy::start_tls(&rabbit_target()?, &pki.server("rabbit")?).await?;
    let url = format!("amqps://guest:guest@localhost:{}/%2f", proxy.addr().port());
    let (good, wrong) = (ca(&pki.ca), ca(&other.ca));

    let connection = connect_tls(&url, Some(&good), "shardline-tests-tls").await?;
    ensure!(connection.status().connected(), "connected over TLS, yet not connected");
    connection.close(200, "done".into()).await.context("close")?;
    let named = format!("amqp_tls.ca `{}`", other.ca.display());
    for (tls, what, names) in
        [(Some(&wrong), "another CA", named.as_str()), (None, "the system's roots only", "set amqp_tls.ca")]
    {
        let e = connect_tls(&url, tls, "shardline-tests-tls").await.err().map(|e| format!("{e:#}"));
        let e = e.with_context(|| format!("connected with {what}"))?;
        ensure!(e.contains("invalid peer certificate") && e.contains(names), "with {what}: {e}");
    }

    // Both binaries over TLS: the coordinator declares the topology, the
    // worker consumes and publishes its receipts on its one connection.
    let t = Topology::new(1, 1);
    let (exchange, subscription) = (&t.exchanges[0], &t.subscriptions[0]);
    let receipts = unique("receipts");
    let mut cleanup = shardline_tests::amqp::cleanup();
    cleanup.exchanges.push(receipts.clone());
    let (_connection, ch) = channel().await?;
    cleanup.queues.push(receipts_exchange(&ch, &receipts).await?);
    let mut config = t.config("forward");
    config.amqp_url.clone_from(&url);
    config.amqp_tls = Some(good.clone());
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    eventually(Duration::from_secs(20), "the subscription queue, declared over TLS", || async {
        Ok(depth(subscription).await.is_ok().then_some(()))
    })
    .await?;
    publish_ids(&publisher(), exchange, 0, 20).await?;
    let tls_worker = |tls: &ClientTls| WorkerConfig {
        amqp_url: url.clone(),
        amqp_tls: Some(tls.clone()),
        ..kit_config::hosting("forward", &[("exchange", &receipts)])
    };
    let a = start_worker_config(&c.url, "tls-a", tls_worker(&good))?;
    let got = drain_queue(&cleanup.queues[0], 20, Duration::from_secs(1), Duration::from_secs(40)).await?;
    let ids: BTreeSet<u64> = got.iter().filter_map(Got::id).collect();
    ensure!(got.len() == 20 && ids == (0..20).collect(), "receipts for ids {ids:?} ({} in all)", got.len());
    ensure!(proxy.last_up_ms().is_some(), "nothing went through the TLS proxy");

    // A worker with the wrong CA takes the slot over and reports why it
    // cannot consume.
    drop(a);
    let _b = start_worker_config(&c.url, "tls-b", tls_worker(&wrong))?;
    let problem = eventually(Duration::from_secs(30), "tls-b reporting the certificate", || async {
        let workers = c.workers().await?;
        let b = workers.iter().find(|w| w.worker_id == "tls-b");
        let problem = b.map(|b| b.unhealthy.join("; ")).unwrap_or_default();
        Ok(problem.contains("certificate").then_some(problem))
    })
    .await?;
    eprintln!("tls-b reports: {problem}");

    // A coordinator with the wrong CA names it in its subscription status.
    let t2 = Topology::new(1, 1);
    let mut config = t2.config("forward");
    config.amqp_url.clone_from(&url);
    config.amqp_tls = Some(wrong);
    let c2 = Coordinator::start_config(config, &dir.path().join("data2"))?;
    let error = eventually(Duration::from_secs(20), "the subscription's error", || async {
        let mut admin = c2.admin().await?;
        let reply = admin.list_subscriptions(v1::ListSubscriptionsRequest {}).await?.into_inner();
        let error = reply.subscriptions.first().map(|s| s.error.clone()).unwrap_or_default();
        Ok(error.contains("certificate").then_some(error))
    })
    .await?;
    eprintln!("the coordinator reports: {error}");
    ensure!(depth(&t2.subscriptions[0]).await.is_err(), "declared through a TLS connection it should refuse");
    Ok(())
}

/// A listener standing in for a Kafka broker that records the first two
/// bytes of every connection: a TLS client opens with a handshake record
/// (0x16 0x03), a plaintext Kafka client with a 4-byte request size. So
/// what a process sends shows whether `security.protocol` reached the
/// client that dialled, without a broker or a log line.
struct FirstBytes {
    addr: String,
    seen: Arc<Mutex<Vec<[u8; 2]>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FirstBytes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FirstBytes {
    async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                let record = record.clone();
                connections.spawn(async move {
                    let mut first = [0u8; 2];
                    if socket.read_exact(&mut first).await.is_ok() {
                        record.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(first);
                    }
                    // Held open until the listener goes: the client waits
                    // for an answer rather than reconnecting at once.
                    std::future::pending::<()>().await;
                    drop(socket);
                });
            }
        });
        Ok(Self { addr, seen, task })
    }

    fn seen(&self) -> Vec<[u8; 2]> {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Waits for a first connection; true if it opened a TLS handshake.
    async fn first_is_tls(&self, who: &str) -> Result<bool> {
        let first = eventually(Duration::from_secs(30), &format!("{who} dialling {}", self.addr), || async {
            Ok(self.seen().first().copied())
        })
        .await?;
        Ok(first == [0x16, 0x03])
    }
}

/// `security.protocol = "ssl"` in `[kafka] properties` reaches every Kafka
/// client: the coordinator's discovery client, the worker's consumer and
/// the CLI's offset client each open their connection with a TLS
/// handshake; the CLI without the property speaks plaintext Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_properties_reach_the_coordinators_the_workers_and_the_clis_clients() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ssl = KafkaSettings::from_texts([("security.protocol", "ssl")]);

    // The coordinator's discovery.
    let broker = FirstBytes::start().await?;
    let config = shardline_tests::CoordinatorConfig {
        kafka_brokers: broker.addr.clone(),
        kafka: ssl.clone(),
        streams: vec![from_start(&unique("secure"), "noop")],
        ..timings()
    };
    let _c = Coordinator::start_config(config, &dir.path().join("data-discovery"))?;
    ensure!(
        broker.first_is_tls("the coordinator").await?,
        "the coordinator sent {:?}, not TLS",
        broker.seen()
    );

    // The worker's consumer, given shards of a fixed-size stream (so the
    // coordinator itself needs no Kafka).
    let broker = FirstBytes::start().await?;
    let topic = unique("secure");
    let stream = StreamConfig { partitions: Some(2), ..from_start(&topic, "noop") };
    let mut c = Coordinator::start_config(
        shardline_tests::CoordinatorConfig { streams: vec![stream], ..timings() },
        &dir.path().join("data"),
    )?;
    let worker =
        WorkerConfig { kafka_brokers: broker.addr.clone(), kafka: ssl, ..WorkerConfig::hosting(["noop"]) };
    let _w = start_worker_config(&c.url, "ssl-w", worker)?;
    ensure!(broker.first_is_tls("the worker").await?, "the worker sent {:?}, not TLS", broker.seen());

    // The CLI offline on that coordinator's store: with the property its
    // offset client speaks TLS, without it plaintext Kafka.
    c.proc.kill9()?;
    let data = c.data_dir.display().to_string();
    for property in [Some("security.protocol=ssl"), None] {
        let broker = FirstBytes::start().await?;
        let mut args = vec!["--data-dir", data.as_str(), "--kafka-brokers", broker.addr.as_str()];
        args.extend(property.iter().flat_map(|p| ["--kafka-property", p]));
        args.extend(["checkpoint", "set", "--latest", "--dry-run"]);
        let lease = format!("{topic}/0");
        args.push(&lease);
        let mut cli = tokio::process::Command::new(bin("shardline"))
            .args(&args)
            .env_remove("SHARDLINE_KAFKA_BROKERS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let tls = match broker.first_is_tls("the CLI").await {
            Ok(tls) => tls,
            Err(e) => {
                cli.start_kill()?;
                let out = cli.wait_with_output().await?;
                anyhow::bail!("{e:#}; `shardline {args:?}`: {}", String::from_utf8_lossy(&out.stderr));
            }
        };
        drop(cli);
        ensure!(tls == property.is_some(), "the CLI with {property:?} sent {:?}", broker.seen());
    }
    Ok(())
}

/// A misspelt librdkafka property, a property shardline sets itself, a
/// secret file that is missing and `amqp_tls` without `amqps://`: each
/// refused at load (exit 2), naming the field, by both binaries and (for
/// the properties) the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_broker_security_settings_are_exit_2_naming_the_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pem = dir.path().join("ca.pem");
    std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n")?;
    let cases = [
        (
            "[kafka.properties]\n\"sasl.pasword\" = \"x\"\n",
            "`kafka.properties.\"sasl.pasword\"`",
            "No such configuration property",
        ),
        (
            "[kafka.properties]\n\"group.id\" = \"mine\"\n",
            "`kafka.properties.\"group.id\"`",
            "shardline sets itself",
        ),
        (
            "[kafka.properties]\n\"sasl.password\" = { file = \"/nonexistent/kafka-pass\" }\n",
            "`kafka.properties.\"sasl.password\"`",
            "/nonexistent/kafka-pass",
        ),
        (&format!("[amqp_tls]\nca = {:?}\n", pem.display().to_string()), "`amqp_tls`", "amqps://"),
    ];
    for (i, (text, field, why)) in cases.iter().enumerate() {
        for (name, head) in [("shardline-coordinator", ""), ("shardline-worker", "[handlers.noop]\n")] {
            let path = dir.path().join(format!("{name}-{i}.toml"));
            std::fs::write(&path, format!("{head}{text}"))?;
            let (code, stderr) = refused(name, &path.display().to_string(), &[]).await?;
            ensure!(code == 2, "{name} with {text:?}: exit {code}, want 2: {stderr}");
            ensure!(stderr.contains(field) && stderr.contains(why), "{name} with {text:?}: {stderr}");
        }
    }
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    for (property, field) in [("sasl.pasword=x", "sasl.pasword"), ("acks=0", "acks")] {
        let out = tokio::process::Command::new(bin("shardline"))
            .args(["--data-dir", &data.display().to_string(), "--kafka-property", property, "leases"])
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(2), "the CLI with {property}: {:?}: {stderr}", out.status);
        ensure!(
            stderr.contains(&format!("`kafka.properties.\"{field}\"`")),
            "the CLI with {property}: {stderr}"
        );
    }
    Ok(())
}

/// The `tansu` binary `scripts/brokers.sh` installs.
fn tansu_bin() -> std::path::PathBuf {
    let installed = std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo/bin/tansu"));
    installed.filter(|p| p.exists()).unwrap_or_else(|| "tansu".into())
}

/// Reads `want` records of `topic` (one partition) from its start.
fn read_all(kafka: &KafkaAccess, topic: &str, want: usize) -> Result<Vec<String>> {
    let consumer: BaseConsumer = kafka
        .client_config()?
        .set("group.id", unique("tls-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .context("a TLS consumer")?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let (mut got, deadline) = (Vec::new(), std::time::Instant::now() + Duration::from_secs(30));
    while got.len() < want && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => got.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned()),
            Some(Err(e)) => eprintln!("tls reader: {e}"),
            None => {}
        }
    }
    Ok(got)
}

/// Kafka over real TLS: a second tansu (free ports, its own SQLite file,
/// killed on drop) advertises the address of a TLS-terminating proxy in
/// front of it, so a client reaches it only by speaking TLS and trusting
/// the test CA. With `security.protocol = "ssl"` and `ssl.ca.location` in
/// `[kafka] properties`, the coordinator discovers the topic, the worker
/// consumes it and `forward` produces every record to the receipts topic,
/// all through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_over_tls_runs_end_to_end_with_the_properties() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path(), "kafka")?;
    let plain = shardline_testkit::free_addr()?;
    let proxy = Proxy::start_tls(&format!("tcp://{plain}"), &pki.server("kafka")?).await?;
    let advertised = format!("localhost:{}", proxy.addr().port());
    let mut command = std::process::Command::new(tansu_bin());
    command
        .current_dir(dir.path())
        .args(["broker", "--listener-url", &format!("tcp://{plain}")])
        .args(["--advertised-listener-url", &format!("tcp://{advertised}")])
        .args(["--storage-engine", "sqlite://tansu.db"])
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(dir.path().join("tansu.log"))?));
    let _tansu = Proc::spawn("tansu (TLS)", command)?;
    let ca = pki.ca.display().to_string();
    let settings =
        KafkaSettings::from_texts([("security.protocol", "ssl"), ("ssl.ca.location", ca.as_str())]);
    let kafka = KafkaAccess { brokers: advertised.clone(), settings: settings.clone() };
    let (topic, receipts) = (unique("tls"), unique("receipts"));
    eventually(Duration::from_secs(30), "the TLS broker creating topics", || async {
        Ok(create_topic_on(&kafka, &topic, 2).await.ok())
    })
    .await?;
    create_topic_on(&kafka, &receipts, 1).await?;
    let producer: FutureProducer = kafka.client_config()?.set("acks", "all").create()?;
    for i in 0..20 {
        let (key, value) = (format!("k{i}"), format!("id-{i}"));
        let record = FutureRecord::to(&topic).key(&key).payload(&value);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)
            .context("produce over TLS")?;
    }

    let c = Coordinator::start_config(
        shardline_tests::CoordinatorConfig {
            kafka_brokers: advertised.clone(),
            kafka: settings.clone(),
            streams: vec![from_start(&topic, "forward")],
            ..timings()
        },
        &dir.path().join("data"),
    )?;
    eventually(Duration::from_secs(30), "2 leases discovered over TLS", || async {
        Ok((c.leases_of(&topic).await?.len() == 2).then_some(()))
    })
    .await?;
    let worker = WorkerConfig {
        kafka_brokers: advertised,
        kafka: settings,
        ..kit_config::hosting("forward", &[("topic", &receipts)])
    };
    let _w = start_worker_config(&c.url, "tls-k", worker)?;
    let reader = kafka.clone();
    let got = tokio::task::spawn_blocking(move || read_all(&reader, &receipts, 20)).await??;
    let ids: BTreeSet<String> = got.into_iter().collect();
    let want: BTreeSet<String> = (0..20).map(|i| format!("id-{i}")).collect();
    ensure!(ids == want, "receipts over TLS: {ids:?}");
    ensure!(proxy.last_up_ms().is_some(), "nothing went through the TLS proxy");

    // The CLI offline, on the stopped coordinator's store: offsets come
    // over TLS with the coordinator's config file (`--kafka-config`) or
    // the same as `--kafka-property`, and not at all without them.
    let mut c = c;
    c.proc.kill9()?;
    let file = config_file(
        dir.path(),
        "for-cli",
        &shardline_tests::CoordinatorConfig {
            kafka_brokers: kafka.brokers.clone(),
            kafka: kafka.settings.clone(),
            ..timings()
        },
    )?;
    let ca_property = format!("ssl.ca.location={ca}");
    let data = c.data_dir.display().to_string();
    for (args, want) in [
        (vec!["--kafka-config", file.as_str()], Some(20)),
        (
            vec![
                "--kafka-brokers",
                &kafka.brokers,
                "--kafka-property",
                "security.protocol=ssl",
                "--kafka-property",
                &ca_property,
            ],
            Some(20),
        ),
        (vec!["--kafka-brokers", &kafka.brokers], None),
    ] {
        let out = tokio::process::Command::new(bin("shardline"))
            .args(["--data-dir", &data, "--json"])
            .args(&args)
            .args(["checkpoints", "--stream", &topic])
            .env_remove("SHARDLINE_KAFKA_BROKERS")
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "shardline {args:?}: {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value =
            serde_json::from_str(&stdout).with_context(|| format!("{args:?}: {stdout}"))?;
        let shards = doc["shards"].as_array().with_context(|| format!("{args:?}: no shards in {stdout}"))?;
        let latest: Option<i64> = shards.iter().map(|s| s["latest"].as_i64()).sum();
        ensure!(
            shards.len() == 2 && latest == want,
            "shardline {args:?}: latest {latest:?}, want {want:?}: {stdout}"
        );
    }
    Ok(())
}

async fn create_topic_on(kafka: &KafkaAccess, topic: &str, partitions: u32) -> Result<()> {
    shardline_testkit::kafka::create_topic(kafka, topic, partitions, false).await
}
