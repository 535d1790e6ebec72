//! The worker's side of the lease protocol. The session knows nothing
//! about records: it turns instructions into [`LeaseEvent`]s and quotes the
//! leases the runtime runs ([`HeldLeases`]) in every heartbeat, so the
//! coordinator re-sends whatever a lost reply carried, and when it
//! registers again, so a coordinator restart moves nothing.
//!
//! **Self-fencing** (ARCHITECTURE.md, "Self-fencing"): with no heartbeat
//! acknowledged for [`fence_after`], the session trips the [`Fence`], which
//! stops every lease task at once. When the coordinator answers again, the
//! worker rejoins: its heartbeats quote no leases, so it is sent what it
//! still owns, or, if it was expired, it registers afresh.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use shardline_proto::v1::{self, worker_api_client::WorkerApiClient};
use shardline_proto::{LeaseId, Mapping, Start};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// How a worker joins the fleet.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub coordinator: String,
    pub worker_id: String,
    /// Where this worker can be reached (its metrics endpoint); informational.
    pub address: String,
    /// Handlers this worker hosts; it only gets leases of their mappings.
    pub handlers: Vec<String>,
    /// Most leases to take; 0: no limit.
    pub capacity: u32,
    /// Batches this worker runs at once (the balancer's capacity unit).
    pub concurrency: u32,
    /// Sent as `authorization: Bearer TOKEN` when set.
    pub token: Option<String>,
}

/// What the runtime must do with a lease.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEvent {
    /// Start (or restart, if running under an older epoch) from `start`.
    Acquire { lease: LeaseId, epoch: u64, start: Start, mapping: Option<Box<Mapping>> },
    /// Finish the in-flight batch, then [`Session::release_done`].
    Release { lease: LeaseId, epoch: u64 },
    /// Stop at once, without checkpointing.
    Revoke { lease: LeaseId, epoch: u64 },
}

/// Errors talking to the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("coordinator unreachable at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("coordinator refused: {0}")]
    Rpc(#[from] tonic::Status),
    /// The coordinator says another owner or a newer epoch holds the lease.
    #[error("lease {lease} lost: current epoch is {current_epoch}")]
    Fenced { lease: LeaseId, current_epoch: u64 },
    /// Another process registered under this worker's id: this one must
    /// stop (not retryable: two processes must not share an id).
    #[error("{0}")]
    Superseded(String),
    #[error("bad instruction from the coordinator: {0}")]
    Protocol(String),
}

/// The leases the runtime runs, by epoch, as the session quotes them.
#[derive(Debug, Clone, Default)]
pub struct HeldLeases(Arc<Mutex<BTreeMap<LeaseId, u64>>>);

impl HeldLeases {
    pub fn insert(&self, lease: LeaseId, epoch: u64) {
        crate::lock(&self.0).insert(lease, epoch);
    }

    /// Removes the lease if it is held under `epoch` (an older instruction
    /// never stops a newer run).
    pub fn remove(&self, lease: &LeaseId, epoch: u64) {
        let mut held = crate::lock(&self.0);
        if held.get(lease) == Some(&epoch) {
            held.remove(lease);
        }
    }

    /// Empties the set; how many it held.
    fn clear(&self) -> usize {
        std::mem::take(&mut *crate::lock(&self.0)).len()
    }

    fn wire(&self) -> Vec<v1::HeldLease> {
        crate::lock(&self.0)
            .iter()
            .map(|(lease, epoch)| v1::HeldLease { lease: Some(lease.into()), epoch: *epoch })
            .collect()
    }
}

/// The worker's self-fence: lease tasks' kill tokens are its children, so
/// they stop the moment it trips. Each trip starts a new generation;
/// instructions carry the one they arrived in, so one received before a
/// trip is never acted on after.
#[derive(Debug, Clone, Default)]
pub struct Fence(Arc<Mutex<(u64, CancellationToken)>>);

impl Fence {
    pub fn generation(&self) -> u64 {
        crate::lock(&self.0).0
    }

    /// The kill token of a lease started on an instruction of `generation`
    /// (cancelled when the fence trips); `None` if it has tripped since that
    /// instruction arrived, which must then be ignored.
    pub fn token(&self, generation: u64) -> Option<CancellationToken> {
        let fence = crate::lock(&self.0);
        (fence.0 == generation).then(|| fence.1.child_token())
    }

    /// Stops every lease started before now.
    pub fn trip(&self) {
        let mut fence = crate::lock(&self.0);
        fence.1.cancel();
        fence.0 += 1;
        fence.1 = CancellationToken::new();
    }
}

/// How long after the last acknowledged heartbeat was sent a worker fences
/// itself: `session_timeout` less a fifth of it, and at least two heartbeats.
pub fn fence_after(session_timeout: Duration, heartbeat_interval: Duration) -> Duration {
    let margin = (session_timeout / 5).max(heartbeat_interval * 2);
    session_timeout.saturating_sub(margin).max(heartbeat_interval)
}

struct Registered {
    interval: Duration,
    fence_after: Duration,
    /// When the request that got this answer was sent.
    sent: Instant,
    events: Vec<LeaseEvent>,
}

#[derive(Clone)]
pub struct Session {
    cfg: SessionConfig,
    client: WorkerApiClient<Channel>,
    /// Drawn once per process: a registration under a known id with another
    /// incarnation fences the older process.
    incarnation: u64,
    /// What the runtime runs, quoted in heartbeats and when registering.
    pub held: HeldLeases,
    pub fence: Fence,
}

impl Session {
    /// Prepares a lazy connection: nothing is dialled until the first call,
    /// so a worker can start before its coordinator.
    pub fn new(cfg: SessionConfig) -> Result<Self, SessionError> {
        let unreachable = |e: tonic::transport::Error| SessionError::Unreachable {
            url: cfg.coordinator.clone(),
            message: e.to_string(),
        };
        let channel = Endpoint::from_shared(cfg.coordinator.clone())
            .map_err(unreachable)?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        let client = WorkerApiClient::new(channel);
        Ok(Self {
            cfg,
            client,
            incarnation: incarnation(),
            held: HeldLeases::default(),
            fence: Fence::default(),
        })
    }

    pub fn worker_id(&self) -> &str {
        &self.cfg.worker_id
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.cfg.token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// Registers, quoting what the worker still runs; retries until answered.
    async fn register(&self, shutdown: &CancellationToken) -> Result<Registered, SessionError> {
        let attempt = || async {
            let message = v1::RegisterRequest {
                worker_id: self.cfg.worker_id.clone(),
                address: self.cfg.address.clone(),
                handlers: self.cfg.handlers.clone(),
                capacity: self.cfg.capacity,
                held: self.held.wire(),
                concurrency: self.cfg.concurrency,
                incarnation: self.incarnation,
            };
            let sent = Instant::now();
            let reply = self.client.clone().register(self.request(message)).await?.into_inner();
            let interval = Duration::from_millis(reply.heartbeat_interval_ms.max(50));
            let session_timeout = Duration::from_millis(reply.session_timeout_ms.max(100));
            Ok::<_, SessionError>(Registered {
                interval,
                fence_after: fence_after(session_timeout, interval),
                sent,
                events: events(reply.instructions)?,
            })
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times();
        let retried = attempt
            .retry(backoff)
            .when(|e| !matches!(e, SessionError::Protocol(_)))
            .notify(|e, wait| tracing::warn!(error = %e, ?wait, "register failed; retrying"));
        tokio::select! {
            result = retried => result,
            () = shutdown.cancelled() => {
                let message = "shut down before registering".into();
                Err(SessionError::Unreachable { url: self.cfg.coordinator.clone(), message })
            }
        }
    }

    /// One heartbeat. `Ok(None)`: the coordinator does not know us (we
    /// expired or it restarted): register again.
    async fn heartbeat(
        &self,
        load: v1::LoadReport,
        unhealthy: Vec<String>,
        draining: bool,
        timeout: Duration,
    ) -> Result<Option<Vec<LeaseEvent>>, SessionError> {
        let message = v1::HeartbeatRequest {
            worker_id: self.cfg.worker_id.clone(),
            load: Some(load),
            draining,
            unhealthy,
            held: self.held.wire(),
            incarnation: self.incarnation,
        };
        let mut request = self.request(message);
        request.set_timeout(timeout);
        match self.client.clone().heartbeat(request).await {
            Ok(reply) => Ok(Some(events(reply.into_inner().instructions)?)),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                Err(SessionError::Superseded(status.message().to_owned()))
            }
            Err(status) => Err(status.into()),
        }
    }

    /// One result per entry.
    pub async fn checkpoint(
        &self,
        entries: Vec<(LeaseId, u64, i64)>,
    ) -> Result<Vec<Result<(), SessionError>>, SessionError> {
        let message = v1::CheckpointRequest {
            worker_id: self.cfg.worker_id.clone(),
            entries: entries
                .iter()
                .map(|(lease, epoch, offset)| v1::CheckpointEntry {
                    lease: Some(lease.into()),
                    epoch: *epoch,
                    offset: *offset,
                })
                .collect(),
        };
        let reply = self.client.clone().checkpoint(self.request(message)).await?.into_inner();
        Ok(entries.into_iter().zip(reply.results).map(|((lease, _, _), r)| status(lease, r)).collect())
    }

    pub async fn release_done(
        &self,
        lease: &LeaseId,
        epoch: u64,
        offset: Option<i64>,
    ) -> Result<(), SessionError> {
        let message = v1::ReleaseDoneRequest {
            worker_id: self.cfg.worker_id.clone(),
            lease: Some(lease.into()),
            epoch,
            offset,
        };
        let reply = self.client.clone().release_done(self.request(message)).await?.into_inner();
        status(lease.clone(), v1::CheckpointResult { status: reply.status, ..Default::default() })
    }

    pub async fn deregister(&self) -> Result<(), SessionError> {
        let message = v1::DeregisterRequest { worker_id: self.cfg.worker_id.clone() };
        self.client.clone().deregister(self.request(message)).await?;
        Ok(())
    }

    /// Registers, then heartbeats until `shutdown`, forwarding instructions
    /// with the fence generation they arrived in and tripping the fence when
    /// the coordinator is silent too long; [`SessionError::Superseded`] when
    /// another process took over this worker's id.
    pub async fn run(
        self,
        ctx: SessionRun<impl Fn() -> (v1::LoadReport, Vec<String>) + Send>,
    ) -> Result<(), SessionError> {
        let SessionRun { events, load, draining, shutdown } = ctx;
        let fence = &self.fence;
        let mut joined = self.register(&shutdown).await?;
        forward(&events, fence.generation(), std::mem::take(&mut joined.events)).await;
        tracing::info!(worker = %self.cfg.worker_id, "registered with the coordinator");
        let mut acked = joined.sent;
        let mut fenced = false;
        let mut told_draining = false;
        loop {
            let fence_at = acked + joined.fence_after;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(fence_at), if !fenced => {
                    self.trip(acked, &mut fenced);
                    continue;
                }
                () = tokio::time::sleep(joined.interval) => {}
                // Tell the coordinator at once, not a heartbeat later.
                () = draining.cancelled(), if !told_draining => {}
            }
            told_draining = draining.is_cancelled();
            let (report, unhealthy) = load();
            let sent = Instant::now();
            // A hung call must not hold back the next heartbeat for long.
            let timeout = (joined.fence_after / 3).max(joined.interval);
            let call = self.heartbeat(report, unhealthy, told_draining, timeout);
            let result = tokio::select! {
                biased;
                result = call => result,
                () = tokio::time::sleep_until(fence_at), if !fenced => {
                    self.trip(acked, &mut fenced);
                    continue;
                }
            };
            match result {
                Ok(Some(instructions)) => {
                    acked = sent;
                    if std::mem::take(&mut fenced) {
                        tracing::warn!(worker = %self.cfg.worker_id, "the coordinator answers again; rejoining");
                    }
                    forward(&events, fence.generation(), instructions).await;
                }
                Ok(None) => {
                    tracing::warn!(worker = %self.cfg.worker_id, "coordinator lost our session; registering again");
                    // The fence deadline still runs while registering: a
                    // coordinator that expired us may answer only later.
                    let registering = self.register(&shutdown);
                    tokio::pin!(registering);
                    joined = loop {
                        tokio::select! {
                            result = &mut registering => break result?,
                            () = tokio::time::sleep_until(fence_at), if !fenced => self.trip(acked, &mut fenced),
                        }
                    };
                    acked = joined.sent;
                    fenced = false;
                    forward(&events, fence.generation(), std::mem::take(&mut joined.events)).await;
                }
                Err(e @ SessionError::Superseded(_)) => {
                    fence.trip();
                    self.held.clear();
                    tracing::error!(worker = %self.cfg.worker_id, error = %e, "stopping every lease: another process uses this worker id");
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat failed; retrying next interval");
                }
            }
        }
    }

    /// Self-fencing: the coordinator may hand our leases to others soon.
    fn trip(&self, acked: Instant, fenced: &mut bool) {
        *fenced = true;
        self.fence.trip();
        let leases = self.held.clear();
        metrics::counter!("shardline_self_fenced_total").increment(1);
        // Each lease it ran is lost to this worker: stopped without a release.
        metrics::counter!("shardline_leases_lost_total").increment(leases as u64);
        tracing::error!(
            worker = %self.cfg.worker_id,
            leases,
            silent_for = ?acked.elapsed(),
            "no heartbeat acknowledged for too long: stopped every lease (self-fenced) until the coordinator answers"
        );
    }
}

/// What [`Session::run`] works with.
pub struct SessionRun<L> {
    pub events: mpsc::Sender<(u64, LeaseEvent)>,
    /// Each heartbeat's load report and health problems.
    pub load: L,
    pub draining: CancellationToken,
    pub shutdown: CancellationToken,
}

/// A number no other process of this id is likely to draw.
fn incarnation() -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::process::id().hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    h.finish()
}

async fn forward(tx: &mpsc::Sender<(u64, LeaseEvent)>, generation: u64, events: Vec<LeaseEvent>) {
    for event in events {
        if tx.send((generation, event)).await.is_err() {
            tracing::debug!("the runtime is gone; dropping instructions");
            return;
        }
    }
}

fn status(lease: LeaseId, r: v1::CheckpointResult) -> Result<(), SessionError> {
    match v1::CheckpointStatus::try_from(r.status) {
        Ok(v1::CheckpointStatus::Ok) => Ok(()),
        Ok(v1::CheckpointStatus::StaleEpoch) => {
            Err(SessionError::Fenced { lease, current_epoch: r.current_epoch })
        }
        _ => Err(SessionError::Protocol(format!("checkpoint of {lease}: status {}", r.status))),
    }
}

fn events(instructions: Vec<v1::Instruction>) -> Result<Vec<LeaseEvent>, SessionError> {
    use v1::instruction::Kind;
    let bad = |e: shardline_proto::ConvertError| SessionError::Protocol(e.to_string());
    let lease = |id: Option<&v1::LeaseId>| LeaseId::try_from(id).map_err(bad);
    instructions
        .into_iter()
        .filter_map(|i| i.kind)
        .map(|kind| {
            Ok(match kind {
                Kind::Acquire(a) => LeaseEvent::Acquire {
                    lease: lease(a.lease.as_ref())?,
                    epoch: a.epoch,
                    start: a.start.map_or(Start::MappingDefault, |s| s.start()),
                    mapping: a
                        .mapping
                        .as_ref()
                        .map(|m| Mapping::try_from(m).map(Box::new))
                        .transpose()
                        .map_err(bad)?,
                },
                Kind::Release(r) => LeaseEvent::Release { lease: lease(r.lease.as_ref())?, epoch: r.epoch },
                Kind::Revoke(r) => LeaseEvent::Revoke { lease: lease(r.lease.as_ref())?, epoch: r.epoch },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_fences_itself_well_inside_its_session() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // The defaults: 10 s session, 1 s heartbeats: 2 s to stop handlers.
        assert_eq!(fence_after(s(10), s(1)), s(8));
        // The load tests' 3 s session with 300 ms heartbeats.
        assert_eq!(fence_after(s(3), ms(300)), ms(2400));
        // At least two heartbeat intervals of margin.
        assert_eq!(fence_after(s(2), ms(500)), s(1));
        // Never sooner than one heartbeat interval.
        assert_eq!(fence_after(ms(200), ms(100)), ms(100));
    }

    #[test]
    fn a_trip_kills_every_lease_started_before_it_and_voids_older_instructions() {
        let fence = Fence::default();
        let before = fence.generation();
        let Some(running) = fence.token(before) else { panic!("the current generation gets a token") };
        fence.trip();
        assert!(running.is_cancelled(), "a lease started before the trip is killed");
        assert!(fence.token(before).is_none(), "an instruction from before the trip is void");
        let Some(after) = fence.token(fence.generation()) else { panic!("a new generation") };
        assert!(!after.is_cancelled(), "leases started after the trip run");
    }
}
