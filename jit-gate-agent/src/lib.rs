//! jit-gate agent library: enforcement of grants in the kernel (XDP and
//! nftables) and the control plane that drives it.

pub mod api;
pub mod audit;
pub mod auth;
pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod enforce;
pub mod engine;
pub mod flows;
pub mod grants;
pub mod net;
pub mod policy;
pub mod proto;
pub mod refusal;
pub mod request;
pub mod startup;
pub mod store;
pub mod time;
pub mod validate;
pub mod wire;
