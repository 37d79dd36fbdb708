//! The gRPC contract (proto/jit_gate.proto, package `jitgate.v1`) compiled by
//! build.rs: messages, the `JitGate` client and the server trait.

// Generated code follows prost's and tonic's style, not this crate's.
#![allow(clippy::all, clippy::pedantic)]

tonic::include_proto!("jitgate.v1");

/// Descriptors of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("jit_gate_descriptor");
