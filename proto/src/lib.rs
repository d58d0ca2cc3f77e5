//! The reflex.v1 wire contract: generated messages, clients and servers for
//! `reflex.v1.Policy` and `reflex.v1.Recorder`, plus the encoded file
//! descriptor set that server reflection serves (grpcurl needs no .proto).
//!
//! The `.proto` under `proto/reflex/v1/` is the single source of the wire schema.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("reflex.v1");
}

/// Encoded `FileDescriptorSet` of `reflex/v1/reflex.proto`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/reflex_descriptor.bin"));

pub use v1::*;
