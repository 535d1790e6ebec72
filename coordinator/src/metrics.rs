//! The coordinator's HTTP endpoint and Prometheus metrics. On
//! `metrics_listen` it serves `/metrics`, `/healthz` (200 while the process
//! serves) and `/readyz` (200 only on the leader, so a Kubernetes Service
//! routes to it; a 503 says why in plain text: starting, standing by for
//! whom, stopping). Names are `shardline_*`; gauges are republished from the
//! core after every turn of the service loop, counters are bumped where the
//! event happens.
//!
//! Per-worker series (`shardline_worker_utilisation{worker}`,
//! `shardline_worker_leases{worker}`) are not kept in the recorder: its registry never forgets a label set, so every
//! worker id ever seen (each `kill -9`ed pod has a new one) would stay
//! served and held forever. They are rendered at each scrape from the
//! table's live workers instead, so a worker that expires or deregisters
//! is gone from the next scrape and from memory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use axum::http::StatusCode;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::core::{Core, LeaseState};
use crate::role::{Role, State};

/// How often histograms are compacted (what the exporter's own listener did).
const UPKEEP: Duration = Duration::from_secs(5);

/// The per-worker figures as last published by the leader's loop; empty
/// while this coordinator does not lead.
#[derive(Debug, Default, PartialEq)]
struct PerWorker {
    /// Workers that take leases: their utilisation.
    utilisation: BTreeMap<String, f64>,
    /// Live workers (draining ones too): the leases each holds, those it
    /// is handing over included.
    leases: BTreeMap<String, usize>,
}

static PER_WORKER: Mutex<PerWorker> =
    Mutex::new(PerWorker { utilisation: BTreeMap::new(), leases: BTreeMap::new() });

fn per_worker() -> std::sync::MutexGuard<'static, PerWorker> {
    // A panic while holding it cannot leave the maps half-written in a way
    // that matters: they are replaced whole on the next publish.
    PER_WORKER.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The recorder's output and the per-worker series.
fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    text.push_str(&render_workers(&per_worker()));
    text
}

/// `shardline_worker_utilisation` and `shardline_worker_leases` for
/// exactly these workers, in the Prometheus text format (label values
/// escaped: worker ids come from workers).
fn render_workers(workers: &PerWorker) -> String {
    let mut text = String::new();
    gauge(&mut text, "shardline_worker_utilisation", &workers.utilisation);
    gauge(&mut text, "shardline_worker_leases", &workers.leases);
    text
}

/// One gauge family with a `worker` label; nothing for no workers.
fn gauge<V: std::fmt::Display>(text: &mut String, name: &str, values: &BTreeMap<String, V>) {
    if values.is_empty() {
        return;
    }
    text.push_str(&format!("# TYPE {name} gauge\n"));
    for (worker, value) in values {
        let escaped = worker.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        text.push_str(&format!("{name}{{worker=\"{escaped}\"}} {value}\n"));
    }
    text.push('\n');
}

/// Installs the global recorder and serves the endpoint on `addr` until
/// `stop`.
pub async fn install(
    addr: SocketAddr,
    role: Role,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), String> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    let upkeep = handle.clone();
    let upkept = stop.clone();
    tokio::spawn(async move {
        while upkept.run_until_cancelled(tokio::time::sleep(UPKEEP)).await.is_some() {
            upkeep.run_upkeep();
        }
    });
    let app = router(handle, role);
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(%addr, error = %e, "the metrics endpoint failed");
        }
    });
    leading(false, 0);
    Ok(())
}

fn router(handle: PrometheusHandle, role: Role) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/metrics", get(move || std::future::ready(render(&handle))))
        .route("/healthz", get(|| std::future::ready("ok\n")))
        .route("/readyz", get(move || std::future::ready(readiness(&role.get()))))
}

/// `/readyz`: 200 only while this coordinator leads (its lease store
/// loaded, its loop serving); otherwise 503 saying why, in one line.
fn readiness(state: &State) -> (StatusCode, String) {
    let not = |why: String| (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n"));
    match state {
        State::Leading { term, .. } => (StatusCode::OK, format!("ready: leading (term {term})\n")),
        State::Starting => not("starting: opening the lease store".into()),
        State::Following { leader: Some(url) } => not(format!("not the leader: standing by for {url}")),
        State::Following { leader: None } => not("not the leader: standing by, no leader known".into()),
        State::Stopped => not("stopping".into()),
    }
}

/// 1 on the coordinator that leads (always, with sled), and its term.
pub(crate) fn leading(yes: bool, term: u64) {
    if !yes {
        // Only the leader's table has live workers.
        *per_worker() = PerWorker::default();
    }
    metrics::gauge!("shardline_coordinator_leader").set(if yes { 1.0 } else { 0.0 });
    metrics::gauge!("shardline_coordinator_term").set(term as f64);
}

pub(crate) fn checkpoints(accepted: u64, refused: u64) {
    // Both results from the first call on (0 included), so a refusal rate
    // reads 0 rather than no series.
    metrics::counter!("shardline_checkpoints_total", "result" => "accepted").increment(accepted);
    metrics::counter!("shardline_checkpoints_total", "result" => "refused").increment(refused);
}

/// One turn of the service loop: how many commands it took, how long they
/// took to handle (and write), and the longest any of them had waited in
/// the queue before. What a slow reply waited behind shows here.
pub(crate) fn loop_turn(commands: usize, took: Duration, longest_wait: Duration) {
    metrics::histogram!("shardline_loop_batch_commands").record(commands as f64);
    metrics::histogram!("shardline_loop_turn_seconds").record(took.as_secs_f64());
    metrics::histogram!("shardline_loop_queue_seconds").record(longest_wait.as_secs_f64());
}

/// One tick of the service loop (expiry, placement, metrics).
pub(crate) fn loop_tick(took: Duration) {
    metrics::histogram!("shardline_loop_tick_seconds").record(took.as_secs_f64());
}

/// Records one flush made durable.
pub(crate) fn flush_records(records: u64) {
    metrics::histogram!("shardline_store_flush_records").record(records as f64);
}

pub(crate) fn flush_done(took: Duration) {
    metrics::histogram!("shardline_store_flush_seconds").record(took.as_secs_f64());
}

/// Republishes the gauges and the core's cumulative counters.
pub(crate) fn publish(core: &Core) {
    let (mut owned, mut releasing, mut unassigned, mut parked) = (0u32, 0u32, 0u32, 0u32);
    for lease in core.leases() {
        match lease.state {
            LeaseState::Owned => owned += 1,
            LeaseState::Releasing { .. } => releasing += 1,
            LeaseState::Unassigned => unassigned += 1,
            LeaseState::Parked => parked += 1,
        }
    }
    metrics::gauge!("shardline_leases", "state" => "owned").set(owned);
    metrics::gauge!("shardline_leases", "state" => "releasing").set(releasing);
    metrics::gauge!("shardline_leases", "state" => "unassigned").set(unassigned);
    metrics::gauge!("shardline_leases", "state" => "parked").set(parked);
    metrics::gauge!("shardline_workers_live").set(core.workers().filter(|w| !w.restored).count() as f64);
    let c = core.counters();
    metrics::counter!("shardline_failovers_total").absolute(c.failovers);
    metrics::counter!("shardline_workers_expired_total").absolute(c.expired_workers);
    metrics::counter!("shardline_rebalance_moves_total").absolute(c.rebalance_moves);
    metrics::counter!("shardline_handoffs_forced_total").absolute(c.forced_handoffs);
    metrics::counter!("shardline_load_moves_total").absolute(c.load_moves);
    metrics::counter!("shardline_load_figures_dropped_total").absolute(c.load_figures_dropped);
    let load = core.load_view();
    metrics::gauge!("shardline_desired_workers").set(f64::from(load.desired));
    let leases = core
        .workers()
        .filter(|w| !w.restored)
        .map(|w| (w.id.clone(), core.owned_by(&w.id).count()))
        .collect();
    *per_worker() = PerWorker { utilisation: load.util, leases };
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Instant;

    use shardline_proto::LeaseKind;

    use super::*;
    use crate::core::{CoreConfig, Registration};

    /// Only the leader is ready; every other role says what it is.
    #[test]
    fn readyz_names_the_role_of_a_coordinator_that_does_not_lead() {
        let standby = State::Following { leader: Some("http://c2:7400".into()) };
        for (state, says) in [
            (State::Starting, "not ready: starting: opening the lease store\n"),
            (standby, "not ready: not the leader: standing by for http://c2:7400\n"),
            (State::Following { leader: None }, "not ready: not the leader: standing by, no leader known\n"),
            (State::Stopped, "not ready: stopping\n"),
        ] {
            assert_eq!(readiness(&state), (StatusCode::SERVICE_UNAVAILABLE, says.to_owned()));
        }
    }

    /// The series of a worker that left are gone from the next scrape;
    /// hostile ids cannot break the format.
    #[test]
    fn per_worker_series_are_exactly_the_live_workers() {
        let t = Instant::now();
        let mut core = Core::new(CoreConfig::default());
        core.discovered(t, LeaseKind::Shard, "s", "h", 4);
        for w in ["a", "b", "evil\"} 1\nshardline_x 9"] {
            let handlers = BTreeSet::from(["h".to_owned()]);
            core.register(t, Registration { worker: w.into(), handlers, ..Registration::default() });
        }
        // Past the join window: the leases are placed.
        let t = t + Duration::from_secs(1);
        core.tick(t);
        publish(&core);
        let text = render_workers(&per_worker());
        assert_eq!(text.matches("shardline_worker_utilisation{").count(), 3, "{text}");
        assert_eq!(text.matches("shardline_worker_leases{").count(), 3, "{text}");
        // The 4 leases spread over the 3 workers, each counted once.
        let held: usize = text
            .lines()
            .filter(|l| l.starts_with("shardline_worker_leases{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<usize>().ok())
            .sum();
        assert_eq!(held, 4, "{text}");
        assert!(text.contains(r#"worker="evil\"} 1\nshardline_x 9""#), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("shardline_x")), "{text}");
        core.deregister(t, "b");
        // Expire `a` (and the other one): silent past the session timeout.
        publish(&core);
        let text = render_workers(&per_worker());
        assert!(!text.contains(r#"worker="b""#), "{text}");
        core.tick(t + CoreConfig::default().session_timeout * 2);
        publish(&core);
        assert_eq!(render_workers(&per_worker()), "", "expired workers still served");
        leading(false, 0);
        assert_eq!(*per_worker(), PerWorker::default());
    }
}
