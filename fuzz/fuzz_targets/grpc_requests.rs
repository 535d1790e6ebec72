//! Arbitrary bytes as a sequence of gRPC requests to the coordinator: each
//! frame is an RPC number, a length and that many bytes, decoded as that
//! RPC's request message (prost), converted by the API and applied to the
//! core; the harness checks the lease table's invariants after each.
//! Frames of two more kinds let time pass and restart the coordinator.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardline_fuzz::{Call, Harness};

fuzz_target!(|data: &[u8]| {
    let Some((&strategy, mut rest)) = data.split_first() else { return };
    let mut h = Harness::new(strategy);
    while let [rpc, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (bytes, next) = tail.split_at(len);
        rest = next;
        match rpc % (Call::KINDS + 2) {
            k if k == Call::KINDS => h.advance(u64::from(u16::from_be_bytes([*hi, *lo]))),
            k if k == Call::KINDS + 1 => h.restart(),
            k => {
                if let Some(call) = Call::decode(k, bytes) {
                    h.call(call);
                }
            }
        }
    }
});
