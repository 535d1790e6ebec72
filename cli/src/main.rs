//! `shardline`: the operator's view of a running coordinator (its admin
//! API): workers, leases, checkpoints. Tables for people, `--json` for
//! scripts. Exit status 2 for usage errors, 1 for runtime failures.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use shardline_proto::LeaseId;
use shardline_proto::v1::{self, admin_api_client::AdminApiClient};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "shardline", version, about = "Inspect and steer a shardline coordinator")]
struct Cli {
    /// The coordinator's gRPC URL.
    #[arg(long, global = true, env = "SHARDLINE_COORDINATOR", default_value = "http://127.0.0.1:7400")]
    coordinator: String,
    /// Shared token, when the coordinator requires one.
    #[arg(long, global = true, env = "SHARDLINE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Live workers: id, leases held, last heartbeat.
    Workers,
    /// Leases: owner, epoch, state, checkpoint.
    Leases {
        /// Only this stream or subscription.
        #[arg(long)]
        name: Option<String>,
    },
    /// RabbitMQ subscriptions: slots, depth, retrying, dead-lettered.
    Subscriptions,
    /// Read or move one checkpoint.
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// Is the coordinator serving?
    Health,
}

#[derive(Subcommand)]
enum CheckpointCmd {
    /// Shows one lease's checkpoint: STREAM/PARTITION or SUBSCRIPTION#SLOT.
    Get { lease: LeaseId },
    /// Sets a checkpoint (bumps the epoch so the owner restarts from it).
    Set {
        lease: LeaseId,
        /// The next offset to process.
        #[arg(long)]
        offset: i64,
        /// Do it; without this, only say what would change.
        #[arg(long)]
        yes: bool,
    },
}

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
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Admin {
    client: AdminApiClient<Channel>,
    token: Option<String>,
}

impl Admin {
    async fn connect(url: &str, token: Option<String>) -> Result<Self> {
        let client = AdminApiClient::connect(url.to_owned()).await.with_context(|| {
            format!("cannot reach the coordinator at {url} (is it running? see --coordinator)")
        })?;
        Ok(Self { client, token })
    }

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

async fn run(cli: Cli) -> Result<()> {
    let mut admin = Admin::connect(&cli.coordinator, cli.token.clone()).await?;
    match cli.command {
        Cmd::Workers => {
            let req = admin.req(v1::ListWorkersRequest {});
            let workers = admin.client.list_workers(req).await?.into_inner().workers;
            if cli.json {
                let rows: Vec<_> = workers
                    .iter()
                    .map(|w| {
                        serde_json::json!({
                            "worker_id": w.worker_id, "address": w.address, "handlers": w.handlers,
                            "leases": w.leases, "last_heartbeat_ms_ago": w.last_heartbeat_ms_ago,
                            "restored": w.restored,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<32} {:>7} {:>14}  HANDLERS", "WORKER", "LEASES", "LAST BEAT");
                for w in workers {
                    let beat = if w.restored {
                        "restored".to_owned()
                    } else {
                        format!("{}ms ago", w.last_heartbeat_ms_ago)
                    };
                    println!("{:<32} {:>7} {:>14}  {}", w.worker_id, w.leases, beat, w.handlers.join(","));
                }
            }
        }
        Cmd::Leases { name } => {
            let req = admin.req(v1::ListLeasesRequest { name: name.unwrap_or_default() });
            let leases = admin.client.list_leases(req).await?.into_inner().leases;
            print_leases(&leases, cli.json)?;
        }
        Cmd::Subscriptions => {
            let req = admin.req(v1::ListSubscriptionsRequest {});
            let subs = admin.client.list_subscriptions(req).await.map_err(status)?.into_inner().subscriptions;
            print_subscriptions(&subs, cli.json)?;
        }
        Cmd::Checkpoint(CheckpointCmd::Get { lease }) => {
            let req = admin.req(v1::GetCheckpointRequest { lease: Some((&lease).into()) });
            let info = admin.client.get_checkpoint(req).await.map_err(status)?.into_inner();
            print_leases(&[info], cli.json)?;
        }
        Cmd::Checkpoint(CheckpointCmd::Set { lease, offset, yes }) => {
            if offset < 0 {
                bail!("--offset {offset} is negative; allowed: 0 or more");
            }
            let req = admin.req(v1::GetCheckpointRequest { lease: Some((&lease).into()) });
            let info = admin.client.get_checkpoint(req).await.map_err(status)?.into_inner();
            let current = info.checkpoint.map_or("none".to_owned(), |c| c.to_string());
            println!("{lease}: checkpoint {current} -> {offset}; epoch {} -> {}", info.epoch, info.epoch + 1);
            if !yes {
                println!("dry run: add --yes to apply");
                return Ok(());
            }
            let req = admin.req(v1::SetCheckpointRequest { lease: Some((&lease).into()), offset });
            let info = admin.client.set_checkpoint(req).await.map_err(status)?.into_inner();
            print_leases(&[info], cli.json)?;
        }
        Cmd::Health => {
            let reply = admin.client.health(admin.req(v1::HealthRequest {})).await?.into_inner();
            println!(
                "{} (version {}, {} workers, {} leases)",
                reply.status, reply.version, reply.workers, reply.leases
            );
        }
    }
    Ok(())
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

fn state(s: i32) -> &'static str {
    match v1::LeaseState::try_from(s) {
        Ok(v1::LeaseState::Owned) => "owned",
        Ok(v1::LeaseState::Releasing) => "releasing",
        Ok(v1::LeaseState::Unassigned) => "unassigned",
        Ok(v1::LeaseState::Parked) => "parked",
        _ => "unknown",
    }
}

fn print_leases(leases: &[v1::LeaseInfo], json: bool) -> Result<()> {
    let id =
        |l: &v1::LeaseInfo| LeaseId::try_from(l.lease.as_ref()).map_or("?".to_owned(), |i| i.to_string());
    if json {
        let rows: Vec<_> = leases
            .iter()
            .map(|l| {
                serde_json::json!({
                    "lease": id(l), "owner": (!l.owner.is_empty()).then_some(&l.owner), "epoch": l.epoch,
                    "state": state(l.state), "checkpoint": l.checkpoint, "since_ms_ago": l.since_ms_ago,
                    "handoff_to": (!l.handoff_to.is_empty()).then_some(&l.handoff_to), "handler": l.handler,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<28} {:<24} {:>6} {:<11} {:>12} {:>10}",
        "LEASE", "OWNER", "EPOCH", "STATE", "CHECKPOINT", "SINCE"
    );
    for l in leases {
        let owner = if l.owner.is_empty() { "-" } else { &l.owner };
        let checkpoint = l.checkpoint.map_or("-".to_owned(), |c| c.to_string());
        let since = format!("{}s", l.since_ms_ago / 1000);
        println!(
            "{:<28} {:<24} {:>6} {:<11} {:>12} {:>10}",
            id(l),
            owner,
            l.epoch,
            state(l.state),
            checkpoint,
            since
        );
    }
    Ok(())
}

fn print_subscriptions(subs: &[v1::SubscriptionInfo], json: bool) -> Result<()> {
    if json {
        let rows: Vec<_> = subs
            .iter()
            .map(|s| {
                serde_json::json!({
                    "subscription": s.name, "topic": s.topic, "handler": s.handler, "queue_type": s.queue_type,
                    "slots": s.slots, "min_slots": s.min_slots, "max_concurrency": s.max_concurrency,
                    "depth": s.depth, "consumers": s.consumers, "unacked": s.unacked, "retrying": s.retrying,
                    "dead_lettered": s.dead_lettered, "drain_rate": s.drain_rate,
                    "read_ms_ago": s.read_ms_ago, "error": (!s.error.is_empty()).then_some(&s.error),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<16} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9}",
        "SUBSCRIPTION", "TOPIC", "SLOTS", "DEPTH", "CONSUMERS", "UNACKED", "RETRYING", "DLQ", "MSG/S"
    );
    for s in subs {
        println!(
            "{:<24} {:<16} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9.1}",
            s.name,
            s.topic,
            format!("{}/{}", s.slots, s.max_concurrency),
            s.depth,
            s.consumers,
            s.unacked,
            s.retrying,
            s.dead_lettered,
            s.drain_rate
        );
        if !s.error.is_empty() {
            println!("  error: {}", s.error);
        }
    }
    Ok(())
}
