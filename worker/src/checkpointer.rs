//! Sends checkpoints asynchronously, coalesced: only the newest position
//! per lease matters, so the next batch never waits for the previous
//! checkpoint's acknowledgement. A stale-epoch answer means the lease was
//! lost: the runtime stops it at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardline_proto::{LeaseId, WindowState};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::membership::{Session, SessionError};

/// A lease's newest checkpoint: epoch, offset, and its tumbling window.
type Pending = (u64, i64, Option<WindowState>);

/// Pending checkpoints, newest per lease.
#[derive(Clone, Default)]
pub struct Checkpointer {
    pending: Arc<Mutex<HashMap<LeaseId, Pending>>>,
    notify: Arc<Notify>,
}

impl Checkpointer {
    pub fn submit(&self, lease: &LeaseId, epoch: u64, offset: i64, window: Option<WindowState>) {
        crate::lock(&self.pending).insert(lease.clone(), (epoch, offset, window));
        self.notify.notify_one();
    }

    /// Drops a pending checkpoint (released with its final offset, or lost).
    pub fn forget(&self, lease: &LeaseId) {
        crate::lock(&self.pending).remove(lease);
    }

    /// Sends until `stop`; reports lost leases as `(lease, epoch)`.
    pub async fn run(self, session: Session, lost: mpsc::Sender<(LeaseId, u64)>, stop: CancellationToken) {
        let mut failures = 0u32;
        loop {
            if stop.run_until_cancelled(self.notify.notified()).await.is_none() {
                return;
            }
            let entries: Vec<_> =
                crate::lock(&self.pending).drain().map(|(l, (e, o, w))| (l, e, o, w)).collect();
            if entries.is_empty() {
                continue;
            }
            let started = Instant::now();
            match session.checkpoint(entries.clone()).await {
                Ok(results) => {
                    failures = 0;
                    metrics::histogram!("shardline_checkpoint_latency_seconds")
                        .record(started.elapsed().as_secs_f64());
                    for ((lease, epoch, _, _), result) in entries.into_iter().zip(results) {
                        match result {
                            Ok(()) => {}
                            Err(SessionError::Fenced { current_epoch, .. }) => {
                                tracing::warn!(%lease, epoch, current_epoch, "lease lost: checkpoint refused");
                                if lost.send((lease, epoch)).await.is_err() {
                                    tracing::debug!("the runtime is gone; not reporting the lost lease");
                                }
                            }
                            Err(e) => tracing::warn!(%lease, error = %e, "checkpoint refused"),
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    metrics::counter!("shardline_checkpoint_errors_total").increment(1);
                    tracing::warn!(error = %e, "checkpoint call failed; retrying");
                    // Put back, unless a newer one arrived meanwhile.
                    for (lease, epoch, offset, window) in entries {
                        crate::lock(&self.pending).entry(lease).or_insert((epoch, offset, window));
                    }
                    let wait = Duration::from_millis(100 * u64::from(failures.min(50)));
                    if stop.run_until_cancelled(tokio::time::sleep(wait)).await.is_none() {
                        return;
                    }
                    self.notify.notify_one();
                }
            }
        }
    }
}
