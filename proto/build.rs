//! Generates the protocol's Rust types from `proto/**/*.proto` with prost, and
//! their canonical proto3 JSON mapping with pbjson. protoc comes from the
//! `protoc-bin-vendored` crate, so nothing is installed by hand.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/chat/v1/client.proto", "proto/chat/v1/internal.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // SAFETY of set_var: build scripts are single-threaded.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("descriptors.bin");
    prost_build::Config::new()
        .file_descriptor_set_path(&descriptors)
        .compile_protos(&protos, &["proto"])?;

    let set = std::fs::read(&descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&set)?
        .ignore_unknown_fields()
        .build(&[".chat"])?;
    Ok(())
}
