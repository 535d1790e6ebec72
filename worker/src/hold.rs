//! The lease-holding runtime: follows the coordinator's instructions without
//! processing records. It is the membership half of a worker on its own,
//! used to exercise failover, handoff and coordinator restarts end to end;
//! sources and handlers plug in where it acknowledges a release.

use shardline_proto::v1;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::membership::{HeldLeases, LeaseEvent, Session, SessionError};

/// Joins the fleet and holds leases until `shutdown`, then releases every
/// lease and deregisters, so its leases move at once instead of after the
/// session timeout.
pub async fn run(session: Session, shutdown: CancellationToken) -> Result<(), SessionError> {
    let held = HeldLeases::default();
    let (tx, mut rx) = mpsc::channel(1024);
    let heartbeat_held = held.clone();
    let load = move || v1::LoadReport {
        leases: heartbeat_held
            .snapshot()
            .into_iter()
            .map(|(lease, epoch)| v1::LeaseLoad {
                lease: Some((&lease).into()),
                epoch,
                position: -1,
                lag: -1,
                ..v1::LeaseLoad::default()
            })
            .collect(),
        ..v1::LoadReport::default()
    };
    let membership = tokio::spawn(session.clone().run(held.clone(), tx, load, shutdown.clone()));

    while let Some(event) = tokio::select! {
        event = rx.recv() => event,
        () = shutdown.cancelled() => None,
    } {
        match event {
            LeaseEvent::Acquire { lease, epoch, start } => {
                tracing::info!(%lease, epoch, ?start, "lease acquired");
                held.insert(lease, epoch);
            }
            LeaseEvent::Release { lease, epoch } => {
                if held.remove(&lease, epoch) {
                    tracing::info!(%lease, epoch, "lease released");
                    if let Err(e) = session.release_done(&lease, epoch, None).await {
                        tracing::warn!(%lease, error = %e, "release confirmation failed; the coordinator forces it");
                    }
                }
            }
            LeaseEvent::Revoke { lease, epoch } => {
                if held.remove(&lease, epoch) {
                    tracing::warn!(%lease, epoch, "lease revoked");
                }
            }
        }
    }
    membership.abort();
    for (lease, epoch) in held.snapshot() {
        if let Err(e) = session.release_done(&lease, epoch, None).await {
            tracing::warn!(%lease, error = %e, "release on shutdown failed");
        }
    }
    session.deregister().await
}
