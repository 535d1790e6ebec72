//! Measurement helpers: latency histograms and the memory of a child
//! process.
//!
//! Latencies go into HDR histograms (microseconds, 3 significant digits) so
//! p99 and max stay exact over millions of calls; each task keeps its own and
//! they are merged at the end, keeping a shared lock off the hot path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::json;

/// Longest latency tracked exactly (60 s); longer calls count as 60 s.
const MAX_MICROS: u64 = 60_000_000;

/// A latency histogram in microseconds.
#[derive(Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Latency {
    pub fn new() -> anyhow::Result<Self> {
        let hist =
            Histogram::new_with_bounds(1, MAX_MICROS, 3).context("cannot create a latency histogram")?;
        Ok(Self { hist })
    }

    pub fn record(&mut self, elapsed: Duration) {
        // Saturating: a pathological 2-minute call must not abort the run.
        self.hist.saturating_record(u64::try_from(elapsed.as_micros()).unwrap_or(MAX_MICROS).max(1));
    }

    pub fn merge(&mut self, other: &Latency) -> anyhow::Result<()> {
        self.hist.add(&other.hist).context("cannot merge latency histograms")
    }

    /// The latency at quantile `q` (0..=1) in ms; 0 when nothing was
    /// recorded.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.hist.is_empty() { 0.0 } else { self.hist.value_at_quantile(q) as f64 / 1000.0 }
    }

    pub fn summary(&self) -> Summary {
        let ms = |micros: u64| micros as f64 / 1000.0;
        if self.hist.is_empty() {
            return Summary::default();
        }
        Summary {
            count: self.hist.len(),
            p50_ms: ms(self.hist.value_at_quantile(0.50)),
            p99_ms: ms(self.hist.value_at_quantile(0.99)),
            max_ms: ms(self.hist.max()),
            mean_ms: self.hist.mean() / 1000.0,
        }
    }
}

/// The figures printed and written for one latency histogram.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Summary {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "count": self.count,
            "p50_ms": round3(self.p50_ms),
            "p99_ms": round3(self.p99_ms),
            "max_ms": round3(self.max_ms),
            "mean_ms": round3(self.mean_ms),
        })
    }

    /// `p50 / p99 / max` for the human table.
    pub fn line(&self) -> String {
        format!("{:.2} / {:.2} / {:.2} ms", self.p50_ms, self.p99_ms, self.max_ms)
    }
}

/// Keeps JSON figures readable: microsecond precision is all a ms value has.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A `kB` field (`VmRSS`, `VmHWM`) of `/proc/PID/status`, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// CPU time (user + system) a process has used so far. `/proc` reports it
/// in USER_HZ ticks, which Linux fixes at 100/s for user space.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: count from its `)`.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Cores two processes used between two [`cpu_time`] readings: the
/// coordinator and this harness share the machine, so both matter.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    pub coordinator_cores: f64,
    pub harness_cores: f64,
}

/// Reads both processes' CPU time at the start of a measurement.
pub struct CpuMeter {
    pid: u32,
    started: std::time::Instant,
    coordinator: Duration,
    harness: Duration,
}

impl CpuMeter {
    pub fn start(coordinator_pid: u32) -> Self {
        Self {
            pid: coordinator_pid,
            started: std::time::Instant::now(),
            coordinator: cpu_time(coordinator_pid).unwrap_or_default(),
            harness: cpu_time(std::process::id()).unwrap_or_default(),
        }
    }

    pub fn stop(&self) -> CpuUse {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let used = |now: Option<Duration>, then: Duration| {
            now.map_or(0.0, |now| now.saturating_sub(then).as_secs_f64() / wall)
        };
        CpuUse {
            coordinator_cores: used(cpu_time(self.pid), self.coordinator),
            harness_cores: used(cpu_time(std::process::id()), self.harness),
        }
    }
}

impl CpuUse {
    pub fn json(&self) -> serde_json::Value {
        json!({ "coordinator_cores": round3(self.coordinator_cores), "harness_cores": round3(self.harness_cores) })
    }

    pub fn line(&self) -> String {
        format!("{:.2} / {:.2}", self.coordinator_cores, self.harness_cores)
    }
}

/// Cores one process uses over a measurement: its CPU time since
/// [`ProcCpu::start`] over the wall time since then. Reading several
/// processes side by side (worker, coordinator, broker, harness) shows which
/// one saturates the machine.
pub struct ProcCpu {
    pid: u32,
    started: std::time::Instant,
    cpu: Option<Duration>,
}

impl ProcCpu {
    pub fn start(pid: u32) -> Self {
        Self { pid, started: std::time::Instant::now(), cpu: cpu_time(pid) }
    }

    /// `None` when the process could not be read (gone, or never there).
    pub fn cores(&self) -> Option<f64> {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        Some(cpu_time(self.pid)?.saturating_sub(self.cpu?).as_secs_f64() / wall)
    }
}

/// Samples a process's resident set every 200 ms and keeps the peak. The
/// kernel's own peak (`VmHWM`) is read at the end too; sampling also shows
/// the figure is not a one-off spike and works where VmHWM is missing.
pub struct RssSampler {
    peak_kib: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let peak = peak_kib.clone();
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(200));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Some(kib) = proc_status_kib(pid, "VmRSS") {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
            }
        });
        Self { peak_kib, task }
    }

    pub fn peak_kib(&self) -> u64 {
        self.peak_kib.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// KiB to MiB for display.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reports_quantiles_in_ms() -> anyhow::Result<()> {
        let mut a = Latency::new()?;
        let mut b = Latency::new()?;
        for i in 1..=99 {
            a.record(Duration::from_millis(i));
        }
        b.record(Duration::from_secs(1000));
        a.merge(&b)?;
        let s = a.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50_ms - 50.0).abs() < 0.1, "{s:?}");
        assert!((s.max_ms - 60_000.0).abs() < 60.0, "saturated at 60 s: {s:?}");
        Ok(())
    }

    #[test]
    fn own_rss_and_cpu_are_readable() {
        let kib = proc_status_kib(std::process::id(), "VmRSS");
        assert!(kib.is_some_and(|k| k > 0), "{kib:?}");
        assert!(cpu_time(std::process::id()).is_some());
    }
}
