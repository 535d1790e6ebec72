//! The real binaries as child processes. Every child lives in a [`Proc`]
//! that kills it when dropped, and the kernel kills it when the harness
//! dies (`PR_SET_PDEATHSIG`), so neither a failing test nor an
//! interrupted load run leaves a coordinator or worker behind.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where a workspace binary is: `SHARDLINE_BIN_DIR`, else next to the
/// running executable (a test binary in `target/<profile>/deps` looks in
/// `target/<profile>`).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("SHARDLINE_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|d| d == "deps") {
        dir.pop();
    }
    dir.join(name)
}

/// Fails with the build command when `bin` is missing: the usual mistake
/// is a binary not built, or built in another profile.
pub fn check_bin(bin: &Path, flag: &str) -> Result<()> {
    if !bin.is_file() {
        bail!(
            "{} not found: build it with `cargo build --workspace --bins` (add --release for the load \
             harness) or pass {flag}",
            bin.display()
        );
    }
    Ok(())
}

/// Leaves the operator's `SHARDLINE_*` settings out of a child's
/// environment: the generated config says everything (a token in the
/// shell would make every call fail).
fn hermetic(command: &mut Command) -> &mut Command {
    for var in [
        "SHARDLINE_TOKEN",
        "SHARDLINE_KAFKA_BROKERS",
        "SHARDLINE_AMQP_URL",
        "SHARDLINE_CONFIG",
        "SHARDLINE_COORDINATOR",
        "SHARDLINE_WORKER_CONFIG",
        "SHARDLINE_STORE",
        "SHARDLINE_ADVERTISE_URL",
        "SHARDLINE_WORKER_TOKEN",
        "SHARDLINE_VIEWER_TOKEN",
        "SHARDLINE_TOKEN_FILE",
        "SHARDLINE_TLS_CA",
        "SHARDLINE_TLS_CERT",
        "SHARDLINE_TLS_KEY",
    ] {
        command.env_remove(var);
    }
    command
}

/// A child process, killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    /// For messages: `coordinator`, a worker id.
    pub name: String,
}

impl Proc {
    /// Starts `command` with stdin closed; stdout and stderr are the
    /// caller's choice.
    pub fn spawn(name: &str, mut command: Command) -> Result<Self> {
        // SAFETY: runs in the forked child before exec and only calls
        // prctl(2), which is async-signal-safe and touches no parent memory.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.stdin(Stdio::null()).spawn().with_context(|| {
            format!(
                "cannot start {name} ({:?}; built? cargo build --workspace --bins)",
                command.get_program()
            )
        })?;
        Ok(Self { child, name: name.to_owned() })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `kill -9`, then reaped: gone when this returns.
    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill().with_context(|| format!("kill -9 {}", self.name))?;
        self.child.wait().with_context(|| format!("reap {}", self.name))?;
        Ok(())
    }

    pub fn signal(&self, signal: i32) -> Result<()> {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        if rc != 0 {
            bail!("kill({}, {signal}) failed: {}", self.pid(), std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Still running (not exited, not killed)?
    pub fn child_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How it exited, if it has.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child.try_wait().with_context(|| format!("cannot check the {} process", self.name))
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // An exited child is no error to `kill` (std knows its status).
        if let Err(e) = self.child.kill().and_then(|()| self.child.wait().map(drop)) {
            eprintln!("cannot stop {} (pid {}): {e}", self.name, self.child.id());
        }
    }
}

/// Starts `bin ARGS` with no `SHARDLINE_*` variables but `env`'s (the
/// config says everything else) and stdout and stderr where the caller
/// says; `name` names it in messages.
pub fn spawn<S: AsRef<OsStr>>(
    name: &str,
    bin: &Path,
    args: impl IntoIterator<Item = S>,
    env: &[(&str, &str)],
    stdout: Stdio,
    stderr: Stdio,
) -> Result<Proc> {
    let mut command = Command::new(bin);
    hermetic(&mut command)
        .args(args)
        .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
        .envs(env.iter().copied())
        .stdout(stdout)
        .stderr(stderr);
    Proc::spawn(name, command)
}

/// Starts `shardline-coordinator --config CONFIG` (see [`spawn`]) and
/// waits up to `timeout` for its `listening ADDR` line. Stdout is drained
/// by a thread afterwards, so a full pipe never blocks the child; stderr
/// (its log) goes to `stderr`. Blocking; from async code use
/// [`spawn_coordinator`] on a runtime thread and [`Starting::wait`] on a
/// blocking one.
pub fn start_coordinator(
    bin: &Path,
    config: &Path,
    env: &[(&str, &str)],
    stderr: Stdio,
    timeout: Duration,
) -> Result<(Proc, SocketAddr)> {
    spawn_coordinator(bin, config, env, stderr)?.wait(timeout)
}

/// A coordinator started but maybe not listening yet.
pub struct Starting {
    proc: Proc,
    listening: std::sync::mpsc::Receiver<String>,
}

/// Starts `shardline-coordinator --config CONFIG` without waiting. The
/// kernel kills a child when the *thread* that started it ends
/// (`PR_SET_PDEATHSIG`), so call this on a thread that lives as long as
/// the child: the test's, or a runtime worker, never a `spawn_blocking`
/// thread (tokio ends those after 10 s idle, killing the coordinator).
pub fn spawn_coordinator(bin: &Path, config: &Path, env: &[(&str, &str)], stderr: Stdio) -> Result<Starting> {
    spawn_listening("coordinator", bin, config, env, stderr)
}

/// Starts `shardline-gateway --config CONFIG` (see [`spawn`]) and waits up
/// to `timeout` for its `listening ADDR` line, as [`start_coordinator`].
pub fn start_gateway(
    bin: &Path,
    config: &Path,
    env: &[(&str, &str)],
    stderr: Stdio,
    timeout: Duration,
) -> Result<(Proc, SocketAddr)> {
    spawn_listening("gateway", bin, config, env, stderr)?.wait(timeout)
}

/// Starts `BIN --config CONFIG` (a binary that prints `listening ADDR`
/// once bound) without waiting; `name` names it in messages.
pub fn spawn_listening(
    name: &str,
    bin: &Path,
    config: &Path,
    env: &[(&str, &str)],
    stderr: Stdio,
) -> Result<Starting> {
    let args = [OsStr::new("--config"), config.as_os_str()];
    let mut proc = spawn(name, bin, args, env, Stdio::piped(), stderr)?;
    let stdout = proc.child.stdout.take().with_context(|| format!("the {name}'s stdout is not piped"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut tx = Some(tx);
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("listening ")
                && let Some(tx) = tx.take()
                && tx.send(addr.trim().to_owned()).is_err()
            {
                // The starter gave up waiting; keep draining regardless.
            }
        }
    });
    Ok(Starting { proc, listening: rx })
}

impl Starting {
    /// Waits up to `timeout` for the `listening ADDR` line. Blocking (any
    /// thread: the child's life is tied to the one that spawned it).
    pub fn wait(mut self, timeout: Duration) -> Result<(Proc, SocketAddr)> {
        let addr = match self.listening.recv_timeout(timeout) {
            Ok(addr) => addr,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.proc.wait_exit(Duration::from_secs(5))?;
                bail!("the {} exited ({status}) before listening", self.proc.name)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                bail!("the {} printed no `listening ADDR` within {timeout:?}", self.proc.name)
            }
        };
        let addr = addr.parse().with_context(|| format!("bad address in `listening {addr}`"))?;
        Ok((self.proc, addr))
    }
}

/// Starts `shardline-worker --config CONFIG` (`id` names it in messages);
/// stdout (where handlers such as `log` print) is discarded, stderr (its
/// log) goes to `stderr`. Returns as soon as the process runs: a worker
/// prints nothing when ready.
pub fn start_worker(bin: &Path, config: &Path, id: &str, stderr: Stdio) -> Result<Proc> {
    spawn(id, bin, [OsStr::new("--config"), config.as_os_str()], &[], Stdio::null(), stderr)
}
