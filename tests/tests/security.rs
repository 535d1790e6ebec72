//! TLS, roles and refusals with the real binaries: a TLS coordinator
//! (certificates from a throwaway CA), a real worker on a real Kafka topic,
//! and the real CLI with each role's credentials.
//!
//! - a plaintext worker or CLI against a TLS coordinator is refused, with
//!   a message that names TLS;
//! - a worker token cannot move checkpoints (PERMISSION_DENIED) and nothing
//!   changes; a viewer reads but cannot write or export; a wrong token or
//!   none is UNAUTHENTICATED and a worker with one stops, saying why;
//! - with mutual TLS the role comes from the client certificate, and a
//!   certificate from another CA is refused at the handshake;
//! - a coordinator listening off loopback without TLS refuses to start
//!   (exit 2) unless `insecure = true`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use shardline_testkit::config::ServerTls;
use shardline_testkit::process::{self, Proc};
use shardline_testkit::tls::Pki;
use shardline_tests::kafka::{produce, producer};
use shardline_tests::{
    CoordinatorConfig, WorkerConfig, bin, create_topic, eventually, kafka_brokers, unique,
};
use shardline_worker::config::ClientTls;

mod support;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PARTITIONS: i32 = 2;
const RECORDS: u64 = 40;

/// A TLS coordinator on loopback: its process and `https://` URL.
struct Tls {
    _proc: Proc,
    url: String,
}

/// Starts the coordinator on `config` (`listen` on a free loopback port,
/// the tests' brokers, its data under `dir`).
fn coordinator(dir: &Path, mut config: CoordinatorConfig) -> Result<Tls> {
    config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.kafka_brokers = kafka_brokers();
    config.data_dir = dir.join(unique("data"));
    let started = support::coordinator_with_env(dir, &config, &[])?;
    let port = started.url.rsplit(':').next().unwrap_or_default().to_owned();
    Ok(Tls { _proc: started.proc, url: format!("https://localhost:{port}") })
}

/// Starts a worker hosting `noop` with `config`'s credentials; its log goes
/// to `log`, which the test reads.
fn worker(url: &str, id: &str, mut config: WorkerConfig, log: &Path) -> Result<Proc> {
    config.handlers = WorkerConfig::hosting(["noop"]).handlers;
    config.kafka_brokers = kafka_brokers();
    config.coordinator = url.to_owned();
    config.worker_id = Some(id.to_owned());
    let dir = log.parent().context("the log has a folder")?;
    let path = support::config_file(dir, &unique(id), &config)?;
    let stderr = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    process::spawn(id, &bin("shardline-worker"), ["--config", &path], &[], Stdio::null(), stderr.into())
}

/// Runs the CLI against `url` with `flags` (credentials) then `args`:
/// exit code and everything it printed.
async fn cli(url: &str, flags: &[&str], args: &[&str]) -> Result<(i32, String)> {
    let mut command = tokio::process::Command::new(bin("shardline"));
    for var in ["SHARDLINE_TOKEN", "SHARDLINE_TOKEN_FILE", "SHARDLINE_TLS_CA", "SHARDLINE_COORDINATOR"] {
        command.env_remove(var);
    }
    let out = command.arg("--coordinator").arg(url).args(flags).args(args).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(30), out).await.context("the CLI hung")??;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code().unwrap_or(-1), text))
}

fn write_token(dir: &Path, name: &str) -> Result<std::path::PathBuf> {
    let path = dir.join(format!("{name}.token"));
    std::fs::write(&path, format!("{}\n", unique(name)))?;
    Ok(path)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// A fresh topic with records on every partition, and a stream config for it.
async fn topic_with_records() -> Result<(String, CoordinatorConfig)> {
    let topic = unique("secure");
    create_topic(&topic, PARTITIONS).await?;
    produce(&producer()?, &topic, 0, RECORDS, 10).await?;
    let config =
        CoordinatorConfig { streams: vec![support::from_start(&topic, "noop")], ..support::timings() };
    Ok((topic, config))
}

/// `--json` export text without the line that says when it was taken.
fn checkpoints_of(export: &str) -> String {
    export.lines().filter(|l| !l.contains("exported_at")).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_roles_refuses_plaintext_wrong_tokens_and_writes_by_workers_or_viewers() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path(), "sec")?;
    let server = pki.server("server")?;
    let (admin, worker_token, viewer) = (
        write_token(dir.path(), "admin")?,
        write_token(dir.path(), "worker")?,
        write_token(dir.path(), "viewer")?,
    );
    let (topic, base) = topic_with_records().await?;
    let config = CoordinatorConfig {
        tls: Some(ServerTls { cert: server.cert.clone(), key: server.key.clone(), client_ca: None }),
        auth_token_file: Some(admin.clone()),
        worker_token_file: Some(worker_token.clone()),
        viewer_token_file: Some(viewer.clone()),
        ..base
    };
    let c = coordinator(dir.path(), config)?;
    let ca = path(&pki.ca).to_owned();
    let as_admin = ["--tls-ca", &ca, "--token-file", path(&admin)];
    let as_worker = ["--tls-ca", &ca, "--token-file", path(&worker_token)];
    let as_viewer = ["--tls-ca", &ca, "--token-file", path(&viewer)];

    // A plaintext worker is refused, and says why.
    let plain_url = c.url.replace("https://", "http://");
    let plain_log = dir.path().join("plain.log");
    let plain_config =
        WorkerConfig { auth_token_file: Some(worker_token.clone()), ..WorkerConfig::default() };
    let _plain = worker(&plain_url, "plain", plain_config, &plain_log)?;
    eventually(
        Duration::from_secs(20),
        "the plaintext worker says the coordinator may serve TLS",
        || async {
            let log = std::fs::read_to_string(&plain_log).unwrap_or_default();
            Ok(log.contains("use an https:// URL").then_some(()))
        },
    )
    .await?;
    let (code, text) = cli(&plain_url, &["--token-file", path(&admin)], &["workers"]).await?;
    ensure!(code == 1 && text.contains("use an https:// URL"), "plaintext CLI: exit {code}: {text}");

    // A worker with the CA and its token registers and takes every lease.
    let tls = ClientTls { ca: pki.ca.clone(), cert: None, key: None };
    let good = WorkerConfig {
        auth_token_file: Some(worker_token.clone()),
        tls: Some(tls.clone()),
        ..WorkerConfig::default()
    };
    let _good = worker(&c.url, "good", good, &dir.path().join("good.log"))?;
    eventually(Duration::from_secs(30), "the TLS worker processed every record", || async {
        let (code, text) = cli(&c.url, &as_viewer, &["checkpoints", "--stream", &topic, "--json"]).await?;
        ensure!(code == 0, "viewer checkpoints: exit {code}: {text}");
        let listed: serde_json::Value = serde_json::from_str(&text).with_context(|| text.clone())?;
        let shards = listed["shards"].as_array().cloned().unwrap_or_default();
        let done = shards.len() == PARTITIONS as usize
            && shards.iter().all(|s| s["owner"] == "good" && s["lag"] == 0);
        Ok(done.then_some(()))
    })
    .await?;
    let workers = cli(&c.url, &as_viewer, &["workers"]).await?;
    ensure!(workers.0 == 0 && workers.1.contains("good") && !workers.1.contains("plain"), "{workers:?}");

    // The same worker with a wrong token stops, saying its credentials were refused.
    let wrong_log = dir.path().join("wrong.log");
    let wrong_token = write_token(dir.path(), "wrong")?;
    let wrong = WorkerConfig {
        auth_token_file: Some(wrong_token.clone()),
        tls: Some(tls.clone()),
        ..WorkerConfig::default()
    };
    let mut wrong_worker = worker(&c.url, "wrong", wrong, &wrong_log)?;
    let status =
        tokio::task::spawn_blocking(move || wrong_worker.wait_exit(Duration::from_secs(20))).await??;
    let log = std::fs::read_to_string(&wrong_log)?;
    ensure!(!status.success() && log.contains("refused this worker's credentials"), "{status}: {log}");

    // Nobody but the admin changes or exports checkpoints.
    let (code, before) = cli(&c.url, &as_admin, &["export"]).await?;
    ensure!(code == 0 && before.contains(&topic), "admin export: exit {code}: {before}");
    let lease = format!("{topic}/0");
    for (who, flags) in [("worker", &as_worker), ("viewer", &as_viewer)] {
        let (code, text) =
            cli(&c.url, flags, &["checkpoint", "set", &lease, "--offset", "0", "--yes"]).await?;
        ensure!(
            code == 1 && text.contains(&format!("the {who} role may not")),
            "{who} set: exit {code}: {text}"
        );
        let (code, text) = cli(&c.url, flags, &["export"]).await?;
        ensure!(code == 1 && text.contains("may not"), "{who} export: exit {code}: {text}");
    }
    let (code, text) = cli(&c.url, &as_worker, &["checkpoints"]).await?;
    ensure!(code == 1 && text.contains("the worker role may not"), "worker reads: exit {code}: {text}");
    for flags in [&["--tls-ca", &ca][..], &["--tls-ca", &ca, "--token-file", path(&wrong_token)][..]] {
        let (code, text) = cli(&c.url, flags, &["checkpoints"]).await?;
        ensure!(code == 1 && text.contains("see --token"), "{flags:?}: exit {code}: {text}");
    }
    let (code, after) = cli(&c.url, &as_admin, &["export"]).await?;
    ensure!(code == 0, "admin export: exit {code}: {after}");
    ensure!(
        checkpoints_of(&before) == checkpoints_of(&after),
        "refused calls changed checkpoints:\n{before}\n{after}"
    );

    // The admin can.
    let (code, text) =
        cli(&c.url, &as_admin, &["checkpoint", "set", &lease, "--offset", "0", "--yes"]).await?;
    ensure!(code == 0, "admin set: exit {code}: {text}");
    let (_, moved) = cli(&c.url, &as_admin, &["checkpoint", "get", &lease, "--json"]).await?;
    ensure!(moved.contains("\"epoch\""), "{moved}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_takes_the_role_from_the_certificate_and_refuses_other_cas() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path(), "mtls")?;
    let other = Pki::new(dir.path(), "other")?;
    let server = pki.server("server")?;
    let (_topic, base) = topic_with_records().await?;
    let config = CoordinatorConfig {
        tls: Some(ServerTls {
            cert: server.cert.clone(),
            key: server.key.clone(),
            client_ca: Some(pki.ca.clone()),
        }),
        ..base
    };
    let c = coordinator(dir.path(), config)?;
    let ca = path(&pki.ca).to_owned();
    let with = |pair: &shardline_testkit::tls::Pair| {
        vec![
            "--tls-ca".to_owned(),
            ca.clone(),
            "--tls-cert".into(),
            path(&pair.cert).into(),
            "--tls-key".into(),
            path(&pair.key).into(),
        ]
    };

    // A worker's certificate registers a worker.
    let worker_cert = pki.client("worker", "w1", Some("worker"))?;
    let tls = ClientTls {
        ca: pki.ca.clone(),
        cert: Some(worker_cert.cert.clone()),
        key: Some(worker_cert.key.clone()),
    };
    let _w = worker(
        &c.url,
        "w1",
        WorkerConfig { tls: Some(tls), ..WorkerConfig::default() },
        &dir.path().join("w1.log"),
    )?;

    let viewer = with(&pki.client("viewer", "dash", Some("viewer"))?);
    let viewer: Vec<&str> = viewer.iter().map(String::as_str).collect();
    eventually(Duration::from_secs(20), "the viewer sees the worker registered", || async {
        let (code, text) = cli(&c.url, &viewer, &["workers"]).await?;
        ensure!(code == 0, "viewer: exit {code}: {text}");
        Ok(text.contains("w1").then_some(()))
    })
    .await?;
    let (code, text) = cli(&c.url, &viewer, &["export"]).await?;
    ensure!(code == 1 && text.contains("the viewer role may not"), "viewer export: exit {code}: {text}");

    let admin = with(&pki.client("admin", "ops", Some("admin"))?);
    let admin: Vec<&str> = admin.iter().map(String::as_str).collect();
    let (code, text) = cli(&c.url, &admin, &["export"]).await?;
    ensure!(code == 0, "admin export: exit {code}: {text}");

    // A certificate naming no role authenticates nobody.
    let nobody = with(&pki.client("nobody", "x", None)?);
    let nobody: Vec<&str> = nobody.iter().map(String::as_str).collect();
    let (code, text) = cli(&c.url, &nobody, &["workers"]).await?;
    ensure!(code == 1 && text.contains("names no role"), "no-role cert: exit {code}: {text}");

    // Another CA's certificate, even one saying admin, and none at all, are refused.
    let forged = with(&other.client("admin", "mallory", Some("admin"))?);
    let forged: Vec<&str> = forged.iter().map(String::as_str).collect();
    let (code, text) = cli(&c.url, &forged, &["workers"]).await?;
    ensure!(code == 1 && !text.contains("w1"), "forged cert: exit {code}: {text}");
    let (code, text) = cli(&c.url, &["--tls-ca", &ca], &["workers"]).await?;
    ensure!(code == 1 && !text.contains("w1"), "no cert: exit {code}: {text}");
    Ok(())
}

#[tokio::test]
async fn off_loopback_without_tls_refuses_to_start_unless_insecure() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let token = write_token(dir.path(), "admin")?;
    let port = shardline_tests::free_port()?;
    let config = CoordinatorConfig {
        listen: std::net::SocketAddr::from(([0, 0, 0, 0], port)),
        data_dir: dir.path().join("data"),
        auth_token_file: Some(token),
        ..CoordinatorConfig::default()
    };
    let path = support::config_file(dir.path(), "wide", &config)?;
    let (code, stderr) = support::refused("shardline-coordinator", &path, &[]).await?;
    ensure!(code == 2, "exit {code}: {stderr}");
    ensure!(stderr.contains("`tls` is unset") && stderr.contains("insecure = true"), "{stderr}");
    ensure!(!dir.path().join("data").exists(), "nothing may be created for a refused config");

    let insecure = CoordinatorConfig { insecure: true, ..config };
    let started = support::coordinator_with_env(dir.path(), &insecure, &[])?;
    ensure!(started.url.ends_with(&format!(":{port}")), "listening at {}", started.url);
    drop(started);
    Ok(())
}
