//! A full disk loses nothing and acknowledges nothing it did not record:
//! with the agent's files on a small tmpfs filled to the last block, a
//! request fails with the retryable UNAVAILABLE and nothing is enforced;
//! once space is back the same request succeeds and is enforced, and the
//! audit chain still verifies. Denial summaries that could not be committed
//! are kept and committed once space is back: they still add up to what the
//! kernel dropped.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use jit_gate_agent::proto::{self, Protocol};
use jit_gate_tests::{
    agent::{Agent, AgentFiles, access, client, export_events},
    frames::{PacketSocket, mac_of},
    netns::{CLIENT_V4, GATED_V4, Topology},
    packets::{Packet, tcp_flag::SYN},
    traffic::{TcpEcho, tcp_connect},
};
use tonic::{Code, transport::Channel};

type Api = proto::jit_gate_client::JitGateClient<Channel>;

/// A tmpfs mounted over a directory; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("mount (util-linux)");
        assert!(status.success(), "mounting a tmpfs on {}", dir.display());
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes zeros to `path` until the file system is full.
fn fill(path: &Path) {
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", path.display()))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("dd");
}

/// Moves the agent's WAL into the database and empties it, so that the
/// next commit needs new blocks (as a busy agent's would).
fn checkpoint_wal(database: &Path) {
    let status = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('PRAGMA wal_checkpoint(TRUNCATE)')",
        ])
        .arg(database)
        .status()
        .expect("python3");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_unavailable_and_enforces_nothing() {
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    let _tmpfs = Tmpfs::mount(files.dir.path(), "16m");
    files.write_config(&[&topo.gated_if], "");
    let agent = Agent::start(&files);
    let mut api = client(&files).await;
    let gated = SocketAddr::new(GATED_V4.into(), 22);
    let _ssh = TcpEcho::start(&topo.gated, gated);

    checkpoint_wal(&files.database());
    let filler = files.dir.path().join("filler");
    fill(&filler);
    let source = CLIENT_V4.to_string();
    let request = access("on-a-full-disk", &[(22, Protocol::Tcp, &source)], 600);
    let refused = api
        .request_access(request.clone())
        .await
        .expect_err("nothing can be recorded");
    assert_eq!(refused.code(), Code::Unavailable, "{refused}");
    assert!(refused.message().contains("retry"), "{refused}");
    assert!(files.nft_granted().is_empty(), "enforced without a record");
    tcp_connect(&topo.client, CLIENT_V4.into(), gated).expect_timed_out("nothing enforced");

    std::fs::remove_file(&filler).expect("free the space");
    let granted = api
        .request_access(request)
        .await
        .expect("the same request once space is back")
        .into_inner();
    assert!(!granted.replayed, "the refused attempt recorded nothing");
    tcp_connect(&topo.client, CLIENT_V4.into(), gated).expect_connected("enforced");
    assert_chain_intact(&mut api).await;
    drop(api);
    agent.kill();
}

async fn assert_chain_intact(api: &mut Api) {
    let report = api
        .verify_audit(proto::VerifyAuditRequest::default())
        .await
        .expect("verify")
        .into_inner();
    assert!(report.intact, "{report:?}");
}

/// Packets the `access-denied` summaries of 22/tcp count, and how many
/// summaries there are.
async fn denied_at_22(api: &mut Api) -> (u64, usize) {
    let request = proto::ExportAuditRequest {
        kinds: vec![proto::EventKind::AccessDenied as i32],
        ..Default::default()
    };
    let summaries: Vec<serde_json::Value> = export_events(api, request)
        .await
        .iter()
        .map(|e| serde_json::from_str(&e.details_json).expect("details are JSON"))
        .filter(|d: &serde_json::Value| d["port"] == "22/tcp")
        .collect();
    let dropped = summaries
        .iter()
        .map(|d| d["dropped"].as_u64().expect("dropped"))
        .sum();
    (dropped, summaries.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denial_summaries_missed_on_a_full_disk_are_committed_when_space_is_back() {
    const SYNS: u64 = 300;
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    let _tmpfs = Tmpfs::mount(files.dir.path(), "16m");
    files.write_config(
        &[&topo.gated_if],
        "mode = \"xdp\"\n[denials]\nsummary_interval = \"1s\"",
    );
    let agent = Agent::start(&files);
    let mut api = client(&files).await;

    checkpoint_wal(&files.database());
    let filler = files.dir.path().join("filler");
    fill(&filler);
    let sender = PacketSocket::sender(&topo.client, &topo.client_if);
    let macs = (
        mac_of(&topo.client, &topo.client_if),
        mac_of(&topo.gated, &topo.gated_if),
    );
    for n in 0..SYNS {
        let source = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | u32::try_from(n).unwrap()));
        let frame = Packet::tcp(source, GATED_V4.into(), 22, SYN)
            .macs(macs.0, macs.1)
            .build()
            .bytes;
        sender.send(&frame);
    }
    // Several summary intervals pass with nothing committable.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        denied_at_22(&mut api).await,
        (0, 0),
        "a summary was committed on a full disk"
    );

    std::fs::remove_file(&filler).expect("free the space");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (dropped, _) = loop {
        let counted = denied_at_22(&mut api).await;
        if counted.0 >= SYNS || Instant::now() > deadline {
            break counted;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let status = api
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let kernel_22 = status
        .ports
        .iter()
        .find(|p| p.port == 22)
        .expect("22/tcp in the status")
        .dropped_packets;
    assert_eq!(kernel_22, SYNS, "the kernel dropped every SYN");
    assert_eq!(
        dropped, kernel_22,
        "the summaries add up to the kernel's count"
    );
    assert_chain_intact(&mut api).await;
    drop(api);
    agent.kill();
}
