//! The agent end to end: a broker's calls over the Unix socket open and
//! close real TCP access through the kernel, in namespaces.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use jit_gate_agent::proto;
use jit_gate_tests::{
    agent::{Agent, AgentFiles, all_grants, client, request, without_remaining},
    netns::{CLIENT_V4, GATED_V4, Topology},
    traffic::{TcpEcho, round_trip, tcp_connect},
};

const SSH: u16 = 22;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_opens_expiry_closes_new_connections_but_keeps_established_ones() {
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    files.write_config(&[&topo.gated_if], "");
    let _agent = Agent::start(&files);
    let mut api = client(&files).await;
    let ssh = SocketAddr::new(IpAddr::V4(GATED_V4), SSH);
    let _server = TcpEcho::start(&topo.gated, ssh);
    let from = IpAddr::V4(CLIENT_V4);

    tcp_connect(&topo.client, from, ssh).expect_timed_out("before any grant");

    let granted = api
        .request_access(request("r-1", SSH, proto::Protocol::Tcp, CLIENT_V4, 60))
        .await
        .expect("request access")
        .into_inner();
    assert_eq!(granted.grants.len(), 1);
    assert!(!granted.replayed);
    let mut session = tcp_connect(&topo.client, from, ssh).expect_connected("under the grant");
    round_trip(&mut session, b"hello").expect("echo under the grant");

    // A retry of the same request returns the same grant.
    let retry = api
        .request_access(request("r-1", SSH, proto::Protocol::Tcp, CLIENT_V4, 60))
        .await
        .expect("retry")
        .into_inner();
    assert!(retry.replayed);
    assert_eq!(
        without_remaining(retry.grants),
        without_remaining(granted.grants.clone())
    );

    // Revoke without terminate: the session continues, new ones fail.
    let revoked = api
        .revoke_grant(proto::RevokeGrantRequest {
            grant_id: granted.grants[0].id,
            terminate_connections: false,
            reason: "done".into(),
        })
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(
        revoked.grant.unwrap().state,
        proto::GrantState::Revoked as i32
    );
    round_trip(&mut session, b"still here").expect("established session survives the revoke");
    tcp_connect(&topo.client, from, ssh).expect_timed_out("after the revoke");

    // A short grant: expires by itself.
    api.request_access(request("r-2", SSH, proto::Protocol::Tcp, CLIENT_V4, 2))
        .await
        .expect("short grant");
    let mut second = tcp_connect(&topo.client, from, ssh).expect_connected("under the short grant");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    round_trip(&mut second, b"after expiry").expect("session survives expiry");
    tcp_connect(&topo.client, from, ssh).expect_timed_out("after expiry");
    let grants = all_grants(&mut api).await;
    let states: Vec<i32> = grants.iter().map(|g| g.state).collect();
    assert_eq!(
        states,
        [
            proto::GrantState::Expired as i32,
            proto::GrantState::Revoked as i32
        ]
    );
}
