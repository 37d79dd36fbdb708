//! Fleet mode (README "Fleet mode"): grants written once into etcd by
//! brokers and applied by every host they address, each against its own
//! policy. `layout`: keys and values (shared with the broker CLI);
//! `config`: `[fleet]`; `client`: the etcd connection; `link`: the link's
//! state for status, metrics and audit; `sync`: the agent's snapshot and
//! watch loop; `broker`: what `jit-gate fleet` writes and reads; `retry`:
//! the broker's calls retried across elections.

pub mod broker;
mod client;
mod config;
pub mod layout;
mod link;
pub mod retry;
mod sync;

pub use client::{EtcdOptions, FleetClientError};
pub use config::{FleetConfig, FleetTls};
pub use sync::spawn;
