//! `shardline`: the operator's view of a coordinator: workers, leases,
//! checkpoints with lag, subscriptions, usage; moving, exporting and
//! importing checkpoints. Tables for people, `--json` for scripts.
//!
//! Online (default) it talks to the coordinator's admin API. Offline
//! (`--data-dir DIR`) it opens the coordinator's sled store directly while
//! the coordinator is stopped, and refuses a locked, foreign or newer store
//! without touching it.
//!
//! Exit status: 0 done, 1 a runtime failure (unreachable coordinator or
//! broker, locked store), 2 a usage error (bad flag, unknown lease, offset
//! out of range, malformed time or file). Nothing is written on any error.

mod backend;
mod output;

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use shardline_coordinator::config::KafkaSettings;
use shardline_coordinator::offsets::Target;
use shardline_proto::{Credentials, LeaseId, LeaseKind, TlsPem};

use crate::backend::Backend;

#[derive(Parser)]
#[command(name = "shardline", version, about = "Inspect and steer shardline: workers, leases, checkpoints")]
struct Cli {
    /// The coordinators' gRPC URLs, comma-separated (online mode): each
    /// command goes to the leader, found by trying them in order and
    /// following a standby's pointer to it.
    #[arg(long, global = true, env = "SHARDLINE_COORDINATOR", default_value = "http://127.0.0.1:7400")]
    coordinator: String,
    /// Work on a stopped coordinator's store directory instead (offline).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    /// Kafka brokers, for offsets in offline mode (default: the
    /// --kafka-config file's, else 127.0.0.1:9092).
    #[arg(long, global = true, env = "SHARDLINE_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// A coordinator's (or worker's) config file: offline mode's Kafka
    /// client uses its `kafka_brokers` and `[kafka]` properties, secrets
    /// read from their files or variables as that process does.
    #[arg(long, global = true, value_name = "FILE")]
    kafka_config: Option<std::path::PathBuf>,
    /// A librdkafka property for offline mode's Kafka client, over the
    /// --kafka-config file's (repeatable). Keep secrets in that file as
    /// `{ file = "PATH" }`: arguments show in the process list.
    #[arg(long = "kafka-property", global = true, value_name = "KEY=VALUE")]
    kafka_properties: Vec<String>,
    /// The token to present (an admin token, or a viewer token for the
    /// read-only commands). Prefer --token-file or the variable: a command
    /// line is visible to every user of the machine.
    #[arg(
        long,
        global = true,
        env = "SHARDLINE_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the token (a mounted secret).
    #[arg(long, global = true, env = "SHARDLINE_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
    /// The CA certificate (PEM) that signed an https:// coordinator's
    /// certificate; without it, the system's roots are used.
    #[arg(long, global = true, env = "SHARDLINE_TLS_CA", value_name = "PEM")]
    tls_ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM), for a coordinator that requires mutual TLS.
    #[arg(long, global = true, env = "SHARDLINE_TLS_CERT", value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "SHARDLINE_TLS_KEY", value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Workers: id, address, leases held, last heartbeat, load, health.
    Workers,
    /// Leases: owner, epoch, state, since when.
    Leases {
        /// Only the shards of this stream.
        #[arg(long, conflicts_with = "subscription")]
        stream: Option<String>,
        /// Only the queue slots of this subscription.
        #[arg(long)]
        subscription: Option<String>,
    },
    /// Per shard: checkpoint, earliest and latest offsets, lag, owner; per
    /// subscription: depth, consumers, unacked, dead-lettered.
    Checkpoints {
        #[arg(long)]
        stream: Option<String>,
    },
    /// RabbitMQ subscriptions: slots, depth, consumers, unacked, retrying, DLQ.
    Subscriptions,
    /// Read or move checkpoints.
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// Every checkpoint as JSON (stdout, or --output FILE).
    Export {
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
    },
    /// Checkpoints from an export; all are checked before any is written.
    Import {
        /// The export file (`-`: stdin).
        file: std::path::PathBuf,
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Handler time per mapping, metered in 100 ms units.
    Usage {
        /// RFC 3339 time or a duration ago (e.g. `1h`); default: all kept.
        #[arg(long)]
        since: Option<String>,
    },
    /// Is the coordinator serving?
    Health,
}

#[derive(Subcommand)]
enum CheckpointCmd {
    /// One shard's checkpoint: STREAM/PARTITION.
    Get { lease: LeaseId },
    /// Moves one shard's checkpoint; the epoch goes up, so the owner
    /// restarts from the new position.
    Set {
        lease: LeaseId,
        #[command(flatten)]
        to: To,
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Moves every shard of a stream.
    Reset {
        #[arg(long)]
        stream: String,
        #[command(flatten)]
        to: ToEdge,
        #[command(flatten)]
        confirm: Confirm,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct To {
    /// The next offset to process.
    #[arg(long)]
    offset: Option<i64>,
    #[arg(long)]
    earliest: bool,
    #[arg(long)]
    latest: bool,
    /// The first record at or after this time (RFC 3339 or Unix ms).
    #[arg(long)]
    timestamp: Option<String>,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct ToEdge {
    #[arg(long)]
    earliest: bool,
    #[arg(long)]
    latest: bool,
    /// The first record at or after this time (RFC 3339 or Unix ms).
    #[arg(long)]
    timestamp: Option<String>,
}

#[derive(Args)]
struct Confirm {
    /// Apply the change.
    #[arg(long, conflicts_with = "dry_run")]
    yes: bool,
    /// Only print what would change.
    #[arg(long)]
    dry_run: bool,
}

/// Why a command failed, and so its exit status.
#[derive(Debug)]
pub enum Failure {
    /// Bad input: exit 2.
    Usage(String),
    /// Something outside is down or refuses: exit 1.
    Runtime(String),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        match s.code() {
            Code::InvalidArgument | Code::NotFound | Code::OutOfRange | Code::FailedPrecondition => {
                Failure::Usage(s.message().to_owned())
            }
            Code::Unauthenticated => Failure::Runtime(format!(
                "{} (see --token, --token-file or a client certificate)",
                s.message()
            )),
            Code::PermissionDenied => Failure::Runtime(format!(
                "{} (an admin token or certificate is needed to change or export checkpoints)",
                s.message()
            )),
            _ => Failure::Runtime(s.message().to_owned()),
        }
    }
}

type Result<T, E = Failure> = std::result::Result<T, E>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("error: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(m)) => {
            eprintln!("error: {m}");
            ExitCode::FAILURE
        }
    }
}

/// Parses `--timestamp`: RFC 3339 or Unix milliseconds.
fn parse_time(flag: &str, value: &str) -> Result<i64> {
    if let Ok(ms) = value.parse::<i64>()
        && ms >= 0
    {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(value)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .ok_or_else(|| {
            Failure::Usage(format!(
                "{flag} `{value}` is not a time; allowed: RFC 3339 like 2026-11-27T10:00:00Z, or Unix milliseconds"
            ))
        })
}

/// Parses `--since`: a time, or a duration ago.
fn parse_since(value: &str) -> Result<i64> {
    if let Ok(ago) = humantime::parse_duration(value) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        return Ok(now.saturating_sub(ago).as_millis() as i64);
    }
    parse_time("--since", value).map_err(|_| {
        Failure::Usage(format!(
            "--since `{value}` is not a time; allowed: RFC 3339 like 2026-11-27T10:00:00Z, Unix milliseconds, or a duration ago like 1h"
        ))
    })
}

fn target(to: &To) -> Result<Target> {
    Ok(match (to.offset, to.earliest, to.latest, &to.timestamp) {
        (Some(o), ..) if o < 0 => {
            return Err(Failure::Usage(format!("--offset {o} is negative; allowed: 0 or more")));
        }
        (Some(o), ..) => Target::Offset(o),
        (_, true, ..) => Target::Earliest,
        (_, _, true, _) => Target::Latest,
        (_, _, _, Some(t)) => Target::Timestamp(parse_time("--timestamp", t)?),
        _ => {
            return Err(Failure::Usage(
                "one of --offset, --earliest, --latest, --timestamp is required".into(),
            ));
        }
    })
}

/// The token (from the flag, the variable or the file) and the TLS files.
fn credentials(cli: &Cli) -> Result<Credentials> {
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read_to_string(path).map_err(|e| Failure::Usage(format!("{flag} {}: {e}", path.display())))
    };
    let token = match (&cli.token, &cli.token_file) {
        (Some(token), _) => Some(token.clone()),
        (None, Some(path)) => {
            let token = read("--token-file", path)?.trim_end_matches(['\r', '\n']).to_owned();
            if token.is_empty() {
                return Err(Failure::Usage(format!("--token-file {}: the file is empty", path.display())));
            }
            Some(token)
        }
        (None, None) => None,
    };
    let identity = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Some((read("--tls-cert", cert)?, read("--tls-key", key)?)),
        _ => None,
    };
    let tls = match (&cli.tls_ca, identity) {
        (Some(ca), identity) => Some(TlsPem { ca: read("--tls-ca", ca)?, identity }),
        (None, None) => None,
        (None, Some(_)) => {
            return Err(Failure::Usage(
                "--tls-cert needs --tls-ca, the CA that signed the coordinator's certificate".into(),
            ));
        }
    };
    Credentials::new(token, tls).map_err(|e| Failure::Usage(format!("--token: {e}")))
}

/// Offline mode's Kafka brokers and properties: the flags over the
/// `--kafka-config` file over the default; checked as a config file's are.
fn kafka(cli: &Cli) -> Result<(String, KafkaSettings)> {
    let (mut brokers, mut kafka) = (None, KafkaSettings::default());
    if let Some(path) = &cli.kafka_config {
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("--kafka-config {shown}: cannot read it: {e}")))?;
        let mut file: toml::Table =
            toml::from_str(&text).map_err(|e| Failure::Usage(format!("--kafka-config {shown}: {e}")))?;
        brokers = file.remove("kafka_brokers").and_then(|v| v.as_str().map(str::to_owned));
        if let Some(table) = file.remove("kafka") {
            kafka = table
                .try_into()
                .map_err(|e| Failure::Usage(format!("--kafka-config {shown}: [kafka]: {e}")))?;
        }
    }
    let kafka = kafka.with_args(cli.kafka_properties.iter().map(String::as_str)).map_err(Failure::Usage)?;
    kafka.check().map_err(|e| Failure::Usage(format!("{e} (from --kafka-config or --kafka-property)")))?;
    let brokers = cli.kafka_brokers.clone().or(brokers);
    Ok((brokers.unwrap_or_else(|| shardline_coordinator::config::Config::default().kafka_brokers), kafka))
}

async fn run(cli: Cli) -> Result<()> {
    let json = cli.json;
    let mut backend = match &cli.data_dir {
        Some(dir) => {
            let (brokers, kafka) = kafka(&cli)?;
            Backend::offline(dir, &brokers, &kafka)?
        }
        None => Backend::online(&cli.coordinator, credentials(&cli)?)?,
    };
    match cli.command {
        Cmd::Workers => output::workers(&backend.workers().await?, json),
        Cmd::Leases { stream, subscription } => {
            let (kind, name) = match (stream, subscription) {
                (Some(s), _) => (Some(LeaseKind::Shard), Some(s)),
                (_, Some(q)) => (Some(LeaseKind::QueueSlot), Some(q)),
                _ => (None, None),
            };
            let leases = backend.leases().await?;
            let picked: Vec<_> = leases
                .into_iter()
                .filter(|l| {
                    let id = l.lease.as_ref().and_then(|id| LeaseId::try_from(Some(id)).ok());
                    id.is_some_and(|id| {
                        kind.is_none_or(|k| id.kind == k) && name.as_ref().is_none_or(|n| &id.name == n)
                    })
                })
                .collect();
            if let (Some(n), true) = (&name, picked.is_empty()) {
                let what = if kind == Some(LeaseKind::Shard) { "stream" } else { "subscription" };
                return Err(Failure::Usage(format!("unknown {what} `{n}`: it has no leases")));
            }
            output::leases(&picked, json)
        }
        Cmd::Checkpoints { stream } => {
            let shards = backend.checkpoints(stream.as_deref().unwrap_or_default()).await?;
            let subs =
                if stream.is_none() { backend.subscriptions().await.unwrap_or_default() } else { Vec::new() };
            output::checkpoints(&shards, &subs, json)
        }
        Cmd::Subscriptions => output::subscriptions(&backend.subscriptions().await?, json),
        Cmd::Checkpoint(CheckpointCmd::Get { lease }) => {
            let leases = backend.leases().await?;
            let found = leases.into_iter().find(|l| {
                l.lease.as_ref().is_some_and(|id| LeaseId::try_from(Some(id)).ok().as_ref() == Some(&lease))
            });
            let Some(info) = found else { return Err(Failure::Usage(format!("unknown lease `{lease}`"))) };
            output::leases(&[info], json)
        }
        Cmd::Checkpoint(CheckpointCmd::Set { lease, to, confirm }) => {
            let plan = backend.set(&lease, target(&to)?, !confirm.yes).await?;
            output::plan(&plan, confirm.dry_run, json)
        }
        Cmd::Checkpoint(CheckpointCmd::Reset { stream, to, confirm }) => {
            let to = To { offset: None, earliest: to.earliest, latest: to.latest, timestamp: to.timestamp };
            let plan = backend.reset(&stream, target(&to)?, !confirm.yes).await?;
            output::plan(&plan, confirm.dry_run, json)
        }
        Cmd::Export { output: path } => {
            let text = shardline::export::export(&backend.export().await?)
                .map_err(|e| Failure::Runtime(e.to_string()))?;
            match path {
                Some(p) => std::fs::write(&p, text)
                    .map_err(|e| Failure::Runtime(format!("cannot write {}: {e}", p.display()))),
                None => {
                    println!("{text}");
                    Ok(())
                }
            }
        }
        Cmd::Import { file, confirm } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
                    .map_err(|e| Failure::Runtime(format!("stdin: {e}")))?
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", file.display())))?
            };
            let entries = shardline::export::parse_export(&text)
                .map_err(|e| Failure::Usage(format!("{}: {e}", file.display())))?;
            let plan = backend.import(entries, !confirm.yes).await?;
            output::plan(&plan, confirm.dry_run, json)
        }
        Cmd::Usage { since } => {
            let since_ms = since.as_deref().map(parse_since).transpose()?.unwrap_or(0);
            output::usage(&backend.usage(since_ms).await?, json)
        }
        Cmd::Health => output::health(&backend.health().await?, json),
    }
}
