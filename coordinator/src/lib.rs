//! shardline's coordinator: it owns the lease table and decides which worker
//! processes which shard or queue slot. It never runs handler code and never
//! sees a record: only registrations, heartbeats and checkpoints.
//!
//! Layers, bottom up: [`core`] (pure lease table and assignment) →
//! [`store`] (durable records: sled, or PostgreSQL shared with standbys) →
//! [`service`] (the IO loop, group commit) → [`api`] (gRPC edge) →
//! [`serve`] (wiring; with PostgreSQL, [`election`] decides which
//! coordinator runs the loop, and [`role`] tells the API). [`discovery`]
//! feeds new partitions in; [`amqp`] declares RabbitMQ topology and sets
//! queue slots with [`scale`]; [`config`] is checked before anything starts.

pub mod amqp;
pub mod api;
pub mod auth;
pub mod config;
pub mod core;
pub mod discovery;
pub mod election;
pub mod group_offsets;
pub mod metrics;
pub mod offsets;
pub mod role;
pub mod scale;
pub mod service;
pub mod store;
pub mod usage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shardline_proto::v1::{admin_api_server::AdminApiServer, worker_api_server::WorkerApiServer};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Store};
use crate::election::{Campaign, Election};
use crate::role::Role;
use crate::service::Service;
use crate::store::{LeaseStore, PgStore, Postgres, SledStore, StoreError};

/// Why the coordinator could not start or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store is locked, foreign, newer or failing: fix it, then restart.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address is taken or not ours; not worth retrying blindly.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Metrics(String),
    /// A secret or TLS file that was fine at load cannot be used now.
    #[error("{0}")]
    Security(String),
    /// The store failed while serving (DESIGN.md rule 7): the coordinator
    /// stopped rather than answer without durability; a restart recovers
    /// from what the store made durable.
    #[error(
        "the lease store failed, so the coordinator stopped (restart it to recover from the durable state): {0}"
    )]
    StoreFailed(StoreError),
    /// The service loop ended while the server still ran, without an error.
    #[error("the service loop stopped unexpectedly")]
    LoopEnded,
}

/// How long connections may take to close after the loop died, before the
/// server stops waiting for them: a client that never reads its GOAWAY
/// must not keep a coordinator without a store alive.
const FATAL_GRACE: Duration = Duration::from_secs(2);

/// The opened store, before serving: a sled directory (this process alone
/// leads) or a PostgreSQL database (elections decide).
enum Backend {
    Sled(SledStore),
    Postgres(Box<Postgres>),
}

/// Runs a coordinator until `shutdown` fires: opens the store, serves
/// gRPC, and runs the lease table: at once with sled; with PostgreSQL
/// whenever this coordinator wins the election (a standby answers every
/// request with the leader's URL). `on_ready` gets the bound address
/// (useful with port 0).
///
/// With sled, if the service loop ends first (a store error), the server is
/// shut down too and the error returned: a coordinator that can no longer
/// make anything durable must not keep answering (UNAVAILABLE forever), but
/// exit so that its supervisor restarts it on the durable state. With
/// PostgreSQL the same failure makes it step down and stand by.
pub async fn serve(
    config: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), Error> {
    let config = Arc::new(config);
    let backend = match &config.store {
        Store::Sled => Backend::Sled(SledStore::open(&config.data_dir)?),
        Store::Postgres(url) => {
            let pg = Postgres::new(url, config.leadership_timeout)?;
            pg.migrate().await?;
            Backend::Postgres(Box::new(pg))
        }
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| Error::Bind { addr: config.listen, source })?;
    let role =
        Role::new(config.advertise_url.clone().unwrap_or_else(|| advertise(addr, config.tls.is_some())));
    // The HTTP endpoint outlives the gRPC server by nothing: both stop here.
    let http_stop = CancellationToken::new();
    let _http_guard = http_stop.clone().drop_guard();
    if let Some(metrics_addr) = config.metrics_listen {
        metrics::install(metrics_addr, role.clone(), http_stop.clone()).await.map_err(Error::Metrics)?;
    }

    // What runs the lease table stops on this token, after the API closed.
    let closing = CancellationToken::new();
    let subscriptions = amqp::StatusTable::default();
    let table = Table { config: config.clone(), role: role.clone(), subscriptions: subscriptions.clone() };
    let table_task = tokio::spawn({
        let closing = closing.clone();
        async move {
            match backend {
                Backend::Sled(store) => table.lead_alone(store, closing).await,
                Backend::Postgres(pg) => table.elect(*pg, closing).await,
            }
        }
    });

    let api = api::Api::new(role.clone(), config.clone(), subscriptions);
    let tokens = config.tokens().map_err(|e| Error::Security(e.to_string()))?;
    let mutual = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    let auth = auth::Auth::new(&tokens, mutual);
    tracing::info!(%addr, store = ?config.store, streams = config.streams.len(), subscriptions = config.subscriptions.len(), "coordinator serving");
    on_ready(addr);
    let (stop, stopped) = (shutdown.clone(), role.clone());
    let server_stop = async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = stopped.stopped() => {}
        }
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(server_tls(tls)?)?;
    }
    let server = builder
        .add_service(WorkerApiServer::with_interceptor(api.clone(), auth.requiring(auth::Access::Work)))
        .add_service(AdminApiServer::with_interceptor(api, auth))
        .serve_with_incoming_shutdown(
            // Nagle plus delayed ACKs would add ~40 ms to small replies.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            server_stop,
        );
    let died = role.clone();
    let served = tokio::select! {
        served = server => served,
        () = async move {
            died.stopped().await;
            tokio::time::sleep(FATAL_GRACE).await;
        } => {
            tracing::warn!(grace = ?FATAL_GRACE, "connections still open after the store failed; closing them");
            Ok(())
        }
    };
    // The API is closed: let the table make everything durable, then stop.
    closing.cancel();
    match table_task.await.map_err(StoreError::Task) {
        Ok(Err(e)) | Err(e) => return Err(Error::StoreFailed(e)),
        Ok(Ok(())) if !shutdown.is_cancelled() => return Err(Error::LoopEnded),
        Ok(Ok(())) => {}
    }
    served?;
    Ok(())
}

/// The listener's TLS from the configured PEM files; with `client_ca`,
/// a client certificate signed by it is required.
fn server_tls(tls: &config::ServerTls) -> Result<tonic::transport::ServerTlsConfig, Error> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| Error::Security(format!("cannot read tls.{what} {}: {e}", path.display())))
    };
    let mut config =
        ServerTlsConfig::new().identity(Identity::from_pem(read("cert", &tls.cert)?, read("key", &tls.key)?));
    if let Some(ca) = &tls.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read("client_ca", ca)?));
    }
    Ok(config)
}

/// The URL standbys hand out for this coordinator when none is configured:
/// the bound address, or the host name for a wildcard one; `https://` when
/// it serves TLS.
fn advertise(addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if addr.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let host = host.trim();
        if !host.is_empty() {
            return format!("{scheme}://{host}:{}", addr.port());
        }
    }
    format!("{scheme}://{addr}")
}

/// What runs the lease table, and what it tells.
struct Table {
    config: Arc<Config>,
    role: Role,
    subscriptions: amqp::StatusTable,
}

impl Table {
    /// sled: this process alone leads, from start to `closing`; a store
    /// failure stops the role (and with it the server) and is returned.
    async fn lead_alone(self, store: SledStore, closing: CancellationToken) -> Result<(), StoreError> {
        let result = self.lead(store, 0, closing, CancellationToken::new()).await;
        self.role.stop();
        result
    }

    /// PostgreSQL: stand by until this coordinator wins the election, lead
    /// until the term is lost or the store fails, stand by again; on
    /// `closing`, drain and resign so a standby takes over at once.
    async fn elect(self, pg: Postgres, closing: CancellationToken) -> Result<(), StoreError> {
        let mut election = Election::new(pg.clone(), self.role.address.clone());
        tracing::info!(holder = election.holder(), address = %self.role.address, database = pg.url(), "standing by for leadership");
        loop {
            let (term, sent) = loop {
                match election.campaign().await {
                    Ok(Campaign::Won { term, sent }) => break (term, sent),
                    Ok(Campaign::Lost { leader }) => self.role.follow(leader),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reach the election in PostgreSQL; retrying");
                        self.role.follow(None);
                    }
                }
                if closing.run_until_cancelled(tokio::time::sleep(election.period())).await.is_none() {
                    self.role.stop();
                    return Ok(());
                }
            };
            tracing::info!(term = term.term, "elected leader; loading the lease table");
            let lost = CancellationToken::new();
            let led = async {
                let store = PgStore::open(&pg, term.clone()).await?;
                self.lead(store, term.term, closing.clone(), lost.clone()).await
            };
            let keep = election.keep(&term, sent, &closing, &lost);
            let (led, ()) = tokio::join!(
                async {
                    let led = led.await;
                    // However the term ended, stop renewing it.
                    lost.cancel();
                    led
                },
                keep
            );
            if let Err(e) = &led {
                tracing::error!(term = term.term, error = %e, "leading failed; stepping down");
            }
            self.role.follow(None);
            // Hand over at once rather than at the deadline (nothing to do
            // if the term is over already or the database is unreachable).
            if let Err(e) = election.resign(&term).await {
                tracing::warn!(term = term.term, error = %e, "could not resign; standbys wait for the deadline");
            }
            if closing.is_cancelled() {
                self.role.stop();
                return Ok(());
            }
        }
    }

    /// One term of leadership: the service loop on `store` with discovery
    /// and the RabbitMQ loop. Ends on `closing` (drained: every write made
    /// durable), on `lost` (abandoned at once: nothing more is written or
    /// answered), or when the loop fails (its error).
    async fn lead<S: LeaseStore>(
        &self,
        store: S,
        term: u64,
        closing: CancellationToken,
        lost: CancellationToken,
    ) -> Result<(), StoreError> {
        let (service, handle) = Service::new(store, self.config.core())?;
        let background = CancellationToken::new();
        let discovery_task =
            tokio::spawn(discovery::run(self.config.clone(), handle.clone(), background.clone()));
        let groups_task =
            tokio::spawn(group_offsets::run(self.config.clone(), handle.clone(), background.clone()));
        let amqp_task = tokio::spawn(amqp::run(
            self.config.clone(),
            handle.clone(),
            self.subscriptions.clone(),
            background.clone(),
        ));
        self.role.lead(handle, term);
        let loop_stop = CancellationToken::new();
        let mut service_task = tokio::spawn(service.run(loop_stop.clone()));
        let mut result = tokio::select! {
            ran = &mut service_task => Some(ran),
            () = closing.cancelled() => None,
            () = lost.cancelled() => {
                self.role.follow(None);
                service_task.abort();
                Some(Ok(Ok(())))
            }
        };
        background.cancel();
        for (name, task) in [("discovery", discovery_task), ("consumer groups", groups_task), ("rabbitmq", amqp_task)] {
            // Bounded: a broker call in flight may take its own timeout to
            // return; the store's last flush must not wait for it.
            match tokio::time::timeout(FATAL_GRACE, task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(task = name, error = %e, "background task failed"),
                Err(_) => {
                    tracing::warn!(task = name, grace = ?FATAL_GRACE, "background task still busy; leaving it")
                }
            }
        }
        if result.is_none() {
            loop_stop.cancel();
            result = Some(service_task.await);
        }
        match result {
            Some(Ok(ran)) => ran,
            Some(Err(e)) => Err(StoreError::Task(e)),
            None => Ok(()),
        }
    }
}
