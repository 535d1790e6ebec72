//! The run's books: every record sent (and whether the broker took it) and
//! every receipt read back, then the verdict computed from them.
//!
//! The producer and the receipt readers write here while the run goes on
//! (cheap appends and counters behind one mutex, at a few thousand records
//! a second); [`Ledger::analyze`] derives everything reported afterwards
//! from the raw log, so the figures are a pure function of what happened
//! and are unit-tested without brokers.
//!
//! Units of account: a "destination" is the Kafka stream, or one RabbitMQ
//! subscription (a fanout delivers every message to each, and each must
//! process it). `processed` counts (destination, id) pairs processed at
//! least once, so it equals `produced × destinations` when nothing is lost.
//!
//! One ledger books one target (a run with a Kafka stream and a RabbitMQ
//! topic has two, each with its own ids); [`Analysis::combine`] sums their
//! analyses into the run's overall figures.

use std::collections::HashMap;
use std::time::Duration;

use shardline_testkit::receipts::{Counts, Order};

use super::payload::Stamp;
use crate::stats::Latency;

/// The books as the run's tasks share them.
pub type Books = std::sync::Arc<std::sync::Mutex<Ledger>>;

/// The ledger, even if a task panicked while holding it: the books are
/// appends and counters, still worth reporting.
pub fn lock(books: &std::sync::Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    books.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Lost ids listed in the report, at most.
const LOST_SAMPLE: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendState {
    /// Handed to the client, no answer yet.
    Pending,
    /// Acknowledged (Kafka acks=all) or confirmed and routed (RabbitMQ) at
    /// this wall-clock ms.
    Acked(u64),
    /// The broker refused it or the client gave up: not counted as
    /// produced (it may still be processed: "unconfirmed").
    Failed,
}

#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub key: u32,
    pub sent_ms: u64,
    pub state: SendState,
}

/// One receipt: a record some worker processed.
#[derive(Debug, Clone, Copy)]
pub struct Receipt {
    pub id: u64,
    /// Index into the destinations.
    pub sub: u16,
    /// The lease it was processed under: partition or queue slot.
    pub shard: u32,
    /// Index into the interned worker names.
    pub worker: u16,
    /// When it was processed (Kafka: the receipt's timestamp, set by the
    /// worker's producer) or read (RabbitMQ), wall-clock ms.
    pub at_ms: u64,
    /// When the handler invocation that processed it began (the
    /// `shardline.invoked_at_ms` header), wall-clock ms; 0 if absent.
    pub invoked_ms: u64,
}

/// What the live counters say, for the progress bar and the drain loop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    /// (destination, id) pairs processed at least once.
    pub processed: u64,
    /// Acknowledged pairs not processed yet.
    pub lag: u64,
}

impl Progress {
    /// Two targets' progress together.
    pub fn plus(self, other: Progress) -> Progress {
        Progress {
            sent: self.sent + other.sent,
            acked: self.acked + other.acked,
            failed: self.failed + other.failed,
            processed: self.processed + other.processed,
            lag: self.lag + other.lag,
        }
    }
}

pub struct Ledger {
    run: String,
    start_ms: u64,
    destinations: Vec<String>,
    /// Per-key order is only promised by partitioned streams.
    order_check: bool,
    sent: Vec<Sent>,
    receipts: Vec<Receipt>,
    workers: Vec<String>,
    /// Receipts per id, one vector per destination (grown on demand).
    seen: Vec<Counts>,
    acked: u64,
    failed: u64,
    processed: u64,
    /// (destination, id) pairs both acknowledged and processed.
    done: u64,
    /// Receipts of other runs or not ours at all.
    foreign: u64,
    /// When each lease's checkpoint was seen to move forward (wall-clock
    /// ms, in booking order), by (destination, partition); queue slots
    /// have none.
    checkpoints: HashMap<Scope, Vec<u64>>,
}

/// One lease's longest stalls after any fault.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseStall {
    /// `stream/3` or `subscription#1`.
    pub lease: String,
    /// The longest it went without a receipt in any fault's window.
    pub max_stall_s: f64,
    /// The fault of that window.
    pub after: String,
    /// The longest its checkpoint stood still in any fault's window, and
    /// after which fault; `None` for queue slots (no checkpoints).
    pub checkpoint: Option<(f64, String)>,
}

/// Where a fault hit: one shard (partition or queue slot) of a
/// destination, or a whole destination (any of its slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    pub sub: usize,
    pub shard: Option<u32>,
}

/// A fault as executed, for the recovery figures.
#[derive(Debug, Clone)]
pub struct FaultEvent {
    /// `kill9 w0` and the like.
    pub label: String,
    /// When it took effect, wall-clock ms.
    pub at_ms: u64,
    /// What it interrupted; empty: nothing to recover.
    pub scopes: Vec<Scope>,
    /// Receipts from this worker do not count as recovery (a killed
    /// worker's last receipts may still be in flight).
    pub exclude_worker: Option<String>,
    /// Why it did not run, when it failed.
    pub error: Option<String>,
    /// When a fault that lasts (cut_worker, drop_replies) was over;
    /// `None`: at `at_ms`.
    pub ends_ms: Option<u64>,
    /// A cut_worker fault's session bounds, for the zombie count.
    pub cut: Option<Cut>,
    /// kill_leader: how the standbys took over.
    pub failover: Option<Failover>,
}

/// A kill of the leading coordinator as the harness saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failover {
    /// From the kill until a standby's `/readyz` answered 200.
    pub takeover_ms: u64,
    /// From the kill until every partition's checkpoint, as the new leader
    /// lists it, had moved past where it stood at the kill (so the new
    /// leader acknowledged each lease's owner and made its progress
    /// durable; queue slots, which have no checkpoint: until each is
    /// owned). `None`: not within the wait.
    pub recovery_ms: Option<u64>,
}

impl FaultEvent {
    /// A fault of this label starting now, nothing affected yet.
    pub fn new(label: &str, at_ms: u64) -> Self {
        Self {
            label: label.to_owned(),
            at_ms,
            scopes: Vec::new(),
            exclude_worker: None,
            error: None,
            ends_ms: None,
            cut: None,
            failover: None,
        }
    }
}

/// When a cut-off worker (`exclude_worker`) was a zombie: from the end of
/// its session to its first bytes through to the coordinator again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The worker's index in the fleet (which proxy saw it).
    pub worker_index: usize,
    /// The last client→coordinator bytes forwarded before or during the
    /// cut + `session_timeout`: the coordinator has let the session go by
    /// then, since its last heartbeat came at or before those bytes.
    pub session_end_ms: u64,
    /// When the cut ended: the mark after which the proxy watched for the
    /// worker's next bytes.
    pub resumed_ms: u64,
    /// Those next bytes; `None`: never (the run ended first).
    pub reconnect_ms: Option<u64>,
}

impl Cut {
    /// Whether a handler invocation begun at `invoked_ms` ran while the
    /// worker had no session and did not know it.
    fn zombie(&self, invoked_ms: u64) -> bool {
        invoked_ms > self.session_end_ms && self.reconnect_ms.is_none_or(|r| invoked_ms < r)
    }
}

#[derive(Debug, Clone)]
pub struct Recovery {
    pub label: String,
    pub at_s: f64,
    /// `None`: nothing affected, or (with `unrecovered`) not recovered.
    pub recovery_s: Option<f64>,
    pub affected: usize,
    /// Scopes that never saw a receipt after the fault.
    pub unrecovered: Vec<String>,
    pub error: Option<String>,
    /// Seconds since start when the fault was over.
    pub ended_s: f64,
    /// From the fault's end to the next fault (or the end of producing):
    /// the longest any partition or queue slot went without a receipt
    /// (the faulted worker's zombie receipts not counted); `None`: no
    /// such window.
    pub max_stall_s: Option<f64>,
    /// Where that stall was.
    pub stalled: Option<String>,
    /// cut_worker only: receipts from the cut worker invoked after its
    /// session ended and before it got through again.
    pub zombie_invocations: Option<u64>,
    /// Over the same window, the longest any partition's checkpoint stood
    /// still (as the lease watcher saw it, to its polling period), and
    /// where; `None`: no partitions, or no window.
    pub checkpoint_stall_s: Option<f64>,
    pub checkpoint_stalled: Option<String>,
    /// kill_leader only: takeover and recovery (see [`Failover`]).
    pub failover: Option<Failover>,
}

#[derive(Debug, Clone, Default)]
pub struct DestinationFigures {
    pub name: String,
    pub processed: u64,
    pub duplicates: u64,
    pub lost: u64,
    pub lost_sample: Vec<u64>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct LatencyFigures {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LatencyFigures {
    fn of(latency: &Latency, count: u64) -> Self {
        Self {
            count,
            p50_ms: latency.quantile_ms(0.50),
            p95_ms: latency.quantile_ms(0.95),
            p99_ms: latency.quantile_ms(0.99),
            max_ms: latency.quantile_ms(1.0),
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Row {
    pub t: u64,
    /// Acknowledged in this second.
    pub produced: u64,
    /// First-time (destination, id) pairs processed in this second.
    pub processed: u64,
    /// Acknowledged pairs not yet processed at the end of this second.
    pub lag: u64,
    /// Slowest first-time receipt of this second.
    pub max_latency_ms: u64,
}

#[derive(Debug, Clone)]
pub struct Analysis {
    pub produced: u64,
    /// Sent but never acknowledged.
    pub unacknowledged: u64,
    /// (destination, id) pairs that must be processed: `produced` × the
    /// destinations of each target.
    pub expected: u64,
    pub destinations: Vec<DestinationFigures>,
    pub processed: u64,
    pub duplicates: u64,
    pub lost: u64,
    /// Unacknowledged records that were processed anyway.
    pub unconfirmed_processed: u64,
    pub foreign: u64,
    /// `None` where order is not promised (queues).
    pub order_violations: Option<u64>,
    pub latency: LatencyFigures,
    /// From send to the broker's acknowledgement: the broker's share of
    /// `latency`, to tell a slow broker from a slow system.
    pub ack_latency: LatencyFigures,
    pub throughput_per_s: f64,
    pub timeline: Vec<Row>,
    pub recoveries: Vec<Recovery>,
    /// Over every cut_worker fault.
    pub zombie_invocations: u64,
    /// Receipts without `shardline.invoked_at_ms` (a worker too old to
    /// stamp it): the zombie count cannot see them.
    pub unstamped: u64,
    /// Receipts per worker name.
    pub per_worker: Vec<(String, u64)>,
    /// Every lease's longest stalls after any fault, in lease order.
    pub lease_stalls: Vec<LeaseStall>,
}

impl Analysis {
    /// Several targets' analyses of one run (the same faults, in the same
    /// order) as one: counts add up; latency quantiles, stalls and
    /// recovery times are the worst target's (quantiles of different
    /// distributions do not add; the worst is what a threshold must hold
    /// for); each fault's recovery is over the scopes it hit on every
    /// target; timelines add up per second.
    pub fn combine(parts: &[&Analysis]) -> Analysis {
        let sum = |f: fn(&Analysis) -> u64| parts.iter().map(|a| f(a)).sum::<u64>();
        let worst = |f: fn(&Analysis) -> LatencyFigures| {
            parts.iter().map(|a| f(a)).fold(LatencyFigures::default(), |w, l| LatencyFigures {
                count: w.count + l.count,
                p50_ms: w.p50_ms.max(l.p50_ms),
                p95_ms: w.p95_ms.max(l.p95_ms),
                p99_ms: w.p99_ms.max(l.p99_ms),
                max_ms: w.max_ms.max(l.max_ms),
            })
        };
        let mut per_worker: Vec<(String, u64)> = Vec::new();
        for (name, n) in parts.iter().flat_map(|a| a.per_worker.iter()) {
            match per_worker.iter_mut().find(|(w, _)| w == name) {
                Some((_, total)) => *total += n,
                None => per_worker.push((name.clone(), *n)),
            }
        }
        let mut rows: std::collections::BTreeMap<u64, Row> = std::collections::BTreeMap::new();
        for row in parts.iter().flat_map(|a| a.timeline.iter()) {
            let r = rows.entry(row.t).or_insert(Row { t: row.t, ..Row::default() });
            r.produced += row.produced;
            r.processed += row.processed;
            r.lag += row.lag;
            r.max_latency_ms = r.max_latency_ms.max(row.max_latency_ms);
        }
        let faults = parts.iter().map(|a| a.recoveries.len()).max().unwrap_or(0);
        let recoveries = (0..faults)
            .filter_map(|i| {
                let each: Vec<&Recovery> = parts.iter().filter_map(|a| a.recoveries.get(i)).collect();
                Recovery::combine(&each)
            })
            .collect();
        let orders: Vec<u64> = parts.iter().filter_map(|a| a.order_violations).collect();
        Analysis {
            produced: sum(|a| a.produced),
            unacknowledged: sum(|a| a.unacknowledged),
            expected: sum(|a| a.expected),
            destinations: parts.iter().flat_map(|a| a.destinations.iter().cloned()).collect(),
            processed: sum(|a| a.processed),
            duplicates: sum(|a| a.duplicates),
            lost: sum(|a| a.lost),
            unconfirmed_processed: sum(|a| a.unconfirmed_processed),
            foreign: sum(|a| a.foreign),
            order_violations: (!orders.is_empty()).then(|| orders.iter().sum()),
            latency: worst(|a| a.latency),
            ack_latency: worst(|a| a.ack_latency),
            throughput_per_s: parts.iter().map(|a| a.throughput_per_s).sum(),
            timeline: rows.into_values().collect(),
            recoveries,
            zombie_invocations: sum(|a| a.zombie_invocations),
            unstamped: sum(|a| a.unstamped),
            per_worker,
            lease_stalls: parts.iter().flat_map(|a| a.lease_stalls.iter().cloned()).collect(),
        }
    }
}

impl Recovery {
    /// One fault as every target saw it: affected and unrecovered scopes
    /// of all; recovered when every target's scopes were, by the slowest;
    /// the longest stall of any target; zombies of all. `None` for none.
    fn combine(each: &[&Recovery]) -> Option<Recovery> {
        let first = *each.first()?;
        let unrecovered: Vec<String> = each.iter().flat_map(|r| r.unrecovered.iter().cloned()).collect();
        let recovery_s = if unrecovered.is_empty() {
            each.iter().filter_map(|r| r.recovery_s).reduce(f64::max)
        } else {
            None
        };
        let stall = each
            .iter()
            .filter(|r| r.max_stall_s.is_some())
            .max_by(|x, y| x.max_stall_s.partial_cmp(&y.max_stall_s).unwrap_or(std::cmp::Ordering::Equal));
        let zombies: Vec<u64> = each.iter().filter_map(|r| r.zombie_invocations).collect();
        let checkpoint = each.iter().filter(|r| r.checkpoint_stall_s.is_some()).max_by(|x, y| {
            x.checkpoint_stall_s.partial_cmp(&y.checkpoint_stall_s).unwrap_or(std::cmp::Ordering::Equal)
        });
        Some(Recovery {
            label: first.label.clone(),
            at_s: first.at_s,
            recovery_s,
            affected: each.iter().map(|r| r.affected).sum(),
            unrecovered,
            error: first.error.clone(),
            ended_s: first.ended_s,
            max_stall_s: stall.and_then(|r| r.max_stall_s),
            stalled: stall.and_then(|r| r.stalled.clone()),
            zombie_invocations: (!zombies.is_empty()).then(|| zombies.iter().sum()),
            checkpoint_stall_s: checkpoint.and_then(|r| r.checkpoint_stall_s),
            checkpoint_stalled: checkpoint.and_then(|r| r.checkpoint_stalled.clone()),
            // The coordinators are the same for every target.
            failover: first.failover,
        })
    }
}

impl Ledger {
    pub fn new(run: &str, destinations: Vec<String>, order_check: bool) -> Self {
        let n = destinations.len();
        Self {
            run: run.to_owned(),
            start_ms: 0,
            destinations,
            order_check,
            sent: Vec::new(),
            receipts: Vec::new(),
            workers: Vec::new(),
            seen: vec![Counts::default(); n],
            acked: 0,
            failed: 0,
            processed: 0,
            done: 0,
            foreign: 0,
            checkpoints: HashMap::new(),
        }
    }

    /// Second 0 of the timeline and of every `at_s`.
    pub fn set_start(&mut self, start_ms: u64) {
        self.start_ms = start_ms;
    }

    /// Books a record about to be sent; returns its id.
    pub fn send(&mut self, key: u32, sent_ms: u64) -> u64 {
        let id = self.sent.len() as u64;
        self.sent.push(Sent { key, sent_ms, state: SendState::Pending });
        id
    }

    pub fn acked(&mut self, id: u64, at_ms: u64) {
        let Some(sent) = self.sent.get_mut(id as usize) else { return };
        if sent.state != SendState::Pending {
            return;
        }
        sent.state = SendState::Acked(at_ms);
        self.acked += 1;
        // A receipt can beat the acknowledgement to us.
        self.done += self.seen.iter().filter(|s| s.get(id) > 0).count() as u64;
    }

    pub fn failed(&mut self, id: u64) {
        if let Some(sent) = self.sent.get_mut(id as usize)
            && sent.state == SendState::Pending
        {
            sent.state = SendState::Failed;
            self.failed += 1;
        }
    }

    /// Books something read from the receipts that is no receipt of
    /// this run (no stamp, no headers).
    pub fn foreign(&mut self) {
        self.foreign += 1;
    }

    /// Books a receipt from destination `stream`, processed under lease
    /// `shard` by `worker` in an invocation begun at `invoked_ms`.
    pub fn receipt(
        &mut self,
        stamp: &Stamp,
        stream: &str,
        shard: u32,
        worker: &str,
        at_ms: u64,
        invoked_ms: Option<u64>,
    ) {
        let sub = self.destinations.iter().position(|d| d == stream);
        let (Some(sub), true, true) = (sub, stamp.run == self.run, (stamp.id as usize) < self.sent.len())
        else {
            self.foreign += 1;
            return;
        };
        let worker = match self.workers.iter().position(|w| w == worker) {
            Some(i) => i,
            None => {
                self.workers.push(worker.to_owned());
                self.workers.len() - 1
            }
        };
        if self.seen[sub].add(stamp.id) {
            self.processed += 1;
            if matches!(self.sent[stamp.id as usize].state, SendState::Acked(_)) {
                self.done += 1;
            }
        }
        self.receipts.push(Receipt {
            id: stamp.id,
            sub: sub as u16,
            shard,
            worker: u16::try_from(worker).unwrap_or(u16::MAX),
            at_ms,
            invoked_ms: invoked_ms.unwrap_or(0),
        });
    }

    /// Books that the checkpoint of partition `shard` of `destination`
    /// moved forward, as the lease watcher saw at `at_ms`.
    pub fn checkpoint(&mut self, destination: &str, shard: u32, at_ms: u64) {
        if let Some(sub) = self.destinations.iter().position(|d| d == destination) {
            self.checkpoints.entry(Scope { sub, shard: Some(shard) }).or_default().push(at_ms);
        }
    }

    pub fn progress(&self) -> Progress {
        let expected = self.acked * self.destinations.len() as u64;
        Progress {
            sent: self.sent.len() as u64,
            acked: self.acked,
            failed: self.failed,
            processed: self.processed,
            lag: expected.saturating_sub(self.done),
        }
    }

    /// Every acknowledged record processed by every destination, and no
    /// send still waiting for its answer.
    pub fn complete(&self) -> bool {
        let p = self.progress();
        p.lag == 0 && p.acked + p.failed == p.sent
    }

    fn rel_s(&self, ms: u64) -> f64 {
        (ms as f64 - self.start_ms as f64) / 1000.0
    }

    /// The verdict on everything booked, with each fault's recovery.
    pub fn analyze(&self, faults: &[FaultEvent]) -> anyhow::Result<Analysis> {
        let subs = self.destinations.len();
        let produced = self.acked;
        let mut destinations = Vec::with_capacity(subs);
        let mut unconfirmed_processed = 0;
        for (sub, name) in self.destinations.iter().enumerate() {
            let seen = &self.seen[sub];
            let mut figures = DestinationFigures { name: name.clone(), ..DestinationFigures::default() };
            for (id, sent) in self.sent.iter().enumerate() {
                let count = seen.get(id as u64);
                figures.duplicates += u64::from(count.saturating_sub(1));
                match (sent.state, count) {
                    (SendState::Acked(_), 0) => {
                        figures.lost += 1;
                        if figures.lost_sample.len() < LOST_SAMPLE {
                            figures.lost_sample.push(id as u64);
                        }
                    }
                    (SendState::Acked(_), _) => figures.processed += 1,
                    (_, 0) => {}
                    (_, _) => unconfirmed_processed += 1,
                }
            }
            destinations.push(figures);
        }

        // One pass over receipts in arrival order: first-time receipts give
        // latency, order and the timeline.
        let mut replay = vec![Counts::default(); subs];
        let mut latency = Latency::new()?;
        let mut order = Order::default();
        let mut processed_at: Vec<u64> = Vec::with_capacity(self.receipts.len());
        let mut per_worker = vec![0u64; self.workers.len()];
        let mut last_first_ms = self.start_ms;
        let mut rows: HashMap<u64, Row> = HashMap::new();
        let bucket = |ms: u64| ms.saturating_sub(self.start_ms) / 1000;
        for r in &self.receipts {
            per_worker[usize::from(r.worker)] += 1;
            if !replay[usize::from(r.sub)].add(r.id) {
                continue;
            }
            let sent = &self.sent[r.id as usize];
            let ms = r.at_ms.saturating_sub(sent.sent_ms);
            if matches!(sent.state, SendState::Acked(_)) {
                latency.record(Duration::from_millis(ms));
            }
            let row = rows.entry(bucket(r.at_ms)).or_default();
            row.processed += 1;
            row.max_latency_ms = row.max_latency_ms.max(ms);
            processed_at.push(r.at_ms);
            last_first_ms = last_first_ms.max(r.at_ms);
            if self.order_check {
                order.see((r.sub, sent.key), r.id);
            }
        }
        let mut ack_latency = Latency::new()?;
        for sent in &self.sent {
            if let SendState::Acked(at) = sent.state {
                rows.entry(bucket(at)).or_default().produced += 1;
                ack_latency.record(Duration::from_millis(at.saturating_sub(sent.sent_ms)));
            }
        }
        let seconds = rows.keys().max().map_or(0, |last| last + 1);
        let mut timeline = Vec::with_capacity(seconds as usize);
        let (mut acked, mut processed) = (0u64, 0u64);
        for t in 0..seconds {
            let mut row = rows.get(&t).copied().unwrap_or_default();
            row.t = t;
            acked += row.produced;
            processed += row.processed;
            row.lag = (acked * subs as u64).saturating_sub(processed);
            timeline.push(row);
        }

        let processed: u64 = destinations.iter().map(|d| d.processed).sum();
        let elapsed_s = (last_first_ms.saturating_sub(self.start_ms)) as f64 / 1000.0;
        let producing_end_ms = self
            .sent
            .iter()
            .filter_map(|s| match s.state {
                SendState::Acked(_) => Some(s.sent_ms),
                _ => None,
            })
            .max()
            .unwrap_or(self.start_ms);
        let shards = self.shards();
        let mut recoveries: Vec<Recovery> = Vec::with_capacity(faults.len());
        // Per lease: the longest receipt and checkpoint stalls and their
        // faults' labels.
        let mut worst: HashMap<Scope, (Gap, Option<Gap>)> = HashMap::new();
        for (i, f) in faults.iter().enumerate() {
            let until = faults.get(i + 1).map_or(producing_end_ms, |next| next.at_ms.min(producing_end_ms));
            let (recovery, receipt_gaps, checkpoint_gaps) = self.recovery(f, &shards, until);
            recoveries.push(recovery);
            for (scope, gap) in receipt_gaps {
                let entry = worst.entry(scope).or_insert(((gap, i), None));
                if gap > entry.0.0 {
                    entry.0 = (gap, i);
                }
            }
            for (scope, gap) in checkpoint_gaps {
                if let Some(entry) = worst.get_mut(&scope)
                    && entry.1.is_none_or(|(ms, _)| gap > ms)
                {
                    entry.1 = Some((gap, i));
                }
            }
        }
        let mut lease_stalls: Vec<(Scope, LeaseStall)> = worst
            .into_iter()
            .map(|(scope, ((ms, i), checkpoint))| {
                let label = |i: usize| faults.get(i).map_or_else(String::new, |f| f.label.clone());
                let stall = LeaseStall {
                    lease: self.scope_name(&scope),
                    max_stall_s: ms as f64 / 1000.0,
                    after: label(i),
                    checkpoint: checkpoint.map(|(ms, i)| (ms as f64 / 1000.0, label(i))),
                };
                (scope, stall)
            })
            .collect();
        lease_stalls.sort_by_key(|(scope, _)| *scope);
        Ok(Analysis {
            produced,
            unacknowledged: self.sent.len() as u64 - produced,
            expected: produced * subs as u64,
            processed,
            duplicates: destinations.iter().map(|d| d.duplicates).sum(),
            lost: destinations.iter().map(|d| d.lost).sum(),
            destinations,
            unconfirmed_processed,
            foreign: self.foreign,
            order_violations: self.order_check.then_some(order.violations),
            latency: LatencyFigures::of(&latency, processed_at.len() as u64),
            ack_latency: LatencyFigures::of(&ack_latency, produced),
            throughput_per_s: if elapsed_s > 0.0 { processed as f64 / elapsed_s } else { 0.0 },
            timeline,
            zombie_invocations: recoveries.iter().filter_map(|r| r.zombie_invocations).sum(),
            recoveries,
            unstamped: self.receipts.iter().filter(|r| r.invoked_ms == 0).count() as u64,
            per_worker: self.workers.iter().cloned().zip(per_worker).collect(),
            lease_stalls: lease_stalls.into_iter().map(|(_, stall)| stall).collect(),
        })
    }

    /// Every (destination, partition or slot) that ever had a receipt.
    fn shards(&self) -> Vec<Scope> {
        let mut shards: Vec<Scope> =
            self.receipts.iter().map(|r| Scope { sub: usize::from(r.sub), shard: Some(r.shard) }).collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    /// One fault's figures: from the fault to the first receipt of every
    /// scope it hit (by another worker than the faulted one), the slowest
    /// of them; the longest stall of any of `shards` from the fault's end
    /// to `until`, in receipts and in checkpoints; a cut's zombie
    /// invocations. Also each shard's receipt and checkpoint stall.
    fn recovery(
        &self,
        fault: &FaultEvent,
        shards: &[Scope],
        until: u64,
    ) -> (Recovery, Vec<ShardGap>, Vec<ShardGap>) {
        let excluded = fault
            .exclude_worker
            .as_ref()
            .and_then(|name| self.workers.iter().position(|w| w == name))
            .map(|i| u16::try_from(i).unwrap_or(u16::MAX));
        let mut slowest: Option<u64> = None;
        let mut unrecovered = Vec::new();
        for scope in &fault.scopes {
            let first = self
                .receipts
                .iter()
                .filter(|r| {
                    usize::from(r.sub) == scope.sub
                        && scope.shard.is_none_or(|s| s == r.shard)
                        && r.at_ms >= fault.at_ms
                        && Some(r.worker) != excluded
                })
                .map(|r| r.at_ms)
                .min();
            match first {
                Some(ms) => slowest = Some(slowest.unwrap_or(0).max(ms - fault.at_ms)),
                None => unrecovered.push(self.scope_name(scope)),
            }
        }
        let recovery_s = if unrecovered.is_empty() { slowest.map(|ms| ms as f64 / 1000.0) } else { None };
        let ends_ms = fault.ends_ms.unwrap_or(fault.at_ms);
        // The faulted worker's receipts do not show a lease running while
        // it is dead or cut off: a killed worker's are in flight, a cut
        // one's are a zombie's until it gets through again.
        let counts = |r: &Receipt| {
            Some(r.worker) != excluded
                || fault.cut.as_ref().and_then(|c| c.reconnect_ms).is_some_and(|ms| r.at_ms >= ms)
        };
        let receipt_gaps = self.stalls(shards, ends_ms, until, counts);
        let stall = longest(&receipt_gaps);
        let checkpoint_gaps: Vec<(Scope, u64)> = if until <= ends_ms {
            Vec::new()
        } else {
            let mut scopes: Vec<&Scope> = self.checkpoints.keys().collect();
            scopes.sort_unstable();
            scopes
                .into_iter()
                .map(|scope| {
                    let times = self.checkpoints.get(scope).map_or(&[][..], Vec::as_slice);
                    (*scope, longest_gap(times.iter().copied(), ends_ms, until))
                })
                .collect()
        };
        let checkpoint_stall = longest(&checkpoint_gaps);
        let zombie_invocations = fault.cut.as_ref().map(|cut| {
            self.receipts.iter().filter(|r| Some(r.worker) == excluded && cut.zombie(r.invoked_ms)).count()
                as u64
        });
        let recovery = Recovery {
            label: fault.label.clone(),
            at_s: self.rel_s(fault.at_ms),
            recovery_s,
            affected: fault.scopes.len(),
            unrecovered,
            error: fault.error.clone(),
            ended_s: self.rel_s(ends_ms),
            max_stall_s: stall.map(|(ms, _)| ms as f64 / 1000.0),
            stalled: stall.map(|(_, scope)| self.scope_name(&scope)),
            zombie_invocations,
            checkpoint_stall_s: checkpoint_stall.map(|(ms, _)| ms as f64 / 1000.0),
            checkpoint_stalled: checkpoint_stall.map(|(_, scope)| self.scope_name(&scope)),
            failover: fault.failover,
        };
        (recovery, receipt_gaps, checkpoint_gaps)
    }

    /// For each of `shards`, the longest time in `[from, until]` it went
    /// without a receipt that `counts`; empty when the window is.
    fn stalls(
        &self,
        shards: &[Scope],
        from: u64,
        until: u64,
        counts: impl Fn(&Receipt) -> bool,
    ) -> Vec<(Scope, u64)> {
        if until <= from {
            return Vec::new();
        }
        let mut times: HashMap<Scope, Vec<u64>> = HashMap::new();
        for r in &self.receipts {
            if (from..=until).contains(&r.at_ms) && counts(r) {
                times
                    .entry(Scope { sub: usize::from(r.sub), shard: Some(r.shard) })
                    .or_default()
                    .push(r.at_ms);
            }
        }
        shards
            .iter()
            .map(|scope| {
                let mut points = times.remove(scope).unwrap_or_default();
                points.sort_unstable();
                (*scope, longest_gap(points.into_iter(), from, until))
            })
            .collect()
    }

    /// `stream/3` for a shard, `subscription#1` for a slot (the CLI's
    /// lease notation), the bare name for a whole destination.
    fn scope_name(&self, scope: &Scope) -> String {
        let name = self.destinations.get(scope.sub).map_or("?", String::as_str);
        match (scope.shard, self.order_check) {
            (None, _) => name.to_owned(),
            (Some(s), true) => format!("{name}/{s}"),
            (Some(s), false) => format!("{name}#{s}"),
        }
    }
}

/// A stall (ms) and the index of the fault whose window it was in.
type Gap = (u64, usize);
/// A shard's longest stall (ms) in one window.
type ShardGap = (Scope, u64);

/// The longest time in `[from, until]` between `from`, the sorted
/// `points` inside the window, and `until`.
fn longest_gap(points: impl Iterator<Item = u64>, from: u64, until: u64) -> u64 {
    let mut previous = from;
    let mut gap = 0;
    for t in points.filter(|t| (from..=until).contains(t)).chain([until]) {
        gap = gap.max(t - previous);
        previous = t;
    }
    gap
}

/// The largest of `gaps` (the first of equals) and where.
fn longest(gaps: &[(Scope, u64)]) -> Option<(u64, Scope)> {
    gaps.iter().fold(None, |best: Option<(u64, Scope)>, &(scope, gap)| match best {
        Some((ms, _)) if ms >= gap => best,
        _ => Some((gap, scope)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_000_000;

    fn stamp(id: u64) -> Stamp {
        Stamp { run: "r".into(), id, sent_ms: 0 }
    }

    /// `n` records, key = id % keys, sent 10 ms
    /// apart from T0 and acknowledged 5 ms later.
    fn ledger(n: u64, keys: u32, destinations: &[&str]) -> Ledger {
        let mut l =
            Ledger::new("r", destinations.iter().map(|d| d.to_string()).collect(), destinations.len() == 1);
        l.set_start(T0);
        for i in 0..n {
            let key = (i % u64::from(keys)) as u32;
            let id = l.send(key, T0 + i * 10);
            l.acked(id, T0 + i * 10 + 5);
        }
        l
    }

    #[test]
    fn counts_lost_duplicates_and_latency() -> anyhow::Result<()> {
        let mut l = ledger(10, 4, &["s"]);
        for i in 0..9 {
            l.receipt(&stamp(i), "s", (i % 2) as u32, "w0", T0 + i * 10 + 100, None);
        }
        l.receipt(&stamp(3), "s", 1, "w1", T0 + 500, None);
        assert_eq!(l.progress(), Progress { sent: 10, acked: 10, failed: 0, processed: 9, lag: 1 });
        assert!(!l.complete());
        let a = l.analyze(&[])?;
        assert_eq!((a.produced, a.processed, a.duplicates, a.lost), (10, 9, 1, 1));
        assert_eq!(a.destinations[0].lost_sample, vec![9]);
        assert_eq!(a.order_violations, Some(0));
        assert!((a.latency.p50_ms - 100.0).abs() < 1.0, "{:?}", a.latency);
        assert_eq!(a.latency.count, 9);
        assert_eq!(a.per_worker, vec![("w0".to_owned(), 9), ("w1".to_owned(), 1)]);
        Ok(())
    }

    #[test]
    fn foreign_receipts_are_set_aside() -> anyhow::Result<()> {
        let mut l = ledger(2, 1, &["s"]);
        l.receipt(&Stamp { run: "other".into(), id: 0, sent_ms: 0 }, "s", 0, "w", T0, None);
        l.receipt(&stamp(0), "elsewhere", 0, "w", T0, None);
        l.receipt(&stamp(99), "s", 0, "w", T0, None);
        let a = l.analyze(&[])?;
        assert_eq!((a.foreign, a.processed, a.lost), (3, 0, 2));
        Ok(())
    }

    #[test]
    fn a_receipt_before_its_ack_still_completes() {
        let mut l = Ledger::new("r", vec!["s".into()], true);
        let id = l.send(0, T0);
        l.receipt(&stamp(id), "s", 0, "w", T0 + 1, None);
        assert!(!l.complete(), "the send is still pending");
        l.acked(id, T0 + 2);
        assert!(l.complete());
    }

    #[test]
    fn failed_sends_are_not_produced_but_may_be_processed() -> anyhow::Result<()> {
        let mut l = Ledger::new("r", vec!["s".into()], true);
        let a = l.send(0, T0);
        let b = l.send(0, T0);
        l.acked(a, T0);
        l.failed(b);
        l.receipt(&stamp(b), "s", 0, "w", T0 + 10, None);
        l.receipt(&stamp(a), "s", 0, "w", T0 + 10, None);
        assert!(l.complete());
        let x = l.analyze(&[])?;
        assert_eq!(
            (x.produced, x.unacknowledged, x.processed, x.lost, x.unconfirmed_processed),
            (1, 1, 1, 0, 1)
        );
        Ok(())
    }

    #[test]
    fn per_key_order_counts_first_time_receipts_only() -> anyhow::Result<()> {
        let mut l = ledger(6, 2, &["s"]);
        // Key 0: ids 0, 2, 4; key 1: ids 1, 3, 5.
        for id in [0, 1, 4, 3, 2, 5, 0, 1] {
            l.receipt(&stamp(id), "s", 0, "w", T0 + 100, None);
        }
        let a = l.analyze(&[])?;
        // 2 after 4 (key 0); the redelivered 0 and 1 are duplicates, not
        // violations.
        assert_eq!(a.order_violations, Some(1));
        assert_eq!(a.duplicates, 2);
        Ok(())
    }

    #[test]
    fn fanout_destinations_are_accounted_separately() -> anyhow::Result<()> {
        let mut l = ledger(3, 1, &["a", "b"]);
        for id in 0..3 {
            l.receipt(&stamp(id), "a", 0, "w", T0 + 50, None);
        }
        l.receipt(&stamp(0), "b", 1, "w", T0 + 50, None);
        assert_eq!(l.progress().lag, 2);
        let x = l.analyze(&[])?;
        assert_eq!(x.order_violations, None, "queues promise no order");
        assert_eq!((x.processed, x.lost), (4, 2));
        assert_eq!((x.destinations[0].lost, x.destinations[1].lost), (0, 2));
        assert_eq!(x.destinations[1].lost_sample, vec![1, 2]);
        Ok(())
    }

    #[test]
    fn timeline_has_rates_and_lag_per_second() -> anyhow::Result<()> {
        // 300 records over 3 s (10 ms apart), each processed 1.5 s later.
        let mut l = ledger(300, 10, &["s"]);
        for id in 0..300 {
            l.receipt(&stamp(id), "s", 0, "w", T0 + id * 10 + 1500, None);
        }
        let a = l.analyze(&[])?;
        assert_eq!(a.timeline.len(), 5);
        assert_eq!(a.timeline[0], Row { t: 0, produced: 100, processed: 0, lag: 100, max_latency_ms: 0 });
        assert_eq!(a.timeline[1].processed, 50);
        assert_eq!(a.timeline[1].lag, 150);
        assert_eq!(a.timeline[4].lag, 0);
        assert_eq!(a.timeline.iter().map(|r| r.processed).sum::<u64>(), 300);
        assert_eq!(a.timeline[2].max_latency_ms, 1500);
        // 300 processed by the last receipt at 4.49 s.
        assert!((a.throughput_per_s - 300.0 / 4.49).abs() < 0.01, "{}", a.throughput_per_s);
        Ok(())
    }

    #[test]
    fn recovery_waits_for_every_affected_shard_from_another_worker() -> anyhow::Result<()> {
        let mut l = ledger(4, 4, &["s"]);
        let fault_ms = T0 + 10_000;
        // The killed worker's in-flight receipt right after the fault does
        // not count; partition 1 recovers at +3 s, partition 2 at +4.5 s.
        l.receipt(&stamp(1), "s", 1, "dead", fault_ms + 10, None);
        l.receipt(&stamp(1), "s", 1, "w1", fault_ms + 3000, None);
        l.receipt(&stamp(2), "s", 2, "w2", fault_ms - 1000, None);
        l.receipt(&stamp(2), "s", 2, "w2", fault_ms + 4500, None);
        let kill = FaultEvent {
            scopes: vec![Scope { sub: 0, shard: Some(1) }, Scope { sub: 0, shard: Some(2) }],
            exclude_worker: Some("dead".into()),
            ..FaultEvent::new("kill9 dead", fault_ms)
        };
        let never = FaultEvent { scopes: vec![Scope { sub: 0, shard: Some(3) }], ..kill.clone() };
        let nothing = FaultEvent { scopes: vec![], ..kill.clone() };
        let whole =
            FaultEvent { scopes: vec![Scope { sub: 0, shard: None }], exclude_worker: None, ..kill.clone() };
        let a = l.analyze(&[kill, never, nothing, whole])?;
        let r = &a.recoveries;
        assert_eq!(r[0].recovery_s, Some(4.5));
        assert!((r[0].at_s - 10.0).abs() < 1e-9);
        assert_eq!((r[1].recovery_s, r[1].unrecovered.clone()), (None, vec!["s/3".to_owned()]));
        assert_eq!((r[2].recovery_s, r[2].affected), (None, 0));
        assert_eq!(r[3].recovery_s, Some(0.01));
        Ok(())
    }

    #[test]
    fn zombies_are_a_cut_workers_invocations_between_session_end_and_reconnect() -> anyhow::Result<()> {
        let mut l = ledger(10, 10, &["s"]);
        let cut_ms = T0 + 10_000;
        let cut = Cut {
            worker_index: 0,
            session_end_ms: cut_ms + 3000,
            resumed_ms: cut_ms + 20_000,
            reconnect_ms: Some(cut_ms + 20_005),
        };
        // Before the session ended: no zombie; after it, before the
        // reconnect: zombies; after the reconnect: not counted; another
        // worker's: never.
        for (id, invoked) in
            [(0, cut_ms + 2000), (1, cut_ms + 3001), (2, cut_ms + 19_000), (3, cut_ms + 20_010)]
        {
            l.receipt(&stamp(id), "s", 0, "w0", invoked + 50, Some(invoked));
        }
        l.receipt(&stamp(4), "s", 0, "w1", cut_ms + 5000, Some(cut_ms + 5000));
        l.receipt(&stamp(5), "s", 0, "w0", cut_ms + 5000, None);
        let event = FaultEvent {
            exclude_worker: Some("w0".into()),
            ends_ms: Some(cut_ms + 20_000),
            cut: Some(cut.clone()),
            ..FaultEvent::new("cut_worker w0", cut_ms)
        };
        let never = FaultEvent { cut: Some(Cut { reconnect_ms: None, ..cut }), ..event.clone() };
        let kill = FaultEvent { cut: None, ..event.clone() };
        let a = l.analyze(&[event, never, kill])?;
        assert_eq!(a.recoveries[0].zombie_invocations, Some(2));
        assert_eq!(a.recoveries[1].zombie_invocations, Some(3), "no reconnect: every later invocation");
        assert_eq!(a.recoveries[2].zombie_invocations, None, "not a cut");
        assert_eq!(a.zombie_invocations, 5);
        assert_eq!(a.unstamped, 1);
        Ok(())
    }

    #[test]
    fn stalls_run_from_the_faults_end_to_the_next_fault_per_shard() -> anyhow::Result<()> {
        // Records sent until T0 + 9.99 s: producing ends there.
        let mut l = ledger(1000, 10, &["s"]);
        let end = T0 + 2000;
        // Partition 0 steady every 100 ms; partition 1 silent from the
        // end for 1.5 s, then steady; the cut worker's zombie receipts on
        // partition 1 do not count until it reconnects at end + 3 s.
        for k in 0..100u64 {
            let t = T0 + k * 100;
            l.receipt(&stamp(k), "s", 0, "w1", t, Some(t));
            if t < end || t >= end + 1500 {
                l.receipt(&stamp(k), "s", 1, "w2", t, Some(t));
            } else {
                l.receipt(&stamp(k), "s", 1, "w0", t, Some(t));
            }
        }
        let cut = FaultEvent {
            exclude_worker: Some("w0".into()),
            ends_ms: Some(end),
            cut: Some(Cut {
                worker_index: 0,
                session_end_ms: end,
                resumed_ms: end,
                reconnect_ms: Some(end + 3000),
            }),
            ..FaultEvent::new("cut_worker w0", T0 + 1000)
        };
        let next = FaultEvent::new("kill9 w3", T0 + 6000);
        let a = l.analyze(&[cut, next])?;
        assert_eq!(a.recoveries[0].max_stall_s, Some(1.5));
        assert_eq!(a.recoveries[0].stalled.as_deref(), Some("s/1"));
        assert!((a.recoveries[0].ended_s - 2.0).abs() < 1e-9);
        // From T0 + 6 s to the end of producing (T0 + 9.99 s): a receipt
        // every 100 ms throughout.
        let last = a.recoveries[1].max_stall_s.unwrap_or(f64::NAN);
        assert!((last - 0.1).abs() < 1e-9, "{last}");
        Ok(())
    }

    #[test]
    fn targets_combine_into_sums_and_the_worst_figures() -> anyhow::Result<()> {
        // A stream (ids 0..4, one lost) and a fanout of two subscriptions
        // (ids 0..2 each), both hit by one kill at +10 s.
        let fault_ms = T0 + 10_000;
        let mut kafka = ledger(4, 4, &["s"]);
        for id in 0..3 {
            kafka.receipt(&stamp(id), "s", 0, "w1", T0 + 200, Some(T0 + 200));
        }
        kafka.receipt(&stamp(0), "s", 0, "w1", fault_ms + 4000, None);
        let mut rabbit = ledger(2, 2, &["a", "b"]);
        for sub in ["a", "b"] {
            for id in 0..2 {
                rabbit.receipt(&stamp(id), sub, 0, "w0", T0 + 100, Some(T0 + 100));
            }
        }
        rabbit.receipt(&stamp(1), "a", 0, "w1", fault_ms + 1000, None);
        let kill = FaultEvent { exclude_worker: Some("w0".into()), ..FaultEvent::new("kill9 w0", fault_ms) };
        let on_kafka = FaultEvent { scopes: vec![Scope { sub: 0, shard: Some(0) }], ..kill.clone() };
        let on_rabbit = FaultEvent { scopes: vec![Scope { sub: 0, shard: Some(0) }], ..kill };
        let k = kafka.analyze(&[on_kafka])?;
        let r = rabbit.analyze(&[on_rabbit])?;
        let all = Analysis::combine(&[&k, &r]);
        assert_eq!((all.produced, all.expected, all.processed, all.lost), (6, 8, 7, 1));
        assert_eq!((all.duplicates, all.destinations.len()), (2, 3));
        assert_eq!(all.order_violations, Some(0), "the stream's order check survives");
        assert_eq!(all.latency.p99_ms, k.latency.p99_ms.max(r.latency.p99_ms));
        assert_eq!(all.per_worker, vec![("w1".to_owned(), 5), ("w0".to_owned(), 4)]);
        let fault = &all.recoveries[0];
        assert_eq!((fault.affected, fault.recovery_s), (2, Some(4.0)), "the slower target's recovery");
        assert_eq!(all.timeline.iter().map(|r| r.produced).sum::<u64>(), 6);
        assert_eq!(all.timeline.last().map(|r| r.lag), Some(1), "the stream's lost record");
        Ok(())
    }

    #[test]
    fn each_lease_reports_its_longest_receipt_and_checkpoint_stall() -> anyhow::Result<()> {
        // Producing ends at T0 + 9.99 s. Partition 0 gets a receipt every
        // 100 ms; partition 1 none in [T0 + 1 s, T0 + 4 s). Partition
        // 0's checkpoint moves every second, partition 1's stands still
        // from T0 + 2 s to T0 + 7 s.
        let mut l = ledger(1000, 10, &["s"]);
        for k in 0..100u64 {
            let t = T0 + k * 100;
            l.receipt(&stamp(k), "s", 0, "w1", t, Some(t));
            if !(T0 + 1000..T0 + 4000).contains(&t) {
                l.receipt(&stamp(k), "s", 1, "w1", t, Some(t));
            }
        }
        for second in 0..10u64 {
            l.checkpoint("s", 0, T0 + second * 1000);
            if !(3..7).contains(&second) {
                l.checkpoint("s", 1, T0 + second * 1000);
            }
        }
        l.checkpoint("elsewhere", 0, T0);
        let first = FaultEvent::new("kill9 w0", T0 + 500);
        let second = FaultEvent::new("restart_coordinator", T0 + 5000);
        let a = l.analyze(&[first, second])?;
        let r = &a.recoveries;
        // Its last receipt before the silence came at T0 + 0.9 s.
        assert_eq!((r[0].max_stall_s, r[0].stalled.as_deref()), (Some(3.1), Some("s/1")));
        // Its checkpoint moved at T0 + 2 s, then not within the window.
        assert_eq!((r[0].checkpoint_stall_s, r[0].checkpoint_stalled.as_deref()), (Some(3.0), Some("s/1")));
        // From T0 + 5 s: partition 1's checkpoint next moves at T0 + 7 s.
        assert_eq!(r[1].checkpoint_stall_s, Some(2.0));
        let stalls: Vec<(&str, f64, &str, Option<f64>)> = a
            .lease_stalls
            .iter()
            .map(|s| (s.lease.as_str(), s.max_stall_s, s.after.as_str(), s.checkpoint.as_ref().map(|c| c.0)))
            .collect();
        assert_eq!(stalls, vec![("s/0", 0.1, "kill9 w0", Some(1.0)), ("s/1", 3.1, "kill9 w0", Some(3.0))]);
        Ok(())
    }
}
