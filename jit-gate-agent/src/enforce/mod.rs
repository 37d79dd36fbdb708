//! Enforcers: the kernel-side layers that apply grants. They never decide
//! policy; they are told what to open and until when.

pub mod links;
pub mod nft;
pub mod xdp;
