//! `fanout --config worker.toml`: a shardline worker hosting the `audit`
//! and `notify` handlers, one per subscription of the same topic (the
//! stock worker's command line, logging, metrics, signals and exit codes
//! through `shardline_worker::main`).

use shardline_example_fanout::{Audit, Notify};
use shardline_worker::Handlers;

fn main() -> std::process::ExitCode {
    shardline_worker::main(Handlers::new().with::<Audit>("audit").with::<Notify>("notify"))
}
