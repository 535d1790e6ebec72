//! Running one scenario once per placement strategy (`strategies =
//! ["count", "load"]`) and comparing how each handles its spike: the time
//! from the spike's start until lag is back at its pre-spike level, the
//! same counted from the spike's *end* (a spike's own length is no
//! strategy's merit: counted from its start, no drain can be shorter than
//! the spike, which caps `speedup`), the peak lag, p99 latency and lease
//! moves. `speedup` is the first strategy's drain time over the last
//! one's; the p99 and peak-lag ratios compare the same two.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;

use super::ledger::Row;
use super::scenario::Scenario;
use super::{Args, RunResult, run_one};

/// How one strategy handled the spike.
#[derive(Debug, Clone, PartialEq)]
pub struct Spike {
    /// Seconds from the spike's start until lag was back at baseline (and
    /// stayed there 3 s); the whole rest of the run if it never was.
    pub drain_s: f64,
    /// The same from the spike's end: 0 if lag was back before it ended.
    pub after_end_s: f64,
    pub peak_lag: u64,
    /// The lag counted as "back to normal": 1.5 × the highest lag of the
    /// 5 s before the spike, plus 50 records of noise.
    pub baseline: u64,
}

/// Reads the spike's effect off a run's per-second timeline.
pub fn spike(timeline: &[Row], at_s: u64, for_s: u64) -> Spike {
    let before = timeline.iter().filter(|r| r.t + 5 >= at_s && r.t < at_s).map(|r| r.lag).max().unwrap_or(0);
    let baseline = before + before / 2 + 50;
    let after: Vec<&Row> = timeline.iter().filter(|r| r.t >= at_s).collect();
    let peak_lag = after.iter().map(|r| r.lag).max().unwrap_or(0);
    // Back to normal: the first second from which lag stays at baseline
    // for three seconds, once the spike has pushed it above (or never did).
    let mut drain_s = after.last().map_or(0, |r| r.t.saturating_sub(at_s)) as f64;
    if peak_lag <= baseline {
        drain_s = 0.0;
    } else if let Some(start) = after.iter().position(|r| r.lag > baseline) {
        for (i, r) in after.iter().enumerate().skip(start) {
            let calm = after[i..].iter().take(3).all(|x| x.lag <= baseline);
            if calm && after.len() >= i + 3 {
                drain_s = r.t.saturating_sub(at_s) as f64;
                break;
            }
        }
    }
    let after_end_s = (drain_s - for_s as f64).max(0.0);
    Spike { drain_s, after_end_s, peak_lag, baseline }
}

fn suffixed(path: &Path, tag: &str) -> PathBuf {
    let stem = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    let ext = path.extension().map_or_else(String::new, |e| format!(".{}", e.to_string_lossy()));
    path.with_file_name(format!("{stem}.{tag}{ext}"))
}

pub async fn run(args: &Args, scenario: Scenario) -> anyhow::Result<ExitCode> {
    let at_s = scenario.rate.at.map_or(0, |d| d.as_secs());
    let for_s = scenario.rate.for_.map_or(0, |d| d.as_secs());
    let mut runs = Vec::new();
    let mut failed = false;
    for strategy in scenario.strategies.clone() {
        println!("== {}: placement `{strategy}`", scenario.name);
        let mut one = scenario.clone();
        one.strategy = Some(strategy.clone());
        let json = args.json.as_deref().map(|p| suffixed(p, &strategy));
        let chart = args.chart.as_deref().map(|p| suffixed(p, &strategy));
        let result = run_one(args, one, json, chart).await?;
        failed |= result.exit != ExitCode::SUCCESS;
        let s = spike(&result.timeline, at_s, for_s);
        runs.push((strategy, s, result));
    }
    println!();
    println!(
        "{:<10} {:>14} {:>16} {:>10} {:>10} {:>8} {:>6}",
        "PLACEMENT", "SPIKE DRAIN", "AFTER SPIKE END", "PEAK LAG", "P99 MS", "MOVES", "LOST"
    );
    for (strategy, s, r) in &runs {
        println!(
            "{strategy:<10} {:>13.0}s {:>15.0}s {:>10} {:>10.0} {:>8} {:>6}",
            s.drain_s, s.after_end_s, s.peak_lag, r.p99_ms, r.lease_moves, r.lost
        );
    }
    // First over last, each at least a second (or a record, or a ms), so a
    // strategy that never fell behind gives a finite ratio.
    let ratio = |of: &dyn Fn(&Spike, &RunResult) -> f64| match (runs.first(), runs.last()) {
        (Some(first), Some(last)) if runs.len() > 1 => of(&first.1, &first.2) / of(&last.1, &last.2).max(1.0),
        _ => 1.0,
    };
    let speedup = ratio(&|s, _| s.drain_s);
    let after_end = ratio(&|s, _| s.after_end_s);
    let p99 = ratio(&|_, r| r.p99_ms);
    let peak = ratio(&|s, _| s.peak_lag as f64);
    let names: Vec<&str> = runs.iter().map(|(s, ..)| s.as_str()).collect();
    let (first, last) = (names.first().unwrap_or(&"-"), names.last().unwrap_or(&"-"));
    println!(
        "{first} / {last}: speedup (drain from the spike's start) {speedup:.2}, drain after the spike's end {after_end:.2}, p99 {p99:.2}, peak lag {peak:.2}"
    );
    let lost: u64 = runs.iter().map(|(_, _, r)| r.lost).sum();
    let report = json!({
        "scenario": scenario.name,
        "speedup": speedup,
        "after_end_ratio": after_end,
        "p99_ratio": p99,
        "peak_lag_ratio": peak,
        "lost": lost,
        "runs": runs.iter().map(|(strategy, s, r)| json!({
            "strategy": strategy,
            "spike_drain_s": s.drain_s,
            "drain_after_spike_end_s": s.after_end_s,
            "peak_lag": s.peak_lag,
            "baseline_lag": s.baseline,
            "p99_ms": r.p99_ms,
            "lease_moves": r.lease_moves,
            "lost": r.lost,
            "report": r.json,
        })).collect::<Vec<_>>(),
    });
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).context("cannot encode the JSON report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(min) = scenario.thresholds.min_speedup
        && speedup < min
    {
        eprintln!("{}: FAILED: speedup {speedup:.2} < min_speedup {min}", scenario.name);
        failed = true;
    }
    Ok(if failed || lost > scenario.thresholds.max_lost { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeline(lags: &[u64]) -> Vec<Row> {
        lags.iter()
            .enumerate()
            .map(|(t, lag)| Row { t: t as u64, produced: 0, processed: 0, lag: *lag, max_latency_ms: 0 })
            .collect()
    }

    #[test]
    fn drain_time_runs_from_the_spike_until_lag_is_back_and_stays() {
        // Spike at 5 s: lag climbs, falls, blips, then stays low from t=12.
        let t = timeline(&[10, 12, 9, 11, 10, 40, 300, 600, 500, 40, 300, 90, 20, 15, 12, 10]);
        let s = spike(&t, 5, 5);
        assert_eq!(s.baseline, 12 + 6 + 50);
        assert_eq!(s.peak_lag, 600);
        assert_eq!(s.drain_s, 7.0, "t=12 is the first second that stays calm");
        assert_eq!(s.after_end_s, 2.0, "the spike ended at t=10");
        assert_eq!(spike(&t, 5, 9).after_end_s, 0.0, "back before a 9 s spike ended");
        // A spike that never lifts lag over the baseline drains in 0 s.
        assert_eq!(spike(&timeline(&[10, 10, 10, 10, 10, 20, 30, 10, 10, 10]), 5, 3).drain_s, 0.0);
    }
}
