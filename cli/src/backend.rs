//! Where the CLI's answers come from: the coordinator's admin API (online)
//! or its sled store opened directly (offline). Both speak the admin API's
//! messages, so printing does not care which one answered.
//!
//! Offline, the store is loaded into the coordinator's own pure core and
//! changes go through the same checks (`Core::set_checkpoints`: all leases
//! valid, or nothing written) and the same offset resolution as online.
//!
//! Online, `--coordinator` may list several coordinators (one leads, the
//! others stand by). Each call goes to the current one; when it fails in a
//! way `should_try_another` accepts (a standby's `UNAVAILABLE`, a dead or
//! frozen coordinator), the same request goes to the leader the standby
//! named, or else to the next URL, until each URL (and each leader named)
//! was tried once.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use shardline_coordinator::api::{lease_info, plan, shard_checkpoint, usage_reply};
use shardline_coordinator::config::KafkaSettings;
use shardline_coordinator::core::{Core, CoreConfig, CoreError, LeaseRecord};
use shardline_coordinator::offsets::{Offsets, ResolveError, Target, resolve};
use shardline_coordinator::store::{LeaseStore, SledStore, StoreError};
use shardline_coordinator::usage::Meter;
use shardline_proto::endpoints::{describe, leader_hint, should_try_another};
use shardline_proto::v1::{self, admin_api_client::AdminApiClient};
use shardline_proto::{Credentials, Endpoints, EndpointsError, LeaseId, LeaseKind, WindowState};
use tonic::transport::Channel;

use crate::{Failure, Result};

pub enum Backend {
    Online(Online),
    Offline(Box<Offline>),
}

pub struct Online {
    endpoints: Endpoints,
    /// A lazy channel per coordinator called so far.
    channels: BTreeMap<String, Channel>,
    credentials: Credentials,
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
    /// Nothing is dialled until the first call; a bad `list` is a usage error.
    pub fn online(list: &str, credentials: Credentials) -> Result<Self> {
        let endpoints = Endpoints::parse(list).map_err(|e| {
            Failure::Usage(format!(
                "--coordinator `{list}`: entry `{}` {}; allowed: {}",
                e.entry,
                e.problem,
                EndpointsError::ALLOWED
            ))
        })?;
        Ok(Self::Online(Online { endpoints, channels: BTreeMap::new(), credentials }))
    }

    pub fn offline(dir: &Path, brokers: &str, kafka: &KafkaSettings) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Failure::Usage(format!("--data-dir {}: no such directory", dir.display())));
        }
        let store = SledStore::open_existing(dir).map_err(store_error)?;
        let records: Vec<LeaseRecord> = store.load().map_err(store_error)?;
        let core = Core::restore(CoreConfig::default(), records, Instant::now());
        // Offsets are optional offline: listings show "-" without them.
        let offsets = Offsets::new(brokers, kafka).ok();
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
                o.call(v1::ListWorkersRequest {}, |mut c, r| async move { c.list_workers(r).await }).await
            }
            Self::Offline(_) => Err(self.offline_only("workers")),
        }
    }

    pub async fn subscriptions(&mut self) -> Result<Vec<v1::SubscriptionInfo>> {
        match self {
            Self::Online(o) => {
                let req = v1::ListSubscriptionsRequest {};
                Ok(o.call(req, |mut c, r| async move { c.list_subscriptions(r).await }).await?.subscriptions)
            }
            Self::Offline(_) => Err(self.offline_only("subscriptions")),
        }
    }

    pub async fn health(&mut self) -> Result<v1::HealthReply> {
        match self {
            Self::Online(o) => {
                o.call(v1::HealthRequest {}, |mut c, r| async move { c.health(r).await }).await
            }
            Self::Offline(_) => Err(self.offline_only("health")),
        }
    }

    pub async fn leases(&mut self) -> Result<Vec<v1::LeaseInfo>> {
        match self {
            Self::Online(o) => {
                let req = v1::ListLeasesRequest { name: String::new() };
                Ok(o.call(req, |mut c, r| async move { c.list_leases(r).await }).await?.leases)
            }
            Self::Offline(o) => {
                let now = Instant::now();
                Ok(o.core.leases().map(|l| lease_info(l, now)).collect())
            }
        }
    }

    pub async fn checkpoints(&mut self, stream: &str) -> Result<Vec<v1::ShardCheckpoint>> {
        match self {
            Self::Online(o) => {
                let req = v1::ListCheckpointsRequest { stream: stream.to_owned() };
                Ok(o.call(req, |mut c, r| async move { c.list_checkpoints(r).await }).await?.shards)
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
                let req = v1::SetCheckpointRequest {
                    lease: Some(lease.into()),
                    target: Some(to_wire(target)),
                    dry_run,
                };
                o.call(req, |mut c, r| async move { c.set_checkpoint(r).await }).await
            }
            Self::Offline(o) => {
                if o.core.lease(lease).is_none() {
                    return Err(Failure::Usage(format!("unknown lease `{lease}`")));
                }
                let offset = o.resolve(lease, target).await?;
                o.apply(vec![(lease.clone(), offset, None)], dry_run).await
            }
        }
    }

    pub async fn reset(&mut self, stream: &str, target: Target, dry_run: bool) -> Result<v1::CheckpointPlan> {
        match self {
            Self::Online(o) => {
                let req = v1::ResetCheckpointsRequest {
                    stream: stream.to_owned(),
                    target: Some(to_wire(target)),
                    dry_run,
                };
                o.call(req, |mut c, r| async move { c.reset_checkpoints(r).await }).await
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
                    changes.push((lease, offset, None));
                }
                o.apply(changes, dry_run).await
            }
        }
    }

    pub async fn export(&mut self) -> Result<Vec<v1::ExportedCheckpoint>> {
        match self {
            Self::Online(o) => {
                let req = v1::ExportCheckpointsRequest {};
                Ok(o.call(req, |mut c, r| async move { c.export_checkpoints(r).await }).await?.checkpoints)
            }
            Self::Offline(o) => Ok(o
                .core
                .leases()
                .filter_map(|l| {
                    Some(v1::ExportedCheckpoint {
                        lease: Some((&l.record.lease).into()),
                        checkpoint: l.record.checkpoint?,
                        epoch: l.record.epoch,
                        window: l.record.window.as_ref().map(v1::WindowState::from),
                    })
                })
                .collect()),
        }
    }

    pub async fn import(
        &mut self,
        entries: Vec<(LeaseId, i64, Option<WindowState>)>,
        dry_run: bool,
    ) -> Result<v1::CheckpointPlan> {
        match self {
            Self::Online(o) => {
                let checkpoints = entries
                    .iter()
                    .map(|(l, c, w)| v1::ExportedCheckpoint {
                        lease: Some(l.into()),
                        checkpoint: *c,
                        epoch: 0,
                        window: w.as_ref().map(v1::WindowState::from),
                    })
                    .collect();
                let req = v1::ImportCheckpointsRequest { checkpoints, dry_run };
                o.call(req, |mut c, r| async move { c.import_checkpoints(r).await }).await
            }
            Self::Offline(o) => {
                let mut changes = Vec::with_capacity(entries.len());
                for (lease, offset, window) in entries {
                    if o.core.lease(&lease).is_none() {
                        return Err(Failure::Usage(format!("unknown lease `{lease}`: not in the store")));
                    }
                    let offset = o.resolve(&lease, Target::Offset(offset)).await?;
                    changes.push((lease, offset, window));
                }
                o.apply(changes, dry_run).await
            }
        }
    }

    pub async fn usage(&mut self, since_ms: i64) -> Result<v1::UsageReply> {
        match self {
            Self::Online(o) => {
                o.call(v1::UsageRequest { since_ms }, |mut c, r| async move { c.usage(r).await }).await
            }
            Self::Offline(o) => {
                let meter = Meter::restore(o.store.load_usage().map_err(store_error)?);
                let (totals, from_ms) = meter.totals(since_ms);
                Ok(usage_reply(totals, from_ms))
            }
        }
    }
}

/// What a failed call to `url` is said as.
struct Tried {
    url: String,
    error: String,
}

impl Online {
    /// Calls `rpc` with `message` on the current coordinator; on an error
    /// that another coordinator might not give, on the leader it named or
    /// the next URL, until each was tried once. Then a runtime failure
    /// naming every URL tried and its error.
    async fn call<M, R, F, Fut>(&mut self, message: M, rpc: F) -> Result<R>
    where
        M: Clone,
        F: Fn(AdminApiClient<Channel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let mut tried: Vec<Tried> = Vec::new();
        loop {
            let next = self.endpoints.next_untried(|u| tried.iter().any(|t| t.url == u));
            let Some(url) = next.map(str::to_owned) else { break };
            let client = match self.client(&url) {
                Ok(client) => client,
                Err(error) => {
                    tried.push(Tried { url, error });
                    continue;
                }
            };
            match rpc(client, self.req(message.clone())).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status) => {
                    // A connection TLS broke on one side is a failure of this
                    // URL, whatever code the transport gave it.
                    let described = describe(&status);
                    let hint = shardline_proto::credentials::tls_hint(&url, &status);
                    if hint.is_none() && !should_try_another(status.code()) {
                        return Err(status.into());
                    }
                    self.endpoints.failed(&url, leader_hint(&status));
                    let error = hint.map_or_else(|| described.clone(), |h| format!("{described}; {h}"));
                    tried.push(Tried { url, error });
                }
            }
        }
        let each: Vec<String> = tried.iter().map(|t| format!("{} ({})", t.url, t.error)).collect();
        Err(Failure::Runtime(format!(
            "cannot reach the coordinator: tried {} (is it running? see --coordinator, or --data-dir for a stopped one)",
            each.join(", ")
        )))
    }

    /// A client on `url`'s lazy channel, made on first use.
    fn client(&mut self, url: &str) -> Result<AdminApiClient<Channel>, String> {
        if let Some(channel) = self.channels.get(url) {
            return Ok(AdminApiClient::new(channel.clone()));
        }
        // A frozen coordinator must not hold the command forever: after the
        // timeout the next one is tried.
        let channel = self.credentials.channel(url, Duration::from_secs(3), Duration::from_secs(30))?;
        self.channels.insert(url.to_owned(), channel.clone());
        Ok(AdminApiClient::new(channel))
    }

    fn req<T>(&self, message: T) -> tonic::Request<T> {
        self.credentials.request(message)
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
    async fn apply(
        &mut self,
        changes: Vec<shardline_coordinator::core::Change>,
        dry_run: bool,
    ) -> Result<v1::CheckpointPlan> {
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
        let to = changes.into_iter().map(|(_, to, _)| to).collect();
        Ok(plan(before, to, !dry_run))
    }
}

#[cfg(test)]
mod tests {
    //! `Online::call` against tiny AdminApi servers on 127.0.0.1:0 that
    //! play a leader, a standby (UNAVAILABLE, naming the leader in
    //! `shardline-leader` when it knows one) or a leader refusing a request.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use shardline_proto::LEADER_HEADER;
    use shardline_proto::v1::admin_api_server::{AdminApi, AdminApiServer};
    use tonic::{Code, Request, Response, Status};

    use super::*;

    /// One fake coordinator: what it answers every call with.
    #[derive(Clone)]
    enum Role {
        /// Serves: health says `serving by NAME`.
        Leader(&'static str),
        /// UNAVAILABLE, naming this leader if any.
        Standby(Option<String>),
        /// A serving leader's refusal with this code.
        Refuses(Code),
    }

    #[derive(Clone)]
    struct Fake {
        role: Role,
        calls: Arc<AtomicUsize>,
    }

    impl Fake {
        fn new(role: Role) -> Self {
            Self { role, calls: Arc::default() }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        /// The answer to any call: `Ok(name)` from a leader.
        fn serve(&self) -> Result<&'static str, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match &self.role {
                Role::Leader(name) => Ok(name),
                Role::Refuses(code) => Err(Status::new(*code, "refused by the fake")),
                Role::Standby(None) => {
                    Err(Status::unavailable("this coordinator is a standby; no leader is known yet"))
                }
                Role::Standby(Some(leader)) => {
                    let mut status =
                        Status::unavailable(format!("this coordinator is a standby; the leader is {leader}"));
                    let value = leader.parse().map_err(|_| Status::internal("bad leader URL in the fake"))?;
                    status.metadata_mut().insert(LEADER_HEADER, value);
                    Err(status)
                }
            }
        }
    }

    /// The AdminApi impl: health names the leader; every other call
    /// answers its default reply.
    macro_rules! fake_admin_api {
        ($($rpc:ident($request:ty) -> $reply:ty;)*) => {
            #[tonic::async_trait]
            impl AdminApi for Fake {
                async fn health(&self, _: Request<v1::HealthRequest>) -> Result<Response<v1::HealthReply>, Status> {
                    let name = self.serve()?;
                    Ok(Response::new(v1::HealthReply { status: format!("serving by {name}"), ..Default::default() }))
                }
                $(
                    async fn $rpc(&self, _: Request<$request>) -> Result<Response<$reply>, Status> {
                        self.serve()?;
                        Ok(Response::new(<$reply>::default()))
                    }
                )*
            }
        };
    }

    fake_admin_api! {
        list_workers(v1::ListWorkersRequest) -> v1::ListWorkersReply;
        list_leases(v1::ListLeasesRequest) -> v1::ListLeasesReply;
        get_checkpoint(v1::GetCheckpointRequest) -> v1::LeaseInfo;
        set_checkpoint(v1::SetCheckpointRequest) -> v1::CheckpointPlan;
        reset_checkpoints(v1::ResetCheckpointsRequest) -> v1::CheckpointPlan;
        list_checkpoints(v1::ListCheckpointsRequest) -> v1::ListCheckpointsReply;
        export_checkpoints(v1::ExportCheckpointsRequest) -> v1::ExportCheckpointsReply;
        import_checkpoints(v1::ImportCheckpointsRequest) -> v1::CheckpointPlan;
        usage(v1::UsageRequest) -> v1::UsageReply;
        list_subscriptions(v1::ListSubscriptionsRequest) -> v1::ListSubscriptionsReply;
    }

    /// Serves `fake` on a port of the OS's choosing; its URL.
    async fn serve(fake: &Fake) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = tonic::transport::Server::builder()
            .add_service(AdminApiServer::new(fake.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        tokio::spawn(async move {
            if let Err(e) = server.await {
                panic!("fake coordinator at {addr}: {e}");
            }
        });
        format!("http://{addr}")
    }

    /// A dead coordinator: a port nothing listens on.
    const DEAD: &str = "http://127.0.0.1:1";

    async fn health(list: &str) -> Result<v1::HealthReply> {
        let mut backend = Backend::online(list, Credentials::default())?;
        tokio::time::timeout(Duration::from_secs(20), backend.health())
            .await
            .unwrap_or_else(|_| panic!("`{list}`: no answer within 20 s"))
    }

    fn runtime_failure(r: Result<v1::HealthReply>) -> String {
        match r {
            Err(Failure::Runtime(m)) => m,
            Ok(reply) => panic!("served: {reply:?}"),
            Err(Failure::Usage(m)) => panic!("a usage error: {m}"),
        }
    }

    #[tokio::test]
    async fn a_dead_url_then_a_standby_lead_to_the_leader_it_names() {
        let leader = Fake::new(Role::Leader("L"));
        let leader_url = serve(&leader).await;
        let standby = Fake::new(Role::Standby(Some(leader_url.clone())));
        let standby_url = serve(&standby).await;
        // The leader is not even listed: the standby's pointer is enough.
        let reply = health(&format!("{DEAD},{standby_url}")).await.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(reply.status, "serving by L");
        assert_eq!((standby.calls(), leader.calls()), (1, 1));
    }

    #[tokio::test]
    async fn the_first_serving_url_answers_and_no_other_is_called() {
        let (a, b) = (Fake::new(Role::Leader("A")), Fake::new(Role::Leader("B")));
        let (a_url, b_url) = (serve(&a).await, serve(&b).await);
        let reply = health(&format!("{a_url},{b_url}")).await.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(reply.status, "serving by A");
        assert_eq!(b.calls(), 0);
    }

    #[tokio::test]
    async fn every_url_and_every_leader_named_is_tried_once_then_each_is_named() {
        // A standby knowing no leader, and one naming the dead URL, which
        // was tried already: the last URL is still tried.
        let lost = Fake::new(Role::Standby(None));
        let pointing = Fake::new(Role::Standby(Some(DEAD.into())));
        let last = Fake::new(Role::Standby(Some("http://127.0.0.1:2".into())));
        let (lost_url, pointing_url, last_url) =
            (serve(&lost).await, serve(&pointing).await, serve(&last).await);
        let message = runtime_failure(health(&format!("{DEAD},{lost_url},{pointing_url},{last_url}")).await);
        for url in [DEAD, &lost_url, &pointing_url, &last_url, "http://127.0.0.1:2"] {
            assert_eq!(message.matches(&format!("{url} (")).count(), 1, "{url} named once in: {message}");
        }
        assert!(message.contains("cannot reach the coordinator"), "{message}");
        assert!(message.contains("no leader is known yet"), "each URL's error is said: {message}");
        assert!(message.contains("Connection refused"), "{message}");
        assert_eq!((lost.calls(), pointing.calls(), last.calls()), (1, 1, 1));
    }

    #[tokio::test]
    async fn a_serving_coordinators_refusal_is_the_answer() {
        let refusing = Fake::new(Role::Refuses(Code::InvalidArgument));
        let other = Fake::new(Role::Leader("B"));
        let (refusing_url, other_url) = (serve(&refusing).await, serve(&other).await);
        match health(&format!("{refusing_url},{other_url}")).await {
            Err(Failure::Usage(m)) => assert_eq!(m, "refused by the fake"),
            other => panic!("want a usage error, got {other:?}"),
        }
        let denied = Fake::new(Role::Refuses(Code::Unauthenticated));
        let denied_url = serve(&denied).await;
        let message = runtime_failure(health(&format!("{denied_url},{other_url}")).await);
        assert!(message.contains("--token"), "{message}");
        assert_eq!(other.calls(), 0, "a refusal does not move on");
    }

    #[test]
    fn a_bad_list_is_a_usage_error_naming_the_entry() {
        for (list, entry) in [("ftp://x", "ftp://x"), ("http://a:1, b:2", "b:2"), ("http://a:1,", "")] {
            match Backend::online(list, Credentials::default()) {
                Err(Failure::Usage(m)) => {
                    assert!(m.contains(&format!("entry `{entry}`")), "{m}");
                    assert!(m.contains("allowed: a comma-separated list"), "{m}");
                }
                Err(Failure::Runtime(m)) => panic!("`{list}`: a runtime failure: {m}"),
                Ok(_) => panic!("`{list}` was accepted"),
            }
        }
    }
}
