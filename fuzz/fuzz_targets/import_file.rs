//! Arbitrary text as a checkpoint import file (`shardline import FILE`):
//! read as the CLI reads it, then applied to a coordinator's table as its
//! `ImportCheckpoints` is (all or nothing). A file that reads also writes
//! back (`shardline export`'s format) to the same entries.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shardline::export::{export, parse_export};
use shardline_fuzz::{Call, Harness};
use shardline_proto::v1;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(entries) = parse_export(text) else { return };
    let checkpoints: Vec<v1::ExportedCheckpoint> = entries
        .iter()
        .map(|(lease, offset, window)| v1::ExportedCheckpoint {
            lease: Some(lease.into()),
            checkpoint: *offset,
            epoch: 0,
            window: window.as_ref().map(v1::WindowState::from),
        })
        .collect();
    let written = match export(&checkpoints) {
        Ok(t) => t,
        Err(e) => panic!("entries read from a file do not write: {e}"),
    };
    assert_eq!(parse_export(&written), Ok(entries), "round trip through\n{written}");
    let mut h = Harness::new(0);
    h.call(Call::ImportCheckpoints(v1::ImportCheckpointsRequest {
        checkpoints: checkpoints.clone(),
        dry_run: true,
    }));
    h.call(Call::ImportCheckpoints(v1::ImportCheckpointsRequest { checkpoints, dry_run: false }));
});
