//! The approval workflow end to end, against a real agent gating a real TCP
//! server: a port whose rule needs two approvals stays closed (a connect
//! through the gate times out) until a second, distinct approver approves;
//! the requester never decides its own request and an approver counts once
//! (both refused and audited); a denial closes the request; pending requests
//! are bounded per principal, survive a restart, and are checked against
//! the policy again at approval (a stricter rule needs more approvals, a
//! narrower one refuses); `request --wait` ends with
//! the exit status of the outcome, expiry included. Callers are distinct
//! Unix principals (peer credentials), through the generated client and
//! the operator CLI.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, SocketAddr},
    process::Stdio,
    time::{Duration, Instant, SystemTime},
};

use jit_gate_agent::proto::{
    self, ApprovalState, ApproveRequestRequest, DenyRequestRequest, EventKind, ListRequestsRequest,
    RequestFilter, jit_gate_client::JitGateClient,
};
use jit_gate_tests::{
    agent::{Agent, AgentFiles, Api, client_as, request, wall_time},
    cli::Cli,
    netns::{CLIENT_V4, GATED_V4, Topology},
    traffic::{TcpEcho, round_trip, tcp_connect},
};
use tonic::{Code, transport::Channel};

/// Needs two approvals.
const TWO: u16 = 7022;
/// Needs one approval.
const ONE: u16 = 7023;
/// The requester: an approver too, so that only the rule against deciding
/// one's own request stands in its way.
const REQUESTER: u32 = 65534;
const APPROVER_A: u32 = 65533;
const APPROVER_B: u32 = 65532;
const NOGROUP: u32 = 65534;
const GRANTED_SECONDS: i64 = 600;

/// An agent gating TCP `TWO` and `ONE`, with three approver principals.
struct Gate {
    agent: Option<Agent>,
    files: AgentFiles,
    topo: Topology,
}

impl Gate {
    fn start(approvals: &str) -> Self {
        let topo = Topology::new();
        let files = AgentFiles::new(&topo.gated);
        files.write_config(
            &[&topo.gated_if],
            &format!(
                "api.socket_group = \"nogroup\"\n\
                 api.principals = [{{ uid = {REQUESTER}, role = \"approver\" }}, \
                 {{ uid = {APPROVER_A}, role = \"approver\" }}, \
                 {{ uid = {APPROVER_B}, role = \"approver\" }}]\n\
                 [approvals]\n{approvals}\n\
                 [[policy]]\nport = {TWO}\nprotocol = \"tcp\"\napprovals = 2\n\
                 [[policy]]\nport = {ONE}\nprotocol = \"tcp\"\napprovals = 1\n"
            ),
        );
        Gate {
            agent: Some(Agent::start(&files)),
            files,
            topo,
        }
    }

    async fn as_uid(&self, uid: u32) -> JitGateClient<Channel> {
        client_as(&self.files, uid, NOGROUP)
            .await
            .unwrap_or_else(|e| panic!("connect as uid {uid}: {e}"))
    }

    fn connect(&self, port: u16) -> jit_gate_tests::traffic::Connect {
        tcp_connect(
            &self.topo.client,
            CLIENT_V4.into(),
            SocketAddr::new(IpAddr::V4(GATED_V4), port),
        )
    }
}

async fn ask(client: &mut JitGateClient<Channel>, id: &str, port: u16) -> proto::ApprovalRequest {
    let response = client
        .request_access(request(
            id,
            port,
            proto::Protocol::Tcp,
            CLIENT_V4,
            GRANTED_SECONDS,
        ))
        .await
        .unwrap_or_else(|e| panic!("request {id}: {e}"))
        .into_inner();
    assert!(
        response.grants.is_empty(),
        "held, not granted: {response:?}"
    );
    let held = response.approval.expect("held for approval");
    assert_eq!(held.state, ApprovalState::Pending as i32, "{held:?}");
    held
}

async fn approve(
    client: &mut JitGateClient<Channel>,
    id: u64,
    comment: &str,
) -> Result<proto::ApprovalRequest, tonic::Status> {
    client
        .approve_request(ApproveRequestRequest {
            id,
            comment: comment.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn listed(
    client: &mut JitGateClient<Channel>,
    filter: RequestFilter,
) -> Vec<proto::ApprovalRequest> {
    client
        .list_requests(ListRequestsRequest {
            filter: filter as i32,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("list requests")
        .into_inner()
        .requests
}

/// Replaces the rule of port `ONE`.
async fn upsert_one(root: &mut Api, allowed: &[&str], approvals: u32) {
    root.client
        .update_policy(proto::UpdatePolicyRequest {
            change: Some(proto::update_policy_request::Change::UpsertRule(
                proto::PortRule {
                    port: u32::from(ONE),
                    protocol: proto::Protocol::Tcp as i32,
                    allowed_source_prefixes: allowed.iter().map(ToString::to_string).collect(),
                    approvals,
                    ..proto::PortRule::default()
                },
            )),
            expected_revision: 0,
        })
        .await
        .expect("change the rule");
}

fn kinds_of(events: &[proto::Event], kind: EventKind) -> Vec<&proto::Event> {
    events.iter().filter(|e| e.kind == kind as i32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_opens_only_after_two_distinct_approvers_and_nobody_decides_alone() {
    let mut gate = Gate::start("max_pending_per_principal = 3");
    let _echo = TcpEcho::start(&gate.topo.gated, SocketAddr::new(IpAddr::V4(GATED_V4), TWO));
    let _echo_one = TcpEcho::start(&gate.topo.gated, SocketAddr::new(IpAddr::V4(GATED_V4), ONE));
    let mut requester = gate.as_uid(REQUESTER).await;
    let mut a = gate.as_uid(APPROVER_A).await;
    let mut b = gate.as_uid(APPROVER_B).await;
    let mut root = Api::connect(&gate.files).await;

    // Held: nothing in the kernel, the port stays closed.
    let held = ask(&mut requester, "two-approvals", TWO).await;
    assert_eq!(held.approvals_needed, 2);
    assert_eq!(held.principal, format!("uid:{REQUESTER}"));
    assert!(gate.files.nft_granted().is_empty());
    gate.connect(TWO).expect_timed_out("pending: no grant yet");
    assert_eq!(root.status().await.pending_approvals, 1);
    // A retry is the same request, not a second one.
    let again = ask(&mut requester, "two-approvals", TWO).await;
    assert_eq!(again.id, held.id);

    // The requester, approver though it is, never decides its own request.
    let own = approve(&mut requester, held.id, "me").await.unwrap_err();
    assert_eq!(own.code(), Code::PermissionDenied, "{own:?}");
    let own_denial = requester
        .deny_request(DenyRequestRequest {
            id: held.id,
            reason: "changed my mind".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(own_denial.code(), Code::PermissionDenied);

    // One approval of two: still closed.
    let first = approve(&mut a, held.id, "looks fine")
        .await
        .expect("A approves");
    assert_eq!(first.state, ApprovalState::Pending as i32);
    assert_eq!(first.decisions.len(), 1);
    gate.connect(TWO).expect_timed_out("one approval of two");
    // The same approver twice counts once.
    let twice = approve(&mut a, held.id, "again").await.unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition, "{twice:?}");
    assert!(twice.message().contains("distinct"), "{twice:?}");

    // The second, distinct approver: granted now, for the whole duration
    // from now, through the gate.
    let before_last = SystemTime::now() - Duration::from_millis(5);
    let decided = approve(&mut b, held.id, "ok").await.expect("B approves");
    assert_eq!(decided.state, ApprovalState::Approved as i32, "{decided:?}");
    let [grant] = decided.grants.as_slice() else {
        panic!("one grant: {decided:?}")
    };
    let created = wall_time(grant.created_at);
    assert!(
        created >= before_last,
        "the duration starts at the last approval"
    );
    assert_eq!(
        wall_time(grant.expires_at).duration_since(created).unwrap(),
        Duration::from_secs(GRANTED_SECONDS as u64)
    );
    assert_eq!(grant.principal, format!("uid:{REQUESTER}"));
    let mut stream = gate.connect(TWO).expect_connected("approved twice");
    round_trip(&mut stream, b"approved").expect("echo through the gate");
    let late = approve(&mut a, held.id, "late").await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition);

    // A denial closes a request: nothing is granted, nobody approves it after.
    let denied_one = ask(&mut requester, "to-deny", ONE).await;
    let empty = a
        .deny_request(DenyRequestRequest {
            id: denied_one.id,
            reason: " ".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        empty.code(),
        Code::InvalidArgument,
        "a denial needs a reason"
    );
    let long = approve(&mut a, denied_one.id, &"x".repeat(513))
        .await
        .unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument, "bounded comments");
    let denied = a
        .deny_request(DenyRequestRequest {
            id: denied_one.id,
            reason: "not during the freeze".into(),
        })
        .await
        .expect("deny")
        .into_inner();
    assert_eq!(denied.state, ApprovalState::Denied as i32);
    assert_eq!(denied.reason, "not during the freeze");
    let after_denial = approve(&mut b, denied_one.id, "").await.unwrap_err();
    assert_eq!(after_denial.code(), Code::FailedPrecondition);
    gate.connect(ONE).expect_timed_out("denied");

    // A principal holds at most max_pending_per_principal pending requests.
    let mut kept = Vec::new();
    for n in 0..3 {
        kept.push(ask(&mut requester, &format!("kept-{n}"), ONE).await.id);
    }
    let over = requester
        .request_access(request(
            "one-too-many",
            ONE,
            proto::Protocol::Tcp,
            CLIENT_V4,
            60,
        ))
        .await
        .unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");

    // Every decision, and every refused one, is in the audit chain.
    let events = root.audit_log().await;
    assert_eq!(kinds_of(&events, EventKind::RequestPending).len(), 5);
    assert_eq!(kinds_of(&events, EventKind::RequestApproved).len(), 2);
    assert_eq!(kinds_of(&events, EventKind::RequestDenied).len(), 1);
    let refused = kinds_of(&events, EventKind::DecisionRefused);
    let refused_codes: Vec<String> = refused
        .iter()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(&e.details_json).unwrap()["code"].to_string()
        })
        .collect();
    assert!(
        refused_codes
            .iter()
            .filter(|c| c.contains("PermissionDenied"))
            .count()
            == 2
            && refused_codes
                .iter()
                .filter(|c| c.contains("FailedPrecondition"))
                .count()
                == 3
            && refused_codes
                .iter()
                .filter(|c| c.contains("InvalidArgument"))
                .count()
                == 2,
        "{refused_codes:?}"
    );
    assert!(
        refused
            .iter()
            .any(|e| e.principal == format!("uid:{REQUESTER}")),
        "self-approval recorded under the requester"
    );
    let verified = root
        .client
        .verify_audit(proto::VerifyAuditRequest::default())
        .await
        .expect("verify")
        .into_inner();
    assert!(verified.intact, "{verified:?}");

    // Pending requests survive a restart.
    drop((requester, a, b, root));
    gate.agent.take().expect("running").stop();
    gate.agent = Some(Agent::start(&gate.files));
    let mut a = gate.as_uid(APPROVER_A).await;
    let mut root = Api::connect(&gate.files).await;
    let pending: Vec<u64> = listed(&mut a, RequestFilter::Pending)
        .await
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(pending, kept.iter().rev().copied().collect::<Vec<_>>());
    assert_eq!(root.status().await.pending_approvals, 3);
    assert_eq!(listed(&mut a, RequestFilter::All).await.len(), 5);

    // A rule made stricter while requests wait counts at their approval.
    upsert_one(&mut root, &[], 2).await;
    let stricter = approve(&mut a, kept[1], "one of two now")
        .await
        .expect("decided");
    assert_eq!(
        stricter.state,
        ApprovalState::Pending as i32,
        "{stricter:?}"
    );
    assert_eq!(stricter.approvals_needed, 2);

    // The policy is checked again when the last approval lands: the rule
    // now allows other sources only, so the request is refused, and says why.
    upsert_one(&mut root, &["198.51.100.0/24"], 1).await;
    let refused = approve(&mut a, kept[0], "fine by me")
        .await
        .expect("decided");
    assert_eq!(refused.state, ApprovalState::Refused as i32, "{refused:?}");
    assert!(
        refused.reason.contains("outside the prefixes"),
        "{refused:?}"
    );
    assert!(refused.grants.is_empty());
    gate.connect(ONE).expect_timed_out("refused at approval");
    // An approval needing more than 3 approvers is no rule at all.
    let err = root
        .client
        .update_policy(proto::UpdatePolicyRequest {
            change: Some(proto::update_policy_request::Change::UpsertRule(
                proto::PortRule {
                    port: u32::from(ONE),
                    protocol: proto::Protocol::Tcp as i32,
                    approvals: 4,
                    ..proto::PortRule::default()
                },
            )),
            expected_revision: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// `jit-gate <args>` as a child process, its output collected.
fn spawn_cli(cli: &Cli, args: &[&str]) -> std::process::Child {
    cli.command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run jit-gate")
}

/// Waits for the child, at most `within`.
fn finish(mut child: std::process::Child, within: Duration) -> std::process::Output {
    let deadline = Instant::now() + within;
    while child.try_wait().expect("poll jit-gate").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("jit-gate still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("jit-gate output")
}

/// The pending request the CLI's `request --wait` opened, once listed.
async fn wait_pending(client: &mut JitGateClient<Channel>, request_id: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(held) = listed(client, RequestFilter::Pending)
            .await
            .into_iter()
            .find(|r| {
                r.request
                    .as_ref()
                    .is_some_and(|q| q.request_id == request_id)
            })
        {
            return held.id;
        }
        assert!(Instant::now() < deadline, "{request_id} never pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn request_args<'a>(request_id: &'a str, port: &'a str, source: &'a str) -> Vec<&'a str> {
    vec![
        "request",
        port,
        "--source",
        source,
        "--duration",
        "10m",
        "--requester",
        "alice",
        "--request-id",
        request_id,
        "--wait",
        "--wait-timeout",
        "30s",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_wait_ends_with_the_outcome_and_the_cli_decides() {
    let gate = Gate::start("pending_timeout = \"3s\"");
    let _echo = TcpEcho::start(&gate.topo.gated, SocketAddr::new(IpAddr::V4(GATED_V4), ONE));
    let cli = Cli::new(&gate.files);
    let source = CLIENT_V4.to_string();
    let port = ONE.to_string();
    let mut approver = gate.as_uid(APPROVER_A).await;

    // Nobody decides: the request expires, and --wait says so (status 5).
    let started = Instant::now();
    let expired = finish(
        spawn_cli(&cli, &request_args("wait-expire", &port, &source)),
        Duration::from_secs(20),
    );
    assert_eq!(expired.status.code(), Some(5), "{expired:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "not before the timeout"
    );
    let text = String::from_utf8_lossy(&expired.stdout);
    assert!(text.contains("request-expired"), "{text}");
    gate.connect(ONE).expect_timed_out("expired");

    // Another principal approves while --wait waits: status 0, port open.
    let waiting = spawn_cli(&cli, &request_args("wait-approve", &port, &source));
    let id = wait_pending(&mut approver, "wait-approve").await;
    approve(&mut approver, id, "go").await.expect("approve");
    let approved = finish(waiting, Duration::from_secs(10));
    assert_eq!(approved.status.code(), Some(0), "{approved:?}");
    let mut stream = gate.connect(ONE).expect_connected("approved");
    round_trip(&mut stream, b"waited").expect("echo");

    // Denied while waiting: status 4.
    let waiting = spawn_cli(&cli, &request_args("wait-deny", &port, &source));
    let id = wait_pending(&mut approver, "wait-deny").await;
    approver
        .deny_request(DenyRequestRequest {
            id,
            reason: "no".into(),
        })
        .await
        .expect("deny");
    let denied = finish(waiting, Duration::from_secs(10));
    assert_eq!(denied.status.code(), Some(4), "{denied:?}");

    // The CLI as approver (root is admin) of another principal's requests;
    // `requests` lists what waits, and --all what was decided.
    let mut requester = gate.as_uid(REQUESTER).await;
    let to_approve = ask(&mut requester, "cli-approve", TWO).await;
    let to_deny = ask(&mut requester, "cli-deny", ONE).await;
    let pending = cli.json(&["requests"]);
    let ids: Vec<u64> = pending["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .map(|r| r["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(ids, [to_deny.id, to_approve.id]);
    let once = cli.json(&["approve", &to_approve.id.to_string(), "--comment", "first"]);
    assert_eq!(once["state"], "pending", "{once}");
    assert_eq!(once["decisions"][0]["principal"], "uid:0");
    let denied = cli.json(&["deny", &to_deny.id.to_string(), "--reason", "not now"]);
    assert_eq!(denied["state"], "denied", "{denied}");
    let twice = cli.run(&["approve", &to_approve.id.to_string()]);
    assert_eq!(twice.status.code(), Some(1), "{twice:?}");
    assert!(
        String::from_utf8_lossy(&twice.stderr).contains("distinct"),
        "{twice:?}"
    );
    let all = cli.json(&["requests", "--all"]);
    let states: Vec<&str> = all["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .map(|r| r["state"].as_str().expect("state"))
        .collect();
    assert_eq!(
        states,
        ["denied", "pending", "denied", "approved", "expired"]
    );
    let text = cli.text(&["requests"]);
    assert!(
        text.contains("pending") && text.contains("1/2") && text.contains("alice"),
        "{text}"
    );
}
