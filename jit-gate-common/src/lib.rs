//! Types shared by the XDP program and user space: map layouts, verdict
//! reasons, the layout version, and the packet verdict as a pure function.
//!
//! Everything here is `no_std` and allocation-free so the eBPF program can use
//! it; `aya::Pod` impls live behind the `user` feature.
#![no_std]

pub mod maps;
pub mod verdict;

/// Version of the kernel state's layout: the maps' definitions and the
/// meaning of their contents. Pins stamped with another version (or none)
/// are never reused: the agent rebuilds the state from its store. Raise it
/// with every change to a map, key, value or counter index.
pub const LAYOUT_VERSION: u32 = 5;

/// IP protocol numbers the gate understands.
pub mod ip_proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Address families as stored in keys and events.
pub mod family {
    pub const V4: u8 = 4;
    pub const V6: u8 = 6;
}
