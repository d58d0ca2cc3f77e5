//! Generates the reflex.v1 code with a pure-Rust protobuf compiler (protox), so
//! no machine needs protoc. The descriptor set is also written for reflection.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["reflex/v1/reflex.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("reflex_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Undecodable requests are INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::ReflexCodec")
        .compile_fds(fds)?;
    Ok(())
}
