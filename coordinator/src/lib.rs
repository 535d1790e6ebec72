//! shardline's coordinator: it owns the lease table and decides which worker
//! processes which shard or queue slot. It never runs handler code and never
//! sees a record: only registrations, heartbeats and checkpoints.
//!
//! Layers, bottom up: [`core`] (pure lease table and assignment) →
//! [`store`] (durable records) → [`service`] (the IO loop, group commit) →
//! [`api`] (gRPC edge) → [`serve`] (wiring). [`discovery`] feeds new
//! partitions in; [`amqp`] declares RabbitMQ topology and sets queue slots
//! with [`scale`]; [`config`] is checked before anything starts.

pub mod amqp;
pub mod api;
pub mod config;
pub mod core;
pub mod discovery;
pub mod metrics;
pub mod offsets;
pub mod scale;
pub mod service;
pub mod store;
pub mod usage;

use std::net::SocketAddr;
use std::sync::Arc;

use shardline_proto::v1::{admin_api_server::AdminApiServer, worker_api_server::WorkerApiServer};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::service::Service;
use crate::store::{SledStore, StoreError};

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
}

/// Runs a coordinator until `shutdown` fires: opens the store, restores the
/// lease table, serves gRPC, discovers shards. `on_ready` gets the bound
/// address (useful with port 0).
pub async fn serve(
    config: Config,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), Error> {
    let config = Arc::new(config);
    let store = SledStore::open(&config.data_dir)?;
    let (service, handle) = Service::new(store, config.core())?;
    if let Some(addr) = config.metrics_listen {
        metrics::install(addr).map_err(Error::Metrics)?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| Error::Bind { addr: config.listen, source })?;

    let loop_stop = CancellationToken::new();
    let service_task = tokio::spawn(service.run(loop_stop.clone()));
    let discovery_task = tokio::spawn(discovery::run(config.clone(), handle.clone(), shutdown.clone()));

    let subscriptions = amqp::StatusTable::default();
    let amqp_task =
        tokio::spawn(amqp::run(config.clone(), handle.clone(), subscriptions.clone(), shutdown.clone()));
    let api = api::Api::new(handle, config.clone(), subscriptions);
    let auth = api::Auth { token: config.auth_token.clone() };
    tracing::info!(%addr, streams = config.streams.len(), subscriptions = config.subscriptions.len(), "coordinator serving");
    on_ready(addr);
    let served = tonic::transport::Server::builder()
        .add_service(WorkerApiServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(AdminApiServer::with_interceptor(api, auth))
        .serve_with_incoming_shutdown(
            // Nagle plus delayed ACKs would add ~40 ms to small replies.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.clone().cancelled_owned(),
        )
        .await;
    // The API is closed: let the loop make everything durable, then stop.
    discovery_task.abort();
    amqp_task.abort();
    loop_stop.cancel();
    let stored = service_task.await.map_err(|e| StoreError::Io(format!("service loop panicked: {e}")))?;
    served?;
    stored?;
    Ok(())
}
