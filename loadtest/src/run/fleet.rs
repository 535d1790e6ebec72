//! The processes of a run and what the coordinator says about them: the
//! coordinators (none with `--external`; one on sled, or several sharing a
//! PostgreSQL schema of which one leads), the workers by index (with one
//! coordinator, each talks to it through its own [`Proxy`], where network
//! faults are made; with several, each is given every URL and follows the
//! leader itself), the faults done to them, and the lease table watched
//! once a second.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use shardline_proto::v1::admin_api_client::AdminApiClient;
use shardline_proto::v1::{self, LeaseState};
use shardline_testkit::config::WorkerConfig;
use tonic::transport::{Channel, Endpoint};

use crate::child::{Coordinator, Running, Worker};
use shardline_testkit::proxy::Proxy;

/// The handler every worker hosts and every mapping names (but the
/// subscriptions of a run with both targets: see [`FORWARD`]).
pub const HANDLER: &str = "chaos";
/// With both targets, the subscriptions' handler: `chaos` writes receipts
/// to one destination (the stream's Kafka topic), `forward` writes the
/// subscriptions' to the RabbitMQ receipts exchange, so each target's
/// receipts stay on its own broker.
pub const FORWARD: &str = "forward";
/// One admin call, at most: a coordinator being restarted must not stall
/// the run.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(3);

/// What each worker's config says besides its id and coordinator.
pub struct WorkerTemplate {
    pub config: WorkerConfig,
    /// Appended to `w<i>`: empty with the harness's own coordinator, a run
    /// id with an external one (which may remember earlier runs' workers).
    pub id_suffix: String,
}

pub struct WorkerSlot {
    pub id: String,
    /// `None` once killed (or crashed).
    proc: Option<Worker>,
    pub stopped: bool,
    /// Between this worker and the one coordinator; shared with a network
    /// fault while it lasts. `None` with several coordinators: a proxy
    /// targets one address, and the worker must follow the leader among
    /// all of them (no network fault applies then; the scenario refuses
    /// them).
    proxy: Option<Arc<Proxy>>,
}

/// One of the harness's coordinators.
struct CoordinatorSlot {
    proc: Coordinator,
    /// Killed by a fault and not started again yet: its exit is no crash.
    down: bool,
}

/// What a kill of the leader saw.
#[derive(Debug, Clone, Copy)]
pub struct Takeover {
    /// The index of the coordinator killed.
    pub killed: usize,
    /// The index of the standby that leads now.
    pub leader: usize,
    /// From the kill until the new leader's `/readyz` answered 200.
    pub takeover_ms: u64,
}

pub struct Fleet {
    coordinators: Vec<CoordinatorSlot>,
    coordinator_bin: PathBuf,
    worker_bin: PathBuf,
    /// The URL(s) workers are given: one, or every coordinator's
    /// comma-separated.
    url: String,
    template: WorkerTemplate,
    workers: Vec<WorkerSlot>,
    /// Children that exited on their own, with their logs' tails.
    crashes: Vec<String>,
    /// Where to copy every child's logs before its directory goes
    /// (`--logs`).
    logs: Option<PathBuf>,
}

impl Fleet {
    /// `url`: the coordinators' URLs comma-separated (the external one's
    /// with `--external`, where `coordinators` is empty).
    pub fn new(
        coordinators: Vec<Coordinator>,
        url: String,
        coordinator_bin: PathBuf,
        worker_bin: PathBuf,
        template: WorkerTemplate,
    ) -> Self {
        Self {
            coordinators: coordinators
                .into_iter()
                .map(|proc| CoordinatorSlot { proc, down: false })
                .collect(),
            coordinator_bin,
            worker_bin,
            url,
            template,
            workers: Vec::new(),
            crashes: Vec::new(),
            logs: None,
        }
    }

    /// Keeps every child's logs in `dir`: a killed worker's when it is
    /// killed, the rest at shutdown.
    pub fn keep_logs(&mut self, dir: PathBuf) {
        self.logs = Some(dir);
    }

    /// Copies the `*.log` files of `running` to the logs directory as
    /// `<name>-<file>`; failures only warn (the run's result stands).
    fn save_logs(&self, name: &str, running: &Running) {
        let Some(to) = &self.logs else { return };
        let copy = || -> std::io::Result<()> {
            std::fs::create_dir_all(to)?;
            for entry in std::fs::read_dir(running.dir())? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "log")
                    && let Some(file) = path.file_name().and_then(|f| f.to_str())
                {
                    std::fs::copy(&path, to.join(format!("{name}-{file}")))?;
                }
            }
            Ok(())
        };
        if let Err(e) = copy() {
            eprintln!("warning: cannot keep the logs of {name} in {}: {e}", to.display());
        }
    }

    /// Starts worker number `len()`, behind a proxy of its own with one
    /// coordinator, given every URL with several; returns its id.
    pub async fn start_worker(&mut self) -> anyhow::Result<String> {
        let id = format!("w{}{}", self.workers.len(), self.template.id_suffix);
        let proxy =
            if self.coordinators.len() > 1 { None } else { Some(Arc::new(Proxy::start(&self.url).await?)) };
        let config = WorkerConfig {
            coordinator: proxy.as_ref().map_or_else(|| self.url.clone(), |p| p.url().to_owned()),
            worker_id: Some(id.clone()),
            ..self.template.config.clone()
        };
        let worker = Worker::start(&self.worker_bin, &config)?;
        self.workers.push(WorkerSlot { id: id.clone(), proc: Some(worker), stopped: false, proxy });
        Ok(id)
    }

    /// The indices of the workers running now (not killed, crashed or
    /// scaled in), oldest first.
    pub fn live_workers(&self) -> Vec<usize> {
        self.workers.iter().enumerate().filter(|(_, w)| w.proc.is_some()).map(|(i, _)| i).collect()
    }

    /// Stops the given workers as a scale-in does: SIGTERM to all of them
    /// at once, then each drains and exits (up to `within`, else it is
    /// killed). Returns each worker's id and how its stop went. A stopped
    /// worker is no crash: its slot is empty before the signal.
    pub async fn stop_workers(
        &mut self,
        indices: &[usize],
        within: Duration,
    ) -> Vec<(String, anyhow::Result<()>)> {
        let mut stopping = Vec::new();
        let mut out = Vec::new();
        for &i in indices {
            let Some(slot) = self.workers.get_mut(i) else {
                out.push((format!("#{i}"), Err(anyhow::anyhow!("no worker {i}"))));
                continue;
            };
            let id = slot.id.clone();
            match slot.proc.take() {
                Some(worker) => stopping.push((id, worker)),
                None => out.push((id.clone(), Err(anyhow::anyhow!("worker {id} is not running")))),
            }
        }
        // Polled together: every worker gets its SIGTERM at once, as a
        // Deployment scaled in signals its pods.
        let stopped = futures::future::join_all(stopping.into_iter().map(|(id, mut worker)| async move {
            let result = worker.terminate(within).await;
            (id, worker, result)
        }))
        .await;
        for (id, worker, result) in stopped {
            // The drained worker's whole log, before its directory goes.
            self.save_logs(&id, &worker);
            out.push((id, result));
        }
        out
    }

    /// The metrics addresses of the coordinators running now (none with
    /// `--external`).
    pub fn coordinator_metrics(&self) -> Vec<std::net::SocketAddr> {
        self.coordinators.iter().filter(|c| !c.down).map(|c| c.proc.metrics_addr()).collect()
    }

    pub fn worker_id(&self, index: usize) -> Option<&str> {
        self.workers.get(index).map(|w| w.id.as_str())
    }

    /// Worker `index`'s proxy to the coordinator (none with several).
    pub fn proxy(&self, index: usize) -> Option<Arc<Proxy>> {
        self.workers.get(index).and_then(|w| w.proxy.clone())
    }

    /// SIGKILLs worker `index` and waits for it to be gone.
    pub async fn kill9(&mut self, index: usize) -> anyhow::Result<()> {
        let slot = self.workers.get_mut(index).with_context(|| format!("no worker {index}"))?;
        let worker = slot.proc.take().with_context(|| format!("worker {} is not running", slot.id))?;
        let id = slot.id.clone();
        self.save_logs(&id, &worker);
        worker.stop()
    }

    /// Sends SIGSTOP or SIGCONT to worker `index`.
    pub fn signal(&mut self, index: usize, stop: bool) -> anyhow::Result<()> {
        let slot = self.workers.get_mut(index).with_context(|| format!("no worker {index}"))?;
        let worker = slot.proc.as_ref().with_context(|| format!("worker {} is not running", slot.id))?;
        let pid = libc::pid_t::try_from(worker.pid()).context("a pid out of range")?;
        let signal = if stop { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) only sends a signal; the pid is our own child,
        // which cannot have been reaped (and the pid reused) while its
        // guard holds it.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc != 0 {
            bail!("cannot signal worker {}: {}", slot.id, std::io::Error::last_os_error());
        }
        slot.stopped = stop;
        Ok(())
    }

    /// SIGKILLs the (one) coordinator and starts it again on its store.
    pub async fn restart_coordinator(&mut self) -> anyhow::Result<()> {
        let [slot] = self.coordinators.as_mut_slice() else {
            bail!(
                "restart_coordinator needs exactly one coordinator of ours, not {}",
                self.coordinators.len()
            );
        };
        slot.proc.restart(&self.coordinator_bin).await?;
        // The restart keeps the address today; should that change, the
        // proxies follow, so the workers' configs never need to.
        self.url = slot.proc.url();
        for proxy in self.workers.iter().filter_map(|w| w.proxy.as_ref()) {
            proxy.retarget(&self.url)?;
        }
        Ok(())
    }

    /// The index of the coordinator whose `/readyz` answers 200, when
    /// exactly one running coordinator's does.
    pub async fn leader(&self) -> Option<usize> {
        let mut leading = Vec::new();
        for (i, slot) in self.coordinators.iter().enumerate() {
            if !slot.down && slot.proc.leads().await {
                leading.push(i);
            }
        }
        match leading.as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// SIGKILLs the coordinator that leads and waits (up to `within`) for
    /// another to lead; the killed one stays down until
    /// [`Fleet::start_coordinator`]. `at_ms` is set to the kill's time.
    pub async fn kill_leader(&mut self, within: Duration, at_ms: &mut u64) -> anyhow::Result<Takeover> {
        let killed = self.leader().await.context("no single coordinator leads (every /readyz polled)")?;
        let slot = &mut self.coordinators[killed];
        slot.proc.kill9()?;
        slot.down = true;
        let killed_at = tokio::time::Instant::now();
        *at_ms = super::payload::now_ms();
        let deadline = killed_at + within;
        loop {
            if let Some(leader) = self.leader().await {
                let takeover_ms = u64::try_from(killed_at.elapsed().as_millis()).unwrap_or(u64::MAX);
                return Ok(Takeover { killed, leader, takeover_ms });
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no standby led within {within:?} of killing coordinator {killed}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts killed coordinator `index` again on its address, config and
    /// store: it joins as a standby.
    pub async fn start_coordinator(&mut self, index: usize) -> anyhow::Result<()> {
        let slot = self.coordinators.get_mut(index).with_context(|| format!("no coordinator {index}"))?;
        slot.proc.relaunch(&self.coordinator_bin).await?;
        slot.down = false;
        Ok(())
    }

    /// Notices children that exited on their own; returns the new ones'
    /// descriptions (also kept for the report).
    pub fn check(&mut self) -> Vec<String> {
        let mut new = Vec::new();
        let mut gone = Vec::new();
        for slot in &mut self.workers {
            if let Some(worker) = slot.proc.as_mut()
                && let Err(e) = worker.check_alive()
            {
                new.push(format!("worker {}: {e:#}", slot.id));
                gone.extend(slot.proc.take().map(|w| (slot.id.clone(), w)));
            }
        }
        for (id, worker) in gone {
            self.save_logs(&id, &worker);
        }
        let mut dead = Vec::new();
        for (i, slot) in self.coordinators.iter_mut().enumerate() {
            if !slot.down
                && let Err(e) = slot.proc.check_alive()
            {
                new.push(format!("{}: {e:#}", coordinator_name(i)));
                slot.down = true;
                dead.push(i);
            }
        }
        for i in dead {
            self.save_logs(&coordinator_name(i), &self.coordinators[i].proc);
        }
        self.crashes.extend(new.iter().cloned());
        new
    }

    pub fn crashes(&self) -> &[String] {
        &self.crashes
    }

    /// Kills every worker, then the coordinator, waiting for each.
    pub async fn shutdown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let workers: Vec<(String, Worker)> =
            self.workers.iter_mut().filter_map(|slot| Some((slot.id.clone(), slot.proc.take()?))).collect();
        for (id, worker) in workers {
            self.save_logs(&id, &worker);
            if let Err(e) = worker.stop() {
                errors.push(format!("worker {id}: {e:#}"));
            }
        }
        for (i, slot) in std::mem::take(&mut self.coordinators).into_iter().enumerate() {
            self.save_logs(&coordinator_name(i), &slot.proc);
            if let Err(e) = slot.proc.stop() {
                errors.push(format!("{}: {e:#}", coordinator_name(i)));
            }
        }
        errors
    }
}

/// `coordinator`, `coordinator1`, ...: the first keeps the name it had
/// when there was only ever one.
fn coordinator_name(index: usize) -> String {
    if index == 0 { "coordinator".to_owned() } else { format!("coordinator{index}") }
}

/// One lease as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    pub name: String,
    pub index: u32,
    /// Empty when unassigned.
    pub owner: String,
    pub parked: bool,
    /// The stored checkpoint (Kafka partitions; queue slots have none).
    pub checkpoint: Option<i64>,
}

/// The coordinators' admin API. The channels connect lazily and again
/// after every failure, so they outlive a coordinator restart. With
/// several coordinators a call goes to the one that answered last and,
/// when it fails (a standby answers UNAVAILABLE, a killed one not at all),
/// to the others in turn.
#[derive(Clone)]
pub struct Admin {
    clients: Vec<AdminApiClient<Channel>>,
    /// The index of the client that answered last.
    last: Arc<std::sync::atomic::AtomicUsize>,
}

impl Admin {
    /// `urls`: one URL or several, comma-separated.
    pub fn new(urls: &str) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let channel = Endpoint::from_shared(url.to_owned())
                .with_context(|| format!("bad coordinator URL {url}"))?
                .connect_timeout(ADMIN_TIMEOUT)
                .timeout(ADMIN_TIMEOUT)
                .connect_lazy();
            clients.push(AdminApiClient::new(channel));
        }
        if clients.is_empty() {
            bail!("no coordinator URL in `{urls}`");
        }
        Ok(Self { clients, last: Arc::default() })
    }

    /// Calls `call` on the coordinator that answered last, then the others;
    /// the first success, else the last error.
    async fn first_answer<T, F, Fut>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(AdminApiClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        use std::sync::atomic::Ordering;
        let start = self.last.load(Ordering::Relaxed);
        let mut last_error = tonic::Status::unavailable("no coordinator");
        for k in 0..self.clients.len() {
            let i = (start + k) % self.clients.len();
            match call(self.clients[i].clone()).await {
                Ok(reply) => {
                    self.last.store(i, Ordering::Relaxed);
                    return Ok(reply.into_inner());
                }
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// The leases of `names` (streams or subscriptions).
    pub async fn leases(&self, names: &[String]) -> anyhow::Result<Vec<LeaseView>> {
        let reply = self
            .first_answer(|mut c| async move {
                c.list_leases(v1::ListLeasesRequest { name: String::new() }).await
            })
            .await
            .context("ListLeases failed")?;
        Ok(reply
            .leases
            .into_iter()
            .filter_map(|l| {
                let id = l.lease?;
                let parked = l.state == LeaseState::Parked as i32;
                names.contains(&id.name).then_some(LeaseView {
                    name: id.name,
                    index: id.index,
                    owner: l.owner,
                    parked,
                    checkpoint: l.checkpoint,
                })
            })
            .collect())
    }

    pub async fn subscriptions(&self) -> anyhow::Result<Vec<v1::SubscriptionInfo>> {
        Ok(self
            .first_answer(|mut c| async move { c.list_subscriptions(v1::ListSubscriptionsRequest {}).await })
            .await
            .context("ListSubscriptions failed")?
            .subscriptions)
    }
}

/// The lease table as last seen, and how many times a lease changed hands.
#[derive(Debug, Default)]
pub struct LeaseWatch {
    /// Current owner ("" when unassigned) by (name, index).
    current: BTreeMap<(String, u32), String>,
    /// Last non-empty owner by (name, index).
    last_owner: BTreeMap<(String, u32), String>,
    /// Last checkpoint seen by (name, index).
    checkpoints: BTreeMap<(String, u32), i64>,
    pub moves: u64,
    /// Every move as (wall-clock ms of the listing, `name/index from -> to`),
    /// so a report can tell a fault's moves from the balancer's.
    pub log: Vec<(u64, String)>,
}

impl LeaseWatch {
    /// Takes a new listing: a lease counts as moved when its owner differs
    /// from its previous owner, unassigned gaps in between ignored (a
    /// failover passes through "unassigned"; a first grant is no move).
    /// Returns the leases whose checkpoint moved forward since the last
    /// listing (a first sighting is no advance: nothing to compare).
    pub fn update(&mut self, leases: &[LeaseView], at_ms: u64) -> Vec<(String, u32)> {
        let mut advanced = Vec::new();
        for l in leases {
            let key = (l.name.clone(), l.index);
            if let Some(checkpoint) = l.checkpoint
                && let Some(before) = self.checkpoints.insert(key.clone(), checkpoint)
                && checkpoint > before
            {
                advanced.push(key.clone());
            }
            if !l.owner.is_empty() {
                if let Some(prev) = self.last_owner.get(&key)
                    && *prev != l.owner
                {
                    self.moves += 1;
                    self.log.push((at_ms, format!("{}/{} {prev} -> {}", l.name, l.index, l.owner)));
                }
                self.last_owner.insert(key.clone(), l.owner.clone());
            }
            self.current.insert(key, l.owner.clone());
        }
        advanced
    }

    /// The leases `owner` held at the last listing.
    pub fn owned_by(&self, owner: &str) -> Vec<(String, u32)> {
        self.current.iter().filter(|(_, o)| o.as_str() == owner).map(|(k, _)| k.clone()).collect()
    }
}

/// Whether the owners' lease counts (active leases, owned ones) differ
/// by at most one: what the balancer settles to with no load.
pub fn counts_within_one(leases: &[LeaseView]) -> bool {
    let mut per: BTreeMap<&str, usize> = BTreeMap::new();
    for l in leases.iter().filter(|l| !l.parked && !l.owner.is_empty()) {
        *per.entry(l.owner.as_str()).or_default() += 1;
    }
    let (min, max) = (per.values().min(), per.values().max());
    min.zip(max).is_none_or(|(min, max)| max - min <= 1)
}

/// Whether every expected lease is owned, and by how many workers.
pub fn assignment(leases: &[LeaseView], expected: usize) -> (bool, usize) {
    let active: Vec<&LeaseView> = leases.iter().filter(|l| !l.parked).collect();
    let all_owned = active.len() >= expected && active.iter().all(|l| !l.owner.is_empty());
    let mut owners: Vec<&str> = active.iter().map(|l| l.owner.as_str()).filter(|o| !o.is_empty()).collect();
    owners.sort_unstable();
    owners.dedup();
    (all_owned, owners.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(index: u32, owner: &str) -> LeaseView {
        LeaseView { name: "s".into(), index, owner: owner.into(), parked: false, checkpoint: None }
    }

    #[test]
    fn moves_count_owner_changes_across_unassigned_gaps() {
        let mut w = LeaseWatch::default();
        w.update(&[lease(0, "a"), lease(1, "")], 0);
        w.update(&[lease(0, "a"), lease(1, "b")], 0);
        assert_eq!(w.moves, 0, "first grants are no moves");
        w.update(&[lease(0, ""), lease(1, "b")], 0);
        assert_eq!(w.owned_by("a"), Vec::<(String, u32)>::new());
        w.update(&[lease(0, "c"), lease(1, "a")], 7);
        assert_eq!(w.moves, 2);
        assert_eq!(w.log, vec![(7, "s/0 a -> c".to_owned()), (7, "s/1 b -> a".to_owned())]);
        assert_eq!(w.owned_by("a"), vec![("s".to_owned(), 1)]);
        w.update(&[lease(0, "c"), lease(1, "a")], 0);
        assert_eq!(w.moves, 2);
    }

    #[test]
    fn checkpoint_advances_are_reported_from_the_second_sighting() {
        let mut w = LeaseWatch::default();
        let at = |index: u32, checkpoint: Option<i64>| LeaseView { checkpoint, ..lease(index, "a") };
        assert!(w.update(&[at(0, Some(5)), at(1, None)], 0).is_empty(), "first sightings");
        assert_eq!(w.update(&[at(0, Some(9)), at(1, Some(3))], 0), vec![("s".to_owned(), 0)]);
        assert!(w.update(&[at(0, Some(9)), at(1, Some(3))], 0).is_empty(), "standing still");
        assert_eq!(w.update(&[at(0, Some(9)), at(1, Some(4))], 0), vec![("s".to_owned(), 1)]);
    }

    #[test]
    fn counts_within_one_ignores_unowned_and_parked_leases() {
        assert!(counts_within_one(&[lease(0, "a"), lease(1, "a"), lease(2, "b")]));
        assert!(!counts_within_one(&[lease(0, "a"), lease(1, "a"), lease(2, "a"), lease(3, "b")]));
        let parked = LeaseView { parked: true, ..lease(2, "a") };
        assert!(counts_within_one(&[lease(0, "a"), lease(1, "b"), parked, lease(3, "")]));
        assert!(counts_within_one(&[]));
    }

    #[test]
    fn assignment_needs_every_active_lease_owned() {
        assert_eq!(assignment(&[lease(0, "a"), lease(1, "")], 2), (false, 1));
        assert_eq!(assignment(&[lease(0, "a"), lease(1, "b"), lease(2, "a")], 3), (true, 2));
        assert_eq!(assignment(&[lease(0, "a")], 2), (false, 1), "a lease not listed yet");
        let parked = LeaseView { parked: true, ..lease(1, "") };
        assert_eq!(assignment(&[lease(0, "a"), parked], 1), (true, 1));
    }
}
