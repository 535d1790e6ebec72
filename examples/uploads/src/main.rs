//! `uploads --config worker.toml`: a shardline worker hosting the uploads
//! handler (`[handlers.uploads]`, see the library's docs for its
//! settings), with the stock worker's command line, logging, signals and
//! exit codes (`shardline_worker::main`).

use shardline_example_uploads::Uploads;
use shardline_worker::Handlers;

fn main() -> std::process::ExitCode {
    shardline_worker::main(Handlers::new().with::<Uploads>("uploads"))
}
