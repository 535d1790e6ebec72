//! The configs under `deploy/` are valid, and the Kubernetes ones work
//! with the Secrets `deploy/k8s/secrets/generate.sh` makes: each config
//! is read by the binaries' own types and checked as they check it at
//! start (files, tokens, TLS, the PostgreSQL URL the postgres component
//! sets), with every path where the manifests mount it mapped into a
//! temporary directory holding the generated files; then the real
//! coordinator and worker run with the Kubernetes configs and the
//! worker registers over TLS with its token.
//!
//! The manifests' side (that each path a config names is mounted from a
//! Secret or ConfigMap key that exists, that the ConfigMaps hold these
//! very files, the env the postgres component sets) is checked on the
//! rendered manifests by scripts/deploy_check.py. No broker is used: the
//! brokers are pointed at a closed loopback port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shardline_testkit::config::{self, CoordinatorConfig, Store, WorkerConfig};
use shardline_testkit::metrics::{http_get, scrape};
use shardline_testkit::process;
use shardline_tests::deploy::{generate_secrets, repo};
use shardline_tests::{bin, eventually, free_port, unique};
use shardline_worker::ConfigFile;

/// The postgres component's environment for pod 0 (its manifest sets
/// SHARDLINE_ADVERTISE_URL to `https://$(POD_NAME).shardline-coordinator-peers:7400`;
/// scripts/deploy_check.py checks that form against the rendered
/// StatefulSet and Services).
const POSTGRES_POD_ADVERTISES: &str = "https://shardline-coordinator-0.shardline-coordinator-peers:7400";

/// A config file under `deploy/`, with each `(from, to)` path prefix
/// replaced: where a pod or a machine has its files, here.
fn rooted(file: &str, prefixes: &[(&str, &Path)]) -> Result<String> {
    let mut text = std::fs::read_to_string(repo().join(file)).with_context(|| format!("read {file}"))?;
    for (from, to) in prefixes {
        ensure!(text.contains(from), "{file} names nothing under {from}");
        text = text.replace(from, &format!("{}/", to.display()));
    }
    Ok(text)
}

/// Parsed, overridden by `env` alone (not this process's), and checked:
/// what `ConfigFile::load` does at start in a pod with that environment.
fn check<T: ConfigFile>(file: &str, text: &str, env: &BTreeMap<&str, String>) -> Result<T> {
    let mut config = T::parse(text).with_context(|| format!("{file} does not parse"))?;
    config.overrides().apply(|name| env.get(name).cloned());
    config.validate().with_context(|| format!("{file} is invalid"))?;
    Ok(config)
}

/// The pod's view: the Secrets' keys (tokens, TLS) in one directory, as
/// the coordinator StatefulSet mounts them at /etc/shardline/tls and
/// /run/secrets/shardline.
fn kubernetes(secrets: &Path, file: &str) -> Result<String> {
    rooted(file, &[("/etc/shardline/tls/", secrets), ("/run/secrets/shardline/", secrets)])
}

#[test]
fn the_kubernetes_configs_are_valid_with_the_generated_secrets() -> Result<()> {
    let secrets = tempfile::tempdir()?;
    generate_secrets(secrets.path())?;
    let none = BTreeMap::new();

    let file = "deploy/k8s/base/coordinator.toml";
    let sled: CoordinatorConfig = check(file, &kubernetes(secrets.path(), file)?, &none)?;
    ensure!(sled.store == Store::Sled && sled.tls.is_some(), "{sled:?}");
    ensure!(sled.auth_token_file.is_some() && sled.worker_token_file.is_some(), "{sled:?}");

    // The postgres component: the URL from the Secret, each pod its own
    // advertised name.
    let url = std::fs::read_to_string(secrets.path().join("postgres-url"))?;
    let env = BTreeMap::from([
        ("SHARDLINE_STORE", url.clone()),
        ("SHARDLINE_ADVERTISE_URL", POSTGRES_POD_ADVERTISES.to_owned()),
    ]);
    let postgres: CoordinatorConfig = check(file, &kubernetes(secrets.path(), file)?, &env)?;
    ensure!(postgres.store == Store::Postgres(url), "{postgres:?}");
    ensure!(postgres.advertise_url.as_deref() == Some(POSTGRES_POD_ADVERTISES), "{postgres:?}");

    let file = "deploy/k8s/base/worker.toml";
    let worker: WorkerConfig = check(file, &kubernetes(secrets.path(), file)?, &none)?;
    ensure!(worker.tls.is_some() && worker.auth_token_file.is_some(), "{worker:?}");
    // The Deployment's grace period is drain_timeout + 15 s (45 s).
    ensure!(worker.drain_timeout == Duration::from_secs(30), "{worker:?}");
    Ok(())
}

#[test]
fn the_systemd_configs_are_valid() -> Result<()> {
    // /etc/shardline as deploy/systemd/coordinator.toml's comment lays it
    // out, with the generated material under the names it uses.
    let generated = tempfile::tempdir()?;
    generate_secrets(generated.path())?;
    let etc = tempfile::tempdir()?;
    let (tls, secrets) = (etc.path().join("tls"), etc.path().join("secrets"));
    std::fs::create_dir_all(&tls)?;
    std::fs::create_dir_all(&secrets)?;
    for (from, to) in [("tls.crt", "server.pem"), ("tls.key", "server-key.pem"), ("ca.crt", "ca.pem")] {
        std::fs::copy(generated.path().join(from), tls.join(to))?;
    }
    for token in ["admin-token", "worker-token", "viewer-token"] {
        std::fs::copy(generated.path().join(token), secrets.join(token))?;
    }
    let none = BTreeMap::new();
    let file = "deploy/systemd/coordinator.toml";
    let text = rooted(file, &[("/etc/shardline/", etc.path())])?;
    let coordinator: CoordinatorConfig = check(file, &text, &none)?;
    // systemd's StateDirectory=shardline.
    ensure!(coordinator.data_dir == Path::new("/var/lib/shardline"), "{coordinator:?}");
    let file = "deploy/systemd/worker.toml";
    let worker: WorkerConfig = check(file, &rooted(file, &[("/etc/shardline/", etc.path())])?, &none)?;
    // The unit's TimeoutStopSec is drain_timeout + 15 s (45 s).
    ensure!(worker.drain_timeout == Duration::from_secs(30), "{worker:?}");
    Ok(())
}

/// The Kubernetes configs and generated Secrets as the pods would run
/// them, on loopback: the coordinator serves TLS with the generated
/// certificate, the worker trusts the generated CA (the certificate names
/// `localhost` for `kubectl exec`) and presents the worker token; it
/// registers, and the coordinator is ready (it leads).
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_registers_with_the_kubernetes_configs_over_the_generated_tls() -> Result<()> {
    let secrets = tempfile::tempdir()?;
    generate_secrets(secrets.path())?;
    let none = BTreeMap::new();
    // Nothing listens on port 1: no broker traffic leaves loopback.
    let (kafka, amqp) = ("127.0.0.1:1".to_owned(), "amqp://127.0.0.1:1/%2f".to_owned());
    let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));

    let file = "deploy/k8s/base/coordinator.toml";
    let mut coordinator: CoordinatorConfig = check(file, &kubernetes(secrets.path(), file)?, &none)?;
    let coordinator_metrics = loopback(free_port()?);
    coordinator.listen = loopback(0);
    coordinator.metrics_listen = Some(coordinator_metrics);
    coordinator.data_dir = secrets.path().join("data");
    (coordinator.kafka_brokers, coordinator.amqp_url) = (kafka.clone(), amqp.clone());
    let path = secrets.path().join("coordinator.toml");
    config::write(&path, &coordinator)?;
    let (_c, addr) = process::start_coordinator(
        &bin("shardline-coordinator"),
        &path,
        &[],
        Stdio::inherit(),
        Duration::from_secs(30),
    )?;

    let file = "deploy/k8s/base/worker.toml";
    let mut worker: WorkerConfig = check(file, &kubernetes(secrets.path(), file)?, &none)?;
    let id = unique("k8s-worker");
    worker.coordinator = format!("https://localhost:{}", addr.port());
    worker.worker_id = Some(id.clone());
    worker.metrics_listen = Some(loopback(free_port()?));
    (worker.kafka_brokers, worker.amqp_url) = (kafka, amqp);
    let path = secrets.path().join("worker.toml");
    config::write(&path, &worker)?;
    let _w = process::start_worker(&bin("shardline-worker"), &path, &id, Stdio::inherit())?;

    let coordinator_metrics = coordinator_metrics.to_string();
    eventually(Duration::from_secs(30), "the worker to register over TLS", || async {
        let m = scrape(&coordinator_metrics).await?;
        Ok((m.get(&format!("shardline_worker_leases{{worker=\"{id}\"}}")).is_ok()
            && m.get("shardline_workers_live")? == 1.0)
            .then_some(()))
    })
    .await?;
    http_get(&coordinator_metrics, "/readyz").await.context("the coordinator is not ready")?;
    Ok(())
}
