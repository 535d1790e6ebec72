//! The CI autoscaling run: `shardline-loadtest run
//! scenarios/autoscale-ci.toml` through the built binary, against the real
//! brokers and the real coordinator and worker binaries. The harness
//! follows the coordinator's `shardline_desired_workers` with real
//! workers through a x10 spike; from its `--json` report this asserts
//! that the fleet grew for the spike, shrank again after it, and lost
//! nothing. No timing is asserted: a slow machine may scale late, not
//! wrongly.

// Shared by every load test binary; the fault helpers are not this one's.
#[allow(dead_code)]
mod common;

#[test]
fn autoscale_ci_grows_for_the_spike_shrinks_after_it_and_loses_nothing()
-> Result<(), Box<dyn std::error::Error>> {
    let run = common::run("autoscale-ci")?;
    common::assert_nothing_lost(&run)?;
    assert_eq!(run.count("processed")?, run.count("produced")?, "processed != produced:\n{}", run.output);
    let scaled = &run.report["autoscale"];
    let count = |key: &str| {
        scaled[key].as_u64().ok_or_else(|| format!("no `autoscale.{key}` in the report:\n{}", run.output))
    };
    let (start, peak, last) = (count("start_workers")?, count("peak_workers")?, count("final_workers")?);
    println!(
        "autoscale-ci: workers {start} -> peak {peak} -> {last} at the end; absorbed_s {}",
        run.report["absorbed_s"]
    );
    assert!(peak > start, "the fleet never grew past its {start} worker(s):\n{}", run.output);
    assert!(last < peak, "the fleet never shrank after its peak of {peak}:\n{}", run.output);
    let events = scaled["events"].as_array().map_or(0, Vec::len);
    assert!(events >= 2, "{events} scaling events:\n{}", run.output);
    assert!(
        scaled["events"].as_array().into_iter().flatten().all(|e| e["error"].is_null()),
        "a scaling step failed:\n{}",
        run.output
    );
    assert!(run.passed, "autoscale-ci failed:\n{}", run.output);
    Ok(())
}
