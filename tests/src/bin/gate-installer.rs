//! Test fixture: installs the gate in a namespace (protects a TCP port and
//! grants one source for a while), prints "ready", then idles until killed.
//! The kill tests SIGKILL it to show enforcement does not depend on it.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, time::Duration};

use clap::Parser;
use jit_gate_agent::{
    clock::boot_now_ns,
    enforce::xdp::XdpGate,
    net::{GrantTarget, Protocol},
};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    pin_dir: PathBuf,
    #[arg(long)]
    netns: String,
    #[arg(long)]
    ifname: String,
    #[arg(long)]
    port: u16,
    #[arg(long)]
    grant_source: IpAddr,
    #[arg(long)]
    grant_ms: u64,
}

/// Upper bound on how long the fixture lives if nobody kills it.
const MAX_LIFETIME: Duration = Duration::from_mins(2);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    jit_gate_tests::netns::enter(&args.netns);
    let mut gate = XdpGate::open(&args.pin_dir)?;
    gate.set_protected_ports(&BTreeSet::from([(Protocol::Tcp, args.port)]))?;
    gate.attach(&args.ifname)?;
    let target = GrantTarget {
        source: args.grant_source.into(),
        protocol: Protocol::Tcp,
        port: args.port,
    };
    gate.upsert_grant(&target, boot_now_ns() + args.grant_ms * 1_000_000, 1)?;
    println!("ready");
    std::thread::sleep(MAX_LIFETIME);
    Ok(())
}
