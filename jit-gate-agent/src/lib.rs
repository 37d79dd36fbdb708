//! jit-gate agent library: enforcement of grants in the kernel (XDP and
//! nftables) and the control plane that drives it.

pub mod clock;
pub mod enforce;
pub mod flows;
pub mod net;
