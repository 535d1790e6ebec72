//! The gRPC edge: `WorkerApi` and `AdminApi` implementations that convert
//! wire messages to domain types, call the service loop, and convert back.
//! Nothing here decides anything.

use std::collections::BTreeSet;

use shardline_proto::v1::{self, admin_api_server::AdminApi, worker_api_server::WorkerApi};
use shardline_proto::{ConvertError, LeaseId, LeaseKind, WindowState};
use tonic::{Request, Response, Status};

use crate::auth::{Access, allow};
use crate::core::{
    Beat, CheckpointOutcome, CoreError, Instruction, Lease, LeaseLoad, LeaseState, Registration, WorkerLoad,
};
use crate::offsets::{ResolveError, Target};
use crate::role::{Role, State};
use crate::service::{CheckpointCmd, Closed, Command, Handle};

/// Serves both gRPC services: through the service loop's handle while
/// this coordinator leads; as a standby, every call is answered
/// UNAVAILABLE with the leader's URL in the `shardline-leader` header.
#[derive(Clone)]
pub struct Api {
    role: Role,
    /// Kafka offsets for checkpoint listings and operator moves.
    offsets: Option<crate::offsets::Offsets>,
    subscriptions: crate::amqp::StatusTable,
    config: std::sync::Arc<crate::config::Config>,
    heartbeat_interval_ms: u64,
    session_timeout_ms: u64,
}

impl Api {
    pub fn new(
        role: Role,
        cfg: std::sync::Arc<crate::config::Config>,
        subscriptions: crate::amqp::StatusTable,
    ) -> Self {
        // Served at 0 from the start, so "none" is a value, not a gap.
        metrics::counter!("shardline_usage_unknown_mappings_total").increment(0);
        let offsets = match crate::offsets::Offsets::new(&cfg.kafka_brokers, &cfg.kafka) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(error = %e, "no Kafka client: checkpoint listings will lack offsets");
                None
            }
        };
        Self {
            offsets,
            subscriptions,
            config: cfg.clone(),
            role,
            heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u64,
            session_timeout_ms: cfg.session_timeout.as_millis() as u64,
        }
    }
}

impl Api {
    /// The service loop, if this coordinator leads; otherwise the status
    /// that sends the client to the leader (or to its next URL).
    fn leader(&self) -> Result<Handle, Status> {
        self.leading().map(|(handle, _)| handle)
    }

    /// [`Api::leader`] with the term it leads in, read at once.
    fn leading(&self) -> Result<(Handle, u64), Status> {
        match self.role.get() {
            State::Leading { handle, term } => Ok((handle, term)),
            State::Following { leader } => Err(standby(leader.as_deref())),
            State::Starting => Err(Status::unavailable("this coordinator is starting; retry")),
            State::Stopped => Err(Status::unavailable("this coordinator is shutting down; try another")),
        }
    }
}

/// UNAVAILABLE, naming the leader (message and header) when known.
fn standby(leader: Option<&str>) -> Status {
    let Some(url) = leader else {
        return Status::unavailable("this coordinator is a standby; no leader is known yet");
    };
    let mut status = Status::unavailable(format!("this coordinator is a standby; the leader is {url}"));
    match url.parse() {
        Ok(value) => {
            status.metadata_mut().insert(shardline_proto::LEADER_HEADER, value);
        }
        Err(e) => tracing::warn!(%url, error = %e, "the leader's URL cannot be sent as a header"),
    }
    status
}

fn bad(e: ConvertError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn closed(_: Closed) -> Status {
    Status::unavailable("the coordinator is shutting down; retry against the new one")
}

pub fn worker_id(id: &str) -> Result<String, Status> {
    if id.is_empty() { Err(Status::invalid_argument("worker_id is empty")) } else { Ok(id.to_owned()) }
}

fn instruction(config: &crate::config::Config, i: Instruction) -> v1::Instruction {
    use v1::instruction::Kind;
    let kind = match i {
        Instruction::Acquire { lease, epoch, start, window } => Kind::Acquire(v1::Acquire {
            lease: Some((&lease).into()),
            epoch,
            start: Some(start.into()),
            mapping: config.mapping(&lease).as_ref().map(v1::Mapping::from),
            window: window.as_ref().map(v1::WindowState::from),
        }),
        Instruction::Release { lease, epoch } => {
            Kind::Release(v1::Release { lease: Some((&lease).into()), epoch })
        }
        Instruction::Revoke { lease, epoch } => {
            Kind::Revoke(v1::Revoke { lease: Some((&lease).into()), epoch })
        }
    };
    v1::Instruction { kind: Some(kind) }
}

fn checkpoint_result(outcome: CheckpointOutcome) -> v1::CheckpointResult {
    use v1::CheckpointStatus as S;
    match outcome {
        CheckpointOutcome::Ok { checkpoint } => {
            v1::CheckpointResult { status: S::Ok as i32, current_epoch: 0, checkpoint }
        }
        CheckpointOutcome::Stale { current_epoch } => {
            v1::CheckpointResult { status: S::StaleEpoch as i32, current_epoch, checkpoint: None }
        }
        CheckpointOutcome::UnknownLease => {
            v1::CheckpointResult { status: S::UnknownLease as i32, current_epoch: 0, checkpoint: None }
        }
        // Answered as INVALID_ARGUMENT by `Api::verified` before it gets
        // here; unspecified (not OK) if it ever did.
        CheckpointOutcome::BeyondWatermark { .. } => {
            v1::CheckpointResult { status: S::Unspecified as i32, current_epoch: 0, checkpoint: None }
        }
    }
}

// The request conversions below are public for the fuzz targets
// (`fuzz/`), which feed arbitrary wire messages through them into the core.

/// A `Register` request as the core takes it.
pub fn registration(req: v1::RegisterRequest) -> Result<Registration, Status> {
    Ok(Registration {
        worker: worker_id(&req.worker_id)?,
        address: req.address,
        handlers: req.handlers.into_iter().collect::<BTreeSet<_>>(),
        capacity: req.capacity,
        concurrency: req.concurrency,
        held: held(&req.held)?,
        incarnation: req.incarnation,
    })
}

/// A `Heartbeat` request as the core takes it.
#[derive(Debug)]
pub struct Heartbeat {
    pub worker: String,
    pub beat: Beat,
    pub draining: bool,
}

/// `config` names the mappings usage may be reported for.
pub fn heartbeat(config: &crate::config::Config, req: v1::HeartbeatRequest) -> Result<Heartbeat, Status> {
    let worker = worker_id(&req.worker_id)?;
    let mut load = load(config, &worker, req.load)?;
    load.unhealthy = req.unhealthy;
    let beat = Beat { incarnation: req.incarnation, held: held(&req.held)?.into_iter().collect(), load };
    Ok(Heartbeat { worker, beat, draining: req.draining })
}

/// A `Checkpoint` request: the worker and its entries.
pub fn checkpoints(req: &v1::CheckpointRequest) -> Result<(String, Vec<CheckpointCmd>), Status> {
    let worker = worker_id(&req.worker_id)?;
    let mut entries = Vec::with_capacity(req.entries.len());
    for e in &req.entries {
        let lease = LeaseId::try_from(e.lease.as_ref()).map_err(bad)?;
        let window = shardline_proto::window(e.window.as_ref()).map_err(bad)?;
        entries.push(CheckpointCmd { lease, epoch: e.epoch, offset: e.offset, window });
    }
    Ok((worker, entries))
}

/// A `ReleaseDone` request as the core takes it.
#[derive(Debug)]
pub struct Release {
    pub worker: String,
    pub lease: LeaseId,
    pub epoch: u64,
    pub offset: Option<i64>,
    pub window: Option<WindowState>,
}

pub fn release(req: &v1::ReleaseDoneRequest) -> Result<Release, Status> {
    let worker = worker_id(&req.worker_id)?;
    let lease = LeaseId::try_from(req.lease.as_ref()).map_err(bad)?;
    let window = shardline_proto::window(req.window.as_ref()).map_err(bad)?;
    Ok(Release { worker, lease, epoch: req.epoch, offset: req.offset, window })
}

fn held(held: &[v1::HeldLease]) -> Result<Vec<(LeaseId, u64)>, Status> {
    held.iter().map(|h| Ok((LeaseId::try_from(h.lease.as_ref()).map_err(bad)?, h.epoch))).collect()
}

/// A worker's load report in domain terms. Usage of a mapping the config
/// does not name is dropped (logged and counted), so a worker cannot make
/// the coordinator store buckets under names of its choosing; the handler
/// recorded is the config's, not the worker's word. The load figures are
/// checked by the core, which knows which leases the worker holds.
fn load(
    config: &crate::config::Config,
    worker: &str,
    report: Option<v1::LoadReport>,
) -> Result<WorkerLoad, Status> {
    let Some(report) = report else { return Ok(WorkerLoad::default()) };
    let mut leases = std::collections::BTreeMap::new();
    for l in report.leases {
        let id = LeaseId::try_from(l.lease.as_ref()).map_err(bad)?;
        leases.insert(
            id,
            LeaseLoad {
                position: l.position,
                lag: l.lag,
                records_in_per_s: l.records_in_per_s,
                records_out_per_s: l.records_out_per_s,
                busy_ratio: l.busy_ratio,
            },
        );
    }
    let mut usage = Vec::with_capacity(report.usage.len());
    for u in report.usage {
        let Some(handler) = mapping_handler(config, &u.mapping) else {
            metrics::counter!("shardline_usage_unknown_mappings_total").increment(1);
            tracing::warn!(%worker, mapping = %u.mapping, "usage report for a mapping the config does not name; dropped");
            continue;
        };
        let counts = crate::usage::Counts {
            handler: handler.to_owned(),
            batches: u.batches,
            records: u.records,
            handler_ms: u.handler_ms,
            billed_units: u.billed_units,
        };
        usage.push((u.mapping, counts));
    }
    Ok(WorkerLoad {
        cpu: report.cpu,
        inflight_batches: report.inflight_batches,
        leases,
        unhealthy: Vec::new(),
        usage,
    })
}

/// The handler of the stream or subscription called `mapping`, if configured.
fn mapping_handler<'a>(config: &'a crate::config::Config, mapping: &str) -> Option<&'a str> {
    let stream = config.streams.iter().find(|s| s.name == mapping).map(|s| s.handler.as_str());
    stream.or_else(|| config.subscriptions.iter().find(|s| s.name == mapping).map(|s| s.handler.as_str()))
}

fn load_report(load: &WorkerLoad) -> v1::LoadReport {
    v1::LoadReport {
        leases: load
            .leases
            .iter()
            .map(|(id, l)| v1::LeaseLoad {
                lease: Some(id.into()),
                epoch: 0,
                position: l.position,
                lag: l.lag,
                records_in_per_s: l.records_in_per_s,
                records_out_per_s: l.records_out_per_s,
                busy_ratio: l.busy_ratio,
            })
            .collect(),
        cpu: load.cpu,
        inflight_batches: load.inflight_batches,
        usage: Vec::new(),
    }
}

/// The admin view of one lease.
pub fn lease_info(lease: &Lease, now: std::time::Instant) -> v1::LeaseInfo {
    let (state, handoff_to) = match &lease.state {
        LeaseState::Owned => (v1::LeaseState::Owned, String::new()),
        LeaseState::Releasing { to, .. } => (v1::LeaseState::Releasing, to.clone().unwrap_or_default()),
        LeaseState::Unassigned => (v1::LeaseState::Unassigned, String::new()),
        LeaseState::Parked => (v1::LeaseState::Parked, String::new()),
    };
    v1::LeaseInfo {
        lease: Some((&lease.record.lease).into()),
        owner: lease.record.owner.clone().unwrap_or_default(),
        epoch: lease.record.epoch,
        state: state as i32,
        checkpoint: lease.record.checkpoint,
        since_ms_ago: now.saturating_duration_since(lease.since).as_millis() as u64,
        handoff_to,
        handler: lease.handler.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl WorkerApi for Api {
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterReply>, Status> {
        let registration = registration(req.into_inner())?;
        let instructions =
            self.leader()?.call(|tx| Command::Register(registration, tx)).await.map_err(closed)?;
        Ok(Response::new(v1::RegisterReply {
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            session_timeout_ms: self.session_timeout_ms,
            instructions: instructions.into_iter().map(|i| instruction(&self.config, i)).collect(),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatReply>, Status> {
        let Heartbeat { worker, beat, draining } = heartbeat(&self.config, req.into_inner())?;
        let result = self
            .leader()?
            .call(|reply| Command::Heartbeat { worker, beat, draining, reply })
            .await
            .map_err(closed)?;
        match result {
            Ok(instructions) => Ok(Response::new(v1::HeartbeatReply {
                instructions: instructions.into_iter().map(|i| instruction(&self.config, i)).collect(),
            })),
            Err(e @ CoreError::UnknownWorker(_)) => Err(Status::not_found(e.to_string())),
            Err(e @ CoreError::Superseded(_)) => Err(Status::failed_precondition(e.to_string())),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }

    async fn checkpoint(
        &self,
        req: Request<v1::CheckpointRequest>,
    ) -> Result<Response<v1::CheckpointReply>, Status> {
        let (worker, entries) = checkpoints(&req.into_inner())?;
        let outcomes = self.verified(&worker, entries).await?;
        Ok(Response::new(v1::CheckpointReply {
            results: outcomes.into_iter().map(checkpoint_result).collect(),
        }))
    }

    async fn release_done(
        &self,
        req: Request<v1::ReleaseDoneRequest>,
    ) -> Result<Response<v1::ReleaseDoneReply>, Status> {
        let Release { worker, lease, epoch, offset, window } = release(&req.into_inner())?;
        let release = |worker: String, lease: LeaseId| {
            let window = window.clone();
            async move {
                let handle = self.leader()?;
                handle
                    .call(|reply| Command::ReleaseDone { worker, lease, epoch, offset, window, reply })
                    .await
                    .map_err(closed)
            }
        };
        let mut outcome = release(worker.clone(), lease.clone()).await?;
        if let (CheckpointOutcome::BeyondWatermark { high }, Some(offset)) = (outcome, offset) {
            self.reread_watermarks(&[(&lease, offset, high)]).await?;
            outcome = release(worker, lease.clone()).await?;
            if let CheckpointOutcome::BeyondWatermark { high } = outcome {
                return Err(beyond_watermark(&lease, offset, high));
            }
        }
        Ok(Response::new(v1::ReleaseDoneReply { status: checkpoint_result(outcome).status }))
    }

    async fn deregister(
        &self,
        req: Request<v1::DeregisterRequest>,
    ) -> Result<Response<v1::DeregisterReply>, Status> {
        let worker = worker_id(&req.into_inner().worker_id)?;
        self.leader()?.call(|reply| Command::Deregister { worker, reply }).await.map_err(closed)?;
        Ok(Response::new(v1::DeregisterReply {}))
    }
}

#[tonic::async_trait]
impl AdminApi for Api {
    async fn list_workers(
        &self,
        req: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersReply>, Status> {
        allow(&req, Access::Read)?;
        let snapshot = self.leader()?.call(Command::Snapshot).await.map_err(closed)?;
        let mut counts = std::collections::BTreeMap::<&str, u32>::new();
        for lease in &snapshot.leases {
            if let Some(owner) = &lease.record.owner {
                *counts.entry(owner).or_default() += 1;
            }
        }
        let workers = snapshot
            .workers
            .iter()
            .map(|w| v1::WorkerInfo {
                worker_id: w.id.clone(),
                address: w.address.clone(),
                handlers: w.handlers.iter().cloned().collect(),
                capacity: w.capacity,
                leases: counts.get(w.id.as_str()).copied().unwrap_or(0),
                last_heartbeat_ms_ago: snapshot.now.saturating_duration_since(w.last_seen).as_millis() as u64,
                load: Some(load_report(&w.load)),
                restored: w.restored,
                unhealthy: w.load.unhealthy.clone(),
                draining: w.draining,
                utilisation: snapshot.utilisation.get(&w.id).copied().unwrap_or(0.0),
                concurrency: w.concurrency,
            })
            .collect();
        Ok(Response::new(v1::ListWorkersReply {
            workers,
            desired_workers: snapshot.desired_workers,
            strategy: match self.config.core().balancer.strategy {
                crate::core::Strategy::Count => "count".into(),
                crate::core::Strategy::Load => "load".into(),
            },
        }))
    }

    async fn list_leases(
        &self,
        req: Request<v1::ListLeasesRequest>,
    ) -> Result<Response<v1::ListLeasesReply>, Status> {
        allow(&req, Access::Read)?;
        let name = req.into_inner().name;
        let snapshot = self.leader()?.call(Command::Snapshot).await.map_err(closed)?;
        let leases = snapshot
            .leases
            .iter()
            .filter(|l| name.is_empty() || l.record.lease.name == name)
            .map(|l| lease_info(l, snapshot.now))
            .collect();
        Ok(Response::new(v1::ListLeasesReply { leases }))
    }

    async fn get_checkpoint(
        &self,
        req: Request<v1::GetCheckpointRequest>,
    ) -> Result<Response<v1::LeaseInfo>, Status> {
        allow(&req, Access::Read)?;
        let id = LeaseId::try_from(req.into_inner().lease.as_ref()).map_err(bad)?;
        let lease = id.clone();
        let found = self.leader()?.call(|reply| Command::Lease { lease, reply }).await.map_err(closed)?;
        match found {
            Ok(l) => Ok(Response::new(lease_info(&l, std::time::Instant::now()))),
            Err(_) => Err(Status::not_found(format!("unknown lease `{id}`"))),
        }
    }

    async fn set_checkpoint(
        &self,
        req: Request<v1::SetCheckpointRequest>,
    ) -> Result<Response<v1::CheckpointPlan>, Status> {
        allow(&req, Access::Write)?;
        let req = req.into_inner();
        let lease = LeaseId::try_from(req.lease.as_ref()).map_err(bad)?;
        let target = target(req.target)?;
        self.known(vec![lease.clone()]).await?;
        let offset = self.resolve(&lease, target).await?;
        self.apply(vec![(lease, offset, None)], req.dry_run).await
    }

    async fn reset_checkpoints(
        &self,
        req: Request<v1::ResetCheckpointsRequest>,
    ) -> Result<Response<v1::CheckpointPlan>, Status> {
        allow(&req, Access::Write)?;
        let req = req.into_inner();
        let target = target(req.target)?;
        let shards = self.shards(&req.stream).await?;
        let mut changes = Vec::with_capacity(shards.len());
        for lease in shards {
            let offset = self.resolve(&lease.record.lease, target).await?;
            changes.push((lease.record.lease, offset, None));
        }
        self.apply(changes, req.dry_run).await
    }

    async fn list_checkpoints(
        &self,
        req: Request<v1::ListCheckpointsRequest>,
    ) -> Result<Response<v1::ListCheckpointsReply>, Status> {
        allow(&req, Access::Read)?;
        let shards = self.shards(&req.into_inner().stream).await?;
        let now = std::time::Instant::now();
        let lookups = shards.iter().map(|l| shard_checkpoint(self.offsets.as_ref(), l, now));
        let shards = futures::future::join_all(lookups).await;
        Ok(Response::new(v1::ListCheckpointsReply { shards }))
    }

    async fn export_checkpoints(
        &self,
        req: Request<v1::ExportCheckpointsRequest>,
    ) -> Result<Response<v1::ExportCheckpointsReply>, Status> {
        allow(&req, Access::Write)?;
        let snapshot = self.leader()?.call(Command::Snapshot).await.map_err(closed)?;
        let checkpoints = snapshot
            .leases
            .iter()
            .filter_map(|l| {
                Some(v1::ExportedCheckpoint {
                    lease: Some((&l.record.lease).into()),
                    checkpoint: l.record.checkpoint?,
                    epoch: l.record.epoch,
                    window: l.record.window.as_ref().map(v1::WindowState::from),
                })
            })
            .collect();
        Ok(Response::new(v1::ExportCheckpointsReply { checkpoints }))
    }

    async fn import_checkpoints(
        &self,
        req: Request<v1::ImportCheckpointsRequest>,
    ) -> Result<Response<v1::CheckpointPlan>, Status> {
        allow(&req, Access::Write)?;
        let req = req.into_inner();
        let leases = req
            .checkpoints
            .iter()
            .map(|c| LeaseId::try_from(c.lease.as_ref()).map_err(bad))
            .collect::<Result<Vec<_>, _>>()?;
        self.known(leases.clone()).await?;
        let mut changes = Vec::with_capacity(req.checkpoints.len());
        for (lease, c) in leases.into_iter().zip(&req.checkpoints) {
            let offset = self.resolve(&lease, Target::Offset(c.checkpoint)).await?;
            let window = shardline_proto::window(c.window.as_ref()).map_err(bad)?;
            changes.push((lease, offset, window));
        }
        self.apply(changes, req.dry_run).await
    }

    async fn usage(&self, req: Request<v1::UsageRequest>) -> Result<Response<v1::UsageReply>, Status> {
        allow(&req, Access::Read)?;
        let since_ms = req.into_inner().since_ms;
        let (totals, from_ms) =
            self.leader()?.call(|reply| Command::Usage { since_ms, reply }).await.map_err(closed)?;
        Ok(Response::new(usage_reply(totals, from_ms)))
    }

    async fn health(&self, req: Request<v1::HealthRequest>) -> Result<Response<v1::HealthReply>, Status> {
        allow(&req, Access::Read)?;
        let (handle, term) = self.leading()?;
        let (workers, leases) = handle.call(Command::Counts).await.map_err(closed)?;
        Ok(Response::new(v1::HealthReply {
            status: "serving".into(),
            workers,
            leases,
            version: env!("CARGO_PKG_VERSION").into(),
            leader: self.role.address.clone(),
            term,
        }))
    }

    async fn list_subscriptions(
        &self,
        req: Request<v1::ListSubscriptionsRequest>,
    ) -> Result<Response<v1::ListSubscriptionsReply>, Status> {
        allow(&req, Access::Read)?;
        // Only the leader reads RabbitMQ; a standby's table is stale.
        self.leader()?;
        let table = self.subscriptions.lock().map_err(|_| Status::internal("subscription table poisoned"))?;
        let subscriptions = table
            .values()
            .map(|s| v1::SubscriptionInfo {
                name: s.name.clone(),
                topic: s.topic.clone(),
                handler: s.handler.clone(),
                slots: s.slots,
                min_slots: s.min_slots,
                max_concurrency: s.max_concurrency,
                depth: s.depth,
                consumers: s.consumers,
                retrying: s.retrying,
                dead_lettered: s.dead_lettered,
                unacked: s.unacked,
                drain_rate: s.drain_rate,
                read_ms_ago: s.read_at.map_or(0, |t| t.elapsed().as_millis() as u64),
                error: s.error.clone().unwrap_or_default(),
                queue_type: s.queue_type.clone(),
            })
            .collect();
        Ok(Response::new(v1::ListSubscriptionsReply { subscriptions }))
    }
}

/// A shard's checkpoint with its partition's offsets and lag (offsets
/// unknown, -1, when Kafka does not answer). Shared with the offline CLI.
pub async fn shard_checkpoint(
    offsets: Option<&crate::offsets::Offsets>,
    l: &Lease,
    now: std::time::Instant,
) -> v1::ShardCheckpoint {
    let id = &l.record.lease;
    let marks = match offsets {
        Some(o) => o.watermarks(&id.name, id.index).await,
        None => Err("no Kafka client".to_owned()),
    };
    let (earliest, latest, lag, watermark_error) = match marks {
        Ok((earliest, latest)) => {
            let position = l.record.checkpoint.unwrap_or(earliest);
            (earliest, latest, (latest - position).max(0), String::new())
        }
        Err(e) => (-1, -1, -1, e),
    };
    let window = l.record.window.as_ref().map(|w| v1::WindowSummary {
        start_ms: w.start_ms,
        end_ms: w.end_ms,
        state_bytes: w.state.as_ref().map_or(0, |s| s.len() as u64),
        closed: w.closed,
    });
    v1::ShardCheckpoint { lease: Some(lease_info(l, now)), earliest, latest, lag, watermark_error, window }
}

/// The plan of an operator change: each lease as it was and where it goes.
pub fn plan(before: Vec<crate::core::Before>, to: Vec<i64>, applied: bool) -> v1::CheckpointPlan {
    let changes = before
        .into_iter()
        .zip(to)
        .map(|(b, to)| v1::CheckpointChange {
            lease: Some((&b.lease).into()),
            owner: b.owner.unwrap_or_default(),
            epoch: b.epoch,
            from: b.checkpoint,
            to,
        })
        .collect();
    v1::CheckpointPlan { changes, applied }
}

/// Usage totals on the wire.
pub fn usage_reply(totals: Vec<(String, crate::usage::Counts)>, from_ms: i64) -> v1::UsageReply {
    let usage = totals
        .into_iter()
        .map(|(mapping, c)| v1::MappingUsage {
            mapping,
            handler: c.handler,
            batches: c.batches,
            records: c.records,
            handler_ms: c.handler_ms,
            billed_units: c.billed_units,
        })
        .collect();
    v1::UsageReply { usage, from_ms }
}

pub fn target(t: Option<v1::Target>) -> Result<Target, Status> {
    use v1::target::To;
    match t.and_then(|t| t.to) {
        Some(To::Offset(o)) => Ok(Target::Offset(o)),
        Some(To::Earliest(_)) => Ok(Target::Earliest),
        Some(To::Latest(_)) => Ok(Target::Latest),
        Some(To::TimestampMs(ms)) => Ok(Target::Timestamp(ms)),
        None => Err(Status::invalid_argument("no target; allowed: offset, earliest, latest or timestamp")),
    }
}

/// A checkpoint past the partition's high watermark, as just read from Kafka.
fn beyond_watermark(lease: &LeaseId, offset: i64, high: i64) -> Status {
    Status::invalid_argument(format!(
        "checkpoint of `{lease}` at offset {offset} is past the partition's high watermark {high}; \
         allowed: at most {high} (the next offset to be written); nothing changed"
    ))
}

/// `same`: the indexes the table has under the lease's kind and name.
fn unknown_lease(lease: &LeaseId, same: &[u32]) -> Status {
    match (same.first(), same.last()) {
        (Some(first), Some(last)) => {
            Status::not_found(format!("unknown lease `{lease}`; `{}` has {first}..={last}", lease.name))
        }
        _ => {
            Status::not_found(format!("unknown lease `{lease}`: no stream or subscription `{}`", lease.name))
        }
    }
}

impl Api {
    /// The shards of `stream` (every stream's when empty); an unknown
    /// stream is an error naming the known ones.
    async fn shards(&self, stream: &str) -> Result<Vec<Lease>, Status> {
        let name = (!stream.is_empty()).then(|| stream.to_owned());
        let shards = self
            .leader()?
            .call(|reply| Command::Leases { kind: LeaseKind::Shard, name, reply })
            .await
            .map_err(closed)?;
        if shards.is_empty() && !stream.is_empty() {
            let known: BTreeSet<&str> = self.config.streams.iter().map(|s| s.name.as_str()).collect();
            let known: Vec<&str> = known.into_iter().collect();
            return Err(Status::not_found(format!(
                "unknown stream `{stream}`; known: {}",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )));
        }
        Ok(shards)
    }

    /// NOT_FOUND naming the first of `leases` the table does not have.
    async fn known(&self, leases: Vec<LeaseId>) -> Result<(), Status> {
        let missing =
            self.leader()?.call(|reply| Command::Missing { leases, reply }).await.map_err(closed)?;
        match missing {
            Some((lease, same)) => Err(unknown_lease(&lease, &same)),
            None => Ok(()),
        }
    }

    /// A worker's checkpoints. Those past the high watermark the core last
    /// read are checked against a fresh read from Kafka (the log may have
    /// grown since) and sent once more; one still past it is refused with
    /// INVALID_ARGUMENT and changed nothing (the others in the call were
    /// applied, and a worker's retry of them is harmless).
    async fn verified(
        &self,
        worker: &str,
        entries: Vec<CheckpointCmd>,
    ) -> Result<Vec<CheckpointOutcome>, Status> {
        let call = |entries: Vec<CheckpointCmd>| async move {
            let worker = worker.to_owned();
            let handle = self.leader()?;
            handle.call(|reply| Command::Checkpoint { worker, entries, reply }).await.map_err(closed)
        };
        let mut outcomes = call(entries.clone()).await?;
        let beyond: Vec<usize> = (0..outcomes.len())
            .filter(|i| matches!(outcomes[*i], CheckpointOutcome::BeyondWatermark { .. }))
            .collect();
        if beyond.is_empty() {
            return Ok(outcomes);
        }
        let stale: Vec<(&LeaseId, i64, i64)> = beyond
            .iter()
            .filter_map(|i| match outcomes[*i] {
                CheckpointOutcome::BeyondWatermark { high } => {
                    Some((&entries[*i].lease, entries[*i].offset, high))
                }
                _ => None,
            })
            .collect();
        self.reread_watermarks(&stale).await?;
        let again = call(beyond.iter().map(|i| entries[*i].clone()).collect()).await?;
        for (i, outcome) in beyond.into_iter().zip(again) {
            if let CheckpointOutcome::BeyondWatermark { high } = outcome {
                return Err(beyond_watermark(&entries[i].lease, entries[i].offset, high));
            }
            outcomes[i] = outcome;
        }
        Ok(outcomes)
    }

    /// Reads the high watermarks of `(lease, offset, last known)` from
    /// Kafka and gives them to the core. A partition that cannot be read
    /// is UNAVAILABLE (retry): the offset is past what was last read, and
    /// only a fresh read may let it through.
    async fn reread_watermarks(&self, stale: &[(&LeaseId, i64, i64)]) -> Result<(), Status> {
        let offsets = self.offsets.as_ref();
        let reads = stale.iter().map(|(lease, offset, known)| async move {
            let read = match offsets {
                Some(o) => o.watermarks(&lease.name, lease.index).await,
                None => Err("no Kafka client".to_owned()),
            };
            read.map(|(_, high)| ((*lease).clone(), high)).map_err(|e| {
                Status::unavailable(format!(
                    "cannot read the high watermark of `{lease}` to check checkpoint {offset} \
                     (last read: {known}): {e}; retry"
                ))
            })
        });
        let highs = futures::future::join_all(reads).await.into_iter().collect::<Result<Vec<_>, _>>()?;
        self.leader()?.send(Command::Watermarks(highs)).await.map_err(closed)
    }

    async fn resolve(&self, lease: &LeaseId, target: Target) -> Result<i64, Status> {
        let offsets = self.offsets.as_ref().ok_or_else(|| Status::unavailable("no Kafka client"))?;
        crate::offsets::resolve(offsets, lease, target).await.map_err(|e| match e {
            ResolveError::Invalid(m) => Status::out_of_range(m),
            ResolveError::Unavailable(m) => Status::unavailable(m),
        })
    }

    async fn apply(
        &self,
        changes: Vec<crate::core::Change>,
        dry_run: bool,
    ) -> Result<Response<v1::CheckpointPlan>, Status> {
        let to: Vec<i64> = changes.iter().map(|(_, o, _)| *o).collect();
        let result = self
            .leader()?
            .call(|reply| Command::SetCheckpoints { changes, dry_run, reply })
            .await
            .map_err(closed)?;
        let before = result.map_err(|e| match e {
            CoreError::UnknownLease(_) => Status::not_found(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        })?;
        Ok(Response::new(plan(before, to, !dry_run)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A standby sends clients on: UNAVAILABLE (which clients take as "try
    /// another") with the leader's URL in the header they follow, and none
    /// while no leader is known (they try their next URL).
    #[test]
    fn a_standby_answers_unavailable_naming_the_leader() {
        let status = standby(Some("http://10.0.0.7:7400"));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(shardline_proto::endpoints::leader_hint(&status), Some("http://10.0.0.7:7400"));
        assert!(status.message().contains("http://10.0.0.7:7400"), "{}", status.message());
        let unknown = standby(None);
        assert_eq!(unknown.code(), tonic::Code::Unavailable);
        assert_eq!(shardline_proto::endpoints::leader_hint(&unknown), None);
    }
}
