//! Black-box tests of the coordinator binary: real processes, real Kafka
//! (tansu on 127.0.0.1:9092 via `scripts/brokers.sh up`), real sled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use shardline_proto::LeaseId;
use shardline_proto::v1;
use shardline_tests::{Coordinator, CoordinatorConfig, StreamConfig, bin, eventually, owners, start_worker};
use tokio::sync::Mutex;

mod support;
use support::cli;

/// A coordinator of one static stream `name` of `partitions` leases, no
/// Kafka, `noop` handler.
/// A stream of `partitions` fixed leases. No join window: these tests read
/// the leases a registration grants in its own reply, which a window
/// would defer to a later heartbeat.
fn fixed(name: &str, partitions: u32) -> CoordinatorConfig {
    let stream = StreamConfig { partitions: Some(partitions), ..StreamConfig::new(name, "noop") };
    let mut config = CoordinatorConfig { streams: vec![stream], ..CoordinatorConfig::default() };
    config.balancer.join_window = std::time::Duration::ZERO;
    config
}

fn id(info: &v1::LeaseInfo) -> Result<LeaseId> {
    LeaseId::try_from(info.lease.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))
}

fn acquired(instructions: &[v1::Instruction]) -> Vec<(LeaseId, u64)> {
    instructions
        .iter()
        .filter_map(|i| match &i.kind {
            Some(v1::instruction::Kind::Acquire(a)) => {
                LeaseId::try_from(a.lease.as_ref()).ok().map(|l| (l, a.epoch))
            }
            _ => None,
        })
        .collect()
}

/// What a client sees while the coordinator is gone: the connection reset
/// or refused. tonic reports a broken connection as `Unavailable` or, for
/// a stream cut mid-call, `Unknown` / `Cancelled` carrying a transport
/// error.
fn is_transport_error(s: &tonic::Status) -> bool {
    match s.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::Internal => {
            let text = s.to_string().to_lowercase();
            ["transport", "connection", "broken pipe", "reset", "h2 protocol error", "stream"]
                .iter()
                .any(|w| text.contains(w))
        }
        _ => false,
    }
}

fn register_request(worker: &str, held: &[(LeaseId, u64)]) -> v1::RegisterRequest {
    v1::RegisterRequest {
        worker_id: worker.into(),
        handlers: vec!["noop".into()],
        held: held.iter().map(|(l, e)| v1::HeldLease { lease: Some(l.into()), epoch: *e }).collect(),
        ..Default::default()
    }
}

#[test]
fn a_bad_config_exits_2_naming_the_field_and_starts_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, format!("data_dir = \"{}\"\nsession_timeout = \"5ms\"\n", data.display()))?;
    let out =
        std::process::Command::new(bin("shardline-coordinator")).arg("--config").arg(&config).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2), "exit {:?}: {stderr}", out.status.code());
    ensure!(stderr.contains("`session_timeout` is 5ms; allowed: 200ms to 600s"), "{stderr}");
    ensure!(!data.exists(), "nothing may be created for a bad config");

    std::fs::write(&config, "[[streams]]\nname = \"x\"\nhandler = \"noop\"\nbogus = 1\n")?;
    let out =
        std::process::Command::new(bin("shardline-coordinator")).arg("--config").arg(&config).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(2), "exit {:?}: {stderr}", out.status.code());
    ensure!(stderr.contains("unknown field `bogus`"), "{stderr}");
    Ok(())
}

/// `kill -9` a worker: its leases are owned elsewhere within
/// session_timeout (2 s) + 2 s, plus 2 s of slack for a shared 2-core
/// machine, and the dead worker's epochs are refused.
#[tokio::test]
async fn a_killed_workers_leases_move_within_the_session_timeout_and_zombies_are_fenced() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = CoordinatorConfig {
        session_timeout: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(200),
        ..fixed("static", 6)
    };
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let mut a = start_worker(&c.url, "a", "noop")?;
    eventually(Duration::from_secs(10), "a owns all", || async {
        Ok((owners(&c.leases().await?).get("a") == Some(&6)).then_some(()))
    })
    .await?;
    let _b = start_worker(&c.url, "b", "noop")?;
    eventually(Duration::from_secs(10), "3 and 3", || async {
        let o = owners(&c.leases().await?);
        Ok((o.get("a") == Some(&3) && o.get("b") == Some(&3)).then_some(()))
    })
    .await?;
    let before: Vec<v1::LeaseInfo> = c.leases().await?.into_iter().filter(|l| l.owner == "a").collect();

    a.kill9()?;
    let killed = Instant::now();
    let allowed = Duration::from_secs(2 + 2 + 2);
    eventually(allowed, "b owns all 6", || async {
        Ok((owners(&c.leases().await?).get("b") == Some(&6)).then_some(()))
    })
    .await?;
    let took = killed.elapsed();
    ensure!(took < allowed, "failover took {took:?}; allowed: session_timeout (2 s) + 2 s + 2 s slack");
    eprintln!("failover after kill -9 took {took:?} (session_timeout 2 s)");

    // The dead worker comes back as a zombie quoting its old epochs.
    let mut api = c.worker_api().await?;
    let entries = before
        .iter()
        .map(|l| v1::CheckpointEntry {
            lease: l.lease.clone(),
            epoch: l.epoch,
            offset: 1_000_000,
            window: None,
        })
        .collect();
    let reply = api.checkpoint(v1::CheckpointRequest { worker_id: "a".into(), entries }).await?.into_inner();
    ensure!(reply.results.len() == 3);
    for r in &reply.results {
        ensure!(r.status == v1::CheckpointStatus::StaleEpoch as i32, "zombie checkpoint accepted: {r:?}");
    }
    ensure!(c.leases().await?.iter().all(|l| l.checkpoint.is_none()), "no checkpoint moved");
    let hb = api.heartbeat(v1::HeartbeatRequest { worker_id: "a".into(), ..Default::default() }).await;
    ensure!(hb.is_err_and(|s| s.code() == tonic::Code::NotFound), "the dead worker must re-register");
    Ok(())
}

/// A worker stopped with SIGTERM releases its leases; they move at once,
/// not after the session timeout.
#[tokio::test]
async fn a_gracefully_stopped_worker_hands_its_leases_over_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = CoordinatorConfig { session_timeout: Duration::from_secs(30), ..fixed("static", 4) };
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let mut a = start_worker(&c.url, "a", "noop")?;
    let _b = start_worker(&c.url, "b", "noop")?;
    eventually(Duration::from_secs(10), "2 and 2", || async {
        let o = owners(&c.leases().await?);
        Ok((o.get("a") == Some(&2) && o.get("b") == Some(&2)).then_some(()))
    })
    .await?;
    a.signal(libc::SIGTERM)?;
    let status = a.wait_exit(Duration::from_secs(10))?;
    ensure!(status.success(), "worker exit {status:?}");
    eventually(Duration::from_secs(5), "b owns all 4 well before the 30 s timeout", || async {
        Ok((owners(&c.leases().await?).get("b") == Some(&4)).then_some(()))
    })
    .await?;
    Ok(())
}

/// `kill -9` the coordinator while 16 writers checkpoint as fast as they can:
/// after a restart every acknowledged checkpoint is there, and the worker
/// that re-registers keeps its leases under the same epochs.
#[tokio::test]
async fn acknowledged_checkpoints_survive_kill_9_of_the_coordinator() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let config = fixed("crash", 16);
    let mut c = Coordinator::start_config(config.clone(), &data)?;
    let mut api = c.worker_api().await?;
    let reply = api.register(register_request("w", &[])).await?.into_inner();
    let held = acquired(&reply.instructions);
    ensure!(held.len() == 16, "{reply:?}");

    let acked: Arc<Mutex<BTreeMap<LeaseId, i64>>> = Arc::default();
    // Set just before the kill: only from then on may a call fail, and only
    // with a transport error. Any other answer (a refusal, a gRPC error from
    // a live coordinator) fails the test.
    let dying = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (lease, epoch) in held.clone() {
        let (mut api, acked, dying) = (api.clone(), acked.clone(), dying.clone());
        writers.push(tokio::spawn(async move {
            let mut offset = 0i64;
            loop {
                offset += 1;
                let entry = v1::CheckpointEntry { lease: Some((&lease).into()), epoch, offset, window: None };
                let request = v1::CheckpointRequest { worker_id: "w".into(), entries: vec![entry] };
                match api.checkpoint(request).await {
                    Ok(r) => {
                        let results = &r.get_ref().results;
                        ensure!(
                            results.len() == 1 && results[0].status == v1::CheckpointStatus::Ok as i32,
                            "{lease}: checkpoint {offset} at epoch {epoch} answered {results:?}"
                        );
                        acked.lock().await.insert(lease.clone(), offset);
                    }
                    Err(s) if dying.load(Ordering::SeqCst) && is_transport_error(&s) => return Ok(()),
                    Err(s) => {
                        anyhow::bail!("{lease}: checkpoint {offset} failed while the coordinator ran: {s}")
                    }
                }
            }
        }));
    }
    // Until every writer has had a good number of checkpoints acknowledged.
    eventually(Duration::from_secs(30), "20 acknowledged checkpoints per lease", || async {
        let acked = acked.lock().await;
        Ok((acked.len() == 16 && acked.values().all(|&o| o >= 20)).then_some(()))
    })
    .await?;
    dying.store(true, Ordering::SeqCst);
    c.proc.kill9()?;
    for w in writers {
        w.await??;
    }
    let acked = acked.lock().await.clone();
    let total: i64 = acked.values().sum();
    ensure!(acked.len() == 16 && total > 100, "too few checkpoints acknowledged before the kill: {acked:?}");
    eprintln!("{total} checkpoints acknowledged before kill -9");

    let c = Coordinator::start_config(config, &data)?;
    let after = c.leases().await?;
    ensure!(after.len() == 16);
    for l in &after {
        let lease = id(l)?;
        let want = acked.get(&lease).copied().context("acked")?;
        ensure!(l.checkpoint >= Some(want), "{lease}: checkpoint {:?} < acknowledged {want}", l.checkpoint);
        ensure!(l.owner == "w", "{lease} kept by its owner across the restart: {l:?}");
    }
    // The worker comes back within the session timeout and keeps everything.
    let mut api = c.worker_api().await?;
    let reply = api.register(register_request("w", &held)).await?.into_inner();
    let mut kept = acquired(&reply.instructions);
    kept.sort();
    let mut expected = held.clone();
    expected.sort();
    ensure!(kept == expected, "kept the same leases and epochs: {kept:?} vs {expected:?}");
    Ok(())
}

/// A coordinator restart moves nothing: workers re-register quoting what
/// they hold and keep it under the same epochs.
#[tokio::test]
async fn workers_keep_their_leases_across_a_coordinator_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let config = CoordinatorConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], shardline_tests::free_port()?)),
        heartbeat_interval: Duration::from_millis(200),
        session_timeout: Duration::from_secs(3),
        ..fixed("static", 6)
    };
    let mut c = Coordinator::start_config(config.clone(), &data)?;
    let _a = start_worker(&c.url, "a", "noop")?;
    let _b = start_worker(&c.url, "b", "noop")?;
    // Settled 3 and 3, and each worker runs (reports in its heartbeats)
    // exactly the leases it owns: a lease whose Acquire was
    // still on its way when the coordinator died is not quoted back, and
    // gets a new epoch (the coordinator cannot know whether another process
    // of that id runs it).
    let before = eventually(Duration::from_secs(10), "3 and 3, each run by its owner", || async {
        let l = c.leases().await?;
        let o = owners(&l);
        let state_owned = l.iter().all(|l| l.state == v1::LeaseState::Owned as i32);
        ensure!(state_owned && o.get("a") == Some(&3) && o.get("b") == Some(&3), "leases now {o:?}");
        for w in c.workers().await? {
            // (The load report names leases; their epochs travel in the
            // heartbeat's `held`, which the admin API does not show.)
            let mut runs: Vec<Option<LeaseId>> = w
                .load
                .iter()
                .flat_map(|load| &load.leases)
                .map(|r| LeaseId::try_from(r.lease.as_ref()).ok())
                .collect();
            let mut owns: Vec<Option<LeaseId>> =
                l.iter().filter(|l| l.owner == w.worker_id).map(|l| id(l).ok()).collect();
            runs.sort();
            owns.sort();
            ensure!(runs == owns, "{} runs {runs:?} but owns {owns:?}", w.worker_id);
        }
        Ok(Some(l))
    })
    .await?;

    c.proc.kill9()?;
    let c = Coordinator::start_config(config, &data)?;
    // Both workers must come back as registered (not merely restored) ...
    eventually(Duration::from_secs(5), "both workers re-registered", || async {
        let mut admin = c.admin().await?;
        let w = admin.list_workers(v1::ListWorkersRequest {}).await?.into_inner().workers;
        Ok((w.len() == 2 && w.iter().all(|w| !w.restored)).then_some(()))
    })
    .await?;
    // ... and past a session timeout (3 s) nothing has moved: the claim is
    // about time passing, so this waits for it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = c.leases().await?;
    let pairs =
        |l: &[v1::LeaseInfo]| l.iter().map(|l| (id(l).ok(), l.owner.clone(), l.epoch)).collect::<Vec<_>>();
    ensure!(pairs(&before) == pairs(&after), "leases moved across a restart:\n{before:?}\n{after:?}");
    Ok(())
}

/// `message` with `Bearer TOKEN` (none: no authorization header).
fn with<T>(token: Option<&str>, message: T) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    }
    Ok(request)
}

/// With a token configured, every call without it or with a wrong one is
/// refused (admin API, worker API, CLI), and the right one is let through
/// (CLI `--token` included). Metrics are served on the configured address.
#[tokio::test]
async fn the_token_is_enforced_and_metrics_are_served() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], shardline_tests::free_port()?));
    let config = CoordinatorConfig {
        auth_token: Some("s3cret".into()),
        metrics_listen: Some(metrics),
        ..fixed("static", 2)
    };
    let c = Coordinator::start_config(config, &dir.path().join("data"))?;
    let metrics = metrics.to_string();
    let unauthenticated =
        |r: Result<_, tonic::Status>| r.is_err_and(|s| s.code() == tonic::Code::Unauthenticated);

    let mut admin = c.admin().await?;
    for token in [None, Some("nope")] {
        let refused = admin.health(with(token, v1::HealthRequest {})?).await;
        ensure!(unauthenticated(refused.map(drop)), "admin call with token {token:?} not refused");
    }
    ensure!(
        admin.health(with(Some("s3cret"), v1::HealthRequest {})?).await?.into_inner().status == "serving"
    );

    let mut api = c.worker_api().await?;
    for token in [None, Some("nope")] {
        let refused = api.register(with(token, register_request("w", &[]))?).await;
        ensure!(unauthenticated(refused.map(drop)), "worker API call with token {token:?} not refused");
    }
    ensure!(c.workers().await.is_err(), "the test's own admin client has no token: refused too");
    let registered = api.register(with(Some("s3cret"), register_request("w", &[]))?).await?.into_inner();
    ensure!(acquired(&registered.instructions).len() == 2, "{registered:?}");

    for args in [&["workers"][..], &["--token", "nope", "workers"]] {
        let (code, text) = cli(&c.url, args).await?;
        ensure!(code == 1 && text.contains("--token"), "`shardline {args:?}`: exit {code}, said {text}");
    }
    let (code, text) = cli(&c.url, &["--token", "s3cret", "--json", "workers"]).await?;
    ensure!(
        code == 0 && text.contains("\"worker_id\": \"w\""),
        "`shardline --token s3cret`: exit {code}, said {text}"
    );

    eventually(Duration::from_secs(5), "metrics", || async {
        let body = shardline_tests::http_get(&metrics, "/metrics").await?;
        Ok((body.contains("shardline_workers_live 1")
            && body.contains("shardline_leases{state=\"owned\"} 2"))
        .then_some(()))
    })
    .await?;
    Ok(())
}
