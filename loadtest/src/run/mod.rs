//! `shardline-loadtest run SCENARIO`: the whole system under load and
//! faults, verified record by record.
//!
//! One run:
//! 1. [`scenario`]: read and check the file (exit 2 on any mistake, before
//!    anything starts);
//! 2. create unique names per target (a run has a Kafka stream, a RabbitMQ
//!    topic with its subscriptions, or both): a Kafka topic and a receipts
//!    topic, a fanout topic with subscriptions and a receipts exchange +
//!    queue;
//! 3. [`fleet`]: start the real coordinator(s) (unless `--external`; one on
//!    sled, or `[coordinators] count` sharing a fresh PostgreSQL schema) and the
//!    workers, all hosting the built-in `chaos` handler, which sleeps as
//!    the scenario says and forwards every record it processed to the
//!    receipts destination once the broker has it;
//! 4. produce on the [`rate`] schedule with real producers (acks=all, or
//!    publisher confirms), execute the faults on theirs, watch the lease
//!    table; then stop producing and drain;
//! 5. [`ledger`]: match receipts to what the broker acknowledged: lost,
//!    duplicates, per-key order, latency, timeline, recovery per fault;
//!    one ledger per target, each fed by its own producer and receipt
//!    reader and analysed alone, then summed for the overall verdict;
//! 6. [`report`] and [`chart`]; the exit status says whether every
//!    threshold held (0), one broke or the harness failed (1), or the
//!    scenario is invalid (2).
//!
//! Everything started is stopped at the end, on an error, and on Ctrl-C
//! (the guards kill the children when the run is dropped).

pub(crate) mod amqp;
mod autoscale;
mod chart;
mod compare;
mod fleet;
mod kafka;
mod ledger;
mod payload;
mod rate;
mod report;
mod scenario;

pub use scenario::BadScenario;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use shardline_proto::StartingPosition;
use shardline_testkit::config::{
    CoordinatorConfig, Store, StreamConfig, SubscriptionConfig, TopicConfig, TopicKind, WorkerConfig,
};
use shardline_testkit::kafka::KafkaAccess;
use shardline_testkit::{broker, proxy};
use shardline_worker::config::KafkaSettings;
use tokio::time::Instant;

use crate::child::{self, Coordinator};
use fleet::{Admin, Fleet, LeaseWatch, WorkerTemplate};
use ledger::{Books, Cut, FaultEvent, Ledger, Scope, lock};
use payload::now_ms;
use scenario::{Action, Fault, Kind, Scenario, StoreKind};

/// How long the coordinator and workers get to have every lease owned.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// After every lease is owned, how long to wait for the balancer to give
/// each worker a share before producing anyway.
const BALANCE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a balanced assignment must stand still before producing starts.
const SETTLED_FOR: Duration = Duration::from_secs(1);
/// After the last record is processed, how long to keep reading receipts:
/// a zombie's or a redelivery's late duplicates land in the report.
const SETTLE: Duration = Duration::from_secs(1);
/// How often the progress line is refreshed.
const REFRESH: Duration = Duration::from_millis(250);
/// Without a terminal, a plain progress line this often (CI logs).
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// How often the lease table is listed: the resolution of checkpoint
/// stalls.
const WATCH_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The scenario file (TOML), e.g. `loadtest/scenarios/steady.toml`.
    scenario: PathBuf,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Also draw produce rate, processing rate and lag over time, with the
    /// faults marked, as SVG to this file.
    #[arg(long, value_name = "PATH.svg")]
    chart: Option<PathBuf>,
    /// Use this running coordinator instead of starting one. Its config
    /// must map `--stream` to the handler `chaos`; the harness still starts
    /// the workers (pointed at it), so worker faults work, but
    /// `restart_coordinator` does not.
    #[arg(long, value_name = "COORDINATOR_URL", requires = "stream")]
    external: Option<String>,
    /// With `--external`: the Kafka topic of its `[[streams]]` entry, or
    /// the RabbitMQ topic (exchange) whose subscriptions to load. A missing
    /// Kafka topic is created with the scenario's partitions.
    #[arg(long, value_name = "NAME", requires = "external")]
    stream: Option<String>,
    /// With `--external`: the receipts topic (Kafka) or exchange
    /// (RabbitMQ) the external coordinator's own workers send to (their
    /// `chaos` handler's `topic` or `exchange`), for a fleet the harness
    /// does not start (`workers = 0`, e.g. containers). Created if
    /// missing (a Kafka topic with 4 partitions, the receipt reader's);
    /// records of other runs in it are not counted. Default: a
    /// new one per run, for the workers the harness starts.
    #[arg(long, value_name = "NAME", requires = "external")]
    receipts: Option<String>,
    /// The coordinator binary [default: `shardline-coordinator` next to
    /// this executable].
    #[arg(long, env = "SHARDLINE_COORDINATOR_BIN")]
    coordinator_bin: Option<PathBuf>,
    /// The worker binary [default: `shardline-worker` next to this
    /// executable].
    #[arg(long, env = "SHARDLINE_WORKER_BIN")]
    worker_bin: Option<PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "SHARDLINE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// A librdkafka property (`security.protocol=ssl`) for every Kafka
    /// client of the run: the harness's and, as `[kafka] properties`, the
    /// coordinators' and workers' (repeatable).
    #[arg(long = "kafka-property", value_name = "KEY=VALUE")]
    kafka_properties: Vec<String>,
    /// RabbitMQ.
    #[arg(long, env = "SHARDLINE_AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Keep the coordinator's and workers' logs in this directory (they
    /// are deleted with their temporary directories otherwise).
    #[arg(long, value_name = "DIR")]
    logs: Option<PathBuf>,
}

impl Args {
    /// `--brokers` with the `--kafka-property`s, checked as a config
    /// file's `[kafka]` is (a bad one is exit 2, nothing started).
    fn kafka(&self) -> Result<KafkaAccess, BadScenario> {
        let settings = KafkaSettings::default()
            .with_args(self.kafka_properties.iter().map(String::as_str))
            .map_err(BadScenario)?;
        settings.check().map_err(|e| BadScenario(format!("{e} (from --kafka-property)")))?;
        Ok(KafkaAccess { brokers: self.brokers.clone(), settings })
    }
}

/// One target of a run: a Kafka stream, or a RabbitMQ fanout topic with
/// its subscriptions. Each has its own producer, receipts, receipt reader
/// and ledger.
struct Side {
    /// `Kafka` or `Rabbitmq`, never `Both`.
    kind: Kind,
    /// Kafka: the source topic (the stream). RabbitMQ: the fanout topic.
    stream: String,
    /// Where receipts are booked against: the stream, or each subscription.
    destinations: Vec<String>,
    /// The receipts topic, or exchange + queue (on the target's broker).
    receipts: String,
    partitions: u32,
    /// The handler its mappings name.
    handler: &'static str,
}

impl Side {
    /// The scopes a whole-system fault (coordinator restart, broker stop)
    /// interrupts: every partition, or every subscription.
    fn everything(&self) -> Vec<Scope> {
        match self.kind {
            Kind::Rabbitmq => (0..self.destinations.len()).map(|sub| Scope { sub, shard: None }).collect(),
            Kind::Kafka | Kind::Both => {
                (0..self.partitions).map(|p| Scope { sub: 0, shard: Some(p) }).collect()
            }
        }
    }

    fn amqp_names(&self) -> amqp::Names {
        amqp::Names {
            topic: self.stream.clone(),
            subscriptions: self.destinations.clone(),
            receipts: self.receipts.clone(),
        }
    }
}

/// With `--external`: the names the external coordinator's config fixes.
#[derive(Clone, Copy)]
struct Outside<'a> {
    /// Its stream (Kafka topic) or RabbitMQ topic.
    stream: &'a str,
    /// Where its own workers send receipts, if they are not the harness's.
    receipts: Option<&'a str>,
}

/// The names and settings of one run.
struct Plan {
    run: String,
    /// The Kafka side first, when there is one.
    sides: Vec<Side>,
    external: bool,
    /// The receipts destination is the external fleet's (`--receipts`):
    /// it may exist, and stays after the run.
    shared_receipts: bool,
}

impl Plan {
    /// The sides for `scenario`, named from `base` (the Kafka topic and the
    /// RabbitMQ topic may share a name: they live on different brokers)
    /// unless an external coordinator's config names them.
    fn new(run: &str, scenario: &Scenario, base: &str, outside: Option<Outside<'_>>) -> Self {
        let kind = scenario.target.kind;
        let stream = outside.map_or(base, |o| o.stream).to_owned();
        let receipts = match outside.and_then(|o| o.receipts) {
            Some(name) => name.to_owned(),
            None => format!("{base}-receipts"),
        };
        let mut sides = Vec::new();
        if kind.has_kafka() {
            sides.push(Side {
                kind: Kind::Kafka,
                stream: stream.clone(),
                destinations: vec![stream.clone()],
                receipts: receipts.clone(),
                partitions: scenario.target.partitions(),
                handler: fleet::HANDLER,
            });
        }
        if kind.has_rabbitmq() {
            sides.push(Side {
                kind: Kind::Rabbitmq,
                stream,
                destinations: (0..scenario.target.subscriptions()).map(|i| format!("{base}-s{i}")).collect(),
                receipts,
                partitions: 0,
                // `chaos` has one receipts destination, the stream's.
                handler: if kind == Kind::Both { fleet::FORWARD } else { fleet::HANDLER },
            });
        }
        Self {
            run: run.to_owned(),
            sides,
            external: outside.is_some(),
            shared_receipts: outside.and_then(|o| o.receipts).is_some(),
        }
    }

    /// Every side's destinations: the leases of the run.
    fn destinations(&self) -> Vec<String> {
        self.sides.iter().flat_map(|s| s.destinations.iter().cloned()).collect()
    }

    /// Per side, what a fault hitting `kinds` of side interrupts.
    fn everything_of(&self, hit: impl Fn(Kind) -> bool) -> Vec<Vec<Scope>> {
        self.sides.iter().map(|s| if hit(s.kind) { s.everything() } else { Vec::new() }).collect()
    }

    fn side(&self, kind: Kind) -> Option<&Side> {
        self.sides.iter().find(|s| s.kind == kind)
    }
}

/// Aborts a spawned task when dropped: an interrupted or failed run must
/// not leave its producer or fault tasks (and the children they hold)
/// behind.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What one run leaves for a comparison between strategies.
pub struct RunResult {
    pub exit: ExitCode,
    pub timeline: Vec<ledger::Row>,
    pub p99_ms: f64,
    pub lease_moves: u64,
    pub lost: u64,
    pub json: serde_json::Value,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let scenario = Scenario::load(&args.scenario)?;
    if scenario.strategies.is_empty() {
        let (json, chart) = (args.json.clone(), args.chart.clone());
        return Ok(run_one(&args, scenario, json, chart).await?.exit);
    }
    compare::run(&args, scenario).await
}

/// Runs the scenario once; writes its JSON and chart where asked.
async fn run_one(
    args: &Args,
    scenario: Scenario,
    json_path: Option<PathBuf>,
    chart_path: Option<PathBuf>,
) -> anyhow::Result<RunResult> {
    if args.external.is_some()
        && let Some(f) = scenario
            .faults
            .iter()
            .find(|f| matches!(f.action, Action::RestartCoordinator | Action::KillLeader))
    {
        return Err(BadScenario(format!(
            "action `{}` needs the harness's own coordinator; run without --external",
            f.action.as_str()
        ))
        .into());
    }
    if args.external.is_some()
        && (scenario.coordinators.count > 1 || scenario.coordinators.store != StoreKind::Sled)
    {
        return Err(BadScenario(
            "`[coordinators]` describes the harness's own coordinators; remove it or run without --external"
                .into(),
        )
        .into());
    }
    if args.external.is_some() && scenario.autoscale.is_some() {
        return Err(BadScenario(
            "`[autoscale]` reads the harness's own coordinator's metrics; run without --external".into(),
        )
        .into());
    }
    if args.external.is_some() && scenario.target.kind == Kind::Both {
        return Err(BadScenario(
            "kind `both` needs the harness's own coordinator (`--stream` names one target); run without --external"
                .into(),
        )
        .into());
    }
    // Checked before anything starts: a broker kill needs a broker of
    // this machine.
    let kafka_port = if scenario.faults.iter().any(|f| f.action == Action::KafkaKill) {
        Some(broker::local_kafka_port(&args.brokers).map_err(|e| BadScenario(format!("{e:#}")))?)
    } else {
        None
    };
    if scenario.faults.iter().any(|f| f.action == Action::RabbitKill) {
        broker::local_amqp(&args.amqp_url).map_err(|e| BadScenario(format!("{e:#}")))?;
    }
    let profile = scenario.profile()?;
    let worker_bin = child::resolve_bin(args.worker_bin.as_deref(), "shardline-worker", "--worker-bin")?;
    let coordinator_bin = match (&args.external, &args.coordinator_bin) {
        (Some(_), Some(bin)) => bin.clone(),
        (Some(_), None) => shardline_testkit::process::bin("shardline-coordinator"),
        (None, given) => child::resolve_bin(given.as_deref(), "shardline-coordinator", "--coordinator-bin")?,
    };

    let run_id = run_id(&scenario.name);
    let base = format!("shardline-lt-{run_id}");
    let kind = scenario.target.kind;
    let kafka_access = args.kafka()?;
    let outside = match (&args.external, &args.stream) {
        (Some(_), Some(stream)) => Some(Outside { stream, receipts: args.receipts.as_deref() }),
        _ => None,
    };
    let mut plan = Plan::new(&run_id, &scenario, &base, outside);
    let pb = progress_bar();
    let receipts: Vec<String> =
        plan.sides.iter().map(|s| format!("{} {}", s.kind.as_str(), s.receipts)).collect();
    say(
        &pb,
        &format!("{}: run {run_id} ({}), receipts in {}", scenario.name, kind.as_str(), receipts.join(", ")),
    );
    if let Some(soak) = &scenario.soak {
        // The drawn schedule up front: a failing soak names its seed and
        // what the seed drew.
        let drawn: Vec<String> = scenario
            .faults
            .iter()
            .map(|f| {
                let worker = f.worker.map(|w| format!(" {w}")).unwrap_or_default();
                let len =
                    f.for_.map(|d| format!(" for {}", humantime::format_duration(d))).unwrap_or_default();
                format!("{:.0}s {}{worker}{len}", f.at.as_secs_f64(), f.action.as_str())
            })
            .collect();
        say(&pb, &format!("soak seed {}: {}", soak.seed, drawn.join(", ")));
    }

    // The receipts destinations exist before any worker could write to them.
    for side in &plan.sides {
        match side.kind {
            Kind::Rabbitmq => amqp::declare_receipts(&args.amqp_url, &side.receipts, true).await?,
            Kind::Kafka | Kind::Both => {
                shardline_testkit::kafka::create_topic(
                    &kafka_access,
                    &side.stream,
                    side.partitions,
                    plan.external,
                )
                .await?;
                shardline_testkit::kafka::create_topic(
                    &kafka_access,
                    &side.receipts,
                    kafka::RECEIPT_PARTITIONS,
                    plan.shared_receipts,
                )
                .await?;
            }
        }
    }

    // Lives until the run is over; dropped with its tables after the
    // coordinators are gone.
    let schema = match (scenario.coordinators.store, &args.external) {
        (StoreKind::Postgres, None) => Some(
            shardline_testkit::postgres::Schema::create("loadtest")
                .await
                .context("cannot create the run's PostgreSQL schema")?,
        ),
        _ => None,
    };
    let (coordinators, url) = match &args.external {
        Some(url) => (Vec::new(), url.clone()),
        None => {
            let mut config = coordinator_config(&scenario, &plan, &args.amqp_url)?;
            if kind.has_kafka() {
                config.kafka_brokers = args.brokers.clone();
                config.kafka = kafka_access.settings.clone();
                config.discovery_interval = Duration::from_secs(1);
            }
            if let Some(schema) = &schema {
                config.store = Store::Postgres(schema.url());
            }
            let mut started = Vec::new();
            for _ in 0..scenario.coordinators.count {
                started.push(Coordinator::start_with(&coordinator_bin, config.clone()).await?);
            }
            wait_leader(&started).await?;
            let url = started.iter().map(Coordinator::url).collect::<Vec<_>>().join(",");
            if started.len() > 1 {
                say(&pb, &format!("{} coordinators on PostgreSQL schema {url}", started.len()));
            }
            (started, url)
        }
    };
    let admin = Admin::new(&url)?;
    let mut expected_leases = 0;
    let external = plan.external;
    for side in &mut plan.sides {
        expected_leases += match side.kind {
            Kind::Rabbitmq => {
                let slots = wait_topology(&admin, side, external).await?;
                if external { slots } else { side.destinations.len() * scenario.target.slots() as usize }
            }
            Kind::Kafka | Kind::Both => side.partitions as usize,
        };
    }

    // One ledger per side, in the order of `plan.sides`.
    let books: Vec<Books> = plan
        .sides
        .iter()
        .map(|side| {
            Arc::new(Mutex::new(Ledger::new(&run_id, side.destinations.clone(), side.kind == Kind::Kafka)))
        })
        .collect();
    // Started before any worker: every receipt is booked as it arrives,
    // so receipt times mean processing times.
    let mut kafka_reader = None;
    let mut amqp_reader = None;
    for (side, books) in plan.sides.iter().zip(&books) {
        match side.kind {
            Kind::Rabbitmq => {
                amqp_reader = Some(amqp::ReceiptReader::start(&args.amqp_url, &side.receipts, books.clone()))
            }
            Kind::Kafka | Kind::Both => {
                kafka_reader =
                    Some(kafka::ReceiptReader::start(&kafka_access, &side.receipts, books.clone())?)
            }
        }
    }

    let template = WorkerTemplate {
        config: WorkerConfig {
            kafka_brokers: args.brokers.clone(),
            kafka: kafka_access.settings.clone(),
            amqp_url: args.amqp_url.clone(),
            handlers: child::handlers(&handler_settings(&scenario, &plan)),
            max_inflight_batches: scenario.max_inflight_batches.unwrap_or(0),
            ..WorkerConfig::default()
        },
        id_suffix: if plan.external { format!("-{run_id}") } else { String::new() },
    };
    let fleet = Arc::new(tokio::sync::Mutex::new(Fleet::new(
        coordinators,
        url.clone(),
        coordinator_bin,
        worker_bin,
        template,
    )));
    {
        let mut f = fleet.lock().await;
        if let Some(dir) = &args.logs {
            f.keep_logs(dir.clone());
        }
        for _ in 0..scenario.workers {
            f.start_worker().await?;
        }
    }
    wait_ready(&admin, &plan.destinations(), expected_leases, scenario.workers, &fleet, &pb).await?;

    // Second 0: producing starts, fault times count from here.
    let started = Instant::now();
    let start_ms = now_ms();
    for b in &books {
        lock(b).set_start(start_ms);
    }
    let plan = Arc::new(plan);
    let mut producers: Vec<Option<AbortOnDrop<anyhow::Result<()>>>> = plan
        .sides
        .iter()
        .zip(&books)
        .map(|(side, b)| {
            let task = producer(&scenario, (args, &kafka_access), &plan, side, profile.clone());
            Some(AbortOnDrop(tokio::spawn(task.run(b.clone(), started))))
        })
        .collect();
    let watch = Arc::new(Mutex::new(LeaseWatch::default()));
    let _watcher =
        AbortOnDrop(tokio::spawn(watch_leases(admin.clone(), plan.clone(), books.clone(), watch.clone())));
    let scaling = Arc::new(Mutex::new(autoscale::Log::default()));
    let stop_scaling = tokio_util::sync::CancellationToken::new();
    let mut scaler = scenario.autoscale.clone().map(|spec| {
        AbortOnDrop(tokio::spawn(autoscale::follow(autoscale::Follow {
            spec,
            fleet: fleet.clone(),
            started,
            log: scaling.clone(),
            pb: pb.clone(),
            stop: stop_scaling.clone(),
        })))
    });
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut faults = AbortOnDrop(tokio::spawn(run_faults(FaultContext {
        faults: scenario.faults.clone(),
        session_timeout: scenario.session_timeout()?,
        fleet: fleet.clone(),
        admin: admin.clone(),
        watch: watch.clone(),
        plan: plan.clone(),
        kafka_port,
        started,
        events: events.clone(),
        pb: pb.clone(),
    })));

    let mut warnings = Vec::new();
    let mut produced_at: Option<Instant> = None;
    let mut drained = false;
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_plain, mut last_check) = (Instant::now(), Instant::now());
    loop {
        tick.tick().await;
        for (side, slot) in plan.sides.iter().zip(producers.iter_mut()) {
            let Some(mut producer) = slot.take_if(|p| p.0.is_finished()) else { continue };
            let which = side.kind.as_str();
            match (&mut producer.0).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warnings.push(format!("the {which} producer stopped early: {e:#}")),
                Err(e) => warnings.push(format!("the {which} producer task failed: {e}")),
            }
        }
        if produced_at.is_none() && producers.iter().all(Option::is_none) {
            produced_at = Some(Instant::now());
        }
        let (progress, complete) = books.iter().fold((ledger::Progress::default(), true), |(sum, all), b| {
            let ledger = lock(b);
            (sum.plus(ledger.progress()), all && ledger.complete())
        });
        let phase = if produced_at.is_some() { "draining" } else { "producing" };
        let line = format!(
            "{phase}  produced {}  processed {}  lag {}{}",
            progress.acked,
            progress.processed,
            progress.lag,
            if progress.failed > 0 { format!("  unacknowledged {}", progress.failed) } else { String::new() }
        );
        pb.set_message(line.clone());
        if pb.is_hidden() && last_plain.elapsed() >= PLAIN_EVERY {
            last_plain = Instant::now();
            eprintln!("[{:>5.1}s] {line}", started.elapsed().as_secs_f64());
        }
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            // Not while a fault holds the fleet (a restart takes seconds):
            // the next check catches up.
            if let Ok(mut f) = fleet.try_lock() {
                for crash in f.check() {
                    say(&pb, &format!("crashed: {crash}"));
                }
            }
        }
        if let Some(at) = produced_at {
            if complete {
                drained = true;
                break;
            }
            if at.elapsed() >= scenario.drain_timeout {
                break;
            }
        }
    }
    let drain_s = produced_at.map_or(0.0, |at| at.elapsed().as_secs_f64());
    // The fleet stands as it is from here: a step under way finishes (a
    // drain takes seconds), then the count at the end is the run's.
    stop_scaling.cancel();
    if let Some(task) = scaler.as_mut()
        && tokio::time::timeout(Duration::from_secs(60), &mut task.0).await.is_err()
    {
        warnings.push("the autoscaler did not stop within 60 s; stopped it".into());
    }
    drop(scaler);
    if !drained {
        // What the coordinator says about the stragglers, while it still
        // runs: the first thing to look at when records are missing.
        warnings.extend(stall_report(&admin, &plan).await);
    }
    drop(producers);
    if drained {
        tokio::time::sleep(SETTLE).await;
    }
    // Faults all fall within `duration`, so the task has finished unless a
    // broker command hangs; what did run is in `events` either way.
    if tokio::time::timeout(Duration::from_secs(30), &mut faults.0).await.is_err() {
        warnings.push("the fault schedule did not finish; stopped it".into());
    }
    drop(faults);
    let lease_moves = lock_watch(&watch).moves;
    // Each move, when the watcher saw it: a fault's or the balancer's.
    for (at_ms, text) in &lock_watch(&watch).log {
        let at_s = at_ms.saturating_sub(start_ms) as f64 / 1000.0;
        warnings.push(format!("lease moved (seen at {at_s:.1} s): {text}"));
    }
    pb.finish_and_clear();

    let mut fleet = fleet.lock().await;
    let mut fault_events = events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    for cut in fault_events.iter_mut().filter_map(|e| e.event.cut.as_mut()) {
        cut.reconnect_ms = fleet.proxy(cut.worker_index).and_then(|p| p.first_up_after(cut.resumed_ms));
    }
    let crashes = {
        // A last look, so a crash in the final second is reported too.
        fleet.check();
        fleet.crashes().to_vec()
    };
    let autoscaled = scenario.autoscale.clone().map(|spec| {
        let log = scaling.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        autoscale::Summary::new(spec, scenario.workers, fleet.live_workers().len(), log)
    });
    warnings.extend(fleet.shutdown().await);
    drop(fleet);
    if let Some(reader) = kafka_reader {
        reader.stop().await?;
    }
    if let Some(reader) = amqp_reader {
        warnings.extend(reader.stop().await);
    }
    // The external fleet's own receipts destination stays its own.
    if let Some(side) = plan.side(Kind::Rabbitmq).filter(|_| !plan.shared_receipts) {
        warnings.extend(amqp::cleanup(&args.amqp_url, &side.amqp_names(), !plan.external).await);
    }

    // Each side's ledger judges its own records against the same faults,
    // each fault with the scopes it hit on that side.
    let mut parts = Vec::with_capacity(plan.sides.len());
    for (i, (side, b)) in plan.sides.iter().zip(&books).enumerate() {
        let events: Vec<FaultEvent> = fault_events.iter().map(|e| e.on_side(i)).collect();
        parts.push(report::Part { kind: side.kind, analysis: lock(b).analyze(&events)? });
    }
    let analysis = match parts.as_slice() {
        [one] => one.analysis.clone(),
        many => ledger::Analysis::combine(&many.iter().map(|p| &p.analysis).collect::<Vec<_>>()),
    };
    let outcome = report::Outcome {
        scenario: &scenario,
        run: &run_id,
        analysis: &analysis,
        parts: &parts,
        lease_moves,
        crashes: &crashes,
        warnings: &warnings,
        drained,
        drain_s,
        autoscale: autoscaled.as_ref(),
    };
    println!("{}", outcome.table());
    println!("{}", outcome.summary_line());
    let json = outcome.json();
    if let Some(path) = &json_path {
        let text = serde_json::to_string_pretty(&json).context("cannot encode the JSON report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &chart_path {
        // Faults, and each scaling step with the worker count it went to:
        // the fleet's size over time beside the lag it answered.
        let steps = autoscaled.iter().flat_map(|a| &a.log.events);
        let markers: Vec<chart::Marker> =
            analysis
                .recoveries
                .iter()
                .map(|r| chart::Marker { at_s: r.at_s, label: r.label.clone() })
                .chain(steps.map(|e| chart::Marker {
                    at_s: e.at_s,
                    label: format!("{} -> {} workers", e.from, e.to),
                }))
                .collect();
        chart::write(path, &format!("{} ({})", scenario.name, run_id), &analysis.timeline, &markers)?;
    }
    let breaches = outcome.breaches();
    let exit = if breaches.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("{}: FAILED: {}", scenario.name, breaches.join("; "));
        ExitCode::FAILURE
    };
    Ok(RunResult {
        exit,
        timeline: analysis.timeline.clone(),
        p99_ms: analysis.latency.p99_ms,
        lease_moves,
        lost: analysis.lost,
        json,
    })
}

/// Waits until one of `coordinators` leads (a sled one at once; on
/// PostgreSQL once one has won the election), so the workers' first calls
/// are answered.
async fn wait_leader(coordinators: &[Coordinator]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for c in coordinators {
            if c.leads().await {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = coordinators.iter().map(|c| c.log_tail()).collect();
            bail!("no coordinator led within 20 s of starting; their logs:\n{}", logs.join("\n---\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The leases of the run and (RabbitMQ) each subscription's queue as the
/// coordinator reports them, one line each.
async fn stall_report(admin: &Admin, plan: &Plan) -> Vec<String> {
    let mut lines = Vec::new();
    match admin.leases(&plan.destinations()).await {
        Ok(leases) => {
            let table: Vec<String> = leases
                .iter()
                .map(|l| {
                    format!("{}/{}={}", l.name, l.index, if l.owner.is_empty() { "-" } else { &l.owner })
                })
                .collect();
            lines.push(format!("at the drain timeout, leases: {}", table.join(" ")));
        }
        Err(e) => lines.push(format!("at the drain timeout, leases unknown: {e:#}")),
    }
    if let Some(side) = plan.side(Kind::Rabbitmq)
        && let Ok(subs) = admin.subscriptions().await
    {
        for s in subs.iter().filter(|s| side.destinations.contains(&s.name)) {
            lines.push(format!(
                "at the drain timeout, {}: slots {}, depth {}, consumers {}, unacked {}, retrying {}, dead-lettered {}{}",
                s.name,
                s.slots,
                s.depth,
                s.consumers,
                s.unacked,
                s.retrying,
                s.dead_lettered,
                if s.error.is_empty() { String::new() } else { format!(", error: {}", s.error) }
            ));
        }
    }
    lines
}

/// `<name>-<pid>-<ms>`: unique per run on this machine, and only
/// characters topic, queue and lease names accept.
fn run_id(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), now_ms())
}

/// The coordinator config past what the child sets (addresses, data
/// directory) and Kafka's: the scenario's `[coordinator]` keys, RabbitMQ's
/// URL, then the mappings with the scenario's `[mapping]` keys.
fn coordinator_config(s: &Scenario, plan: &Plan, amqp_url: &str) -> anyhow::Result<CoordinatorConfig> {
    let mut config: CoordinatorConfig =
        toml::Value::Table(s.coordinator.clone()).try_into().context("the scenario's `[coordinator]`")?;
    if let Some(strategy) = &s.strategy {
        config.balancer.strategy = toml::Value::from(strategy.as_str()).try_into().context("strategy")?;
    }
    // Read as a whole mapping table, so a key it does not take is refused.
    let mapping = || toml::Value::Table(s.mapping.clone());
    let stream_settings: StreamConfig = mapping().try_into().context("the scenario's `[mapping]`")?;
    let subscription: SubscriptionConfig = mapping().try_into().context("the scenario's `[mapping]`")?;
    for side in &plan.sides {
        let (stream, handler) = (side.stream.as_str(), side.handler);
        match side.kind {
            Kind::Rabbitmq => {
                config.amqp_url = amqp_url.to_owned();
                config.topics.push(TopicConfig { name: stream.to_owned(), kind: TopicKind::Fanout });
                let slots = s.target.slots();
                config.subscriptions.extend(side.destinations.iter().map(|sub| SubscriptionConfig {
                    name: sub.clone(),
                    topic: stream.to_owned(),
                    handler: handler.to_owned(),
                    min_slots: slots,
                    max_concurrency: slots,
                    ..subscription.clone()
                }));
            }
            // Nothing produced before a lease's first grant may be skipped.
            Kind::Kafka | Kind::Both => config.streams.push(StreamConfig {
                name: stream.to_owned(),
                handler: handler.to_owned(),
                starting_position: StartingPosition::TrimHorizon,
                ..stream_settings.clone()
            }),
        }
    }
    Ok(config)
}

/// The handlers each worker hosts, one per side: where its receipts go
/// and (`chaos`) how long a batch takes.
fn handler_settings(s: &Scenario, plan: &Plan) -> Vec<child::Hosted<'static>> {
    plan.sides
        .iter()
        .map(|side| {
            let destination = match side.kind {
                Kind::Rabbitmq => "exchange",
                Kind::Kafka | Kind::Both => "topic",
            };
            let mut settings = vec![(destination, side.receipts.clone())];
            if side.handler == fleet::HANDLER {
                settings
                    .push(("sleep_per_batch", humantime::format_duration(s.handler.per_batch).to_string()));
                settings
                    .push(("sleep_per_record", humantime::format_duration(s.handler.per_record).to_string()));
            }
            (side.handler, settings)
        })
        .collect()
}

/// RabbitMQ: waits until the coordinator has declared every subscription
/// (with `--external`: learns them from its topic). Returns the slot count
/// over all subscriptions.
async fn wait_topology(admin: &Admin, plan: &mut Side, external: bool) -> anyhow::Result<usize> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let listed = admin.subscriptions().await;
        if let Ok(subs) = &listed {
            if external {
                let ours: Vec<_> = subs.iter().filter(|s| s.topic == plan.stream).collect();
                if !ours.is_empty() {
                    plan.destinations = ours.iter().map(|s| s.name.clone()).collect();
                    return Ok(ours.iter().map(|s| s.slots as usize).sum());
                }
            } else {
                let declared = plan
                    .destinations
                    .iter()
                    .all(|d| subs.iter().any(|s| &s.name == d && !s.queue_type.is_empty()));
                if declared {
                    return Ok(0);
                }
            }
        }
        if Instant::now() > deadline {
            let why = match listed {
                Ok(subs) => {
                    let errors: Vec<String> = subs
                        .iter()
                        .filter(|s| !s.error.is_empty())
                        .map(|s| format!("{}: {}", s.name, s.error))
                        .collect();
                    if external {
                        format!("no subscription of topic {} is configured", plan.stream)
                    } else {
                        format!(
                            "not all declared ({})",
                            if errors.is_empty() { "no error".into() } else { errors.join("; ") }
                        )
                    }
                }
                Err(e) => format!("{e:#}"),
            };
            bail!("the coordinator's subscriptions are not ready after {READY_TIMEOUT:?}: {why}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (name, index, owner) of every lease listed.
type Owners = Vec<(String, u32, String)>;

/// Waits until every expected lease is owned and, if it comes within
/// [`BALANCE_TIMEOUT`], spread over the workers (counts within one,
/// unchanged for [`SETTLED_FOR`]): a measurement that starts with all
/// leases on the first worker measures the balancer, not the scenario, and
/// a handoff still under way would count as a lease move of the run.
async fn wait_ready(
    admin: &Admin,
    destinations: &[String],
    expected: usize,
    workers: usize,
    fleet: &tokio::sync::Mutex<Fleet>,
    pb: &ProgressBar,
) -> anyhow::Result<()> {
    if workers == 0 {
        return Ok(());
    }
    pb.set_message(format!("waiting for {expected} leases to be owned by {workers} workers"));
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut owned_since: Option<Instant> = None;
    // Since when the owners have been these.
    let mut stable: Option<(Instant, Owners)> = None;
    let mut last;
    loop {
        let crashes = fleet.lock().await.check();
        if !crashes.is_empty() {
            bail!("a process exited while starting: {}", crashes.join("\n"));
        }
        match admin.leases(destinations).await {
            Ok(leases) => {
                let (all_owned, owners) = fleet::assignment(&leases, expected);
                let owned = leases.iter().filter(|l| !l.owner.is_empty()).count();
                last = format!("{owned} of {expected} leases owned, by {owners} workers");
                // Settled: every worker owns some, the counts are within
                // one, and nothing changed hands for SETTLED_FOR; moves of
                // the first balancing would otherwise count as the run's.
                let owners_now: Owners =
                    leases.iter().map(|l| (l.name.clone(), l.index, l.owner.clone())).collect();
                if all_owned && owners >= workers.min(expected) && fleet::counts_within_one(&leases) {
                    match &stable {
                        Some((since, seen)) if *seen == owners_now => {
                            if since.elapsed() >= SETTLED_FOR {
                                return Ok(());
                            }
                        }
                        _ => stable = Some((Instant::now(), owners_now)),
                    }
                } else {
                    stable = None;
                }
                if all_owned {
                    let since = *owned_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= BALANCE_TIMEOUT {
                        say(pb, &format!("warning: starting unbalanced: {last}"));
                        return Ok(());
                    }
                }
            }
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("the fleet is not ready after {READY_TIMEOUT:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The producer for the target, owning everything it needs so it can run
/// as its own task.
enum Producer {
    Kafka(kafka::ProduceSpec),
    Amqp(amqp::ProduceSpec),
}

impl Producer {
    async fn run(self, books: Books, started: Instant) -> anyhow::Result<()> {
        match self {
            Producer::Kafka(spec) => kafka::produce(spec, books, started).await,
            Producer::Amqp(spec) => amqp::produce(spec, books, started).await,
        }
    }
}

/// The producer of `side`: each side is produced on the whole rate
/// profile.
fn producer(
    s: &Scenario,
    (args, kafka): (&Args, &KafkaAccess),
    plan: &Plan,
    side: &Side,
    profile: rate::Profile,
) -> Producer {
    match side.kind {
        Kind::Kafka | Kind::Both => Producer::Kafka(kafka::ProduceSpec {
            kafka: kafka.clone(),
            topic: side.stream.clone(),
            run: plan.run.clone(),
            partitions: side.partitions,
            keys: s.records.keys,
            size: s.records.size,
            profile,
            duration: s.duration,
        }),
        Kind::Rabbitmq => Producer::Amqp(amqp::ProduceSpec {
            url: args.amqp_url.clone(),
            exchange: side.stream.clone(),
            run: plan.run.clone(),
            keys: s.records.keys,
            size: s.records.size,
            profile,
            duration: s.duration,
        }),
    }
}

fn lock_watch(watch: &Mutex<LeaseWatch>) -> std::sync::MutexGuard<'_, LeaseWatch> {
    watch.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Lists the leases every [`WATCH_EVERY`] for the move count, the owners
/// at fault time and each partition's checkpoint advances (booked in its
/// side's ledger: whether checkpoints move after each fault). Failures (a
/// coordinator restarting) just skip a listing.
async fn watch_leases(admin: Admin, plan: Arc<Plan>, books: Vec<Books>, watch: Arc<Mutex<LeaseWatch>>) {
    let destinations = plan.destinations();
    let mut every = tokio::time::interval(WATCH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Ok(leases) = admin.leases(&destinations).await {
            let at_ms = now_ms();
            let advanced = lock_watch(&watch).update(&leases, at_ms);
            for (name, index) in advanced {
                if let Some(i) = plan.sides.iter().position(|s| s.destinations.contains(&name))
                    && let Some(b) = books.get(i)
                {
                    lock(b).checkpoint(&name, index, at_ms);
                }
            }
        }
    }
}

struct FaultContext {
    faults: Vec<Fault>,
    /// The coordinator's: when a cut-off worker's session ends.
    session_timeout: Duration,
    fleet: Arc<tokio::sync::Mutex<Fleet>>,
    admin: Admin,
    watch: Arc<Mutex<LeaseWatch>>,
    plan: Arc<Plan>,
    /// The local Kafka broker's port, when the schedule kills it.
    kafka_port: Option<u16>,
    started: Instant,
    /// Filled as faults run, so an interrupted schedule still reports.
    events: Arc<Mutex<Vec<Executed>>>,
    pb: ProgressBar,
}

/// A fault as executed: what every side's ledger needs to know about it,
/// and per side (in `plan.sides` order) the scopes it hit there.
#[derive(Debug, Clone)]
struct Executed {
    /// With no scopes: those are in `hits`.
    event: FaultEvent,
    hits: Vec<Vec<Scope>>,
}

impl Executed {
    /// The fault as side `i`'s ledger sees it.
    fn on_side(&self, i: usize) -> FaultEvent {
        FaultEvent { scopes: self.hits.get(i).cloned().unwrap_or_default(), ..self.event.clone() }
    }
}

/// Runs each fault at its time. A RabbitMQ app stopped by `rabbit_stop`
/// is started again if the schedule is interrupted before `rabbit_start`.
async fn run_faults(cx: FaultContext) {
    let mut stopped_app: Option<broker::AppStopped> = None;
    for fault in &cx.faults {
        tokio::time::sleep_until(cx.started + fault.at).await;
        if let Some(len) = fault.for_ {
            // Its line below comes when it ends; this one when it begins.
            let (action, len) = (fault.action.as_str(), humantime::format_duration(len));
            let worker = fault.worker.map(|w| format!(" worker {w}")).unwrap_or_default();
            let at = cx.started.elapsed().as_secs_f64();
            say(&cx.pb, &format!("[{at:>5.1}s] fault {action}{worker} for {len} begins"));
        }
        let done = execute(&cx, fault, &mut stopped_app).await;
        let hit: usize = done.hits.iter().map(Vec::len).sum();
        let event = &done.event;
        let what = match &event.error {
            Some(e) => format!("FAILED: {e}"),
            None if hit == 0 => String::new(),
            None => format!("({hit} affected)"),
        };
        let what = if event.ends_ms.is_some() { format!("ended {what}") } else { what };
        say(&cx.pb, &format!("[{:>5.1}s] fault {} {what}", cx.started.elapsed().as_secs_f64(), event.label));
        cx.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(done);
    }
    if let Some(guard) = stopped_app {
        // The schedule always pairs them; a failed rabbit_start leaves this.
        say(&cx.pb, "RabbitMQ's app is still stopped after the schedule: starting it");
        if let Err(e) = guard.start().await {
            say(&cx.pb, &format!("warning: cannot start RabbitMQ's app: {e:#}"));
        }
    }
}

async fn execute(cx: &FaultContext, fault: &Fault, stopped_app: &mut Option<broker::AppStopped>) -> Executed {
    let action = fault.action;
    let mut event = FaultEvent::new(action.as_str(), now_ms());
    let mut hits: Vec<Vec<Scope>> = vec![Vec::new(); cx.plan.sides.len()];
    let result: anyhow::Result<()> = async {
        match action {
            Action::Kill9 | Action::Sigstop | Action::Sigcont => {
                let index = fault.worker.context("no worker index")?;
                let id = cx.fleet.lock().await.worker_id(index).map(str::to_owned);
                let id = id.with_context(|| format!("worker {index} was never started"))?;
                event.label = format!("{} {id}", action.as_str());
                if action != Action::Sigcont {
                    hits = owned_scopes(cx, &id).await;
                    event.exclude_worker = Some(id);
                }
                let mut fleet = cx.fleet.lock().await;
                event.at_ms = now_ms();
                match action {
                    Action::Kill9 => fleet.kill9(index).await,
                    _ => fleet.signal(index, action == Action::Sigstop),
                }
            }
            Action::CutWorker | Action::DropReplies => network_fault(cx, fault, &mut event, &mut hits).await,
            Action::RabbitKill | Action::KafkaKill => broker_kill(cx, fault, &mut event, &mut hits).await,
            Action::StartWorker => {
                let mut fleet = cx.fleet.lock().await;
                event.at_ms = now_ms();
                let id = fleet.start_worker().await?;
                event.label = format!("start_worker {id}");
                Ok(())
            }
            Action::RestartCoordinator => {
                hits = cx.plan.everything_of(|_| true);
                let mut fleet = cx.fleet.lock().await;
                event.at_ms = now_ms();
                fleet.restart_coordinator().await
            }
            Action::KillLeader => {
                hits = cx.plan.everything_of(|_| true);
                kill_leader(cx, fault, &mut event).await
            }
            Action::RabbitStop => {
                // The guard first: from the command on, the app is started
                // again whatever happens to the run.
                let guard = broker::AppStopped::arm();
                broker::rabbitmqctl("stop_app").await?;
                *stopped_app = Some(guard);
                // From when the command returns: the broker is down only then.
                event.at_ms = now_ms();
                hits = cx.plan.everything_of(|k| k == Kind::Rabbitmq);
                Ok(())
            }
            Action::RabbitStart => {
                match stopped_app.take() {
                    Some(guard) => guard.start().await?,
                    None => broker::rabbitmqctl("start_app").await?,
                }
                event.at_ms = now_ms();
                hits = cx.plan.everything_of(|k| k == Kind::Rabbitmq);
                Ok(())
            }
        }
    }
    .await;
    if let Err(e) = result {
        event.error = Some(format!("{e:#}"));
    }
    Executed { event, hits }
}

/// kill_leader: reads where every lease stands, SIGKILLs the leading
/// coordinator, times the takeover (a standby's `/readyz` 200) and the
/// recovery (every partition's checkpoint past where it stood, as the new
/// leader lists it: each owner was acknowledged by it and checkpoints
/// again), and starts the killed one again `for` after the kill. The fault
/// ends with that restart, or with the recovery if that comes later (at
/// most `session_timeout` more: then it counts as never).
async fn kill_leader(cx: &FaultContext, fault: &Fault, event: &mut FaultEvent) -> anyhow::Result<()> {
    let down_for = fault.for_.context("kill_leader without `for`")?;
    let destinations = cx.plan.destinations();
    let before = cx.admin.leases(&destinations).await.context("cannot list the leases before the kill")?;
    let takeover = {
        let mut fleet = cx.fleet.lock().await;
        // Workers fence themselves within session_timeout: a takeover
        // slower than that has failed whatever happens after.
        fleet.kill_leader(cx.session_timeout, &mut event.at_ms).await?
    };
    let killed_at = Instant::now() - Duration::from_millis(takeover.takeover_ms);
    event.label =
        format!("kill_leader coordinator {} (coordinator {} took over)", takeover.killed, takeover.leader);
    let restart_at = killed_at + down_for;
    let give_up = restart_at.max(killed_at + cx.session_timeout) + cx.session_timeout;
    let (mut recovery_ms, mut restarted) = (None, false);
    loop {
        if recovery_ms.is_none()
            && let Ok(now) = cx.admin.leases(&destinations).await
            && moved_past(&before, &now)
        {
            recovery_ms = Some(u64::try_from(killed_at.elapsed().as_millis()).unwrap_or(u64::MAX));
        }
        if !restarted && Instant::now() >= restart_at {
            cx.fleet.lock().await.start_coordinator(takeover.killed).await?;
            event.ends_ms = Some(now_ms());
            restarted = true;
        }
        if restarted && (recovery_ms.is_some() || Instant::now() > give_up) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    event.failover = Some(ledger::Failover { takeover_ms: takeover.takeover_ms, recovery_ms });
    Ok(())
}

/// Whether every lease of `before` is owned in `now` and, where it has a
/// checkpoint (Kafka partitions), that checkpoint is past the one in
/// `before` (leases without one, queue slots or partitions not yet
/// checkpointed at the kill: owned suffices).
fn moved_past(before: &[fleet::LeaseView], now: &[fleet::LeaseView]) -> bool {
    before.iter().all(|b| {
        now.iter().find(|n| n.name == b.name && n.index == b.index).is_some_and(|n| {
            !n.owner.is_empty()
                && match (b.checkpoint, n.checkpoint) {
                    (Some(then), Some(now)) => now > then,
                    (Some(_), None) => false,
                    (None, _) => true,
                }
        })
    })
}

/// rabbit_kill or kafka_kill: SIGKILL of the broker, down for `for`, then
/// started again; the fault ends once the broker answers. Every lease of
/// that broker's side is hit.
async fn broker_kill(
    cx: &FaultContext,
    fault: &Fault,
    event: &mut FaultEvent,
    hits: &mut Vec<Vec<Scope>>,
) -> anyhow::Result<()> {
    let len = fault.for_.context("no duration")?;
    let (killed, side) = match fault.action {
        Action::RabbitKill => (broker::kill_rabbitmq().await?, Kind::Rabbitmq),
        _ => {
            let port = cx.kafka_port.context("no local Kafka port")?;
            (broker::kill_kafka(port).await?, Kind::Kafka)
        }
    };
    event.at_ms = now_ms();
    event.label =
        format!("{} pid {} for {}", fault.action.as_str(), killed.pid(), humantime::format_duration(len));
    *hits = cx.plan.everything_of(|k| k == side);
    tokio::time::sleep(len).await;
    let restarting = cx.started.elapsed().as_secs_f64();
    say(&cx.pb, &format!("[{restarting:>5.1}s] fault {}: starting the broker again", event.label));
    killed.restart().await?;
    event.ends_ms = Some(now_ms());
    Ok(())
}

/// cut_worker or drop_replies: sets the worker's proxy for `for`, then
/// resumes it (drop_replies also closes its connections: their HTTP/2
/// streams lost bytes) and books what the zombie count needs.
async fn network_fault(
    cx: &FaultContext,
    fault: &Fault,
    event: &mut FaultEvent,
    hits: &mut Vec<Vec<Scope>>,
) -> anyhow::Result<()> {
    let index = fault.worker.context("no worker index")?;
    let len = fault.for_.context("no duration")?;
    let (id, proxy) = {
        let fleet = cx.fleet.lock().await;
        let id = fleet.worker_id(index).map(str::to_owned);
        (id.with_context(|| format!("worker {index} was never started"))?, fleet.proxy(index))
    };
    let proxy = proxy.with_context(|| format!("worker {index} has no proxy"))?;
    let cut = fault.action == Action::CutWorker;
    event.label = format!("{} {id} for {}", fault.action.as_str(), humantime::format_duration(len));
    if cut {
        // Its leases must move once its session ends; a worker that only
        // misses replies keeps its session and its leases.
        *hits = owned_scopes(cx, &id).await;
        event.exclude_worker = Some(id);
    }
    event.at_ms = now_ms();
    proxy.set_mode(if cut { proxy::Mode::Frozen } else { proxy::Mode::DropReplies });
    tokio::time::sleep(len).await;
    // Read before resuming: the last bytes the coordinator got before or
    // during the cut.
    let last_up_ms = proxy.last_up_ms().unwrap_or(event.at_ms);
    let resumed_ms = proxy.resume(!cut);
    event.ends_ms = Some(resumed_ms);
    if cut {
        let timeout_ms = u64::try_from(cx.session_timeout.as_millis()).unwrap_or(u64::MAX);
        event.cut = Some(Cut {
            worker_index: index,
            session_end_ms: last_up_ms.saturating_add(timeout_ms),
            resumed_ms,
            reconnect_ms: None,
        });
    }
    Ok(())
}

/// The leases `worker` owns right now, as scopes per side: from a fresh
/// listing, or the last one the watcher saw if the coordinator does not
/// answer.
async fn owned_scopes(cx: &FaultContext, worker: &str) -> Vec<Vec<Scope>> {
    let owned: Vec<(String, u32)> = match cx.admin.leases(&cx.plan.destinations()).await {
        Ok(leases) => leases.into_iter().filter(|l| l.owner == worker).map(|l| (l.name, l.index)).collect(),
        Err(_) => lock_watch(&cx.watch).owned_by(worker),
    };
    let mut hits = vec![Vec::new(); cx.plan.sides.len()];
    for (name, index) in owned {
        for (side, hit) in cx.plan.sides.iter().zip(hits.iter_mut()) {
            if let Some(sub) = side.destinations.iter().position(|d| *d == name) {
                hit.push(Scope { sub, shard: Some(index) });
            }
        }
    }
    hits
}

/// A spinner on stderr: elapsed time and the live counts. Hidden (and
/// replaced by plain lines) when stderr is not a terminal.
fn progress_bar() -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    // The template is a constant; if indicatif refused it, the default
    // spinner still shows the message.
    let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    pb.set_style(style);
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// A line above the progress bar, or on stderr when the bar is hidden.
fn say(pb: &ProgressBar, line: &str) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(kind: Kind, destinations: &[&str]) -> Plan {
        Plan {
            run: "r".into(),
            sides: vec![Side {
                kind,
                stream: "lt-t".into(),
                destinations: destinations.iter().map(|d| d.to_string()).collect(),
                receipts: "lt-t-receipts".into(),
                partitions: 4,
                handler: fleet::HANDLER,
            }],
            external: false,
            shared_receipts: false,
        }
    }

    fn scenario(target: &str) -> Result<Scenario, BadScenario> {
        Scenario::parse(&format!(
            "name = \"x\"\nduration = \"20s\"\nworkers = 2\n{target}\n[rate]\nprofile = \"constant\"\n\
             per_second = 10\n[handler]\nper_batch = \"2ms\"\n[mapping]\nbatch_size = 50\n\
             retry_backoff = {{ initial = \"1s\", max = \"5s\" }}\n[coordinator]\nsession_timeout = \"3s\"\n"
        ))
    }

    #[test]
    fn recovery_needs_every_checkpoint_past_the_kill_and_every_lease_owned() {
        let at = |index: u32, owner: &str, checkpoint: Option<i64>| fleet::LeaseView {
            name: "s".into(),
            index,
            owner: owner.into(),
            parked: false,
            checkpoint,
        };
        let before = [at(0, "w0", Some(10)), at(1, "w1", None)];
        assert!(moved_past(&before, &[at(0, "w0", Some(11)), at(1, "w1", None)]));
        assert!(!moved_past(&before, &[at(0, "w0", Some(10)), at(1, "w1", None)]), "standing still");
        assert!(!moved_past(&before, &[at(0, "w0", Some(11)), at(1, "", None)]), "unowned");
        assert!(!moved_past(&before, &[at(0, "w0", Some(11))]), "not listed");
    }

    #[test]
    fn kafka_config_has_one_trim_horizon_stream_with_the_mapping() -> Result<(), Box<dyn std::error::Error>> {
        let s = scenario("[target]\nkind = \"kafka\"\npartitions = 4")?;
        let config = coordinator_config(&s, &plan(Kind::Kafka, &["lt-t"]), "amqp://x")?;
        assert_eq!(config.session_timeout, Duration::from_secs(3));
        let stream = &config.streams[0];
        assert_eq!((stream.name.as_str(), stream.handler.as_str()), ("lt-t", "chaos"));
        assert_eq!(stream.starting_position, StartingPosition::TrimHorizon);
        assert_eq!(stream.settings.batch_size, 50);
        assert_eq!(stream.settings.retry_backoff.max, Duration::from_secs(5));
        assert_eq!(config.amqp_url, CoordinatorConfig::default().amqp_url);
        assert!(config.subscriptions.is_empty());
        Ok(())
    }

    #[test]
    fn rabbitmq_config_has_a_fanout_topic_and_fixed_slot_subscriptions()
    -> Result<(), Box<dyn std::error::Error>> {
        let s = scenario("[target]\nkind = \"rabbitmq\"\nsubscriptions = 2\nslots = 3")?;
        let config =
            coordinator_config(&s, &plan(Kind::Rabbitmq, &["lt-t-s0", "lt-t-s1"]), "amqp://g:g@h/%2f")?;
        assert_eq!(config.amqp_url, "amqp://g:g@h/%2f");
        assert_eq!(config.topics[0].name, "lt-t");
        assert_eq!(config.subscriptions.len(), 2);
        let s1 = &config.subscriptions[1];
        assert_eq!((s1.name.as_str(), s1.topic.as_str()), ("lt-t-s1", "lt-t"));
        assert_eq!((s1.min_slots, s1.max_concurrency), (3, 3));
        assert_eq!(s1.settings.batch_size, 50);
        assert!(config.streams.is_empty());
        Ok(())
    }

    #[test]
    fn handler_settings_name_the_receipts_and_sleeps() -> Result<(), BadScenario> {
        let s = scenario("[target]\nkind = \"rabbitmq\"")?;
        let settings = handler_settings(&s, &plan(Kind::Rabbitmq, &["a"]));
        assert_eq!(
            settings,
            vec![(
                "chaos",
                vec![
                    ("exchange", "lt-t-receipts".to_owned()),
                    ("sleep_per_batch", "2ms".to_owned()),
                    ("sleep_per_record", "0s".to_owned())
                ]
            )]
        );
        Ok(())
    }

    #[test]
    fn whole_system_faults_hit_every_partition_or_subscription() {
        assert_eq!(plan(Kind::Kafka, &["t"]).everything_of(|_| true)[0].len(), 4);
        assert_eq!(
            plan(Kind::Rabbitmq, &["a", "b"]).everything_of(|_| true),
            vec![vec![Scope { sub: 0, shard: None }, Scope { sub: 1, shard: None }]]
        );
        assert_eq!(plan(Kind::Kafka, &["t"]).everything_of(|k| k == Kind::Rabbitmq), vec![Vec::new()]);
    }

    #[test]
    fn both_targets_share_workers_with_a_handler_each() -> Result<(), Box<dyn std::error::Error>> {
        // No `[handler]`: its sleeps are the stream's `chaos` handler's only.
        let s = Scenario::parse(
            "name = \"x\"\nduration = \"20s\"\nworkers = 2\n[target]\nkind = \"both\"\npartitions = 4\n\
             subscriptions = 2\n[rate]\nprofile = \"constant\"\nper_second = 10\n[mapping]\nbatch_size = 50\n",
        )?;
        let plan = Plan::new("r", &s, "lt-t", None);
        let kinds: Vec<(Kind, &str)> = plan.sides.iter().map(|side| (side.kind, side.handler)).collect();
        assert_eq!(kinds, vec![(Kind::Kafka, "chaos"), (Kind::Rabbitmq, "forward")]);
        assert_eq!(plan.destinations(), vec!["lt-t", "lt-t-s0", "lt-t-s1"]);
        let config = coordinator_config(&s, &plan, "amqp://g:g@h/%2f")?;
        assert_eq!(config.amqp_url, "amqp://g:g@h/%2f");
        assert_eq!(config.streams[0].handler, "chaos");
        assert_eq!(config.subscriptions[1].handler, "forward");
        assert_eq!(config.subscriptions[1].settings.batch_size, 50);
        // Each side's receipts on its own broker.
        let hosted = handler_settings(&s, &plan);
        assert_eq!(hosted[0].0, "chaos");
        assert_eq!(hosted[0].1[0], ("topic", "lt-t-receipts".to_owned()));
        assert_eq!(hosted[1], ("forward", vec![("exchange", "lt-t-receipts".to_owned())]));
        // A broker's fault hits that broker's side only.
        let hits = plan.everything_of(|k| k == Kind::Rabbitmq);
        assert_eq!((hits[0].len(), hits[1].len()), (0, 2));
        Ok(())
    }
}
