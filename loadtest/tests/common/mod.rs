//! What the CI load tests share: run a shipped scenario through the built
//! binary and read its `--json` report.

use std::process::Command;
use std::sync::Mutex;

/// One scenario at a time per test binary: the tests of one file run on
/// parallel threads, and two loads at once on a small CI machine would
/// measure each other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A finished run: its report and what it printed (for failure messages).
pub struct Run {
    pub report: serde_json::Value,
    pub output: String,
    pub passed: bool,
}

impl Run {
    /// A count from the report's top level.
    pub fn count(&self, key: &str) -> Result<u64, String> {
        self.report[key].as_u64().ok_or_else(|| format!("no `{key}` in the report: {}", self.report))
    }
}

/// Runs `scenarios/NAME.toml` and returns its report, whatever the
/// verdict (the caller asserts what it is about, so a failure names it).
pub fn run(name: &str) -> Result<Run, Box<dyn std::error::Error>> {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let scenario = format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir()?;
    let json = dir.path().join(format!("{name}.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_shardline-loadtest"))
        .args(["run", &scenario, "--json"])
        .arg(&json)
        .output()?;
    let output = format!(
        "{name} ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json).map_err(|e| format!("no report ({e}); {output}"))?;
    let report = serde_json::from_str(&text)?;
    Ok(Run { report, output, passed: out.status.success() })
}

/// Nothing acknowledged was lost and every record was processed, over
/// the whole run and (a run with several targets) on each target.
pub fn assert_nothing_lost(run: &Run) -> Result<(), Box<dyn std::error::Error>> {
    assert_figures_clean(&run.report, run)?;
    for target in run.report["targets"].as_array().into_iter().flatten() {
        assert_figures_clean(target, run)?;
    }
    Ok(())
}

fn assert_figures_clean(figures: &serde_json::Value, run: &Run) -> Result<(), Box<dyn std::error::Error>> {
    let count = |key: &str| figures[key].as_u64().ok_or_else(|| format!("no `{key}` in {figures}"));
    let (produced, expected, processed, lost) =
        (count("produced")?, count("expected")?, count("processed")?, count("lost")?);
    let which = figures["target"].as_str().unwrap_or("the run");
    assert!(produced > 0, "{which}: nothing produced:\n{}", run.output);
    assert_eq!(lost, 0, "{which}: lost records:\n{}", run.output);
    // `processed` counts each (destination, record) once, however often
    // it ran; `expected` is produced × destinations.
    assert!(processed >= expected, "{which}: processed {processed} < expected {expected}:\n{}", run.output);
    Ok(())
}

/// Fault `index` ran without error.
pub fn assert_fault_ran(run: &Run, index: usize) -> &serde_json::Value {
    let fault = &run.report["recoveries"][index];
    assert!(fault.is_object(), "no fault {index} in the report:\n{}", run.output);
    assert!(fault["error"].is_null(), "the fault failed: {fault}\n{}", run.output);
    fault
}
