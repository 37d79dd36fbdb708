//! A gated host for live tests: the topology, a gate of its own pinned under
//! a unique bpffs directory, attached to the gated end of the veth pair.

use std::{collections::BTreeSet, time::Duration};

use ipnet::IpNet;
use jit_gate_agent::{
    clock::boot_now_ns,
    enforce::xdp::{Attachment, XdpGate},
    net::{GrantTarget, Protocol},
};

use crate::{env::PinDir, netns::Topology};

pub struct GatedHost {
    // Field order is drop order: the gate's handles, then the pins (which
    // detaches the program), then the namespaces.
    pub gate: XdpGate,
    pub pins: PinDir,
    pub topo: Topology,
    pub attachment: Attachment,
}

impl GatedHost {
    pub fn new(protected: &[(Protocol, u16)]) -> Self {
        let topo = Topology::new();
        let pins = PinDir::new();
        let mut gate = pins.open_gate();
        let ports: BTreeSet<_> = protected.iter().copied().collect();
        gate.set_protected_ports(&ports)
            .expect("set protected ports");
        let ifname = topo.gated_if.clone();
        let attachment = topo
            .gated
            .run(|| gate.attach(&ifname))
            .unwrap_or_else(|e| panic!("attach to {ifname}: {e}"));
        GatedHost {
            gate,
            pins,
            topo,
            attachment,
        }
    }

    /// Grants `source` access to (protocol, port) for `ttl` from now.
    pub fn grant(&mut self, source: IpNet, protocol: Protocol, port: u16, ttl: Duration, id: u64) {
        let target = GrantTarget {
            source,
            protocol,
            port,
        };
        let expires = boot_now_ns() + ttl.as_nanos() as u64;
        self.gate
            .upsert_grant(&target, expires, id)
            .unwrap_or_else(|e| panic!("grant {target}: {e}"));
    }
}
