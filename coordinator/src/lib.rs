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
use std::time::Duration;

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

/// Runs a coordinator until `shutdown` fires: opens the store, restores the
/// lease table, serves gRPC, discovers shards. `on_ready` gets the bound
/// address (useful with port 0).
///
/// If the service loop ends first (a store error), the server is shut down
/// too and the error returned: a coordinator that can no longer make
/// anything durable must not keep answering (UNAVAILABLE forever), but exit
/// so that its supervisor restarts it on the durable state.
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
    // The server stops on `shutdown`, or when the loop ends by itself.
    let loop_died = CancellationToken::new();
    let (loop_token, died) = (loop_stop.clone(), loop_died.clone());
    let service_task = tokio::spawn(async move {
        let result = service.run(loop_token).await;
        died.cancel();
        result
    });
    let (stop, died) = (shutdown.clone(), loop_died.clone());
    let server_stop = async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = died.cancelled() => {}
        }
    };
    // Discovery and the RabbitMQ loop stop on this token: on `shutdown`, or
    // when the API has closed for any reason.
    let background = shutdown.child_token();
    let discovery_task = tokio::spawn(discovery::run(config.clone(), handle.clone(), background.clone()));

    let subscriptions = amqp::StatusTable::default();
    let amqp_task =
        tokio::spawn(amqp::run(config.clone(), handle.clone(), subscriptions.clone(), background.clone()));
    let api = api::Api::new(handle, config.clone(), subscriptions);
    let auth = api::Auth { token: config.auth_token.clone() };
    tracing::info!(%addr, streams = config.streams.len(), subscriptions = config.subscriptions.len(), "coordinator serving");
    on_ready(addr);
    let server = tonic::transport::Server::builder()
        .add_service(WorkerApiServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(AdminApiServer::with_interceptor(api, auth))
        .serve_with_incoming_shutdown(
            // Nagle plus delayed ACKs would add ~40 ms to small replies.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            server_stop,
        );
    let died = loop_died.clone();
    let served = tokio::select! {
        served = server => served,
        () = async move {
            died.cancelled().await;
            tokio::time::sleep(FATAL_GRACE).await;
        } => {
            tracing::warn!(grace = ?FATAL_GRACE, "connections still open after the store failed; closing them");
            Ok(())
        }
    };
    // Was the loop already gone before the API closed? (Read before
    // `loop_stop` is cancelled, which ends a healthy loop too.)
    let loop_died = loop_died.is_cancelled();
    // The API is closed: let the loop make everything durable, then stop.
    background.cancel();
    for (name, task) in [("discovery", discovery_task), ("rabbitmq", amqp_task)] {
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
    loop_stop.cancel();
    let stored = service_task.await.map_err(StoreError::Task);
    match stored {
        Ok(Err(e)) | Err(e) => return Err(Error::StoreFailed(e)),
        Ok(Ok(())) if loop_died => return Err(Error::LoopEnded),
        Ok(Ok(())) => {}
    }
    served?;
    Ok(())
}
