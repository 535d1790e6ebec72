//! A function's process pool: `concurrency` slots, each running one
//! process at a time through Lambda's lifecycle.
//!
//! A slot's supervisor starts its process with `AWS_LAMBDA_RUNTIME_API`
//! pointing at a fresh [`Endpoint`](super::api::Endpoint), waits for its
//! init (its first `/next`, within `init_timeout`), then hands it one
//! invocation at a time from the pool's queue. Whatever breaks a process
//! (an init error, an exit, a caller that stopped waiting because the
//! deadline passed) ends it: its whole process group is killed and a new
//! one started, at once after a working process, with backoff (1 s
//! doubling to 60 s) after a failed init, which also marks the worker
//! unhealthy until a process initialises again. An invocation the dead
//! process held fails; the batch policy decides what follows.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::api::{Current, Dispatch, Endpoint, FunctionError, Post};
use crate::health::Health;

/// How an invocation ended.
#[derive(Debug)]
pub enum Outcome {
    /// The function's result (JSON, possibly empty).
    Response(Bytes),
    /// The function reported an error (`/error`).
    Error(FunctionError),
    /// Its process died, or did not finish by the deadline and was killed.
    Died(String),
}

/// How a pool starts its processes.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The handler's name (logs, metrics, health).
    pub handler: String,
    pub command: Vec<String>,
    /// Every variable the processes get beyond the worker's own.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<std::path::PathBuf>,
    pub memory_limit: Option<u64>,
    pub init_timeout: Duration,
    pub function_arn: String,
    pub processes: u32,
}

/// What every slot can see: the ready count and the last init failure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub ready: usize,
    pub init_failure: Option<String>,
}

pub struct Invocation {
    pub id: String,
    pub event: Bytes,
    pub deadline_ms: u64,
    pub trace_id: String,
    reply: oneshot::Sender<Outcome>,
}

struct Shared {
    spec: Spec,
    queue: tokio::sync::Mutex<mpsc::Receiver<Invocation>>,
    status: watch::Sender<Status>,
    health: Health,
    stop: CancellationToken,
}

pub struct Pool {
    queue: mpsc::Sender<Invocation>,
    shared: Arc<Shared>,
    slots: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// Backoff after a failed init.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// How long a process has to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// Longest log line forwarded whole; longer lines are cut.
const MAX_LINE: usize = 16 * 1024;

impl Pool {
    /// Starts the slots; processes initialise in the background.
    pub fn start(spec: Spec, health: Health) -> Self {
        let (queue_tx, queue_rx) = mpsc::channel(spec.processes as usize * 4);
        let shared = Arc::new(Shared {
            queue: tokio::sync::Mutex::new(queue_rx),
            status: watch::Sender::new(Status::default()),
            health,
            stop: CancellationToken::new(),
            spec,
        });
        let slots = (0..shared.spec.processes).map(|i| tokio::spawn(supervise(shared.clone(), i))).collect();
        Self { queue: queue_tx, shared, slots: std::sync::Mutex::new(slots) }
    }

    pub fn status(&self) -> watch::Receiver<Status> {
        self.shared.status.subscribe()
    }

    /// Runs one invocation on the next free process. `Err` only when no
    /// process could take it: the pool stopped, or none initialised before
    /// the deadline.
    pub async fn invoke(&self, event: Bytes, deadline_ms: u64, trace_id: String) -> Result<Outcome, String> {
        let (reply, outcome) = oneshot::channel();
        let id = request_id();
        let invocation = Invocation { id: id.clone(), event, deadline_ms, trace_id, reply };
        if self.queue.send(invocation).await.is_err() {
            return Err("the function's processes are stopping".into());
        }
        let mut status = self.shared.status.subscribe();
        // Give up a little before the deadline when no process can start,
        // naming the init failure rather than timing out mute.
        let give_up = Duration::from_millis(deadline_ms.saturating_sub(crate::unix_ms()).saturating_sub(50));
        let never_ready = async {
            tokio::time::sleep(give_up).await;
            status.wait_for(|s| s.ready == 0 && s.init_failure.is_some()).await.map(|s| s.clone())
        };
        tokio::select! {
            outcome = outcome => {
                outcome.map_err(|_| format!("invocation {id} was dropped by the process pool (stopping)"))
            }
            Ok(status) = never_ready => Err(format!(
                "no process of the function could initialise: {}",
                status.init_failure.unwrap_or_default()
            )),
        }
    }

    /// SIGTERM to every process, SIGKILL after a grace period; waits.
    pub async fn shutdown(&self) {
        self.shared.stop.cancel();
        let slots = std::mem::take(&mut *crate::lock(&self.slots));
        for slot in slots {
            if let Err(e) = slot.await {
                tracing::error!(handler = %self.shared.spec.handler, error = %e, "a function slot's supervisor died");
            }
        }
    }
}

/// Lambda-style request ids: random, in UUID form.
pub(crate) fn request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        h.write_u128(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
        );
        h.finish()
    };
    let (a, b) = (random(1), random(2));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// How a process's service ended.
enum End {
    /// The pool is stopping.
    Stopped,
    /// The process must go (it was killed already or is dead); the reason.
    Replace(String),
}

async fn supervise(shared: Arc<Shared>, slot: u32) {
    let handler = shared.spec.handler.clone();
    let mut backoff = BACKOFF.0;
    let mut carried: Option<Invocation> = None;
    while !shared.stop.is_cancelled() {
        let mut process = match Process::start(&shared.spec, slot).await {
            Ok(p) => p,
            Err(why) => {
                init_failed(&shared, slot, why);
                if pause(&shared.stop, &mut backoff).await {
                    continue;
                }
                break;
            }
        };
        let first = tokio::select! {
            biased;
            () = shared.stop.cancelled() => {
                process.terminate().await;
                break;
            }
            next = process.initialised(shared.spec.init_timeout) => next,
        };
        let next = match first {
            Ok(next) => next,
            Err(why) => {
                process.kill().await;
                init_failed(&shared, slot, why);
                if pause(&shared.stop, &mut backoff).await {
                    continue;
                }
                break;
            }
        };
        backoff = BACKOFF.0;
        shared.status.send_modify(|s| {
            s.ready += 1;
            s.init_failure = None;
        });
        shared.health.clear(&health_key(&handler));
        tracing::info!(handler = %handler, slot, pid = process.pid, init_ms = process.started.elapsed().as_millis() as u64, "function process initialised");
        let end = process.serve(&shared, next, &mut carried).await;
        shared.status.send_modify(|s| s.ready = s.ready.saturating_sub(1));
        match end {
            End::Stopped => {
                process.terminate().await;
                break;
            }
            End::Replace(why) => {
                tracing::warn!(handler = %handler, slot, pid = process.pid, reason = %why, "replacing the function process");
                process.kill().await;
            }
        }
    }
    if let Some(invocation) = carried {
        let died = Outcome::Died("the function's processes stopped".into());
        if invocation.reply.send(died).is_err() {
            tracing::debug!(handler = %handler, "an invocation's caller was gone when the pool stopped");
        }
    }
}

fn health_key(handler: &str) -> String {
    format!("function `{handler}`")
}

fn init_failed(shared: &Shared, slot: u32, why: String) {
    let handler = &shared.spec.handler;
    tracing::error!(handler = %handler, slot, reason = %why, "the function process failed to initialise");
    metrics::counter!("shardline_function_init_errors_total", "handler" => handler.clone()).increment(1);
    shared.health.set(&health_key(handler), format!("init failed: {why}"));
    shared.status.send_modify(|s| s.init_failure = Some(why));
}

/// Waits out the backoff and doubles it; false when the pool stopped.
async fn pause(stop: &CancellationToken, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF.1);
    stop.run_until_cancelled(tokio::time::sleep(wait)).await.is_some()
}

/// One running function process and its endpoint.
struct Process {
    child: Child,
    pid: i32,
    endpoint: Endpoint,
    /// The request id its output lines are logged with.
    last: Current,
    logs: JoinSet<()>,
    started: Instant,
    handler: String,
    function_arn: String,
}

impl Process {
    async fn start(spec: &Spec, slot: u32) -> Result<Self, String> {
        let endpoint = Endpoint::bind().await.map_err(|e| format!("cannot bind a Runtime API port: {e}"))?;
        let Some((program, args)) = spec.command.split_first() else {
            return Err("the command is empty".into());
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("AWS_LAMBDA_RUNTIME_API", endpoint.addr.to_string())
            .env("AWS_LAMBDA_LOG_STREAM_NAME", format!("{}/{slot}", spec.handler))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = &spec.working_dir {
            command.current_dir(dir);
        }
        let limit = spec.memory_limit;
        // SAFETY: between fork and exec only async-signal-safe calls
        // (setpgid, prctl, setrlimit), touching no memory of the parent's.
        unsafe {
            command.pre_exec(move || {
                // Its own process group: a kill reaches what it started too.
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Dies with the worker, even a worker killed with -9.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(bytes) = limit {
                    let rl = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
                    if libc::setrlimit(libc::RLIMIT_DATA, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| format!("cannot start `{program}`: {e}"))?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        metrics::counter!("shardline_function_process_starts_total", "handler" => spec.handler.clone())
            .increment(1);
        let last = Current::default();
        let mut logs = JoinSet::new();
        if let Some(out) = child.stdout.take() {
            logs.spawn(forward_lines(out, spec.handler.clone(), pid, "stdout", last.clone()));
        }
        if let Some(err) = child.stderr.take() {
            logs.spawn(forward_lines(err, spec.handler.clone(), pid, "stderr", last.clone()));
        }
        tracing::debug!(handler = %spec.handler, slot, pid, api = %endpoint.addr, "function process started");
        Ok(Self {
            child,
            pid,
            endpoint,
            last,
            logs,
            started: Instant::now(),
            handler: spec.handler.clone(),
            function_arn: spec.function_arn.clone(),
        })
    }

    /// Waits for the end of init: the first `/next`, or why there was none.
    async fn initialised(&mut self, timeout: Duration) -> Result<oneshot::Sender<Dispatch>, String> {
        let deadline = tokio::time::sleep(timeout);
        tokio::select! {
            next = self.endpoint.next.recv() => next.ok_or_else(|| "its Runtime API endpoint closed".to_owned()),
            Some(post) = self.endpoint.posts.recv() => Err(match post {
                Post::InitError(e) => e.to_string(),
                other => format!("it posted {other:?} before asking for an invocation"),
            }),
            status = self.child.wait() => Err(match status {
                Ok(s) => format!("the process exited ({s}) before asking for an invocation (Runtime.ExitError)"),
                Err(e) => format!("the process could not be waited for: {e}"),
            }),
            () = deadline => Err(format!("no request for an invocation within init_timeout ({timeout:?})")),
        }
    }

    /// Hands this initialised process invocations until it must go.
    async fn serve(
        &mut self,
        shared: &Shared,
        mut next: oneshot::Sender<Dispatch>,
        carried: &mut Option<Invocation>,
    ) -> End {
        loop {
            let mut invocation = match carried.take() {
                Some(i) => i,
                None => match self.take(shared).await {
                    Ok(i) => i,
                    Err(end) => return end,
                },
            };
            if invocation.reply.is_closed() {
                continue; // its caller gave up while it waited in the queue
            }
            let id = invocation.id.clone();
            *crate::lock(&self.endpoint.current) = Some(id.clone());
            *crate::lock(&self.last) = Some(id.clone());
            let dispatch = Dispatch {
                id: id.clone(),
                event: invocation.event.clone(),
                deadline_ms: invocation.deadline_ms,
                function_arn: self.function_arn.clone(),
                trace_id: invocation.trace_id.clone(),
            };
            if next.send(dispatch).is_err() {
                // Its `/next` connection closed: it never saw this one.
                *crate::lock(&self.endpoint.current) = None;
                *carried = Some(invocation);
                return End::Replace("it stopped waiting for its next invocation".into());
            }
            let started = Instant::now();
            let result = tokio::select! {
                result = self.result_of(&id) => result,
                () = invocation.reply.closed() => Err(format!(
                    "invocation {id} passed its deadline (or its lease was revoked) after {:?}", started.elapsed()
                )),
                () = shared.stop.cancelled() => Err("the worker is stopping".into()),
            };
            let outcome_label = match &result {
                Ok(Outcome::Response(_)) => "ok",
                Ok(_) => "error",
                Err(_) => "died",
            };
            metrics::counter!("shardline_function_invocations_total", "handler" => self.handler.clone(), "outcome" => outcome_label).increment(1);
            let (outcome, end) = match result {
                Ok(outcome) => (outcome, None),
                Err(why) => (Outcome::Died(why.clone()), Some(why)),
            };
            if invocation.reply.send(outcome).is_err() {
                tracing::debug!(handler = %self.handler, request_id = %id, "the invocation's caller had gone");
            }
            if let Some(why) = end {
                return End::Replace(why);
            }
            next = tokio::select! {
                n = self.endpoint.next.recv() => match n {
                    Some(n) => n,
                    None => return End::Replace("its Runtime API endpoint closed".into()),
                },
                status = self.child.wait() => return End::Replace(exited(status, "between invocations")),
                () = shared.stop.cancelled() => return End::Stopped,
            };
        }
    }

    /// The next invocation from the pool's queue, while the process lives.
    async fn take(&mut self, shared: &Shared) -> Result<Invocation, End> {
        let mut queue = tokio::select! {
            q = shared.queue.lock() => q,
            status = self.child.wait() => return Err(End::Replace(exited(status, "while idle"))),
            () = shared.stop.cancelled() => return Err(End::Stopped),
        };
        tokio::select! {
            biased;
            () = shared.stop.cancelled() => Err(End::Stopped),
            status = self.child.wait() => Err(End::Replace(exited(status, "while idle"))),
            invocation = queue.recv() => invocation.ok_or(End::Stopped),
        }
    }

    /// What the process posts for invocation `id`, or how it died first.
    async fn result_of(&mut self, id: &str) -> Result<Outcome, String> {
        loop {
            tokio::select! {
                post = self.endpoint.posts.recv() => match post {
                    Some(Post::Response { id: done, body }) if done == id => return Ok(Outcome::Response(body)),
                    Some(Post::Error { id: done, error }) if done == id => {
                        tracing::warn!(handler = %self.handler, request_id = %id, error = %error, "the function reported an error");
                        return Ok(Outcome::Error(error));
                    }
                    Some(other) => tracing::warn!(handler = %self.handler, request_id = %id, post = ?other, "ignored a post for another invocation"),
                    None => return Err("its Runtime API endpoint closed".into()),
                },
                status = self.child.wait() => return Err(exited(status, &format!("during invocation {id}"))),
            }
        }
    }

    /// SIGKILL to the group; waits for the process and its output.
    async fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        self.reap().await;
    }

    /// SIGTERM, then SIGKILL after [`TERM_GRACE`].
    async fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
        if tokio::time::timeout(TERM_GRACE, self.child.wait()).await.is_err() {
            tracing::warn!(handler = %self.handler, pid = self.pid, "the function process ignored SIGTERM; killing it");
            self.signal(libc::SIGKILL);
        }
        self.reap().await;
    }

    fn signal(&self, signal: i32) {
        if self.pid <= 0 {
            return;
        }
        // SAFETY: kill(2) on the group this process leads (setpgid in
        // pre_exec); no memory is involved.
        let rc = unsafe { libc::kill(-self.pid, signal) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                tracing::error!(handler = %self.handler, pid = self.pid, signal, error = %e, "cannot signal the function process");
            }
        }
    }

    async fn reap(&mut self) {
        match self.child.wait().await {
            Ok(status) => {
                tracing::debug!(handler = %self.handler, pid = self.pid, %status, "function process ended")
            }
            Err(e) => {
                tracing::error!(handler = %self.handler, pid = self.pid, error = %e, "cannot wait for the function process")
            }
        }
        // Its pipes close with its group; a grandchild that escaped the
        // group could hold them open, so the readers get a moment, no more.
        let drained = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(done) = self.logs.join_next().await {
                if let Err(e) = done {
                    tracing::error!(handler = %self.handler, error = %e, "a function log reader died");
                }
            }
        });
        if drained.await.is_err() {
            self.logs.abort_all();
        }
    }
}

fn exited(status: std::io::Result<std::process::ExitStatus>, when: &str) -> String {
    match status {
        Ok(s) => format!("the process exited ({s}) {when}"),
        Err(e) => format!("the process could not be waited for ({e}) {when}"),
    }
}

/// Logs each line the process writes, with the request id it was
/// working on (Lambda's logs carry it too).
async fn forward_lines(
    stream: impl AsyncRead + Unpin,
    handler: String,
    pid: i32,
    name: &'static str,
    last: Current,
) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut line).await;
        match read {
            Ok(0) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']);
                let request_id = crate::lock(&last).clone().unwrap_or_default();
                tracing::info!(target: "function", handler = %handler, pid, stream = name, request_id = %request_id, "{text}");
            }
            Err(e) => {
                tracing::warn!(handler = %handler, pid, stream = name, error = %e, "cannot read the function's output");
                return;
            }
        }
    }
}
