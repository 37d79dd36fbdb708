//! jit-gate agent library: enforcement of grants in the kernel (XDP and
//! nftables) and the control plane that drives it.

// Dependencies of the binaries alone (the daemon's allocator and its options, logging and
// service notification, the CLI's arguments, tables, connections and
// request ids):
// a package has one dependency list for its library and binaries.
use {
    comfy_table as _, csv as _, futures_util as _, hyper_util as _, libmimalloc_sys as _,
    mimalloc as _, rand as _, sd_notify as _, tower as _, tracing_subscriber as _,
};

pub mod api;
pub mod approvals;
pub mod audit;
pub mod auth;
pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod digest_hex;
pub mod docs;
pub mod enforce;
pub mod engine;
pub mod fleet;
pub mod flows;
pub mod grants;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod proto;
pub mod refusal;
pub mod reload;
pub mod request;
pub mod startup;
pub mod store;
pub mod time;
pub mod tls;
pub mod validate;
pub mod wire;
