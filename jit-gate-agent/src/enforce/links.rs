//! The network interfaces of the agent's namespace as rtnetlink reports
//! them (index, name, kind, link layer, which XDP program runs on each),
//! the removal of an XDP program that is not the gate's, and a watcher
//! that reports every change to the set of interfaces as it happens.

use std::io;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{
        InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage, LinkXdp,
        XdpAttached,
    },
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use crate::flows::{FlowsError, Operation, netlink};

/// `XDP_FLAGS_SKB_MODE` and `XDP_FLAGS_DRV_MODE` (`linux/if_link.h`).
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// The rtnetlink multicast group of link changes (`RTMGRP_LINK`).
const RTMGRP_LINK: u32 = 1;

/// Where an XDP program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpSlot {
    /// In the driver (native).
    Driver,
    /// In the generic receive path (SKB mode).
    Generic,
}

/// The XDP programs the kernel runs on an interface, by id (0: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpPrograms {
    pub driver: u32,
    pub generic: u32,
    /// Offloaded to the NIC; never the gate's.
    pub hardware: u32,
}

impl XdpPrograms {
    /// Where program `id` runs, if it does.
    pub fn slot_of(&self, id: u32) -> Option<XdpSlot> {
        if id == 0 {
            None
        } else if self.driver == id {
            Some(XdpSlot::Driver)
        } else if self.generic == id {
            Some(XdpSlot::Generic)
        } else {
            None
        }
    }

    /// Programs other than `ours`, with their slots.
    pub fn foreign(&self, ours: u32) -> Vec<(XdpSlot, u32)> {
        [
            (XdpSlot::Driver, self.driver),
            (XdpSlot::Generic, self.generic),
        ]
        .into_iter()
        .filter(|&(_, id)| id != 0 && id != ours)
        .collect()
    }
}

/// One interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The driver kind (`veth`, `vxlan`, `bridge`, …), if it has one.
    pub kind: Option<String>,
    /// Whether its frames start with an Ethernet header (what the gate's
    /// XDP program parses).
    pub ethernet: bool,
    pub loopback: bool,
    pub xdp: XdpPrograms,
}

/// Every interface of the calling thread's network namespace.
pub fn list() -> Result<Vec<Link>, FlowsError> {
    let request = RouteNetlinkMessage::GetLink(LinkMessage::default());
    let replies = netlink::dump(NETLINK_ROUTE, Operation::ListLinks, request)?;
    Ok(replies
        .into_iter()
        .filter_map(|reply| match reply {
            RouteNetlinkMessage::NewLink(message) => Some(parse(&message)),
            _ => None,
        })
        .collect())
}

fn parse(message: &LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        kind: None,
        ethernet: message.header.link_layer_type == LinkLayerType::Ether,
        loopback: message.header.flags.contains(LinkFlags::Loopback),
        xdp: XdpPrograms::default(),
    };
    let mut attached = XdpAttached::None;
    let mut single = 0;
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.iter().find_map(|info| match info {
                    LinkInfo::Kind(kind) => Some(kind_name(kind)),
                    _ => None,
                });
            }
            LinkAttribute::Xdp(xdp) => {
                for item in xdp {
                    match *item {
                        LinkXdp::Attached(mode) => attached = mode,
                        LinkXdp::ProgId(id) => single = id,
                        LinkXdp::DrvProgId(id) => link.xdp.driver = id,
                        LinkXdp::SkbProgId(id) => link.xdp.generic = id,
                        LinkXdp::HwProgId(id) => link.xdp.hardware = id,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    // With one program the kernel names only its mode and id.
    match attached {
        XdpAttached::Driver => link.xdp.driver = single,
        XdpAttached::SocketBuffer => link.xdp.generic = single,
        XdpAttached::Hardware => link.xdp.hardware = single,
        _ => {}
    }
    link
}

fn kind_name(kind: &InfoKind) -> String {
    kind.to_string()
}

/// Removes the XDP program attached (without a link) in `slot` of
/// interface `index`. The kernel refuses to remove a program attached
/// through a `bpf_link`, such as the gate's.
pub fn detach_foreign(index: u32, slot: XdpSlot) -> Result<(), FlowsError> {
    let mut message = LinkMessage::default();
    message.header.index = index;
    let flags = match slot {
        XdpSlot::Driver => XDP_FLAGS_DRV_MODE,
        XdpSlot::Generic => XDP_FLAGS_SKB_MODE,
    };
    message.attributes.push(LinkAttribute::Xdp(vec![
        LinkXdp::Fd(-1),
        LinkXdp::Flags(flags),
    ]));
    netlink::acknowledge(
        NETLINK_ROUTE,
        Operation::DetachXdp { ifindex: index },
        RouteNetlinkMessage::SetLink(message),
    )
    .map(|_| ())
}

/// Calls `changed` after every change the kernel announces to an interface
/// of the calling thread's namespace (created, removed, renamed, moved in
/// or out, state or XDP program changed), until it returns false. Runs on
/// the calling thread; a socket error ends it.
pub fn watch(mut changed: impl FnMut() -> bool) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
    loop {
        let (datagram, from) = socket.recv_from_full()?;
        // Only the kernel speaks for the group.
        if from.port_number() != 0 {
            continue;
        }
        let announces_a_link = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram)
            .map_or(true, |m| {
                matches!(
                    m.payload,
                    NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_)
                    )
                )
            });
        if announces_a_link && !changed() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_programs_are_those_not_ours() {
        let xdp = XdpPrograms {
            driver: 7,
            generic: 9,
            hardware: 0,
        };
        assert_eq!(xdp.slot_of(7), Some(XdpSlot::Driver));
        assert_eq!(xdp.slot_of(9), Some(XdpSlot::Generic));
        assert_eq!(xdp.slot_of(0), None);
        assert_eq!(xdp.foreign(7), vec![(XdpSlot::Generic, 9)]);
        assert_eq!(XdpPrograms::default().foreign(7), vec![]);
    }

    #[test]
    fn loopback_is_listed_as_such() {
        // Every namespace has `lo`; this one is the test runner's.
        let links = list().expect("list links");
        let lo = links.iter().find(|l| l.name == "lo").expect("lo is listed");
        assert!(lo.loopback && !lo.ethernet, "{lo:?}");
        assert!(lo.index > 0);
    }
}
