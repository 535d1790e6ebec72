//! The scenario file: what to run (target, load, handler, faults) and what
//! counts as passing (thresholds).
//!
//! Parsing is strict, like the binaries' own configs: every table denies
//! unknown fields, so a typo (`per_secnd`) is an error naming the field and
//! its line instead of a default silently used. Checks that serde cannot
//! express (fields of another rate profile, a fault on a worker that is
//! already dead, a key the harness sets itself) are in
//! [`Scenario::validate`] and name the field as `table.field`. Any of these
//! errors is a [`BadScenario`]: exit status 2, nothing started.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::rate::Profile;

/// A scenario that cannot run as written; the message names the field.
#[derive(Debug)]
pub struct BadScenario(pub String);

impl fmt::Display for BadScenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadScenario {}

fn bad(message: impl Into<String>) -> BadScenario {
    BadScenario(message.into())
}

/// Longest scenario name: it becomes part of topic, queue and exchange
/// names, which have length limits of their own.
const MAX_NAME: usize = 40;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// How long records are produced.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// How long to wait after producing for every record to be processed;
    /// what is still missing then is lost.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Workers started before producing begins.
    pub workers: usize,
    pub target: Target,
    #[serde(default)]
    pub records: Records,
    pub rate: Rate,
    #[serde(default)]
    pub handler: HandlerSpec,
    /// Copied into the `[[streams]]` / `[[subscriptions]]` table; the
    /// coordinator validates the values.
    #[serde(default)]
    pub mapping: toml::Table,
    /// Copied to the coordinator config's top level.
    #[serde(default)]
    pub coordinator: toml::Table,
    /// How many coordinators, on which store (default: one on sled).
    #[serde(default)]
    pub coordinators: Coordinators,
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// Draw `faults` at random (seeded) instead of listing them.
    #[serde(default)]
    pub soak: Option<Soak>,
    /// Run the whole scenario once per placement strategy, in this order,
    /// and compare how fast each drains a spike (e.g. `["count", "load"]`).
    #[serde(default)]
    pub strategies: Vec<String>,
    /// Each worker's `max_inflight_batches`: its node's capacity in
    /// concurrent batches (unset: no limit).
    #[serde(default)]
    pub max_inflight_batches: Option<u32>,
    /// The harness follows the coordinator's `shardline_desired_workers`
    /// as KEDA would, starting and stopping workers (see [`Autoscale`]).
    #[serde(default)]
    pub autoscale: Option<Autoscale>,
    /// The strategy of the current run (set by the harness from
    /// `strategies`, never read from the file).
    #[serde(skip)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub thresholds: Thresholds,
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(60)
}

/// `[autoscale]`: the harness plays KEDA. Every `interval` it reads
/// `shardline_desired_workers` from the coordinator's `/metrics` and
/// starts workers at once up to that figure, or stops the newest ones
/// (SIGTERM: they drain) once every reading for `scale_down_after` has
/// asked for fewer, down to the most any of those readings asked for (the
/// HPA's scale-down stabilisation); always within `min_workers ..=
/// max_workers`. `workers` is the count it starts from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Autoscale {
    pub min_workers: usize,
    pub max_workers: usize,
    #[serde(default = "default_scale_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_scale_down_after", with = "humantime_serde")]
    pub scale_down_after: Duration,
}

fn default_scale_interval() -> Duration {
    Duration::from_secs(2)
}

fn default_scale_down_after() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Kafka,
    Rabbitmq,
    /// A Kafka stream and a RabbitMQ topic with its subscriptions in one
    /// run, on the same workers: each is produced, read back and verified
    /// on its own, and the report has both and their sum.
    Both,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Kafka => "kafka",
            Kind::Rabbitmq => "rabbitmq",
            Kind::Both => "both",
        }
    }

    /// Whether the run has a Kafka stream.
    pub fn has_kafka(self) -> bool {
        matches!(self, Kind::Kafka | Kind::Both)
    }

    /// Whether the run has a RabbitMQ topic and subscriptions.
    pub fn has_rabbitmq(self) -> bool {
        matches!(self, Kind::Rabbitmq | Kind::Both)
    }
}

/// `[coordinators]`: the harness's coordinators. Several share one
/// PostgreSQL schema (fresh per run) and one of them leads; workers are
/// given every URL and follow the leader.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coordinators {
    #[serde(default = "one")]
    pub count: usize,
    #[serde(default)]
    pub store: StoreKind,
}

fn one() -> usize {
    1
}

impl Default for Coordinators {
    fn default() -> Self {
        Self { count: 1, store: StoreKind::Sled }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// A sled directory of the one coordinator's own.
    #[default]
    Sled,
    /// A fresh schema of the local PostgreSQL (`SHARDLINE_TEST_POSTGRES`).
    Postgres,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub kind: Kind,
    /// Kafka (and `both`): partitions of the topic (one lease each).
    pub partitions: Option<u32>,
    /// RabbitMQ (and `both`): subscriptions on one fanout topic (default 1).
    pub subscriptions: Option<u32>,
    /// RabbitMQ (and `both`): fixed queue slots per subscription (default 1).
    pub slots: Option<u32>,
}

impl Target {
    /// Kafka partitions (validated present for Kafka; 0 otherwise).
    pub fn partitions(&self) -> u32 {
        self.partitions.unwrap_or(0)
    }

    pub fn subscriptions(&self) -> u32 {
        self.subscriptions.unwrap_or(1)
    }

    pub fn slots(&self) -> u32 {
        self.slots.unwrap_or(1)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Records {
    /// Bytes of each record's value (padded JSON).
    #[serde(default = "default_size")]
    pub size: usize,
    /// Distinct keys (`k-<n>`), for the per-key order check.
    #[serde(default = "default_keys")]
    pub keys: u32,
}

fn default_size() -> usize {
    200
}

fn default_keys() -> u32 {
    1000
}

impl Default for Records {
    fn default() -> Self {
        Self { size: default_size(), keys: default_keys() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileKind {
    Constant,
    Step,
    Spike,
    Ramp,
}

impl ProfileKind {
    fn as_str(self) -> &'static str {
        match self {
            ProfileKind::Constant => "constant",
            ProfileKind::Step => "step",
            ProfileKind::Spike => "spike",
            ProfileKind::Ramp => "ramp",
        }
    }
}

/// `[rate]` as written: one flat table whose fields depend on `profile`.
/// Flat rather than a tagged enum so an error can say "`rate.from` does not
/// apply to profile `constant`" instead of serde's generic variant message.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub profile: ProfileKind,
    pub per_second: Option<f64>,
    /// `[[seconds, rate], ...]`.
    pub steps: Option<Vec<(f64, f64)>>,
    pub from: Option<f64>,
    pub to: Option<f64>,
    pub factor: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub at: Option<Duration>,
    #[serde(default, rename = "for", with = "humantime_serde")]
    pub for_: Option<Duration>,
    /// Spike: extra load only on these Kafka partitions.
    pub partitions: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerSpec {
    /// The `chaos` handler's `sleep_per_batch`.
    #[serde(default, with = "humantime_serde")]
    pub per_batch: Duration,
    /// The `chaos` handler's `sleep_per_record`.
    #[serde(default, with = "humantime_serde")]
    pub per_record: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// SIGKILL a worker.
    Kill9,
    /// Start one more worker (the next index).
    StartWorker,
    /// Freeze a worker: it stops heartbeating but keeps its sockets.
    Sigstop,
    /// Thaw a frozen worker, which may act as a zombie for a moment.
    Sigcont,
    /// SIGKILL the coordinator and start it again on the same store.
    RestartCoordinator,
    /// SIGKILL the coordinator that leads (`/readyz` 200), wait for a
    /// standby to take over, keep the killed one down for `for`, then
    /// start it again (as a supervisor would): needs
    /// `coordinators.count >= 2` on PostgreSQL.
    KillLeader,
    /// `rabbitmqctl stop_app`.
    RabbitStop,
    /// `rabbitmqctl start_app`.
    RabbitStart,
    /// Partition a worker from the coordinator for `for`: its proxy
    /// forwards nothing either way (the worker keeps its broker
    /// connections), then resumes.
    CutWorker,
    /// For `for`, the coordinator hears a worker but the worker hears no
    /// reply; then its connections are closed so it reconnects.
    DropReplies,
    /// SIGKILL RabbitMQ's Erlang VM (`beam.smp`), keep it down for `for`,
    /// then `rabbitmq-server -detached` and wait until AMQP answers.
    RabbitKill,
    /// SIGKILL the Kafka broker (tansu) listening on the run's bootstrap
    /// port, keep it down for `for`, then start it again exactly as it
    /// ran (binary, arguments, directory, log) and wait until it answers
    /// Metadata.
    KafkaKill,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Kill9 => "kill9",
            Action::StartWorker => "start_worker",
            Action::Sigstop => "sigstop",
            Action::Sigcont => "sigcont",
            Action::RestartCoordinator => "restart_coordinator",
            Action::KillLeader => "kill_leader",
            Action::RabbitStop => "rabbit_stop",
            Action::RabbitStart => "rabbit_start",
            Action::CutWorker => "cut_worker",
            Action::DropReplies => "drop_replies",
            Action::RabbitKill => "rabbit_kill",
            Action::KafkaKill => "kafka_kill",
        }
    }

    fn takes_worker(self) -> bool {
        matches!(
            self,
            Action::Kill9 | Action::Sigstop | Action::Sigcont | Action::CutWorker | Action::DropReplies
        )
    }

    /// Network faults and broker kills last `for` and then end by
    /// themselves (a killed broker is started again by the same fault, so
    /// no schedule can leave it down).
    pub fn takes_duration(self) -> bool {
        matches!(
            self,
            Action::CutWorker
                | Action::DropReplies
                | Action::RabbitKill
                | Action::KafkaKill
                | Action::KillLeader
        )
    }

    /// The broker a whole-broker fault needs in the run, if any.
    fn needs(self) -> Option<Needs> {
        match self {
            Action::RabbitStop | Action::RabbitStart | Action::RabbitKill => Some(Needs::Rabbitmq),
            Action::KafkaKill => Some(Needs::Kafka),
            _ => None,
        }
    }
}

/// The broker a fault acts on, which the run's target must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Kafka,
    Rabbitmq,
}

impl Needs {
    fn met_by(self, kind: Kind) -> bool {
        match self {
            Needs::Kafka => kind.has_kafka(),
            Needs::Rabbitmq => kind.has_rabbitmq(),
        }
    }

    /// The kinds that have it, for messages.
    fn kinds(self) -> &'static str {
        match self {
            Needs::Kafka => "`kafka` or `both`",
            Needs::Rabbitmq => "`rabbitmq` or `both`",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Since producing started.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    pub action: Action,
    /// The worker's index (0-based, in start order) for kill9, sigstop,
    /// sigcont, cut_worker and drop_replies.
    pub worker: Option<usize>,
    /// How long cut_worker and drop_replies last, and how long a killed
    /// broker stays down (rabbit_kill, kafka_kill; then it is started and
    /// the fault ends once it answers). The fault schedule waits for them:
    /// the next fault may start when this one has ended.
    #[serde(default, rename = "for", with = "humantime_serde")]
    pub for_: Option<Duration>,
}

impl Fault {
    /// When the fault is over, since producing started (a killed broker's
    /// restart takes longer; the schedule waits for it).
    pub fn ends(&self) -> Duration {
        self.at + self.for_.unwrap_or_default()
    }
}

/// `[soak]`: a fault every `every` from `every` on, each drawn from
/// `kinds` with a seeded generator, so a failing soak can be run again
/// exactly. A drawn fault that lasts holds for `hold`: cut_worker and
/// drop_replies for `for = hold`, kill9 is followed by start_worker (a
/// replacement), sigstop by sigcont and rabbit_stop by rabbit_start
/// `hold` later, and rabbit_kill and kafka_kill keep the broker down for
/// `for = hold`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Soak {
    pub seed: u64,
    #[serde(with = "humantime_serde")]
    pub every: Duration,
    /// Default: half of `every`.
    #[serde(default, with = "humantime_serde")]
    pub hold: Option<Duration>,
    /// Default: every kind the target allows (rabbit_stop and rabbit_kill
    /// with RabbitMQ, kafka_kill with Kafka; see [`SoakKind::DEFAULT`]).
    #[serde(default)]
    pub kinds: Option<Vec<SoakKind>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SoakKind {
    Kill9,
    Sigstop,
    CutWorker,
    DropReplies,
    RestartCoordinator,
    RabbitStop,
    RabbitKill,
    KafkaKill,
}

impl SoakKind {
    /// What a soak draws from when `kinds` is not given, before the
    /// target's filter.
    const DEFAULT: [SoakKind; 8] = [
        SoakKind::Kill9,
        SoakKind::Sigstop,
        SoakKind::CutWorker,
        SoakKind::DropReplies,
        SoakKind::RestartCoordinator,
        SoakKind::RabbitStop,
        SoakKind::RabbitKill,
        SoakKind::KafkaKill,
    ];

    fn on_worker(self) -> bool {
        matches!(self, SoakKind::Kill9 | SoakKind::Sigstop | SoakKind::CutWorker | SoakKind::DropReplies)
    }

    /// The fault that begins this kind (its `needs` says which target).
    fn action(self) -> Action {
        match self {
            SoakKind::Kill9 => Action::Kill9,
            SoakKind::Sigstop => Action::Sigstop,
            SoakKind::CutWorker => Action::CutWorker,
            SoakKind::DropReplies => Action::DropReplies,
            SoakKind::RestartCoordinator => Action::RestartCoordinator,
            SoakKind::RabbitStop => Action::RabbitStop,
            SoakKind::RabbitKill => Action::RabbitKill,
            SoakKind::KafkaKill => Action::KafkaKill,
        }
    }

    /// Whether a run of `kind` can have this fault.
    fn applies_to(self, kind: Kind) -> bool {
        self.action().needs().is_none_or(|needs| needs.met_by(kind))
    }
}

/// splitmix64: a few lines, fully determined by the seed, and good enough
/// to pick a fault kind and a worker.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` (n > 0) for a schedule.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    #[serde(default)]
    pub max_lost: u64,
    pub max_p99_ms: Option<f64>,
    pub max_duplicates: Option<u64>,
    /// Kafka only: first-time receipts of a key out of id order.
    pub max_order_violations: Option<u64>,
    /// Every fault with affected shards must recover within this.
    pub max_recovery_s: Option<f64>,
    /// Times a lease changed owner during the run (the lease watcher's
    /// count). Unset: no limit.
    pub max_lease_moves: Option<u64>,
    /// kill_leader: from the kill until a standby's `/readyz` is 200.
    /// Unset: the coordinators' `session_timeout` (workers fence then).
    pub max_takeover_ms: Option<u64>,
    /// Receipts a cut-off worker's handler began after its session ended
    /// and before it got through to the coordinator again (see
    /// `zombie_invocations` in the report). Unset: 0 when the scenario
    /// has a `cut_worker` fault, no limit otherwise.
    pub max_zombie_invocations: Option<u64>,
    /// After every fault ends: the longest any partition or queue slot may
    /// go without a receipt.
    pub max_stall_s: Option<f64>,
    /// After every fault ends: the longest any Kafka partition's
    /// checkpoint may stand still (as listed twice a second).
    pub max_checkpoint_stall_s: Option<f64>,
    pub min_throughput_per_s: Option<f64>,
    /// With `strategies`: the first strategy's spike drain time over the
    /// last one's must be at least this.
    pub min_speedup: Option<f64>,
    /// Spike profiles: from the spike's start until lag is back within one
    /// second of records (see `absorbed_s` in the report).
    pub max_absorbed_s: Option<f64>,
    /// With `[autoscale]`: most workers running when the run ends.
    pub max_final_workers: Option<usize>,
}

/// Mapping keys the harness writes itself: the names are per run, the
/// handler is `chaos`, slots come from `target.slots`, and
/// `starting_position` must be `trim_horizon` so nothing produced before a
/// lease is first granted is skipped (that would read as lost).
const RESERVED_MAPPING: &[&str] =
    &["name", "handler", "topic", "partitions", "starting_position", "min_slots", "max_concurrency"];

/// Coordinator keys the harness writes itself (addresses, store, brokers,
/// the mappings).
const RESERVED_COORDINATOR: &[&str] = &[
    "listen",
    "metrics_listen",
    "data_dir",
    "auth_token",
    "store",
    "advertise_url",
    "kafka_brokers",
    "discovery_interval",
    "amqp_url",
    "streams",
    "topics",
    "subscriptions",
];

/// The coordinator's own default `session_timeout`.
const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

impl Scenario {
    /// The coordinator's `session_timeout`: the scenario's, or the
    /// coordinator's default.
    pub fn session_timeout(&self) -> Result<Duration, BadScenario> {
        match self.coordinator.get("session_timeout") {
            None => Ok(DEFAULT_SESSION_TIMEOUT),
            Some(toml::Value::String(text)) => humantime::parse_duration(text)
                .map_err(|e| bad(format!("`coordinator.session_timeout` is {text:?}: {e}"))),
            Some(other) => {
                Err(bad(format!("`coordinator.session_timeout` is {other}; write a duration like \"3s\"")))
            }
        }
    }

    /// The zombie limit in force: the scenario's, or 0 when a worker is
    /// cut off (a fenced worker runs no handler once its session is over).
    pub fn max_zombie_invocations(&self) -> Option<u64> {
        self.thresholds
            .max_zombie_invocations
            .or_else(|| self.faults.iter().any(|f| f.action == Action::CutWorker).then_some(0))
    }

    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, BadScenario> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read scenario {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| bad(format!("scenario {}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Self, BadScenario> {
        // toml's message shows the line and names the unknown or mistyped
        // field; it is passed on whole.
        let mut scenario: Scenario =
            toml::from_str(text).map_err(|e| bad(e.to_string().trim_end().to_owned()))?;
        if let Some(soak) = scenario.soak.clone() {
            if !scenario.faults.is_empty() {
                return Err(bad("`soak` draws the faults; remove `faults` or `soak`"));
            }
            scenario.faults = scenario.soak_schedule(&soak)?;
        }
        // A drawn schedule is checked like a written one.
        scenario.validate()?;
        Ok(scenario)
    }

    /// The faults `soak` draws: one every `every`, while it (and its
    /// `hold`) still ends within `duration`.
    fn soak_schedule(&self, soak: &Soak) -> Result<Vec<Fault>, BadScenario> {
        let hold = soak.hold.unwrap_or(soak.every / 2);
        if soak.every < Duration::from_secs(1) {
            return Err(bad(format!("`soak.every` is {:?}; allowed: 1s or more", soak.every)));
        }
        if hold.is_zero() || hold >= soak.every {
            return Err(bad(format!(
                "`soak.hold` is {hold:?}; allowed: above 0 and below `soak.every` ({:?}), so faults do not overlap",
                soak.every
            )));
        }
        let target = self.target.kind;
        let kinds: Vec<SoakKind> = match &soak.kinds {
            Some(kinds) => {
                if kinds.is_empty() {
                    return Err(bad("`soak.kinds` is empty; omit it for every kind"));
                }
                for kind in kinds {
                    if let Some(needs) = kind.action().needs().filter(|n| !n.met_by(target)) {
                        return Err(bad(format!(
                            "`soak.kinds` has `{}`, which needs kind {}",
                            kind.action().as_str(),
                            needs.kinds()
                        )));
                    }
                }
                kinds.clone()
            }
            None => SoakKind::DEFAULT.into_iter().filter(|k| k.applies_to(target)).collect(),
        };
        if self.workers == 0 && kinds.iter().all(|k| k.on_worker()) {
            return Err(bad("`soak.kinds` are all worker faults, but `workers` is 0"));
        }
        let mut rng = SplitMix(soak.seed);
        // Live workers by index: kill9 retires one, its replacement gets
        // the next index.
        let mut live: Vec<usize> = (0..self.workers).collect();
        let mut next_index = self.workers;
        let mut faults = Vec::new();
        let fault = |at: Duration, action: Action, worker: Option<usize>, for_: Option<Duration>| Fault {
            at,
            action,
            worker,
            for_,
        };
        let mut at = soak.every;
        while at + hold < self.duration {
            let usable: Vec<SoakKind> =
                kinds.iter().copied().filter(|k| !k.on_worker() || !live.is_empty()).collect();
            let kind = usable[rng.below(usable.len())];
            let pick = if kind.on_worker() { Some(rng.below(live.len())) } else { None };
            let worker = pick.map(|i| live[i]);
            match kind {
                SoakKind::Kill9 => {
                    faults.push(fault(at, Action::Kill9, worker, None));
                    faults.push(fault(at + hold, Action::StartWorker, None, None));
                    if let Some(i) = pick {
                        live.remove(i);
                    }
                    live.push(next_index);
                    next_index += 1;
                }
                SoakKind::Sigstop => {
                    faults.push(fault(at, Action::Sigstop, worker, None));
                    faults.push(fault(at + hold, Action::Sigcont, worker, None));
                }
                SoakKind::CutWorker => faults.push(fault(at, Action::CutWorker, worker, Some(hold))),
                SoakKind::DropReplies => faults.push(fault(at, Action::DropReplies, worker, Some(hold))),
                SoakKind::RestartCoordinator => {
                    faults.push(fault(at, Action::RestartCoordinator, None, None))
                }
                SoakKind::RabbitStop => {
                    faults.push(fault(at, Action::RabbitStop, None, None));
                    faults.push(fault(at + hold, Action::RabbitStart, None, None));
                }
                SoakKind::RabbitKill | SoakKind::KafkaKill => {
                    faults.push(fault(at, kind.action(), None, Some(hold)))
                }
            }
            at += soak.every;
        }
        Ok(faults)
    }

    fn validate(&self) -> Result<(), BadScenario> {
        for st in &self.strategies {
            if st != "count" && st != "load" {
                return Err(BadScenario(format!("`strategies` has `{st}`; allowed: count, load")));
            }
        }
        if !self.strategies.is_empty() && (self.rate.at.is_none() || self.rate.for_.is_none()) {
            return Err(BadScenario(
                "`strategies` compares spike drain times; it needs a spike (`rate.at` and `rate.for`)".into(),
            ));
        }
        // The balancer's other knobs (join_window, ...) may go with
        // `strategies`; the strategy itself is the comparison's to set.
        let sets_strategy = self
            .coordinator
            .get("balancer")
            .is_some_and(|b| b.as_table().is_none_or(|t| t.contains_key("strategy")));
        if sets_strategy && !self.strategies.is_empty() {
            return Err(BadScenario(
                "`coordinator.balancer.strategy` and `strategies` both set the strategy; keep one".into(),
            ));
        }
        if self.name.is_empty()
            || self.name.len() > MAX_NAME
            || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad(format!(
                "`name` is {:?}; allowed: 1 to {MAX_NAME} of a-z, A-Z, 0-9, `-`, `_`",
                self.name
            )));
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(3600) {
            return Err(bad(format!("`duration` is {:?}; allowed: 1ms to 1h", self.duration)));
        }
        if self.drain_timeout > Duration::from_secs(3600) {
            return Err(bad(format!("`drain_timeout` is {:?}; allowed: up to 1h", self.drain_timeout)));
        }
        if self.workers > 64 {
            return Err(bad(format!("`workers` is {}; allowed: 0 to 64", self.workers)));
        }
        self.validate_target()?;
        if !(1..=1 << 20).contains(&self.records.size) {
            return Err(bad(format!("`records.size` is {}; allowed: 1 to 1048576", self.records.size)));
        }
        if !(1..=10_000_000).contains(&self.records.keys) {
            return Err(bad(format!("`records.keys` is {}; allowed: 1 to 10000000", self.records.keys)));
        }
        self.profile()?;
        for key in self.mapping.keys() {
            if RESERVED_MAPPING.contains(&key.as_str()) {
                return Err(bad(format!("`mapping.{key}` is set by the harness; remove it")));
            }
        }
        for key in self.coordinator.keys() {
            if RESERVED_COORDINATOR.contains(&key.as_str()) {
                return Err(bad(format!("`coordinator.{key}` is set by the harness; remove it")));
            }
        }
        self.session_timeout()?;
        self.validate_coordinators()?;
        self.validate_faults()?;
        self.validate_autoscale()?;
        Ok(())
    }

    /// `[autoscale]` and the thresholds that read what it did.
    fn validate_autoscale(&self) -> Result<(), BadScenario> {
        let t = &self.thresholds;
        if let Some(max) = t.max_absorbed_s {
            if self.rate.profile != ProfileKind::Spike {
                return Err(bad(
                    "`thresholds.max_absorbed_s` is timed from a spike's start; it needs profile `spike`",
                ));
            }
            if !(max.is_finite() && max > 0.0) {
                return Err(bad(format!("`thresholds.max_absorbed_s` is {max}; allowed: above 0 seconds")));
            }
        }
        let Some(a) = &self.autoscale else {
            if t.max_final_workers.is_some() {
                return Err(bad(
                    "`thresholds.max_final_workers` needs `[autoscale]` (without it the workers are fixed)",
                ));
            }
            return Ok(());
        };
        if !(1..=64).contains(&a.max_workers) {
            return Err(bad(format!("`autoscale.max_workers` is {}; allowed: 1 to 64", a.max_workers)));
        }
        if a.min_workers > a.max_workers {
            return Err(bad(format!(
                "`autoscale.min_workers` is {}; allowed: 0 to `autoscale.max_workers` ({})",
                a.min_workers, a.max_workers
            )));
        }
        if !(a.min_workers..=a.max_workers).contains(&self.workers) {
            return Err(bad(format!(
                "`workers` is {}, the count autoscaling starts from; allowed: `autoscale.min_workers` to `autoscale.max_workers` ({} to {})",
                self.workers, a.min_workers, a.max_workers
            )));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&a.interval) {
            return Err(bad(format!("`autoscale.interval` is {:?}; allowed: 100ms to 60s", a.interval)));
        }
        if a.scale_down_after > Duration::from_secs(3600) {
            return Err(bad(format!(
                "`autoscale.scale_down_after` is {:?}; allowed: 0s to 1h",
                a.scale_down_after
            )));
        }
        if !self.faults.is_empty() {
            // Faults name workers by start order, which scaling reshuffles.
            let what = if self.soak.is_some() { "soak" } else { "faults" };
            return Err(bad(format!(
                "`autoscale` starts and stops workers itself; remove `{what}` (faults name workers by start order)"
            )));
        }
        Ok(())
    }

    /// `[coordinators]`, and the faults that depend on it.
    fn validate_coordinators(&self) -> Result<(), BadScenario> {
        let c = &self.coordinators;
        if !(1..=5).contains(&c.count) {
            return Err(bad(format!("`coordinators.count` is {}; allowed: 1 to 5", c.count)));
        }
        if c.count > 1 && c.store != StoreKind::Postgres {
            return Err(bad(format!(
                "`coordinators.count` is {}, but only one coordinator can use a sled store; set `coordinators.store = \"postgres\"`",
                c.count
            )));
        }
        for (i, fault) in self.faults.iter().enumerate() {
            let action = fault.action.as_str();
            let several = c.count > 1;
            let refused = match fault.action {
                Action::KillLeader if !several => Some("needs `coordinators.count` of 2 or more"),
                Action::RestartCoordinator if several => {
                    Some("restarts the one coordinator; with several use `kill_leader`")
                }
                // Workers talk to several coordinators directly: there is
                // no proxy of theirs to cut.
                Action::CutWorker | Action::DropReplies if several => {
                    Some("needs one coordinator (each worker's proxy targets it)")
                }
                _ => None,
            };
            if let Some(why) = refused {
                return Err(bad(format!("`faults[{i}].action` `{action}` {why}")));
            }
        }
        Ok(())
    }

    fn validate_target(&self) -> Result<(), BadScenario> {
        let t = &self.target;
        let kind = t.kind.as_str();
        if t.kind.has_kafka() {
            let Some(partitions) = t.partitions else {
                return Err(bad(format!("`target.partitions` is required for kind `{kind}`")));
            };
            if !(1..=256).contains(&partitions) {
                return Err(bad(format!("`target.partitions` is {partitions}; allowed: 1 to 256")));
            }
        } else if t.partitions.is_some() {
            return Err(bad("`target.partitions` applies to kinds `kafka` and `both` only"));
        }
        if t.kind.has_rabbitmq() {
            if !(1..=16).contains(&t.subscriptions()) {
                return Err(bad(format!(
                    "`target.subscriptions` is {}; allowed: 1 to 16",
                    t.subscriptions()
                )));
            }
            if !(1..=64).contains(&t.slots()) {
                return Err(bad(format!("`target.slots` is {}; allowed: 1 to 64", t.slots())));
            }
        } else {
            for (field, value) in [("subscriptions", t.subscriptions), ("slots", t.slots)] {
                if value.is_some() {
                    return Err(bad(format!("`target.{field}` applies to kinds `rabbitmq` and `both` only")));
                }
            }
        }
        // With both targets the subscriptions run the `forward` handler
        // (the `chaos` handler has one receipts destination, and each
        // target's receipts stay on its own broker, so a fault on one
        // broker cannot stall the other target's receipts); its sleeps
        // would apply to the stream only, which a reader of the file
        // would not expect.
        if t.kind == Kind::Both && !(self.handler.per_batch.is_zero() && self.handler.per_record.is_zero()) {
            return Err(bad(
                "`handler` sleeps apply to the chaos handler, which with kind `both` runs the Kafka stream only \
                 (the subscriptions run `forward`); remove `[handler]`",
            ));
        }
        Ok(())
    }

    /// The rate profile, checking that exactly the fields of the chosen
    /// profile are set.
    pub fn profile(&self) -> Result<Profile, BadScenario> {
        let r = &self.rate;
        let kind = r.profile;
        let set: BTreeMap<&str, bool> = BTreeMap::from([
            ("per_second", r.per_second.is_some()),
            ("steps", r.steps.is_some()),
            ("from", r.from.is_some()),
            ("to", r.to.is_some()),
            ("factor", r.factor.is_some()),
            ("at", r.at.is_some()),
            ("for", r.for_.is_some()),
            ("partitions", r.partitions.is_some()),
        ]);
        let (required, optional): (&[&str], &[&str]) = match kind {
            ProfileKind::Constant => (&["per_second"], &[]),
            ProfileKind::Step => (&["steps"], &[]),
            ProfileKind::Ramp => (&["from", "to"], &[]),
            ProfileKind::Spike => (&["per_second", "factor", "at", "for"], &["partitions"]),
        };
        for (field, present) in &set {
            if *present && !required.contains(field) && !optional.contains(field) {
                return Err(bad(format!("`rate.{field}` does not apply to profile `{}`", kind.as_str())));
            }
        }
        for field in required {
            if !set.get(field).copied().unwrap_or(false) {
                return Err(bad(format!("`rate.{field}` is required for profile `{}`", kind.as_str())));
            }
        }
        let rate_ok = |field: &str, v: f64, zero_ok: bool| {
            if v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0)) && v <= 100_000.0 {
                Ok(v)
            } else {
                Err(bad(format!(
                    "`rate.{field}` is {v}; allowed: {} to 100000 records per second",
                    if zero_ok { "0" } else { "above 0" }
                )))
            }
        };
        let duration = self.duration.as_secs_f64();
        let profile = match kind {
            ProfileKind::Constant => {
                Profile::Constant { per_second: rate_ok("per_second", r.per_second.unwrap_or(0.0), false)? }
            }
            ProfileKind::Ramp => Profile::Ramp {
                from: rate_ok("from", r.from.unwrap_or(0.0), true)?,
                to: rate_ok("to", r.to.unwrap_or(0.0), true)?,
                over: duration,
            },
            ProfileKind::Step => {
                let steps = r.steps.clone().unwrap_or_default();
                if steps.first().is_none_or(|(t, _)| *t != 0.0) {
                    return Err(bad(
                        "`rate.steps` must start with a step at second 0, e.g. [[0, 500], [20, 2000]]",
                    ));
                }
                for pair in steps.windows(2) {
                    if pair[1].0 <= pair[0].0 {
                        return Err(bad(format!(
                            "`rate.steps` must be in increasing time order; {} comes after {}",
                            pair[1].0, pair[0].0
                        )));
                    }
                }
                for (i, (at, per_second)) in steps.iter().enumerate() {
                    if !at.is_finite() || *at > duration {
                        return Err(bad(format!(
                            "`rate.steps[{i}]` starts at {at} s, after the run's {duration} s"
                        )));
                    }
                    rate_ok(&format!("steps[{i}]"), *per_second, true)?;
                }
                Profile::Step { steps }
            }
            ProfileKind::Spike => {
                let per_second = rate_ok("per_second", r.per_second.unwrap_or(0.0), false)?;
                let factor = r.factor.unwrap_or(1.0);
                if !(factor.is_finite() && (1.0..=1000.0).contains(&factor)) {
                    return Err(bad(format!("`rate.factor` is {factor}; allowed: 1 to 1000")));
                }
                let at = r.at.unwrap_or_default();
                let len = r.for_.unwrap_or_default();
                if at + len > self.duration || len.is_zero() {
                    return Err(bad(format!(
                        "`rate.at` + `rate.for` is {:?} + {:?}; the spike must be non-empty and end within `duration` ({:?})",
                        at, len, self.duration
                    )));
                }
                let partitions = match &r.partitions {
                    None => None,
                    Some(list) => Some(self.spike_partitions(list)?),
                };
                Profile::Spike {
                    per_second,
                    factor,
                    at: at.as_secs_f64(),
                    len: len.as_secs_f64(),
                    partitions,
                }
            }
        };
        Ok(profile)
    }

    /// Checks a spike's partitions: Kafka only, in range, distinct, and
    /// each reachable by at least one key (the extra load is keyed like the
    /// rest so per-key order stays checkable).
    fn spike_partitions(&self, list: &[u32]) -> Result<Vec<u32>, BadScenario> {
        if self.target.kind != Kind::Kafka {
            // With `both`, the RabbitMQ side has no partitions to spike.
            return Err(bad("`rate.partitions` applies to kind `kafka` only"));
        }
        let partitions = self.target.partitions();
        if list.is_empty() {
            return Err(bad("`rate.partitions` is empty; omit it to spike every partition"));
        }
        let mut seen = Vec::new();
        for &p in list {
            if p >= partitions {
                return Err(bad(format!(
                    "`rate.partitions` names partition {p}; the topic has 0..{partitions}"
                )));
            }
            if seen.contains(&p) {
                return Err(bad(format!("`rate.partitions` names partition {p} twice")));
            }
            seen.push(p);
        }
        for &p in list {
            if !(0..self.records.keys).any(|k| super::payload::partition_of(k, partitions) == p) {
                return Err(bad(format!(
                    "no key of `records.keys` = {} maps to partition {p}; raise `records.keys`",
                    self.records.keys
                )));
            }
        }
        Ok(seen)
    }

    /// Replays the faults against worker states so a fault on a worker
    /// that is not there (never started, already killed) or in the wrong
    /// state is caught before anything starts.
    fn validate_faults(&self) -> Result<(), BadScenario> {
        #[derive(Clone, Copy, PartialEq)]
        enum State {
            Running,
            Stopped,
            Dead,
        }
        let mut workers = vec![State::Running; self.workers];
        let mut previous: Option<&Fault> = None;
        for (i, fault) in self.faults.iter().enumerate() {
            let field = format!("faults[{i}]");
            if let Some(p) = previous {
                if fault.at < p.at {
                    return Err(bad(format!(
                        "`{field}.at` is before the fault above it; list faults in time order"
                    )));
                }
                if fault.at < p.ends() {
                    return Err(bad(format!(
                        "`{field}.at` is {:?}, while the fault above it lasts until {:?}; faults run one at a time",
                        fault.at,
                        p.ends()
                    )));
                }
            }
            previous = Some(fault);
            if fault.at >= self.duration {
                return Err(bad(format!(
                    "`{field}.at` is {:?}, not within `duration` ({:?})",
                    fault.at, self.duration
                )));
            }
            let action = fault.action.as_str();
            match (fault.action.takes_duration(), fault.for_) {
                (true, None) => {
                    return Err(bad(format!("`{field}.for` is required for action `{action}`")));
                }
                (false, Some(_)) => {
                    return Err(bad(format!("`{field}.for` does not apply to action `{action}`")));
                }
                (true, Some(len)) if len.is_zero() || fault.ends() > self.duration => {
                    return Err(bad(format!(
                        "`{field}.for` is {len:?}; the fault must be non-empty and end within `duration` ({:?})",
                        self.duration
                    )));
                }
                _ => {}
            }
            match (fault.action.takes_worker(), fault.worker) {
                (true, None) => {
                    return Err(bad(format!("`{field}.worker` is required for action `{action}`")));
                }
                (false, Some(_)) => {
                    return Err(bad(format!("`{field}.worker` does not apply to action `{action}`")));
                }
                _ => {}
            }
            if let Some(needs) = fault.action.needs()
                && !needs.met_by(self.target.kind)
            {
                return Err(bad(format!("`{field}.action` `{action}` needs kind {}", needs.kinds())));
            }
            let Some(w) = fault.worker else {
                if fault.action == Action::StartWorker {
                    workers.push(State::Running);
                }
                continue;
            };
            let Some(state) = workers.get_mut(w) else {
                return Err(bad(format!(
                    "`{field}.worker` is {w}, but only {} workers exist then (0-based)",
                    workers.len()
                )));
            };
            let (need, next) = match fault.action {
                Action::Kill9 => (None, State::Dead),
                // The network around a live (or frozen) worker.
                Action::CutWorker | Action::DropReplies => (None, *state),
                Action::Sigstop => (Some(State::Running), State::Stopped),
                Action::Sigcont => (Some(State::Stopped), State::Running),
                _ => continue,
            };
            let wrong = match need {
                None => *state == State::Dead,
                Some(need) => *state != need,
            };
            if wrong {
                let now = match *state {
                    State::Running => "running",
                    State::Stopped => "stopped",
                    State::Dead => "already killed",
                };
                return Err(bad(format!("`{field}`: worker {w} is {now}; `{action}` does not apply")));
            }
            *state = next;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAILOVER: &str = r#"
name = "failover"
duration = "40s"
workers = 3
[target]
kind = "kafka"
partitions = 8
[records]
size = 200
keys = 1000
[rate]
profile = "constant"
per_second = 1000
[handler]
per_batch = "2ms"
per_record = "0ms"
[mapping]
batch_size = 100
[coordinator]
heartbeat_interval = "300ms"
session_timeout = "3s"
[[faults]]
at = "10s"
action = "kill9"
worker = 0
[thresholds]
max_lost = 0
max_p99_ms = 10000
"#;

    fn err(text: &str) -> String {
        match Scenario::parse(text) {
            Ok(_) => panic!("parsed: {text}"),
            Err(e) => e.to_string(),
        }
    }

    /// `FAILOVER` (a kafka run, 3 s sessions) with `extra` appended.
    fn with(extra: &str) -> Result<Scenario, BadScenario> {
        Scenario::parse(&format!("{FAILOVER}{extra}"))
    }

    #[test]
    fn coordinators_default_to_one_on_sled_and_kill_leader_needs_several_on_postgres()
    -> Result<(), BadScenario> {
        let s = with("")?;
        assert_eq!((s.coordinators.count, s.coordinators.store), (1, StoreKind::Sled));
        let several = "[coordinators]\ncount = 3\nstore = \"postgres\"\n";
        let kill = "[[faults]]\nat = \"20s\"\naction = \"kill_leader\"\nfor = \"3s\"\n";
        let s = with(&format!("{several}{kill}"))?;
        assert_eq!((s.coordinators.count, s.coordinators.store), (3, StoreKind::Postgres));
        assert_eq!(
            s.faults.last().map(|f| (f.action, f.for_)),
            Some((Action::KillLeader, Some(Duration::from_secs(3))))
        );
        let refused = |extra: &str, needle: &str| match with(extra) {
            Ok(_) => panic!("accepted: {extra}"),
            Err(e) => assert!(e.0.contains(needle), "{extra}: {e}"),
        };
        refused(kill, "needs `coordinators.count` of 2 or more");
        refused("[coordinators]\ncount = 2\n", "only one coordinator can use a sled store");
        refused("[coordinators]\ncount = 0\nstore = \"postgres\"\n", "allowed: 1 to 5");
        refused("[coordinators]\ncount = 2\nstore = \"mysql\"\n", "unknown variant");
        refused(
            &format!("{several}[[faults]]\nat = \"20s\"\naction = \"kill_leader\"\n"),
            "`faults[1].for` is required",
        );
        refused(
            &format!("{several}[[faults]]\nat = \"20s\"\naction = \"restart_coordinator\"\n"),
            "with several use `kill_leader`",
        );
        refused(
            &format!(
                "{several}[[faults]]\nat = \"20s\"\naction = \"cut_worker\"\nworker = 0\nfor = \"1s\"\n"
            ),
            "needs one coordinator",
        );
        Ok(())
    }

    /// `strategies` sets the strategy; the balancer's other knobs may
    /// still be set (hot-shards places workers as they join).
    #[test]
    fn strategies_leave_the_other_balancer_knobs_to_the_scenario() -> Result<(), BadScenario> {
        let hot = include_str!("../../scenarios/hot-shards.toml");
        let s = Scenario::parse(hot)?;
        assert_eq!(s.strategies, ["count", "load"]);
        let balancer = s.coordinator.get("balancer").and_then(|b| b.as_table());
        assert!(balancer.is_some_and(|b| b.contains_key("join_window")), "{balancer:?}");
        let both =
            hot.replace(r#"balancer = { join_window = "0s" }"#, r#"balancer = { strategy = "count" }"#);
        assert_ne!(both, hot, "the scenario no longer sets a join window");
        assert!(err(&both).contains("both set the strategy"), "{}", err(&both));
        Ok(())
    }

    #[test]
    fn the_documented_example_parses() -> Result<(), BadScenario> {
        let s = Scenario::parse(FAILOVER)?;
        assert_eq!(s.name, "failover");
        assert_eq!(s.duration, Duration::from_secs(40));
        assert_eq!(s.drain_timeout, Duration::from_secs(60));
        assert_eq!(s.target.partitions(), 8);
        assert_eq!(s.handler.per_batch, Duration::from_millis(2));
        assert_eq!(s.mapping.get("batch_size").and_then(|v| v.as_integer()), Some(100));
        assert_eq!(s.faults.len(), 1);
        assert_eq!(s.faults[0].action, Action::Kill9);
        assert_eq!(s.thresholds.max_p99_ms, Some(10000.0));
        assert!(matches!(s.profile()?, Profile::Constant { per_second } if per_second == 1000.0));
        Ok(())
    }

    #[test]
    fn every_shipped_scenario_is_valid() -> Result<(), Box<dyn std::error::Error>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let s = Scenario::load(&path)?;
            // The file name is the scenario name, so `run scenarios/X.toml`
            // reports as X.
            assert_eq!(path.file_stem().and_then(|n| n.to_str()), Some(s.name.as_str()));
            names.push(s.name);
        }
        names.sort();
        assert_eq!(
            names,
            [
                "autoscale",
                "autoscale-ci",
                "ci-short",
                "coordinator-failover",
                "coordinator-failover-ci",
                "coordinator-restart",
                "failover",
                "hot-shards",
                "image-ci",
                "lost-replies",
                "partition",
                "rabbit-fanout",
                "scale-out",
                "soak",
                "soak-ci",
                "spike",
                "steady",
                "zombie"
            ]
        );
        Ok(())
    }

    #[test]
    fn autoscale_is_checked_and_its_thresholds_need_it() -> Result<(), BadScenario> {
        let no_faults = FAILOVER.replace("[[faults]]\nat = \"10s\"\naction = \"kill9\"\nworker = 0\n", "");
        let auto = |table: &str| Scenario::parse(&format!("{no_faults}[autoscale]\n{table}\n"));
        let s = auto("min_workers = 1\nmax_workers = 12")?;
        let a = s.autoscale.ok_or_else(|| bad("no autoscale"))?;
        assert_eq!((a.min_workers, a.max_workers), (1, 12));
        assert_eq!((a.interval, a.scale_down_after), (Duration::from_secs(2), Duration::from_secs(10)));
        let refused = |result: Result<Scenario, BadScenario>, needle: &str| match result {
            Ok(_) => panic!("accepted; wanted {needle}"),
            Err(e) => assert!(e.0.contains(needle), "{needle}: {e}"),
        };
        refused(auto("min_workers = 1"), "missing field `max_workers`");
        refused(auto("min_workers = 1\nmax_workers = 4\ncooldown = \"1s\""), "unknown field `cooldown`");
        refused(auto("min_workers = 5\nmax_workers = 4"), "`autoscale.min_workers` is 5; allowed: 0 to");
        refused(auto("min_workers = 1\nmax_workers = 65"), "`autoscale.max_workers` is 65; allowed: 1 to 64");
        refused(
            auto("min_workers = 4\nmax_workers = 8"),
            "`workers` is 3, the count autoscaling starts from",
        );
        refused(
            auto("min_workers = 1\nmax_workers = 8\ninterval = \"10ms\""),
            "`autoscale.interval` is 10ms",
        );
        refused(
            auto("min_workers = 1\nmax_workers = 8\nscale_down_after = \"2h\""),
            "`autoscale.scale_down_after`",
        );
        refused(
            Scenario::parse(&format!("{FAILOVER}[autoscale]\nmin_workers = 1\nmax_workers = 8\n")),
            "remove `faults`",
        );
        refused(
            Scenario::parse(&no_faults.replace("max_p99_ms = 10000", "max_final_workers = 2")),
            "`thresholds.max_final_workers` needs `[autoscale]`",
        );
        refused(
            Scenario::parse(&no_faults.replace("max_p99_ms = 10000", "max_absorbed_s = 30")),
            "needs profile `spike`",
        );
        let spike = no_faults.replace(
            "profile = \"constant\"\nper_second = 1000",
            "profile = \"spike\"\nper_second = 100\nfactor = 10\nat = \"10s\"\nfor = \"10s\"",
        );
        assert!(Scenario::parse(&spike.replace("max_p99_ms = 10000", "max_absorbed_s = 30")).is_ok());
        refused(
            Scenario::parse(&spike.replace("max_p99_ms = 10000", "max_absorbed_s = -1")),
            "`thresholds.max_absorbed_s` is -1",
        );
        Ok(())
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = err(&FAILOVER.replace("per_second = 1000", "per_secnd = 1000"));
        assert!(e.contains("per_secnd"), "{e}");
        let e = err(&FAILOVER.replace("kind = \"kafka\"", "kind = \"kafka\"\nshards = 3"));
        assert!(e.contains("unknown field `shards`"), "{e}");
        let e = err(&format!("{FAILOVER}\nbogus = 1\n"));
        assert!(e.contains("bogus"), "{e}");
        let e = err(&FAILOVER.replace("worker = 0", "worker = 0\nsignal = 9"));
        assert!(e.contains("unknown field `signal`"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = err(&FAILOVER.replace("kind = \"kafka\"", "kind = \"pulsar\""));
        assert!(e.contains("pulsar"), "{e}");
        let e = err(&FAILOVER.replace("action = \"kill9\"", "action = \"reboot\""));
        assert!(e.contains("reboot"), "{e}");
        let e = err(&FAILOVER.replace("duration = \"40s\"", "duration = \"forty\""));
        assert!(e.contains("duration"), "{e}");
    }

    #[test]
    fn profile_fields_must_match_the_profile() {
        let e = err(&FAILOVER.replace("per_second = 1000", "per_second = 1000\nfrom = 5"));
        assert!(e.contains("`rate.from` does not apply to profile `constant`"), "{e}");
        let e =
            err(&FAILOVER
                .replace("profile = \"constant\"\nper_second = 1000", "profile = \"ramp\"\nfrom = 5"));
        assert!(e.contains("`rate.to` is required"), "{e}");
        let e = err(&FAILOVER.replace("per_second = 1000", "per_second = -3"));
        assert!(e.contains("`rate.per_second`"), "{e}");
        let e = err(&FAILOVER
            .replace("profile = \"constant\"\nper_second = 1000", "profile = \"step\"\nsteps = [[5, 10]]"));
        assert!(e.contains("second 0"), "{e}");
    }

    #[test]
    fn spike_partitions_are_checked() -> Result<(), BadScenario> {
        let spike = FAILOVER.replace(
            "profile = \"constant\"\nper_second = 1000",
            "profile = \"spike\"\nper_second = 500\nfactor = 10\nat = \"10s\"\nfor = \"20s\"\npartitions = [0, 1]",
        );
        let s = Scenario::parse(&spike)?;
        assert!(matches!(s.profile()?, Profile::Spike { partitions: Some(ref p), .. } if p == &[0, 1]));
        let e = err(&spike.replace("[0, 1]", "[0, 9]"));
        assert!(e.contains("partition 9"), "{e}");
        let e = err(&spike.replace("for = \"20s\"", "for = \"35s\""));
        assert!(e.contains("rate.for"), "{e}");
        Ok(())
    }

    #[test]
    fn reserved_keys_are_refused() {
        let e =
            err(&FAILOVER.replace("batch_size = 100", "batch_size = 100\nstarting_position = \"latest\""));
        assert!(e.contains("`mapping.starting_position` is set by the harness"), "{e}");
        let e =
            err(&FAILOVER
                .replace("session_timeout = \"3s\"", "session_timeout = \"3s\"\nlisten = \"0.0.0.0:1\""));
        assert!(e.contains("`coordinator.listen`"), "{e}");
    }

    #[test]
    fn faults_are_replayed_against_worker_states() {
        let e = err(&FAILOVER.replace("worker = 0", "worker = 3"));
        assert!(e.contains("`faults[0].worker` is 3"), "{e}");
        let twice = format!("{FAILOVER}\n[[faults]]\nat = \"20s\"\naction = \"kill9\"\nworker = 0\n");
        let e = err(&twice);
        assert!(e.contains("already killed"), "{e}");
        let cont = FAILOVER.replace("action = \"kill9\"", "action = \"sigcont\"");
        assert!(err(&cont).contains("is running"));
        let late = FAILOVER.replace("at = \"10s\"", "at = \"50s\"");
        assert!(err(&late).contains("not within `duration`"));
        let rabbit = FAILOVER.replace("action = \"kill9\"\nworker = 0", "action = \"rabbit_stop\"");
        assert!(err(&rabbit).contains("needs kind `rabbitmq`"));
        // A started worker can be faulted afterwards.
        let scale = format!(
            "{}\n[[faults]]\nat = \"20s\"\naction = \"kill9\"\nworker = 3\n",
            FAILOVER.replace("action = \"kill9\"\nworker = 0", "action = \"start_worker\"")
        );
        assert!(Scenario::parse(&scale).is_ok());
    }

    #[test]
    fn rabbitmq_targets_take_subscriptions_not_partitions() -> Result<(), BadScenario> {
        let rabbit = FAILOVER
            .replace("kind = \"kafka\"\npartitions = 8", "kind = \"rabbitmq\"\nsubscriptions = 2\nslots = 2");
        let s = Scenario::parse(&rabbit)?;
        assert_eq!((s.target.subscriptions(), s.target.slots()), (2, 2));
        let e = err(&FAILOVER.replace("partitions = 8", "partitions = 8\nslots = 2"));
        assert!(e.contains("`target.slots` applies to kinds `rabbitmq` and `both` only"), "{e}");
        Ok(())
    }

    #[test]
    fn network_faults_need_a_worker_and_a_duration() -> Result<(), BadScenario> {
        let cut = FAILOVER
            .replace("action = \"kill9\"\nworker = 0", "action = \"cut_worker\"\nworker = 0\nfor = \"20s\"");
        let s = Scenario::parse(&cut)?;
        assert_eq!(
            (s.faults[0].action, s.faults[0].for_),
            (Action::CutWorker, Some(Duration::from_secs(20)))
        );
        assert_eq!(s.max_zombie_invocations(), Some(0), "a cut holds zombies to 0 by default");
        assert_eq!(s.session_timeout()?, Duration::from_secs(3));
        assert_eq!(Scenario::parse(FAILOVER)?.max_zombie_invocations(), None);
        let e = err(&cut.replace("for = \"20s\"\n", ""));
        assert!(e.contains("`faults[0].for` is required for action `cut_worker`"), "{e}");
        let e = err(&cut.replace("worker = 0\n", ""));
        assert!(e.contains("`faults[0].worker` is required"), "{e}");
        let e = err(&FAILOVER.replace("worker = 0", "worker = 0\nfor = \"5s\""));
        assert!(e.contains("`faults[0].for` does not apply to action `kill9`"), "{e}");
        let e = err(&cut.replace("for = \"20s\"", "for = \"35s\""));
        assert!(e.contains("`faults[0].for`") && e.contains("end within `duration`"), "{e}");
        let e = err(&cut.replace("for = \"20s\"", "for = \"soon\""));
        assert!(e.contains("soon"), "{e}");
        let e = err(&cut.replace("for = \"20s\"", "fr = \"20s\""));
        assert!(e.contains("unknown field `fr`"), "{e}");
        // Faults run one at a time: the next may not start during a cut.
        let overlap =
            format!("{cut}\n[[faults]]\nat = \"15s\"\naction = \"drop_replies\"\nworker = 1\nfor = \"2s\"\n");
        let e = err(&overlap);
        assert!(e.contains("`faults[1].at` is 15s, while the fault above it lasts until 30s"), "{e}");
        let after = overlap.replace("at = \"15s\"", "at = \"30s\"");
        assert!(Scenario::parse(&after).is_ok());
        let dead = format!(
            "{FAILOVER}\n[[faults]]\nat = \"20s\"\naction = \"cut_worker\"\nworker = 0\nfor = \"1s\"\n"
        );
        assert!(err(&dead).contains("already killed"));
        let e = err(&cut.replace("session_timeout = \"3s\"", "session_timeout = \"three\""));
        assert!(e.contains("`coordinator.session_timeout`"), "{e}");
        Ok(())
    }

    #[test]
    fn soak_draws_a_seeded_schedule_that_replays_cleanly() -> Result<(), BadScenario> {
        let soak = FAILOVER.replace("duration = \"40s\"", "duration = \"300s\"").replace(
            "[[faults]]\nat = \"10s\"\naction = \"kill9\"\nworker = 0\n",
            "[soak]\nseed = 7\nevery = \"20s\"\n",
        );
        let a = Scenario::parse(&soak)?;
        let b = Scenario::parse(&soak)?;
        let kinds =
            |s: &Scenario| s.faults.iter().map(|f| (f.at, f.action, f.worker, f.for_)).collect::<Vec<_>>();
        assert_eq!(kinds(&a), kinds(&b), "the same seed draws the same schedule");
        let c = Scenario::parse(&soak.replace("seed = 7", "seed = 8"))?;
        assert_ne!(kinds(&a), kinds(&c), "another seed, another schedule");
        // Every 20 s from 20 s while a 10 s hold fits in 300 s: 14 draws.
        let draws =
            a.faults.iter().filter(|f| !matches!(f.action, Action::StartWorker | Action::Sigcont)).count();
        assert_eq!(draws, 14);
        assert!(a.faults.iter().all(|f| f.action != Action::RabbitStop), "Kafka: no broker stop");
        let firsts: std::collections::BTreeSet<&str> = a.faults.iter().map(|f| f.action.as_str()).collect();
        assert!(firsts.len() >= 4, "a mix of kinds: {firsts:?}");
        let e = err(&soak.replace("every = \"20s\"", "every = \"20s\"\nhold = \"25s\""));
        assert!(e.contains("`soak.hold`"), "{e}");
        let e = err(&soak.replace("every = \"20s\"", "every = \"20s\"\nkinds = [\"rabbit_stop\"]"));
        assert!(e.contains("needs kind `rabbitmq`"), "{e}");
        let e = err(&soak.replace("every = \"20s\"", "every = \"20s\"\nkinds = [\"meteor\"]"));
        assert!(e.contains("meteor"), "{e}");
        let e = err(&format!("{soak}\n[[faults]]\nat = \"10s\"\naction = \"kill9\"\nworker = 0\n"));
        assert!(e.contains("remove `faults` or `soak`"), "{e}");
        Ok(())
    }

    #[test]
    fn both_targets_take_partitions_and_subscriptions() -> Result<(), BadScenario> {
        let both = FAILOVER.replace(
            "kind = \"kafka\"\npartitions = 8",
            "kind = \"both\"\npartitions = 8\nsubscriptions = 2\nslots = 3",
        );
        let e = err(&both);
        assert!(e.contains("`handler` sleeps apply to the chaos handler"), "{e}");
        let both = both.replace("[handler]\nper_batch = \"2ms\"\nper_record = \"0ms\"\n", "");
        let s = Scenario::parse(&both)?;
        assert_eq!((s.target.partitions(), s.target.subscriptions(), s.target.slots()), (8, 2, 3));
        assert!(s.target.kind.has_kafka() && s.target.kind.has_rabbitmq());
        let e = err(&both.replace("partitions = 8\n", ""));
        assert!(e.contains("`target.partitions` is required for kind `both`"), "{e}");
        // Both brokers' faults apply.
        for action in [
            "action = \"rabbit_stop\"",
            "action = \"kafka_kill\"\nfor = \"5s\"",
            "action = \"rabbit_kill\"\nfor = \"5s\"",
        ] {
            let one = both.replace("action = \"kill9\"\nworker = 0", action);
            assert!(Scenario::parse(&one).is_ok(), "{one}");
        }
        Ok(())
    }

    #[test]
    fn broker_kills_last_for_a_while_and_need_their_broker() -> Result<(), BadScenario> {
        let kill =
            FAILOVER.replace("action = \"kill9\"\nworker = 0", "action = \"kafka_kill\"\nfor = \"5s\"");
        let s = Scenario::parse(&kill)?;
        assert_eq!((s.faults[0].action, s.faults[0].ends()), (Action::KafkaKill, Duration::from_secs(15)));
        let e = err(&kill.replace("for = \"5s\"", ""));
        assert!(e.contains("`faults[0].for` is required for action `kafka_kill`"), "{e}");
        let e = err(&kill.replace("for = \"5s\"", "for = \"5s\"\nworker = 0"));
        assert!(e.contains("`faults[0].worker` does not apply to action `kafka_kill`"), "{e}");
        let e = err(&kill.replace("kafka_kill", "rabbit_kill"));
        assert!(e.contains("`rabbit_kill` needs kind `rabbitmq` or `both`"), "{e}");
        let rabbit = kill.replace("kind = \"kafka\"\npartitions = 8", "kind = \"rabbitmq\"");
        let e = err(&rabbit);
        assert!(e.contains("`kafka_kill` needs kind `kafka` or `both`"), "{e}");
        assert!(Scenario::parse(&rabbit.replace("kafka_kill", "rabbit_kill")).is_ok());
        Ok(())
    }

    #[test]
    fn soak_kinds_follow_the_target() -> Result<(), BadScenario> {
        let soak = |kind: &str| {
            FAILOVER
                .replace("duration = \"40s\"", "duration = \"600s\"")
                .replace("kind = \"kafka\"\npartitions = 8", kind)
                .replace("[handler]\nper_batch = \"2ms\"\nper_record = \"0ms\"\n", "")
                .replace(
                    "[[faults]]\nat = \"10s\"\naction = \"kill9\"\nworker = 0\n",
                    "[soak]\nseed = 1\nevery = \"10s\"\n",
                )
        };
        let actions = |s: &Scenario| {
            s.faults.iter().map(|f| f.action.as_str()).collect::<std::collections::BTreeSet<_>>()
        };
        let kafka = actions(&Scenario::parse(&soak("kind = \"kafka\"\npartitions = 8"))?);
        assert!(kafka.contains(&"kafka_kill"), "{kafka:?}");
        assert!(!kafka.contains(&"rabbit_kill") && !kafka.contains(&"rabbit_stop"), "{kafka:?}");
        let rabbit = actions(&Scenario::parse(&soak("kind = \"rabbitmq\""))?);
        assert!(rabbit.contains(&"rabbit_kill") && rabbit.contains(&"rabbit_stop"), "{rabbit:?}");
        assert!(!rabbit.contains(&"kafka_kill"), "{rabbit:?}");
        let both = actions(&Scenario::parse(&soak("kind = \"both\"\npartitions = 8"))?);
        for a in ["kafka_kill", "rabbit_kill", "rabbit_stop", "cut_worker", "kill9"] {
            assert!(both.contains(&a), "{a:?} not drawn: {both:?}");
        }
        let e = err(&soak("kind = \"kafka\"\npartitions = 8")
            .replace("every = \"10s\"", "every = \"10s\"\nkinds = [\"rabbit_kill\"]"));
        assert!(e.contains("`soak.kinds` has `rabbit_kill`, which needs kind `rabbitmq` or `both`"), "{e}");
        Ok(())
    }

    /// The shipped soaks: the 10-minute one draws every kind of fault
    /// there is on both targets; the CI one stays short.
    #[test]
    fn shipped_soaks_draw_every_kind_on_both_targets() -> Result<(), BadScenario> {
        let load = |name: &str| {
            Scenario::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("scenarios/{name}.toml")))
        };
        let soak = load("soak")?;
        assert_eq!((soak.target.kind, soak.duration), (Kind::Both, Duration::from_secs(600)));
        let drawn: std::collections::BTreeSet<&str> = soak.faults.iter().map(|f| f.action.as_str()).collect();
        for kind in SoakKind::DEFAULT {
            assert!(drawn.contains(kind.action().as_str()), "{:?} not drawn: {drawn:?}", kind);
        }
        let ci = load("soak-ci")?;
        assert_eq!((ci.target.kind, ci.duration), (Kind::Both, Duration::from_secs(60)));
        let begun = ci
            .faults
            .iter()
            .filter(|f| !matches!(f.action, Action::StartWorker | Action::Sigcont | Action::RabbitStart));
        assert!((3..=5).contains(&begun.count()), "{:?}", ci.faults);
        Ok(())
    }
}
