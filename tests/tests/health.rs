//! The probes of the real binaries (`/healthz`, `/readyz` on
//! `metrics_listen`), as an orchestrator sees them: a worker whose
//! coordinator is not up serves `/healthz` but is not ready, saying why;
//! it is ready once registered and running a Kafka shard and a RabbitMQ
//! queue slot on brokers it reaches; not ready once it fenced itself with
//! its coordinator gone, and ready again when the coordinator is back. A
//! worker that cannot reach its brokers is registered but not ready,
//! naming each broker, as its heartbeats do.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use shardline_tests::{
    Coordinator, WorkerConfig, create_topic, eventually, free_port, http_status, start_worker_config, unique,
};
use support::{Topology, from_start};

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A worker hosting `noop` with its endpoint on `metrics`.
fn worker(metrics: SocketAddr) -> WorkerConfig {
    WorkerConfig { metrics_listen: Some(metrics), ..WorkerConfig::hosting(["noop"]) }
}

/// Waits until `GET /readyz` at `addr` answers `status` with a body
/// containing each of `says`; the body.
async fn readyz(addr: SocketAddr, status: u16, says: &[&str], within: Duration) -> Result<String> {
    let what = format!("/readyz at {addr} answering {status} with {says:?}");
    eventually(within, &what, || async {
        let (got, body) = http_status(&addr.to_string(), "/readyz").await?;
        ensure!(got == status && says.iter().all(|s| body.contains(s)), "{got}: {}", body.trim_end());
        Ok(Some(body))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_ready_only_while_registered_with_a_live_coordinator() -> Result<()> {
    let t = Topology::new(1, 1);
    let topic = unique("ready");
    create_topic(&topic, 1).await?;
    let (listen, c_metrics, w_metrics) =
        (loopback(free_port()?), loopback(free_port()?), loopback(free_port()?));
    let url = format!("http://{listen}");

    // Nothing listens at the coordinator's address yet.
    let _w = start_worker_config(&url, "ready-w", worker(w_metrics))?;
    let body =
        readyz(w_metrics, 503, &["not registered with the coordinator", &url], Duration::from_secs(20))
            .await?;
    println!("before the coordinator: {}", body.trim_end());
    let (status, _) = http_status(&w_metrics.to_string(), "/healthz").await?;
    ensure!(status == 200, "/healthz answered {status} while the worker serves");

    let dir = tempfile::tempdir()?;
    let mut config = t.config("noop");
    config.streams.push(from_start(&topic, "noop"));
    config.listen = listen;
    config.metrics_listen = Some(c_metrics);
    let c = Coordinator::start_config(config.clone(), &dir.path().join("data"))?;
    readyz(c_metrics, 200, &["leading"], Duration::from_secs(10)).await?;
    // Ready with both leases running: Kafka and RabbitMQ each connected.
    eventually(Duration::from_secs(30), "ready-w to own the shard and the queue slot", || async {
        let leases = c.leases().await?;
        let mine = leases.iter().filter(|l| l.owner == "ready-w").count();
        ensure!(leases.len() == 2 && mine == 2, "{leases:?}");
        Ok(Some(()))
    })
    .await?;
    // Its RabbitMQ connection made (for the slot) and Kafka fetching.
    eventually(Duration::from_secs(30), "the worker's AMQP connection", || async {
        let connected = shardline_tests::scrape(&w_metrics.to_string(), "shardline_amqp_connected").await?;
        Ok((connected == 1.0).then_some(()))
    })
    .await?;
    let body = readyz(w_metrics, 200, &["registered with", &url], Duration::from_secs(10)).await?;
    println!("registered, both brokers in use: {}", body.trim_end());

    // The coordinator dies: once no heartbeat was acknowledged for the
    // fence time (2.4 s here), the worker stops its leases and says so.
    let mut c = c;
    c.proc.kill9()?;
    let body = readyz(w_metrics, 503, &["self-fenced"], Duration::from_secs(15)).await?;
    println!("coordinator killed: {}", body.trim_end());

    // Back on the same address and store: ready again.
    let _c = Coordinator::start_config(config, &dir.path().join("data"))?;
    readyz(w_metrics, 200, &["registered with"], Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_reach_its_brokers_is_registered_but_not_ready() -> Result<()> {
    let t = Topology::new(1, 1);
    let topic = unique("unready");
    create_topic(&topic, 1).await?;
    let dir = tempfile::tempdir()?;
    let mut config = t.config("noop");
    config.streams.push(from_start(&topic, "noop"));
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    // Ports nothing listens on, a moment ago.
    let (kafka, amqp, metrics) = (free_port()?, free_port()?, loopback(free_port()?));
    let w = WorkerConfig {
        kafka_brokers: format!("127.0.0.1:{kafka}"),
        amqp_url: format!("amqp://guest:guest@127.0.0.1:{amqp}/%2f"),
        ..worker(metrics)
    };
    let _w = start_worker_config(&c.url, "unready-w", w)?;
    let body =
        readyz(metrics, 503, &["kafka: no broker connected", "amqp:"], Duration::from_secs(30)).await?;
    println!("brokers unreachable: {}", body.trim_end());
    // The same problems reach the coordinator in its heartbeats.
    eventually(Duration::from_secs(10), "both problems in the heartbeats", || async {
        let workers = c.workers().await?;
        let unhealthy: Vec<&String> = workers.iter().flat_map(|w| &w.unhealthy).collect();
        let named = |broker: &str| unhealthy.iter().any(|p| p.starts_with(broker));
        ensure!(named("kafka:") && named("amqp:"), "`shardline workers` shows {unhealthy:?}");
        Ok(Some(()))
    })
    .await
}
