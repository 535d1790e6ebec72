//! What a finished run prints and writes: the human table, the one-line
//! summary, the `--json` document, and the thresholds verdict.
//!
//! Everything is derived from one [`Outcome`] so the three forms cannot
//! disagree. A run with two targets (a Kafka stream and a RabbitMQ topic)
//! is judged on their combined analysis (sums, and the worst latency and
//! stall), and each target's own figures are shown alongside.

use serde_json::json;

use super::autoscale::{self, Summary};
use super::ledger::{Analysis, Recovery};
use super::scenario::{Kind, ProfileKind, Scenario};
use crate::stats::round3;

/// One target's own analysis.
pub struct Part {
    /// `Kafka` or `Rabbitmq`.
    pub kind: Kind,
    pub analysis: Analysis,
}

/// A finished run: the analysis plus what the harness saw around it.
pub struct Outcome<'a> {
    pub scenario: &'a Scenario,
    pub run: &'a str,
    /// The whole run's: the one target's, or every target's combined.
    pub analysis: &'a Analysis,
    /// Each target's own (one for a single-target run: `analysis` then).
    pub parts: &'a [Part],
    pub lease_moves: u64,
    /// Children that exited on their own.
    pub crashes: &'a [String],
    /// Harness-side trouble worth a line (producer error, cleanup).
    pub warnings: &'a [String],
    /// Whether every acknowledged record was processed before the drain
    /// timeout.
    pub drained: bool,
    /// Seconds from the end of producing to the end of the drain.
    pub drain_s: f64,
    /// What `[autoscale]` did, when the scenario has it.
    pub autoscale: Option<&'a Summary>,
}

impl Outcome<'_> {
    fn destinations(&self) -> usize {
        self.analysis.destinations.len()
    }

    /// Whether the run had more than one target (and so per-target lines).
    fn several(&self) -> bool {
        self.parts.len() > 1
    }

    /// RabbitMQ subscriptions of the run, if it had any.
    fn subscriptions(&self) -> Option<usize> {
        match self.scenario.target.kind {
            Kind::Kafka => None,
            Kind::Rabbitmq => Some(self.destinations()),
            Kind::Both => {
                self.parts.iter().find(|p| p.kind == Kind::Rabbitmq).map(|p| p.analysis.destinations.len())
            }
        }
    }

    /// A spike's start, in seconds since producing started.
    fn spike_at_s(&self) -> Option<f64> {
        let rate = &self.scenario.rate;
        (rate.profile == ProfileKind::Spike).then(|| rate.at.unwrap_or_default().as_secs_f64())
    }

    /// Spike profiles: seconds from the spike's start until lag was back
    /// within one second of records (`None` inside: never).
    fn absorbed(&self) -> Option<Option<f64>> {
        self.spike_at_s().map(|at| autoscale::absorbed_s(&self.analysis.timeline, at))
    }

    /// The thresholds the run broke, each as a sentence naming it.
    pub fn breaches(&self) -> Vec<String> {
        let a = self.analysis;
        let t = &self.scenario.thresholds;
        let mut out = Vec::new();
        if let Some(max) = t.max_absorbed_s {
            match (self.absorbed(), self.spike_at_s()) {
                (Some(Some(s)), _) if s > max => {
                    out.push(format!("absorbed {s:.1} s after the spike's start > max_absorbed_s {max}"))
                }
                (Some(None), Some(at)) => out.push(format!(
                    "lag never came back within one second of records after the spike at {at:.0} s (max_absorbed_s {max})"
                )),
                _ => {}
            }
        }
        if let Some(scaled) = self.autoscale {
            out.extend(scaled.errors());
            if let Some(max) = t.max_final_workers
                && scaled.final_workers > max
            {
                out.push(format!("{} workers at the end > max_final_workers {max}", scaled.final_workers));
            }
        }
        if a.produced == 0 {
            out.push("nothing was produced: the broker acknowledged no record".to_owned());
        }
        if a.lost > t.max_lost {
            let per_target = if self.several() {
                let each: Vec<String> =
                    self.parts.iter().map(|p| format!("{} {}", p.kind.as_str(), p.analysis.lost)).collect();
                format!(" ({})", each.join(", "))
            } else {
                String::new()
            };
            out.push(format!("lost {}{per_target} > max_lost {}", a.lost, t.max_lost));
        }
        if let Some(max) = t.max_lease_moves
            && self.lease_moves > max
        {
            out.push(format!("{} lease moves > max_lease_moves {max}", self.lease_moves));
        }
        if let Some(max) = t.max_p99_ms
            && a.latency.p99_ms > max
        {
            out.push(format!("p99 {:.0} ms > max_p99_ms {max}", a.latency.p99_ms));
        }
        if let Some(max) = t.max_duplicates
            && a.duplicates > max
        {
            out.push(format!("duplicates {} > max_duplicates {max}", a.duplicates));
        }
        if let (Some(max), Some(found)) = (t.max_order_violations, a.order_violations)
            && found > max
        {
            out.push(format!("order violations {found} > max_order_violations {max}"));
        }
        if let Some(min) = t.min_throughput_per_s
            && a.throughput_per_s < min
        {
            out.push(format!("throughput {:.0}/s < min_throughput_per_s {min}", a.throughput_per_s));
        }
        if let Some(max) = self.scenario.max_zombie_invocations()
            && a.zombie_invocations > max
        {
            out.push(format!(
                "zombie invocations {} > max_zombie_invocations {max} (handlers run by a worker after its session ended)",
                a.zombie_invocations
            ));
        }
        for r in &a.recoveries {
            if let Some(e) = &r.error {
                out.push(format!("fault `{}` failed: {e}", r.label));
                continue;
            }
            if let (Some(max), Some(stall)) = (t.max_stall_s, r.max_stall_s)
                && stall > max
            {
                out.push(format!(
                    "after `{}` ended, {} went {stall:.2} s without a receipt > max_stall_s {max}",
                    r.label,
                    r.stalled.as_deref().unwrap_or("a lease")
                ));
            }
            // A partition whose checkpoint never moves again after a fault
            // (until the next one) is stuck, whatever its receipts say.
            if let Some(max) = t.max_checkpoint_stall_s
                && let Some(stall) = r.checkpoint_stall_s
                && stall > max
            {
                out.push(format!(
                    "after `{}` ended, the checkpoint of {} stood still {stall:.2} s > max_checkpoint_stall_s {max}",
                    r.label,
                    r.checkpoint_stalled.as_deref().unwrap_or("a partition")
                ));
            }
            if let Some(f) = &r.failover {
                // Validated when the scenario was read.
                let session_ms = self
                    .scenario
                    .session_timeout()
                    .map_or(u64::MAX, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                let max_takeover = t.max_takeover_ms.unwrap_or(session_ms);
                if f.takeover_ms > max_takeover {
                    out.push(format!(
                        "`{}`: a standby led {} ms after the kill > max_takeover_ms {max_takeover}",
                        r.label, f.takeover_ms
                    ));
                }
                match (f.recovery_ms, t.max_recovery_s) {
                    (None, _) => out.push(format!(
                        "`{}`: the checkpoints of some partitions never moved again under the new leader",
                        r.label
                    )),
                    (Some(ms), Some(max)) if ms as f64 / 1000.0 > max => out.push(format!(
                        "`{}`: checkpoints moved again {ms} ms after the kill > max_recovery_s {max}",
                        r.label
                    )),
                    _ => {}
                }
            }
            let Some(max) = t.max_recovery_s else { continue };
            if r.affected == 0 {
                continue;
            }
            match r.recovery_s {
                Some(s) if s > max => {
                    out.push(format!("`{}` recovered in {s:.1} s > max_recovery_s {max}", r.label));
                }
                Some(_) => {}
                None => out.push(format!("`{}` never recovered ({})", r.label, r.unrecovered.join(", "))),
            }
        }
        for crash in self.crashes {
            out.push(format!("a process exited on its own: {}", first_line(crash)));
        }
        out
    }

    /// `name: produced N, processed N, lost 0, dup D, p99 X ms, throughput T/s, recoveries [..]`.
    pub fn summary_line(&self) -> String {
        let a = self.analysis;
        let counts = if self.several() {
            let each: Vec<String> =
                self.parts.iter().map(|p| format!("{} {}", p.kind.as_str(), counts(&p.analysis))).collect();
            each.join("; ")
        } else {
            counts(a)
        };
        let recoveries: Vec<String> =
            a.recoveries.iter().map(|r| format!("{} {}", short_label(r), recovery_text(r))).collect();
        let zombies = if a.recoveries.iter().any(|r| r.zombie_invocations.is_some()) {
            format!(", zombies {}", a.zombie_invocations)
        } else {
            String::new()
        };
        format!(
            "{}: {counts}{zombies}, p99 {:.0} ms, throughput {:.0}/s, recoveries [{}]",
            self.scenario.name,
            a.latency.p99_ms,
            a.throughput_per_s,
            recoveries.join(", ")
        )
    }

    /// The human report: counts, latency, faults, then verdict.
    pub fn table(&self) -> String {
        let a = self.analysis;
        let s = self.scenario;
        let mut rows: Vec<(String, String)> = vec![
            ("scenario".into(), format!("{} ({}, run {})", s.name, s.target.kind.as_str(), self.run)),
            ("produced (acknowledged)".into(), a.produced.to_string()),
        ];
        if a.unacknowledged > 0 {
            rows.push(("sent, not acknowledged".into(), a.unacknowledged.to_string()));
        }
        if self.destinations() > 1 {
            rows.push(("expected (x destinations)".into(), a.expected.to_string()));
        }
        rows.push(("processed (unique)".into(), a.processed.to_string()));
        rows.push(("lost".into(), a.lost.to_string()));
        rows.push(("duplicates".into(), a.duplicates.to_string()));
        if a.unconfirmed_processed > 0 {
            rows.push(("unconfirmed but processed".into(), a.unconfirmed_processed.to_string()));
        }
        if a.foreign > 0 {
            rows.push(("foreign receipts (ignored)".into(), a.foreign.to_string()));
        }
        rows.push((
            "per-key order violations".into(),
            a.order_violations.map_or("not checked (queues keep no order)".into(), |n| n.to_string()),
        ));
        if self.destinations() > 1 {
            for d in &a.destinations {
                rows.push((
                    format!("  {}", d.name),
                    format!("processed {}, lost {}, dup {}", d.processed, d.lost, d.duplicates),
                ));
            }
        }
        for d in &a.destinations {
            if !d.lost_sample.is_empty() {
                rows.push((format!("lost ids ({})", d.name), format!("{:?}", d.lost_sample)));
            }
        }
        let l = &a.latency;
        rows.push((
            "latency p50 / p95 / p99 / max".into(),
            format!("{:.0} / {:.0} / {:.0} / {:.0} ms", l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms),
        ));
        let k = &a.ack_latency;
        rows.push((
            "  of which broker ack p50 / p99".into(),
            format!("{:.0} / {:.0} ms (send to acknowledgement)", k.p50_ms, k.p99_ms),
        ));
        rows.push(("throughput".into(), format!("{:.0} records/s", a.throughput_per_s)));
        rows.push((
            "drain".into(),
            format!("{:.1} s{}", self.drain_s, if self.drained { "" } else { " (timed out)" }),
        ));
        rows.push(("lease moves".into(), self.lease_moves.to_string()));
        if let (Some(absorbed), Some(at)) = (self.absorbed(), self.spike_at_s()) {
            rows.push((
                "absorbed (lag <= 1 s of records)".into(),
                absorbed.map_or(format!("never, after the spike at {at:.0} s"), |s| {
                    format!("{s:.1} s after the spike at {at:.0} s")
                }),
            ));
        }
        if let Some(scaled) = self.autoscale {
            rows.extend(scaled.rows());
        }
        let workers: Vec<String> = a.per_worker.iter().map(|(w, n)| format!("{w} {n}")).collect();
        rows.push(("receipts per worker".into(), workers.join(", ")));
        if self.several() {
            for p in self.parts {
                let pa = &p.analysis;
                let mut text = format!("{}, p99 {:.0} ms", counts(pa), pa.latency.p99_ms);
                if pa.recoveries.iter().any(|r| r.zombie_invocations.is_some()) {
                    text.push_str(&format!(", zombies {}", pa.zombie_invocations));
                }
                if let Some(r) = longest_stall(pa)
                    && let Some(stall) = r.max_stall_s
                {
                    text.push_str(&format!(
                        ", longest stall {stall:.2} s ({}, after {})",
                        r.stalled.as_deref().unwrap_or("-"),
                        r.label
                    ));
                }
                rows.push((format!("target {}", p.kind.as_str()), text));
            }
        }
        for (i, r) in a.recoveries.iter().enumerate() {
            let text = match (&r.error, self.several()) {
                (Some(e), _) => format!("FAILED: {e}"),
                (None, false) => fault_text(r),
                (None, true) => {
                    let each: Vec<String> = self
                        .parts
                        .iter()
                        .filter_map(|p| {
                            Some(format!("{} {}", p.kind.as_str(), fault_text(p.analysis.recoveries.get(i)?)))
                        })
                        .collect();
                    each.join("; ")
                }
            };
            rows.push((format!("fault {} @{:.1}s", r.label, r.at_s), text));
        }
        if let Some(r) = longest_stall(a)
            && let Some(stall) = r.max_stall_s
        {
            rows.push((
                "longest stall after a fault".into(),
                format!("{stall:.2} s ({}, after {})", r.stalled.as_deref().unwrap_or("-"), r.label),
            ));
        }
        for l in &a.lease_stalls {
            let checkpoint = l
                .checkpoint
                .as_ref()
                .map(|(s, after)| format!("; checkpoint still {s:.2} s (after {after})"))
                .unwrap_or_default();
            rows.push((
                format!("stall {}", l.lease),
                format!("no receipt {:.2} s (after {}){checkpoint}", l.max_stall_s, l.after),
            ));
        }
        if a.recoveries.iter().any(|r| r.zombie_invocations.is_some()) {
            rows.push(("zombie invocations".into(), a.zombie_invocations.to_string()));
            if a.unstamped > 0 {
                rows.push(("receipts without invoked_at_ms".into(), a.unstamped.to_string()));
            }
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            out.push_str(&format!("  {k:<width$}  {v}\n"));
        }
        for w in self.warnings {
            out.push_str(&format!("  warning: {w}\n"));
        }
        for c in self.crashes {
            out.push_str(&format!("  crashed: {c}\n"));
        }
        let breaches = self.breaches();
        if breaches.is_empty() {
            out.push_str("  verdict: PASS\n");
        } else {
            for b in &breaches {
                out.push_str(&format!("  threshold broken: {b}\n"));
            }
            out.push_str("  verdict: FAIL\n");
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let breaches = self.breaches();
        let mut out = json!({
            "name": self.scenario.name,
            "target": self.scenario.target.kind.as_str(),
            "run": self.run,
            "passed": breaches.is_empty(),
            "breaches": breaches,
            "subscriptions": self.subscriptions(),
            "drained": self.drained,
            "drain_s": round3(self.drain_s),
            "lease_moves": self.lease_moves,
            "crashes": self.crashes,
            "warnings": self.warnings,
            "absorbed_s": self.absorbed().flatten().map(round3),
            "autoscale": self.autoscale.map(Summary::json),
        });
        let mut figures = figures_json(self.analysis);
        if self.several() {
            let targets: Vec<serde_json::Value> = self
                .parts
                .iter()
                .map(|p| {
                    let mut one = figures_json(&p.analysis);
                    // The run's timeline is the sum; per target it would
                    // double the file for little.
                    if let Some(map) = one.as_object_mut() {
                        map.remove("timeline");
                        map.insert("target".into(), p.kind.as_str().into());
                    }
                    one
                })
                .collect();
            if let Some(map) = figures.as_object_mut() {
                map.insert("targets".into(), targets.into());
            }
        }
        if let (Some(out), Some(figures)) = (out.as_object_mut(), figures.as_object_mut()) {
            out.append(figures);
        }
        out
    }
}

/// What an analysis says, as the JSON report's fields: the whole run's at
/// the top level, each target's under `targets`.
fn figures_json(a: &Analysis) -> serde_json::Value {
    let l = &a.latency;
    json!({
        "produced": a.produced,
        "unacknowledged": a.unacknowledged,
        "expected": a.expected,
        "processed": a.processed,
        "duplicates": a.duplicates,
        "lost": a.lost,
        "unconfirmed_processed": a.unconfirmed_processed,
        "foreign_receipts": a.foreign,
        "order_violations": a.order_violations,
        "latency_ms": {
            "samples": l.count,
            "p50": round3(l.p50_ms),
            "p95": round3(l.p95_ms),
            "p99": round3(l.p99_ms),
            "max": round3(l.max_ms),
        },
        "ack_latency_ms": {
            "p50": round3(a.ack_latency.p50_ms),
            "p99": round3(a.ack_latency.p99_ms),
            "max": round3(a.ack_latency.max_ms),
        },
        "throughput_per_s": round3(a.throughput_per_s),
        "zombie_invocations": a.zombie_invocations,
        "unstamped_receipts": a.unstamped,
        "max_stall_s": longest_stall(a).and_then(|r| r.max_stall_s.map(round3)),
        "stalled": longest_stall(a).and_then(|r| r.stalled.clone()),
        "stalled_after": longest_stall(a).filter(|r| r.max_stall_s.is_some()).map(|r| r.label.clone()),
        "max_checkpoint_stall_s": longest_checkpoint_stall(a).and_then(|r| r.checkpoint_stall_s.map(round3)),
        "checkpoint_stalled": longest_checkpoint_stall(a).and_then(|r| r.checkpoint_stalled.clone()),
        "checkpoint_stalled_after": longest_checkpoint_stall(a).map(|r| r.label.clone()),
        "lease_stalls": a.lease_stalls.iter().map(|l| json!({
            "lease": l.lease,
            "max_stall_s": round3(l.max_stall_s),
            "after": l.after,
            "checkpoint_stall_s": l.checkpoint.as_ref().map(|(s, _)| round3(*s)),
            "checkpoint_after": l.checkpoint.as_ref().map(|(_, after)| after),
        })).collect::<Vec<_>>(),
        "recoveries": a.recoveries.iter().map(|r| json!({
            "fault": r.label,
            "at_s": round3(r.at_s),
            "ended_s": round3(r.ended_s),
            "recovery_s": r.recovery_s.map(round3),
            "affected": r.affected,
            "unrecovered": r.unrecovered,
            "max_stall_s": r.max_stall_s.map(round3),
            "stalled": r.stalled,
            "zombie_invocations": r.zombie_invocations,
            "checkpoint_stall_s": r.checkpoint_stall_s.map(round3),
            "checkpoint_stalled": r.checkpoint_stalled,
            "takeover_ms": r.failover.map(|f| f.takeover_ms),
            "recovery_ms": r.failover.and_then(|f| f.recovery_ms),
            "error": r.error,
        })).collect::<Vec<_>>(),
        "per_subscription": a.destinations.iter().map(|d| json!({
            "name": d.name,
            "processed": d.processed,
            "duplicates": d.duplicates,
            "lost": d.lost,
            "lost_sample": d.lost_sample,
        })).collect::<Vec<_>>(),
        "per_worker": a.per_worker.iter().map(|(w, n)| json!({ "worker": w, "receipts": n })).collect::<Vec<_>>(),
        "timeline": a.timeline.iter().map(|r| json!({
            "t": r.t,
            "produced": r.produced,
            "processed": r.processed,
            "lag": r.lag,
            "max_latency_ms": r.max_latency_ms,
        })).collect::<Vec<_>>(),
    })
}

/// The fault after which some partition's checkpoint stood still longest.
fn longest_checkpoint_stall(a: &Analysis) -> Option<&Recovery> {
    a.recoveries.iter().filter(|r| r.checkpoint_stall_s.is_some()).max_by(|x, y| {
        x.checkpoint_stall_s.partial_cmp(&y.checkpoint_stall_s).unwrap_or(std::cmp::Ordering::Equal)
    })
}

/// The fault after which some lease stalled longest.
fn longest_stall(a: &Analysis) -> Option<&Recovery> {
    a.recoveries
        .iter()
        .filter(|r| r.max_stall_s.is_some())
        .max_by(|x, y| x.max_stall_s.partial_cmp(&y.max_stall_s).unwrap_or(std::cmp::Ordering::Equal))
}

/// `produced N (xS subscriptions), processed N, lost N, dup N`.
fn counts(a: &Analysis) -> String {
    let fanout = match a.destinations.len() {
        0 | 1 => String::new(),
        n => format!(" (x{n} subscriptions)"),
    };
    format!(
        "produced {}{fanout}, processed {}, lost {}, dup {}",
        a.produced, a.processed, a.lost, a.duplicates
    )
}

/// One fault's row: recovery, what it hit, the stall after it, zombies.
fn fault_text(r: &Recovery) -> String {
    let mut text = format!("recovery {}", recovery_text(r));
    if r.affected > 0 {
        text.push_str(&format!(" ({} affected)", r.affected));
    }
    if let Some(stall) = r.max_stall_s {
        text.push_str(&format!(", then longest stall {stall:.2}s ({})", r.stalled.as_deref().unwrap_or("-")));
    }
    if let Some(stall) = r.checkpoint_stall_s {
        text.push_str(&format!(
            ", checkpoint still {stall:.2}s ({})",
            r.checkpoint_stalled.as_deref().unwrap_or("-")
        ));
    }
    if let Some(z) = r.zombie_invocations {
        text.push_str(&format!(", zombie invocations {z}"));
    }
    if let Some(f) = &r.failover {
        let recovered = f.recovery_ms.map_or("never".to_owned(), |ms| format!("{ms} ms"));
        text.push_str(&format!(", takeover {} ms, checkpoints again after {recovered}", f.takeover_ms));
    }
    text
}

/// `kill9@10s` for the summary line.
fn short_label(r: &Recovery) -> String {
    let action = r.label.split_whitespace().next().unwrap_or(&r.label);
    format!("{action}@{:.0}s", r.at_s)
}

/// `4.21s`, `-` (nothing affected) or `never`.
fn recovery_text(r: &Recovery) -> String {
    match (r.affected, r.recovery_s, &r.error) {
        (_, _, Some(_)) => "failed".into(),
        (0, _, _) => "-".into(),
        (_, Some(s), _) => format!("{s:.2}s"),
        (_, None, _) => format!("never ({})", r.unrecovered.join(", ")),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::ledger::{DestinationFigures, LatencyFigures};

    fn analysis() -> Analysis {
        Analysis {
            produced: 100,
            unacknowledged: 0,
            expected: 100,
            destinations: vec![DestinationFigures {
                name: "t".into(),
                processed: 99,
                duplicates: 3,
                lost: 1,
                lost_sample: vec![7],
            }],
            processed: 99,
            duplicates: 3,
            lost: 1,
            unconfirmed_processed: 0,
            foreign: 0,
            order_violations: Some(0),
            latency: LatencyFigures { count: 99, p50_ms: 10.0, p95_ms: 20.0, p99_ms: 300.0, max_ms: 900.0 },
            ack_latency: LatencyFigures::default(),
            throughput_per_s: 50.0,
            timeline: Vec::new(),
            recoveries: vec![
                Recovery {
                    label: "kill9 w0".into(),
                    at_s: 10.0,
                    recovery_s: Some(4.25),
                    affected: 3,
                    unrecovered: vec![],
                    error: None,
                    ended_s: 10.0,
                    max_stall_s: Some(4.3),
                    stalled: Some("t/1".into()),
                    zombie_invocations: None,
                    checkpoint_stall_s: None,
                    checkpoint_stalled: None,
                    failover: None,
                },
                Recovery {
                    label: "start_worker w3".into(),
                    at_s: 20.0,
                    recovery_s: None,
                    affected: 0,
                    unrecovered: vec![],
                    error: None,
                    ended_s: 20.0,
                    max_stall_s: None,
                    stalled: None,
                    zombie_invocations: None,
                    checkpoint_stall_s: None,
                    checkpoint_stalled: None,
                    failover: None,
                },
            ],
            zombie_invocations: 0,
            unstamped: 0,
            per_worker: vec![("w0".into(), 102)],
            lease_stalls: Vec::new(),
        }
    }

    fn scenario(extra: &str) -> Result<Scenario, crate::run::scenario::BadScenario> {
        Scenario::parse(&format!(
            "name = \"x\"\nduration = \"20s\"\nworkers = 1\n[target]\nkind = \"kafka\"\npartitions = 2\n\
             [rate]\nprofile = \"constant\"\nper_second = 10\n{extra}"
        ))
    }

    /// A finished, drained run of `s` with no crash or warning.
    fn outcome<'a>(s: &'a Scenario, a: &'a Analysis) -> Outcome<'a> {
        Outcome {
            scenario: s,
            run: "r",
            analysis: a,
            parts: &[],
            lease_moves: 0,
            crashes: &[],
            warnings: &[],
            drained: true,
            drain_s: 0.5,
            autoscale: None,
        }
    }

    #[test]
    fn summary_and_breaches_name_what_failed() -> Result<(), crate::run::scenario::BadScenario> {
        let a = analysis();
        let s = scenario("[thresholds]\nmax_p99_ms = 200\nmax_recovery_s = 4\n")?;
        let o = Outcome { lease_moves: 2, drain_s: 1.0, ..outcome(&s, &a) };
        assert_eq!(
            o.summary_line(),
            "x: produced 100, processed 99, lost 1, dup 3, p99 300 ms, throughput 50/s, recoveries [kill9@10s 4.25s, start_worker@20s -]"
        );
        let b = o.breaches();
        assert_eq!(b.len(), 3, "{b:?}");
        assert!(b[0].contains("lost 1 > max_lost 0"));
        assert!(b[1].contains("max_p99_ms"));
        assert!(b[2].contains("recovered in 4.2 s > max_recovery_s 4"), "{b:?}");
        assert!(o.table().contains("verdict: FAIL"));
        let j = o.json();
        assert_eq!(j["lost"], 1);
        assert_eq!(j["latency_ms"]["p99"], 300.0);
        assert_eq!(j["recoveries"][0]["recovery_s"], 4.25);
        assert_eq!(j["recoveries"][1]["recovery_s"], serde_json::Value::Null);
        assert_eq!(j["passed"], false);
        Ok(())
    }

    #[test]
    fn failovers_and_lease_moves_are_judged() -> Result<(), crate::run::scenario::BadScenario> {
        use crate::run::ledger::Failover;
        let mut a = analysis();
        a.lost = 0;
        let kill9 = a.recoveries[0].clone();
        let failover = |takeover_ms, recovery_ms| Recovery {
            label: "kill_leader coordinator 0".into(),
            failover: Some(Failover { takeover_ms, recovery_ms }),
            ..kill9.clone()
        };
        a.recoveries = vec![failover(900, Some(2500))];
        let s = scenario(
            "[coordinators]\ncount = 2\nstore = \"postgres\"\n[coordinator]\nsession_timeout = \"3s\"\n\
             [thresholds]\nmax_lease_moves = 0\nmax_recovery_s = 5\n",
        )?;
        assert!(outcome(&s, &a).breaches().is_empty(), "{:?}", outcome(&s, &a).breaches());
        let j = outcome(&s, &a).json();
        assert_eq!(
            (j["recoveries"][0]["takeover_ms"].clone(), j["recoveries"][0]["recovery_ms"].clone()),
            (900.into(), 2500.into())
        );
        assert!(outcome(&s, &a).table().contains("takeover 900 ms, checkpoints again after 2500 ms"));

        let moved = Outcome { lease_moves: 1, ..outcome(&s, &a) }.breaches();
        assert_eq!(moved, vec!["1 lease moves > max_lease_moves 0".to_owned()]);
        // Slower than the session (the default max_takeover_ms), never
        // recovered, recovered too late.
        for (takeover, recovery, needle) in [
            (3001, Some(3500), "max_takeover_ms 3000"),
            (900, None, "never moved again"),
            (900, Some(5001), "max_recovery_s 5"),
        ] {
            a.recoveries = vec![failover(takeover, recovery)];
            let b = outcome(&s, &a).breaches();
            assert!(b.len() == 1 && b[0].contains(needle), "{needle}: {b:?}");
        }
        Ok(())
    }

    #[test]
    fn autoscaling_and_the_spike_s_absorption_are_reported_and_judged() -> anyhow::Result<()> {
        use crate::run::autoscale::{Event, Log};
        use crate::run::ledger::Row;
        let mut a = analysis();
        a.lost = 0;
        // Lag above a second of records from second 10 to 15 of the spike.
        a.timeline = (0..30)
            .map(|t| Row {
                t,
                produced: if (10..20).contains(&t) { 500 } else { 50 },
                processed: 0,
                lag: if (10..16).contains(&t) { 2000 } else { 10 },
                max_latency_ms: 0,
            })
            .collect();
        let s = Scenario::parse(
            "name = \"x\"\nduration = \"30s\"\nworkers = 1\n[target]\nkind = \"kafka\"\npartitions = 12\n\
             [rate]\nprofile = \"spike\"\nper_second = 50\nfactor = 10\nat = \"10s\"\nfor = \"10s\"\n\
             [autoscale]\nmin_workers = 1\nmax_workers = 12\n\
             [thresholds]\nmax_absorbed_s = 5\nmax_final_workers = 2\n",
        )?;
        let spec = s.autoscale.clone().ok_or_else(|| anyhow::anyhow!("no [autoscale]"))?;
        let log = Log {
            events: vec![Event { at_s: 12.0, from: 1, to: 9, desired: 9, error: None }],
            readings: vec![(12.0, 9, 1)],
            ..Log::default()
        };
        let summary = Summary::new(spec, 1, 3, log);
        let o = Outcome { autoscale: Some(&summary), ..outcome(&s, &a) };
        assert_eq!(
            o.breaches(),
            vec![
                "absorbed 7.0 s after the spike's start > max_absorbed_s 5".to_owned(),
                "3 workers at the end > max_final_workers 2".to_owned()
            ]
        );
        let table = o.table();
        assert!(table.contains("7.0 s after the spike at 10 s"), "{table}");
        assert!(table.contains("1 -> 9 workers (desired 9)"), "{table}");
        let j = o.json();
        assert_eq!(j["absorbed_s"], 7.0);
        assert_eq!(
            (j["autoscale"]["peak_workers"].as_u64(), j["autoscale"]["final_workers"].as_u64()),
            (Some(9), Some(3))
        );
        // Never absorbed is a breach of its own; a constant profile has no figure.
        a.timeline.iter_mut().filter(|r| r.t >= 10).for_each(|r| r.lag = 9000);
        let o = Outcome { autoscale: Some(&summary), ..outcome(&s, &a) };
        assert!(
            o.breaches()[0].contains("never came back within one second of records"),
            "{:?}",
            o.breaches()
        );
        assert_eq!(o.json()["absorbed_s"], serde_json::Value::Null);
        let flat = scenario("")?;
        assert!(!outcome(&flat, &a).table().contains("absorbed"));
        Ok(())
    }

    #[test]
    fn a_clean_run_passes() -> Result<(), crate::run::scenario::BadScenario> {
        let mut a = analysis();
        a.lost = 0;
        let s = scenario("")?;
        let o = outcome(&s, &a);
        assert!(o.breaches().is_empty());
        assert!(o.table().contains("verdict: PASS"));
        let crashed = ["worker w1: exited (signal 6)\nlog...".to_owned()];
        let o = Outcome { crashes: &crashed, ..o };
        assert_eq!(
            o.breaches(),
            vec!["a process exited on its own: worker w1: exited (signal 6)".to_owned()]
        );
        Ok(())
    }

    #[test]
    fn zombies_and_stalls_are_reported_and_held_to_their_thresholds()
    -> Result<(), crate::run::scenario::BadScenario> {
        let mut a = analysis();
        a.lost = 0;
        a.recoveries[0] = Recovery {
            label: "cut_worker w0 for 20s".into(),
            zombie_invocations: Some(7),
            ..a.recoveries[0].clone()
        };
        a.zombie_invocations = 7;
        let cut = "[[faults]]\nat = \"5s\"\naction = \"cut_worker\"\nworker = 0\nfor = \"10s\"\n";
        let s = scenario(&format!("{cut}[thresholds]\nmax_stall_s = 1\n"))?;
        let o = outcome(&s, &a);
        let b = o.breaches();
        assert_eq!(b.len(), 2, "{b:?}");
        assert!(b[0].contains("zombie invocations 7 > max_zombie_invocations 0"), "{b:?}");
        assert!(b[1].contains("t/1 went 4.30 s without a receipt > max_stall_s 1"), "{b:?}");
        assert!(o.summary_line().contains("dup 3, zombies 7,"), "{}", o.summary_line());
        assert!(o.table().contains("zombie invocations 7"), "{}", o.table());
        let j = o.json();
        assert_eq!(j["zombie_invocations"], 7);
        assert_eq!(j["recoveries"][0]["zombie_invocations"], 7);
        assert_eq!(j["recoveries"][0]["max_stall_s"], 4.3);
        assert_eq!((j["max_stall_s"].as_f64(), j["stalled"].as_str()), (Some(4.3), Some("t/1")));
        assert!(o.table().contains("4.30 s (t/1, after cut_worker w0 for 20s)"), "{}", o.table());
        assert_eq!(j["recoveries"][1]["zombie_invocations"], serde_json::Value::Null);
        // Without a cut and without an explicit limit, zombies are not held.
        let s = scenario("")?;
        assert!(Outcome { scenario: &s, ..o }.breaches().is_empty());
        Ok(())
    }
}
