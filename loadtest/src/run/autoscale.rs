//! `[autoscale]`: the harness plays KEDA. It reads the coordinator's
//! `shardline_desired_workers` from `/metrics` every `interval` and
//! follows it with real workers: up at once, down only once every reading
//! for `scale_down_after` asked for fewer (the HPA's scale-down
//! stabilisation, so a dip between two readings does not stop a worker
//! that is needed again a second later), always within
//! `min_workers..=max_workers`. Workers leave as a Deployment's pods do:
//! SIGTERM, and they drain.
//!
//! The decision is [`Scaler`], pure (times are passed in); [`follow`] is
//! the loop around it; [`absorbed_s`] reads how fast a spike was absorbed
//! off the run's timeline. The report gets every scaling event and the
//! peak and final worker counts.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::ProgressBar;
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fleet::Fleet;
use super::ledger::Row;
use super::scenario::Autoscale;
use crate::stats::round3;

/// The series the harness follows.
const DESIRED: &str = "shardline_desired_workers";
/// How long a scaled-in worker gets to drain and exit before it is killed.
const DRAIN_WITHIN: Duration = Duration::from_secs(30);
/// How many seconds lag must stay within a second of records to count as
/// absorbed: one calm second between two bad ones is not recovery.
const CALM_FOR: usize = 3;

/// The scaling decision, with KEDA's and the HPA's rules.
#[derive(Debug, Clone)]
pub struct Scaler {
    min: usize,
    max: usize,
    down_after: Duration,
    /// Since when every reading has asked for fewer workers than run, and
    /// the most any of those readings asked for.
    lower: Option<(Duration, usize)>,
}

impl Scaler {
    pub fn new(spec: &Autoscale) -> Self {
        Self { min: spec.min_workers, max: spec.max_workers, down_after: spec.scale_down_after, lower: None }
    }

    /// One reading of `desired` at `at` with `live` workers running:
    /// the worker count to go to now, if any. Up: at once to the figure
    /// (or back to `min_workers` after a crash). Down: once the figure has
    /// been lower for `scale_down_after`, to the highest it asked for in
    /// that time.
    pub fn decide(&mut self, at: Duration, desired: u32, live: usize) -> Option<usize> {
        let want = usize::try_from(desired).unwrap_or(usize::MAX).clamp(self.min, self.max);
        if want >= live {
            self.lower = None;
            return (want > live).then_some(want);
        }
        let (since, most) = self.lower.get_or_insert((at, want));
        *most = (*most).max(want);
        if at.saturating_sub(*since) < self.down_after {
            return None;
        }
        let to = *most;
        self.lower = None;
        Some(to)
    }
}

/// One scaling action.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Seconds since producing started.
    pub at_s: f64,
    pub from: usize,
    pub to: usize,
    /// The figure read that triggered it.
    pub desired: u32,
    /// What went wrong starting or stopping a worker, if anything.
    pub error: Option<String>,
}

/// What the harness did and saw, filled as the run goes.
#[derive(Debug, Clone, Default)]
pub struct Log {
    pub events: Vec<Event>,
    /// Every reading: (seconds since the start, desired, workers running).
    pub readings: Vec<(f64, u32, usize)>,
    /// Readings that failed (the coordinator did not answer, or had not
    /// published the figure yet), with the last error.
    pub unread: u64,
    pub last_error: Option<String>,
}

/// What the report shows of a run's autoscaling.
#[derive(Debug, Clone)]
pub struct Summary {
    pub spec: Autoscale,
    pub start_workers: usize,
    pub peak_workers: usize,
    pub final_workers: usize,
    pub log: Log,
}

impl Summary {
    pub fn new(spec: Autoscale, start_workers: usize, final_workers: usize, log: Log) -> Self {
        let peak_workers = log
            .events
            .iter()
            .map(|e| e.to.max(e.from))
            .chain(log.readings.iter().map(|r| r.2))
            .chain([start_workers, final_workers])
            .max()
            .unwrap_or(start_workers);
        Self { spec, start_workers, peak_workers, final_workers, log }
    }

    /// Every failed scaling action, as a sentence.
    pub fn errors(&self) -> Vec<String> {
        self.log
            .events
            .iter()
            .filter_map(|e| {
                let error = e.error.as_ref()?;
                Some(format!("autoscale {} -> {} at {:.1} s failed: {error}", e.from, e.to, e.at_s))
            })
            .collect()
    }

    /// Table rows: the counts, then one per event.
    pub fn rows(&self) -> Vec<(String, String)> {
        let mut rows = vec![(
            "autoscale (workers)".to_owned(),
            format!(
                "{} at the start, peak {}, {} at the end ({} scaling events, {} readings{})",
                self.start_workers,
                self.peak_workers,
                self.final_workers,
                self.log.events.len(),
                self.log.readings.len(),
                if self.log.unread > 0 { format!(", {} unread", self.log.unread) } else { String::new() }
            ),
        )];
        for e in &self.log.events {
            let error = e.error.as_ref().map(|e| format!(", FAILED: {e}")).unwrap_or_default();
            rows.push((
                format!("  scale @{:.1}s", e.at_s),
                format!("{} -> {} workers (desired {}){error}", e.from, e.to, e.desired),
            ));
        }
        rows
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "min_workers": self.spec.min_workers,
            "max_workers": self.spec.max_workers,
            "interval_s": round3(self.spec.interval.as_secs_f64()),
            "scale_down_after_s": round3(self.spec.scale_down_after.as_secs_f64()),
            "start_workers": self.start_workers,
            "peak_workers": self.peak_workers,
            "final_workers": self.final_workers,
            "unread": self.log.unread,
            "last_error": self.log.last_error,
            "events": self.log.events.iter().map(|e| json!({
                "at_s": round3(e.at_s),
                "from": e.from,
                "to": e.to,
                "desired": e.desired,
                "error": e.error,
            })).collect::<Vec<_>>(),
            "readings": self.log.readings.iter().map(|(at, desired, live)| json!({
                "at_s": round3(*at),
                "desired": desired,
                "workers": live,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Seconds from the spike's start (`at_s`) until lag is back within one
/// second of records: the end of the first second at or after the start
/// from which lag stays at most that second's produced records for
/// [`CALM_FOR`] seconds (or to the end of the timeline, if shorter).
/// `None` if it never was.
pub fn absorbed_s(timeline: &[Row], at_s: f64) -> Option<f64> {
    let after: Vec<&Row> = timeline.iter().filter(|r| r.t as f64 >= at_s.floor()).collect();
    let calm = |r: &Row| r.lag <= r.produced;
    (0..after.len())
        .find(|&i| after[i..].iter().take(CALM_FOR).all(|r| calm(r)))
        .map(|i| (after[i].t as f64 + 1.0 - at_s).max(0.0))
}

/// What [`follow`] needs.
pub struct Follow {
    pub spec: Autoscale,
    pub fleet: Arc<tokio::sync::Mutex<Fleet>>,
    /// Second 0 of the run.
    pub started: Instant,
    pub log: Arc<Mutex<Log>>,
    pub pb: ProgressBar,
    pub stop: CancellationToken,
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads the figure and scales, every `interval`, until `stop`. A step
/// that has begun (workers starting or draining) finishes before the
/// loop looks at `stop` again, so every event is in the log.
pub async fn follow(cx: Follow) {
    let mut scaler = Scaler::new(&cx.spec);
    let mut every = tokio::time::interval(cx.spec.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = cx.stop.cancelled() => return,
        }
        let addrs = cx.fleet.lock().await.coordinator_metrics();
        let desired = match read_desired(&addrs).await {
            Ok(d) => d,
            Err(e) => {
                let mut log = lock(&cx.log);
                log.unread += 1;
                log.last_error = Some(format!("{e:#}"));
                continue;
            }
        };
        let at = cx.started.elapsed();
        let mut fleet = cx.fleet.lock().await;
        let live = fleet.live_workers();
        lock(&cx.log).readings.push((at.as_secs_f64(), desired, live.len()));
        let Some(to) = scaler.decide(at, desired, live.len()) else { continue };
        let from = live.len();
        let mut error = None;
        if to > from {
            for _ in from..to {
                if let Err(e) = fleet.start_worker().await {
                    error = Some(format!("{e:#}"));
                    break;
                }
            }
        } else {
            // The newest first, as a Deployment removes its youngest pods.
            let newest: Vec<usize> = live.iter().rev().take(from - to).copied().collect();
            let failed: Vec<String> = fleet
                .stop_workers(&newest, DRAIN_WITHIN)
                .await
                .into_iter()
                .filter_map(|(id, r)| r.err().map(|e| format!("{id}: {e:#}")))
                .collect();
            if !failed.is_empty() {
                error = Some(failed.join("; "));
            }
        }
        drop(fleet);
        let at_s = at.as_secs_f64();
        let failed = error.as_ref().map(|e| format!(" FAILED: {e}")).unwrap_or_default();
        super::say(
            &cx.pb,
            &format!("[{at_s:>5.1}s] autoscale: {from} -> {to} workers (desired {desired}){failed}"),
        );
        lock(&cx.log).events.push(Event { at_s, from, to, desired, error });
    }
}

/// The figure from the coordinator that leads (the only one with one
/// coordinator; with several, the one whose `/readyz` answers 200).
async fn read_desired(addrs: &[std::net::SocketAddr]) -> anyhow::Result<u32> {
    for addr in addrs {
        let addr = addr.to_string();
        if addrs.len() > 1 && shardline_testkit::metrics::http_get(&addr, "/readyz").await.is_err() {
            continue;
        }
        let value = shardline_testkit::metrics::scrape(&addr).await?.get(DESIRED)?;
        anyhow::ensure!(value.is_finite() && value >= 0.0, "{DESIRED} is {value}, not a worker count");
        return Ok(value.min(f64::from(u32::MAX)) as u32);
    }
    anyhow::bail!("no coordinator of the run leads (every /readyz polled)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(min: usize, max: usize, down_after_s: u64) -> Autoscale {
        Autoscale {
            min_workers: min,
            max_workers: max,
            interval: Duration::from_secs(2),
            scale_down_after: Duration::from_secs(down_after_s),
        }
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn up_at_once_within_the_limits() {
        let mut sc = Scaler::new(&spec(1, 12, 10));
        assert_eq!(sc.decide(s(0), 1, 1), None, "as many as asked");
        assert_eq!(sc.decide(s(2), 9, 1), Some(9), "one step to the figure");
        assert_eq!(sc.decide(s(4), 40, 9), Some(12), "never above max_workers");
        assert_eq!(sc.decide(s(6), 0, 0), Some(1), "a fleet below min_workers (crashes) is refilled");
    }

    #[test]
    fn down_only_after_the_figure_asked_for_fewer_for_the_whole_window() {
        let mut sc = Scaler::new(&spec(1, 12, 10));
        assert_eq!(sc.decide(s(20), 3, 9), None, "the first lower reading starts the window");
        assert_eq!(sc.decide(s(24), 5, 9), None);
        assert_eq!(sc.decide(s(28), 2, 9), None);
        assert_eq!(sc.decide(s(30), 2, 9), Some(5), "to the most asked for within the window");
        // A reading at or above the count resets the window.
        assert_eq!(sc.decide(s(32), 1, 5), None);
        assert_eq!(sc.decide(s(40), 5, 5), None);
        assert_eq!(sc.decide(s(42), 1, 5), None);
        assert_eq!(sc.decide(s(50), 1, 5), None, "8 s of the new window only");
        assert_eq!(sc.decide(s(52), 0, 5), Some(1), "never below min_workers");
    }

    #[test]
    fn no_stabilisation_scales_down_at_the_first_lower_reading() {
        let mut sc = Scaler::new(&spec(0, 4, 0));
        assert_eq!(sc.decide(s(1), 1, 4), Some(1));
    }

    fn row(t: u64, produced: u64, lag: u64) -> Row {
        Row { t, produced, processed: 0, lag, max_latency_ms: 0 }
    }

    #[test]
    fn absorbed_is_when_lag_stays_within_a_second_of_records() {
        // 50/s, then 500/s from second 10 to 20; lag peaks and falls back
        // within a second of records at second 16 and stays there.
        let mut timeline: Vec<Row> = (0..10).map(|t| row(t, 50, 20)).collect();
        let lags = [400, 1200, 1800, 2000, 1500, 900, 450, 300, 490, 200, 30, 20, 20];
        for (i, lag) in lags.iter().enumerate() {
            let t = 10 + i as u64;
            timeline.push(row(t, if t < 20 { 500 } else { 50 }, *lag));
        }
        assert_eq!(absorbed_s(&timeline, 10.0), Some(7.0), "second 16 ends 7 s after the start");
        // A single calm second between bad ones is no recovery.
        timeline[14].lag = 100;
        assert_eq!(absorbed_s(&timeline, 10.0), Some(7.0));
        // Never back: None.
        let never: Vec<Row> = (10..30).map(|t| row(t, 500, 5000)).collect();
        assert_eq!(absorbed_s(&never, 10.0), None);
        // Keeping up throughout: the spike's first second.
        let easy: Vec<Row> = (0..30).map(|t| row(t, 500, 100)).collect();
        assert_eq!(absorbed_s(&easy, 10.0), Some(1.0));
    }

    #[test]
    fn the_summary_finds_the_peak_and_names_failed_steps() {
        let log = Log {
            events: vec![
                Event { at_s: 12.0, from: 1, to: 9, desired: 9, error: None },
                Event { at_s: 40.0, from: 9, to: 2, desired: 2, error: Some("w8: killed".into()) },
            ],
            readings: vec![(12.0, 9, 1), (40.0, 2, 9)],
            unread: 1,
            last_error: Some("timeout".into()),
        };
        let summary = Summary::new(spec(1, 12, 10), 1, 2, log);
        assert_eq!((summary.peak_workers, summary.final_workers), (9, 2));
        assert_eq!(summary.errors(), vec!["autoscale 9 -> 2 at 40.0 s failed: w8: killed".to_owned()]);
        let rows = summary.rows();
        assert!(
            rows[0]
                .1
                .contains("1 at the start, peak 9, 2 at the end (2 scaling events, 2 readings, 1 unread)")
        );
        assert_eq!(rows[1], ("  scale @12.0s".to_owned(), "1 -> 9 workers (desired 9)".to_owned()));
        let j = summary.json();
        assert_eq!((j["peak_workers"].as_u64(), j["final_workers"].as_u64()), (Some(9), Some(2)));
        assert_eq!(j["events"][0]["to"], 9);
        assert_eq!(j["readings"][1]["workers"], 9);
    }
}
