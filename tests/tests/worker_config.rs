//! The worker binary refuses bad config before it joins anything: exit 2,
//! one line naming the field (or handler setting) and what is allowed.

use anyhow::{Result, ensure};
use shardline_tests::bin;

fn run_with(config: &str) -> Result<(Option<i32>, String)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("worker.toml");
    std::fs::write(&path, config)?;
    let out = std::process::Command::new(bin("shardline-worker")).arg("--config").arg(&path).output()?;
    Ok((out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

#[test]
fn bad_worker_configs_exit_2_naming_the_problem() -> Result<()> {
    let cases = [
        (
            "coordinator = \"127.0.0.1:7400\"\n[handlers.log]\n",
            "`coordinator` is `127.0.0.1:7400`, whose entry `127.0.0.1:7400` is not an http:// or https:// URL; \
             allowed: a comma-separated list of distinct http:// or https:// URLs, at least one",
        ),
        (
            "coordinator = \"http://c1:7400, ftp://c2:7400\"\n[handlers.log]\n",
            "whose entry `ftp://c2:7400` is not an http:// or https:// URL",
        ),
        (
            "coordinator = \"http://c1:7400,http://c1:7400/\"\n[handlers.log]\n",
            "whose entry `http://c1:7400/` is listed twice",
        ),
        ("fetch_queue_kib = 1\n[handlers.log]\n", "`fetch_queue_kib` is 1; allowed: 64 to 1048576"),
        (
            "[handlers.nope]\n",
            "`handlers.nope` is not a handler of this worker; allowed: chaos, count, echo, forward, log, noop, sleep",
        ),
        (
            "[handlers.forward]\n",
            "init of handler `forward` failed: set exactly one of `topic` (Kafka) or `exchange` (RabbitMQ)",
        ),
        ("[handlers.sleep]\nper_record = \"soon\"\n", "`per_record` = \"soon\" is not a duration"),
        ("[handlers.log]\nverbose = true\n", "unknown setting `verbose`"),
        ("drain = \"1s\"\n[handlers.log]\n", "unknown field `drain`"),
    ];
    for (config, expected) in cases {
        let (code, stderr) = run_with(config)?;
        ensure!(code == Some(2), "exit {code:?} for {config:?}: {stderr}");
        ensure!(stderr.contains(expected), "for {config:?} expected {expected:?} in: {stderr}");
    }
    Ok(())
}
