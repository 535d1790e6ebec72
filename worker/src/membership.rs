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
//!
//! **Several coordinators** (one leads, the others stand by): the session
//! keeps their URLs in an [`Endpoints`] and a lazy channel to each. Every
//! call goes to the current one; a call failing in a way
//! [`should_try_another`] accepts (a standby's `UNAVAILABLE`, a dead or
//! frozen coordinator) makes the *next* call go to the leader the standby
//! named, or else to the next URL. No call is repeated in place: heartbeats
//! come every interval anyway and the fence counts from acknowledged ones,
//! and registering retries with backoff, each attempt on the current URL.
//! A new leader that does not know the worker answers `NOT_FOUND` to its
//! heartbeat, and the worker registers again, quoting its leases: that is
//! how a new leader learns the fleet.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use shardline_proto::endpoints::{describe, leader_hint, should_try_another};
use shardline_proto::timing::fence_after;
use shardline_proto::v1::{self, worker_api_client::WorkerApiClient};
use shardline_proto::{Credentials, Endpoints, LeaseId, Mapping, Start, WindowState};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How a worker joins the fleet.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The coordinators' URLs, comma-separated ([`Endpoints::parse`]).
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
    /// The token and TLS settings every call and channel use.
    pub credentials: Credentials,
}

/// What the runtime must do with a lease.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEvent {
    /// Start (or restart, if running under an older epoch) from `start`.
    Acquire {
        lease: LeaseId,
        epoch: u64,
        start: Start,
        mapping: Option<Box<Mapping>>,
        /// The tumbling window of the lease's last checkpoint.
        window: Option<WindowState>,
    },
    /// Finish the in-flight batch, then [`Session::release_done`].
    Release { lease: LeaseId, epoch: u64 },
    /// Stop at once, without checkpointing.
    Revoke { lease: LeaseId, epoch: u64 },
}

/// Errors talking to the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The coordinator at `url` (the one actually called) did not serve
    /// the call: a standby, shutting down, unreachable or frozen. The next
    /// call goes to another one.
    #[error("coordinator at {url} unavailable: {message}")]
    Unreachable { url: String, message: String },
    /// The coordinator list is unusable.
    #[error("{0}")]
    Config(#[from] shardline_proto::EndpointsError),
    #[error("coordinator refused: {0}")]
    Rpc(#[from] tonic::Status),
    /// The coordinator refused this worker's credentials (a wrong or
    /// missing token, a certificate without the worker role): retrying
    /// cannot help, so the worker stops and says so.
    #[error("the coordinator at {url} refused this worker's credentials: {message}")]
    Refused { url: String, message: String },
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

/// Where this worker stands with its coordinators, as `/readyz` reports
/// it; kept by [`Session::run`].
#[derive(Debug, Clone, Default)]
pub struct Standing(Arc<Mutex<Stand>>);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Stand {
    /// Before [`Session::run`]: the handlers initialise.
    #[default]
    Starting,
    /// Not registered yet, or registering again.
    Registering,
    /// Registering, and the last try failed with this error.
    RegisterFailed(String),
    /// Registered with the coordinator at this URL, and its heartbeats are
    /// acknowledged within the fence time.
    Joined(String),
    /// Stopped every lease: no heartbeat acknowledged for too long, or
    /// another process took this worker's id.
    Fenced(String),
}

impl Standing {
    pub fn get(&self) -> Stand {
        crate::lock(&self.0).clone()
    }

    fn set(&self, stand: Stand) {
        *crate::lock(&self.0) = stand;
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

struct Registered {
    /// The coordinator that answered.
    url: String,
    interval: Duration,
    fence_after: Duration,
    /// When the request that got this answer was sent.
    sent: Instant,
    events: Vec<LeaseEvent>,
}

/// The coordinators a session may call: which one is current, and a lazy
/// channel to each one listed or learned from a hint.
struct Coordinators {
    endpoints: Endpoints,
    channels: BTreeMap<String, Channel>,
}

/// A lazy channel: nothing is dialled until the first call.
fn channel(credentials: &Credentials, url: &str) -> Result<Channel, SessionError> {
    credentials
        .channel(url, Duration::from_secs(3), Duration::from_secs(10))
        .map_err(|message| SessionError::Unreachable { url: url.to_owned(), message })
}

#[derive(Clone)]
pub struct Session {
    cfg: SessionConfig,
    coordinators: Arc<Mutex<Coordinators>>,
    /// Drawn once per process: a registration under a known id with another
    /// incarnation fences the older process.
    incarnation: u64,
    /// What the runtime runs, quoted in heartbeats and when registering.
    pub held: HeldLeases,
    pub fence: Fence,
    standing: Standing,
}

impl Session {
    /// Prepares lazy connections to every coordinator listed: nothing is
    /// dialled until the first call, so a worker can start before its
    /// coordinators.
    pub fn new(cfg: SessionConfig) -> Result<Self, SessionError> {
        let endpoints = Endpoints::parse(&cfg.coordinator)?;
        let channels = endpoints
            .urls()
            .iter()
            .map(|url| Ok((url.clone(), channel(&cfg.credentials, url)?)))
            .collect::<Result<_, SessionError>>()?;
        Ok(Self {
            cfg,
            coordinators: Arc::new(Mutex::new(Coordinators { endpoints, channels })),
            incarnation: incarnation(),
            held: HeldLeases::default(),
            fence: Fence::default(),
            standing: Standing::default(),
        })
    }

    /// Keeps where this session stands in `standing` (read by `/readyz`)
    /// rather than in a fresh one.
    pub fn with_standing(mut self, standing: Standing) -> Self {
        self.standing = standing;
        self
    }

    pub fn worker_id(&self) -> &str {
        &self.cfg.worker_id
    }

    /// The URL calls go to now.
    pub fn coordinator(&self) -> String {
        crate::lock(&self.coordinators).endpoints.current().to_owned()
    }

    /// The current coordinator and a client for it. A leader learned from a
    /// hint gets its channel here, on first use.
    fn client(&self) -> Result<(String, WorkerApiClient<Channel>), SessionError> {
        let mut c = crate::lock(&self.coordinators);
        let url = c.endpoints.current().to_owned();
        if let Some(channel) = c.channels.get(&url) {
            return Ok((url, WorkerApiClient::new(channel.clone())));
        }
        match channel(&self.cfg.credentials, &url) {
            Ok(channel) => {
                c.channels.insert(url.clone(), channel.clone());
                Ok((url, WorkerApiClient::new(channel)))
            }
            Err(e) => {
                // A hint the endpoint parser took but tonic cannot dial:
                // the next call goes elsewhere.
                c.endpoints.failed(&url, None);
                Err(e)
            }
        }
    }

    /// The error a failed call to `url` becomes. One that says another
    /// coordinator may serve it moves the session on (to the leader the
    /// status names, if any) for the next call; this call is not repeated.
    fn failed(&self, url: String, status: tonic::Status) -> SessionError {
        if matches!(status.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) {
            let message = format!(
                "{} (check auth_token / auth_token_file / SHARDLINE_TOKEN and the client certificate)",
                status.message()
            );
            return SessionError::Refused { url, message };
        }
        let mut message = describe(&status);
        // A connection TLS broke on one side fails this URL, whatever code
        // the transport gave it (a reset, or an HTTP/2 protocol error).
        let hint = shardline_proto::credentials::tls_hint(&url, &status);
        if hint.is_none() && !should_try_another(status.code()) {
            return SessionError::Rpc(status);
        }
        if let Some(hint) = hint {
            message = format!("{message} ({hint})");
        }
        let hint = leader_hint(&status);
        let moved = crate::lock(&self.coordinators).endpoints.failed(&url, hint).map(str::to_owned);
        if let Some(to) = moved {
            tracing::info!(
                worker = %self.cfg.worker_id,
                from = %url,
                to = %to,
                why = %message,
                "switching coordinator"
            );
        }
        SessionError::Unreachable { url, message }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        self.cfg.credentials.request(message)
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
            let (url, mut client) = self.client()?;
            let reply = match client.register(self.request(message)).await {
                Ok(reply) => reply.into_inner(),
                Err(status) => return Err(self.failed(url, status)),
            };
            let interval = Duration::from_millis(reply.heartbeat_interval_ms.max(50));
            let session_timeout = Duration::from_millis(reply.session_timeout_ms.max(100));
            Ok::<_, SessionError>(Registered {
                url,
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
            .when(|e| !matches!(e, SessionError::Protocol(_) | SessionError::Refused { .. }))
            .notify(|e, wait| {
                self.standing.set(Stand::RegisterFailed(e.to_string()));
                tracing::warn!(error = %e, ?wait, "register failed; retrying");
            });
        tokio::select! {
            result = retried => result,
            () = shutdown.cancelled() => {
                let message = "shut down before registering".into();
                Err(SessionError::Unreachable { url: self.coordinator(), message })
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
        let (url, mut client) = self.client()?;
        match client.heartbeat(request).await {
            Ok(reply) => Ok(Some(events(reply.into_inner().instructions)?)),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                Err(SessionError::Superseded(status.message().to_owned()))
            }
            Err(status) => Err(self.failed(url, status)),
        }
    }

    /// One result per entry.
    pub async fn checkpoint(
        &self,
        entries: Vec<(LeaseId, u64, i64, Option<WindowState>)>,
    ) -> Result<Vec<Result<(), SessionError>>, SessionError> {
        let message = v1::CheckpointRequest {
            worker_id: self.cfg.worker_id.clone(),
            entries: entries
                .iter()
                .map(|(lease, epoch, offset, window)| v1::CheckpointEntry {
                    lease: Some(lease.into()),
                    epoch: *epoch,
                    offset: *offset,
                    window: window.as_ref().map(v1::WindowState::from),
                })
                .collect(),
        };
        let (url, mut client) = self.client()?;
        let reply = match client.checkpoint(self.request(message)).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => return Err(self.failed(url, status)),
        };
        Ok(entries.into_iter().zip(reply.results).map(|((lease, _, _, _), r)| status(lease, r)).collect())
    }

    pub async fn release_done(
        &self,
        lease: &LeaseId,
        epoch: u64,
        offset: Option<i64>,
        window: Option<&WindowState>,
    ) -> Result<(), SessionError> {
        let message = v1::ReleaseDoneRequest {
            worker_id: self.cfg.worker_id.clone(),
            lease: Some(lease.into()),
            epoch,
            offset,
            window: window.map(v1::WindowState::from),
        };
        let (url, mut client) = self.client()?;
        let reply = match client.release_done(self.request(message)).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => return Err(self.failed(url, status)),
        };
        status(lease.clone(), v1::CheckpointResult { status: reply.status, ..Default::default() })
    }

    pub async fn deregister(&self) -> Result<(), SessionError> {
        let message = v1::DeregisterRequest { worker_id: self.cfg.worker_id.clone() };
        let (url, mut client) = self.client()?;
        match client.deregister(self.request(message)).await {
            Ok(_) => Ok(()),
            Err(status) => Err(self.failed(url, status)),
        }
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
        self.standing.set(Stand::Registering);
        let mut joined = self.register(&shutdown).await?;
        forward(&events, fence.generation(), std::mem::take(&mut joined.events)).await;
        tracing::info!(worker = %self.cfg.worker_id, coordinator = %joined.url, "registered with the coordinator");
        self.standing.set(Stand::Joined(joined.url.clone()));
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
                    self.standing.set(Stand::Joined(self.coordinator()));
                    forward(&events, fence.generation(), instructions).await;
                }
                Ok(None) => {
                    tracing::warn!(worker = %self.cfg.worker_id, "coordinator lost our session; registering again");
                    self.standing.set(Stand::Registering);
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
                    self.standing.set(Stand::Joined(joined.url.clone()));
                    forward(&events, fence.generation(), std::mem::take(&mut joined.events)).await;
                }
                Err(e @ SessionError::Superseded(_)) => {
                    fence.trip();
                    self.held.clear();
                    self.standing.set(Stand::Fenced(e.to_string()));
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
        let silent_for = acked.elapsed();
        self.standing.set(Stand::Fenced(format!(
            "self-fenced: no heartbeat acknowledged by the coordinator for {silent_for:?}"
        )));
        metrics::counter!("shardline_self_fenced_total").increment(1);
        // Each lease it ran is lost to this worker: stopped without a release.
        metrics::counter!("shardline_leases_lost_total").increment(leases as u64);
        tracing::error!(
            worker = %self.cfg.worker_id,
            leases,
            ?silent_for,
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
                    window: shardline_proto::window(a.window.as_ref()).map_err(bad)?,
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

    // ------------------------------------------------ several coordinators
    //
    // Protocol-level tests of the client: tiny WorkerApi servers on
    // 127.0.0.1:0 play a leader (knows the workers that registered with
    // it, NOT_FOUND to others) or a standby (UNAVAILABLE to everything,
    // naming the leader in `shardline-leader` when it knows one).

    use std::collections::BTreeSet;

    use shardline_proto::LEADER_HEADER;
    use shardline_proto::v1::worker_api_server::{WorkerApi, WorkerApiServer};
    use tonic::{Request, Response, Status};

    /// One fake coordinator. `standby_of`: `None` leads; `Some(None)`
    /// stands by knowing no leader; `Some(Some(url))` names `url`.
    #[derive(Clone, Default)]
    struct Fake {
        standby_of: Arc<Mutex<Option<Option<String>>>>,
        known: Arc<Mutex<BTreeSet<String>>>,
        /// Every call it received, by method name.
        calls: Arc<Mutex<Vec<&'static str>>>,
    }

    impl Fake {
        fn count(&self, method: &str) -> usize {
            crate::lock(&self.calls).iter().filter(|m| **m == method).count()
        }

        fn stand_by(&self, leader: Option<&str>) {
            *crate::lock(&self.standby_of) = Some(leader.map(str::to_owned));
        }

        /// Records the call; a standby's answer as the error.
        fn serve(&self, method: &'static str) -> Result<(), Status> {
            crate::lock(&self.calls).push(method);
            let Some(leader) = crate::lock(&self.standby_of).clone() else { return Ok(()) };
            let Some(leader) = leader else {
                return Err(Status::unavailable("this coordinator is a standby; no leader is known yet"));
            };
            let mut status =
                Status::unavailable(format!("this coordinator is a standby; the leader is {leader}"));
            let value = leader.parse().map_err(|_| Status::internal("bad leader URL in the fake"))?;
            status.metadata_mut().insert(LEADER_HEADER, value);
            Err(status)
        }

        fn knows(&self, worker: &str) -> Result<(), Status> {
            let known = crate::lock(&self.known).contains(worker);
            if known { Ok(()) } else { Err(Status::not_found(format!("unknown worker {worker}"))) }
        }
    }

    #[tonic::async_trait]
    impl WorkerApi for Fake {
        async fn register(
            &self,
            request: Request<v1::RegisterRequest>,
        ) -> Result<Response<v1::RegisterReply>, Status> {
            self.serve("register")?;
            crate::lock(&self.known).insert(request.into_inner().worker_id);
            Ok(Response::new(v1::RegisterReply {
                heartbeat_interval_ms: 100,
                session_timeout_ms: 3000,
                instructions: Vec::new(),
            }))
        }

        async fn heartbeat(
            &self,
            request: Request<v1::HeartbeatRequest>,
        ) -> Result<Response<v1::HeartbeatReply>, Status> {
            self.serve("heartbeat")?;
            self.knows(&request.into_inner().worker_id)?;
            Ok(Response::new(v1::HeartbeatReply::default()))
        }

        async fn checkpoint(
            &self,
            request: Request<v1::CheckpointRequest>,
        ) -> Result<Response<v1::CheckpointReply>, Status> {
            self.serve("checkpoint")?;
            let request = request.into_inner();
            self.knows(&request.worker_id)?;
            let ok = v1::CheckpointResult { status: v1::CheckpointStatus::Ok.into(), ..Default::default() };
            Ok(Response::new(v1::CheckpointReply { results: vec![ok; request.entries.len()] }))
        }

        async fn release_done(
            &self,
            request: Request<v1::ReleaseDoneRequest>,
        ) -> Result<Response<v1::ReleaseDoneReply>, Status> {
            self.serve("release_done")?;
            self.knows(&request.into_inner().worker_id)?;
            Ok(Response::new(v1::ReleaseDoneReply { status: v1::CheckpointStatus::Ok.into() }))
        }

        async fn deregister(
            &self,
            request: Request<v1::DeregisterRequest>,
        ) -> Result<Response<v1::DeregisterReply>, Status> {
            self.serve("deregister")?;
            crate::lock(&self.known).remove(&request.into_inner().worker_id);
            Ok(Response::new(v1::DeregisterReply {}))
        }
    }

    /// Serves `fake` on a port of the OS's choosing until the test's
    /// runtime ends; its URL.
    async fn serve(fake: &Fake) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = tonic::transport::Server::builder()
            .add_service(WorkerApiServer::new(fake.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        tokio::spawn(async move {
            if let Err(e) = server.await {
                panic!("fake coordinator at {addr}: {e}");
            }
        });
        format!("http://{addr}")
    }

    fn session(coordinators: &str) -> Session {
        Session::new(SessionConfig {
            coordinator: coordinators.to_owned(),
            worker_id: "w-1".into(),
            address: String::new(),
            handlers: vec!["log".into()],
            capacity: 0,
            concurrency: 1,
            credentials: Credentials::default(),
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    async fn register(session: &Session) -> Registered {
        let shutdown = CancellationToken::new();
        let registering = session.register(&shutdown);
        match tokio::time::timeout(Duration::from_secs(10), registering).await {
            Ok(Ok(joined)) => joined,
            Ok(Err(e)) => panic!("register failed: {e}"),
            Err(_) => panic!("not registered within 10 s"),
        }
    }

    async fn heartbeat(session: &Session) -> Result<Option<Vec<LeaseEvent>>, SessionError> {
        session.heartbeat(v1::LoadReport::default(), Vec::new(), false, Duration::from_secs(5)).await
    }

    /// A dead coordinator: a port nothing listens on.
    const DEAD: &str = "http://127.0.0.1:1";

    #[tokio::test]
    async fn one_standby_url_is_enough_to_find_and_register_with_the_leader() {
        let (standby, leader) = (Fake::default(), Fake::default());
        let (standby_url, leader_url) = (serve(&standby).await, serve(&leader).await);
        standby.stand_by(Some(&leader_url));
        let s = session(&standby_url);
        let joined = register(&s).await;
        assert_eq!(joined.url, leader_url, "registered with the leader the standby named");
        assert_eq!((standby.count("register"), leader.count("register")), (1, 1));
        assert_eq!(s.coordinator(), leader_url);
        // Every later call goes to the leader, learned though never listed.
        assert!(matches!(heartbeat(&s).await, Ok(Some(_))));
        let lease: LeaseId = "orders/0".parse().unwrap_or_else(|e| panic!("{e}"));
        let results = s.checkpoint(vec![(lease.clone(), 1, 5, None)]).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        s.release_done(&lease, 1, Some(6), None).await.unwrap_or_else(|e| panic!("{e}"));
        s.deregister().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(standby.count("register"), 1, "the standby was asked once");
        for method in ["heartbeat", "checkpoint", "release_done", "deregister"] {
            assert_eq!((standby.count(method), leader.count(method)), (0, 1), "{method}");
        }
    }

    #[tokio::test]
    async fn a_dead_coordinator_and_a_standby_knowing_no_leader_are_passed_over_in_order() {
        let (standby, leader) = (Fake::default(), Fake::default());
        let (standby_url, leader_url) = (serve(&standby).await, serve(&leader).await);
        standby.stand_by(None);
        let s = session(&format!("{DEAD}, {standby_url}, {leader_url}"));
        let joined = register(&s).await;
        assert_eq!(joined.url, leader_url);
        assert_eq!((standby.count("register"), leader.count("register")), (1, 1));
    }

    #[tokio::test]
    async fn a_failed_call_is_not_repeated_in_place_and_names_the_url_tried() {
        let (standby, leader) = (Fake::default(), Fake::default());
        let (standby_url, leader_url) = (serve(&standby).await, serve(&leader).await);
        standby.stand_by(Some(&leader_url));
        let s = session(&format!("{DEAD},{standby_url}"));
        // One heartbeat, one call: to the dead one, which the error names.
        match heartbeat(&s).await {
            Err(SessionError::Unreachable { url, .. }) => assert_eq!(url, DEAD),
            other => panic!("a dead coordinator: {other:?}"),
        }
        assert_eq!(s.coordinator(), standby_url, "the next call goes to the next URL");
        match heartbeat(&s).await {
            Err(SessionError::Unreachable { url, message }) => {
                assert_eq!(url, standby_url);
                assert!(message.contains("standby"), "{message}");
            }
            other => panic!("a standby: {other:?}"),
        }
        assert_eq!(leader.count("heartbeat"), 0, "no retry inside one heartbeat");
        assert_eq!(s.coordinator(), leader_url, "the hint is followed next");
        // The leader does not know this worker: register again (not a
        // reason to move on).
        assert!(matches!(heartbeat(&s).await, Ok(None)));
        assert_eq!(s.coordinator(), leader_url);
    }

    #[tokio::test]
    async fn refusals_of_a_serving_coordinator_do_not_move_on() {
        let (leader, other) = (Fake::default(), Fake::default());
        let (leader_url, other_url) = (serve(&leader).await, serve(&other).await);
        let s = session(&format!("{leader_url},{other_url}"));
        // Unknown worker: NOT_FOUND on every call but register.
        assert!(matches!(heartbeat(&s).await, Ok(None)));
        let lease: LeaseId = "orders/0".parse().unwrap_or_else(|e| panic!("{e}"));
        let e = s.checkpoint(vec![(lease.clone(), 1, 5, None)]).await;
        assert!(
            matches!(&e, Err(SessionError::Rpc(status)) if status.code() == tonic::Code::NotFound),
            "{e:?}"
        );
        let e = s.release_done(&lease, 1, None, None).await;
        assert!(
            matches!(&e, Err(SessionError::Rpc(status)) if status.code() == tonic::Code::NotFound),
            "{e:?}"
        );
        assert_eq!(s.coordinator(), leader_url);
        assert_eq!(other.count("heartbeat") + other.count("checkpoint") + other.count("release_done"), 0);
    }

    #[tokio::test]
    async fn concurrent_failures_at_one_coordinator_skip_no_url() {
        let (a, b, c) = (Fake::default(), Fake::default(), Fake::default());
        let (a_url, b_url, c_url) = (serve(&a).await, serve(&b).await, serve(&c).await);
        a.stand_by(None);
        let s = session(&format!("{a_url},{b_url},{c_url}"));
        let (one, two) = tokio::join!(heartbeat(&s), heartbeat(&s));
        assert!(matches!(one, Err(SessionError::Unreachable { .. })), "{one:?}");
        assert!(matches!(two, Err(SessionError::Unreachable { .. })), "{two:?}");
        assert_eq!(a.count("heartbeat"), 2, "both calls went to a");
        assert_eq!(s.coordinator(), b_url, "two failures at a move on once, to b (not c)");
    }

    #[tokio::test]
    async fn a_running_worker_follows_a_new_leader_and_registers_there() {
        let (first, second) = (Fake::default(), Fake::default());
        let (first_url, second_url) = (serve(&first).await, serve(&second).await);
        second.stand_by(Some(&first_url));
        let s = session(&format!("{first_url},{second_url}"));
        let (events, _rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let run = SessionRun {
            events,
            load: || (v1::LoadReport::default(), Vec::new()),
            draining: CancellationToken::new(),
            shutdown: shutdown.clone(),
        };
        let task = tokio::spawn(s.clone().run(run));
        let until = |what: &'static str, check: Box<dyn Fn() -> bool + Send>| async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !check() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let f = first.clone();
        until("heartbeats to the first leader", Box::new(move || f.count("heartbeat") >= 2)).await;
        assert_eq!(second.count("register") + second.count("heartbeat"), 0);
        // Failover: the first steps down naming the second, which leads.
        first.stand_by(Some(&second_url));
        *crate::lock(&second.standby_of) = None;
        let t = second.clone();
        until("heartbeats to the new leader", Box::new(move || t.count("heartbeat") >= 3)).await;
        assert_eq!(second.count("register"), 1, "the new leader learned the worker by its registering");
        assert_eq!(s.coordinator(), second_url);
        shutdown.cancel();
        match task.await {
            Ok(Ok(())) => {}
            other => panic!("the session ended with {other:?}"),
        }
    }
}
