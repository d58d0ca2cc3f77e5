//! ONNX graphs as protobuf (`tract_onnx::pb`), below every engine: [`builder`] writes them
//! (our exports and fixtures), [`rewrite`] prepares a graph someone else exported for tract
//! (patterns torch.onnx emits that tract 0.23 cannot analyse or run, replaced by exact
//! equivalents before the graph reaches tract).

pub mod builder;
pub mod rewrite;
