//! Printing: aligned tables for people (kubectl style: upper-case headers,
//! `-` for unknown), `--json` for scripts (one JSON document on stdout).
//! The checkpoint export file is `shardline::export`'s.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use shardline_proto::LeaseId;
use shardline_proto::v1;

use crate::{Failure, Result};

fn print_json(v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Failure::Runtime(e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// Prints rows under headers, each column as wide as its widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

fn id(lease: Option<&v1::LeaseId>) -> String {
    LeaseId::try_from(lease).map_or("?".to_owned(), |i| i.to_string())
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.to_owned() }
}

fn ago(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..120_000 => format!("{}s", ms / 1000),
        120_000..7_200_000 => format!("{}m", ms / 60_000),
        _ => format!("{}h", ms / 3_600_000),
    }
}

pub fn state(s: i32) -> &'static str {
    match v1::LeaseState::try_from(s) {
        Ok(v1::LeaseState::Owned) => "owned",
        Ok(v1::LeaseState::Releasing) => "releasing",
        Ok(v1::LeaseState::Unassigned) => "unassigned",
        Ok(v1::LeaseState::Parked) => "parked",
        _ => "unknown",
    }
}

fn worker_state(w: &v1::WorkerInfo) -> String {
    if w.restored {
        "restored".into()
    } else if w.draining {
        "draining".into()
    } else if !w.unhealthy.is_empty() {
        format!("unhealthy: {}", w.unhealthy.join("; "))
    } else {
        "healthy".into()
    }
}

pub fn workers(reply: &v1::ListWorkersReply, json: bool) -> Result<()> {
    let workers = &reply.workers;
    if json {
        let rows: Vec<Value> = workers
            .iter()
            .map(|w| {
                let load = w.load.clone().unwrap_or_default();
                json!({
                    "worker_id": w.worker_id, "address": w.address, "handlers": w.handlers,
                    "leases": w.leases, "last_heartbeat_ms_ago": w.last_heartbeat_ms_ago,
                    "cpu": load.cpu, "inflight_batches": load.inflight_batches,
                    "records_per_s": load.leases.iter().map(|l| l.records_out_per_s).sum::<f64>(),
                    "state": worker_state(w), "unhealthy": w.unhealthy,
                    "utilisation": w.utilisation, "concurrency": w.concurrency,
                })
            })
            .collect();
        return print_json(&json!({
            "workers": rows, "desired_workers": reply.desired_workers, "strategy": reply.strategy,
        }));
    }
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let load = w.load.clone().unwrap_or_default();
            let rate: f64 = load.leases.iter().map(|l| l.records_out_per_s).sum();
            vec![
                w.worker_id.clone(),
                dash(&w.address),
                w.leases.to_string(),
                if w.restored { "-".into() } else { ago(w.last_heartbeat_ms_ago) },
                format!("{:.2}", load.cpu),
                format!("{rate:.0}"),
                format!("{:.0}%", w.utilisation * 100.0),
                w.handlers.join(","),
                worker_state(w),
            ]
        })
        .collect();
    table(&["WORKER", "ADDRESS", "LEASES", "LAST BEAT", "CPU", "REC/S", "UTIL", "HANDLERS", "STATE"], &rows);
    println!("desired workers: {} (placement: {})", reply.desired_workers, dash(&reply.strategy));
    Ok(())
}

fn lease_json(l: &v1::LeaseInfo) -> Value {
    json!({
        "lease": id(l.lease.as_ref()), "owner": (!l.owner.is_empty()).then_some(&l.owner), "epoch": l.epoch,
        "state": state(l.state), "checkpoint": l.checkpoint, "since_ms_ago": l.since_ms_ago,
        "handoff_to": (!l.handoff_to.is_empty()).then_some(&l.handoff_to), "handler": l.handler,
    })
}

pub fn leases(leases: &[v1::LeaseInfo], json: bool) -> Result<()> {
    if json {
        return print_json(&Value::Array(leases.iter().map(lease_json).collect()));
    }
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|l| {
            let state = match (state(l.state), l.handoff_to.as_str()) {
                ("releasing", to) if !to.is_empty() => format!("releasing -> {to}"),
                (s, _) => s.to_owned(),
            };
            vec![
                id(l.lease.as_ref()),
                dash(&l.owner),
                l.epoch.to_string(),
                state,
                l.checkpoint.map_or("-".into(), |c| c.to_string()),
                ago(l.since_ms_ago),
            ]
        })
        .collect();
    table(&["LEASE", "OWNER", "EPOCH", "STATE", "CHECKPOINT", "SINCE"], &rows);
    Ok(())
}

/// A tumbling window as the checkpoints table shows it: its bounds (UTC)
/// and its state's size, or that it closed.
fn window(w: &v1::WindowSummary) -> String {
    let at = |ms: i64| {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
        humantime::format_rfc3339_seconds(t).to_string()
    };
    if w.closed {
        format!("closed {}..{}", at(w.start_ms), at(w.end_ms))
    } else {
        format!("{}..{} state {} B", at(w.start_ms), at(w.end_ms), w.state_bytes)
    }
}

pub fn checkpoints(shards: &[v1::ShardCheckpoint], subs: &[v1::SubscriptionInfo], json: bool) -> Result<()> {
    let known = |v: i64| if v < 0 { "-".to_owned() } else { v.to_string() };
    // Totals per stream: lag summed over the shards whose offsets are known.
    let mut totals: BTreeMap<String, (i64, usize, usize)> = BTreeMap::new();
    for s in shards {
        let name = s.lease.as_ref().and_then(|l| l.lease.as_ref()).map_or(String::new(), |l| l.name.clone());
        let t = totals.entry(name).or_default();
        t.1 += 1;
        if s.lag >= 0 {
            t.0 += s.lag;
            t.2 += 1;
        }
    }
    if json {
        let rows: Vec<Value> = shards
            .iter()
            .map(|s| {
                let l = s.lease.clone().unwrap_or_default();
                json!({
                    "lease": id(l.lease.as_ref()), "owner": (!l.owner.is_empty()).then_some(&l.owner),
                    "epoch": l.epoch, "state": state(l.state), "checkpoint": l.checkpoint,
                    "earliest": (s.earliest >= 0).then_some(s.earliest), "latest": (s.latest >= 0).then_some(s.latest),
                    "lag": (s.lag >= 0).then_some(s.lag),
                    "offsets_error": (!s.watermark_error.is_empty()).then_some(&s.watermark_error),
                    "window": s.window.as_ref().map(|w| json!({
                        "start_ms": w.start_ms, "end_ms": w.end_ms, "state_bytes": w.state_bytes, "closed": w.closed,
                    })),
                })
            })
            .collect();
        let streams: Vec<Value> = totals
            .iter()
            .map(|(name, (lag, n, known))| json!({"stream": name, "shards": n, "lag": (*known == *n).then_some(*lag)}))
            .collect();
        let subscriptions: Vec<Value> = subs.iter().map(subscription_json).collect();
        return print_json(&json!({"shards": rows, "streams": streams, "subscriptions": subscriptions}));
    }
    let rows: Vec<Vec<String>> = shards
        .iter()
        .map(|s| {
            let l = s.lease.clone().unwrap_or_default();
            vec![
                id(l.lease.as_ref()),
                l.checkpoint.map_or("-".into(), |c| c.to_string()),
                known(s.earliest),
                known(s.latest),
                known(s.lag),
                dash(&l.owner),
                l.epoch.to_string(),
                s.window.as_ref().map_or("-".into(), window),
            ]
        })
        .collect();
    table(&["SHARD", "CHECKPOINT", "EARLIEST", "LATEST", "LAG", "OWNER", "EPOCH", "WINDOW"], &rows);
    for (name, (lag, n, k)) in &totals {
        let lag = if k == n { lag.to_string() } else { format!("{lag}+ ({} shards without offsets)", n - k) };
        println!("{name}: {n} shards, lag {lag}");
    }
    let errors: BTreeSet<&str> =
        shards.iter().map(|s| s.watermark_error.as_str()).filter(|e| !e.is_empty()).collect();
    for e in errors {
        eprintln!("warning: offsets unknown: {e}");
    }
    if !subs.is_empty() {
        println!();
        subscriptions(subs, false)?;
    }
    Ok(())
}

fn subscription_json(s: &v1::SubscriptionInfo) -> Value {
    json!({
        "subscription": s.name, "topic": s.topic, "handler": s.handler, "queue_type": s.queue_type,
        "slots": s.slots, "min_slots": s.min_slots, "max_concurrency": s.max_concurrency,
        "depth": s.depth, "consumers": s.consumers, "unacked": s.unacked, "retrying": s.retrying,
        "dead_lettered": s.dead_lettered, "drain_rate": s.drain_rate,
        "read_ms_ago": s.read_ms_ago, "error": (!s.error.is_empty()).then_some(&s.error),
    })
}

pub fn subscriptions(subs: &[v1::SubscriptionInfo], json: bool) -> Result<()> {
    if json {
        return print_json(&Value::Array(subs.iter().map(subscription_json).collect()));
    }
    let rows: Vec<Vec<String>> = subs
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.topic.clone(),
                format!("{}/{}", s.slots, s.max_concurrency),
                s.depth.to_string(),
                s.consumers.to_string(),
                s.unacked.to_string(),
                s.retrying.to_string(),
                s.dead_lettered.to_string(),
                format!("{:.1}", s.drain_rate),
            ]
        })
        .collect();
    table(
        &[
            "SUBSCRIPTION",
            "TOPIC",
            "SLOTS",
            "DEPTH",
            "CONSUMERS",
            "UNACKED",
            "RETRYING",
            "DEAD-LETTERED",
            "MSG/S",
        ],
        &rows,
    );
    for s in subs.iter().filter(|s| !s.error.is_empty()) {
        eprintln!("warning: {}: {}", s.name, s.error);
    }
    Ok(())
}

/// Prints a checkpoint change plan; says whether it was applied.
pub fn plan(plan: &v1::CheckpointPlan, asked_dry_run: bool, json: bool) -> Result<()> {
    if json {
        let changes: Vec<Value> = plan
            .changes
            .iter()
            .map(|c| {
                json!({
                    "lease": id(c.lease.as_ref()), "owner": (!c.owner.is_empty()).then_some(&c.owner),
                    "epoch": c.epoch, "new_epoch": c.epoch + 1, "from": c.from, "to": c.to,
                })
            })
            .collect();
        return print_json(&json!({"applied": plan.applied, "changes": changes}));
    }
    let rows: Vec<Vec<String>> = plan
        .changes
        .iter()
        .map(|c| {
            vec![
                id(c.lease.as_ref()),
                c.from.map_or("-".into(), |f| f.to_string()),
                c.to.to_string(),
                format!("{} -> {}", c.epoch, c.epoch + 1),
                dash(&c.owner),
            ]
        })
        .collect();
    table(&["LEASE", "FROM", "TO", "EPOCH", "OWNER (restarts from TO)"], &rows);
    if plan.applied {
        println!("applied: {} checkpoint(s) set", plan.changes.len());
    } else if asked_dry_run {
        println!("dry run: nothing changed");
    } else {
        println!("nothing changed: add --yes to apply (or --dry-run to only print the plan)");
    }
    Ok(())
}

pub fn usage(reply: &v1::UsageReply, json: bool) -> Result<()> {
    let since = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(reply.from_ms.max(0) as u64),
    );
    if json {
        let rows: Vec<Value> = reply
            .usage
            .iter()
            .map(|u| {
                json!({
                    "mapping": u.mapping, "handler": u.handler, "batches": u.batches, "records": u.records,
                    "handler_ms": u.handler_ms, "billed_units": u.billed_units,
                    "billed_seconds": u.billed_units as f64 / 10.0,
                })
            })
            .collect();
        return print_json(&json!({"since": since.to_string(), "usage": rows}));
    }
    let rows: Vec<Vec<String>> = reply
        .usage
        .iter()
        .map(|u| {
            vec![
                u.mapping.clone(),
                u.handler.clone(),
                u.batches.to_string(),
                u.records.to_string(),
                format!("{:.1}", u.handler_ms as f64 / 1000.0),
                u.billed_units.to_string(),
                format!("{:.1}", u.billed_units as f64 / 10.0),
            ]
        })
        .collect();
    if rows.is_empty() {
        println!(
            "no handler usage recorded{}",
            if reply.from_ms > 0 { format!(" since {since}") } else { String::new() }
        );
        return Ok(());
    }
    table(&["MAPPING", "HANDLER", "BATCHES", "RECORDS", "HANDLER S", "100MS UNITS", "BILLED S"], &rows);
    println!("since {since}");
    Ok(())
}

pub fn health(h: &v1::HealthReply, json: bool) -> Result<()> {
    if json {
        return print_json(
            &json!({"status": h.status, "version": h.version, "workers": h.workers, "leases": h.leases}),
        );
    }
    println!("{} (version {}, {} workers, {} leases)", h.status, h.version, h.workers, h.leases);
    Ok(())
}
