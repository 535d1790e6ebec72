//! The CI load test: `shardline-loadtest run scenarios/ci-short.toml`
//! through the built binary, against the real brokers and the real
//! coordinator and worker binaries (built next to it: `cargo build
//! --workspace --bins`, as `scripts/test.sh` does), asserting from its
//! `--json` report that nothing acknowledged was lost.

mod common;

#[test]
fn ci_short_loses_nothing() -> Result<(), Box<dyn std::error::Error>> {
    let run = common::run("ci-short")?;
    assert!(run.passed, "ci-short failed:\n{}", run.output);
    common::assert_nothing_lost(&run)?;
    let processed = run.count("processed")?;
    assert_eq!(processed, run.count("produced")?, "processed != produced:\n{}", run.output);
    // The kill -9 happened and its partitions came back.
    let recovery = common::assert_fault_ran(&run, 0);
    assert!(recovery["recovery_s"].is_number(), "no recovery: {recovery}");
    Ok(())
}
