//! The nftables enforcer against the real kernel: table round trips, element
//! timeouts, 100k elements, and live TCP/UDP over a veth pair with nftables
//! as the only enforcer. Everything runs inside namespaces the tests create
//! (never the machine's own firewall); dropping them removes the tables,
//! also when a test panics.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use jit_gate_agent::{
    enforce::nft::{NftError, NftGate, NftRead, NftState},
    net::{GrantTarget, Protocol},
};
use jit_gate_tests::{
    env::unique_name,
    netns::{
        CLIENT_V4, CLIENT_V4_OUTSIDE, CLIENT_V6, CLIENT_V6_OUTSIDE, GATED_V4, GATED_V6, Netns,
        Topology,
    },
    traffic::{Connect, TcpEcho, UdpSink, round_trip, tcp_connect, udp_send},
};

const SSH: u16 = 22;
const RDP: u16 = 3389;
const SYSLOG: u16 = 514;
const OPEN_PORT: u16 = 8080;
const HOUR: Duration = Duration::from_hours(1);
/// How far a timeout read back may lag the one written, on a busy machine.
const SLACK: Duration = Duration::from_secs(20);

/// A gate with a table name of its own, used inside namespace `ns`.
struct NsGate<'a> {
    ns: &'a Netns,
    gate: NftGate,
}

impl<'a> NsGate<'a> {
    fn new(ns: &'a Netns) -> Self {
        NsGate {
            ns,
            gate: NftGate::new(unique_name("jgt")),
        }
    }

    /// Runs `f` with the gate on a thread inside the namespace.
    fn run<T: Send>(&self, f: impl FnOnce(&NftGate) -> T + Send) -> T {
        self.ns.run(|| f(&self.gate))
    }

    fn install(&self, state: &NftState) {
        self.run(|g| g.install(state))
            .unwrap_or_else(|e| panic!("install: {e}"));
    }

    fn add(&self, entries: &[(GrantTarget, Duration)]) {
        self.run(|g| g.add_allowed(entries))
            .unwrap_or_else(|e| panic!("add_allowed: {e}"));
    }

    fn remove(&self, targets: &[GrantTarget]) {
        self.run(|g| g.remove_allowed(targets))
            .unwrap_or_else(|e| panic!("remove_allowed: {e}"));
    }

    /// What the table enforces, read back; it holds no stray element.
    fn read(&self) -> NftState {
        let read = self.read_all();
        assert_eq!(read.strays, [], "stray elements");
        read.state
    }

    fn read_all(&self) -> NftRead {
        self.run(NftGate::read)
            .unwrap_or_else(|e| panic!("read: {e}"))
            .expect("the table exists")
    }

    /// `nft list table` as the nft tool prints it: an independent reader.
    fn listing(&self) -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns.name,
                "nft",
                "list",
                "table",
                "inet",
            ])
            .arg(self.gate.table())
            .output()
            .expect("run nft (`cargo xtask bootstrap` installs nftables)");
        assert!(
            out.status.success(),
            "nft list table: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 listing")
    }
}

fn target(source: &str, protocol: Protocol, port: u16) -> GrantTarget {
    GrantTarget {
        source: source.parse().expect("test prefix"),
        protocol,
        port,
    }
}

fn host(addr: impl Into<IpAddr>, protocol: Protocol, port: u16) -> GrantTarget {
    GrantTarget {
        source: IpNet::from(addr.into()),
        protocol,
        port,
    }
}

fn protected(ports: &[(Protocol, u16)]) -> BTreeSet<(Protocol, u16)> {
    ports.iter().copied().collect()
}

/// Asserts `read` holds exactly the protected ports and targets of
/// `expected`, each timeout at most as long as written and no more than
/// `SLACK` shorter.
fn assert_matches(read: &NftState, expected: &NftState) {
    assert_eq!(read.protected, expected.protected, "protected set");
    let keys = |s: &NftState| s.allowed.keys().copied().collect::<Vec<_>>();
    assert_eq!(keys(read), keys(expected), "allowed targets");
    for (t, written) in &expected.allowed {
        let left = read.allowed[t];
        assert!(
            left <= *written && left + SLACK >= *written,
            "{t}: {left:?} left of {written:?}"
        );
    }
}

/// Protected ports and overlapping grants of both families and protocols.
fn sample_state() -> NftState {
    let allowed = [
        // Overlapping IPv4 prefixes on one port, each with its own timeout.
        (target("10.0.0.0/16", Protocol::Tcp, SSH), HOUR),
        (target("10.0.0.0/24", Protocol::Tcp, SSH), 2 * HOUR),
        (target("10.0.0.5/32", Protocol::Tcp, SSH), 3 * HOUR),
        (target("0.0.0.0/0", Protocol::Tcp, RDP), HOUR),
        (target("192.0.2.7/32", Protocol::Udp, SYSLOG), HOUR),
        (target("2001:db8::/32", Protocol::Tcp, SSH), HOUR),
        (target("2001:db8::/64", Protocol::Tcp, SSH), 2 * HOUR),
        (target("2001:db8::5/128", Protocol::Tcp, SSH), 4 * HOUR),
        (target("2001:db8:1::/48", Protocol::Udp, SYSLOG), HOUR),
    ];
    NftState {
        protected: protected(&[
            (Protocol::Tcp, SSH),
            (Protocol::Tcp, RDP),
            (Protocol::Udp, SYSLOG),
        ]),
        allowed: allowed.into_iter().collect(),
    }
}

#[test]
fn install_then_read_round_trips_and_remove_deletes() {
    let ns = Netns::new("jgn");
    let gate = NsGate::new(&ns);
    assert_eq!(gate.run(NftGate::read).expect("read"), None, "no table yet");
    assert!(
        !gate.run(NftGate::remove).expect("remove"),
        "nothing to remove"
    );

    let state = sample_state();
    gate.install(&state);
    assert_matches(&gate.read(), &state);

    // Installing again replaces the whole table.
    let smaller = NftState {
        protected: protected(&[(Protocol::Udp, SYSLOG)]),
        allowed: [(target("198.51.100.0/24", Protocol::Udp, SYSLOG), HOUR)].into(),
    };
    gate.install(&smaller);
    assert_matches(&gate.read(), &smaller);

    assert!(gate.run(NftGate::remove).expect("remove"), "table existed");
    assert_eq!(gate.run(NftGate::read).expect("read"), None, "table gone");
}

#[test]
fn sources_are_stored_masked_to_their_prefix() {
    let ns = Netns::new("jgn");
    let gate = NsGate::new(&ns);
    gate.install(&NftState {
        protected: protected(&[(Protocol::Tcp, SSH)]),
        allowed: [(target("10.1.2.3/24", Protocol::Tcp, SSH), HOUR)].into(),
    });
    let read = gate.read();
    assert_eq!(
        read.allowed.keys().collect::<Vec<_>>(),
        [&target("10.1.2.0/24", Protocol::Tcp, SSH)]
    );
}

#[test]
fn nft_lists_the_documented_ruleset() {
    let ns = Netns::new("jgn");
    let gate = NsGate::new(&ns);
    gate.install(&sample_state());
    let listing = gate.listing();
    for line in [
        "type filter hook input priority filter - 10; policy accept;",
        "meta l4proto . th dport @protected jump gate",
        "ct state established,related accept",
        "jump allow",
        "counter packets 0 bytes 0 drop",
        "jhash ip saddr & 255.255.0.0 . meta l4proto . th dport mod 64 seed 0x6a697467 vmap @allow_v4_16\n",
        "chain allow_v4_16_63 {",
        "ip saddr & 255.255.0.0 . meta l4proto . th dport @allow_v4_16_63 accept",
        "ip saddr . meta l4proto . th dport @allow_v4_32_0 accept",
        "ip6 saddr & ffff:ffff:ffff:ffff:: . meta l4proto . th dport @allow_v6_64_17 accept",
        "map allow_v4_16 {",
        "flags constant",
        "jump allow_v4_16_63",
        "type ipv4_addr . inet_proto . inet_service",
        "type inet_proto . inet_service",
        "10.0.0.0 . tcp . 22 timeout 1h",
    ] {
        assert!(listing.contains(line), "missing {line:?} in:\n{listing}");
    }
}

#[test]
fn dispatch_maps_are_constant_and_misplaced_elements_grant_nothing() {
    let ns = Netns::new("jgn");
    let gate = NsGate::new(&ns);
    gate.install(&sample_state());
    let nft = |command: &str| {
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "nft", command])
            .output()
            .expect("run nft")
    };
    let table = gate.gate.table().to_owned();
    for change in [
        format!("add element inet {table} allow_v4_32 {{ 0x40 : jump allow_v4_32_0 }}"),
        format!("delete element inet {table} allow_v4_32 {{ 0x0 }}"),
    ] {
        let out = nft(&change);
        assert!(
            !out.status.success(),
            "the kernel took `{change}` on a bound constant map"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("busy"),
            "{change}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // An element in a shard its hash does not select: no packet reaches
    // it there, so the read must not count it as a grant.
    let stray = target("10.9.9.9/32", Protocol::Tcp, SSH);
    let right = NftGate::set_holding(&stray);
    let shard: u32 = right.rsplit('_').next().unwrap().parse().unwrap();
    let wrong = format!("allow_v4_32_{}", (shard + 1) % 64);
    let add_stray = |set: &str| {
        let out = nft(&format!(
            "add element inet {table} {set} {{ 10.9.9.9 . tcp . 22 timeout 1h }}"
        ));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    add_stray(&wrong);
    let read = gate.read_all();
    assert_matches(&read.state, &sample_state());
    let [misplaced] = read.strays.as_slice() else {
        panic!("one stray element expected: {:?}", read.strays);
    };
    assert_eq!(misplaced.target, Some(stray));
    assert_eq!(misplaced.to_string(), format!("{stray} in set {wrong}"));
    gate.run(|g| g.remove_strays(&read.strays))
        .expect("remove the stray");
    assert!(!gate.listing().contains("10.9.9.9"), "{}", gate.listing());
    // In its own shard it is a grant.
    add_stray(&right);
    assert!(gate.read().allowed.contains_key(&stray));
}

#[test]
fn add_refreshes_and_remove_ignores_absent_elements() {
    let ns = Netns::new("jgn");
    let gate = NsGate::new(&ns);
    let net = target("10.0.0.0/8", Protocol::Tcp, SSH);
    let addr = target("10.0.0.1/32", Protocol::Tcp, SSH);
    let v6 = target("2001:db8::/56", Protocol::Udp, SYSLOG);
    assert!(
        matches!(
            gate.run(|g| g.add_allowed(&[(net, HOUR)])),
            Err(NftError::NotInstalled { .. })
        ),
        "adding to a missing table"
    );
    gate.run(|g| g.remove_allowed(&[net]))
        .expect("removing from a missing table is not an error");

    gate.install(&NftState {
        protected: protected(&[(Protocol::Tcp, SSH), (Protocol::Udp, SYSLOG)]),
        allowed: BTreeMap::new(),
    });
    // New prefix lengths create their sets on the way.
    gate.add(&[(net, HOUR), (addr, HOUR), (v6, HOUR)]);
    let mut expected = NftState {
        protected: protected(&[(Protocol::Tcp, SSH), (Protocol::Udp, SYSLOG)]),
        allowed: [(net, HOUR), (addr, HOUR), (v6, HOUR)].into(),
    };
    assert_matches(&gate.read(), &expected);

    // Adding again refreshes the timeout, shorter or longer; the last of
    // duplicates wins.
    gate.add(&[(net, 60 * HOUR), (addr, HOUR / 2), (addr, HOUR / 4)]);
    expected.allowed.insert(net, 60 * HOUR);
    expected.allowed.insert(addr, HOUR / 4);
    assert_matches(&gate.read(), &expected);

    // New elements are created alone; a batch mixing new and present ones
    // (which the kernel refuses to create) is replaced whole, new timeouts
    // included, and the gate's next write still works.
    let fresh = target("10.0.0.9/32", Protocol::Tcp, SSH);
    gate.add(&[(fresh, HOUR), (net, 2 * HOUR)]);
    expected.allowed.insert(fresh, HOUR);
    expected.allowed.insert(net, 2 * HOUR);
    assert_matches(&gate.read(), &expected);
    let later = target("10.0.0.10/32", Protocol::Tcp, SSH);
    gate.add(&[(later, HOUR)]);
    expected.allowed.insert(later, HOUR);
    assert_matches(&gate.read(), &expected);
    gate.remove(&[fresh, later]);
    expected.allowed.remove(&fresh);
    expected.allowed.remove(&later);

    // Absent elements, in existing and missing sets, are ignored.
    gate.remove(&[
        addr,
        target("10.0.0.2/32", Protocol::Tcp, SSH),
        target("10.0.0.1/32", Protocol::Udp, SSH),
        target("172.16.0.0/12", Protocol::Tcp, SSH),
        target("2001:db8::/56", Protocol::Tcp, SYSLOG),
    ]);
    expected.allowed.remove(&addr);
    assert_matches(&gate.read(), &expected);
    gate.remove(&[addr, net, v6]);
    expected.allowed.clear();
    assert_matches(&gate.read(), &expected);
}

/// A gate remembers which allow groups its table holds rather than list
/// the table's sets on every write; whoever changes the table behind it
/// (deletes it, installs it anew with other groups) must not make its
/// writes fail or go astray.
#[test]
fn writes_follow_changes_made_behind_the_gate() {
    let ns = Netns::new("jgn");
    let gate = NsGate::new(&ns);
    let other = NsGate {
        ns: &ns,
        gate: NftGate::new(gate.gate.table()),
    };
    let ssh = protected(&[(Protocol::Tcp, SSH)]);
    let addr = target("10.0.0.1/32", Protocol::Tcp, SSH);
    let net = target("10.1.0.0/24", Protocol::Tcp, SSH);
    gate.install(&NftState {
        protected: ssh.clone(),
        allowed: BTreeMap::new(),
    });
    gate.add(&[(addr, HOUR)]);

    ns.exec("nft", &["delete", "table", "inet", gate.gate.table()]);
    assert!(
        matches!(
            gate.run(|g| g.add_allowed(&[(addr, HOUR)])),
            Err(NftError::NotInstalled { .. })
        ),
        "adding to a table deleted behind the gate"
    );
    gate.remove(&[addr]);

    // Installed anew without the /32 group the gate had created.
    other.install(&NftState {
        protected: ssh.clone(),
        allowed: BTreeMap::new(),
    });
    gate.add(&[(addr, HOUR)]);
    // And with a /24 group the gate never saw.
    other.install(&NftState {
        protected: ssh.clone(),
        allowed: [(net, HOUR)].into(),
    });
    gate.add(&[(net, 2 * HOUR), (addr, HOUR)]);
    assert_matches(
        &gate.read(),
        &NftState {
            protected: ssh,
            allowed: [(net, 2 * HOUR), (addr, HOUR)].into(),
        },
    );
    gate.remove(&[net, addr]);
    assert_eq!(gate.read().allowed, BTreeMap::new());
}

#[test]
fn zero_timeouts_and_bad_names_are_refused() {
    let ns = Netns::new("jgn");
    let gate = NsGate::new(&ns);
    gate.install(&NftState::default());
    let t = target("10.0.0.1/32", Protocol::Tcp, SSH);
    let refused = gate.run(|g| g.add_allowed(&[(t, Duration::ZERO)]));
    assert!(
        matches!(refused, Err(NftError::ZeroTimeout { .. })),
        "{refused:?}"
    );
    // Anything above zero rounds up to whole milliseconds, never down.
    gate.add(&[(t, Duration::from_nanos(1))]);
    let bad_name = ns.run(|| NftGate::new("bad\0name").install(&NftState::default()));
    assert!(
        matches!(bad_name, Err(NftError::InvalidTableName(_))),
        "a name with NUL: {bad_name:?}"
    );
}

#[test]
fn elements_expire_by_themselves() {
    let ns = Netns::new("jgn");
    let gate = NsGate::new(&ns);
    let short = target("10.0.0.1/32", Protocol::Tcp, SSH);
    let long = target("10.0.0.0/24", Protocol::Tcp, SSH);
    gate.install(&NftState {
        protected: protected(&[(Protocol::Tcp, SSH)]),
        allowed: [(short, Duration::from_secs(2)), (long, HOUR)].into(),
    });
    let before = gate.read();
    assert!(before.allowed.contains_key(&short), "{before:?}");
    std::thread::sleep(Duration::from_millis(2500));
    let after = gate.read();
    assert_eq!(
        after.allowed.keys().collect::<Vec<_>>(),
        [&long],
        "only the 2 s element expired"
    );
}

#[test]
fn set_protected_keeps_allowed_elements() {
    let ns = Netns::new("jgn");
    let gate = NsGate::new(&ns);
    let mut state = sample_state();
    gate.install(&state);
    state.protected = protected(&[(Protocol::Tcp, 5985), (Protocol::Tcp, 5986)]);
    gate.run(|g| g.set_protected(&state.protected))
        .expect("set_protected");
    assert_matches(&gate.read(), &state);
    state.protected.clear();
    gate.run(|g| g.set_protected(&state.protected))
        .expect("set_protected to nothing");
    assert_matches(&gate.read(), &state);
}

/// 100,000 distinct targets: IPv4 hosts in 10.0.0.0/8 over three ports
/// and, one in ten, IPv6 /64 prefixes.
fn many_targets(n: u32) -> Vec<GrantTarget> {
    (0..n)
        .map(|i| {
            if i % 10 == 0 {
                let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0, i as u16, 0, 0, 0, 0);
                GrantTarget {
                    source: IpNet::new(v6.into(), 64).expect("prefix"),
                    protocol: Protocol::Tcp,
                    port: SSH,
                }
            } else {
                host(
                    Ipv4Addr::from(0x0a00_0000 + i),
                    Protocol::Tcp,
                    [SSH, RDP, 5985][(i % 3) as usize],
                )
            }
        })
        .collect()
}

#[test]
fn hundred_thousand_elements_install_add_and_read() {
    const N: u32 = 100_000;
    let ns = Netns::new("jgn");
    let gate = NsGate::new(&ns);
    let targets = many_targets(N);
    let state = NftState {
        protected: protected(&[(Protocol::Tcp, SSH), (Protocol::Tcp, RDP)]),
        allowed: targets.iter().map(|t| (*t, HOUR)).collect(),
    };
    assert_eq!(state.allowed.len(), N as usize);

    let started = Instant::now();
    gate.install(&state);
    let install = started.elapsed();
    let started = Instant::now();
    let read = gate.read();
    let read_time = started.elapsed();
    assert_matches(&read, &state);

    // The same again through add_allowed on an empty table: one batch.
    gate.install(&NftState {
        protected: state.protected.clone(),
        allowed: BTreeMap::new(),
    });
    let entries: Vec<_> = targets.iter().map(|t| (*t, 2 * HOUR)).collect();
    let started = Instant::now();
    gate.add(&entries);
    let add = started.elapsed();
    assert_eq!(gate.read().allowed.len(), N as usize);

    // Refreshing all of them (to a shorter timeout) is one batch too.
    let entries: Vec<_> = targets.iter().map(|t| (*t, HOUR / 2)).collect();
    let started = Instant::now();
    gate.add(&entries);
    let refresh = started.elapsed();
    let read = gate.read();
    assert_eq!(read.allowed.len(), N as usize);
    assert!(
        read.allowed.values().all(|left| *left <= HOUR / 2),
        "refreshed timeouts"
    );

    let started = Instant::now();
    gate.remove(&targets);
    let remove = started.elapsed();
    assert!(gate.read().allowed.is_empty());
    eprintln!(
        "nft, {N} elements: install {install:?}, read {read_time:?}, add_allowed {add:?}, \
         refresh {refresh:?}, remove_allowed {remove:?}"
    );
}

/// (client source, gated address) pairs for both families.
const FAMILIES: [(IpAddr, IpAddr); 2] = [
    (IpAddr::V4(CLIENT_V4), IpAddr::V4(GATED_V4)),
    (IpAddr::V6(CLIENT_V6), IpAddr::V6(GATED_V6)),
];
/// Client sources outside the prefixes granted below (192.0.2.0/25 and
/// `2001:db8::/112`), with the gated address of their family.
const OUTSIDERS: [(IpAddr, IpAddr); 2] = [
    (IpAddr::V4(CLIENT_V4_OUTSIDE), IpAddr::V4(GATED_V4)),
    (IpAddr::V6(CLIENT_V6_OUTSIDE), IpAddr::V6(GATED_V6)),
];

/// `target` widened to the prefix that covers the main client address but
/// not the outsider of its family.
fn covering(target: GrantTarget) -> GrantTarget {
    let prefix_len = if target.source.addr().is_ipv4() {
        25
    } else {
        112
    };
    GrantTarget {
        source: IpNet::new(target.source.addr(), prefix_len)
            .expect("prefix")
            .trunc(),
        ..target
    }
}

/// Two namespaces over veth, nftables the only enforcer in the gated one,
/// protecting TCP 22 and UDP 514, with echo servers on 22 and an open port.
struct Live {
    topo: Topology,
    table: String,
    _servers: Vec<TcpEcho>,
}

impl Live {
    fn new() -> Self {
        let topo = Topology::new();
        let live = Live {
            table: unique_name("jgt"),
            _servers: FAMILIES
                .iter()
                .flat_map(|(_, gated)| {
                    [SSH, OPEN_PORT]
                        .map(|port| TcpEcho::start(&topo.gated, SocketAddr::new(*gated, port)))
                })
                .collect(),
            topo,
        };
        live.gate().install(&NftState {
            protected: protected(&[(Protocol::Tcp, SSH), (Protocol::Udp, SYSLOG)]),
            allowed: BTreeMap::new(),
        });
        live
    }

    fn gate(&self) -> NsGate<'_> {
        NsGate {
            ns: &self.topo.gated,
            gate: NftGate::new(self.table.clone()),
        }
    }

    fn connect(&self, src: IpAddr, gated: IpAddr, port: u16) -> Connect {
        tcp_connect(&self.topo.client, src, SocketAddr::new(gated, port))
    }

    fn assert_ssh_blocked(&self, src: IpAddr, gated: IpAddr, why: &str) {
        self.connect(src, gated, SSH)
            .expect_timed_out(&format!("{why} ({src})"));
    }

    fn assert_ssh_open(&self, src: IpAddr, gated: IpAddr, why: &str) {
        let mut s = self
            .connect(src, gated, SSH)
            .expect_connected(&format!("{why} ({src})"));
        round_trip(&mut s, b"granted").unwrap_or_else(|e| panic!("{why} ({src}): echo: {e}"));
    }
}

#[test]
fn without_grant_protected_ports_drop_and_others_are_untouched() {
    let live = Live::new();
    for (src, gated) in FAMILIES {
        live.assert_ssh_blocked(src, gated, "no grant");
        let mut s = live
            .connect(src, gated, OPEN_PORT)
            .expect_connected("unprotected port");
        round_trip(&mut s, b"open").expect("unprotected port echoes");

        let sink = UdpSink::start(&live.topo.gated, SocketAddr::new(gated, SYSLOG));
        let dst = SocketAddr::new(gated, SYSLOG);
        udp_send(&live.topo.client, src, dst, b"denied");
        assert!(
            !sink.arrives(b"denied"),
            "UDP arrived without grant ({src})"
        );
        live.gate().add(&[(host(src, Protocol::Udp, SYSLOG), HOUR)]);
        udp_send(&live.topo.client, src, dst, b"granted");
        assert!(sink.arrives(b"granted"), "UDP under a grant ({src})");
    }
    let listing = live.gate().listing();
    assert!(
        !listing.contains("counter packets 0 "),
        "the drop rule counted the dropped packets:\n{listing}"
    );
}

#[test]
fn exact_and_covering_prefix_grants_open_for_their_sources_only() {
    let live = Live::new();
    let gate = live.gate();
    for ((src, gated), (outsider, _)) in FAMILIES.into_iter().zip(OUTSIDERS) {
        let exact = host(src, Protocol::Tcp, SSH);
        gate.add(&[(exact, HOUR)]);
        live.assert_ssh_open(src, gated, "exact grant");
        live.assert_ssh_blocked(outsider, gated, "another source");

        gate.remove(&[exact]);
        live.assert_ssh_blocked(src, gated, "exact grant removed");
        let covering = covering(exact);
        // A grant for the wrong protocol opens nothing.
        gate.add(&[(
            GrantTarget {
                protocol: Protocol::Udp,
                ..covering
            },
            HOUR,
        )]);
        live.assert_ssh_blocked(src, gated, "UDP grant only");
        gate.add(&[(covering, HOUR)]);
        live.assert_ssh_open(src, gated, "covering prefix");
        live.assert_ssh_blocked(outsider, gated, "outside the prefix");
    }
}

#[test]
fn a_source_is_allowed_while_any_overlapping_grant_covers_it() {
    let live = Live::new();
    let gate = live.gate();
    for (src, _) in FAMILIES {
        let exact = host(src, Protocol::Tcp, SSH);
        gate.add(&[(exact, Duration::from_secs(2)), (covering(exact), HOUR)]);
    }
    std::thread::sleep(Duration::from_millis(2200));
    for (src, gated) in FAMILIES {
        let exact = host(src, Protocol::Tcp, SSH);
        assert!(
            !gate.read().allowed.contains_key(&exact),
            "exact grant expired"
        );
        live.assert_ssh_open(src, gated, "covering prefix still live");
        gate.remove(&[covering(exact)]);
        live.assert_ssh_blocked(src, gated, "no grant left");
    }
}

#[test]
fn established_connections_outlive_their_grant_and_expiry_blocks_new_ones() {
    let live = Live::new();
    let gate = live.gate();
    for (src, gated) in FAMILIES {
        let grant = host(src, Protocol::Tcp, SSH);
        gate.add(&[(grant, HOUR)]);
        let mut kept = live
            .connect(src, gated, SSH)
            .expect_connected("under grant");
        gate.remove(&[grant]);
        round_trip(&mut kept, b"after removal").expect("established connection survives removal");
        live.assert_ssh_blocked(src, gated, "grant removed");

        gate.add(&[(grant, Duration::from_secs(2))]);
        let mut early = live
            .connect(src, gated, SSH)
            .expect_connected("before expiry");
        let deadline = Instant::now() + Duration::from_millis(2200);
        while gate.read().allowed.contains_key(&grant) {
            assert!(Instant::now() < deadline, "element outlived its timeout");
            std::thread::sleep(Duration::from_millis(100));
        }
        live.assert_ssh_blocked(src, gated, "grant expired");
        round_trip(&mut early, b"after expiry").expect("established connection survives expiry");
        round_trip(&mut kept, b"still").expect("older connection still up");
    }
}
