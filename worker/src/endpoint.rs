//! The worker's HTTP endpoint on `metrics_listen`: `/metrics`
//! (Prometheus), `/healthz` (200 while the process serves) and `/readyz`,
//! for an orchestrator's probes and a load balancer's checks.
//!
//! `/readyz` is 200 only while the worker is registered with a
//! coordinator that acknowledges its heartbeats, is not draining, and has
//! none of the problems its heartbeats report as `unhealthy`: a broker it
//! uses that it cannot reach (RabbitMQ once it has opened its connection
//! for a queue slot, Kafka once it has made its consumer for a shard), a
//! function that cannot initialise. Otherwise 503 with the reason as one
//! line of plain text, so a probe's event or a `curl` says why. It reads
//! the state the worker keeps anyway (the session's [`Standing`], the
//! AMQP connection's problem, [`Health`]); nothing is probed per request.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::amqp::Amqp;
use crate::health::Health;
use crate::membership::{Stand, Standing};

/// How often histograms are compacted (what the exporter's own listener did).
const UPKEEP: Duration = Duration::from_secs(5);

/// What `/readyz` reads.
#[derive(Clone)]
pub(crate) struct Readiness {
    pub standing: Standing,
    pub draining: CancellationToken,
    pub amqp: Amqp,
    pub health: Health,
}

impl Readiness {
    /// `Ok(what)` when ready, else `Err(why not)`.
    fn check(&self) -> Result<String, String> {
        verdict(self.draining.is_cancelled(), self.standing.get(), unhealthy(&self.amqp, &self.health))
    }
}

/// Every problem the worker reports as `unhealthy` (in its heartbeats,
/// shown by `shardline workers`, and by `/readyz`): the AMQP
/// connection's, then each [`Health`] source's.
pub(crate) fn unhealthy(amqp: &Amqp, health: &Health) -> Vec<String> {
    let mut problems: Vec<String> = amqp.problem().into_iter().collect();
    problems.extend(health.problems());
    problems
}

/// Ready or not, and why: draining first (it is leaving whatever else
/// holds), then where it stands with the coordinator, then its problems.
fn verdict(draining: bool, stand: Stand, problems: Vec<String>) -> Result<String, String> {
    if draining {
        return Err("draining: finishing batches and releasing leases".into());
    }
    let coordinator = match stand {
        Stand::Joined(url) => url,
        Stand::Starting => return Err("starting: initialising handlers".into()),
        Stand::Registering => return Err("registering with the coordinator".into()),
        Stand::RegisterFailed(error) => return Err(format!("not registered with the coordinator: {error}")),
        Stand::Fenced(why) => return Err(why),
    };
    if problems.is_empty() { Ok(format!("registered with {coordinator}")) } else { Err(problems.join("; ")) }
}

/// Installs the global metrics recorder and serves the endpoint on `addr`
/// until `stop`. Errors (a recorder installed already, the port taken)
/// are returned before anything is served.
pub(crate) async fn serve(
    addr: SocketAddr,
    readiness: Readiness,
    stop: CancellationToken,
) -> Result<(), String> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| e.to_string())?;
    let upkeep = handle.clone();
    let upkept = stop.clone();
    tokio::spawn(async move {
        while upkept.run_until_cancelled(tokio::time::sleep(UPKEEP)).await.is_some() {
            upkeep.run_upkeep();
        }
    });
    let app = router(handle, readiness);
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(%addr, error = %e, "the metrics endpoint failed");
        }
    });
    Ok(())
}

fn router(handle: PrometheusHandle, readiness: Readiness) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| std::future::ready("ok\n")))
        .route(
            "/readyz",
            get(move || {
                std::future::ready(match readiness.check() {
                    Ok(what) => (StatusCode::OK, format!("ready: {what}\n")),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
                })
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://c:7400";

    #[test]
    fn ready_only_when_joined_not_draining_and_without_problems() {
        let joined = || Stand::Joined(URL.into());
        assert_eq!(verdict(false, joined(), vec![]), Ok(format!("registered with {URL}")));
        let not = |draining, stand, problems: &[&str]| {
            let problems = problems.iter().map(|p| (*p).to_owned()).collect();
            verdict(draining, stand, problems).expect_err("not ready")
        };
        assert_eq!(not(true, joined(), &[]), "draining: finishing batches and releasing leases");
        assert_eq!(not(false, Stand::Starting, &[]), "starting: initialising handlers");
        assert_eq!(not(false, Stand::Registering, &[]), "registering with the coordinator");
        let refused = Stand::RegisterFailed(format!("coordinator at {URL} unavailable: connection refused"));
        assert_eq!(
            not(false, refused, &[]),
            format!(
                "not registered with the coordinator: coordinator at {URL} unavailable: connection refused"
            )
        );
        let fenced = Stand::Fenced("self-fenced: no heartbeat acknowledged for 8s".into());
        assert_eq!(not(false, fenced, &[]), "self-fenced: no heartbeat acknowledged for 8s");
        let problems = ["amqp: connection refused", "kafka: no broker connected (k:9092/1 DOWN)"];
        assert_eq!(
            not(false, joined(), &problems),
            "amqp: connection refused; kafka: no broker connected (k:9092/1 DOWN)"
        );
        // Draining wins over everything else: the worker is leaving.
        assert_eq!(
            not(true, Stand::Registering, &problems),
            "draining: finishing batches and releasing leases"
        );
    }
}
