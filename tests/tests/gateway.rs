//! `shardline-gateway` with the real binaries and brokers: HTTP posts to a
//! stream each processed exactly once by a worker (`forward` receipts,
//! checked against the partition and offset each 202 named), messages
//! published to a topic (202 only when routed; 422 when no queue would
//! keep it), synchronous invocations answered by the worker's `echo`
//! handler with their own bodies and statuses, 504 past the deadline, the
//! limits and errors (401, 404, 413, 400), 503 with `Retry-After` when a
//! broker cannot be reached, exit 2 naming the field on a bad config, and
//! schemathesis against the gateway's own
//! `/openapi.json` (scripts/schemathesis.sh installs it).

mod support;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use shardline_testkit::config::{GatewayConfig, hosting};
use shardline_tests::kafka::verify;
use shardline_tests::{Coordinator, CoordinatorConfig, Proc, bin, kafka_brokers, unique};

/// A running `shardline-gateway` and its base URL.
struct Gateway {
    _proc: Proc,
    url: String,
    addr: String,
}

impl Gateway {
    /// Starts the binary with `config` on a port the OS chooses, the
    /// tests' brokers where it keeps the defaults.
    fn start(mut config: GatewayConfig, dir: &std::path::Path) -> Result<Self> {
        let default = GatewayConfig::default();
        config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        if config.kafka_brokers == default.kafka_brokers {
            config.kafka_brokers = kafka_brokers();
        }
        if config.amqp_url == default.amqp_url {
            config.amqp_url = shardline_tests::amqp::amqp_url();
        }
        let path = support::config_file(dir, &unique("gateway"), &config)?;
        let (proc, addr) = shardline_testkit::process::start_gateway(
            &bin("shardline-gateway"),
            std::path::Path::new(&path),
            &[],
            Stdio::inherit(),
            Duration::from_secs(30),
        )?;
        Ok(Self { _proc: proc, url: format!("http://{addr}"), addr: addr.to_string() })
    }
}

fn client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder().timeout(Duration::from_secs(120)).pool_max_idle_per_host(64).build()?)
}

/// The JSON error body's `error.code`, or what the body was.
async fn error_code(response: reqwest::Response) -> Result<(u16, String)> {
    let status = response.status().as_u16();
    let text = response.text().await?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{status}: not a JSON error: {text}"))?;
    let code =
        json["error"]["code"].as_str().with_context(|| format!("{status}: no error.code in {text}"))?;
    ensure!(json["error"]["message"].is_string(), "{status}: no error.message in {text}");
    Ok((status, code.to_owned()))
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// (a) 10,000 posts, 32 in flight, to a 4-partition stream read by a
/// worker whose `forward` writes a receipt per record: every record is
/// processed once (none lost, no duplicates, partition order kept), and
/// each receipt's source partition and offset are the ones its 202 named.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_posts_are_each_processed_once() -> Result<()> {
    const N: u64 = 10_000;
    let (topic, receipts) = support::topics("gw-stream", 4).await?;
    let dir = tempfile::tempdir()?;
    let config =
        CoordinatorConfig { streams: vec![support::from_start(&topic, "forward")], ..support::timings() };
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let _worker =
        shardline_tests::start_worker_config(&c.url, "w1", hosting("forward", &[("topic", &receipts)]))?;
    let gw = Gateway::start(
        GatewayConfig { streams: vec![topic.clone()], ..GatewayConfig::default() },
        dir.path(),
    )?;

    let http = client()?;
    let url = format!("{}/v1/streams/{topic}/records", gw.url);
    let answered: Vec<Result<(u64, i32, i64)>> = futures::stream::iter(0..N)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let response = http
                    .post(&url)
                    .query(&[("key", format!("key-{}", i % 16))])
                    .header("content-type", "text/plain")
                    .body(format!("id-{i}"))
                    .send()
                    .await?;
                let status = response.status().as_u16();
                let text = response.text().await?;
                ensure!(status == 202, "post {i}: {status} {text}");
                let json: serde_json::Value = serde_json::from_str(&text)?;
                let (p, o) = (json["partition"].as_i64(), json["offset"].as_i64());
                let (Some(p), Some(o)) = (p, o) else {
                    bail!("post {i}: 202 without partition/offset: {text}")
                };
                Ok((i, i32::try_from(p)?, o))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut at = BTreeMap::new();
    for r in answered {
        let (i, p, o) = r?;
        ensure!(at.insert((p, o), i).is_none(), "two posts answered partition {p} offset {o}");
    }

    let got = support::receipts_of(&receipts, N).await?;
    let verdict = verify(&got, N);
    support::check(&verdict, "gateway posts")?;
    ensure!(verdict.duplicates == 0, "{} records processed twice", verdict.duplicates);
    ensure!(verdict.unique == N as usize, "{} of {N} records processed", verdict.unique);
    for r in &got {
        let named = at.get(&(i32::try_from(r.partition)?, r.offset));
        ensure!(
            named == Some(&r.id),
            "record id-{} was processed at {}:{}, but its 202 said otherwise ({named:?})",
            r.id,
            r.partition,
            r.offset
        );
    }
    Ok(())
}

/// Posting to topics: a routed message is 202 and lands in the bound
/// queue with its Content-Type; no queue for the routing key is 422
/// `unroutable`; an allow-listed exchange RabbitMQ lacks is 404, as is a
/// name not allow-listed; a stream Kafka lacks is 404; a body over
/// `max_body_bytes` is 413; an unknown query parameter is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_limits_and_unknown_names() -> Result<()> {
    let (exchange, missing_exchange) = (unique("gw-x"), unique("gw-none"));
    let queue = format!("{exchange}.q");
    let mut cleanup = shardline_tests::amqp::cleanup();
    cleanup.exchanges.push(exchange.clone());
    cleanup.queues.push(queue.clone());
    let (_conn, channel) = shardline_tests::amqp::channel().await?;
    let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Direct,
            options,
            FieldTable::default(),
        )
        .await?;
    let q = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(queue.as_str().into(), q, FieldTable::default()).await?;
    let bind = QueueBindOptions::default();
    channel
        .queue_bind(queue.as_str().into(), exchange.as_str().into(), "eu".into(), bind, FieldTable::default())
        .await?;
    let (topic, _) = support::topics("gw-limits", 1).await?;
    let dir = tempfile::tempdir()?;
    let config = GatewayConfig {
        streams: vec![topic.clone(), unique("gw-no-such-topic")],
        topics: vec![exchange.clone(), missing_exchange.clone()],
        max_body_bytes: 1000,
        ..GatewayConfig::default()
    };
    let no_topic = config.streams[1].clone();
    let gw = Gateway::start(config, dir.path())?;
    let http = client()?;

    let post = |path: String, body: Vec<u8>| {
        let http = http.clone();
        let url = format!("{}{path}", gw.url);
        async move {
            Ok::<_, anyhow::Error>(
                http.post(url).header("content-type", "application/json").body(body).send().await?,
            )
        }
    };
    let r = post(format!("/v1/topics/{exchange}/messages?routing_key=eu"), b"{\"n\":1}".to_vec()).await?;
    ensure!(r.status() == 202, "routed: {} {}", r.status(), r.text().await?);
    let got =
        shardline_tests::amqp::drain_queue(&queue, 1, Duration::from_millis(500), Duration::from_secs(30))
            .await?;
    ensure!(got.len() == 1 && got[0].body == "{\"n\":1}", "the bound queue got {got:?}");
    ensure!(got[0].header("content-type") == Some("application/json"), "headers: {:?}", got[0].headers);

    let cases = [
        (format!("/v1/topics/{exchange}/messages?routing_key=us"), 10, 422, "unroutable"),
        (format!("/v1/topics/{missing_exchange}/messages"), 10, 404, "unknown_topic"),
        ("/v1/topics/not-listed/messages".to_owned(), 10, 404, "unknown_topic"),
        (format!("/v1/streams/{no_topic}/records"), 10, 404, "unknown_stream"),
        ("/v1/streams/not-listed/records".to_owned(), 10, 404, "unknown_stream"),
        ("/v1/invoke/not-listed".to_owned(), 10, 404, "unknown_subscription"),
        (format!("/v1/streams/{topic}/records"), 1001, 413, "payload_too_large"),
        (format!("/v1/topics/{exchange}/messages?routing_key=eu"), 1001, 413, "payload_too_large"),
        (format!("/v1/streams/{topic}/records?bogus=1"), 10, 400, "bad_request"),
        ("/v1/nothing".to_owned(), 10, 404, "not_found"),
    ];
    for (path, size, status, code) in cases {
        let answer = error_code(post(path.clone(), vec![b'x'; size]).await?).await?;
        ensure!(
            answer == (status, code.to_owned()),
            "POST {path} ({size} bytes): {answer:?}, want {status} {code}"
        );
    }
    // Exactly the limit is accepted.
    let r = post(format!("/v1/streams/{topic}/records"), vec![b'x'; 1000]).await?;
    ensure!(r.status() == 202, "1000 bytes: {}", r.status());
    drop(cleanup);
    Ok(())
}

/// A token: none or a wrong one is 401 with `WWW-Authenticate`, the right
/// one passes; probes and the document stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_token_is_required() -> Result<()> {
    let (topic, _) = support::topics("gw-auth", 1).await?;
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n")?;
    let config =
        GatewayConfig { streams: vec![topic.clone()], token_file: Some(token), ..GatewayConfig::default() };
    let gw = Gateway::start(config, dir.path())?;
    let http = client()?;
    let url = format!("{}/v1/streams/{topic}/records", gw.url);
    for auth in [None, Some("Bearer wrong"), Some("Basic czNjcmV0LXRva2Vu"), Some("Bearer s3cret-tokenX")] {
        let mut request = http.post(&url).body("x");
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await?;
        ensure!(response.headers().get("www-authenticate").is_some(), "{auth:?}: no WWW-Authenticate");
        let answer = error_code(response).await?;
        ensure!(answer == (401, "unauthorized".to_owned()), "{auth:?}: {answer:?}");
    }
    let ok = http.post(&url).header("authorization", "Bearer s3cret-token").body("x").send().await?;
    ensure!(ok.status() == 202, "right token: {}", ok.status());
    for path in ["/healthz", "/openapi.json", "/metrics"] {
        let status = http.get(format!("{}{path}", gw.url)).send().await?.status();
        ensure!(status == 200, "{path}: {status}");
    }
    Ok(())
}

/// (c) Kafka and RabbitMQ on closed ports: every route answers 503 with
/// `Retry-After`, and `/readyz` is 503 naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_are_503_with_retry_after() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = GatewayConfig {
        kafka_brokers: format!("127.0.0.1:{}", closed_port()?),
        amqp_url: format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port()?),
        streams: vec!["s".into()],
        topics: vec!["t".into()],
        subscriptions: vec!["q".into()],
        ..GatewayConfig::default()
    };
    let gw = Gateway::start(config, dir.path())?;
    let http = client()?;
    for path in ["/v1/streams/s/records", "/v1/topics/t/messages", "/v1/invoke/q"] {
        let response = http.post(format!("{}{path}", gw.url)).body("x").send().await?;
        let retry = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let answer = error_code(response).await?;
        ensure!(answer == (503, "unavailable".to_owned()), "{path}: {answer:?}");
        ensure!(retry.as_deref().is_some_and(|s| s.parse::<u64>().is_ok()), "{path}: Retry-After {retry:?}");
    }
    let why = shardline_tests::eventually(Duration::from_secs(60), "/readyz names both brokers", || async {
        let (status, body) = shardline_tests::http_status(&gw.addr, "/readyz").await?;
        Ok((status == 503 && body.contains("Kafka") && body.contains("RabbitMQ")).then_some(body))
    })
    .await?;
    eprintln!("readyz: {why}");
    Ok(())
}

/// A coordinator with subscriptions `names` on a fanout topic, handled by
/// `handler`, and one worker hosting it with `settings`.
async fn subscriptions_with(
    dir: &std::path::Path,
    handler: &str,
    settings: toml::Table,
    names: usize,
) -> Result<(support::Topology, Coordinator, Proc)> {
    let topology = support::Topology::new(1, names);
    let c = Coordinator::start_config(topology.config(handler), &dir.join("data"))?;
    let mut config = hosting(handler, &[] as &[(&str, &str)]);
    config.handlers.insert(handler.to_owned(), settings);
    let worker = shardline_tests::start_worker_config(&c.url, &unique("w"), config)?;
    Ok((topology, c, worker))
}

/// Waits until a worker consumes `subscription`'s queue (declared by the
/// coordinator, a slot taken by the worker).
async fn until_consumed(subscription: &str) -> Result<()> {
    let connection = shardline_tests::amqp::connect().await?;
    shardline_tests::eventually(Duration::from_secs(90), "a worker consumes the subscription", || async {
        let depth = shardline_testkit::amqp::depth(&connection, subscription).await;
        Ok(depth.ok().filter(|d| d.consumers > 0).map(drop))
    })
    .await
}

/// Waits until `subscription` answers an invocation (its queue exists and
/// a worker consumes it).
async fn until_served(http: &reqwest::Client, url: &str) -> Result<()> {
    shardline_tests::eventually(Duration::from_secs(90), "the subscription answers", || async {
        let r = http.post(url).header("shardline-timeout-ms", "3000").body("ping").send().await?;
        Ok((r.status().as_u16() != 404 && r.status().as_u16() != 504).then_some(()))
    })
    .await
}

/// (b) 1,000 invocations, 16 in flight, through a worker's `echo`: each
/// answered 200 with its own body and Content-Type; the in-flight gauge
/// is back at 0 afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_invocations_get_their_own_replies() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (topology, _c, _w) = subscriptions_with(dir.path(), "echo", toml::Table::new(), 1).await?;
    let s = topology.subscriptions[0].clone();
    let gw = Gateway::start(
        GatewayConfig { subscriptions: vec![s.clone()], ..GatewayConfig::default() },
        dir.path(),
    )?;
    let http = client()?;
    let url = format!("{}/v1/invoke/{s}", gw.url);
    until_served(&http, &url).await?;
    let http = Arc::new(http);
    let results: Vec<Result<()>> = futures::stream::iter(0..1000)
        .map(|i| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let body = format!("{{\"request\":{i}}}");
                let r = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                let status = r.status().as_u16();
                let ct = r.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
                let text = r.text().await?;
                ensure!(status == 200 && text == body, "invocation {i}: {status} {text:?}");
                ensure!(ct.as_deref() == Some("application/json"), "invocation {i}: content-type {ct:?}");
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let failed: Vec<_> = results.into_iter().filter_map(Result::err).collect();
    ensure!(failed.is_empty(), "{} of 1000 invocations failed, e.g. {:#}", failed.len(), failed[0]);
    let metrics =
        shardline_testkit::metrics::Metrics::parse(&shardline_tests::http_get(&gw.addr, "/metrics").await?);
    let in_flight = metrics.get("shardline_gateway_invocations_in_flight")?;
    ensure!(in_flight == 0.0, "in flight after all answered: {in_flight}");
    Ok(())
}

/// The handler's status becomes the response's (`echo` with `status`),
/// and a subscription listed by the gateway but absent from RabbitMQ is
/// 404 `unknown_subscription`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handlers_status_and_a_missing_subscription() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (topology, _c, _w) = subscriptions_with(dir.path(), "echo", toml::toml! { status = 418 }, 1).await?;
    let s = topology.subscriptions[0].clone();
    let absent = unique("gw-absent");
    let gw = Gateway::start(
        GatewayConfig { subscriptions: vec![s.clone(), absent.clone()], ..GatewayConfig::default() },
        dir.path(),
    )?;
    let http = client()?;
    let url = format!("{}/v1/invoke/{s}", gw.url);
    until_served(&http, &url).await?;
    let r = http.post(&url).body("teapot?").send().await?;
    let status = r.status().as_u16();
    ensure!(status == 418 && r.text().await? == "teapot?", "status {status}");
    let answer =
        error_code(http.post(format!("{}/v1/invoke/{absent}", gw.url)).body("x").send().await?).await?;
    ensure!(answer == (404, "unknown_subscription".to_owned()), "absent: {answer:?}");
    Ok(())
}

/// A handler slower than the deadline (`sleep`, 5 s per record): 504
/// `timeout` after the client's shorter deadline (header and query); the
/// gateway keeps answering after the late reply is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_is_504() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (topology, _c, _w) =
        subscriptions_with(dir.path(), "sleep", toml::toml! { per_record = "5s" }, 1).await?;
    let s = topology.subscriptions[0].clone();
    let gw = Gateway::start(
        GatewayConfig { subscriptions: vec![s.clone()], ..GatewayConfig::default() },
        dir.path(),
    )?;
    let http = client()?;
    let url = format!("{}/v1/invoke/{s}", gw.url);
    until_consumed(&s).await?;
    let started = std::time::Instant::now();
    let answer =
        error_code(http.post(&url).header("shardline-timeout-ms", "1000").body("x").send().await?).await?;
    ensure!(answer == (504, "timeout".to_owned()), "header deadline: {answer:?}");
    let answer = error_code(http.post(format!("{url}?timeout_ms=1000")).body("x").send().await?).await?;
    ensure!(answer == (504, "timeout".to_owned()), "query deadline: {answer:?}");
    eprintln!("two 504s after {:?}", started.elapsed());
    let answer = error_code(http.post(format!("{url}?timeout_ms=0")).body("x").send().await?).await?;
    ensure!(answer == (400, "bad_request".to_owned()), "a zero deadline: {answer:?}");
    Ok(())
}

/// schemathesis (scripts/schemathesis.sh install) against the gateway's
/// own `/openapi.json`, with the token, a real stream, a topic with a
/// bound queue and a subscription served by `echo`: every check passes
/// (status codes, content types and bodies as documented, 401 without the
/// token; settings in tests/schemathesis.toml), and the gateway counted
/// no 5xx but the documented 503/504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing() -> Result<()> {
    let schemathesis = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/schemathesis.sh"))
        .arg("bin")
        .output()?;
    let schemathesis = String::from_utf8(schemathesis.stdout)?.trim().to_owned();
    ensure!(
        std::path::Path::new(&schemathesis).exists(),
        "schemathesis is not installed at {schemathesis}: run scripts/schemathesis.sh install"
    );
    let dir = tempfile::tempdir()?;
    let (topology, _c, _w) = subscriptions_with(dir.path(), "echo", toml::Table::new(), 1).await?;
    let s = topology.subscriptions[0].clone();
    let exchange = topology.exchanges[0].clone();
    let (topic, _) = support::topics("gw-fuzz", 2).await?;
    let token = dir.path().join("token");
    std::fs::write(&token, "fuzz-token")?;
    let config = GatewayConfig {
        streams: vec![topic],
        topics: vec![exchange],
        subscriptions: vec![s.clone()],
        token_file: Some(token),
        max_body_bytes: 4096,
        invoke_timeout: Duration::from_secs(5),
        ..GatewayConfig::default()
    };
    let gw = Gateway::start(config, dir.path())?;
    let http = client()?;
    shardline_tests::eventually(Duration::from_secs(90), "the subscription answers", || async {
        let r = http
            .post(format!("{}/v1/invoke/{s}", gw.url))
            .bearer_auth("fuzz-token")
            .body("ping")
            .send()
            .await?;
        Ok((r.status() == 200).then_some(()))
    })
    .await?;
    let out = tokio::process::Command::new(&schemathesis)
        .args(["--config-file", concat!(env!("CARGO_MANIFEST_DIR"), "/schemathesis.toml")])
        .args(["run", &format!("{}/openapi.json", gw.url), "--checks", "all"])
        .args(["--max-examples", "100", "--header", "Authorization: Bearer fuzz-token", "--seed", "7"])
        .args(["--request-timeout", "30", "--no-color", "--generation-database", "none"])
        .current_dir(dir.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(900), out).await.context("schemathesis hung")??;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{report}");
    ensure!(out.status.success(), "schemathesis reported failures (exit {})", out.status);
    let metrics = shardline_tests::http_get(&gw.addr, "/metrics").await?;
    let server_errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("shardline_gateway_requests_total"))
        .filter(|l| {
            l.contains("status=\"5") && !l.contains("status=\"503\"") && !l.contains("status=\"504\"")
        })
        .collect();
    ensure!(server_errors.is_empty(), "undocumented server errors: {server_errors:?}");
    let requests = metrics.lines().filter(|l| l.starts_with("shardline_gateway_requests_total")).count();
    ensure!(requests > 3, "schemathesis made almost no requests:\n{metrics}");
    Ok(())
}

/// A config the gateway cannot use exits 2 before serving, naming the
/// field and what is allowed: an unknown key, off loopback without a
/// token, a bad override.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_exits_2_naming_the_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (text, env, expect) in [
        ("bogus = 1\n", None, "bogus"),
        ("listen = \"0.0.0.0:0\"\n", None, "`token_file` is unset"),
        ("streams = [\"a b\"]\n", None, "`streams[0]`"),
        ("", Some(("SHARDLINE_AMQP_URL", "http://x")), "(set by SHARDLINE_AMQP_URL)"),
    ] {
        let path = dir.path().join(unique("bad.toml"));
        std::fs::write(&path, text)?;
        let mut command = std::process::Command::new(bin("shardline-gateway"));
        command.arg("--config").arg(&path).env_remove("SHARDLINE_TOKEN").env_remove("SHARDLINE_AMQP_URL");
        if let Some((k, v)) = env {
            command.env(k, v);
        }
        let out = tokio::task::spawn_blocking(move || command.output()).await??;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(2), "{text:?}: exit {:?}, stderr {stderr}", out.status.code());
        ensure!(stderr.contains(expect), "{text:?}: stderr does not name `{expect}`: {stderr}");
        ensure!(!String::from_utf8_lossy(&out.stdout).contains("listening"), "{text:?}: it served");
    }
    Ok(())
}
