//! The container image (the top-level `Dockerfile`), run the way users run
//! it. `scripts/image.sh build` makes it from this checkout's binaries
//! (the machine must have run `scripts/image.sh setup`, as
//! `scripts/test.sh` does); then a coordinator and two workers run as
//! containers (`--network host`: the brokers on 127.0.0.1; each config
//! mounted read-only; the coordinator's sled store on a named volume),
//! from deploy/compose's config files with the brokers set by the
//! `SHARDLINE_*` variables the compose file sets. The load harness runs
//! `image-ci` against them with `--external`: nothing lost. Each worker
//! container then drains on `docker stop` (every lease it held released,
//! exit 0), and so does the coordinator. Prints the image size and the
//! time from `docker run` to `/readyz` 200 (deploy/README.md quotes them).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use shardline_proto::StartingPosition;
use shardline_proto::v1::{self, admin_api_client::AdminApiClient};
use shardline_testkit::config::{self, CoordinatorConfig, StreamConfig, WorkerConfig};
use shardline_tests::{bin, eventually, free_port, http_status, kafka_brokers, unique};

/// The tag `scripts/image.sh build` gives the image here.
const IMAGE: &str = "shardline:e2e";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Debian's client (`docker.io`), as scripts/image.sh uses, else the one
/// on PATH.
fn docker() -> Command {
    let debian = Path::new("/usr/bin/docker");
    Command::new(if debian.exists() { debian } else { Path::new("docker") })
}

/// Runs `docker ARGS`; its stdout, or an error with its stderr.
fn run_docker(args: &[&str]) -> Result<String> {
    let out = docker().args(args).output().with_context(|| format!("cannot run docker {args:?}"))?;
    ensure!(out.status.success(), "docker {args:?} failed ({}): {}", out.status, text(&out.stderr));
    Ok(text(&out.stdout))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

/// A container, removed with its anonymous volumes when dropped.
struct Container {
    name: String,
}

impl Container {
    /// `docker run -d --network host` with `args` before the image and
    /// `command` after it.
    fn run(name: &str, args: &[String], command: &[&str]) -> Result<Self> {
        let mut all = vec!["run", "-d", "--name", name, "--network", "host"];
        all.extend(args.iter().map(String::as_str));
        all.push(IMAGE);
        all.extend(command);
        run_docker(&all)?;
        Ok(Self { name: name.to_owned() })
    }

    fn logs(&self) -> Result<String> {
        let out: Output = docker().args(["logs", &self.name]).output()?;
        Ok(format!("{}\n{}", text(&out.stdout), text(&out.stderr)))
    }

    /// `docker stop` (SIGTERM, then SIGKILL after `grace`); the exit code.
    fn stop(&self, grace: Duration) -> Result<i64> {
        run_docker(&["stop", "-t", &grace.as_secs().to_string(), &self.name])?;
        let code = run_docker(&["inspect", "--format", "{{.State.ExitCode}}", &self.name])?;
        code.parse().with_context(|| format!("exit code `{code}` of {}", self.name))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = run_docker(&["rm", "-f", "-v", &self.name]) {
            eprintln!("warning: cannot remove container {}: {e:#}", self.name);
        }
    }
}

/// A named volume, removed when dropped (after the containers using it).
struct Volume(String);

impl Drop for Volume {
    fn drop(&mut self) {
        if let Err(e) = run_docker(&["volume", "rm", &self.0]) {
            eprintln!("warning: cannot remove volume {}: {e:#}", self.0);
        }
    }
}

/// Waits for `/readyz` at `addr` to answer 200; how long since `since`.
async fn ready(addr: SocketAddr, since: Instant, who: &Container) -> Result<Duration> {
    let waited = eventually(Duration::from_secs(60), &format!("{} /readyz 200", who.name), || async {
        let (status, body) = http_status(&addr.to_string(), "/readyz").await?;
        ensure!(status == 200, "{status}: {}", body.trim_end());
        Ok(Some(since.elapsed()))
    })
    .await;
    waited.with_context(|| format!("{}'s log:\n{}", who.name, who.logs().unwrap_or_default()))
}

fn loopback() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// A file of `dir` the container user (uid 10001) can read.
fn write_config(dir: &Path, name: &str, value: &impl serde::Serialize) -> Result<String> {
    let path = dir.join(name);
    config::write(&path, value)?;
    path.into_os_string().into_string().map_err(|p| anyhow::anyhow!("a path that is not UTF-8: {p:?}"))
}

async fn leases(url: &str, topic: &str) -> Result<Vec<v1::LeaseInfo>> {
    let mut admin = AdminApiClient::connect(url.to_owned()).await.context("connect admin API")?;
    let all = admin.list_leases(v1::ListLeasesRequest::default()).await?.into_inner().leases;
    Ok(all.into_iter().filter(|l| l.lease.as_ref().is_some_and(|l| l.name == topic)).collect())
}

/// The leases of the worker log lines saying `what` (`lease acquired`,
/// `lease released`): their `lease=` field.
fn logged(logs: &str, what: &str) -> BTreeSet<String> {
    logs.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| l.split("lease=").nth(1)?.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn lease_names(leases: &[v1::LeaseInfo], owner: &str) -> BTreeSet<String> {
    leases
        .iter()
        .filter(|l| l.owner == owner)
        .filter_map(|l| l.lease.as_ref().map(|id| format!("{}/{}", id.name, id.index)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_a_coordinator_and_draining_workers_that_lose_nothing() -> Result<()> {
    // The image, from the binaries the other tests run (checked fresh).
    let worker_bin = bin("shardline-worker");
    let bin_dir = worker_bin.parent().context("the binaries' directory")?;
    for name in ["shardline-coordinator", "shardline"] {
        bin(name);
    }
    let built = Command::new(workspace().join("scripts/image.sh"))
        .args(["build", &bin_dir.to_string_lossy()])
        .env("SHARDLINE_IMAGE", IMAGE)
        .output()
        .context("cannot run scripts/image.sh")?;
    ensure!(built.status.success(), "scripts/image.sh build failed:\n{}", text(&built.stderr));
    let size: u64 = run_docker(&["image", "inspect", "--format", "{{.Size}}", IMAGE])?.parse()?;

    let (topic, receipts) = (unique("image"), unique("image-receipts"));
    let kafka = shardline_tests::kafka();
    shardline_testkit::kafka::create_topic(&kafka, &topic, 4, false).await?;
    shardline_testkit::kafka::create_topic(&kafka, &receipts, 4, false).await?;

    // deploy/compose's configs, with this machine's addresses (host
    // network: each process its own loopback port) and the test's stream
    // in place of the evaluation's mappings.
    let compose = workspace().join("deploy/compose");
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut coordinator: CoordinatorConfig =
        config::parse(&std::fs::read_to_string(compose.join("coordinator.toml"))?)?;
    let (listen, c_metrics) = (loopback()?, loopback()?);
    coordinator.listen = listen;
    coordinator.metrics_listen = Some(c_metrics);
    coordinator.discovery_interval = Duration::from_secs(1);
    coordinator.streams = vec![StreamConfig {
        starting_position: StartingPosition::TrimHorizon,
        ..StreamConfig::new(&topic, "chaos")
    }];
    // The evaluation's RabbitMQ topology is not this test's to declare.
    coordinator.topics.clear();
    coordinator.subscriptions.clear();
    let c_config = write_config(dir.path(), "coordinator.toml", &coordinator)?;
    let worker: WorkerConfig = config::parse(&std::fs::read_to_string(compose.join("worker.toml"))?)?;
    let brokers = [
        format!("SHARDLINE_KAFKA_BROKERS={}", kafka_brokers()),
        format!("SHARDLINE_AMQP_URL={}", shardline_tests::amqp::amqp_url()),
    ];
    let env = |extra: &[String]| -> Vec<String> {
        brokers.iter().chain(extra).flat_map(|e| ["--env".to_owned(), e.clone()]).collect()
    };

    let volume = Volume(unique("shardline-e2e-data"));
    run_docker(&["volume", "create", &volume.0])?;
    let started = Instant::now();
    let mut args = env(&[]);
    args.extend([
        "--volume".to_owned(),
        format!("{c_config}:/etc/shardline/coordinator.toml:ro"),
        "--volume".to_owned(),
        format!("{}:/var/lib/shardline", volume.0),
    ]);
    // The image's default command: the coordinator on that config.
    let c = Container::run(&unique("shardline-e2e-coordinator"), &args, &[])?;
    let coordinator_ready = ready(c_metrics, started, &c).await?;
    let url = format!("http://{listen}");

    let mut workers = Vec::new();
    let mut worker_ready = Duration::ZERO;
    for id in ["image-w1", "image-w2"] {
        let metrics = loopback()?;
        let config = WorkerConfig {
            metrics_listen: Some(metrics),
            handlers: config::hosting("chaos", &[("topic", receipts.as_str())]).handlers,
            ..worker.clone()
        };
        let path = write_config(dir.path(), &format!("{id}.toml"), &config)?;
        let started = Instant::now();
        let mut args = env(&[format!("SHARDLINE_COORDINATOR={url}")]);
        args.extend(["--volume".to_owned(), format!("{path}:/etc/shardline/worker.toml:ro")]);
        let command = ["shardline-worker", "--config", "/etc/shardline/worker.toml", "--worker-id", id];
        let w = Container::run(&unique(&format!("shardline-e2e-{id}")), &args, &command)?;
        worker_ready = worker_ready.max(ready(metrics, started, &w).await?);
        workers.push((id, w));
    }
    eventually(Duration::from_secs(30), "both workers owning leases", || async {
        let leases = leases(&url, &topic).await?;
        let owners: BTreeSet<&str> = leases.iter().map(|l| l.owner.as_str()).collect();
        ensure!(leases.len() == 4 && owners == BTreeSet::from(["image-w1", "image-w2"]), "{leases:?}");
        Ok(Some(()))
    })
    .await?;

    // Load through the containers, receipts from their own `chaos`.
    let report = dir.path().join("image-ci.json");
    let scenario = workspace().join("loadtest/scenarios/image-ci.toml");
    let load = tokio::process::Command::new(bin("shardline-loadtest"))
        .arg("run")
        .arg(&scenario)
        .args(["--external", &url, "--stream", &topic, "--receipts", &receipts, "--json"])
        .arg(&report)
        .env("SHARDLINE_KAFKA_BROKERS", kafka_brokers())
        .kill_on_drop(true)
        .output()
        .await?;
    let output = format!("{}\n{}", text(&load.stdout), text(&load.stderr));
    println!("{output}");
    ensure!(load.status.success(), "image-ci failed ({}):\n{output}", load.status);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
    let count = |key: &str| json[key].as_u64().with_context(|| format!("no `{key}` in {json}"));
    let (produced, processed, lost) = (count("produced")?, count("processed")?, count("lost")?);
    ensure!(
        produced > 0 && lost == 0 && processed >= produced,
        "produced {produced}, processed {processed}, lost {lost}"
    );

    // `docker stop`: each worker drains, releasing what it holds, and
    // exits 0; the first one's leases go to the second.
    for (i, (id, w)) in workers.iter().enumerate() {
        let held = lease_names(&leases(&url, &topic).await?, id);
        ensure!(!held.is_empty(), "{id} holds no lease before its stop");
        // Granted is not yet running: the grant reaches the worker with
        // its next heartbeat.
        eventually(Duration::from_secs(10), &format!("{id} running {held:?}"), || async {
            let running = logged(&w.logs()?, "lease acquired");
            ensure!(held.is_subset(&running), "{id} runs {running:?}");
            Ok(Some(()))
        })
        .await?;
        let stopping = Instant::now();
        let code = w.stop(Duration::from_secs(60))?;
        let took = stopping.elapsed();
        let logs = w.logs()?;
        ensure!(code == 0, "{id} exited {code} on docker stop; its log:\n{logs}");
        ensure!(logs.contains("draining") && logs.contains("worker stopped"), "{id} did not drain:\n{logs}");
        let released = logged(&logs, "lease released");
        ensure!(held.is_subset(&released), "{id} held {held:?} but released {released:?}:\n{logs}");
        println!("{id}: drained {} leases on docker stop in {took:.1?}, exit 0", held.len());
        if i == 0 {
            eventually(Duration::from_secs(30), "image-w2 owning every lease", || async {
                let leases = leases(&url, &topic).await?;
                ensure!(lease_names(&leases, "image-w2").len() == 4, "{leases:?}");
                Ok(Some(()))
            })
            .await?;
        }
    }
    let code = c.stop(Duration::from_secs(30))?;
    if code != 0 {
        bail!("the coordinator exited {code} on docker stop; its log:\n{}", c.logs()?);
    }
    drop(workers);
    drop(c);
    println!(
        "image {IMAGE}: {:.0} MB; docker run to /readyz 200: coordinator {coordinator_ready:.2?}, workers (slowest) {worker_ready:.2?}",
        size as f64 / 1e6
    );
    drop(volume);
    Ok(())
}
