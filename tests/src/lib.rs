//! Helpers for the kernel and end-to-end tests: environment checks that fail
//! loudly, unique bpffs pin directories and network namespaces that clean up
//! on drop.
// Dependencies of the package's binaries (benchmarks, installer) alone.
use {anyhow as _, clap as _, serde as _, tokio_stream as _, tonic_health as _};
// And of the integration tests alone (dev-dependencies).
#[cfg(test)]
use {aya_obj as _, h2 as _, prost as _, tonic_reflection as _};

pub mod agent;
pub mod bar_chart;
pub mod cases;
pub mod checksum;
pub mod cli;
pub mod env;
pub mod etcd;
pub mod fake_clock;
pub mod fleet;
pub mod fragments;
pub mod frames;
pub mod gated_host;
pub mod interruption;
pub mod measure;
pub mod mutate;
pub mod netns;
pub mod packet_sender;
pub mod packets;
pub mod process;
pub mod receiver_stats;
pub mod scenario;
pub mod scrape;
pub mod spec;
pub mod ssh;
pub mod syn_probe;
pub mod systemd;
pub mod traffic;
