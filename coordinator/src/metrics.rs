//! The coordinator's Prometheus metrics. Names are `shardline_*`; gauges are
//! republished from the core after every turn of the service loop, counters
//! are bumped where the event happens.

use std::net::SocketAddr;
use std::time::Duration;

use crate::core::{Core, LeaseState};

/// Installs the global recorder and serves `/metrics` on `addr`.
pub fn install(addr: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))
}

pub(crate) fn checkpoints(accepted: u64, refused: u64) {
    // Both results from the first call on (0 included), so a refusal rate
    // reads 0 rather than no series.
    metrics::counter!("shardline_checkpoints_total", "result" => "accepted").increment(accepted);
    metrics::counter!("shardline_checkpoints_total", "result" => "refused").increment(refused);
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
    metrics::gauge!("shardline_desired_workers").set(f64::from(core.desired_workers()));
    for (worker, u) in core.utilisation() {
        metrics::gauge!("shardline_worker_utilisation", "worker" => worker).set(u);
    }
}
