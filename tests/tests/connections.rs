//! The agent's view of existing connections (`flows`): sockets through
//! `sock_diag` and conntrack entries through ctnetlink, over real TCP and UDP
//! connections between two namespaces joined by veth.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use jit_gate_agent::{
    flows::{Connection, conntrack, sockets},
    net::Protocol,
};
use jit_gate_tests::{
    gated_host::GatedHost,
    netns::{CLIENT_V4, CLIENT_V6, GATED_V4, GATED_V6, Netns, Topology},
    traffic::{TcpEcho, UdpSink, round_trip, tcp_connect},
};

const SSH: u16 = 22;
/// Served by a listener bound to [::], which takes IPv4 clients as v4-mapped.
const DUAL_STACK: u16 = 2222;
const SYSLOG: u16 = 514;
/// Served, but never asked about.
const OTHER: u16 = 8080;

fn ports() -> BTreeSet<(Protocol, u16)> {
    BTreeSet::from([
        (Protocol::Tcp, SSH),
        (Protocol::Tcp, DUAL_STACK),
        (Protocol::Udp, SYSLOG),
    ])
}

/// Echo servers on SSH and OTHER for both families, and `DUAL_STACK` on [::].
fn servers(gated: &Netns) -> Vec<TcpEcho> {
    let mut addrs: Vec<SocketAddr> = [GATED_V4.into(), GATED_V6.into()]
        .into_iter()
        .flat_map(|ip: IpAddr| [SocketAddr::new(ip, SSH), SocketAddr::new(ip, OTHER)])
        .collect();
    addrs.push("[::]:2222".parse().unwrap());
    addrs
        .into_iter()
        .map(|addr| TcpEcho::start(gated, addr))
        .collect()
}

/// A connected, echoing session from `src` to `dst`, and the connection as
/// the gated host sees it.
fn session(topo: &Topology, src: IpAddr, dst: SocketAddr) -> (TcpStream, Connection) {
    let mut stream = tcp_connect(&topo.client, src, dst).expect_connected("session");
    // The echo proves the server side has left SYN_RECV.
    round_trip(&mut stream, b"hello").expect("echo");
    let conn = Connection {
        protocol: Protocol::Tcp,
        remote: stream.local_addr().unwrap(),
        local: stream.peer_addr().unwrap(),
    };
    (stream, conn)
}

fn inbound(ns: &Netns, ports: &BTreeSet<(Protocol, u16)>) -> BTreeSet<Connection> {
    let found = ns
        .run(|| sockets::inbound(ports))
        .expect("sockets::inbound");
    let set: BTreeSet<_> = found.iter().copied().collect();
    assert_eq!(set.len(), found.len(), "duplicates in {found:?}");
    set
}

#[test]
fn inbound_finds_tcp_sessions_of_both_families_and_ignores_listeners_and_other_ports() {
    let topo = Topology::new();
    let _servers = servers(&topo.gated);
    let (_s1, v4) = session(&topo, CLIENT_V4.into(), (GATED_V4, SSH).into());
    let (_s2, v6) = session(&topo, CLIENT_V6.into(), (GATED_V6, SSH).into());
    let (_s3, mapped) = session(&topo, CLIENT_V4.into(), (GATED_V4, DUAL_STACK).into());
    let (_s4, _other) = session(&topo, CLIENT_V4.into(), (GATED_V4, OTHER).into());

    // Exactly the three sessions: no listener (of SSH, DUAL_STACK or OTHER),
    // no session to OTHER, and the [::] listener's IPv4 peer as plain IPv4.
    assert_eq!(
        inbound(&topo.gated, &ports()),
        BTreeSet::from([v4, v6, mapped])
    );
    assert!(
        mapped.remote.is_ipv4() && mapped.local.is_ipv4(),
        "{mapped}"
    );
}

#[test]
fn inbound_finds_connected_udp_sockets_only() {
    let topo = Topology::new();
    let _unconnected = UdpSink::start(&topo.gated, (GATED_V6, SYSLOG).into());
    let peer = SocketAddr::new(CLIENT_V4.into(), 5000);
    let connected = topo
        .gated
        .run(|| {
            let socket = UdpSocket::bind((GATED_V4, SYSLOG))?;
            socket.connect(peer)?;
            Ok::<_, std::io::Error>(socket)
        })
        .expect("connected UDP socket");
    let conn = Connection {
        protocol: Protocol::Udp,
        remote: peer,
        local: (GATED_V4, SYSLOG).into(),
    };
    assert_eq!(inbound(&topo.gated, &ports()), BTreeSet::from([conn]));

    assert!(topo.gated.run(|| sockets::destroy(&conn)).expect("destroy"));
    let error = connected.take_error().expect("SO_ERROR");
    assert_eq!(
        error.and_then(|e| e.raw_os_error()),
        Some(libc::ECONNABORTED),
        "the socket's owner learns it was aborted"
    );
    assert!(inbound(&topo.gated, &ports()).is_empty());
    assert!(
        !topo
            .gated
            .run(|| sockets::destroy(&conn))
            .expect("destroy again")
    );
}

#[test]
fn flow_keys_equal_the_ones_the_xdp_program_records() {
    let mut host = GatedHost::new(&[(Protocol::Tcp, SSH)]);
    let _servers = servers(&host.topo.gated);
    for (i, src) in [IpAddr::from(CLIENT_V4), CLIENT_V6.into()]
        .into_iter()
        .enumerate()
    {
        host.grant(
            src.into(),
            Protocol::Tcp,
            SSH,
            Duration::from_mins(1),
            i as u64 + 1,
        );
    }
    let (_s1, v4) = session(&host.topo, CLIENT_V4.into(), (GATED_V4, SSH).into());
    let (_s2, v6) = session(&host.topo, CLIENT_V6.into(), (GATED_V6, SSH).into());

    let found = inbound(&host.topo.gated, &BTreeSet::from([(Protocol::Tcp, SSH)]));
    assert_eq!(found, BTreeSet::from([v4, v6]));
    let recorded: BTreeSet<_> = host
        .gate
        .flows()
        .expect("flows")
        .into_iter()
        .map(|flow| flow.key)
        .collect();
    let keys: BTreeSet<_> = found.iter().map(Connection::flow_key).collect();
    assert_eq!(keys, recorded, "flow keys of {found:?}");
    for key in &recorded {
        let conn = Connection::from_flow_key(key).expect("a key the program built");
        assert!(found.contains(&conn), "{conn} from {key:?}");
        assert_eq!(conn.flow_key(), *key);
    }
}

#[test]
fn destroy_resets_live_sessions_and_spares_listeners() {
    let topo = Topology::new();
    let _servers = servers(&topo.gated);
    let targets = [
        (IpAddr::from(CLIENT_V4), SocketAddr::from((GATED_V4, SSH))),
        (CLIENT_V6.into(), (GATED_V6, SSH).into()),
        // An IPv6 socket with a v4-mapped peer, named by its IPv4 connection.
        (CLIENT_V4.into(), (GATED_V4, DUAL_STACK).into()),
    ];
    for (src, dst) in targets {
        let (mut stream, conn) = session(&topo, src, dst);
        assert!(
            topo.gated.run(|| sockets::destroy(&conn)).expect("destroy"),
            "{conn}"
        );
        let err = round_trip(&mut stream, b"after destroy")
            .expect_err("a round trip over a destroyed connection");
        assert!(
            matches!(
                err.kind(),
                ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe
            ),
            "{conn}: the client sees a reset or EOF, got {err}"
        );
        assert!(!inbound(&topo.gated, &ports()).contains(&conn));
        assert!(
            !topo
                .gated
                .run(|| sockets::destroy(&conn))
                .expect("destroy again"),
            "{conn} is gone"
        );
        // The kernel's lookup would fall back to the listener of the port;
        // it must survive the second, absent, destroy.
        session(&topo, src, dst);
    }
    let never = Connection {
        protocol: Protocol::Tcp,
        remote: (CLIENT_V4, 1).into(),
        local: (GATED_V4, SSH).into(),
    };
    assert!(
        !topo
            .gated
            .run(|| sockets::destroy(&never))
            .expect("destroy")
    );
    session(&topo, CLIENT_V4.into(), (GATED_V4, SSH).into());
}

/// Makes conntrack track this namespace's traffic: a rule that uses it.
fn activate_conntrack(ns: &Netns) {
    ns.exec(
        "nft",
        &["add table inet jgt; \
           add chain inet jgt input { type filter hook input priority 0; policy accept; }; \
           add rule inet jgt input ct state established,related accept"],
    );
}

/// `conntrack -L` inside the namespace, both families, one entry a line.
fn conntrack_cli(ns: &Netns) -> String {
    ["ipv4", "ipv6"]
        .map(|family| ns.exec("conntrack", &["-L", "-f", family]))
        .concat()
}

/// Whether the CLI lists an entry with `conn`'s original tuple.
fn cli_lists(cli: &str, conn: &Connection) -> bool {
    let tuple = format!(
        "src={} dst={} sport={} dport={}",
        conn.remote.ip(),
        conn.local.ip(),
        conn.remote.port(),
        conn.local.port()
    );
    cli.lines()
        .any(|line| line.starts_with(conn.protocol.name()) && line.contains(&tuple))
}

#[test]
fn conntrack_lists_and_deletes_inbound_entries() {
    let topo = Topology::new();
    activate_conntrack(&topo.gated);
    let _servers = servers(&topo.gated);
    let (_s1, tcp4) = session(&topo, CLIENT_V4.into(), (GATED_V4, SSH).into());
    let (_s2, tcp6) = session(&topo, CLIENT_V6.into(), (GATED_V6, SSH).into());
    let (_s3, _other) = session(&topo, CLIENT_V4.into(), (GATED_V4, OTHER).into());
    let sink = UdpSink::start(&topo.gated, (GATED_V4, SYSLOG).into());
    let udp_client = topo
        .client
        .run(|| UdpSocket::bind((CLIENT_V4, 0)))
        .expect("UDP client");
    udp_client
        .send_to(b"log", (GATED_V4, SYSLOG))
        .expect("send");
    assert!(sink.arrives(b"log"), "datagram to the UDP sink");
    let udp4 = Connection {
        protocol: Protocol::Udp,
        remote: udp_client.local_addr().unwrap(),
        local: (GATED_V4, SYSLOG).into(),
    };

    let listed = topo
        .gated
        .run(|| conntrack::list(&ports()))
        .expect("conntrack::list");
    assert_eq!(
        listed.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([tcp4, tcp6, udp4]),
        "entries to the asked ports only, original direction"
    );
    let cli = conntrack_cli(&topo.gated);
    for conn in [tcp4, tcp6, udp4] {
        assert!(cli_lists(&cli, &conn), "conntrack -L shows {conn}:\n{cli}");
        assert!(
            topo.gated
                .run(|| conntrack::delete(&conn))
                .expect("conntrack::delete"),
            "{conn}"
        );
        let cli = conntrack_cli(&topo.gated);
        assert!(!cli_lists(&cli, &conn), "{conn} still listed:\n{cli}");
        assert!(
            !topo
                .gated
                .run(|| conntrack::delete(&conn))
                .expect("delete again"),
            "{conn} is gone"
        );
    }
    assert!(
        topo.gated
            .run(|| conntrack::list(&ports()))
            .expect("list")
            .is_empty()
    );
}

#[test]
fn conntrack_list_is_empty_where_conntrack_is_inactive() {
    let topo = Topology::new();
    let _servers = servers(&topo.gated);
    let (_s, _conn) = session(&topo, CLIENT_V4.into(), (GATED_V4, SSH).into());
    assert_eq!(
        topo.gated.run(|| conntrack::list(&ports())).expect("list"),
        Vec::new()
    );
}

/// A session from before conntrack was active: `create` records it as
/// established, so the `ct state established` rule passes its packets.
#[test]
fn conntrack_create_records_sessions_that_predate_conntrack() {
    let topo = Topology::new();
    let _servers = servers(&topo.gated);
    let (mut v4, tcp4) = session(&topo, CLIENT_V4.into(), (GATED_V4, SSH).into());
    let (mut v6, tcp6) = session(&topo, CLIENT_V6.into(), (GATED_V6, SSH).into());
    for conn in [tcp4, tcp6] {
        assert!(
            topo.gated
                .run(|| conntrack::create(&conn))
                .expect("conntrack::create"),
            "{conn}"
        );
        assert!(
            !topo
                .gated
                .run(|| conntrack::create(&conn))
                .expect("create again"),
            "{conn} exists already"
        );
    }
    let cli = conntrack_cli(&topo.gated);
    for conn in [tcp4, tcp6] {
        assert!(
            cli.lines()
                .any(|l| cli_lists(l, &conn) && l.contains("ESTABLISHED")),
            "conntrack -L shows {conn} established:\n{cli}"
        );
    }
    // Only established packets pass from now on.
    topo.gated.exec(
        "nft",
        &["add table inet jgt; \
           add chain inet jgt input { type filter hook input priority 0; policy drop; }; \
           add rule inet jgt input ct state established,related accept"],
    );
    round_trip(&mut v4, b"v4").expect("IPv4 session after create");
    round_trip(&mut v6, b"v6").expect("IPv6 session after create");
}

#[test]
fn conntrack_list_leaves_out_ended_tcp_connections() {
    let topo = Topology::new();
    activate_conntrack(&topo.gated);
    let _servers = servers(&topo.gated);
    let (stream, conn) = session(&topo, CLIENT_V4.into(), (GATED_V4, SSH).into());
    drop(stream);
    // The echo server notices the close within its 200 ms read timeout.
    std::thread::sleep(Duration::from_millis(500));
    let cli = conntrack_cli(&topo.gated);
    assert!(
        cli.lines()
            .any(|l| cli_lists(l, &conn) && l.contains("TIME_WAIT")),
        "conntrack keeps {conn} in TIME_WAIT:\n{cli}"
    );
    assert_eq!(
        topo.gated.run(|| conntrack::list(&ports())).expect("list"),
        Vec::new()
    );
}
