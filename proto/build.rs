//! Compiles `proto/shardline.proto` with protox (pure Rust), so building
//! shardline never needs a `protoc` binary on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/shardline.proto");
    let fds = protox::compile(["shardline.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
