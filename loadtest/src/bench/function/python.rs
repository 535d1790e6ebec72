//! The Python side of `bench function`: the interpreter with the Lambda
//! runtime client (where `scripts/functions.sh install` puts it), the no-op
//! function written out for the worker, and the CPU its processes spent on
//! invocations.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::stats;

/// `loadtest/functions/noop.py`, carried in the binary so the benchmark
/// runs from anywhere, not only from a checkout.
const NOOP: &str = include_str!("../../../functions/noop.py");
/// The handler the runtime client loads from the function's directory.
pub const HANDLER: &str = "noop.handler";
/// Where the function writes each process's CPU time at its first
/// invocation (read by [`Cpu::read`]).
pub const CPU_DIR_VAR: &str = "SHARDLINE_BENCH_CPU_DIR";
const INSTALL: &str = "run scripts/functions.sh install";

/// The venv's interpreter under `SHARDLINE_FUNCTIONS_DIR` (default
/// `~/.cache/shardline/functions`), as `scripts/functions.sh` lays it out.
pub fn default_python() -> PathBuf {
    let dir = std::env::var_os("SHARDLINE_FUNCTIONS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from);
        home.join(".cache/shardline/functions")
    });
    dir.join("venv/bin/python")
}

/// Fails at once, before the broker is loaded, when `python` is missing or
/// cannot import the runtime client.
pub fn check(python: &Path) -> anyhow::Result<()> {
    if !python.is_file() {
        bail!("no Python interpreter at {} (--python): {INSTALL}", python.display());
    }
    let out = std::process::Command::new(python)
        .args(["-c", "import awslambdaric"])
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{} cannot import awslambdaric ({}): {INSTALL}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("no output")
        );
    }
    Ok(())
}

/// The function's directory (its `working_dir`, so the runtime client
/// finds `noop.py`) and, in it, the directory its processes report their
/// CPU time in. Removed when dropped.
pub struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    pub fn write() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("shardline-bench-function-")
            .tempdir()
            .context("cannot create a directory for the function")?;
        std::fs::write(dir.path().join("noop.py"), NOOP).context("cannot write noop.py")?;
        std::fs::create_dir(dir.path().join("cpu")).context("cannot create the CPU report directory")?;
        Ok(Self { dir })
    }

    pub fn task_root(&self) -> &Path {
        self.dir.path()
    }

    pub fn cpu_dir(&self) -> PathBuf {
        self.dir.path().join("cpu")
    }
}

/// The CPU the function's processes spent on invocations: from each one's
/// first invocation (its start-up, interpreter and runtime client import
/// excluded) to the end of the run. It covers everything Python does per
/// invocation: the runtime client's `/next` and `/response` requests, its
/// JSON decoding of the event and encoding of the reply, and the function.
#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    pub processes: usize,
    /// Invocations counted: all but each process's first, which the
    /// starting point falls inside.
    pub invocations: u64,
    pub seconds: f64,
}

impl Cpu {
    /// Reads every process's report in `dir` and its CPU time now (the
    /// processes must still run). `None`, with the reason, when the
    /// figure would not be honest: a process was replaced (its CPU is
    /// gone with it) or did not report.
    pub fn read(dir: &Path, starts: u64, invocations: u64) -> anyhow::Result<Result<Self, String>> {
        let mut processes = 0;
        let mut seconds = 0.0;
        for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let path = entry.context("cannot list the CPU reports")?.path();
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let pid: u32 = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("{} is not named by a pid", path.display()))?;
            let first: f64 = text
                .trim()
                .parse()
                .with_context(|| format!("{} holds `{text}`, not seconds", path.display()))?;
            let Some(now) = cpu_seconds(pid) else {
                return Ok(Err(format!("function process {pid} is gone")));
            };
            seconds += (now - first).max(0.0);
            processes += 1;
        }
        if processes == 0 || starts != processes as u64 {
            return Ok(Err(format!("{starts} function processes started, {processes} reported")));
        }
        let counted = invocations.saturating_sub(processes as u64);
        if counted == 0 {
            return Ok(Err("no invocation after each process's first".into()));
        }
        Ok(Ok(Self { processes, invocations: counted, seconds }))
    }

    pub fn us_per_invocation(&self) -> f64 {
        self.seconds * 1e6 / self.invocations as f64
    }
}

/// A process's CPU time so far in seconds, to the nanosecond: the sum of
/// its threads' run time in `/proc/PID/task/*/schedstat`, the same clock
/// Python's `time.process_time()` reads (the starting point). `/proc/PID/
/// stat` counts in 10 ms ticks, too coarse for a few hundred invocations;
/// it is the fallback on kernels without schedstat.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns = 0u64;
    for task in tasks {
        let path = task.ok()?.path().join("schedstat");
        let Some(run) =
            std::fs::read_to_string(path).ok().and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
        else {
            return stats::cpu_time(pid).map(|d| d.as_secs_f64());
        };
        ns += run;
    }
    Some(ns as f64 / 1e9)
}
