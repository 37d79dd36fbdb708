//! The gRPC contract (proto/jit_gate.proto, package `jitgate.v1`) compiled by
//! build.rs: messages, the `JitGate` client and the server trait.

#![allow(
    clippy::all,
    clippy::pedantic,
    unreachable_pub,
    unused_qualifications,
    elided_lifetimes_in_paths,
    reason = "generated code follows prost's and tonic's style, not this crate's"
)]

tonic::include_proto!("jitgate.v1");

/// Descriptors of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("jit_gate_descriptor");
