//! The worker runtime: initialise handlers once, join the fleet, and turn
//! the coordinator's instructions into lease tasks. One loop owns the table
//! of running leases; the session's fence kills every task directly,
//! whatever this loop is doing. A task that dies gives its lease back, so
//! the shard moves instead of staying stuck. Shutdown drains every lease,
//! confirms each release and deregisters, so leases move at once and
//! without duplicates.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shardline_proto::{LeaseId, LeaseKind, Mapping, Start, WindowState, v1};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::{Amqp, Publisher};
use crate::checkpointer::Checkpointer;
use crate::config::WorkerConfig;
use crate::driver::{LeaseStats, LeaseTask, UsageMeter};
use crate::endpoint::{self, Readiness};
use crate::handler::{DynHandler, Handlers, InitContext, InitError};
use crate::health::Health;
use crate::membership::{LeaseEvent, Session, SessionConfig, SessionError, SessionRun, Standing};
use crate::sink::kafka::{KafkaAccess, OnFailure};
use crate::sink::{Discard, FailureSink};
use crate::source::amqp::Slot;
use crate::source::kafka::{ConsumerSettings, KafkaSource, Shard, SourceError};
use crate::source::{Exit, Lease};
use rdkafka::producer::FutureProducer;
use tokio::task::JoinHandle;

/// Why a worker could not start or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Bad config or handler settings: fix and restart (exit status 2).
    #[error(transparent)]
    Init(#[from] InitError),
    /// A config the handlers given to [`run`] cannot serve (exit status 2).
    #[error("config: {0}")]
    Config(#[from] crate::config::Invalid),
    /// The metrics endpoint could not be served, e.g. its port is taken.
    #[error("cannot serve metrics on {addr}: {reason}")]
    Metrics { addr: std::net::SocketAddr, reason: String },
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A task the worker cannot run without died: a bug, reported loudly.
    #[error("{0}")]
    TaskDied(String),
}

struct Running {
    epoch: u64,
    /// Killed and on its way out: a second stop is a no-op.
    stopping: bool,
    drain: CancellationToken,
    kill: CancellationToken,
    /// The lease's tumbling window: its release carries it.
    window: Option<Arc<crate::window::Slot>>,
}

type StatsTable = Arc<Mutex<BTreeMap<LeaseId, (u64, Arc<LeaseStats>)>>>;

/// Cancels `shutdown` on the first SIGTERM or SIGINT (the worker drains:
/// finishes its batches and releases its leases) and exits the process with
/// 130 on the second. Every worker binary, the stock one and users' own,
/// spawns this so an orchestrator's SIGTERM drains rather than kills.
pub async fn drain_on_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("draining: finishing batches and releasing leases (signal again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    std::process::exit(130);
}

/// Runs a worker hosting `handlers` until `shutdown` fires, then drains.
pub async fn run(
    config: WorkerConfig,
    handlers: Handlers,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let worker_id = config.worker_id();
    if let Some((name, _)) = config.handlers.iter().find(|(name, settings)| !handlers.hosts(name, settings)) {
        let known = handlers.names().chain([r#"or kind = "function""#]).collect::<Vec<_>>().join(", ");
        let field = format!("handlers.{name}");
        return Err(crate::config::Invalid::new(field, "not a handler of this worker", known).into());
    }
    let name = format!("shardline-worker {worker_id}");
    let amqp = Amqp::with_tls(config.amqp_url.clone(), name, config.amqp_tls.clone());
    let kafka = KafkaAccess { brokers: config.kafka_brokers.clone(), settings: config.kafka.clone() };
    let health = Health::default();
    let contexts = config
        .handlers
        .iter()
        .map(|(name, settings)| InitContext {
            name: name.clone(),
            settings: settings.clone(),
            kafka_brokers: config.kafka_brokers.clone(),
            kafka: kafka.clone(),
            amqp: amqp.clone(),
            worker_id: worker_id.clone(),
            concurrency: config.concurrency(),
            health: health.clone(),
        })
        .collect();
    let standing = Standing::default();
    let draining = CancellationToken::new();
    // Stops the HTTP endpoint however this function returns.
    let endpoint = CancellationToken::new();
    let _endpoint = endpoint.clone().drop_guard();
    // Before init, so what init records (the init counter) is exported.
    if let Some(addr) = config.metrics_listen {
        let readiness = Readiness {
            standing: standing.clone(),
            draining: draining.clone(),
            amqp: amqp.clone(),
            health: health.clone(),
        };
        endpoint::serve(addr, readiness, endpoint)
            .await
            .map_err(|reason| WorkerError::Metrics { addr, reason })?;
        // Failure counters exist from the start, at 0: an alert on them
        // (and a test) tells "none yet" from "not exported".
        for name in [
            "shardline_lease_task_failures_total",
            "shardline_redeliveries_total",
            "shardline_checkpoint_errors_total",
            "shardline_source_errors_total",
            "shardline_kafka_errors_total",
        ] {
            metrics::counter!(name).absolute(0);
        }
    }
    // Once per node: every lease and batch shares these.
    let ready = handlers.init(contexts).await?;
    let session = Session::new(SessionConfig {
        coordinator: config.coordinator.clone(),
        worker_id: worker_id.clone(),
        address: config.metrics_listen.map(|a| a.to_string()).unwrap_or_default(),
        handlers: ready.keys().cloned().collect(),
        capacity: config.capacity,
        concurrency: config.concurrency(),
        credentials: config.credentials()?,
    })?
    .with_standing(standing);

    let usage = UsageMeter::default();
    let stats: StatsTable = Arc::default();
    let background = CancellationToken::new();
    let checkpointer = Checkpointer::default();
    let (lost_tx, mut lost_rx) = mpsc::channel(256);
    let helpers = vec![(
        "checkpointer",
        tokio::spawn(checkpointer.clone().run(session.clone(), lost_tx, background.clone())),
    )];
    let (events_tx, mut events_rx) = mpsc::channel(1024);
    let mut membership = tokio::spawn(session.clone().run(SessionRun {
        events: events_tx,
        load: load_report(stats.clone(), (amqp.clone(), health.clone()), usage.clone()),
        draining: draining.clone(),
        shutdown: background.clone(),
    }));

    let mut rt = Runtime {
        session,
        kafka: None,
        kafka_config: (kafka.clone(), config.fetch_queue_kib),
        health,
        background: background.clone(),
        helpers,
        handlers: ready,
        checkpointer,
        publisher: Publisher::new(amqp.clone()),
        usage,
        inflight: (config.max_inflight_batches > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(config.max_inflight_batches as usize))),
        amqp,
        stats,
        running: HashMap::new(),
        tasks: JoinSet::new(),
        task_leases: HashMap::new(),
        draining: false,
    };
    tracing::info!(worker = %worker_id, "worker started");
    let deadline = tokio::time::sleep(std::time::Duration::MAX);
    tokio::pin!(deadline);
    while !(rt.draining && rt.tasks.is_empty()) {
        tokio::select! {
            () = shutdown.cancelled(), if !rt.draining => {
                // Drain: keep heartbeating (saying we are draining, so
                // nothing new comes), finish in-flight batches, confirm
                // every release, then leave.
                tracing::info!(leases = rt.running.len(), timeout = ?config.drain_timeout, "draining");
                draining.cancel();
                rt.draining = true;
                for r in rt.running.values() {
                    r.drain.cancel();
                }
                deadline.as_mut().reset(tokio::time::Instant::now() + config.drain_timeout);
            }
            () = &mut deadline, if rt.draining => {
                tracing::warn!(leases = rt.running.len(), "drain timed out; the rest move after the session timeout");
                for r in rt.running.values() {
                    r.kill.cancel();
                }
                break;
            }
            Some((generation, event)) = events_rx.recv() => rt.on_event(generation, event).await,
            Some((lease, epoch)) = lost_rx.recv() => rt.stop(&lease, epoch, true),
            Some(done) = rt.tasks.join_next_with_id(), if !rt.tasks.is_empty() => rt.joined(done).await,
            session = &mut membership => return rt.session_ended(session).await,
        }
    }
    // Every partition queue goes before the consumer they belong to.
    rt.join_all().await;
    background.cancel();
    match membership.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the session ended with an error while stopping"),
        Err(e) => tracing::error!(error = %e, "the session task died while stopping"),
    }
    rt.join_helpers().await;
    rt.session.deregister().await?;
    tracing::info!("worker stopped");
    Ok(())
}

struct Runtime {
    session: Session,
    /// The Kafka consumer and on_failure producer, made at the first shard
    /// lease: a worker that only runs queue slots never talks to Kafka.
    kafka: Option<(KafkaSource, FutureProducer)>,
    kafka_config: (KafkaAccess, u32),
    /// Where the Kafka consumer reports that no broker is reachable.
    health: Health,
    background: CancellationToken,
    /// The checkpointer and the Kafka consumer's event loop.
    helpers: Vec<(&'static str, JoinHandle<()>)>,
    handlers: BTreeMap<String, Arc<dyn DynHandler>>,
    checkpointer: Checkpointer,
    amqp: Amqp,
    publisher: Publisher,
    usage: UsageMeter,
    /// `max_inflight_batches` permits, shared by every lease.
    inflight: Option<Arc<tokio::sync::Semaphore>>,
    stats: StatsTable,
    running: HashMap<LeaseId, Running>,
    tasks: JoinSet<Exit>,
    task_leases: HashMap<tokio::task::Id, (LeaseId, u64)>,
    /// Leases offered now are given straight back.
    draining: bool,
}

impl Runtime {
    async fn on_event(&mut self, generation: u64, event: LeaseEvent) {
        if generation != self.session.fence.generation() {
            // Sent before the worker fenced itself: the coordinator may have
            // given the lease away since. It re-sends what still holds.
            tracing::debug!(?event, "ignoring an instruction from before the self-fence");
            return;
        }
        match event {
            LeaseEvent::Acquire { lease, epoch, start, mapping, window } => {
                // A run killed but not yet joined (lost, or stopped by the
                // self-fence) is not running: it is replaced below.
                if self.running.get(&lease).is_some_and(|r| r.epoch == epoch && !r.kill.is_cancelled()) {
                    return; // the authoritative set after a re-register: already running
                }
                if let Some(old) = self.running.remove(&lease) {
                    // A newer epoch (an operator moved the checkpoint): the
                    // old run stops at once and checkpoints nothing more.
                    old.kill.cancel();
                    self.checkpointer.forget(&lease);
                    while self.tasks.len() > self.running.len() {
                        let Some(done) = self.tasks.join_next_with_id().await else { break };
                        let id = task_id(&done);
                        if self.task_leases.get(&id) == Some(&(lease.clone(), old.epoch)) {
                            self.task_leases.remove(&id);
                            break;
                        }
                        self.joined(done).await;
                    }
                }
                self.start(generation, lease, epoch, start, mapping, window).await;
            }
            LeaseEvent::Release { lease, epoch } => match self.running.get(&lease) {
                Some(r) if r.epoch == epoch => r.drain.cancel(),
                Some(_) => {}
                None => {
                    // Not running it (it never started, or its Acquire was
                    // lost): give it back as is.
                    self.give_back(&lease, epoch, None).await;
                }
            },
            LeaseEvent::Revoke { lease, epoch } => self.stop(&lease, epoch, false),
        }
    }

    async fn start(
        &mut self,
        generation: u64,
        lease: LeaseId,
        epoch: u64,
        start: Start,
        mapping: Option<Box<Mapping>>,
        window: Option<WindowState>,
    ) {
        if self.draining {
            self.give_back(&lease, epoch, start.checkpoint()).await;
            return;
        }
        let Some(mapping) = mapping.map(|m| *m) else {
            tracing::error!(%lease, "acquire without a mapping; giving it back");
            self.give_back(&lease, epoch, None).await;
            return;
        };
        let Some(handler) = self.handlers.get(&mapping.handler).cloned() else {
            tracing::error!(%lease, handler = %mapping.handler, "no such handler here; giving the lease back");
            self.give_back(&lease, epoch, None).await;
            return;
        };
        let kafka = match lease.kind {
            LeaseKind::QueueSlot => None,
            LeaseKind::Shard => match self.kafka() {
                Ok(kafka) => Some(kafka),
                Err(e) => {
                    tracing::error!(%lease, error = %e, "cannot create the Kafka client; giving the lease back");
                    self.give_back(&lease, epoch, start.checkpoint()).await;
                    return;
                }
            },
        };
        let Some(kill) = self.session.fence.token(generation) else {
            tracing::debug!(%lease, "fenced since this acquire arrived; not starting it");
            return;
        };
        tracing::info!(%lease, epoch, ?start, handler = %mapping.handler, "lease acquired");
        let stats = Arc::new(LeaseStats::default());
        stats.position.store(start.checkpoint().unwrap_or(-1), Ordering::Relaxed);
        stats.lag.store(-1, Ordering::Relaxed);
        // A kill drains too: every wait that ends on a drain ends on a kill.
        let drain = kill.child_token();
        let window = (lease.kind == LeaseKind::Shard && !mapping.tumbling_window.is_zero())
            .then(|| Arc::new(crate::window::Slot::resume(window)));
        let task = LeaseTask {
            lease: Lease {
                id: lease.clone(),
                epoch,
                mapping,
                start,
                drain: drain.clone(),
                kill: kill.clone(),
                window: window.clone(),
            },
            handler,
            stats: stats.clone(),
            usage: self.usage.clone(),
            inflight: self.inflight.clone(),
        };
        let spawned = match kafka {
            None => {
                let slot = Slot::new(
                    self.amqp.clone(),
                    self.publisher.clone(),
                    self.session.worker_id(),
                    &task.lease,
                );
                self.tasks.spawn(task.run(slot))
            }
            Some((client, producer)) => {
                let sink: Box<dyn FailureSink> = match &task.lease.mapping.policy.on_failure {
                    Some(topic) => Box::new(OnFailure { producer, topic: topic.clone() }),
                    None => Box::new(Discard),
                };
                let shard = Shard {
                    client,
                    session: self.session.clone(),
                    checkpointer: self.checkpointer.clone(),
                    sink,
                    topic: lease.name.clone(),
                    partition: lease.index,
                };
                self.tasks.spawn(task.run(shard))
            }
        };
        self.task_leases.insert(spawned.id(), (lease.clone(), epoch));
        self.session.held.insert(lease.clone(), epoch);
        crate::lock(&self.stats).insert(lease.clone(), (epoch, stats));
        self.running.insert(lease, Running { epoch, stopping: false, drain, kill, window });
    }

    fn kafka(&mut self) -> Result<(KafkaSource, FutureProducer), SourceError> {
        if let Some((source, producer)) = &self.kafka {
            return Ok((source.clone(), producer.clone()));
        }
        let (access, fetch_queue_kib) = &self.kafka_config;
        let producer = crate::sink::kafka::producer(access)?;
        let settings = ConsumerSettings {
            worker_id: self.session.worker_id(),
            fetch_queue_kib: *fetch_queue_kib,
            health: self.health.clone(),
        };
        let (source, events) = KafkaSource::new(access, settings, self.background.clone())?;
        self.kafka = Some((source.clone(), producer.clone()));
        self.helpers.push(("kafka events", events));
        Ok((source, producer))
    }

    /// Stops a lease at once (lost, revoked): no more checkpoints.
    fn stop(&mut self, lease: &LeaseId, epoch: u64, lost: bool) {
        if let Some(r) = self.running.get_mut(lease).filter(|r| r.epoch == epoch && !r.stopping) {
            r.stopping = true;
            tracing::warn!(%lease, epoch, lost, "stopping lease at once");
            r.kill.cancel();
            self.checkpointer.forget(lease);
            self.session.held.remove(lease, epoch);
            metrics::counter!("shardline_leases_lost_total").increment(1);
        }
    }

    /// Confirms a release of a lease this worker does not run.
    async fn give_back(&self, lease: &LeaseId, epoch: u64, offset: Option<i64>) {
        if let Err(e) = self.session.release_done(lease, epoch, offset, None).await {
            tracing::warn!(%lease, epoch, error = %e, "giving the lease back failed; the coordinator re-sends it");
        }
    }

    /// A task ended: by itself, or by dying (a panic the policy did not
    /// catch). A dead task's lease is given back with its last acknowledged
    /// checkpoint (at least once), so the coordinator grants it again.
    async fn joined(&mut self, done: Joined) {
        let Some((lease, epoch)) = self.task_leases.remove(&task_id(&done)) else { return };
        let exit = match done {
            Ok((_, exit)) => exit,
            Err(e) => {
                tracing::error!(%lease, epoch, error = %e, "lease task died; giving the lease back");
                metrics::counter!("shardline_lease_task_failures_total").increment(1);
                if self.running.get(&lease).is_some_and(|r| r.epoch == epoch && r.stopping) {
                    Exit::Killed
                } else {
                    Exit::Released(None)
                }
            }
        };
        // The window as the run left it, which goes with its final offset.
        let mut window = None;
        if self.running.get(&lease).is_some_and(|r| r.epoch == epoch) {
            window = self.running.remove(&lease).and_then(|r| r.window).and_then(|w| w.snapshot());
        }
        self.session.held.remove(&lease, epoch);
        {
            let mut table = crate::lock(&self.stats);
            if table.get(&lease).is_some_and(|(e, _)| *e == epoch) {
                table.remove(&lease);
            }
        }
        if let Exit::Released(offset) = exit {
            // Without a final offset the last acknowledged checkpoint
            // stands, and so does the window stored with it.
            let window = window.filter(|_| offset.is_some());
            match self.session.release_done(&lease, epoch, offset, window.as_ref()).await {
                Ok(()) => tracing::info!(%lease, epoch, ?offset, "lease released"),
                Err(e) => {
                    tracing::warn!(%lease, error = %e, "release confirmation failed; the coordinator forces it")
                }
            }
        }
    }

    /// The session ended by itself: another process took this worker's id
    /// (it stopped every lease), or it could not register before shutdown.
    async fn session_ended(
        mut self,
        session: Result<Result<(), SessionError>, tokio::task::JoinError>,
    ) -> Result<(), WorkerError> {
        // Every lease task's kill token is a child of the fence.
        self.session.fence.trip();
        self.join_all().await;
        self.join_helpers().await;
        match session {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(WorkerError::TaskDied(format!("the session task died: {e}"))),
        }
    }

    /// Waits for every lease task, which must be stopping already.
    async fn join_all(&mut self) {
        while let Some(done) = self.tasks.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "a lease task died while the worker stopped");
            }
        }
    }

    /// Stops the helper tasks and waits for them, then the handlers'
    /// shutdown (every batch is over by now).
    async fn join_helpers(&mut self) {
        self.background.cancel();
        for (name, handle) in std::mem::take(&mut self.helpers) {
            if let Err(e) = handle.await {
                tracing::error!(task = name, error = %e, "a helper task died");
            }
        }
        for handler in self.handlers.values() {
            handler.shutdown().await;
        }
    }
}

/// How a lease task ended, or why it did not.
type Joined = Result<(tokio::task::Id, Exit), tokio::task::JoinError>;

fn task_id(done: &Joined) -> tokio::task::Id {
    match done {
        Ok((id, _)) => *id,
        Err(e) => e.id(),
    }
}

/// Builds each heartbeat's load report from the lease stats: rates are the
/// change since the previous report.
fn load_report(
    stats: StatsTable,
    (amqp, health): (Amqp, Health),
    usage: UsageMeter,
) -> impl Fn() -> (v1::LoadReport, Vec<String>) + Send {
    type Previous = (Instant, HashMap<LeaseId, (u64, u64)>, f64);
    let previous: Mutex<Previous> = Mutex::new((Instant::now(), HashMap::new(), cpu_seconds()));
    move || {
        let unhealthy = crate::endpoint::unhealthy(&amqp, &health);
        let table = crate::lock(&stats);
        let mut prev = crate::lock(&previous);
        let elapsed = prev.0.elapsed().as_secs_f64().max(1e-3);
        let mut next = HashMap::new();
        let leases = table
            .iter()
            .map(|(lease, (epoch, s))| {
                let records = s.records.load(Ordering::Relaxed);
                let busy = s.busy_micros.load(Ordering::Relaxed);
                let (r0, b0) = prev.1.get(lease).copied().unwrap_or((records, busy));
                // A lease restarted under a new epoch counts from zero again.
                let (r0, b0) = if records < r0 || busy < b0 { (0, 0) } else { (r0, b0) };
                next.insert(lease.clone(), (records, busy));
                let rate = (records - r0) as f64 / elapsed;
                v1::LeaseLoad {
                    lease: Some(lease.into()),
                    epoch: *epoch,
                    position: s.position.load(Ordering::Relaxed),
                    lag: s.lag.load(Ordering::Relaxed),
                    records_in_per_s: rate,
                    records_out_per_s: rate,
                    busy_ratio: (busy - b0) as f64 / 1e6 / elapsed,
                }
            })
            .collect();
        let inflight = table.values().map(|(_, s)| s.in_flight.load(Ordering::Relaxed)).sum::<u64>();
        let cpu_now = cpu_seconds();
        let cpu = (cpu_now - prev.2).max(0.0) / elapsed;
        *prev = (Instant::now(), next, cpu_now);
        (
            v1::LoadReport { leases, cpu, inflight_batches: inflight as u32, usage: usage.snapshot() },
            unhealthy,
        )
    }
}

/// CPU seconds this process has used (user + system), from /proc; 0 where
/// /proc is not there.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of those, in clock ticks (100 per second on Linux).
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}
