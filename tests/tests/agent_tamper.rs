//! Tampering behind the agent's back (issue 7, defects 5 and 6): the pin
//! directory removed, the gate's XDP link detached, a foreign XDP program
//! put in its place, the source filter cleared, nftables chains flushed,
//! rules deleted, the table flushed, made dormant or deleted. Each is found and repaired within one
//! reconciliation, recorded as drift, and `status` says what is wrong until
//! then. The oracle is the kernel: a real TCP connection from the client
//! namespace, from a granted source and from an ungranted one.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{Array, Map, MapData};
use jit_gate_agent::{config::Mode, proto};
use jit_gate_common::maps::{
    names,
    source_filter::{self, Shape},
};
use jit_gate_tests::{
    agent::{Agent, AgentHost, Api, Events},
    env::PinDir,
    netns::{CLIENT_V4, CLIENT_V4_OUTSIDE, GATED_V4, nsenter},
    traffic::{TcpEcho, expect_access},
};

const SSH: u16 = 22;
/// Long enough that a tamper made right after one reconciliation can be
/// seen in `status` before the next.
const RECONCILE: Duration = Duration::from_secs(3);
/// A repair must come at the next reconciliation: within one interval,
/// plus the time to make it and the slack of a loaded machine (the agent
/// stretches its interval when reconciling takes long, see README).
const REPAIRED_WITHIN: Duration = Duration::from_secs(6);

fn ssh() -> SocketAddr {
    SocketAddr::new(GATED_V4.into(), SSH)
}

fn host(mode: Mode) -> AgentHost {
    AgentHost::new(
        mode,
        &format!("reconcile_interval = \"{}s\"", RECONCILE.as_secs()),
    )
}

/// The granted client connects, the other is dropped: the gate holds.
fn gate_holds(host: &AgentHost, step: &str) {
    expect_access(
        &host.topo.client,
        step,
        &[
            (CLIENT_V4.into(), ssh(), true),
            (CLIENT_V4_OUTSIDE.into(), ssh(), false),
        ],
    );
}

/// Waits for the drift repair that follows a tamper made at `at`; returns
/// how long it took. Panics with the agent's log if it does not come.
async fn repaired(
    agent: &Agent,
    events: &mut Events,
    what: &str,
    layer: &str,
    at: Instant,
) -> Duration {
    let awaited = events.expect(
        proto::EventKind::DriftRepaired,
        SystemTime::now() + 2 * REPAIRED_WITHIN,
        |_| true,
    );
    let event = tokio::time::timeout(REPAIRED_WITHIN, awaited)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: not repaired within {REPAIRED_WITHIN:?}; agent log:\n{}",
                agent.log_text()
            )
        });
    let took = at.elapsed();
    assert!(
        event.message.contains(layer),
        "{what}: repair reported as {:?}",
        event.message
    );
    eprintln!(
        "{what}: repaired {took:?} after the tamper: {}",
        event.message
    );
    took
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program} (`cargo xtask bootstrap` installs it): {e}"))
}

/// The id of the `bpf_link` pinned at `path`.
fn link_id(path: &std::path::Path) -> String {
    let out = run(
        "bpftool",
        &["-j", "link", "show", "pinned", &path.display().to_string()],
    );
    assert!(out.status.success(), "bpftool link show: {out:?}");
    let link: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    link["id"].to_string()
}

async fn interface_status(api: &mut Api, ifname: &str) -> proto::InterfaceStatus {
    let status = api.status().await;
    status
        .interfaces
        .iter()
        .find(|i| i.name == ifname)
        .cloned()
        .unwrap_or_else(|| panic!("{ifname} is not in the status: {status:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_pins_removed_links_detached_and_foreign_programs_are_repaired() {
    let host = host(Mode::Xdp);
    let (agent, mut api) = host.start().await;
    let _server = TcpEcho::start(&host.topo.gated, ssh());
    let ifname = host.topo.gated_if.clone();
    let pins = host.files.pins.path.clone();
    let link_pin = pins.join(format!("link-{ifname}"));
    let mut events = api.watch(None).await;
    api.grant("g", SSH, proto::Protocol::Tcp, CLIENT_V4, 600)
        .await;
    gate_holds(&host, "granted");
    let status = api.status().await;
    assert!(status.healthy, "{status:#?}");

    // The pin directory removed: the agent's own handles keep the gate up,
    // and the pins come back from them.
    let at = Instant::now();
    std::fs::remove_dir_all(&pins).expect("rm -rf the pin directory");
    gate_holds(&host, "pin directory removed");
    repaired(
        &agent,
        &mut events,
        "pin directory removed",
        "pins missing",
        at,
    )
    .await;
    for pin in ["program", "GRANTS_V4", "PROTECTED_PORTS"] {
        assert!(pins.join(pin).exists(), "{pin} not pinned again");
    }
    assert!(link_pin.exists(), "link not pinned again");

    // Right after a repair (the next check is a reconciliation away): the
    // gate's link detached. The port is open until the repair, and status
    // says so meanwhile.
    let at = Instant::now();
    let out = run("bpftool", &["link", "detach", "id", &link_id(&link_pin)]);
    assert!(out.status.success(), "bpftool link detach: {out:?}");
    let meanwhile = interface_status(&mut api, &ifname).await;
    assert!(
        meanwhile.problem.contains("no XDP program"),
        "status while the link is detached: {meanwhile:?}"
    );
    assert!(!api.status().await.healthy);
    repaired(&agent, &mut events, "link detached", &ifname, at).await;
    gate_holds(&host, "link detached, repaired");
    let after = interface_status(&mut api, &ifname).await;
    assert!(after.problem.is_empty(), "{after:?}");
    assert!(
        after
            .last_repair
            .as_ref()
            .is_some_and(|r| r.what.contains("detached")),
        "{after:?}"
    );

    // A foreign XDP program (another instance of the gate, protecting
    // nothing) put in the gate's place: removed, the gate attached again.
    let foreign = PinDir::new();
    let _foreign_gate = foreign.open_gate();
    let at = Instant::now();
    let out = run("bpftool", &["link", "detach", "id", &link_id(&link_pin)]);
    assert!(out.status.success(), "bpftool link detach: {out:?}");
    // Through nsenter: `ip -n` remounts /sys, hiding bpffs.
    let out = nsenter(&host.topo.gated.name, "ip")
        .args(["link", "set", "dev", &ifname, "xdp", "pinned"])
        .arg(foreign.path.join("program"))
        .output()
        .expect("run ip");
    assert!(out.status.success(), "attaching a foreign program: {out:?}");
    repaired(
        &agent,
        &mut events,
        "foreign program attached",
        "instead of the gate's",
        at,
    )
    .await;
    gate_holds(&host, "foreign program replaced");

    // While the gate's link is attached the kernel refuses to take the
    // program off with `ip link` (`xdpgeneric off` finds nothing to take:
    // the gate runs natively here).
    for (slot, refused) in [("xdp", true), ("xdpgeneric", false)] {
        let ns = &host.topo.gated.name;
        let out = run(
            "ip",
            &["-n", ns, "link", "set", "dev", &ifname, slot, "off"],
        );
        assert!(
            !refused || !out.status.success(),
            "`ip link set {slot} off` detached the gate"
        );
        gate_holds(&host, &format!("after `ip link set {slot} off`"));
    }

    // The pins put back are real: the gate outlives a killed agent.
    agent.kill();
    gate_holds(&host, "agent killed after the repairs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_table_tampering_is_repaired_whole() {
    let host = host(Mode::Nftables);
    let (agent, mut api) = host.start().await;
    let _server = TcpEcho::start(&host.topo.gated, ssh());
    let mut events = api.watch(None).await;
    api.grant("g", SSH, proto::Protocol::Tcp, CLIENT_V4, 600)
        .await;
    gate_holds(&host, "granted");

    let tampers: [(&str, Vec<&str>); 5] = [
        (
            "chain gate flushed",
            vec!["flush", "chain", "inet", "jit_gate", "gate"],
        ),
        (
            "drop rule deleted",
            vec!["delete", "rule", "inet", "jit_gate", "gate", "handle"],
        ),
        ("table flushed", vec!["flush", "table", "inet", "jit_gate"]),
        (
            "table made dormant",
            vec!["add", "table", "inet", "jit_gate", "{ flags dormant; }"],
        ),
        ("table deleted", vec!["delete", "table", "inet", "jit_gate"]),
    ];
    let mut first = true;
    for (what, mut args) in tampers {
        if args.last() == Some(&"handle") {
            let handle = drop_rule_handle(&host);
            args.push(Box::leak(handle.into_boxed_str()));
        }
        let at = Instant::now();
        host.nft(&args);
        // Each tamper but the first comes right after a repair, so the next
        // reconciliation is a whole interval away: status must show it.
        if !first {
            let status = api.status().await;
            let nftables = status.nftables.clone().expect("nftables layer");
            assert!(
                !nftables.problem.is_empty() && !status.healthy,
                "{what}: status meanwhile says {status:#?}"
            );
        }
        first = false;
        repaired(&agent, &mut events, what, "nftables", at).await;
        gate_holds(&host, &format!("{what}, repaired"));
        host.assert_enforced(&mut api, what).await;
    }
    let status = api.status().await;
    let nftables = status.nftables.expect("nftables layer");
    assert!(nftables.problem.is_empty(), "{nftables:?}");
    assert!(
        nftables
            .last_repair
            .is_some_and(|r| r.what.contains("missing")),
        "the last repair (table deleted) is reported"
    );
}

/// The handle of the `counter drop` rule of chain `gate`.
fn drop_rule_handle(host: &AgentHost) -> String {
    let out = host.topo.gated.exec(
        "nft",
        &["-a", "-j", "list", "chain", "inet", "jit_gate", "gate"],
    );
    let listed: serde_json::Value = serde_json::from_str(&out).expect("nft JSON");
    listed["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter_map(|o| o.get("rule"))
        .find(|rule| rule["expr"].to_string().contains("\"drop\""))
        .map(|rule| rule["handle"].to_string())
        .expect("a drop rule in chain gate")
}

fn pinned_source_filter(pins: &std::path::Path) -> Array<MapData, u64> {
    MapData::from_pin(pins.join(names::SOURCE_FILTER))
        .and_then(Map::from_map_data)
        .and_then(Array::try_from)
        .expect("the pinned source filter")
}

/// Clears every bit of the pinned source filter's bitmap in use, as anyone
/// with the pin could: the program then drops every source with an exact
/// grant.
fn clear_source_filter(pins: &std::path::Path) {
    let mut filter = pinned_source_filter(pins);
    let shape = filter
        .get(&source_filter::SHAPE_WORD, 0)
        .ok()
        .and_then(Shape::decode)
        .expect("the agent wrote the filter's shape");
    for bit in (0..shape.words()).map(|word| word * 64) {
        filter
            .set(shape.word_index(bit), 0, 0)
            .expect("clear a word");
    }
}

/// Zeroes the pinned source filter's shape word: the program can no
/// longer use the bitmap and looks every source up instead.
fn scribble_source_filter_shape(pins: &std::path::Path) {
    pinned_source_filter(pins)
        .set(source_filter::SHAPE_WORD, 0, 0)
        .expect("zero the shape word");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xdp_source_filter_cleared_is_repaired() {
    let host = host(Mode::Xdp);
    let (agent, mut api) = host.start().await;
    let _server = TcpEcho::start(&host.topo.gated, ssh());
    let pins = host.files.pins.path.clone();
    let mut events = api.watch(None).await;
    api.grant("g", SSH, proto::Protocol::Tcp, CLIENT_V4, 600)
        .await;
    gate_holds(&host, "granted");

    let at = Instant::now();
    clear_source_filter(&pins);
    repaired(
        &agent,
        &mut events,
        "source filter cleared",
        "source filter missing 1 granted",
        at,
    )
    .await;

    // Right after a repair (the next check is a reconciliation away): the
    // granted source is dropped until the filter is repaired again.
    clear_source_filter(&pins);
    expect_access(
        &host.topo.client,
        "source filter cleared",
        &[(CLIENT_V4.into(), ssh(), false)],
    );
    let at = Instant::now();
    repaired(
        &agent,
        &mut events,
        "source filter cleared again",
        "source filter missing 1 granted",
        at,
    )
    .await;
    gate_holds(&host, "source filter repaired again");

    // Without a shape word the program looks every source up: slower,
    // still right; the agent rebuilds the filter.
    let at = Instant::now();
    scribble_source_filter_shape(&pins);
    gate_holds(&host, "source filter shape scribbled");
    repaired(
        &agent,
        &mut events,
        "source filter shape scribbled",
        "source filter missing 1 granted",
        at,
    )
    .await;
    gate_holds(&host, "source filter shape rebuilt");
}
