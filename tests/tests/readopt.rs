//! Re-adoption after a restart: opening the gate again on the same pins
//! reuses the maps (grants and flows intact) and replaces the program inside
//! the pinned link, so the interface is never without the gate. Pins of
//! another layout version, or whose maps are defined otherwise, are never
//! reused: the state is rebuilt, by the agent from its store.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{net::SocketAddr, path::Path, time::Duration};

use aya::maps::{Array, Map, MapData, MapInfo, MapType};
use jit_gate_agent::{
    config::Mode,
    enforce::xdp::{Attachment, GateOptions, XdpGate},
    net::Protocol,
    proto,
};
use jit_gate_common::{LAYOUT_VERSION, maps::names};
use jit_gate_tests::{
    agent::AgentHost,
    gated_host::GatedHost,
    netns::{CLIENT_V4, CLIENT_V4_OUTSIDE, GATED_V4},
    traffic::{TcpEcho, expect_access, round_trip, tcp_connect},
};

const SSH: u16 = 22;

#[test]
fn reopening_the_pins_keeps_grants_flows_and_enforcement() {
    let mut host = GatedHost::new(&[(Protocol::Tcp, SSH)]);
    let _server = TcpEcho::start(&host.topo.gated, SocketAddr::new(GATED_V4.into(), SSH));
    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    host.grant(
        std::net::IpAddr::from(CLIENT_V4).into(),
        Protocol::Tcp,
        SSH,
        Duration::from_mins(1),
        7,
    );
    let mut session =
        tcp_connect(&host.topo.client, CLIENT_V4.into(), ssh).expect_connected("granted");
    round_trip(&mut session, b"before").expect("echo before restart");
    let grants_before = host.gate.grants().expect("grants");
    let flows_before = host.gate.flows().expect("flows");

    // "Restart": a new process would open the same pins and attach again.
    let mut reopened = XdpGate::open(host.pins.path.clone()).expect("reopen from pins");
    let ifname = host.topo.gated_if.clone();
    let attachment = host
        .topo
        .gated
        .run(|| reopened.attach(&ifname))
        .expect("re-attach");
    assert_eq!(attachment, Attachment::Adopted);
    host.gate = reopened;

    assert_eq!(
        host.gate.grants().expect("grants"),
        grants_before,
        "grants survive"
    );
    assert_eq!(
        host.gate.flows().expect("flows"),
        flows_before,
        "flows survive"
    );
    assert_eq!(
        host.gate.protected().expect("ports"),
        [(Protocol::Tcp, SSH)].into()
    );
    assert_eq!(
        host.gate.attached_interfaces().expect("links"),
        vec![ifname]
    );
    round_trip(&mut session, b"after").expect("established session survives the restart");
    tcp_connect(&host.topo.client, CLIENT_V4.into(), ssh).expect_connected("grant still honoured");
    tcp_connect(&host.topo.client, CLIENT_V4_OUTSIDE.into(), ssh).expect_timed_out("still gated");
}

#[test]
fn remove_detaches_and_unpins_everything() {
    let host = GatedHost::new(&[(Protocol::Tcp, SSH)]);
    let _server = TcpEcho::start(&host.topo.gated, SocketAddr::new(GATED_V4.into(), SSH));
    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    tcp_connect(&host.topo.client, CLIENT_V4.into(), ssh).expect_timed_out("gated");
    let GatedHost {
        gate, pins, topo, ..
    } = host;
    drop(gate);
    XdpGate::remove(&pins.path).expect("remove the gate");
    assert!(!pins.path.exists(), "pin directory removed");
    tcp_connect(&topo.client, CLIENT_V4.into(), ssh).expect_connected("gate removed");
}

/// How pins made by something else than this program look.
#[derive(Clone, Copy, Debug)]
enum Stale {
    /// No layout stamp, as the pins of the first layout had.
    Unstamped,
    /// Stamped with the previous layout version.
    OlderVersion,
    /// This version, but a flow table of another size.
    OtherDefinition,
}

fn layout_pin(pin_dir: &Path) -> Array<MapData, u32> {
    MapData::from_pin(pin_dir.join(names::LAYOUT))
        .and_then(Map::from_map_data)
        .and_then(Array::try_from)
        .expect("the pinned layout stamp")
}

/// Reopens the gate of `host` on pins made stale as `stale`, while its
/// previous program stays attached; checks nothing of the stale state is
/// reused, and that the new program takes over the link.
fn reopen_on_stale_pins(stale: Stale) {
    let mut host = GatedHost::new(&[(Protocol::Tcp, SSH)]);
    let _server = TcpEcho::start(&host.topo.gated, SocketAddr::new(GATED_V4.into(), SSH));
    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    // State only the stale pins hold: a grant for the outside address.
    host.grant(
        std::net::IpAddr::from(CLIENT_V4_OUTSIDE).into(),
        Protocol::Tcp,
        SSH,
        Duration::from_mins(1),
        9,
    );
    let mut options = GateOptions::default();
    match stale {
        Stale::Unstamped => std::fs::remove_file(host.pins.path.join(names::LAYOUT))
            .expect("remove the layout stamp"),
        Stale::OlderVersion => layout_pin(&host.pins.path)
            .set(0, LAYOUT_VERSION - 1, 0)
            .expect("stamp an older version"),
        Stale::OtherDefinition => options.flow_capacity = 4_096,
    }

    let mut reopened = XdpGate::open_with(host.pins.path.clone(), options).expect("reopen");
    let why = reopened.rebuilt().map(str::to_owned);
    assert!(why.is_some(), "{stale:?}: the stale pins were reused");
    println!("{stale:?}: rebuilt because {}", why.unwrap());
    assert!(
        reopened.grants().expect("grants").is_empty(),
        "{stale:?}: grants of the stale pins were carried over"
    );
    let flows = MapInfo::from_pin(host.pins.path.join(names::FLOWS)).expect("flow table");
    assert!(matches!(flows.map_type(), Ok(MapType::Hash)));
    assert_eq!(flows.max_entries(), options.flow_capacity);
    assert_eq!(
        layout_pin(&host.pins.path).get(&0, 0).expect("stamp"),
        LAYOUT_VERSION
    );
    // Until the new program replaces the old in the link, the old one and
    // its maps enforce: the outside address still connects.
    tcp_connect(&host.topo.client, CLIENT_V4_OUTSIDE.into(), ssh)
        .expect_connected("the previous program with its own maps");
    // The caller fills the new maps, then swaps the program in.
    reopened
        .set_protected_ports(&[(Protocol::Tcp, SSH)].into())
        .expect("protect SSH");
    let ifname = host.topo.gated_if.clone();
    let attachment = host
        .topo
        .gated
        .run(|| reopened.attach(&ifname))
        .expect("re-attach");
    assert_eq!(
        attachment,
        Attachment::Adopted,
        "the link is kept: the interface is never without a program"
    );
    host.gate = reopened;
    host.grant(
        std::net::IpAddr::from(CLIENT_V4).into(),
        Protocol::Tcp,
        SSH,
        Duration::from_mins(1),
        10,
    );
    expect_access(
        &host.topo.client,
        &format!("{stale:?}: after the swap"),
        &[
            (CLIENT_V4.into(), ssh, true),
            (CLIENT_V4_OUTSIDE.into(), ssh, false),
        ],
    );
}

#[test]
fn unstamped_pins_are_rebuilt_not_reused() {
    reopen_on_stale_pins(Stale::Unstamped);
}

#[test]
fn pins_of_an_older_layout_are_rebuilt_not_reused() {
    reopen_on_stale_pins(Stale::OlderVersion);
}

#[test]
fn pins_with_a_map_defined_otherwise_are_rebuilt_not_reused() {
    reopen_on_stale_pins(Stale::OtherDefinition);
}

/// The agent restarts on pins of another layout: it rebuilds the kernel
/// state from its store (grants rewritten, the open session seeded from the
/// socket table), audits it, and enforcement holds throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_rebuilds_stale_kernel_state_from_its_store() {
    let host = AgentHost::new(Mode::Xdp, "");
    let (agent, mut api) = host.start().await;
    let _server = TcpEcho::start(&host.topo.gated, SocketAddr::new(GATED_V4.into(), SSH));
    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    let grant = api
        .grant("g", SSH, proto::Protocol::Tcp, CLIENT_V4, 120)
        .await;
    let mut session =
        tcp_connect(&host.topo.client, CLIENT_V4.into(), ssh).expect_connected("granted");
    round_trip(&mut session, b"before").expect("echo");
    assert!(agent.stop().success());
    std::fs::remove_file(host.files.pins.path.join(names::LAYOUT)).expect("unstamp the pins");

    let (agent, mut api) = host.start().await;
    agent.wait_for_log(&["kernel state rebuilt from the store"]);
    let started = api
        .audit_log()
        .await
        .into_iter()
        .rev()
        .find(|e| e.kind == proto::EventKind::AgentStarted as i32)
        .expect("an agent-started record");
    let details: serde_json::Value =
        serde_json::from_str(&started.details_json).expect("JSON details");
    assert!(
        details["kernel_state_rebuilt"].is_string(),
        "the rebuild is audited: {details}"
    );
    let entries = host.pinned_grants().read();
    assert_eq!(
        entries.values().map(|v| v.grant_id).collect::<Vec<_>>(),
        [grant.id],
        "the grant is written into the new maps: {entries:?}"
    );
    expect_access(
        &host.topo.client,
        "after the rebuild",
        &[
            (CLIENT_V4.into(), ssh, true),
            (CLIENT_V4_OUTSIDE.into(), ssh, false),
        ],
    );
    // The session was seeded into the new flow table: it outlives its grant.
    api.revoke(grant.id, false).await;
    round_trip(&mut session, b"after").expect("the session survives the rebuild and the revoke");
}
