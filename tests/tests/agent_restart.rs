//! The agent's first start, restarts and a simulated reboot, end to end: a
//! real agent in the gated namespace, driven over its gRPC socket. The
//! kernel keeps enforcing while the agent is down; a restarted agent takes
//! its grants up again without opening or closing anything.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use jit_gate_agent::{config::Mode, enforce::xdp::XdpGate, proto};
use jit_gate_tests::{
    agent::{AgentHost, Api, wall_time, without_remaining},
    netns::{CLIENT_V4, CLIENT_V4_OUTSIDE, CLIENT_V6, GATED_V4, GATED_V6},
    traffic::{TcpEcho, expect_access, round_trip, tcp_connect},
};

const SSH: u16 = 22;
const TCP: proto::Protocol = proto::Protocol::Tcp;

fn ssh() -> SocketAddr {
    SocketAddr::new(GATED_V4.into(), SSH)
}

fn host() -> AgentHost {
    AgentHost::new(Mode::XdpAndNftables, "")
}

/// The listed connection whose client end is `remote`.
async fn connection(api: &mut Api, remote: &str) -> proto::Connection {
    let listed = api.connections().await;
    listed
        .iter()
        .find(|c| c.remote == remote)
        .cloned()
        .unwrap_or_else(|| panic!("connection from {remote} not listed: {listed:?}"))
}

fn details(event: &proto::Event) -> serde_json::Value {
    serde_json::from_str(&event.details_json).expect("event details are JSON")
}

/// A session opened before the gate ever ran keeps working once the agent
/// has started (seeded from the socket table into the XDP flow map and
/// conntrack), while a new connection without a grant is dropped.
async fn sessions_survive_the_first_start(mode: Mode) {
    let host = AgentHost::new(mode, "");
    let _server = TcpEcho::start(&host.topo.gated, ssh());
    let client = &host.topo.client;
    let mut session = tcp_connect(client, CLIENT_V4.into(), ssh()).expect_connected("no gate yet");
    round_trip(&mut session, b"hello").expect("echo without a gate");

    let (_agent, mut api) = host.start().await;
    round_trip(&mut session, b"gate on").expect("the session survives the gate's start");
    expect_access(
        client,
        "gate on, no grant",
        &[
            (CLIENT_V4.into(), ssh(), false),
            (CLIENT_V4_OUTSIDE.into(), ssh(), false),
        ],
    );
    host.assert_enforced(&mut api, "gate on, no grant").await;
    let remote = session.local_addr().unwrap().to_string();
    assert_eq!(connection(&mut api, &remote).await.grant_id, 0);
    round_trip(&mut session, b"still").expect("the session keeps working");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_established_before_the_first_start_survive_it() {
    sessions_survive_the_first_start(Mode::XdpAndNftables).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_established_before_the_first_start_survive_it_in_nftables_mode() {
    sessions_survive_the_first_start(Mode::Nftables).await;
}

enum Stop {
    Sigterm,
    Sigkill,
}

async fn restart_keeps_grants_and_sessions(stop: Stop) {
    let host = host();
    let (agent, mut api) = host.start().await;
    let _server = TcpEcho::start(&host.topo.gated, ssh());
    let client = &host.topo.client;
    let mut events = api.watch(None).await;
    let grant = api.grant("g", SSH, TCP, CLIENT_V4, 120).await;
    let mut session = tcp_connect(client, CLIENT_V4.into(), ssh()).expect_connected("granted");
    round_trip(&mut session, b"hello").expect("echo under the grant");
    let remote = session.local_addr().unwrap().to_string();
    // The first run audits the session, so the next must not do it again.
    events
        .expect(
            proto::EventKind::ConnectionOpened,
            SystemTime::now() + Duration::from_secs(3),
            |e| details(e)["remote"] == remote.as_str(),
        )
        .await;
    host.assert_enforced(&mut api, "before the stop").await;
    let active = api.grants(false).await;
    let last = api
        .audit_log()
        .await
        .last()
        .expect("audit records")
        .sequence;

    match stop {
        Stop::Sigterm => {
            // An open event stream must not hold the stop up.
            let status = agent.stop();
            assert!(status.success(), "graceful stop exited with {status}");
            events.expect_unavailable().await;
        }
        Stop::Sigkill => agent.kill(),
    }
    expect_access(
        client,
        "agent down",
        &[(CLIENT_V4_OUTSIDE.into(), ssh(), false)],
    );
    let mut opened_while_down =
        tcp_connect(client, CLIENT_V4.into(), ssh()).expect_connected("granted, agent down");
    round_trip(&mut opened_while_down, b"hi").expect("echo while the agent is down");
    round_trip(&mut session, b"agent down").expect("the session works while the agent is down");
    host.assert_enforces(&active, "agent down");

    let (_agent, mut api) = host.start().await;
    assert_eq!(
        without_remaining(api.grants(false).await),
        without_remaining(active.clone()),
        "grants after the restart"
    );
    round_trip(&mut session, b"restarted").expect("the session survives the restart");
    assert_eq!(connection(&mut api, &remote).await.grant_id, grant.id);
    host.assert_enforced(&mut api, "after the restart").await;

    // Long enough for the restarted agent to observe flows and reconcile.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let since = api.watch(Some(last)).await.until_quiet().await;
    let started: Vec<_> = since
        .iter()
        .filter(|e| e.kind == proto::EventKind::AgentStarted as i32)
        .collect();
    assert_eq!(started.len(), 1, "{since:#?}");
    assert_eq!(
        details(started[0])["restored"],
        serde_json::json!([]),
        "the restart repaired something: {:?}",
        started[0]
    );
    let mut opened = Vec::new();
    for event in &since {
        let kind = proto::EventKind::try_from(event.kind).expect("event kind");
        match kind {
            proto::EventKind::AgentStarted | proto::EventKind::AccessDenied => {}
            proto::EventKind::ConnectionOpened => opened.push(details(event)["remote"].clone()),
            _ => panic!("the restart changed something: {event:?}"),
        }
    }
    // Audited once: the session by the first run, the other by the second.
    let while_down = opened_while_down.local_addr().unwrap().to_string();
    assert_eq!(
        opened,
        [while_down.as_str()],
        "connections audited after the restart"
    );
    host.assert_enforced(&mut api, "after the restart, settled")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_restart_keeps_grants_and_sessions() {
    restart_keeps_grants_and_sessions(Stop::Sigterm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_restart_keeps_grants_and_sessions() {
    restart_keeps_grants_and_sessions(Stop::Sigkill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_restores_live_grants_and_ends_those_expired_meanwhile() {
    let host = host();
    let (agent, mut api) = host.start().await;
    let _servers = [ssh(), SocketAddr::new(GATED_V6.into(), SSH)]
        .map(|addr| TcpEcho::start(&host.topo.gated, addr));
    let client = &host.topo.client;
    let live = api.grant("live", SSH, TCP, CLIENT_V4, 120).await;
    let short = api.grant("short", SSH, TCP, CLIENT_V4_OUTSIDE, 3).await;
    host.assert_enforced(&mut api, "before the reboot").await;
    let ungranted: (IpAddr, SocketAddr) = (CLIENT_V6.into(), SocketAddr::new(GATED_V6.into(), SSH));

    // A reboot loses bpffs and the ruleset; only the database remains.
    assert!(agent.stop().success(), "graceful stop");
    XdpGate::remove(&host.files.pins.path).expect("remove the pins");
    host.nft(&["delete", "table", "inet", "jit_gate"]);
    expect_access(client, "gate gone", &[(ungranted.0, ungranted.1, true)]);
    let left = wall_time(short.expires_at)
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(500)).await;

    let (_agent, mut api) = host.start().await;
    let active: Vec<u64> = api.grants(false).await.iter().map(|g| g.id).collect();
    assert_eq!(active, [live.id]);
    let ended = api.grant_by_id(short.id).await;
    assert_eq!(ended.state, proto::GrantState::Expired as i32, "{ended:?}");
    assert_eq!(ended.ended_at, short.expires_at);
    let log = api.audit_log().await;
    assert!(
        log.iter()
            .any(|e| e.kind == proto::EventKind::GrantExpired as i32
                && e.grant_id == short.id
                && e.message.contains("while the agent was down")),
        "no audit record of grant {} expiring while the agent was down: {log:#?}",
        short.id
    );
    host.assert_enforced(&mut api, "after the reboot").await;
    expect_access(
        client,
        "after the reboot",
        &[
            (CLIENT_V4.into(), ssh(), true),
            (CLIENT_V4_OUTSIDE.into(), ssh(), false),
            (ungranted.0, ungranted.1, false),
        ],
    );
}

/// A reboot as the agent sees it: the stored grants and the last boot-clock
/// reading carry another boot's id. A grant is carried with what the
/// earlier boot's clock proves is left of it (8 s here, though the wall
/// clock would allow minutes), and a grant whose wall-clock end passed
/// while the agent was down is not reinstated. The kernel is the judge:
/// the carried grant opens the port until its carried deadline, not after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_carries_what_the_earlier_boot_clock_leaves_of_a_grant() {
    const LEFT: Duration = Duration::from_secs(8);
    let host = host();
    let (agent, mut api) = host.start().await;
    let _server = TcpEcho::start(&host.topo.gated, ssh());
    let client = &host.topo.client;
    let carried = api.grant("carried", SSH, TCP, CLIENT_V4, 600).await;
    let passed = api.grant("passed", SSH, TCP, CLIENT_V4_OUTSIDE, 600).await;
    host.assert_enforced(&mut api, "before the reboot").await;

    // A reboot loses bpffs and the ruleset; only the database remains, its
    // grants and witness on the clock of a boot that is no longer running.
    assert!(agent.stop().success(), "graceful stop");
    XdpGate::remove(&host.files.pins.path).expect("remove the pins");
    host.nft(&["delete", "table", "inet", "jit_gate"]);
    let left_ns = LEFT.as_nanos();
    let ended_ms = (SystemTime::now() - Duration::from_secs(1))
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    host.files.sql(&format!(
        "INSERT INTO boots (boot_id) VALUES ('earlier-boot');
         UPDATE grants SET boot = (SELECT boot FROM boots WHERE boot_id = 'earlier-boot')
             WHERE state = 0; -- active (schema 8)
         UPDATE meta SET value = '{{\"boot_id\":\"earlier-boot\",\"boot_ns\":'
             || ((SELECT deadline_boot_ns FROM grants WHERE id = {carried}) - {left_ns})
             || '}}'
             WHERE key = 'boot_clock_witness';
         UPDATE grants SET expires_ms = {ended_ms} WHERE id = {passed};",
        carried = carried.id,
        passed = passed.id,
    ));

    let starting = Instant::now();
    let (_agent, mut api) = host.start().await;
    let started = Instant::now();
    let active: Vec<u64> = api.grants(false).await.iter().map(|g| g.id).collect();
    assert_eq!(active, [carried.id], "only the carried grant is active");
    let ended = api.grant_by_id(passed.id).await;
    assert_eq!(ended.state, proto::GrantState::Expired as i32, "{ended:?}");
    let log = api.audit_log().await;
    let start = log
        .iter()
        .rfind(|e| e.kind == proto::EventKind::AgentStarted as i32)
        .expect("an agent start record");
    let reported = &details(start)["carried_across_reboot"];
    let remaining = |id: u64| {
        reported
            .as_array()
            .expect("carried grants")
            .iter()
            .find(|g| g["grant_id"] == id)
            .and_then(|g| g["remaining_ms"].as_u64())
            .unwrap_or_else(|| panic!("grant {id} not in {reported}"))
    };
    assert_eq!(remaining(passed.id), 0, "{reported}");
    let carried_ms = remaining(carried.id);
    assert!(
        carried_ms <= LEFT.as_millis() as u64 && carried_ms + 2_000 >= LEFT.as_millis() as u64,
        "carried {carried_ms} ms, the earlier boot's clock left {LEFT:?}: {reported}"
    );
    let shown = wall_time(api.grant_by_id(carried.id).await.expires_at);
    assert!(
        shown <= SystemTime::now() + LEFT,
        "the wall-clock end shown moved to the carried deadline: {shown:?}"
    );

    host.assert_enforced(&mut api, "after the reboot").await;
    expect_access(
        client,
        "carried grant live, passed grant not reinstated",
        &[
            (CLIENT_V4.into(), ssh(), true),
            (CLIENT_V4_OUTSIDE.into(), ssh(), false),
        ],
    );
    assert!(
        started.elapsed() + Duration::from_secs(2) < LEFT,
        "checked well before the carried deadline"
    );
    // Past the carried deadline (not the 600 s the wall clock had left),
    // the kernel closes the port.
    tokio::time::sleep_until((starting + LEFT + Duration::from_millis(1500)).into()).await;
    expect_access(
        client,
        "past the carried deadline",
        &[(CLIENT_V4.into(), ssh(), false)],
    );
    let ended = api.grant_by_id(carried.id).await;
    assert_eq!(ended.state, proto::GrantState::Expired as i32, "{ended:?}");
}
