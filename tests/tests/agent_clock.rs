//! Wall-clock steps cannot bend a grant (issue 7, defect 4): the agent's
//! wall clock alone (libfaketime preloaded into it, never the machine's
//! clock) is stepped back an hour and then forward an hour around live
//! grants. Each grant must still end when its duration is up in real time,
//! neither later nor earlier, in the XDP layer and in the nftables layer;
//! the oracle is the kernel: a real TCP connection from the client namespace.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use jit_gate_agent::{config::Mode, proto};
use jit_gate_tests::{
    agent::{AgentHost, Api},
    fake_clock::FakeClock,
    netns::{CLIENT_V4, CLIENT_V4_OUTSIDE, GATED_V4},
    traffic::{TcpEcho, expect_access},
};

const SSH: u16 = 22;
const HOUR: i64 = 3600;
/// Grant lengths: the first ends while the wall clock is an hour behind,
/// the second after it was stepped an hour ahead.
const FIRST: Duration = Duration::from_secs(6);
const SECOND: Duration = Duration::from_secs(12);
/// A port must be closed this long after its grant's end (expiry timer and
/// kernel deadline alike act at the end itself)...
const CLOSE_WITHIN: Duration = Duration::from_millis(700);
/// ...and still open this long before it.
const OPEN_UNTIL: Duration = Duration::from_millis(1500);

fn ssh() -> SocketAddr {
    SocketAddr::new(GATED_V4.into(), SSH)
}

/// Sleeps until `at` (on the test's monotonic clock).
async fn sleep_until(at: Instant) {
    tokio::time::sleep(at.saturating_duration_since(Instant::now())).await;
}

/// A grant of `length` for `source` on SSH, and the instants (test clock)
/// between which it must end: requested ≤ start ≤ answered.
async fn grant(
    api: &mut Api,
    id: &str,
    source: IpAddr,
    length: Duration,
) -> (u64, Instant, Instant) {
    let asked = Instant::now();
    let grant = api
        .grant(
            id,
            SSH,
            proto::Protocol::Tcp,
            source,
            length.as_secs() as i64,
        )
        .await;
    (grant.id, asked + length, Instant::now() + length)
}

async fn assert_remaining(api: &mut Api, id: u64, ends: Instant, step: &str) {
    let listed = api.grant_by_id(id).await;
    let remaining: Duration = listed
        .remaining
        .expect("remaining is set")
        .try_into()
        .expect("a positive duration");
    let want = ends.saturating_duration_since(Instant::now());
    assert!(
        remaining.abs_diff(want) < Duration::from_secs(1),
        "{step}: grant {id} has {remaining:?} left, its duration leaves {want:?}"
    );
}

async fn wall_clock_steps_do_not_bend_grants(mode: Mode) {
    let mut host = AgentHost::new(mode, "");
    let clock = FakeClock::new();
    host.files.env = clock.env();
    clock.verify(0);
    let (_agent, mut api) = host.start().await;
    let _server = TcpEcho::start(&host.topo.gated, ssh());
    let client = &host.topo.client;
    let (first, source_first) = (CLIENT_V4, IpAddr::V4(CLIENT_V4));
    let source_second = IpAddr::V4(CLIENT_V4_OUTSIDE);
    let (first_id, first_earliest, first_latest) =
        grant(&mut api, "first", source_first, FIRST).await;
    let (second_id, second_earliest, second_latest) =
        grant(&mut api, "second", source_second, SECOND).await;

    // Back an hour: the next reconciliations must not move any deadline.
    clock.set_offset_secs(-HOUR);
    clock.verify(-HOUR);
    let created = api.grant_by_id(first_id).await;
    let shown_end = jit_gate_tests::agent::wall_time(created.expires_at);
    assert!(
        shown_end < std::time::SystemTime::now() - Duration::from_secs(HOUR as u64 - 60),
        "{mode:?}: the agent does not show its stepped wall clock: {created:?}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_remaining(&mut api, first_id, first_latest, "an hour back").await;
    sleep_until(first_earliest.checked_sub(OPEN_UNTIL).unwrap()).await;
    expect_access(
        client,
        &format!("{mode:?}: wall clock an hour back, before the first grant's end"),
        &[(first.into(), ssh(), true), (source_second, ssh(), true)],
    );
    sleep_until(first_latest + CLOSE_WITHIN).await;
    expect_access(
        client,
        &format!("{mode:?}: wall clock an hour back, after the first grant's end"),
        &[(first.into(), ssh(), false), (source_second, ssh(), true)],
    );
    let ended = api.grant_by_id(first_id).await;
    assert_eq!(
        ended.state,
        proto::GrantState::Expired as i32,
        "{mode:?}: {ended:?}"
    );

    // Forward an hour (two hours from where it was): nothing ends early.
    clock.set_offset_secs(HOUR);
    clock.verify(HOUR);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_remaining(&mut api, second_id, second_latest, "an hour ahead").await;
    let listed = api.grant_by_id(second_id).await;
    assert_eq!(
        listed.state,
        proto::GrantState::Active as i32,
        "{mode:?}: the forward step ended the grant: {listed:?}"
    );
    sleep_until(second_earliest.checked_sub(OPEN_UNTIL).unwrap()).await;
    expect_access(
        client,
        &format!("{mode:?}: wall clock an hour ahead, before the second grant's end"),
        &[(source_second, ssh(), true)],
    );
    sleep_until(second_latest + CLOSE_WITHIN).await;
    expect_access(
        client,
        &format!("{mode:?}: wall clock an hour ahead, after the second grant's end"),
        &[(source_second, ssh(), false), (first.into(), ssh(), false)],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_steps_do_not_bend_grants_in_xdp() {
    wall_clock_steps_do_not_bend_grants(Mode::Xdp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_steps_do_not_bend_grants_in_nftables() {
    wall_clock_steps_do_not_bend_grants(Mode::Nftables).await;
}
