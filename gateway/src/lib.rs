//! `shardline-gateway`: HTTP endpoints as triggers. `POST` a record to a
//! Kafka stream, a message to a RabbitMQ topic, or a request to a
//! subscription whose handler's reply becomes the HTTP response
//! (synchronous invocation over RabbitMQ direct reply-to). It talks to the
//! brokers only, never to the coordinator or a worker: what it writes is
//! consumed like any producer's.
//!
//! It imports only `shardline-proto` and `shardline-config` among
//! shardline's crates (ARCHITECTURE.md, dependency rules).

pub mod amqp;
pub mod api;
pub mod config;
pub mod error;
pub mod kafka;
pub mod openapi;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;

/// How often `/readyz`'s verdict is refreshed (and histograms compacted).
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Buckets of `shardline_gateway_request_duration_seconds`.
const DURATION_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// A lock whose holder panicked still guards valid data here (maps and
/// verdicts, each written whole): say so loudly and go on.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| {
        tracing::error!("a lock was poisoned by a panicking holder; using its data");
        poisoned.into_inner()
    })
}

/// Binds `config.listen`, calls `listening` with the bound address, and
/// serves until `shutdown`; in-flight requests finish, then queued Kafka
/// records are flushed. Errors (the recorder, the port, a client) come
/// before anything is served.
pub async fn serve(
    config: GatewayConfig,
    shutdown: CancellationToken,
    listening: impl FnOnce(SocketAddr),
) -> Result<(), String> {
    let token = config.bearer_token().map_err(|e| e.to_string())?.map(Arc::<str>::from);
    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("shardline_gateway_request_duration_seconds".into()),
            DURATION_BUCKETS,
        )
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    // Exported at 0 from the start, so a dashboard tells "none" from "no series".
    metrics::gauge!("shardline_gateway_invocations_in_flight").set(0.0);
    let kafka = kafka::Kafka::new(&config)?;
    let amqp = amqp::Amqp::new(&config);
    let openapi = Arc::new(openapi::document(&config, token.is_some()));
    let gateway = api::Gateway {
        config: Arc::new(config.clone()),
        token,
        kafka: kafka.clone(),
        amqp: amqp.clone(),
        ready: Arc::new(Mutex::new(Err("starting: the brokers have not been probed yet".into()))),
        openapi,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(watch_brokers(gateway.clone(), metrics.clone(), shutdown.clone()));
    let app = api::router(gateway, metrics);
    tracing::info!(%addr, "serving");
    listening(addr);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|e| format!("the HTTP server failed: {e}"))?;
    let flushing = kafka.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || flushing.flush()).await {
        tracing::error!(error = %e, "flushing the Kafka producer failed");
    }
    Ok(())
}

/// Probes both brokers every [`WATCH_INTERVAL`] for `/readyz` (a request
/// never waits for a probe), and compacts the metrics' histograms.
async fn watch_brokers(
    gateway: api::Gateway,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    stop: CancellationToken,
) {
    loop {
        let (kafka, amqp) = tokio::join!(gateway.kafka.probe(), gateway.amqp.probe());
        let problems: Vec<String> = [kafka.err(), amqp.err()].into_iter().flatten().collect();
        for (broker, up) in [
            ("kafka", problems.iter().all(|p| !p.starts_with("Kafka"))),
            ("rabbitmq", problems.iter().all(|p| !p.starts_with("RabbitMQ"))),
        ] {
            metrics::gauge!("shardline_gateway_broker_up", "broker" => broker).set(if up {
                1.0
            } else {
                0.0
            });
        }
        *lock(&gateway.ready) = if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) };
        metrics.run_upkeep();
        if stop.run_until_cancelled(tokio::time::sleep(WATCH_INTERVAL)).await.is_none() {
            return;
        }
    }
}
