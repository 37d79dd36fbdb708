//! The audit log proves itself, end to end: an independent implementation
//! of the documented layout (Python's hashlib over the `SQLite` rows) verifies
//! it; retention drops old `ACCESS_DENIED` payloads and the chain still
//! verifies; a record edited in the middle is reported at start (status,
//! log, an `AUDIT_CHAIN_BROKEN` record) and by `VerifyAudit` and `jit-gate
//! audit verify` (exit 3); a kept signed checkpoint exposes records cut
//! from the end and a chain re-hashed by a forger; export writes CSV and
//! JSON with filters.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use jit_gate_agent::proto::{self, Protocol, jit_gate_client::JitGateClient};
use jit_gate_tests::{
    agent::{Agent, AgentFiles, access, client, export_events, python},
    cli::Cli,
    netns::{CLIENT_V4, CLIENT_V4_OUTSIDE, GATED_V4, Topology},
    traffic::tcp_connect,
};
use tonic::transport::Channel;

type Api = JitGateClient<Channel>;

/// The independent verifier's verdict on the agent's database.
fn independent(files: &AgentFiles) -> serde_json::Value {
    python("verify_audit.py", &[files.database().as_os_str()]).remove(0)
}

async fn verify(api: &mut Api, kept: &[proto::AuditCheckpoint]) -> proto::AuditVerification {
    api.verify_audit(proto::VerifyAuditRequest {
        checkpoints: kept.to_vec(),
    })
    .await
    .expect("verify audit")
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_proves_itself() {
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    files.write_config(
        &[&topo.gated_if],
        // Denials are summarized every second, so one is recorded soon.
        "[audit]\ndenied_retention = \"2s\"\ncheckpoint_every_records = 1000\n\
         [denials]\nsummary_interval = \"1s\"",
    );
    let agent = Agent::start(&files);
    let mut api = client(&files).await;
    let cli = Cli::new(&files);

    // Some history: grants, a revoke, a denied connection attempt.
    let source = CLIENT_V4.to_string();
    let granted = api
        .request_access(access("a", &[(22, Protocol::Tcp, &source)], 600))
        .await
        .expect("grant")
        .into_inner();
    api.revoke_grant(proto::RevokeGrantRequest {
        grant_id: granted.grants[0].id,
        terminate_connections: false,
        reason: "done".into(),
    })
    .await
    .expect("revoke");
    tcp_connect(
        &topo.client,
        CLIENT_V4_OUTSIDE.into(),
        SocketAddr::new(GATED_V4.into(), 22),
    )
    .expect_timed_out("no grant");
    // The denial is recorded, then its payload pruned past retention.
    let deadline = Instant::now() + Duration::from_secs(20);
    let pruned = loop {
        let denied = export_events(
            &mut api,
            proto::ExportAuditRequest {
                kinds: vec![proto::EventKind::AccessDenied as i32],
                ..Default::default()
            },
        )
        .await;
        if denied.iter().any(|e| e.pruned) {
            break denied;
        }
        assert!(Instant::now() < deadline, "no pruned denial: {denied:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let first_pruned = pruned.iter().find(|e| e.pruned).unwrap();
    assert!(first_pruned.message.is_empty() && first_pruned.details_json.is_empty());

    let report = verify(&mut api, &[]).await;
    assert!(report.intact, "{report:?}");
    assert!(report.pruned >= 1, "{report:?}");
    let theirs = independent(&files);
    assert_eq!(theirs["intact"], true, "{theirs}");
    assert!(
        theirs["records"].as_u64().unwrap() >= report.records,
        "{theirs}"
    );
    assert!(theirs["pruned"].as_u64().unwrap() >= 1, "{theirs}");

    // Export: JSON lines and CSV, filtered by port and kind.
    let by_port = export_events(
        &mut api,
        proto::ExportAuditRequest {
            port: 22,
            kinds: vec![
                proto::EventKind::GrantCreated as i32,
                proto::EventKind::GrantRevoked as i32,
            ],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_port.len(), 2, "{by_port:?}");
    let csv = cli.text(&[
        "audit",
        "export",
        "--format",
        "csv",
        "--kind",
        "grant-revoked",
    ]);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("sequence,at,kind,principal"), "{csv}");
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(
        lines[1].contains("grant-revoked") && lines[1].contains("done"),
        "{csv}"
    );
    let json = cli.text(&[
        "audit",
        "export",
        "--format",
        "json",
        "--principal",
        "uid:0",
    ]);
    for line in json.lines() {
        let event: serde_json::Value = serde_json::from_str(line).expect("JSON lines");
        assert_eq!(event["principal"], "uid:0", "{line}");
    }

    // A checkpoint kept outside, then records cut from the end.
    let kept_text = cli.text(&["audit", "checkpoint"]);
    let kept_file = files.dir.path().join("kept.jsonl");
    std::fs::write(&kept_file, &kept_text).expect("keep the checkpoint");
    let line: serde_json::Value = serde_json::from_str(kept_text.trim()).expect("one JSON line");
    let kept = proto::AuditCheckpoint {
        sequence: line["sequence"].as_u64().expect("sequence"),
        hash: line["hash"].as_str().expect("hash").into(),
        at: Some(line["at"].as_str().expect("at").parse().expect("RFC 3339")),
        signature: line["signature"].as_str().expect("signature").into(),
        public_key: line["public_key"].as_str().expect("public key").into(),
    };
    assert!(kept.sequence >= report.records, "{kept:?}");
    assert_eq!(
        cli.run(&[
            "audit",
            "verify",
            "--checkpoint",
            kept_file.to_str().unwrap()
        ])
        .status
        .code(),
        Some(0)
    );
    drop(api);
    assert!(agent.stop().success());
    files.sql(&format!(
        "DELETE FROM audit WHERE seq > {}; DELETE FROM audit_checkpoints;",
        kept.sequence - 2
    ));
    assert_eq!(
        independent(&files)["intact"],
        true,
        "cutting the end is invisible to the chain alone"
    );
    let agent = Agent::start(&files);
    let mut api = client(&files).await;
    let cut = verify(&mut api, std::slice::from_ref(&kept)).await;
    assert!(!cut.intact, "{cut:?}");
    assert_eq!(cut.broken_sequence, kept.sequence, "{cut:?}");
    let out = cli.run(&[
        "audit",
        "verify",
        "--checkpoint",
        kept_file.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A record edited in the middle: found at start, loudly.
    drop(api);
    assert!(agent.stop().success());
    // As a forger would: the message rewritten in the row's stored form.
    python(
        "verify_audit.py",
        &[
            files.database().as_os_str(),
            "edit".as_ref(),
            "2".as_ref(),
            "nothing happened".as_ref(),
        ],
    );
    assert_eq!(independent(&files)["broken_sequence"], 2);
    let agent = Agent::start(&files);
    let mut api = client(&files).await;
    agent.wait_for_log(&["AUDIT CHAIN BROKEN", "record 2"]);
    let status = api
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(!status.audit_chain_intact, "{status:?}");
    assert!(status.audit_problem.contains("record 2"), "{status:?}");
    let broken = export_events(
        &mut api,
        proto::ExportAuditRequest {
            kinds: vec![proto::EventKind::AuditChainBroken as i32],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(broken.len(), 1, "{broken:?}");
    let report = verify(&mut api, &[]).await;
    assert_eq!(
        (report.intact, report.broken_sequence),
        (false, 2),
        "{report:?}"
    );
    assert_eq!(cli.run(&["audit", "verify"]).status.code(), Some(3));

    // A forger re-hashes the whole chain and drops the stored checkpoints:
    // the chain alone verifies again; the kept checkpoint does not.
    drop(api);
    assert!(agent.stop().success());
    python(
        "verify_audit.py",
        &[files.database().as_os_str(), "rehash".as_ref()],
    );
    files.sql("DELETE FROM audit_checkpoints;");
    assert_eq!(independent(&files)["intact"], true);
    let _agent = Agent::start(&files);
    let mut api = client(&files).await;
    let status = api
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(
        status.audit_chain_intact,
        "the re-hashed chain verifies alone"
    );
    let rehashed = verify(&mut api, std::slice::from_ref(&kept)).await;
    assert!(!rehashed.intact, "{rehashed:?}");
    assert!(rehashed.problem.contains("re-hashed"), "{rehashed:?}");
}
