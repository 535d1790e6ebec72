//! Whole-broker faults, for the load harness's `rabbit_kill`, `kafka_kill`
//! and `rabbit_stop` and the end-to-end tests that take RabbitMQ down:
//! hard kills (SIGKILL of the broker process on this machine) and
//! RabbitMQ's `stop_app`, each with the restart that always follows.
//!
//! The brokers are shared and were not started by the harness, so a kill
//! first records how to start the broker again: RabbitMQ with
//! `rabbitmq-server -detached` (how `scripts/brokers.sh` and the Debian
//! package start it); the Kafka broker (tansu) exactly as it ran, read
//! from `/proc/<pid>` before the kill (binary, arguments, working
//! directory, where its output went). The [`Killed`] guard starts the
//! broker again when dropped, so an interrupted or failed run never leaves
//! a broker down; [`Killed::restart`] is the normal path and also waits
//! until the broker answers its protocol.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// How long a restarted broker gets to answer. RabbitMQ recovers its
/// queues on boot, which takes a while after a kill on a small machine.
pub const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a killed process gets to disappear from `/proc`.
const GONE_TIMEOUT: Duration = Duration::from_secs(10);
/// One readiness probe, at most.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// RabbitMQ's AMQP port on this machine (the harness loads 127.0.0.1 only).
pub const AMQP_PORT: u16 = 5672;

/// Which broker a kill is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    Rabbitmq,
    /// The Kafka-protocol broker listening on this port.
    Kafka(u16),
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::Rabbitmq => "RabbitMQ",
            Broker::Kafka(_) => "the Kafka broker",
        }
    }
}

/// How to start a killed broker again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub program: PathBuf,
    /// `argv[0]` as it was (tansu was started as `tansu`).
    pub arg0: OsString,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    /// Where stdout and stderr went, when that was a file: the restarted
    /// broker appends to the same log.
    pub log: Option<PathBuf>,
    /// The program detaches the broker itself and exits
    /// (`rabbitmq-server -detached`): wait for it and check its status.
    pub detaches: bool,
}

impl Launch {
    /// `rabbitmq-server -detached`, as `scripts/brokers.sh` starts it.
    fn rabbitmq() -> Self {
        Self {
            program: "rabbitmq-server".into(),
            arg0: "rabbitmq-server".into(),
            args: vec!["-detached".into()],
            cwd: "/".into(),
            log: None,
            detaches: true,
        }
    }

    /// Starts the broker in its own process group, detached from the
    /// harness: it is a shared broker and must outlive this run (and a
    /// Ctrl-C sent to the harness's group). Blocks while a detaching
    /// launcher runs.
    fn spawn(&self) -> anyhow::Result<()> {
        let mut command = std::process::Command::new(&self.program);
        command.arg0(&self.arg0).args(&self.args).current_dir(&self.cwd).stdin(Stdio::null());
        match &self.log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .with_context(|| format!("cannot open the broker's log {}", path.display()))?;
                let err = file.try_clone().context("cannot share the broker's log")?;
                command.stdout(file).stderr(err);
            }
            None => {
                command.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        command.process_group(0);
        // SAFETY: between fork and exec only signal(2), close_range(2) and
        // close(2) run, all async-signal-safe. SIGHUP is ignored, as
        // `nohup` (how scripts/brokers.sh starts tansu) leaves it. Every
        // descriptor past stdio is closed: the harness runs under
        // `flock /tmp/shardline-e2e.lock`, whose lock descriptor it
        // inherits without close-on-exec, and a broker that outlives the
        // run holding it would keep every later e2e run waiting.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGHUP, libc::SIG_IGN);
                if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                    // A kernel before 5.9: one by one, up to a limit far
                    // above what the harness opens.
                    for fd in 3..65_536 {
                        libc::close(fd);
                    }
                }
                Ok(())
            });
        }
        let what = self.program.display();
        if self.detaches {
            let status = command.status().with_context(|| format!("cannot run {what}"))?;
            if !status.success() {
                bail!("{what} {:?} failed: {status}", self.args);
            }
        } else {
            // Not waited for: it is the machine's broker now, and init
            // reaps it once the harness has exited.
            command.spawn().with_context(|| format!("cannot start {what}"))?;
        }
        Ok(())
    }
}

/// A killed broker. Dropped without [`Killed::restart`] (the fault was
/// interrupted, the run failed), it starts the broker and waits for it.
pub struct Killed {
    broker: Broker,
    launch: Launch,
    pid: u32,
    /// Still to be started again.
    down: bool,
}

impl Killed {
    /// The pid that was killed.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Starts the broker again and waits until it answers.
    pub async fn restart(mut self) -> anyhow::Result<()> {
        // From here the guard has nothing left to do, whatever happens.
        self.down = false;
        let launch = self.launch.clone();
        tokio::task::spawn_blocking(move || launch.spawn())
            .await
            .context("the broker's launcher panicked")??;
        wait_ready(self.broker, READY_TIMEOUT).await
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if !self.down {
            return;
        }
        self.down = false;
        let broker = self.broker;
        eprintln!("{} was killed by an interrupted fault: starting it again", broker.name());
        if let Err(e) = self.launch.spawn() {
            eprintln!("error: cannot start {} again: {e:#}; start it by hand", broker.name());
            return;
        }
        // Drop cannot await: a blocking wait, on the way out of a run.
        let deadline = std::time::Instant::now() + READY_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if probe_blocking(broker) {
                eprintln!("{} answers again", broker.name());
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!("error: {} did not answer within {READY_TIMEOUT:?} of its restart", broker.name());
    }
}

/// RabbitMQ's app stopped by `rabbit_stop`. Dropped without
/// [`AppStopped::start`] (the schedule was interrupted), it runs
/// `rabbitmqctl start_app` and waits for AMQP.
pub struct AppStopped {
    down: bool,
}

impl AppStopped {
    /// Armed before `stop_app` runs: whatever happens after, the app is
    /// started again.
    pub fn arm() -> Self {
        Self { down: true }
    }

    /// `rabbitmqctl start_app`, then waits until AMQP answers.
    pub async fn start(mut self) -> anyhow::Result<()> {
        self.down = false;
        rabbitmqctl("start_app").await?;
        wait_ready(Broker::Rabbitmq, READY_TIMEOUT).await
    }
}

impl Drop for AppStopped {
    fn drop(&mut self) {
        if !self.down {
            return;
        }
        eprintln!("RabbitMQ's app was stopped by an interrupted fault: starting it again");
        let status = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("error: rabbitmqctl start_app: {s}; start it by hand"),
            Err(e) => eprintln!("error: cannot run rabbitmqctl start_app: {e}; start it by hand"),
        }
    }
}

/// `rabbitmqctl COMMAND`, failing with its output.
pub async fn rabbitmqctl(command: &str) -> anyhow::Result<()> {
    let output = tokio::process::Command::new("rabbitmqctl")
        .arg(command)
        .kill_on_drop(true)
        .output()
        .await
        .context("cannot run rabbitmqctl (is RabbitMQ installed on this machine?)")?;
    if !output.status.success() {
        bail!(
            "rabbitmqctl {command} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Kills RabbitMQ's Erlang VM with SIGKILL and waits for it to be gone.
pub async fn kill_rabbitmq() -> anyhow::Result<Killed> {
    let pids = rabbit_pids()?;
    let pid = match pids.as_slice() {
        [pid] => *pid,
        [] => bail!("no RabbitMQ Erlang VM (beam.smp running `-s rabbit boot`) on this machine"),
        many => {
            bail!("several RabbitMQ Erlang VMs ({many:?}): which one serves 127.0.0.1:{AMQP_PORT} is unclear")
        }
    };
    // The guard exists before the kill: from the kill on, the broker
    // comes back whatever happens to this run.
    let killed = Killed { broker: Broker::Rabbitmq, launch: Launch::rabbitmq(), pid, down: true };
    sigkill(pid).await?;
    Ok(killed)
}

/// Kills the process listening on 127.0.0.1:`port` with SIGKILL, having
/// recorded how it was started, and waits for it to be gone.
pub async fn kill_kafka(port: u16) -> anyhow::Result<Killed> {
    let pid = listener_pid(port)?
        .with_context(|| format!("no process of this machine listens on 127.0.0.1:{port}"))?;
    let launch = launch_of(Path::new(&format!("/proc/{pid}")))?;
    let killed = Killed { broker: Broker::Kafka(port), launch, pid, down: true };
    sigkill(pid).await?;
    Ok(killed)
}

async fn sigkill(pid: u32) -> anyhow::Result<()> {
    let raw = libc::pid_t::try_from(pid).context("a pid out of range")?;
    // SAFETY: kill(2) only sends a signal. The pid was read from /proc a
    // moment ago; it is not our child, so it could in theory have exited
    // and been reused in between, which the caller's checks (command line
    // or listening socket) make vanishingly unlikely within milliseconds.
    let rc = unsafe { libc::kill(raw, libc::SIGKILL) };
    if rc != 0 {
        bail!("cannot kill pid {pid}: {}", std::io::Error::last_os_error());
    }
    let deadline = Instant::now() + GONE_TIMEOUT;
    // Not our child: gone once its parent (init) has reaped it; a
    // zombie's `exe` link already reads as nothing.
    while std::fs::read_link(format!("/proc/{pid}/exe")).is_ok() {
        if Instant::now() > deadline {
            bail!("pid {pid} was sent SIGKILL but is still there after {GONE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Waits until the broker answers its protocol (AMQP's Connection.Start,
/// Kafka's Metadata reply).
pub async fn wait_ready(broker: Broker, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = match broker {
            Broker::Rabbitmq => amqp_answers(AMQP_PORT).await,
            Broker::Kafka(port) => kafka_answers(port).await,
        };
        match answer {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!("{} does not answer after {timeout:?}: {e:#}", broker.name())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Opens an AMQP 0-9-1 connection far enough to get Connection.Start.
async fn amqp_answers(port: u16) -> anyhow::Result<()> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut frame = [0u8; 7];
        s.read_exact(&mut frame).await?;
        anyhow::ensure!(frame[0] == 1, "not a method frame: {frame:?}");
        Ok(())
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange).await.context("no answer")?
}

/// A Kafka Metadata v0 request (all topics), answered with our correlation
/// id: proof the broker speaks Kafka, not just that a port is open.
async fn kafka_answers(port: u16) -> anyhow::Result<()> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(&metadata_request()).await?;
        let mut head = [0u8; 8];
        s.read_exact(&mut head).await?;
        anyhow::ensure!(head[4..8] == CORRELATION.to_be_bytes(), "another correlation id: {head:?}");
        Ok(())
    };
    tokio::time::timeout(PROBE_TIMEOUT, exchange).await.context("no answer")?
}

const CORRELATION: i32 = 4242;

fn metadata_request() -> Vec<u8> {
    let client = b"shardline-loadtest";
    let mut body = Vec::new();
    body.extend_from_slice(&3i16.to_be_bytes()); // api key: Metadata
    body.extend_from_slice(&0i16.to_be_bytes()); // version 0
    body.extend_from_slice(&CORRELATION.to_be_bytes());
    body.extend_from_slice(&(client.len() as i16).to_be_bytes());
    body.extend_from_slice(client);
    body.extend_from_slice(&(-1i32).to_be_bytes()); // all topics
    let mut request = (body.len() as i32).to_be_bytes().to_vec();
    request.extend(body);
    request
}

/// The probes for the blocking wait in [`Killed`]'s drop.
fn probe_blocking(broker: Broker) -> bool {
    use std::io::{Read, Write};
    let port = match broker {
        Broker::Rabbitmq => AMQP_PORT,
        Broker::Kafka(port) => port,
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, PROBE_TIMEOUT) else { return false };
    if s.set_read_timeout(Some(PROBE_TIMEOUT)).is_err() {
        return false;
    }
    match broker {
        Broker::Rabbitmq => {
            let mut frame = [0u8; 7];
            s.write_all(b"AMQP\x00\x00\x09\x01").is_ok() && s.read_exact(&mut frame).is_ok() && frame[0] == 1
        }
        Broker::Kafka(_) => {
            let mut head = [0u8; 8];
            s.write_all(&metadata_request()).is_ok()
                && s.read_exact(&mut head).is_ok()
                && head[4..8] == CORRELATION.to_be_bytes()
        }
    }
}

/// The pids of RabbitMQ Erlang VMs on this machine.
fn rabbit_pids() -> anyhow::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        // Processes come and go while we look: an unreadable one is not ours.
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let rabbit = args.windows(3).any(|w| w == [b"-s".as_slice(), b"rabbit", b"boot"]);
        if exe.file_name().is_some_and(|n| n == "beam.smp") && rabbit {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// The pid of the process with a socket listening on 127.0.0.1:`port`
/// (or on every address), from /proc/net/tcp and the processes' fds.
fn listener_pid(port: u16) -> anyhow::Result<Option<u32>> {
    let table = std::fs::read_to_string("/proc/net/tcp").context("cannot read /proc/net/tcp")?;
    let inodes = listening_inodes(&table, port);
    if inodes.is_empty() {
        return Ok(None);
    }
    for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            let target = target.to_string_lossy();
            if let Some(inode) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']'))
                && inodes.iter().any(|i| i == inode)
            {
                return Ok(Some(pid));
            }
        }
    }
    Ok(None)
}

/// The inodes of sockets in `/proc/net/tcp` text listening (state 0A) on
/// 127.0.0.1:`port` or 0.0.0.0:`port`.
fn listening_inodes(table: &str, port: u16) -> Vec<String> {
    let wanted = [format!("0100007F:{port:04X}"), format!("00000000:{port:04X}")];
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            (*state == "0A" && wanted.iter().any(|w| w == local)).then(|| (*inode).to_owned())
        })
        .collect()
}

/// How the process behind `proc` (a `/proc/<pid>` directory) was started.
fn launch_of(proc: &Path) -> anyhow::Result<Launch> {
    let program = std::fs::read_link(proc.join("exe"))
        .with_context(|| format!("cannot read {}/exe", proc.display()))?;
    if !program.exists() {
        // `/path (deleted)`: the binary was replaced since; starting the
        // new one would not be "exactly as it ran".
        bail!("the broker's binary {} is gone; refusing to kill what cannot be restarted", program.display());
    }
    let cmdline = std::fs::read(proc.join("cmdline"))
        .with_context(|| format!("cannot read {}/cmdline", proc.display()))?;
    let mut argv: Vec<OsString> =
        cmdline.split(|b| *b == 0).map(|a| OsString::from_vec(a.to_vec())).collect();
    // The command line ends with a NUL: one empty piece after it.
    if argv.last().is_some_and(|a| a.is_empty()) {
        argv.pop();
    }
    if argv.is_empty() {
        bail!("{} has no command line (a kernel thread or a zombie)", proc.display());
    }
    let arg0 = argv.remove(0);
    let cwd = std::fs::read_link(proc.join("cwd"))
        .with_context(|| format!("cannot read {}/cwd", proc.display()))?;
    let log = std::fs::read_link(proc.join("fd/1")).ok().filter(|p| p.is_absolute() && p.is_file());
    Ok(Launch { program, arg0, args: argv, cwd, log, detaches: false })
}

/// `host:port` of the first bootstrap server, when it is this machine
/// (the harness kills only local brokers).
pub fn local_kafka_port(brokers: &str) -> anyhow::Result<u16> {
    let first = brokers.split(',').next().unwrap_or_default().trim();
    let (host, port) = first.rsplit_once(':').with_context(|| format!("no port in `{first}`"))?;
    if !matches!(host, "127.0.0.1" | "localhost") {
        bail!("kafka_kill kills a broker of this machine only; the brokers are `{brokers}`");
    }
    port.parse().with_context(|| format!("bad port in `{first}`"))
}

/// Checks that `url` is RabbitMQ on this machine's AMQP port (the one
/// `rabbit_kill` kills and waits for).
pub fn local_amqp(url: &str) -> anyhow::Result<()> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host_port = host_port.split('/').next().unwrap_or_default();
    let ok = [
        format!("127.0.0.1:{AMQP_PORT}"),
        format!("localhost:{AMQP_PORT}"),
        "127.0.0.1".into(),
        "localhost".into(),
    ];
    if !ok.iter().any(|o| o == host_port) {
        bail!(
            "rabbit_kill kills the RabbitMQ of this machine (127.0.0.1:{AMQP_PORT}) only; the URL names `{host_port}`"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_are_found_by_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:2384 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 103929 1 0\n\
           1: 0100007F:2384 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 131666 1 0\n\
           2: 00000000:1628 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0\n";
        assert_eq!(listening_inodes(table, 9092), vec!["103929".to_owned()]);
        assert_eq!(listening_inodes(table, 5672), vec!["777".to_owned()]);
        assert!(listening_inodes(table, 9093).is_empty());
    }

    #[test]
    fn a_process_launch_is_read_from_proc() -> anyhow::Result<()> {
        let me = launch_of(Path::new("/proc/self"))?;
        assert_eq!(me.program, std::env::current_exe()?);
        assert_eq!(me.cwd, std::env::current_dir()?);
        assert_eq!(me.args.len() + 1, std::env::args_os().count());
        Ok(())
    }

    #[test]
    fn only_local_brokers_are_killed() -> anyhow::Result<()> {
        assert_eq!(local_kafka_port("127.0.0.1:9092")?, 9092);
        assert_eq!(local_kafka_port("localhost:9093,other:1")?, 9093);
        assert!(local_kafka_port("kafka.example:9092").is_err());
        Ok(())
    }

    #[test]
    fn only_the_local_rabbitmq_is_killed() {
        assert!(local_amqp("amqp://guest:guest@127.0.0.1:5672/%2f").is_ok());
        assert!(local_amqp("amqp://localhost").is_ok());
        assert!(local_amqp("amqp://u:p@rabbit.example:5672/%2f").is_err());
        assert!(local_amqp("amqp://u:p@127.0.0.1:5673/%2f").is_err());
    }

    #[test]
    fn the_metadata_probe_is_a_v0_request_for_every_topic() {
        let r = metadata_request();
        assert_eq!(i32::from_be_bytes([r[0], r[1], r[2], r[3]]) as usize, r.len() - 4);
        assert_eq!(&r[4..8], &[0, 3, 0, 0]);
        assert_eq!(&r[r.len() - 4..], &(-1i32).to_be_bytes());
    }

    /// A restarted broker must not inherit the harness's descriptors (the
    /// e2e lock above all): a shell launched the same way lists its own.
    #[test]
    fn a_launched_broker_inherits_no_descriptor_past_stdio() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let held = std::fs::File::create(dir.path().join("held"))?;
        // Without close-on-exec, as flock(1) leaves its lock descriptor.
        let raw = std::os::fd::AsRawFd::as_raw_fd(&held);
        // SAFETY: fcntl on a descriptor this test owns.
        let dup = unsafe { libc::fcntl(raw, libc::F_DUPFD, 10) };
        anyhow::ensure!(dup >= 0, "cannot duplicate: {}", std::io::Error::last_os_error());
        let out = dir.path().join("fds");
        let launch = Launch {
            program: "/bin/sh".into(),
            arg0: "sh".into(),
            args: vec!["-c".into(), format!("ls /proc/self/fd > {}", out.display()).into()],
            cwd: dir.path().to_owned(),
            log: None,
            detaches: true,
        };
        launch.spawn()?;
        // SAFETY: closing the duplicate made above.
        unsafe { libc::close(dup) };
        let listed = std::fs::read_to_string(&out)?;
        let fds: Vec<u32> = listed.lines().filter_map(|l| l.trim().parse().ok()).collect();
        // 0..2 and the descriptor `ls` opens to read /proc/self/fd.
        assert!(fds.iter().filter(|fd| **fd > 2).count() <= 1, "{fds:?}");
        assert!(!fds.contains(&u32::try_from(dup)?), "{fds:?}");
        Ok(())
    }
}
