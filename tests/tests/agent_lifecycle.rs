//! Grant lifecycle end to end: a real agent in the gated namespace, driven
//! over its gRPC socket, with real TCP and UDP traffic from the client
//! namespace. After every step the kernel (the nftables table and the
//! pinned XDP maps) must hold exactly the grants the agent lists as active.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use jit_gate_agent::{clock::boot_now_ns, config::Mode, proto};
use jit_gate_common::maps::GrantValue;
use jit_gate_tests::{
    agent::{AgentHost, Api, target_of, wall_time},
    netns::{CLIENT_V4, CLIENT_V4_OUTSIDE, CLIENT_V6, CLIENT_V6_OUTSIDE, GATED_V4, GATED_V6},
    traffic::{
        TcpEcho, UdpEcho, expect_access, expect_closed, round_trip, tcp_connect, udp_connect,
        udp_round_trip,
    },
};

const SSH: u16 = 22;
/// A second TCP port, so that exact and prefix grants of one family never
/// cover each other's clients.
const ALT: u16 = 2222;
const SYSLOG: u16 = 514;
const TCP: proto::Protocol = proto::Protocol::Tcp;

const POLICY: &str = r#"
[[policy]]
port = 22
protocol = "tcp"
[[policy]]
port = 2222
protocol = "tcp"
[[policy]]
port = 514
protocol = "udp"
"#;

fn host() -> AgentHost {
    AgentHost::new(Mode::XdpAndNftables, POLICY)
}

/// Leaves time for the agent's timer after `at` (the deadline is the
/// agent's promise: kernel entries gone within 1 s of expiry).
async fn sleep_past(at: SystemTime) {
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(left + Duration::from_secs(1)).await;
}

async fn assert_state(api: &mut Api, grant: &proto::Grant, state: proto::GrantState) {
    let listed = api.grant_by_id(grant.id).await;
    assert_eq!(listed.state, state as i32, "grant {}: {listed:?}", grant.id);
}

/// One source granted on one port: `inside` is covered by `source`,
/// `outside` is not.
struct Case {
    port: u16,
    source: &'static str,
    inside: IpAddr,
    outside: IpAddr,
    server: IpAddr,
}

impl Case {
    fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.server, self.port)
    }
}

const CASES: [Case; 4] = [
    Case {
        port: SSH,
        source: "192.0.2.2",
        inside: IpAddr::V4(CLIENT_V4),
        outside: IpAddr::V4(CLIENT_V4_OUTSIDE),
        server: IpAddr::V4(GATED_V4),
    },
    Case {
        port: ALT,
        source: "192.0.2.0/25",
        inside: IpAddr::V4(CLIENT_V4),
        outside: IpAddr::V4(CLIENT_V4_OUTSIDE),
        server: IpAddr::V4(GATED_V4),
    },
    Case {
        port: SSH,
        source: "2001:db8::2",
        inside: IpAddr::V6(CLIENT_V6),
        outside: IpAddr::V6(CLIENT_V6_OUTSIDE),
        server: IpAddr::V6(GATED_V6),
    },
    Case {
        port: ALT,
        source: "2001:db8::/112",
        inside: IpAddr::V6(CLIENT_V6),
        outside: IpAddr::V6(CLIENT_V6_OUTSIDE),
        server: IpAddr::V6(GATED_V6),
    },
];

/// Every case's inside client may connect if `open`; outside ones never.
fn probes(open: bool) -> Vec<(IpAddr, SocketAddr, bool)> {
    CASES
        .iter()
        .flat_map(|c| [(c.inside, c.dst(), open), (c.outside, c.dst(), false)])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_grants_are_tracked_separately_for_exact_prefix_and_ipv6_sources() {
    let host = host();
    let (_agent, mut api) = host.start().await;
    let _servers: Vec<TcpEcho> = CASES
        .iter()
        .map(|c| TcpEcho::start(&host.topo.gated, c.dst()))
        .collect();
    let client = &host.topo.client;
    expect_access(client, "before any grant", &probes(false));
    host.assert_enforced(&mut api, "before any grant").await;

    // Per case: a long, a short and a medium grant on the same target.
    let mut grants = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        let (port, source) = (case.port, case.source);
        let long = api.grant(&format!("long-{i}"), port, TCP, source, 60).await;
        let short = api.grant(&format!("short-{i}"), port, TCP, source, 5).await;
        let medium = api
            .grant(&format!("medium-{i}"), port, TCP, source, 30)
            .await;
        grants.push((long, short, medium));
    }
    host.assert_enforced(&mut api, "three grants per target")
        .await;
    expect_access(client, "under three grants", &probes(true));
    let mut sessions: Vec<_> = CASES
        .iter()
        .map(|c| tcp_connect(client, c.inside, c.dst()).expect_connected("session"))
        .collect();

    let last_short = grants.iter().map(|g| wall_time(g.1.expires_at)).max();
    sleep_past(last_short.unwrap()).await;
    for (_, short, _) in &grants {
        assert_state(&mut api, short, proto::GrantState::Expired).await;
    }
    host.assert_enforced(&mut api, "short grants expired").await;
    expect_access(client, "after the short grants expired", &probes(true));

    // Revoking the grant whose expiry the kernel carries recomputes it from
    // the medium one.
    for (long, _, _) in &grants {
        api.revoke(long.id, false).await;
    }
    host.assert_enforced(&mut api, "long grants revoked").await;
    expect_access(client, "after the long grants were revoked", &probes(true));

    for (_, _, medium) in &grants {
        api.revoke(medium.id, false).await;
    }
    host.assert_enforced(&mut api, "every grant ended").await;
    expect_access(client, "after the last grants were revoked", &probes(false));
    for (session, case) in sessions.iter_mut().zip(&CASES) {
        round_trip(session, b"still here")
            .unwrap_or_else(|e| panic!("session to {} after the revokes: {e}", case.dst()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_removes_kernel_entries_within_a_second_and_is_reported_live() {
    let host = host();
    let (_agent, mut api) = host.start().await;
    let mut events = api.watch(None).await;
    let exact = api.grant("exact", SSH, TCP, CLIENT_V4, 3).await;
    let prefix = api.grant("prefix", ALT, TCP, "192.0.2.0/25", 3).await;
    host.assert_enforced(&mut api, "two grants").await;

    // Within a second of its expiry, whichever comes first.
    let deadline = |g: &proto::Grant| wall_time(g.expires_at) + Duration::from_secs(1);
    let mut pending = vec![exact, prefix];
    while !pending.is_empty() {
        let latest = pending.iter().map(deadline).max().unwrap();
        let event = events
            .expect(proto::EventKind::GrantExpired, latest, |e| {
                pending.iter().any(|g| g.id == e.grant_id)
            })
            .await;
        let index = pending.iter().position(|g| g.id == event.grant_id);
        let grant = &pending.remove(index.unwrap());
        let (expires, deadline) = (wall_time(grant.expires_at), deadline(grant));
        let at = wall_time(event.at);
        assert!(
            at >= expires && at <= deadline,
            "grant {} expiring at {expires:?} was recorded at {at:?}",
            grant.id
        );
        // The agent publishes the event after programming the kernel.
        let target = target_of(grant);
        assert!(
            !host.pinned_grants().read().contains_key(&target),
            "XDP entry of {target} outlives the expiry event"
        );
        let nft = host.nft_allowed().expect("nftables table");
        assert!(
            !nft.contains_key(&target),
            "nftables element of {target} outlives the expiry event"
        );
        assert!(
            SystemTime::now() <= deadline,
            "kernel entries of grant {} still there a second after expiry",
            grant.id
        );
        let listed = api.grant_by_id(grant.id).await;
        assert_eq!(listed.state, proto::GrantState::Expired as i32);
        assert_eq!(listed.ended_at, grant.expires_at);
    }
    host.assert_enforced(&mut api, "after expiry").await;
    let from = IpAddr::V4(CLIENT_V4);
    expect_access(
        &host.topo.client,
        "after expiry",
        &[
            (from, SocketAddr::new(GATED_V4.into(), SSH), false),
            (from, SocketAddr::new(GATED_V4.into(), ALT), false),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_with_terminate_ends_the_live_tcp_session() {
    let host = host();
    let (_agent, mut api) = host.start().await;
    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    let _server = TcpEcho::start(&host.topo.gated, ssh);
    let mut events = api.watch(None).await;
    let grant = api.grant("g", SSH, TCP, CLIENT_V4, 60).await;
    let mut session =
        tcp_connect(&host.topo.client, CLIENT_V4.into(), ssh).expect_connected("under the grant");
    round_trip(&mut session, b"hello").expect("echo under the grant");
    host.assert_enforced(&mut api, "granted, session open")
        .await;

    let remote = session.local_addr().unwrap().to_string();
    let listed = api.connections().await;
    let connection = listed
        .iter()
        .find(|c| c.remote == remote && c.local == ssh.to_string())
        .unwrap_or_else(|| panic!("session {remote} not listed: {listed:?}"));
    assert_eq!(connection.grant_id, grant.id, "{connection:?}");
    assert_eq!(connection.protocol, TCP as i32);

    // A session that ends by itself leaves the list (conntrack keeps its
    // entry in TIME_WAIT for minutes).
    let mut short =
        tcp_connect(&host.topo.client, CLIENT_V4.into(), ssh).expect_connected("second session");
    round_trip(&mut short, b"bye").expect("echo on the second session");
    let short_remote = short.local_addr().unwrap().to_string();
    drop(short);
    let deadline = SystemTime::now() + Duration::from_secs(2);
    while api
        .connections()
        .await
        .iter()
        .any(|c| c.remote == short_remote)
    {
        assert!(
            SystemTime::now() < deadline,
            "closed session {short_remote} still listed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(api.connections().await.iter().any(|c| c.remote == remote));

    let revoked = api.revoke(grant.id, true).await;
    assert!(
        revoked.connections_terminated >= 1,
        "{revoked:?} terminated nothing"
    );
    expect_closed(&mut session, "session of the revoked grant");
    events
        .expect(
            proto::EventKind::ConnectionsTerminated,
            SystemTime::now() + Duration::from_secs(2),
            |e| e.grant_id == grant.id,
        )
        .await;
    host.assert_enforced(&mut api, "revoked with terminate")
        .await;
    let listed = api.connections().await;
    assert!(
        listed.iter().all(|c| c.remote != remote),
        "terminated session still listed: {listed:?}"
    );
    expect_access(
        &host.topo.client,
        "after the revoke",
        &[(CLIENT_V4.into(), ssh, false)],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_without_terminate_keeps_an_ipv6_udp_flow_but_not_new_ones() {
    let host = host();
    let (_agent, mut api) = host.start().await;
    let syslog = SocketAddr::new(GATED_V6.into(), SYSLOG);
    let _server = UdpEcho::start(&host.topo.gated, syslog);
    let client = &host.topo.client;
    let before = udp_connect(client, CLIENT_V6.into(), syslog);
    udp_round_trip(&before, b"no grant").expect_err("UDP without a grant passed");

    let grant = api
        .grant("g", SYSLOG, proto::Protocol::Udp, CLIENT_V6, 60)
        .await;
    host.assert_enforced(&mut api, "UDP grant").await;
    let flow = udp_connect(client, CLIENT_V6.into(), syslog);
    udp_round_trip(&flow, b"hello").expect("UDP under the grant");
    let remote = flow.local_addr().unwrap().to_string();
    let listed = api.connections().await;
    let connection = listed
        .iter()
        .find(|c| c.remote == remote)
        .unwrap_or_else(|| panic!("UDP flow {remote} not listed: {listed:?}"));
    assert_eq!(connection.grant_id, grant.id, "{connection:?}");
    assert_eq!(connection.protocol, proto::Protocol::Udp as i32);

    let revoked = api.revoke(grant.id, false).await;
    assert_eq!(revoked.connections_terminated, 0, "{revoked:?}");
    host.assert_enforced(&mut api, "UDP grant revoked").await;
    udp_round_trip(&flow, b"still here").expect("the UDP flow survives the revoke");
    let fresh = udp_connect(client, CLIENT_V6.into(), syslog);
    udp_round_trip(&fresh, b"new flow").expect_err("a new UDP flow passed after the revoke");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_in_nftables_and_xdp_is_repaired_within_the_reconcile_period() {
    let host = host();
    let (_agent, mut api) = host.start().await;
    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    let _server = TcpEcho::start(&host.topo.gated, ssh);
    let mut events = api.watch(None).await;
    let grant = api.grant("g", SSH, TCP, CLIENT_V4, 60).await;
    let target = target_of(&grant);
    host.assert_enforced(&mut api, "granted").await;

    // Each change behind the agent's back, checked to have happened, must be
    // undone within 5 s and reported: reconcile_interval is 1 s, stretched
    // when reconciling takes long (it may run at most two thirds of the
    // time), as it may on a loaded machine.
    let mut repaired = async |what: &str, layer: &str| {
        let event = events
            .expect(
                proto::EventKind::DriftRepaired,
                SystemTime::now() + Duration::from_secs(5),
                |_| true,
            )
            .await;
        assert!(
            event.message.contains(layer),
            "{what}: repair reported as {:?}",
            event.message
        );
        host.assert_enforced(&mut api, what).await;
    };

    host.nft(&["delete", "table", "inet", "jit_gate"]);
    assert_eq!(host.nft_allowed(), None);
    repaired("nftables table deleted", "nftables").await;

    host.pinned_grants().remove_v4(&target);
    assert!(!host.pinned_grants().read().contains_key(&target));
    repaired("XDP entry deleted", "XDP").await;

    let planted = jit_gate_agent::net::GrantTarget {
        source: "192.0.2.130/32".parse().expect("a prefix"),
        ..target
    };
    host.nft(&[
        "add",
        "element",
        "inet",
        "jit_gate",
        &jit_gate_agent::enforce::nft::NftGate::set_holding(&planted),
        "{ 192.0.2.130 . tcp . 22 timeout 60s }",
    ]);
    assert_eq!(host.nft_allowed().map(|a| a.len()), Some(2));
    repaired("bogus nftables element", "nftables").await;

    let bogus = jit_gate_agent::net::GrantTarget {
        source: IpAddr::V4(CLIENT_V4_OUTSIDE).into(),
        ..target
    };
    host.pinned_grants().insert_v4(
        &bogus,
        GrantValue {
            expires_at_boot_ns: boot_now_ns() + 60_000_000_000,
            grant_id: grant.id,
            flow_quota: 64,
            max_opens: 0,
        },
    );
    repaired("bogus XDP entry", "XDP").await;

    expect_access(
        &host.topo.client,
        "after the repairs",
        &[
            (CLIENT_V4.into(), ssh, true),
            (CLIENT_V4_OUTSIDE.into(), ssh, false),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_mode_opens_and_expires_grants_without_xdp() {
    let host = AgentHost::new(Mode::Nftables, "");
    let (_agent, mut api) = host.start().await;
    let status = api.status().await;
    assert_eq!(status.configured_mode, "nftables");
    assert!(status.nftables_active, "{status:?}");
    // Every interface, loopback included: the table sees them all.
    assert_eq!(status.interfaces.len(), 2, "{status:?}");
    assert!(
        status
            .interfaces
            .iter()
            .all(|i| i.mode == proto::EnforcementMode::NftablesOnly as i32),
        "{status:?}"
    );
    assert!(
        status
            .interfaces
            .iter()
            .any(|i| i.name == host.topo.gated_if),
        "{status:?}"
    );
    assert!(
        !host.files.pins.path.exists(),
        "nftables mode created {}",
        host.files.pins.path.display()
    );

    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    let _server = TcpEcho::start(&host.topo.gated, ssh);
    let client = &host.topo.client;
    expect_access(
        client,
        "before any grant",
        &[(CLIENT_V4.into(), ssh, false)],
    );
    let grant = api.grant("g", SSH, TCP, CLIENT_V4, 4).await;
    host.assert_enforced(&mut api, "granted").await;
    expect_access(
        client,
        "under the grant",
        &[
            (CLIENT_V4.into(), ssh, true),
            (CLIENT_V4_OUTSIDE.into(), ssh, false),
        ],
    );
    let mut session = tcp_connect(client, CLIENT_V4.into(), ssh).expect_connected("session");
    round_trip(&mut session, b"hello").expect("echo under the grant");

    sleep_past(wall_time(grant.expires_at)).await;
    assert_state(&mut api, &grant, proto::GrantState::Expired).await;
    host.assert_enforced(&mut api, "expired").await;
    expect_access(client, "after expiry", &[(CLIENT_V4.into(), ssh, false)]);
    round_trip(&mut session, b"established").expect("conntrack keeps the session open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_unavailable_falls_back_to_nftables_and_says_why() {
    let host = AgentHost::without_bpffs();
    let (_agent, mut api) = host.start().await;
    let status = api.status().await;
    assert_eq!(status.configured_mode, "xdp+nftables");
    assert!(status.nftables_active, "{status:?}");
    let gated = status
        .interfaces
        .iter()
        .find(|i| i.name == host.topo.gated_if)
        .expect("the gated interface is listed");
    assert!(
        gated.mode == proto::EnforcementMode::NftablesOnly as i32
            && gated.reason.contains("XDP unavailable")
            && gated.reason.contains("bpffs"),
        "{status:?}"
    );

    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    let _server = TcpEcho::start(&host.topo.gated, ssh);
    let client = &host.topo.client;
    let grant = api.grant("g", SSH, TCP, CLIENT_V4, 60).await;
    host.assert_enforced(&mut api, "granted").await;
    expect_access(
        client,
        "under the grant",
        &[
            (CLIENT_V4.into(), ssh, true),
            (CLIENT_V4_OUTSIDE.into(), ssh, false),
        ],
    );
    api.revoke(grant.id, false).await;
    host.assert_enforced(&mut api, "revoked").await;
    expect_access(
        client,
        "after the revoke",
        &[(CLIENT_V4.into(), ssh, false)],
    );
}
