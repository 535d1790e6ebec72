//! The worker's side of the lease protocol: register, heartbeat, follow the
//! coordinator's instructions, re-register after a coordinator restart or a
//! lost session, and leave cleanly.
//!
//! The session knows nothing about records: it turns instructions into
//! [`LeaseEvent`]s for the runtime and keeps the set of leases the runtime
//! says it runs ([`HeldLeases`]), which it quotes when it registers again so
//! a coordinator restart moves nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use shardline_proto::v1::{self, worker_api_client::WorkerApiClient};
use shardline_proto::{LeaseId, Mapping};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// How a worker joins the fleet.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The coordinator's gRPC URL, e.g. `http://127.0.0.1:7400`.
    pub coordinator: String,
    pub worker_id: String,
    /// Where this worker can be reached (its metrics endpoint); informational.
    pub address: String,
    /// Handlers this worker hosts; it only gets leases of their mappings.
    pub handlers: Vec<String>,
    /// Most leases to take; 0 = no limit.
    pub capacity: u32,
    /// Batches this worker runs at once (the balancer's capacity unit).
    pub concurrency: u32,
    /// Sent as `authorization: Bearer TOKEN` when set.
    pub token: Option<String>,
}

/// What the runtime must do with a lease.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseEvent {
    /// Start (or restart, if running under an older epoch) from `start`
    /// (`None`: the mapping's starting_position).
    Acquire { lease: LeaseId, epoch: u64, start: Option<i64>, mapping: Option<Box<Mapping>> },
    /// Finish the in-flight batch, checkpoint, then call
    /// [`Session::release_done`].
    Release { lease: LeaseId, epoch: u64 },
    /// Stop at once, without checkpointing.
    Revoke { lease: LeaseId, epoch: u64 },
}

/// Errors talking to the coordinator. All are transient from the worker's
/// point of view except `Fenced`.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("coordinator unreachable at {url}: {message}")]
    Unreachable { url: String, message: String },
    #[error("coordinator refused: {0}")]
    Rpc(#[from] tonic::Status),
    /// The coordinator says another owner or a newer epoch holds the lease.
    #[error("lease {lease} lost: current epoch is {current_epoch}")]
    Fenced { lease: LeaseId, current_epoch: u64 },
    #[error("bad instruction from the coordinator: {0}")]
    Protocol(String),
}

/// The leases the runtime runs, by epoch: shared between the runtime (which
/// updates it) and the session (which quotes it when re-registering).
#[derive(Debug, Clone, Default)]
pub struct HeldLeases(Arc<Mutex<BTreeMap<LeaseId, u64>>>);

impl HeldLeases {
    pub fn insert(&self, lease: LeaseId, epoch: u64) {
        if let Ok(mut held) = self.0.lock() {
            held.insert(lease, epoch);
        }
    }

    /// Removes the lease if it is held under `epoch` (an older instruction
    /// never stops a newer run).
    pub fn remove(&self, lease: &LeaseId, epoch: u64) -> bool {
        match self.0.lock() {
            Ok(mut held) if held.get(lease) == Some(&epoch) => held.remove(lease).is_some(),
            _ => false,
        }
    }

    pub fn snapshot(&self) -> BTreeMap<LeaseId, u64> {
        self.0.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

/// A connection to the coordinator for one worker.
#[derive(Clone)]
pub struct Session {
    cfg: SessionConfig,
    client: WorkerApiClient<Channel>,
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
        Ok(Self { cfg, client: WorkerApiClient::new(channel) })
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

    /// Registers, quoting what the worker still runs; retries with backoff
    /// until the coordinator answers or `shutdown` fires.
    pub async fn register(
        &self,
        held: &HeldLeases,
        shutdown: &CancellationToken,
    ) -> Result<(Duration, Vec<LeaseEvent>), SessionError> {
        let attempt = || async {
            let held = held
                .snapshot()
                .into_iter()
                .map(|(lease, epoch)| v1::HeldLease { lease: Some((&lease).into()), epoch })
                .collect();
            let message = v1::RegisterRequest {
                worker_id: self.cfg.worker_id.clone(),
                address: self.cfg.address.clone(),
                handlers: self.cfg.handlers.clone(),
                capacity: self.cfg.capacity,
                held,
                concurrency: self.cfg.concurrency,
            };
            let reply = self.client.clone().register(self.request(message)).await?.into_inner();
            let events = events(reply.instructions)?;
            Ok::<_, SessionError>((Duration::from_millis(reply.heartbeat_interval_ms.max(50)), events))
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times();
        tokio::select! {
            result = attempt
                .retry(backoff)
                .when(|e| !matches!(e, SessionError::Protocol(_)))
                .notify(|e, wait| tracing::warn!(error = %e, ?wait, "register failed; retrying")) => result,
            () = shutdown.cancelled() => Err(SessionError::Unreachable {
                url: self.cfg.coordinator.clone(),
                message: "shut down before registering".into(),
            }),
        }
    }

    /// One heartbeat. `Ok(None)`: the coordinator does not know us (we
    /// expired or it restarted): register again.
    pub async fn heartbeat(
        &self,
        load: v1::LoadReport,
        unhealthy: Vec<String>,
        draining: bool,
    ) -> Result<Option<Vec<LeaseEvent>>, SessionError> {
        let message = v1::HeartbeatRequest {
            worker_id: self.cfg.worker_id.clone(),
            load: Some(load),
            draining,
            unhealthy,
        };
        match self.client.clone().heartbeat(self.request(message)).await {
            Ok(reply) => Ok(Some(events(reply.into_inner().instructions)?)),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(status.into()),
        }
    }

    /// Checkpoints many leases in one call; one result per entry.
    pub async fn checkpoint(
        &self,
        entries: Vec<(LeaseId, u64, i64)>,
    ) -> Result<Vec<Result<(), SessionError>>, SessionError> {
        let leases: Vec<LeaseId> = entries.iter().map(|(l, _, _)| l.clone()).collect();
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
        Ok(leases.into_iter().zip(reply.results).map(|(lease, r)| status(lease, r)).collect())
    }

    /// Confirms a release with the final checkpoint.
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
        status(
            lease.clone(),
            v1::CheckpointResult { status: reply.status, current_epoch: 0, checkpoint: None },
        )
    }

    pub async fn deregister(&self) -> Result<(), SessionError> {
        let message = v1::DeregisterRequest { worker_id: self.cfg.worker_id.clone() };
        self.client.clone().deregister(self.request(message)).await?;
        Ok(())
    }

    /// Registers, then heartbeats every interval until `shutdown`, sending
    /// every instruction to `events`. `load` builds each heartbeat's report
    /// (and the worker's health problems, if any);
    /// once `draining` fires, heartbeats say so (no new leases).
    pub async fn run(
        self,
        held: HeldLeases,
        events: mpsc::Sender<LeaseEvent>,
        load: impl Fn() -> (v1::LoadReport, Vec<String>) + Send,
        draining: CancellationToken,
        shutdown: CancellationToken,
    ) -> Result<(), SessionError> {
        let (mut interval, initial) = self.register(&held, &shutdown).await?;
        forward(&events, initial).await;
        tracing::info!(worker = %self.cfg.worker_id, "registered with the coordinator");
        let mut told_draining = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(interval) => {}
                // Tell the coordinator at once, not a heartbeat later.
                () = draining.cancelled(), if !told_draining => {}
            }
            told_draining = draining.is_cancelled();
            let (report, unhealthy) = load();
            match self.heartbeat(report, unhealthy, told_draining).await {
                Ok(Some(instructions)) => forward(&events, instructions).await,
                Ok(None) => {
                    tracing::warn!(worker = %self.cfg.worker_id, "coordinator lost our session; registering again");
                    let (i, instructions) = self.register(&held, &shutdown).await?;
                    interval = i;
                    forward(&events, instructions).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat failed; retrying next interval");
                }
            }
        }
    }
}

async fn forward(tx: &mpsc::Sender<LeaseEvent>, events: Vec<LeaseEvent>) {
    for event in events {
        if tx.send(event).await.is_err() {
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
    let lease =
        |id: Option<&v1::LeaseId>| LeaseId::try_from(id).map_err(|e| SessionError::Protocol(e.to_string()));
    instructions
        .into_iter()
        .filter_map(|i| i.kind)
        .map(|kind| {
            Ok(match kind {
                Kind::Acquire(a) => LeaseEvent::Acquire {
                    lease: lease(a.lease.as_ref())?,
                    epoch: a.epoch,
                    start: a.start.and_then(|s| s.checkpoint()),
                    mapping: a
                        .mapping
                        .as_ref()
                        .map(Mapping::try_from)
                        .transpose()
                        .map(|m| m.map(Box::new))
                        .map_err(|e| SessionError::Protocol(e.to_string()))?,
                },
                Kind::Release(r) => LeaseEvent::Release { lease: lease(r.lease.as_ref())?, epoch: r.epoch },
                Kind::Revoke(r) => LeaseEvent::Revoke { lease: lease(r.lease.as_ref())?, epoch: r.epoch },
            })
        })
        .collect()
}
