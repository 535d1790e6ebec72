//! The CI load test: `shardline-loadtest run scenarios/ci-short.toml`
//! through the built binary, against the real brokers and the real
//! coordinator and worker binaries (built next to it: `cargo build
//! --workspace --bins`, as `scripts/test.sh` does), asserting from its
//! `--json` report that nothing acknowledged was lost.

use std::process::Command;

#[test]
fn ci_short_loses_nothing() -> Result<(), Box<dyn std::error::Error>> {
    let scenario = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/ci-short.toml");
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("ci-short.json");
    let output = Command::new(env!("CARGO_BIN_EXE_shardline-loadtest"))
        .args(["run", scenario, "--json"])
        .arg(&json)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ci-short failed ({}):\n{stdout}\n{stderr}", output.status);

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let count = |key: &str| report[key].as_u64().ok_or_else(|| format!("no `{key}` in the report: {report}"));
    let (produced, processed, lost) = (count("produced")?, count("processed")?, count("lost")?);
    assert!(produced > 0, "nothing produced:\n{stdout}");
    assert_eq!(lost, 0, "lost records:\n{stdout}");
    assert_eq!(processed, produced, "processed != produced:\n{stdout}");
    // The kill -9 happened and its partitions came back.
    let recovery = &report["recoveries"][0];
    assert!(recovery["error"].is_null(), "the fault failed: {recovery}");
    assert!(recovery["recovery_s"].is_number(), "no recovery: {recovery}");
    Ok(())
}
