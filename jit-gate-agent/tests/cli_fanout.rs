//! The `jit-gate` binary against fake agents on Unix sockets: one result row
//! per agent, failures reported per agent, exit status 1 if any failed.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    process::Output,
};

use jit_gate_agent::proto::{
    AccessRequest, AccessResponse, Event, EventKind, GetPolicyRequest, GetStatusRequest, Grant,
    GrantState, InterfaceStatus, ListConnectionsRequest, ListConnectionsResponse,
    ListGrantsRequest, ListGrantsResponse, Policy, RevokeGrantRequest, RevokeGrantResponse,
    Status as AgentStatus, UpdatePolicyRequest, WatchEventsRequest,
    jit_gate_server::{JitGate, JitGateServer},
};
use serde_json::Value;
use tokio::net::UnixListener;
use tokio_stream::{Stream, wrappers::UnixListenerStream};
use tonic::{Request, Response, Status};

/// Fixed answers; a broken agent refuses every call.
struct FakeAgent {
    broken: bool,
}

impl FakeAgent {
    fn check(&self) -> Result<(), Status> {
        if self.broken {
            Err(Status::invalid_argument("fake agent refuses everything"))
        } else {
            Ok(())
        }
    }
}

#[tonic::async_trait]
impl JitGate for FakeAgent {
    async fn get_status(
        &self,
        _: Request<GetStatusRequest>,
    ) -> Result<Response<AgentStatus>, Status> {
        self.check()?;
        Ok(Response::new(AgentStatus {
            version: "0.1.0".into(),
            configured_mode: "xdp+nftables".into(),
            nftables_active: true,
            interfaces: vec![InterfaceStatus {
                name: "eth0".into(),
                mode: 1,
                reason: String::new(),
                ..Default::default()
            }],
            active_grants: 1,
            policy_revision: 3,
            ..Default::default()
        }))
    }

    async fn get_policy(&self, _: Request<GetPolicyRequest>) -> Result<Response<Policy>, Status> {
        self.check()?;
        Ok(Response::new(Policy {
            rules: Vec::new(),
            revision: 3,
        }))
    }

    async fn update_policy(
        &self,
        _: Request<UpdatePolicyRequest>,
    ) -> Result<Response<Policy>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    /// Echoes the request as one grant per port, so the test sees what
    /// each agent received.
    async fn request_access(
        &self,
        request: Request<AccessRequest>,
    ) -> Result<Response<AccessResponse>, Status> {
        self.check()?;
        let request = request.into_inner();
        let grants = request
            .ports
            .iter()
            .zip(1..)
            .map(|(access, id)| Grant {
                id,
                request_id: request.request_id.clone(),
                port: access.port,
                protocol: access.protocol,
                source: access.source.clone(),
                requester: request.requester.clone(),
                state: GrantState::Active as i32,
                expires_at: Some(prost_types::Timestamp {
                    seconds: 1_900_000_000,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(AccessResponse {
            grants,
            replayed: false,
            approval: None,
        }))
    }

    async fn request_access_batch(
        &self,
        _: Request<jit_gate_agent::proto::AccessBatchRequest>,
    ) -> Result<Response<jit_gate_agent::proto::AccessBatchResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn revoke_grant(
        &self,
        _: Request<RevokeGrantRequest>,
    ) -> Result<Response<RevokeGrantResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn list_grants(
        &self,
        _: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn list_connections(
        &self,
        _: Request<ListConnectionsRequest>,
    ) -> Result<Response<ListConnectionsResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn verify_audit(
        &self,
        _: Request<jit_gate_agent::proto::VerifyAuditRequest>,
    ) -> Result<Response<jit_gate_agent::proto::AuditVerification>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn get_audit_checkpoint(
        &self,
        _: Request<jit_gate_agent::proto::GetAuditCheckpointRequest>,
    ) -> Result<Response<jit_gate_agent::proto::AuditCheckpoint>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn reload_configuration(
        &self,
        _: Request<jit_gate_agent::proto::ReloadConfigurationRequest>,
    ) -> Result<Response<jit_gate_agent::proto::ReloadConfigurationResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn approve_request(
        &self,
        _: Request<jit_gate_agent::proto::ApproveRequestRequest>,
    ) -> Result<Response<jit_gate_agent::proto::ApprovalRequest>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn deny_request(
        &self,
        _: Request<jit_gate_agent::proto::DenyRequestRequest>,
    ) -> Result<Response<jit_gate_agent::proto::ApprovalRequest>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn list_requests(
        &self,
        _: Request<jit_gate_agent::proto::ListRequestsRequest>,
    ) -> Result<Response<jit_gate_agent::proto::ListRequestsResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    type ExportAuditStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

    async fn export_audit(
        &self,
        _: Request<jit_gate_agent::proto::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    type WatchEventsStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

    /// Two events, then the stream ends.
    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.check()?;
        let after = request.into_inner().after_sequence.unwrap_or(0);
        let events = (after + 1..=after + 2).map(|sequence| {
            Ok(Event {
                sequence,
                kind: EventKind::GrantCreated as i32,
                principal: "uid:0".into(),
                message: format!("event {sequence}"),
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }
}

/// Serves a fake agent on `path` for the rest of the test.
fn serve(path: &Path, broken: bool) {
    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(JitGateServer::new(FakeAgent { broken }))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
}

/// Runs the CLI with these arguments (off the runtime's threads, which
/// serve the fake agents meanwhile).
async fn jit_gate(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_jit-gate"))
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn args(agents: &[&PathBuf], rest: &[&str]) -> Vec<String> {
    agents
        .iter()
        .flat_map(|a| ["--agent".to_owned(), a.display().to_string()])
        .chain(rest.iter().map(ToString::to_string))
        .collect()
}

fn stdout_json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

struct Agents {
    _dir: tempfile::TempDir,
    healthy: PathBuf,
    other_healthy: PathBuf,
    broken: PathBuf,
    absent: PathBuf,
}

fn agents() -> Agents {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let agents = Agents {
        healthy: path("a.sock"),
        other_healthy: path("b.sock"),
        broken: path("broken.sock"),
        absent: path("absent.sock"),
        _dir: dir,
    };
    serve(&agents.healthy, false);
    serve(&agents.other_healthy, false);
    serve(&agents.broken, true);
    agents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_row_per_agent_and_exit_1_if_any_failed() {
    let agents = agents();
    let output = jit_gate(args(
        &[&agents.healthy, &agents.broken],
        &["--json", "status"],
    ))
    .await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let rows = stdout_json(&output);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0]["agent"], agents.healthy.display().to_string());
    assert_eq!(rows[0]["ok"], true);
    assert_eq!(rows[0]["result"]["interfaces"][0]["mode"], "xdp-native");
    assert_eq!(rows[0]["result"]["policy_revision"], 3);
    assert_eq!(rows[1]["agent"], agents.broken.display().to_string());
    assert_eq!(rows[1]["ok"], false);
    assert_eq!(rows[1]["error"]["code"], "InvalidArgument");
    assert_eq!(rows[1]["error"]["message"], "fake agent refuses everything");
    assert!(rows[1].get("result").is_none());
    assert!(
        rows.iter().all(|r| r["latency_ms"].as_f64().is_some()),
        "{rows:?}"
    );
    // The summary goes to stderr, so stdout stays one JSON document.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("summary: 2 agents: 1 ok, 1 failed, 0 timed out;"),
        "{stderr}"
    );

    // Table mode: a header and one row per agent.
    let output = jit_gate(args(
        &[&agents.healthy, &agents.broken],
        &["policy", "show"],
    ))
    .await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[3].starts_with("summary: 2 agents: 1 ok, 1 failed, 0 timed out; latency p50 "),
        "{text}"
    );
    assert!(
        lines[1].contains("a.sock") && lines[1].contains(" ok "),
        "{text}"
    );
    assert!(lines[1].contains("revision 3, 0 rules"), "{text}");
    assert!(
        lines[2].contains("broken.sock") && lines[2].contains("error"),
        "{text}"
    );
    assert!(
        lines[2].contains("InvalidArgument: fake agent refuses everything"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_healthy_exit_0_and_share_the_request_id() {
    let agents = agents();
    let output = jit_gate(args(
        &[&agents.healthy, &agents.other_healthy],
        &[
            "--json",
            "request",
            "22",
            "53/udp",
            "--source",
            "198.51.100.7",
            "--duration",
            "1h",
            "--requester",
            "alice",
        ],
    ))
    .await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let rows = stdout_json(&output);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let request_ids: Vec<&Value> = rows
        .iter()
        .map(|row| {
            assert_eq!(row["ok"], true, "{row}");
            let grants = row["result"]["grants"].as_array().unwrap();
            assert_eq!(grants.len(), 2, "{row}");
            assert_eq!(grants[0]["protocol"], "unspecified");
            assert_eq!(grants[1]["port"], 53);
            assert_eq!(grants[1]["protocol"], "udp");
            assert_eq!(grants[1]["source"], "198.51.100.7");
            assert_eq!(grants[1]["requester"], "alice");
            assert_eq!(grants[1]["expires_at"], "2030-03-17T17:46:40Z");
            &grants[0]["request_id"]
        })
        .collect();
    assert_eq!(request_ids[0], request_ids[1]);
    assert_eq!(request_ids[0].as_str().unwrap().len(), 36);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_agent_errors_go_to_stderr() {
    let agents = agents();
    let output = jit_gate(args(&[&agents.broken], &["status"])).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    assert_eq!(
        String::from_utf8(output.stderr).unwrap(),
        format!(
            "error: {}: InvalidArgument: fake agent refuses everything\n",
            agents.broken.display()
        )
    );

    let output = jit_gate(args(&[&agents.absent], &["status"])).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.ends_with("Unavailable: cannot connect: No such file or directory (os error 2)\n"),
        "{stderr}"
    );

    // Accepts connections (the kernel's backlog) but never answers.
    let silent = agents.absent.with_file_name("silent.sock");
    let _listener = UnixListener::bind(&silent).unwrap();
    let output = jit_gate(args(&[&silent], &["--timeout", "300ms", "status"])).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.ends_with("DeadlineExceeded: no answer within 300ms\n"),
        "{stderr}"
    );

    let output = jit_gate(args(&[&agents.healthy], &["status"])).await;
    assert_eq!(output.status.code(), Some(0));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("configured mode:  xdp+nftables"), "{text}");
    assert!(
        text.contains("eth0") && text.contains("xdp-native"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_merges_streams_and_tags_lines() {
    let agents = agents();
    let output = jit_gate(args(
        &[&agents.healthy, &agents.other_healthy, &agents.broken],
        &["watch", "--after", "10"],
    ))
    .await;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines.len(), 4, "{text}");
    for (line, (agent, sequence)) in lines.iter().zip([
        ("a.sock", 11),
        ("a.sock", 12),
        ("b.sock", 11),
        ("b.sock", 12),
    ]) {
        assert!(line.contains(agent), "{line}");
        assert!(
            line.contains(&format!(
                "#{sequence}  grant-created  uid:0  event {sequence}"
            )),
            "{line}"
        );
    }
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("broken.sock: InvalidArgument"), "{stderr}");

    let output = jit_gate(args(&[&agents.healthy], &["--json", "watch"])).await;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let rows: Vec<Value> = output
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["result"]["sequence"], 2);
    assert_eq!(rows[1]["result"]["kind"], "grant-created");
}
