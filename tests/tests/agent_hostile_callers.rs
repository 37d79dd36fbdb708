//! The agent's API against hostile or careless callers, over its real
//! socket: malformed and oversize messages get precise codes and are
//! recorded; every text field is bounded before it is stored; sources that
//! make no sense are refused; roles decide, refusals are recorded but
//! bounded per caller, refused policy changes and revokes too; idempotency
//! keys and revokes are per principal;
//! grant lists page and never cut silently; one connection holds a
//! bounded number of calls in flight.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt,
    time::{Duration, Instant},
};

use jit_gate_agent::{
    api::server::MAX_CALLS_PER_CONNECTION,
    proto::{self, Protocol},
};
use jit_gate_tests::{
    agent::{
        Agent, AgentFiles, access, all_grants, channel_as, client, client_as, export_events, python,
    },
    netns::{CLIENT_V4, Topology},
};
use tonic::{Code, transport::Channel};

const SSH: u16 = 22;
/// nobody / nogroup, and two more uids in nogroup.
const BROKER_A: u32 = 65534;
const BROKER_B: u32 = 65533;
const STRANGER: u32 = 65532;
const NOGROUP: u32 = 65534;

struct Setup {
    api: proto::jit_gate_client::JitGateClient<Channel>,
    _agent: Agent,
    files: AgentFiles,
    _topo: Topology,
}

impl Setup {
    async fn new(extra: &str) -> Setup {
        let topo = Topology::new();
        let files = AgentFiles::new(&topo.gated);
        files.write_config(&[&topo.gated_if], extra);
        // Other users must get through the test's directory.
        std::fs::set_permissions(files.dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("open the directory to traversal");
        let agent = Agent::start(&files);
        Setup {
            api: client(&files).await,
            _agent: agent,
            files,
            _topo: topo,
        }
    }
}

async fn events_of(
    api: &mut proto::jit_gate_client::JitGateClient<Channel>,
    kind: proto::EventKind,
) -> Vec<proto::Event> {
    let request = proto::ExportAuditRequest {
        kinds: vec![kind as i32],
        ..Default::default()
    };
    export_events(api, request).await
}

fn code(status: Result<impl std::fmt::Debug, tonic::Status>) -> (Code, String) {
    let status = status.expect_err("refused");
    (status.code(), status.message().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversize_messages_get_precise_codes_and_are_recorded() {
    let mut setup = Setup::new("").await;
    let answers = python("raw_calls.py", &[setup.files.socket().as_os_str()]);
    let code_of = |case: &str| {
        answers
            .iter()
            .find(|a| a["case"] == case)
            .unwrap_or_else(|| panic!("no {case} in {answers:?}"))["code"]
            .clone()
    };
    assert_eq!(code_of("invalid-utf8"), "INVALID_ARGUMENT", "{answers:?}");
    assert_eq!(
        code_of("truncated-varint"),
        "INVALID_ARGUMENT",
        "{answers:?}"
    );
    assert_eq!(code_of("oversize"), "RESOURCE_EXHAUSTED", "{answers:?}");
    // Recorded, with the method and the code, and nothing granted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let refused = events_of(&mut setup.api, proto::EventKind::CallRefused).await;
        if refused.len() >= 3 || Instant::now() > deadline {
            break refused;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let codes: BTreeSet<String> = refused
        .iter()
        .map(|e| {
            assert!(e.message.contains("RequestAccess"), "{e:?}");
            let details: serde_json::Value = serde_json::from_str(&e.details_json).unwrap();
            details["code"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        codes,
        BTreeSet::from(["InvalidArgument".into(), "ResourceExhausted".into()]),
        "{refused:?}"
    );
    assert!(all_grants(&mut setup.api).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_policy_changes_and_revokes_are_recorded() {
    use proto::update_policy_request::Change;
    let mut setup = Setup::new("").await;
    let api = &mut setup.api;
    let before = api.get_policy(proto::GetPolicyRequest {}).await.unwrap();
    let invalid_rule = proto::UpdatePolicyRequest {
        change: Some(Change::UpsertRule(proto::PortRule {
            port: 0,
            protocol: Protocol::Tcp as i32,
            ..Default::default()
        })),
        expected_revision: 0,
    };
    let (invalid, _) = code(api.update_policy(invalid_rule).await);
    let stale = proto::UpdatePolicyRequest {
        change: Some(Change::RemoveRule(proto::RuleKey {
            port: u32::from(SSH),
            protocol: Protocol::Tcp as i32,
        })),
        expected_revision: before.get_ref().revision + 7,
    };
    let (stale, _) = code(api.update_policy(stale).await);
    let unknown_grant = proto::RevokeGrantRequest {
        grant_id: 4_242,
        ..Default::default()
    };
    let (unknown, _) = code(api.revoke_grant(unknown_grant).await);
    assert_eq!(
        (invalid, stale, unknown),
        (
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::NotFound
        )
    );
    // Nothing changed, and each refusal is in the audit log with its method.
    assert_eq!(
        api.get_policy(proto::GetPolicyRequest {})
            .await
            .unwrap()
            .into_inner(),
        before.into_inner()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let refused = events_of(api, proto::EventKind::CallRefused).await;
        if refused.len() >= 3 || Instant::now() > deadline {
            break refused;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Recorded from the API's tasks: in any order.
    let recorded: BTreeSet<(String, String)> = refused
        .iter()
        .map(|e| {
            let details: serde_json::Value = serde_json::from_str(&e.details_json).unwrap();
            let method = details["method"].as_str().unwrap();
            let method = method.rsplit('/').next().unwrap().to_owned();
            (method, details["code"].as_str().unwrap().to_owned())
        })
        .collect();
    let expected = [
        ("UpdatePolicy", "InvalidArgument"),
        ("UpdatePolicy", "FailedPrecondition"),
        ("RevokeGrant", "NotFound"),
    ]
    .map(|(m, c)| (m.to_owned(), c.to_owned()));
    assert_eq!(recorded, BTreeSet::from(expected), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_is_bounded_and_sources_that_make_no_sense_are_refused() {
    let mut setup = Setup::new("").await;
    let api = &mut setup.api;
    let client = CLIENT_V4.to_string();
    // A huge request id: refused, and the record keeps a bounded excerpt.
    let huge = "r".repeat(1_000_000);
    for _ in 0..3 {
        let (code, message) = code(
            api.request_access(access(&huge, &[(SSH, Protocol::Tcp, &client)], 60))
                .await,
        );
        assert_eq!(code, Code::InvalidArgument);
        assert!(
            message.contains("request_id is longer than 128"),
            "{message}"
        );
    }
    let refused = events_of(api, proto::EventKind::RequestRefused).await;
    assert_eq!(refused.len(), 3);
    for event in &refused {
        assert!(
            event.message.len() < 500 && event.details_json.len() < 1000,
            "an oversize field reached the log: {} + {} bytes",
            event.message.len(),
            event.details_json.len()
        );
        assert!(
            event.message.contains("(1000000 characters)"),
            "{}",
            event.message
        );
    }

    // Sources that make no sense, and BOTH in a request.
    let mut with_protocol = access("both", &[(SSH, Protocol::Tcp, &client)], 60);
    with_protocol.ports[0].protocol = Protocol::Both as i32;
    let (code_both, message) = code(api.request_access(with_protocol).await);
    assert_eq!(code_both, Code::InvalidArgument);
    assert!(
        message.contains("BOTH names a rule's protocols"),
        "{message}"
    );
    for (source, needle) in [
        ("0.0.0.0/16", "unspecified"),
        ("::/48", "special-purpose"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("::ffff:192.0.2.2", "IPv4-mapped"),
        ("224.0.0.1", "multicast"),
    ] {
        let (code, message) = code(
            api.request_access(access(source, &[(SSH, Protocol::Tcp, source)], 60))
                .await,
        );
        assert_eq!(code, Code::InvalidArgument, "{source}: {message}");
        assert!(message.contains(needle), "{source}: {message}");
    }
    assert!(all_grants(api).await.is_empty());

    // The revoke reason is bounded and has no control characters.
    let grant = api
        .request_access(access("ok", &[(SSH, Protocol::Tcp, &client)], 60))
        .await
        .expect("grant")
        .into_inner()
        .grants
        .remove(0);
    for reason in ["clear\u{1b}[2J screen".to_owned(), "x".repeat(513)] {
        let (code, message) = code(
            api.revoke_grant(proto::RevokeGrantRequest {
                grant_id: grant.id,
                terminate_connections: false,
                reason,
            })
            .await,
        );
        assert_eq!(code, Code::InvalidArgument, "{message}");
    }
    assert_eq!(
        all_grants(api).await[0].state,
        proto::GrantState::Active as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_refusals_are_recorded_but_bounded_and_principals_are_separate() {
    let mut setup = Setup::new(&format!(
        "api.socket_group = \"nogroup\"\napi.principals = [{{ uid = {BROKER_A}, role = \"broker\" }}, {{ uid = {BROKER_B}, role = \"broker\" }}]"
    ))
    .await;
    let files = &setup.files;
    let api = &mut setup.api;

    // Anyone who reaches the socket gets health; reflection needs a role.
    let stranger = channel_as(files, STRANGER, NOGROUP).await.expect("connect");
    let health = tonic_health::pb::health_client::HealthClient::new(stranger.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health for anyone")
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let reflection = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
        stranger.clone(),
    )
    .server_reflection_info(tokio_stream::iter([
        tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                ),
            ),
        },
    ]))
    .await;
    assert_eq!(
        reflection.expect_err("reflection needs a role").code(),
        Code::PermissionDenied
    );
    // Many refusals: each answered, a bounded number recorded.
    let mut no_role = proto::jit_gate_client::JitGateClient::new(stranger);
    for _ in 0..30 {
        let (code, _) = code(no_role.get_policy(proto::GetPolicyRequest {}).await);
        assert_eq!(code, Code::PermissionDenied);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused: Vec<_> = events_of(api, proto::EventKind::CallRefused)
        .await
        .into_iter()
        .filter(|e| e.principal == format!("uid:{STRANGER}"))
        .collect();
    assert!(
        (1..=5).contains(&refused.len()),
        "31 refusals by one caller left {} records",
        refused.len()
    );

    // Idempotency keys are per principal; revoking another's grant needs admin.
    let client_addr = CLIENT_V4.to_string();
    let request = access("shared-id", &[(SSH, Protocol::Tcp, &client_addr)], 60);
    let mut a = client_as(files, BROKER_A, NOGROUP).await.expect("broker A");
    let mut b = client_as(files, BROKER_B, NOGROUP).await.expect("broker B");
    let of_a = a
        .request_access(request.clone())
        .await
        .expect("A")
        .into_inner();
    let of_b = b.request_access(request).await.expect("B").into_inner();
    assert!(!of_b.replayed, "B must not get A's grants back");
    assert_ne!(of_a.grants[0].id, of_b.grants[0].id);
    assert_eq!(of_b.grants[0].principal, format!("uid:{BROKER_B}"));
    let revoke = |grant_id| proto::RevokeGrantRequest {
        grant_id,
        terminate_connections: false,
        reason: String::new(),
    };
    let (code_other, message) = code(b.revoke_grant(revoke(of_a.grants[0].id)).await);
    assert_eq!(code_other, Code::PermissionDenied, "{message}");
    assert!(
        message.contains(&format!("belongs to uid:{BROKER_A}")),
        "{message}"
    );
    a.revoke_grant(revoke(of_a.grants[0].id))
        .await
        .expect("A revokes its own grant");
    api.revoke_grant(revoke(of_b.grants[0].id))
        .await
        .expect("admin revokes any grant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_lists_page_and_never_cut_silently() {
    const GRANTS: usize = 1050;
    let mut setup = Setup::new("").await;
    let api = &mut setup.api;
    for i in 0..GRANTS {
        let source = format!("198.18.{}.{}", i / 256, i % 256);
        api.request_access(access(
            &format!("r{i}"),
            &[(SSH, Protocol::Tcp, &source)],
            600,
        ))
        .await
        .unwrap_or_else(|e| panic!("grant {i}: {e}"));
    }
    let page = |page_size, page_token: &str| proto::ListGrantsRequest {
        include_ended: false,
        page_size,
        page_token: page_token.into(),
        ..Default::default()
    };
    let first = api
        .list_grants(page(1000, ""))
        .await
        .expect("page 1")
        .into_inner();
    assert_eq!(first.grants.len(), 1000);
    assert!(
        !first.next_page_token.is_empty(),
        "a full page says more follow"
    );
    let second = api
        .list_grants(page(1000, &first.next_page_token))
        .await
        .expect("page 2")
        .into_inner();
    assert_eq!(second.grants.len(), GRANTS - 1000);
    assert!(second.next_page_token.is_empty());
    let ids: BTreeSet<u64> = first
        .grants
        .iter()
        .chain(&second.grants)
        .map(|g| g.id)
        .collect();
    assert_eq!(ids.len(), GRANTS);
    let default = api
        .list_grants(page(0, ""))
        .await
        .expect("default")
        .into_inner();
    assert_eq!(default.grants.len(), 100);
    // The deprecated `limit` gets at most a full page, and says more follow.
    let old_style = api
        .list_grants(proto::ListGrantsRequest {
            limit: 5000,
            ..page(0, "")
        })
        .await
        .expect("limit")
        .into_inner();
    assert_eq!(old_style.grants.len(), 1000);
    assert!(!old_style.next_page_token.is_empty());
    for (request, needle) in [
        (page(1001, ""), "over the maximum of 1000"),
        (page(10, "x"), "page_token"),
    ] {
        let (code, message) = code(api.list_grants(request).await);
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.contains(needle), "{message}");
    }
}

/// Without a bound a caller could queue any number of calls on one
/// connection; the agent advertises one in its HTTP/2 settings, which
/// every stock client obeys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_holds_a_bounded_number_of_calls() {
    let setup = Setup::new("").await;
    let socket = tokio::net::UnixStream::connect(setup.files.socket())
        .await
        .expect("connect to the agent's socket");
    let (_calls, mut connection) = h2::client::handshake(socket)
        .await
        .expect("HTTP/2 handshake");
    // Until the agent's SETTINGS frame is read, a client assumes no limit.
    let deadline = Instant::now() + Duration::from_secs(5);
    while connection.max_concurrent_send_streams() == usize::MAX && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(50), &mut connection).await;
    }
    assert_eq!(
        connection.max_concurrent_send_streams(),
        usize::try_from(MAX_CALLS_PER_CONNECTION).expect("fits")
    );
}
