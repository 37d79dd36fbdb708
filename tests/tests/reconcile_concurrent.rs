//! Reconciliation while the agent keeps writing: the kernel is read on
//! another thread, in chunks, and compared in steps between commands, so
//! grants are created and revoked while it is read and compared. What the
//! agent wrote meanwhile must never be reported (or "repaired") as drift,
//! and drift behind its back must still be found and repaired, exactly,
//! with few grants (one chunk) and with many (drift in several chunks).

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
/// Grants held throughout, so that each reconciliation has work to do:
/// fewer than one chunk of a read, then several (16,384 a chunk).
const FEW_HELD: u32 = 3_000;
const MANY_HELD: u32 = 40_000;
/// Grants created and revoked while drift is injected and repaired.
const CHURN_BROKERS: u32 = 8;

fn source(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

async fn grant_many(
    api: &proto::jit_gate_client::JitGateClient<tonic::transport::Channel>,
    held: u32,
) {
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let mut api = api.clone();
        tasks.push(tokio::spawn(async move {
            for i in (worker..held).step_by(16) {
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
    writes_are_not_drift_and_drift_is_repaired(FEW_HELD, &[7]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_in_several_chunks_of_a_streamed_read_is_repaired_exactly() {
    writes_are_not_drift_and_drift_is_repaired(MANY_HELD, &[7, 13_001, 26_002, 39_003]).await;
}

/// The repairs `message` reports as (XDP entries, nftables elements)
/// missing; anything else reported fails the test.
fn missing_repaired(message: &str) -> (u32, u32) {
    let count = |repair: &str, prefix: &str, suffix: &str| {
        repair
            .strip_prefix(prefix)?
            .strip_suffix(suffix)?
            .parse::<u32>()
            .ok()
    };
    let (mut xdp, mut nft) = (0, 0);
    for repair in message.split("; ") {
        if let Some(n) = count(
            repair,
            "XDP: ",
            " grant entries missing or wrong, 0 without a grant",
        ) {
            xdp += n;
        } else if let Some(n) = count(
            repair,
            "nftables: ",
            " elements missing or wrong, 0 without a grant",
        ) {
            nft += n;
        } else {
            panic!("unexpected repair reported: {repair:?} (in {message:?})");
        }
    }
    (xdp, nft)
}

/// Holds `held` grants, churns others, checks that no drift is reported,
/// then removes the XDP entry and nftables element of the held grants
/// `drifted` behind the agent's back and waits for exactly those repairs.
async fn writes_are_not_drift_and_drift_is_repaired(held: u32, drifted: &[u32]) {
    let host = AgentHost::new(Mode::XdpAndNftables, "reconcile_interval = \"1s\"\n");
    let (_agent, mut api) = host.start().await;
    grant_many(&api.client, held).await;
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

    // Drift behind the agent's back while it keeps writing: the XDP entry
    // and nftables element of each drifted grant, each repaired, exactly.
    let grants = api.grants(false).await;
    for i in drifted {
        let held = grants
            .iter()
            .find(|g| g.request_id == format!("held-{i}"))
            .expect("held grant listed");
        let target: GrantTarget = target_of(held);
        host.pinned_grants().remove_v4(&target);
        host.nft(&[
            "delete",
            "element",
            "inet",
            "jit_gate",
            &jit_gate_agent::enforce::nft::NftGate::set_holding(&target),
            &format!("{{ {} . tcp . {SSH} }}", source(*i)),
        ]);
    }
    let want = u32::try_from(drifted.len()).expect("few drifted");
    let (mut xdp, mut nft) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    while xdp < want || nft < want {
        let event = tokio::time::timeout_at(deadline.into(), events.next())
            .await
            .unwrap_or_else(|_| {
                panic!("the drift was not repaired within 15 s ({xdp} XDP, {nft} nftables)")
            })
            .expect("event stream ended")
            .expect("event");
        let (more_xdp, more_nft) = missing_repaired(&event.message);
        xdp += more_xdp;
        nft += more_nft;
    }
    assert_eq!((xdp, nft), (want, want), "repairs counted twice");
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
