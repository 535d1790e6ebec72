//! Structured sequences of gRPC requests on a few workers and leases
//! (register, heartbeat with what it runs and its load, checkpoint,
//! release, deregister, operator changes, usage), with time passing,
//! discovery, slot scaling and coordinator restarts in between. Requests
//! are wire messages built from the choices below, so they go through the
//! API's conversions like any other; epochs may be "current", so the
//! fuzzer reaches accepted checkpoints and handoffs, not only refusals.
//! The harness checks the table's invariants after every step.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use shardline_fuzz::{Call, HANDLERS, Harness, STREAMS, SUBSCRIPTION};
use shardline_proto::{LeaseId, v1};

#[derive(Debug, Arbitrary)]
struct Lease {
    slot: bool,
    name: u8,
    index: u8,
}

impl Lease {
    fn id(&self) -> LeaseId {
        // Mostly known names; now and then one nobody configured.
        let name = match self.name % 4 {
            0 | 1 if !self.slot => STREAMS[usize::from(self.name % 2)],
            0 | 1 => SUBSCRIPTION,
            2 => "unknown",
            _ => STREAMS[0],
        };
        let index = u32::from(self.index % 8);
        if self.slot { LeaseId::slot(name, index) } else { LeaseId::shard(name, index) }
    }

    fn wire(&self) -> Option<v1::LeaseId> {
        Some((&self.id()).into())
    }
}

#[derive(Debug, Arbitrary)]
enum Epoch {
    Current,
    Previous,
    Next,
    Exact(u64),
}

impl Epoch {
    fn of(&self, h: &Harness, lease: &Lease) -> u64 {
        let current = h.epoch(&lease.id());
        match self {
            Epoch::Current => current,
            Epoch::Previous => current.saturating_sub(1),
            Epoch::Next => current.saturating_add(1),
            Epoch::Exact(e) => *e,
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Load {
    lease: Lease,
    position: i64,
    lag: i64,
    busy_ratio: f64,
    records_in_per_s: f64,
}

#[derive(Debug, Arbitrary)]
struct Usage {
    mapping: u8,
    batches: u64,
    records: u64,
    handler_ms: u64,
    billed_units: u64,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Register {
        worker: u8,
        incarnation: u8,
        handlers: u8,
        capacity: u8,
        concurrency: u8,
        held: Vec<(Lease, Epoch)>,
    },
    Heartbeat {
        worker: u8,
        incarnation: u8,
        held: Vec<(Lease, Epoch)>,
        loads: Vec<Load>,
        usage: Vec<Usage>,
        cpu: f64,
        draining: bool,
    },
    Checkpoint {
        worker: u8,
        entries: Vec<(Lease, Epoch, i64)>,
    },
    ReleaseDone {
        worker: u8,
        lease: Lease,
        epoch: Epoch,
        offset: Option<i64>,
    },
    Deregister {
        worker: u8,
    },
    SetCheckpoint {
        lease: Lease,
        offset: i64,
        dry_run: bool,
    },
    Reset {
        stream: u8,
        latest: bool,
        dry_run: bool,
    },
    Import {
        entries: Vec<(Lease, i64)>,
        dry_run: bool,
    },
    Read {
        what: u8,
        since_ms: i64,
    },
    Advance {
        ms: u16,
    },
    Discover {
        stream: u8,
        count: u8,
    },
    SetSlots {
        count: u8,
    },
    Restart,
    Raw {
        rpc: u8,
        bytes: Vec<u8>,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    strategy: u8,
    ops: Vec<Op>,
}

fn worker(w: u8) -> String {
    // Three workers, and now and then an empty id (refused by the API).
    match w % 8 {
        7 => String::new(),
        n => format!("w{}", n % 3),
    }
}

fn held(h: &Harness, held: &[(Lease, Epoch)]) -> Vec<v1::HeldLease> {
    held.iter().map(|(l, e)| v1::HeldLease { lease: l.wire(), epoch: e.of(h, l) }).collect()
}

fn step(h: &mut Harness, op: Op) {
    let call = match op {
        Op::Register { worker: w, incarnation, handlers, capacity, concurrency, held: quoted } => {
            let handlers = HANDLERS.iter().enumerate().filter(|(i, _)| handlers & (1 << i) != 0);
            Call::Register(v1::RegisterRequest {
                worker_id: worker(w),
                address: "127.0.0.1:1".into(),
                handlers: handlers.map(|(_, name)| (*name).to_owned()).collect(),
                capacity: u32::from(capacity % 8),
                held: held(h, &quoted),
                incarnation: u64::from(incarnation % 3),
                concurrency: u32::from(concurrency % 5),
            })
        }
        Op::Heartbeat { worker: w, incarnation, held: quoted, loads, usage, cpu, draining } => {
            let leases = loads
                .iter()
                .map(|l| v1::LeaseLoad {
                    lease: l.lease.wire(),
                    epoch: 0,
                    position: l.position,
                    lag: l.lag,
                    records_in_per_s: l.records_in_per_s,
                    records_out_per_s: l.records_in_per_s,
                    busy_ratio: l.busy_ratio,
                })
                .collect();
            let usage = usage
                .iter()
                .map(|u| v1::MappingUsage {
                    mapping: ["orders", "clicks", "emails", "unknown"][usize::from(u.mapping % 4)].into(),
                    handler: HANDLERS[usize::from(u.mapping % 2)].into(),
                    batches: u.batches,
                    records: u.records,
                    handler_ms: u.handler_ms,
                    billed_units: u.billed_units,
                })
                .collect();
            Call::Heartbeat(v1::HeartbeatRequest {
                worker_id: worker(w),
                held: held(h, &quoted),
                load: Some(v1::LoadReport { leases, cpu, inflight_batches: 1, usage }),
                unhealthy: Vec::new(),
                incarnation: u64::from(incarnation % 3),
                draining,
            })
        }
        Op::Checkpoint { worker: w, entries } => Call::Checkpoint(v1::CheckpointRequest {
            worker_id: worker(w),
            entries: entries
                .iter()
                .map(|(l, e, offset)| v1::CheckpointEntry {
                    lease: l.wire(),
                    epoch: e.of(h, l),
                    offset: *offset,
                    window: window(*offset),
                })
                .collect(),
        }),
        Op::ReleaseDone { worker: w, lease, epoch, offset } => Call::ReleaseDone(v1::ReleaseDoneRequest {
            worker_id: worker(w),
            lease: lease.wire(),
            epoch: epoch.of(h, &lease),
            offset,
            window: offset.and_then(window),
        }),
        Op::Deregister { worker: w } => Call::Deregister(v1::DeregisterRequest { worker_id: worker(w) }),
        Op::SetCheckpoint { lease, offset, dry_run } => Call::SetCheckpoint(v1::SetCheckpointRequest {
            lease: lease.wire(),
            target: Some(v1::Target { to: Some(v1::target::To::Offset(offset)) }),
            dry_run,
        }),
        Op::Reset { stream, latest, dry_run } => {
            let to = if latest { v1::target::To::Latest(true) } else { v1::target::To::Earliest(true) };
            Call::ResetCheckpoints(v1::ResetCheckpointsRequest {
                stream: ["", "orders", "clicks", "unknown"][usize::from(stream % 4)].into(),
                target: Some(v1::Target { to: Some(to) }),
                dry_run,
            })
        }
        Op::Import { entries, dry_run } => Call::ImportCheckpoints(v1::ImportCheckpointsRequest {
            checkpoints: entries
                .iter()
                .map(|(l, offset)| v1::ExportedCheckpoint {
                    lease: l.wire(),
                    checkpoint: *offset,
                    epoch: 0,
                    window: window(*offset),
                })
                .collect(),
            dry_run,
        }),
        Op::Read { what, since_ms } => match what % 4 {
            0 => Call::ListWorkers(v1::ListWorkersRequest {}),
            1 => Call::ListLeases(v1::ListLeasesRequest { name: String::new() }),
            2 => Call::ExportCheckpoints(v1::ExportCheckpointsRequest {}),
            _ => Call::Usage(v1::UsageRequest { since_ms }),
        },
        Op::Advance { ms } => return h.advance(u64::from(ms)),
        Op::Discover { stream, count } => return h.discover(stream, u32::from(count % 10)),
        Op::SetSlots { count } => return h.set_slots(u32::from(count % 8)),
        Op::Restart => return h.restart(),
        Op::Raw { rpc, bytes } => match Call::decode(rpc, &bytes) {
            Some(call) => call,
            None => return,
        },
    };
    h.call(call);
}

fuzz_target!(|input: Input| {
    let mut h = Harness::new(input.strategy);
    for op in input.ops {
        step(&mut h, op);
    }
});

/// A tumbling window derived from a checkpoint's offset, for a third of the
/// checkpoints (the rest are of mappings without windows): open or closed,
/// with a state that changes with the offset.
fn window(offset: i64) -> Option<v1::WindowState> {
    (offset.rem_euclid(3) == 0).then(|| {
        let start_ms = offset.div_euclid(10).saturating_mul(60_000);
        v1::WindowState {
            start_ms,
            end_ms: start_ms.saturating_add(60_000),
            state: Some(offset.to_le_bytes().to_vec()),
            closed: offset.rem_euclid(2) == 0,
        }
    })
}
