//! `shardline-loadtest bench function`, briefly, through the built binary
//! against the real Kafka broker and the real coordinator and worker
//! binaries (built next to it: `cargo build --workspace --bins`, as
//! `scripts/test.sh` does), with the Python runtime client
//! `scripts/functions.sh install` puts in place. Only correctness is
//! asserted (every record through both sides, the report's figures
//! there): the speed depends on the machine.

use std::path::PathBuf;
use std::process::Command;

const RECORDS: u64 = 2000;

/// The interpreter the bench uses by default (see `--python`).
fn python() -> PathBuf {
    let dir = std::env::var_os("SHARDLINE_FUNCTIONS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/shardline/functions")
    });
    dir.join("venv/bin/python")
}

#[test]
fn every_record_goes_through_both_sides() -> Result<(), Box<dyn std::error::Error>> {
    let python = python();
    let imports = Command::new(&python).args(["-c", "import awslambdaric"]).output();
    assert!(
        imports.as_ref().is_ok_and(|o| o.status.success()),
        "the Python runtime client is not installed at {} ({imports:?}): run scripts/functions.sh install",
        python.display()
    );

    let dir = tempfile::tempdir()?;
    let json = dir.path().join("function.json");
    let out = Command::new(env!("CARGO_BIN_EXE_shardline-loadtest"))
        .args(["bench", "function", "--records", &RECORDS.to_string(), "--partitions", "2"])
        .args(["--batch-size", "100", "--stall-timeout", "20", "--json"])
        .arg(&json)
        .output()?;
    let output = format!(
        "bench function ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{output}");
    let text = std::fs::read_to_string(&json).map_err(|e| format!("no report ({e}); {output}"))?;
    let report: serde_json::Value = serde_json::from_str(&text)?;

    // The run ends only once the checkpoints cover every record, on each
    // side; the worker's own count says each was handled.
    for side in ["noop", "function"] {
        let handled = report[side]["worker_metrics"]["records"].as_f64();
        assert!(handled.is_some_and(|n| n >= RECORDS as f64), "{side} handled {handled:?}:\n{output}");
        assert!(report[side]["mean_handler_us"].as_f64().is_some_and(|us| us > 0.0), "{side}:\n{output}");
    }
    let invocations = report["invocations"].as_u64().unwrap_or(0);
    assert!(invocations >= RECORDS / 100, "{invocations} invocations for {RECORDS} records:\n{output}");
    for key in ["ratio", "overhead_us", "target_overhead_us"] {
        assert!(report[key].is_number(), "no `{key}` in the report:\n{output}");
    }
    assert!(report["overhead_met"].is_boolean(), "no verdict at batch_size 100:\n{output}");
    // The split is there, or the reason it is not.
    let split =
        report["python_cpu_us_per_invocation"].is_number() && report["rest_us_per_invocation"].is_number();
    assert!(split || report["split_left_out"].is_string(), "neither split nor reason:\n{output}");
    Ok(())
}
