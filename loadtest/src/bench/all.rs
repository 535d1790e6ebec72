//! `bench all --json FILE`: every benchmark, one after the other, each run
//! as a child of this same executable (`bench NAME --json PART`) so it
//! prints exactly what it prints alone, and one report: the machine, the
//! commit, and each benchmark's own JSON under its name. A benchmark that
//! fails is reported as `{"error": ...}` and the others still run; the
//! exit is then non-zero. `scripts/bench-compare.sh OLD NEW` prints every
//! figure's change between two such reports.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Where the one report is written.
    #[arg(long)]
    json: PathBuf,
    /// Only these benchmarks (repeatable): coordinator, kafka, amqp,
    /// latency, function [default: all].
    #[arg(long = "only", value_parser = ["coordinator", "kafka", "amqp", "latency", "function"])]
    only: Vec<String>,
}

/// Each benchmark and the flags it runs with in the report: defaults,
/// except the coordinator's store (sled; PostgreSQL has its own row when
/// asked for on the command line).
const BENCHES: &[(&str, &[&str])] = &[
    ("coordinator", &["--store", "sled"]),
    ("kafka", &[]),
    ("amqp", &[]),
    ("latency", &[]),
    ("function", &[]),
];

pub async fn run(args: Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut benches = Map::new();
    let mut failed = Vec::new();
    for (name, flags) in BENCHES {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == name) {
            continue;
        }
        println!("== bench {name}");
        let part = dir.path().join(format!("{name}.json"));
        let status = tokio::process::Command::new(&exe)
            .arg("bench")
            .arg(name)
            .args(*flags)
            .arg("--json")
            .arg(&part)
            .stdin(Stdio::null())
            .status()
            .await
            .with_context(|| format!("cannot run bench {name}"))?;
        let figures = if status.success() {
            let text =
                std::fs::read_to_string(&part).with_context(|| format!("bench {name} wrote no JSON"))?;
            serde_json::from_str(&text)
                .with_context(|| format!("bench {name} wrote JSON that does not parse"))?
        } else {
            failed.push(*name);
            json!({ "error": format!("exited with {status}") })
        };
        benches.insert((*name).to_owned(), figures);
    }
    let report = json!({
        "machine": machine(),
        "commit": commit(),
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "benches": Value::Object(benches),
    });
    let text = serde_json::to_string_pretty(&report).context("cannot encode the report")?;
    std::fs::write(&args.json, text + "\n")
        .with_context(|| format!("cannot write {}", args.json.display()))?;
    println!("report written to {}", args.json.display());
    if !failed.is_empty() {
        bail!("these benchmarks failed: {}", failed.join(", "));
    }
    Ok(())
}

/// What the figures depend on: CPUs, their model, memory, the kernel.
fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "cpu_model": model,
        "memory_gib": (mem_kib as f64 / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        "kernel": kernel.trim(),
    })
}

/// The commit the binaries were built from, when run inside the checkout.
fn commit() -> Value {
    let out = std::process::Command::new("git").args(["rev-parse", "HEAD"]).output();
    match out {
        Ok(o) if o.status.success() => json!(String::from_utf8_lossy(&o.stdout).trim()),
        _ => Value::Null,
    }
}
