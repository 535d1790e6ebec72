//! Where the CLI's answers come from: the coordinator's admin API (online)
//! or its sled store opened directly (offline). Both speak the admin API's
//! messages, so printing does not care which one answered.
//!
//! Offline, the store is loaded into the coordinator's own pure core and
//! changes go through the same checks (`Core::set_checkpoints`: all leases
//! valid, or nothing written) and the same offset resolution as online.

use std::path::Path;
use std::time::Instant;

use shardline_coordinator::api::{lease_info, plan, shard_checkpoint, usage_reply};
use shardline_coordinator::core::{Core, CoreConfig, CoreError, LeaseRecord};
use shardline_coordinator::offsets::{Offsets, ResolveError, Target, resolve};
use shardline_coordinator::store::{LeaseStore, SledStore, StoreError};
use shardline_coordinator::usage::Meter;
use shardline_proto::v1::{self, admin_api_client::AdminApiClient};
use shardline_proto::{LeaseId, LeaseKind};
use tonic::transport::Channel;

use crate::{Failure, Result};

pub enum Backend {
    Online(Online),
    Offline(Box<Offline>),
}

pub struct Online {
    client: AdminApiClient<Channel>,
    token: Option<String>,
}

pub struct Offline {
    store: SledStore,
    core: Core,
    offsets: Option<Offsets>,
    dir: String,
}

fn store_error(e: StoreError) -> Failure {
    Failure::Runtime(match e {
        StoreError::Locked(_) => format!("{e}; stop it, or drop --data-dir to go through it"),
        other => other.to_string(),
    })
}

fn to_wire(target: Target) -> v1::Target {
    use v1::target::To;
    let to = match target {
        Target::Offset(o) => To::Offset(o),
        Target::Earliest => To::Earliest(true),
        Target::Latest => To::Latest(true),
        Target::Timestamp(ms) => To::TimestampMs(ms),
    };
    v1::Target { to: Some(to) }
}

impl Backend {
    pub async fn online(url: &str, token: Option<String>) -> Result<Self> {
        let client = AdminApiClient::connect(url.to_owned()).await.map_err(|e| {
            Failure::Runtime(format!(
                "cannot reach the coordinator at {url}: {e} (is it running? see --coordinator, or --data-dir for a stopped one)"
            ))
        })?;
        Ok(Self::Online(Online { client, token }))
    }

    pub fn offline(dir: &Path, brokers: &str) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Failure::Usage(format!("--data-dir {}: no such directory", dir.display())));
        }
        let store = SledStore::open_existing(dir).map_err(store_error)?;
        let records: Vec<LeaseRecord> = store.load().map_err(store_error)?;
        let core = Core::restore(CoreConfig::default(), records, Instant::now());
        // Offsets are optional offline: listings show "-" without them.
        let offsets = Offsets::new(brokers).ok();
        Ok(Self::Offline(Box::new(Offline { store, core, offsets, dir: dir.display().to_string() })))
    }

    fn offline_only(&self, what: &str) -> Failure {
        let dir = match self {
            Self::Offline(o) => o.dir.clone(),
            Self::Online(_) => String::new(),
        };
        Failure::Usage(format!(
            "`{what}` needs a running coordinator; --data-dir {dir} holds leases and checkpoints only"
        ))
    }

    pub async fn workers(&mut self) -> Result<v1::ListWorkersReply> {
        match self {
            Self::Online(o) => {
                Ok(o.client.list_workers(o.req(v1::ListWorkersRequest {})).await?.into_inner())
            }
            Self::Offline(_) => Err(self.offline_only("workers")),
        }
    }

    pub async fn subscriptions(&mut self) -> Result<Vec<v1::SubscriptionInfo>> {
        match self {
            Self::Online(o) => {
                let req = o.req(v1::ListSubscriptionsRequest {});
                Ok(o.client.list_subscriptions(req).await?.into_inner().subscriptions)
            }
            Self::Offline(_) => Err(self.offline_only("subscriptions")),
        }
    }

    pub async fn health(&mut self) -> Result<v1::HealthReply> {
        match self {
            Self::Online(o) => Ok(o.client.health(o.req(v1::HealthRequest {})).await?.into_inner()),
            Self::Offline(_) => Err(self.offline_only("health")),
        }
    }

    pub async fn leases(&mut self) -> Result<Vec<v1::LeaseInfo>> {
        match self {
            Self::Online(o) => Ok(o
                .client
                .list_leases(o.req(v1::ListLeasesRequest { name: String::new() }))
                .await?
                .into_inner()
                .leases),
            Self::Offline(o) => {
                let now = Instant::now();
                Ok(o.core.leases().map(|l| lease_info(l, now)).collect())
            }
        }
    }

    pub async fn checkpoints(&mut self, stream: &str) -> Result<Vec<v1::ShardCheckpoint>> {
        match self {
            Self::Online(o) => {
                let req = o.req(v1::ListCheckpointsRequest { stream: stream.to_owned() });
                Ok(o.client.list_checkpoints(req).await?.into_inner().shards)
            }
            Self::Offline(o) => {
                let now = Instant::now();
                let shards: Vec<_> = o
                    .core
                    .leases()
                    .filter(|l| l.record.lease.kind == LeaseKind::Shard)
                    .filter(|l| stream.is_empty() || l.record.lease.name == stream)
                    .cloned()
                    .collect();
                if shards.is_empty() && !stream.is_empty() {
                    return Err(Failure::Usage(format!(
                        "unknown stream `{stream}`: the store has no shards of it"
                    )));
                }
                let lookups = shards.iter().map(|l| shard_checkpoint(o.offsets.as_ref(), l, now));
                Ok(futures::future::join_all(lookups).await)
            }
        }
    }

    pub async fn set(
        &mut self,
        lease: &LeaseId,
        target: Target,
        dry_run: bool,
    ) -> Result<v1::CheckpointPlan> {
        match self {
            Self::Online(o) => {
                let req = o.req(v1::SetCheckpointRequest {
                    lease: Some(lease.into()),
                    target: Some(to_wire(target)),
                    dry_run,
                });
                Ok(o.client.set_checkpoint(req).await?.into_inner())
            }
            Self::Offline(o) => {
                if o.core.lease(lease).is_none() {
                    return Err(Failure::Usage(format!("unknown lease `{lease}`")));
                }
                let offset = o.resolve(lease, target).await?;
                o.apply(vec![(lease.clone(), offset)], dry_run).await
            }
        }
    }

    pub async fn reset(&mut self, stream: &str, target: Target, dry_run: bool) -> Result<v1::CheckpointPlan> {
        match self {
            Self::Online(o) => {
                let req = o.req(v1::ResetCheckpointsRequest {
                    stream: stream.to_owned(),
                    target: Some(to_wire(target)),
                    dry_run,
                });
                Ok(o.client.reset_checkpoints(req).await?.into_inner())
            }
            Self::Offline(o) => {
                let shards: Vec<LeaseId> = o
                    .core
                    .leases()
                    .map(|l| l.record.lease.clone())
                    .filter(|id| id.kind == LeaseKind::Shard && id.name == stream)
                    .collect();
                if shards.is_empty() {
                    return Err(Failure::Usage(format!(
                        "unknown stream `{stream}`: the store has no shards of it"
                    )));
                }
                let mut changes = Vec::with_capacity(shards.len());
                for lease in shards {
                    let offset = o.resolve(&lease, target).await?;
                    changes.push((lease, offset));
                }
                o.apply(changes, dry_run).await
            }
        }
    }

    pub async fn export(&mut self) -> Result<Vec<v1::ExportedCheckpoint>> {
        match self {
            Self::Online(o) => Ok(o
                .client
                .export_checkpoints(o.req(v1::ExportCheckpointsRequest {}))
                .await?
                .into_inner()
                .checkpoints),
            Self::Offline(o) => Ok(o
                .core
                .leases()
                .filter_map(|l| {
                    Some(v1::ExportedCheckpoint {
                        lease: Some((&l.record.lease).into()),
                        checkpoint: l.record.checkpoint?,
                        epoch: l.record.epoch,
                    })
                })
                .collect()),
        }
    }

    pub async fn import(
        &mut self,
        entries: Vec<(LeaseId, i64)>,
        dry_run: bool,
    ) -> Result<v1::CheckpointPlan> {
        match self {
            Self::Online(o) => {
                let checkpoints = entries
                    .iter()
                    .map(|(l, c)| v1::ExportedCheckpoint { lease: Some(l.into()), checkpoint: *c, epoch: 0 })
                    .collect();
                let req = o.req(v1::ImportCheckpointsRequest { checkpoints, dry_run });
                Ok(o.client.import_checkpoints(req).await?.into_inner())
            }
            Self::Offline(o) => {
                let mut changes = Vec::with_capacity(entries.len());
                for (lease, offset) in entries {
                    if o.core.lease(&lease).is_none() {
                        return Err(Failure::Usage(format!("unknown lease `{lease}`: not in the store")));
                    }
                    let offset = o.resolve(&lease, Target::Offset(offset)).await?;
                    changes.push((lease, offset));
                }
                o.apply(changes, dry_run).await
            }
        }
    }

    pub async fn usage(&mut self, since_ms: i64) -> Result<v1::UsageReply> {
        match self {
            Self::Online(o) => Ok(o.client.usage(o.req(v1::UsageRequest { since_ms })).await?.into_inner()),
            Self::Offline(o) => {
                let meter = Meter::restore(o.store.load_usage().map_err(store_error)?);
                let (totals, from_ms) = meter.totals(since_ms);
                Ok(usage_reply(totals, from_ms))
            }
        }
    }
}

impl Online {
    fn req<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }
}

impl Offline {
    async fn resolve(&self, lease: &LeaseId, target: Target) -> Result<i64> {
        let offsets = self.offsets.as_ref().ok_or_else(|| {
            Failure::Runtime("no Kafka client to check offsets with (see --kafka-brokers)".into())
        })?;
        resolve(offsets, lease, target).await.map_err(|e| match e {
            ResolveError::Invalid(m) => Failure::Usage(m),
            ResolveError::Unavailable(m) => Failure::Runtime(format!("{m} (see --kafka-brokers)")),
        })
    }

    /// Checks every change, then (unless a dry run) writes and flushes.
    async fn apply(&mut self, changes: Vec<(LeaseId, i64)>, dry_run: bool) -> Result<v1::CheckpointPlan> {
        let core_error = |e: CoreError| match e {
            CoreError::UnknownWorker(_) => Failure::Runtime(e.to_string()),
            _ => Failure::Usage(e.to_string()),
        };
        let before = if dry_run {
            self.core.check_checkpoints(&changes).map_err(core_error)?
        } else {
            let before = self.core.set_checkpoints(Instant::now(), &changes).map_err(core_error)?;
            for record in self.core.take_dirty() {
                self.store.put(&record).map_err(store_error)?;
            }
            self.store.flush().await.map_err(store_error)?;
            before
        };
        let to = changes.into_iter().map(|(_, to)| to).collect();
        Ok(plan(before, to, !dry_run))
    }
}
