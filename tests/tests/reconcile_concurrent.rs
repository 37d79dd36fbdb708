//! Reconciliation while the agent keeps writing: the kernel is read on
//! another thread and compared in steps between commands, so grants are
//! created and revoked while a snapshot is read and compared. What the
//! agent wrote meanwhile must never be reported (or "repaired") as drift,
//! and drift behind its back must still be found and repaired, exactly.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use jit_gate_agent::{config::Mode, net::GrantTarget, proto};
use jit_gate_tests::agent::{AgentHost, access, target_of};
use tokio_stream::StreamExt;

const SSH: u16 = 22;
/// Grants held throughout, so that each reconciliation has work to do.
const HELD: u32 = 3_000;
/// Grants created and revoked while drift is injected and repaired.
const CHURN_BROKERS: u32 = 8;

fn source(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

async fn grant_many(api: &proto::jit_gate_client::JitGateClient<tonic::transport::Channel>) {
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let mut api = api.clone();
        tasks.push(tokio::spawn(async move {
            for i in (worker..HELD).step_by(16) {
                api.request_access(access(
                    &format!("held-{i}"),
                    &[(SSH, proto::Protocol::Tcp, &source(i).to_string())],
                    600,
                ))
                .await
                .unwrap_or_else(|e| panic!("held grant {i}: {e}"));
            }
        }));
    }
    for task in tasks {
        task.await.expect("granting task");
    }
}

/// Creates and revokes grants until `stop`; returns how many it made.
async fn churn(
    mut api: proto::jit_gate_client::JitGateClient<tonic::transport::Channel>,
    broker: u32,
    stop: tokio::sync::watch::Receiver<bool>,
) -> u32 {
    let mut made = 0;
    while !*stop.borrow() {
        let i = 100_000 + broker * 100_000 + made;
        let granted = api
            .request_access(access(
                &format!("churn-{i}"),
                &[(SSH, proto::Protocol::Tcp, &source(i).to_string())],
                600,
            ))
            .await
            .unwrap_or_else(|e| panic!("churn grant {i}: {e}"))
            .into_inner();
        if made % 2 == 0 {
            api.revoke_grant(proto::RevokeGrantRequest {
                grant_id: granted.grants[0].id,
                terminate_connections: false,
                reason: "churn".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("churn revoke {i}: {e}"));
        }
        made += 1;
    }
    made
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_reconciliation_are_not_drift_and_drift_is_still_repaired() {
    let host = AgentHost::new(Mode::XdpAndNftables, "reconcile_interval = \"1s\"\n");
    let (_agent, mut api) = host.start().await;
    grant_many(&api.client).await;
    let mut events = api
        .client
        .watch_events(proto::WatchEventsRequest {
            after_sequence: None,
            kinds: vec![proto::EventKind::DriftRepaired as i32],
        })
        .await
        .expect("watch drift repairs")
        .into_inner();

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let brokers: Vec<_> = (0..CHURN_BROKERS)
        .map(|broker| tokio::spawn(churn(api.client.clone(), broker, stopped.clone())))
        .collect();
    // Several reconciliations with writes all through them, nothing
    // touched behind the agent's back: no repair may be reported.
    let quiet_until = Instant::now() + Duration::from_secs(6);
    if let Ok(event) = tokio::time::timeout_at(quiet_until.into(), events.next()).await {
        let event = event.expect("event stream ended").expect("event");
        panic!(
            "the agent's own writes were reported as drift: {}",
            event.message
        );
    }

    // Drift behind the agent's back while it keeps writing: one XDP entry
    // and one nftables element of a held grant, each repaired, exactly.
    let held = api
        .grants(false)
        .await
        .into_iter()
        .find(|g| g.request_id == "held-7")
        .expect("held grant listed");
    let target: GrantTarget = target_of(&held);
    host.pinned_grants().remove_v4(&target);
    host.nft(&[
        "delete",
        "element",
        "inet",
        "jit_gate",
        &jit_gate_agent::enforce::nft::NftGate::set_holding(&target),
        &format!("{{ {} . tcp . {SSH} }}", source(7)),
    ]);
    let (mut xdp, mut nft) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(xdp && nft) {
        let event = tokio::time::timeout_at(deadline.into(), events.next())
            .await
            .expect("the drift was not repaired within 15 s")
            .expect("event stream ended")
            .expect("event");
        for repair in event.message.split("; ") {
            match repair {
                "XDP: 1 grant entries missing or wrong, 0 without a grant" => xdp = true,
                "nftables: 1 elements missing or wrong, 0 without a grant" => nft = true,
                other => panic!("unexpected repair reported: {other:?} (in {event:?})"),
            }
        }
    }
    stop.send(true).expect("stop the brokers");
    let mut made = 0;
    for broker in brokers {
        made += broker.await.expect("broker task");
    }
    assert!(made > 0, "the brokers made no grant during the test");
    // Everything the agent lists is what the kernel holds, both layers.
    host.assert_enforced(&mut api, "after churn and repairs")
        .await;
}
