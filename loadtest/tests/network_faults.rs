//! The network-fault load tests (issue 12): the shipped `partition`,
//! `lost-replies` and `soak-ci` scenarios through the built binary against
//! the real brokers, asserted from the `--json` report.
//!
//! `partition` cuts a worker off from the coordinator for 20 s, far past
//! its 3 s session: a worker that does not fence itself keeps running
//! handlers for leases the coordinator has given away, which the report
//! counts as `zombie_invocations`. The assertion is the safety rule
//! itself (none), so this test fails until the worker fences.

mod common;

#[test]
fn partition_runs_no_handler_after_the_session_ends_and_loses_nothing()
-> Result<(), Box<dyn std::error::Error>> {
    let run = common::run("partition")?;
    common::assert_nothing_lost(&run)?;
    let cut = common::assert_fault_ran(&run, 0);
    assert!(cut["fault"].as_str().is_some_and(|f| f.starts_with("cut_worker")), "{cut}");
    assert!(cut["recovery_s"].is_number(), "the cut worker's partitions never moved: {cut}\n{}", run.output);
    let zombies = run.count("zombie_invocations")?;
    assert_eq!(zombies, 0, "a cut-off worker ran handlers after its session ended:\n{}", run.output);
    assert!(run.passed, "a threshold broke:\n{}", run.output);
    Ok(())
}

#[test]
fn lost_replies_lose_nothing() -> Result<(), Box<dyn std::error::Error>> {
    let run = common::run("lost-replies")?;
    common::assert_nothing_lost(&run)?;
    let fault = common::assert_fault_ran(&run, 0);
    assert!(fault["fault"].as_str().is_some_and(|f| f.starts_with("drop_replies")), "{fault}");
    assert!(run.passed, "a threshold broke:\n{}", run.output);
    Ok(())
}

/// A minute of seeded random faults of every kind on a Kafka stream and
/// a RabbitMQ subscription at once: whatever was drawn, nothing
/// acknowledged may be lost on either target and every fault must have
/// run. (Its zombie and stall figures are in the report; the partition
/// test holds the zombie rule.)
#[test]
fn soak_ci_loses_nothing() -> Result<(), Box<dyn std::error::Error>> {
    let run = common::run("soak-ci")?;
    // Over the run and on each target.
    common::assert_nothing_lost(&run)?;
    assert_eq!(run.report["target"], "both", "{}", run.output);
    let targets = run.report["targets"].as_array().cloned().unwrap_or_default();
    let kinds: Vec<&str> = targets.iter().filter_map(|t| t["target"].as_str()).collect();
    assert_eq!(kinds, ["kafka", "rabbitmq"], "{}", run.output);
    let faults = run.report["recoveries"].as_array().map_or(0, Vec::len);
    assert!(faults >= 4, "the soak drew {faults} faults:\n{}", run.output);
    for i in 0..faults {
        common::assert_fault_ran(&run, i);
    }
    Ok(())
}
