//! `shardline-worker --config FILE`: a worker node hosting the built-in
//! handlers, through [`shardline_worker::main`] (what a user's own worker
//! binary calls too). A bad config exits 2 naming the field; the first
//! SIGTERM/SIGINT drains, a second exits at once.

fn main() -> std::process::ExitCode {
    shardline_worker::main(shardline_worker::builtin::handlers())
}
