//! No ungated way in (issue 7, defect 10), in mode `xdp`, where nftables
//! does not back XDP up: an interface created after the agent started and
//! a VXLAN tunnel the host decapsulates are gated as soon as they appear
//! (the agent watches interfaces over rtnetlink), and an interface the
//! configuration leaves out is reported as an ungated path. The oracle is
//! the kernel: real TCP connections from the client namespace.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use jit_gate_agent::{config::Mode, proto};
use jit_gate_tests::{
    agent::{AgentHost, Api},
    env::unique_name,
    netns::{CLIENT_V4, GATED_V4, ip},
    traffic::{TcpEcho, expect_access},
};

const SSH: u16 = 22;
/// How long a new interface may take to be gated.
const GATED_WITHIN: Duration = Duration::from_secs(3);

/// An agent in mode `xdp` covering every interface but those matching
/// `exclude`.
fn host(exclude: &[&str]) -> AgentHost {
    let host = AgentHost::new(Mode::Xdp, "");
    host.files.write_config(
        &["all"],
        &format!("mode = \"xdp\"\nexclude_interfaces = {exclude:?}"),
    );
    host
}

/// Waits until `status` lists `ifname` with `mode` and nothing wrong;
/// returns how long that took from `since`.
async fn wait_for_mode(
    api: &mut Api,
    ifname: &str,
    mode: proto::EnforcementMode,
    since: Instant,
) -> Duration {
    loop {
        let status = api.status().await;
        if status
            .interfaces
            .iter()
            .any(|i| i.name == ifname && i.mode == mode as i32 && i.problem.is_empty())
        {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < GATED_WITHIN,
            "{ifname} not {mode:?} after {GATED_WITHIN:?}: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A second veth pair between the namespaces, made after the agent
/// started, carrying `gated`/`client` (/24) on its two ends.
fn new_link(host: &AgentHost, gated: Ipv4Addr, client: Ipv4Addr) -> String {
    let (gated_if, client_if) = (unique_name("ng"), unique_name("nc"));
    ip(&[
        "link", "add", &gated_if, "type", "veth", "peer", "name", &client_if,
    ]);
    ip(&["link", "set", &client_if, "netns", &host.topo.client.name]);
    ip(&["link", "set", &gated_if, "netns", &host.topo.gated.name]);
    host.topo
        .gated
        .exec_ip(&["addr", "add", &format!("{gated}/24"), "dev", &gated_if]);
    host.topo
        .client
        .exec_ip(&["addr", "add", &format!("{client}/24"), "dev", &client_if]);
    host.topo.gated.exec_ip(&["link", "set", &gated_if, "up"]);
    host.topo.client.exec_ip(&["link", "set", &client_if, "up"]);
    gated_if
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interfaces_created_later_and_vxlan_tunnels_are_gated() {
    let host = host(&[]);
    let (_agent, mut api) = host.start().await;
    let client = &host.topo.client;

    // A veth pair added after the start.
    let (gated_addr, client_addr) = (Ipv4Addr::new(203, 0, 113, 1), Ipv4Addr::new(203, 0, 113, 2));
    let at = Instant::now();
    let new_if = new_link(&host, gated_addr, client_addr);
    let took = wait_for_mode(&mut api, &new_if, proto::EnforcementMode::XdpNative, at).await;
    eprintln!("new veth {new_if} gated {took:?} after it was created");
    let new_dst = SocketAddr::new(gated_addr.into(), SSH);
    let _new_server = TcpEcho::start(&host.topo.gated, new_dst);
    expect_access(
        client,
        "through an interface created after the start",
        &[(client_addr.into(), new_dst, false)],
    );

    // A VXLAN tunnel over the first veth pair: the gated host decapsulates
    // it, and XDP (generic) on the vxlan device sees the inner frames.
    let (vx_gated, vx_client) = (unique_name("xg"), unique_name("xc"));
    let (inner_gated, inner_client) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
    let at = Instant::now();
    for (ns, name, local, remote, dev, addr) in [
        (
            &host.topo.gated,
            &vx_gated,
            GATED_V4,
            CLIENT_V4,
            &host.topo.gated_if,
            inner_gated,
        ),
        (
            &host.topo.client,
            &vx_client,
            CLIENT_V4,
            GATED_V4,
            &client_dev(&host),
            inner_client,
        ),
    ] {
        ns.exec_ip(&[
            "link",
            "add",
            name,
            "type",
            "vxlan",
            "id",
            "42",
            "dstport",
            "4789",
            "local",
            &local.to_string(),
            "remote",
            &remote.to_string(),
            "dev",
            dev,
        ]);
        ns.exec_ip(&["addr", "add", &format!("{addr}/24"), "dev", name]);
        ns.exec_ip(&["link", "set", name, "up"]);
    }
    let took = wait_for_mode(&mut api, &vx_gated, proto::EnforcementMode::XdpGeneric, at).await;
    eprintln!("vxlan {vx_gated} gated {took:?} after it was created");
    let inner_dst = SocketAddr::new(inner_gated.into(), SSH);
    let _inner_server = TcpEcho::start(&host.topo.gated, inner_dst);
    expect_access(
        client,
        "through a VXLAN tunnel",
        &[(inner_client.into(), inner_dst, false)],
    );

    // Both paths carry traffic: a grant opens them.
    for source in [IpAddr::V4(client_addr), IpAddr::V4(inner_client)] {
        api.grant(
            &format!("via-{source}"),
            SSH,
            proto::Protocol::Tcp,
            source,
            60,
        )
        .await;
    }
    expect_access(
        client,
        "granted, through both",
        &[
            (client_addr.into(), new_dst, true),
            (inner_client.into(), inner_dst, true),
        ],
    );
    let status = api.status().await;
    assert!(status.healthy, "{status:#?}");
}

/// The client's end of the first veth pair.
fn client_dev(host: &AgentHost) -> String {
    let out = host
        .topo
        .client
        .exec("ip", &["-j", "link", "show", "type", "veth"]);
    let links: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
    links[0]["ifname"]
        .as_str()
        .expect("the client's veth")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_excluded_interface_is_reported_as_an_ungated_path() {
    let host = host(&["ex*"]);
    let (agent, mut api) = host.start().await;
    let (gated_if, client_if) = (unique_name("ex"), unique_name("ec"));
    ip(&[
        "link", "add", &gated_if, "type", "veth", "peer", "name", &client_if,
    ]);
    ip(&["link", "set", &client_if, "netns", &host.topo.client.name]);
    ip(&["link", "set", &gated_if, "netns", &host.topo.gated.name]);
    let at = Instant::now();
    let status = loop {
        let status = api.status().await;
        if status.interfaces.iter().any(|i| i.name == gated_if) {
            break status;
        }
        assert!(
            at.elapsed() < GATED_WITHIN,
            "{gated_if} not listed: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let excluded = status
        .interfaces
        .iter()
        .find(|i| i.name == gated_if)
        .expect("listed");
    assert_eq!(
        excluded.mode,
        proto::EnforcementMode::Uncovered as i32,
        "{excluded:?}"
    );
    assert!(
        excluded.reason.contains("exclude_interfaces"),
        "{excluded:?}"
    );
    assert!(!status.healthy, "an ungated path, yet healthy: {status:#?}");
    agent.wait_for_log(&["not covered by XDP", &gated_if]);
}
