//! The part of the `shardline` CLI other crates may use: the checkpoint
//! export file format (read by the fuzz target in `fuzz/` as the CLI reads
//! it). The commands themselves are the binary's (`main.rs`).

pub mod export;
