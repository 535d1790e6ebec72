//! `materialized-view --config worker.toml`: a shardline worker hosting the
//! `materialized-view` handler (the stock worker's command line, logging,
//! metrics, signals and exit codes through `shardline_worker::main`).

use shardline_example_materialized_view::View;
use shardline_worker::Handlers;

fn main() -> std::process::ExitCode {
    shardline_worker::main(Handlers::new().with::<View>("materialized-view"))
}
