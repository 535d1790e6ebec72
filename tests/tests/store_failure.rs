//! Loud storage (DESIGN.md rule 7), end to end: when the coordinator's
//! store can no longer write, the real binary stops with a non-zero exit and
//! says why, instead of answering UNAVAILABLE forever. A supervisor then
//! restarts it on what the store made durable.
//!
//! The store lives on a small tmpfs that the test fills up, so the next
//! sled write or flush fails with "No space left on device". Mounting needs
//! root (CAP_SYS_ADMIN), as CI and the developers' machines run; elsewhere
//! the test fails saying so rather than passing without having checked.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use shardline_proto::LeaseId;
use shardline_proto::v1::{self, worker_api_client::WorkerApiClient};
use shardline_tests::{Proc, bin, unique};

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .context("run mount")?;
        ensure!(
            out.status.success(),
            "cannot mount a tmpfs ({}): this test needs root",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(Self { path, _dir: dir })
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) -> Result<u64> {
        let mut file = std::fs::File::create(self.path.join("filler"))?;
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e).context("fill the tmpfs"),
            }
        }
        // Whatever is left in a partial page goes too.
        while file.write(&[0u8]).is_ok_and(|n| n == 1) {
            written += 1;
        }
        Ok(written)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        match Command::new("umount").arg("-l").arg(&self.path).status() {
            Ok(s) if s.success() => {}
            other => eprintln!("cannot unmount {}: {other:?}", self.path.display()),
        }
    }
}

/// Starts the coordinator on `data`, with stderr captured; returns it, its
/// URL and a thread collecting its stderr.
fn start(config: &str, data: &Path, dir: &Path) -> Result<(Proc, String, std::thread::JoinHandle<String>)> {
    let path = dir.join(format!("{}.toml", unique("coordinator")));
    std::fs::write(&path, format!("listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{config}", data.display()))?;
    let mut child = Command::new(bin("shardline-coordinator"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn the coordinator (built? cargo build --workspace --bins)")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let proc = Proc { child, name: "coordinator".into() };
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        // Read to the end (the process exits); a read error keeps what
        // came, and says so in the text the test shows.
        if let Err(e) = stderr.read_to_string(&mut text) {
            text.push_str(&format!("\n(reading stderr failed: {e})"));
        }
        text
    });
    let mut lines = std::io::BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().context("the coordinator exited before listening")??;
        if let Some(addr) = line.strip_prefix("listening ") {
            break addr.trim().to_owned();
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok((proc, format!("http://{addr}"), errors))
}

#[tokio::test]
async fn a_full_disk_stops_the_coordinator_with_a_nonzero_exit_and_the_store_error() -> Result<()> {
    let fs = Tmpfs::mount("8m")?;
    let dir = tempfile::tempdir()?;
    let data = fs.path.join("data");
    // No join window: the registration's own reply grants the leases.
    let config = "[balancer]\njoin_window = \"0s\"\n\n[[streams]]\nname = \"full\"\nhandler = \"noop\"\npartitions = 16\n";
    let (mut proc, url, errors) = start(config, &data, dir.path())?;

    let mut api = WorkerApiClient::connect(url).await.context("connect")?;
    let request =
        v1::RegisterRequest { worker_id: "w".into(), handlers: vec!["noop".into()], ..Default::default() };
    let reply = api.register(request).await?.into_inner();
    let leases: Vec<(LeaseId, u64)> = reply
        .instructions
        .iter()
        .filter_map(|i| match &i.kind {
            Some(v1::instruction::Kind::Acquire(a)) => {
                LeaseId::try_from(a.lease.as_ref()).ok().map(|l| (l, a.epoch))
            }
            _ => None,
        })
        .collect();
    ensure!(leases.len() == 16, "16 leases granted: {reply:?}");

    let filled = fs.fill()?;
    println!("filled the tmpfs with {filled} bytes");
    // Checkpoint until the coordinator stops answering OK; it must then exit.
    let started = Instant::now();
    let mut acknowledged = 0u64;
    let mut offset = 0i64;
    let mut last_error = String::new();
    while started.elapsed() < Duration::from_secs(60) {
        offset += 1;
        let entries = leases
            .iter()
            .map(|(l, epoch)| v1::CheckpointEntry {
                lease: Some(l.into()),
                epoch: *epoch,
                offset,
                window: None,
            })
            .collect();
        match api.checkpoint(v1::CheckpointRequest { worker_id: "w".into(), entries }).await {
            Ok(r) if r.get_ref().results.iter().all(|r| r.status == v1::CheckpointStatus::Ok as i32) => {
                acknowledged += 1;
            }
            Ok(r) => bail!("a checkpoint was refused instead: {r:?}"),
            Err(status) => {
                last_error = status.to_string();
                break;
            }
        }
    }
    let failed_after = started.elapsed();
    println!(
        "{acknowledged} checkpoint calls acknowledged on a full disk (sled's buffers), then after {failed_after:?}: {last_error}"
    );
    ensure!(!last_error.is_empty(), "the coordinator kept acknowledging for 60 s on a full disk");
    let exited = proc.wait_exit(Duration::from_secs(10));
    if exited.is_err() {
        // Its stderr only ends when it does.
        proc.kill9()?;
    }
    let stderr = errors.join().unwrap_or_default();
    let Ok(status) = exited else {
        bail!("the coordinator did not exit on its own within 10 s; its stderr:\n{stderr}");
    };
    let tail: String = stderr.lines().rev().take(5).collect::<Vec<_>>().join("\n");
    println!("exit {status}; stderr ends:\n{tail}");
    ensure!(!status.success(), "exit status must be non-zero: {status}");
    ensure!(
        stderr.contains("error: the lease store failed") && stderr.contains("No space left on device"),
        "stderr names the store error: {tail}"
    );
    Ok(())
}
