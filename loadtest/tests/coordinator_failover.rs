//! The coordinator failover load test (issue 14): the shipped
//! `coordinator-failover-ci` scenario through the built binary, against
//! the real brokers and the local PostgreSQL (127.0.0.1:5432, or
//! `SHARDLINE_TEST_POSTGRES`): three coordinators on one fresh schema,
//! the leader killed -9 under load. Asserted from the `--json` report:
//! nothing lost, no lease moved, and a standby took over within the
//! session timeout (before any worker fences itself).

mod common;

/// The scenario's `session_timeout`.
const SESSION_TIMEOUT_MS: u64 = 3000;

#[test]
fn killing_the_leader_moves_no_lease_and_loses_nothing() -> Result<(), Box<dyn std::error::Error>> {
    let run = common::run("coordinator-failover-ci")?;
    common::assert_nothing_lost(&run)?;
    assert_eq!(run.count("lease_moves")?, 0, "a lease moved:\n{}", run.output);
    let kill = common::assert_fault_ran(&run, 0);
    assert!(kill["fault"].as_str().is_some_and(|f| f.starts_with("kill_leader")), "{kill}");
    let takeover =
        kill["takeover_ms"].as_u64().ok_or_else(|| format!("no takeover_ms: {kill}\n{}", run.output))?;
    assert!(
        takeover < SESSION_TIMEOUT_MS,
        "a standby led only {takeover} ms after the kill:\n{}",
        run.output
    );
    assert!(kill["recovery_ms"].is_u64(), "checkpoints never moved again: {kill}\n{}", run.output);
    assert!(run.passed, "a threshold broke:\n{}", run.output);
    Ok(())
}
