//! The agent's API end to end, called over its Unix socket as a broker, an
//! operator or a generic gRPC tool would, with the gate enforcing in a
//! namespace: bad requests are refused precisely, audited and change
//! nothing; the policy changes live; health and reflection answer; the
//! caller's uid decides what it may do.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt,
    time::{Duration, SystemTime},
};

use jit_gate_agent::proto::{
    self, Protocol, access_request::Lifetime, jit_gate_client::JitGateClient,
    update_policy_request::Change,
};
use jit_gate_tests::{
    agent::{
        Agent, AgentFiles, access, all_grants, client, client_as, connect, events_until, policy,
        without_remaining,
    },
    netns::{CLIENT_V4, CLIENT_V4_OUTSIDE, GATED_V4, Topology},
    traffic::{TcpEcho, UdpSink, round_trip, tcp_connect, udp_send},
};
use prost::Message;
use tonic::{Code, Response, Status, transport::Channel};

const SSH: u16 = 22;
const RDP: u16 = 3389;
const WINRM: u16 = 5985;
/// Not in any policy of these tests.
const UNPROTECTED: u16 = 2222;
/// Protected only once a test adds a rule for it.
const APP: u16 = 8022;
const SYSLOG: u16 = 5140;
/// The only sources the RDP rule of the bad-request test allows.
const RDP_SOURCES: &str = "198.51.100.0/24";
/// nobody / nogroup.
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

/// A topology with a started agent on its gated end, and a root client.
struct Setup {
    api: JitGateClient<Channel>,
    // Drop order: the agent, then its files, then the namespaces.
    _agent: Agent,
    files: AgentFiles,
    topo: Topology,
}

impl Setup {
    async fn new(extra_config: &str) -> Self {
        let topo = Topology::new();
        let files = AgentFiles::new(&topo.gated);
        files.write_config(&[&topo.gated_if], extra_config);
        let agent = Agent::start(&files);
        Setup {
            api: client(&files).await,
            _agent: agent,
            files,
            topo,
        }
    }
}

fn gated(port: u16) -> SocketAddr {
    SocketAddr::new(GATED_V4.into(), port)
}

fn rule(port: u16, protocol: Protocol) -> proto::PortRule {
    proto::PortRule {
        port: port.into(),
        protocol: protocol as i32,
        ..Default::default()
    }
}

fn upsert(rule: proto::PortRule) -> proto::UpdatePolicyRequest {
    proto::UpdatePolicyRequest {
        change: Some(Change::UpsertRule(rule)),
        expected_revision: 0,
    }
}

fn remove(port: u16, protocol: Protocol) -> proto::UpdatePolicyRequest {
    proto::UpdatePolicyRequest {
        change: Some(Change::RemoveRule(proto::RuleKey {
            port: port.into(),
            protocol: protocol as i32,
        })),
        expected_revision: 0,
    }
}

fn hours(h: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: h * 3600,
        nanos: 0,
    })
}

/// Asserts that `result` is a refusal with `code` whose message contains
/// every one of `needles`; returns the message.
fn expect_refused<T: std::fmt::Debug>(
    what: &str,
    result: Result<Response<T>, Status>,
    code: Code,
    needles: &[&str],
) -> String {
    let status = result.expect_err(what);
    assert_eq!(status.code(), code, "{what}: {status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{what}: message {:?} does not name {needle:?}",
            status.message()
        );
    }
    status.message().to_owned()
}

fn state(grant: &proto::Grant) -> proto::GrantState {
    proto::GrantState::try_from(grant.state).expect("known grant state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_is_refused_precisely_audited_and_changes_nothing() {
    let Setup {
        ref mut api,
        ref files,
        ref topo,
        ..
    } = Setup::new("").await;
    let _servers = [SSH, RDP].map(|port| TcpEcho::start(&topo.gated, gated(port)));
    api.update_policy(upsert(proto::PortRule {
        allowed_source_prefixes: vec![RDP_SOURCES.into()],
        ..rule(RDP, Protocol::Tcp)
    }))
    .await
    .expect("restrict RDP sources");
    api.update_policy(upsert(proto::PortRule {
        require_justification: true,
        require_ticket: true,
        ..rule(WINRM, Protocol::Tcp)
    }))
    .await
    .expect("require justification and ticket on WinRM");

    let client = CLIENT_V4.to_string();
    let c = client.as_str();
    let tcp = Protocol::Tcp;
    let with = |mut request: proto::AccessRequest, edit: fn(&mut proto::AccessRequest)| {
        edit(&mut request);
        request
    };
    let an_hour_ago = prost_types::Timestamp::from(SystemTime::now() - Duration::from_hours(1));
    let cases: [(proto::AccessRequest, Code, &[&str]); 20] = [
        (
            access("unknown-port", &[(UNPROTECTED, tcp, c)], 60),
            Code::NotFound,
            &["port 2222 is not protected"],
        ),
        (
            access("protocol-mismatch", &[(SSH, Protocol::Udp, c)], 60),
            Code::InvalidArgument,
            &["port 22 is protected for tcp only, not udp"],
        ),
        (
            access("malformed-prefix", &[(SSH, tcp, "192.0.2.300/24")], 60),
            Code::InvalidArgument,
            &["\"192.0.2.300/24\" is not an IPv4/IPv6 address or prefix"],
        ),
        (
            access("host-bits", &[(SSH, tcp, "192.0.2.2/24")], 60),
            Code::InvalidArgument,
            &["192.0.2.2/24 has host bits set", "192.0.2.0/24"],
        ),
        (
            access("broad-v4", &[(SSH, tcp, "10.0.0.0/8")], 60),
            Code::InvalidArgument,
            &["10.0.0.0/8 is too broad", "/16"],
        ),
        (
            access("broad-v6", &[(SSH, tcp, "2001:db8::/32")], 60),
            Code::InvalidArgument,
            &["2001:db8::/32 is too broad", "/48"],
        ),
        (
            access("outside-allowed", &[(RDP, tcp, c)], 60),
            Code::PermissionDenied,
            &["192.0.2.2/32 is outside the prefixes allowed for port 3389/tcp"],
        ),
        (
            access("zero-duration", &[(SSH, tcp, c)], 0),
            Code::InvalidArgument,
            &["duration must be positive"],
        ),
        (
            access("negative-duration", &[(SSH, tcp, c)], -60),
            Code::InvalidArgument,
            &["duration must be positive"],
        ),
        (
            access("over-maximum", &[(SSH, tcp, c)], 4 * 3600),
            Code::InvalidArgument,
            &["duration 4h exceeds the maximum of 3h for port 22/tcp"],
        ),
        (
            proto::AccessRequest {
                lifetime: Some(Lifetime::EndTime(an_hour_ago)),
                ..access("end-in-past", &[(SSH, tcp, c)], 60)
            },
            Code::InvalidArgument,
            &["end time", "is in the past"],
        ),
        (
            with(access("no-justification", &[(WINRM, tcp, c)], 60), |r| {
                r.justification.clear();
                r.ticket = "INC-1".into();
            }),
            Code::InvalidArgument,
            &["port 5985/tcp requires a justification"],
        ),
        (
            access("no-ticket", &[(WINRM, tcp, c)], 60),
            Code::InvalidArgument,
            &["port 5985/tcp requires a ticket"],
        ),
        (
            access("no-ports", &[], 60),
            Code::InvalidArgument,
            &["the request names no ports"],
        ),
        (
            access("too-many-ports", &[(SSH, tcp, c); 65], 60),
            Code::InvalidArgument,
            &["names 65 ports, at most 64"],
        ),
        (
            access(
                "duplicate-port",
                &[(SSH, tcp, c), (SSH, tcp, "192.0.2.128/25")],
                60,
            ),
            Code::InvalidArgument,
            &["port 22/tcp is named more than once"],
        ),
        (
            access("", &[(SSH, tcp, c)], 60),
            Code::InvalidArgument,
            &["request_id is empty"],
        ),
        (
            proto::AccessRequest {
                lifetime: None,
                ..access("no-lifetime", &[(SSH, tcp, c)], 60)
            },
            Code::InvalidArgument,
            &["give a duration or an end time"],
        ),
        (
            with(access("unknown-protocol", &[(SSH, tcp, c)], 60), |r| {
                r.ports[0].protocol = 7;
            }),
            Code::InvalidArgument,
            &["ports[0]", "unknown protocol value 7"],
        ),
        // Atomicity: the first two ports alone would be granted.
        (
            access(
                "last-port-bad",
                &[
                    (SSH, tcp, c),
                    (RDP, tcp, "198.51.100.7"),
                    (UNPROTECTED, tcp, c),
                ],
                60,
            ),
            Code::NotFound,
            &["port 2222 is not protected"],
        ),
    ];

    let mut refused = BTreeMap::new();
    for (request, code, needles) in cases {
        let id = request.request_id.clone();
        let what = format!("request {id:?}");
        let message = expect_refused(&what, api.request_access(request).await, code, needles);
        let grants = all_grants(api).await;
        assert!(grants.is_empty(), "{what} created {grants:?}");
        let elements = files.nft_granted();
        assert!(elements.is_empty(), "{what} added {elements:?}");
        refused.insert(id, (code, message));
    }
    for port in [SSH, RDP] {
        tcp_connect(&topo.client, CLIENT_V4.into(), gated(port))
            .expect_timed_out("no grant after refused requests");
    }

    // The good ports of the atomicity case are grantable on their own.
    let good = &[(SSH, tcp, c), (RDP, tcp, "198.51.100.7")];
    let granted = api
        .request_access(access("good-ports", good, 60))
        .await
        .expect("the good ports alone")
        .into_inner();
    assert_eq!(granted.grants.len(), 2);
    // Reusing its id for something else is refused and opens nothing.
    let outside = CLIENT_V4_OUTSIDE.to_string();
    let reused = access("good-ports", &[(SSH, tcp, &outside)], 60);
    let message = expect_refused(
        "reused request_id",
        api.request_access(reused).await,
        Code::AlreadyExists,
        &["\"good-ports\" was already used for a different request"],
    );
    refused.insert("good-ports".into(), (Code::AlreadyExists, message));
    assert_eq!(all_grants(api).await.len(), 2);
    assert_eq!(files.nft_granted().len(), 2);
    tcp_connect(&topo.client, CLIENT_V4_OUTSIDE.into(), gated(SSH))
        .expect_timed_out("the reused id's source");
    tcp_connect(&topo.client, CLIENT_V4.into(), gated(SSH)).expect_connected("the good grant");

    // Each refusal is in the audit log, once, with its reason and code.
    let details = |event: &proto::Event| -> serde_json::Value {
        serde_json::from_str(&event.details_json).expect("details are JSON")
    };
    let events = events_until(api, &[proto::EventKind::RequestRefused], |events| {
        events.len() >= refused.len()
    })
    .await;
    let audited: BTreeMap<String, &proto::Event> = events
        .iter()
        .map(|event| (details(event)["request_id"].as_str().unwrap().into(), event))
        .collect();
    assert!(audited.keys().eq(refused.keys()), "{events:#?}");
    for (id, (code, message)) in &refused {
        let event = audited[id];
        assert!(event.message.contains(message), "{id:?}: {event:?}");
        assert_eq!(event.principal, "uid:0", "{id:?}: {event:?}");
        assert_eq!(
            details(event)["code"],
            format!("{code:?}"),
            "{id:?}: {event:?}"
        );
    }
}

/// The code and message of a batch's answer to one request, or its grants.
fn batch_outcome(result: &proto::AccessResult) -> Result<&proto::AccessResponse, (Code, &str)> {
    match result
        .outcome
        .as_ref()
        .expect("every result has an outcome")
    {
        proto::access_result::Outcome::Response(response) => Ok(response),
        proto::access_result::Outcome::Refusal(refusal) => Err((
            Code::from_i32(i32::try_from(refusal.code).expect("a gRPC code")),
            refusal.message.as_str(),
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_each_request_as_a_call_of_its_own() {
    let Setup {
        ref mut api,
        ref files,
        ref topo,
        ..
    } = Setup::new("").await;
    let _server = TcpEcho::start(&topo.gated, gated(SSH));
    let tcp = Protocol::Tcp;
    let client = CLIENT_V4.to_string();
    let outside = CLIENT_V4_OUTSIDE.to_string();
    let first = api
        .request_access(access("first", &[(SSH, tcp, &client)], 60))
        .await
        .expect("a grant before the batch")
        .into_inner();

    let batch = vec![
        access("first", &[(SSH, tcp, &client)], 60),
        access("bad-source", &[(SSH, tcp, "192.0.2.300")], 60),
        access("outside", &[(SSH, tcp, &outside)], 60),
        access("outside", &[(SSH, tcp, &outside)], 60),
        access("first", &[(SSH, tcp, &outside)], 60),
    ];
    let results = api
        .request_access_batch(proto::AccessBatchRequest {
            requests: batch.clone(),
        })
        .await
        .expect("the batch")
        .into_inner()
        .results;
    assert_eq!(results.len(), 5, "{results:#?}");
    let replayed = batch_outcome(&results[0]).expect("a retry of an earlier call");
    assert!(replayed.replayed);
    assert_eq!(
        without_remaining(replayed.grants.clone()),
        without_remaining(first.grants)
    );
    let (code, message) = batch_outcome(&results[1]).expect_err("a bad source");
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        message.contains("\"192.0.2.300\" is not an IPv4/IPv6 address"),
        "{message}"
    );
    let granted = batch_outcome(&results[2]).expect("a new source");
    assert!(!granted.replayed);
    assert_eq!(granted.grants.len(), 1);
    let again = batch_outcome(&results[3]).expect("its retry within the batch");
    assert!(again.replayed);
    assert_eq!(
        without_remaining(again.grants.clone()),
        without_remaining(granted.grants.clone())
    );
    let (code, message) = batch_outcome(&results[4]).expect_err("an id reused");
    assert_eq!(code, Code::AlreadyExists);
    assert!(
        message.contains("already used for a different request"),
        "{message}"
    );

    // The kernel lets in exactly the sources granted.
    tcp_connect(&topo.client, CLIENT_V4_OUTSIDE.into(), gated(SSH))
        .expect_connected("granted in the batch");
    assert_eq!(all_grants(api).await.len(), 2);
    assert_eq!(files.nft_granted().len(), 2);

    // Each refused request is audited as a refused call of its own would be.
    let refused = events_until(api, &[proto::EventKind::RequestRefused], |events| {
        events.len() >= 2
    })
    .await;
    let ids: BTreeSet<String> = refused
        .iter()
        .map(|event| {
            let details: serde_json::Value =
                serde_json::from_str(&event.details_json).expect("details are JSON");
            details["request_id"]
                .as_str()
                .expect("a request id")
                .to_owned()
        })
        .collect();
    assert_eq!(ids, BTreeSet::from(["bad-source".into(), "first".into()]));

    // The whole batch again: what it granted comes back replayed, the rest
    // is decided again.
    let retried = api
        .request_access_batch(proto::AccessBatchRequest { requests: batch })
        .await
        .expect("the batch again")
        .into_inner()
        .results;
    let replayed = batch_outcome(&retried[2]).expect("granted by the first batch");
    assert!(replayed.replayed);
    assert_eq!(
        without_remaining(replayed.grants.clone()),
        without_remaining(granted.grants.clone())
    );
    let (code, _) = batch_outcome(&retried[1]).expect_err("still a bad source");
    assert_eq!(code, Code::InvalidArgument);

    // An empty batch and an oversized one are refused whole; nothing changes.
    for size in [0, 1001] {
        let requests = (0..size)
            .map(|i| access(&format!("many-{i}"), &[(SSH, tcp, &client)], 60))
            .collect();
        expect_refused(
            "a batch out of bounds",
            api.request_access_batch(proto::AccessBatchRequest { requests })
                .await,
            Code::InvalidArgument,
            &[&format!("the batch holds {size} requests, 1 to 1000")],
        );
    }
    assert_eq!(all_grants(api).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_apply_live_and_removing_a_rule_ends_only_its_grants() {
    let Setup {
        ref mut api,
        ref files,
        ref topo,
        ..
    } = Setup::new("").await;
    let initial = policy(api).await;
    let ports: Vec<(u32, i32)> = initial.rules.iter().map(|r| (r.port, r.protocol)).collect();
    let tcp = Protocol::Tcp as i32;
    assert_eq!(ports, [(22, tcp), (3389, tcp), (5985, tcp), (5986, tcp)]);
    for rule in &initial.rules {
        assert_eq!(rule.max_duration, hours(3), "{rule:?}");
        assert!(rule.allowed_source_prefixes.is_empty(), "{rule:?}");
        assert!(
            !rule.require_justification && !rule.require_ticket,
            "{rule:?}"
        );
    }

    let client: IpAddr = CLIENT_V4.into();
    let _ssh = TcpEcho::start(&topo.gated, gated(SSH));
    let _app = TcpEcho::start(&topo.gated, gated(APP));
    let syslog = UdpSink::start(&topo.gated, gated(SYSLOG));
    let mut early = tcp_connect(&topo.client, client, gated(APP)).expect_connected("unprotected");
    round_trip(&mut early, b"before").expect("echo before protection");
    udp_send(&topo.client, client, gated(SYSLOG), b"open");
    assert!(syslog.arrives(b"open"), "UDP to an unprotected port");

    // Protect a TCP and a UDP port live.
    api.update_policy(upsert(rule(APP, Protocol::Tcp)))
        .await
        .expect("protect APP");
    let protected = api
        .update_policy(upsert(rule(SYSLOG, Protocol::Udp)))
        .await
        .expect("protect SYSLOG")
        .into_inner();
    assert_eq!(protected.revision, initial.revision + 2);
    assert_eq!(protected, policy(api).await);
    round_trip(&mut early, b"after").expect("a session established before protection lives on");
    tcp_connect(&topo.client, client, gated(APP)).expect_timed_out("newly protected TCP port");
    udp_send(&topo.client, client, gated(SYSLOG), b"closed");
    assert!(!syslog.arrives(b"closed"), "newly protected UDP port");

    let source = CLIENT_V4.to_string();
    let granted = api
        .request_access(access(
            "three-ports",
            &[
                (SSH, Protocol::Tcp, &source),
                (APP, Protocol::Tcp, &source),
                (SYSLOG, Protocol::Udp, &source),
            ],
            600,
        ))
        .await
        .expect("grant")
        .into_inner()
        .grants;
    let grant_on = |port: u16| proto::Grant {
        remaining: None,
        ..granted
            .iter()
            .find(|g| g.port == u32::from(port))
            .expect("grant per port")
            .clone()
    };
    let mut app_session =
        tcp_connect(&topo.client, client, gated(APP)).expect_connected("granted APP");
    round_trip(&mut app_session, b"granted").expect("echo under the grant");
    udp_send(&topo.client, client, gated(SYSLOG), b"granted");
    assert!(syslog.arrives(b"granted"), "UDP under the grant");

    // Changing one rule leaves the grants on other ports as they were.
    api.update_policy(upsert(proto::PortRule {
        max_duration: hours(1),
        ..rule(APP, Protocol::Tcp)
    }))
    .await
    .expect("change the APP rule");
    let after_change = all_grants(api).await;
    for port in [SSH, SYSLOG] {
        assert!(after_change.contains(&grant_on(port)), "{after_change:#?}");
    }
    tcp_connect(&topo.client, client, gated(SSH)).expect_connected("SSH after the change");

    // Removing a rule ends its grants only, and leaves its port open.
    let removed = api
        .update_policy(remove(APP, Protocol::Tcp))
        .await
        .expect("remove APP")
        .into_inner();
    assert!(removed.rules.iter().all(|r| r.port != u32::from(APP)));
    let app_grant = grant_on(APP).id;
    let grants = all_grants(api).await;
    for grant in &grants {
        if grant.id == app_grant {
            assert_eq!(state(grant), proto::GrantState::EndedByPolicy, "{grant:?}");
            assert!(grant.ended_at.is_some(), "{grant:?}");
        } else {
            assert_eq!(state(grant), proto::GrantState::Active, "{grant:?}");
        }
    }
    events_until(api, &[proto::EventKind::GrantEndedByPolicy], |events| {
        events.iter().any(|e| e.grant_id == app_grant)
    })
    .await;
    assert_eq!(files.nft_granted().len(), 2, "SSH and SYSLOG elements");
    tcp_connect(&topo.client, CLIENT_V4_OUTSIDE.into(), gated(APP))
        .expect_connected("a port no rule protects");
    tcp_connect(&topo.client, client, gated(SSH)).expect_connected("SSH after the removal");
    udp_send(&topo.client, client, gated(SYSLOG), b"still granted");
    assert!(syslog.arrives(b"still granted"), "UDP after the removal");

    // A stale expected_revision changes nothing.
    let current = policy(api).await;
    expect_refused(
        "stale revision",
        api.update_policy(proto::UpdatePolicyRequest {
            expected_revision: current.revision - 1,
            ..upsert(rule(APP, Protocol::Tcp))
        })
        .await,
        Code::FailedPrecondition,
        &[&format!(
            "policy is at revision {}, not {}",
            current.revision,
            current.revision - 1
        )],
    );
    assert_eq!(policy(api).await, current);

    // Invalid rules change nothing.
    let replace_with_twice_ssh = proto::UpdatePolicyRequest {
        change: Some(Change::Replace(proto::Policy {
            rules: vec![rule(SSH, Protocol::Tcp), rule(SSH, Protocol::Tcp)],
            revision: 0,
        })),
        expected_revision: 0,
    };
    let invalid: [(&str, proto::UpdatePolicyRequest, &[&str]); 5] = [
        (
            "max_duration 25h",
            upsert(proto::PortRule {
                max_duration: hours(25),
                ..rule(SSH, Protocol::Tcp)
            }),
            &["rule 22/tcp: max_duration 1day 1h is outside 1m..=24h"],
        ),
        (
            "max_duration 30s",
            upsert(proto::PortRule {
                max_duration: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                ..rule(SSH, Protocol::Tcp)
            }),
            &["rule 22/tcp: max_duration 30s is outside 1m..=24h"],
        ),
        (
            "the same port and protocol twice",
            replace_with_twice_ssh,
            &["port 22/tcp is covered by more than one rule"],
        ),
        (
            "a BOTH rule over a TCP rule",
            upsert(rule(SSH, Protocol::Both)),
            &["port 22/tcp is covered by more than one rule"],
        ),
        (
            "port 0",
            upsert(rule(0, Protocol::Tcp)),
            &["upsert_rule: port 0 is not in 1..=65535"],
        ),
    ];
    for (what, update, needles) in invalid {
        expect_refused(
            what,
            api.update_policy(update).await,
            Code::InvalidArgument,
            needles,
        );
        assert_eq!(policy(api).await, current, "{what} changed the policy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_grpc_clients_get_health_and_reflection() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let setup = Setup::new("").await;
    let channel = connect(&setup.files.socket()).await.expect("connect");

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "jitgate.v1.JitGate"] {
        let answer = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
            .into_inner();
        assert_eq!(answer.status, ServingStatus::Serving as i32, "{service:?}");
    }

    let ask = |message: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "jitgate.v1.JitGate".into(),
            )),
        ]))
        .await
        .expect("reflection")
        .into_inner();
    let mut next = async || {
        answers
            .message()
            .await
            .expect("reflection answer")
            .and_then(|a| a.message_response)
            .expect("a reflection response")
    };
    let MessageResponse::ListServicesResponse(list) = next().await else {
        panic!("expected a service list");
    };
    let services: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(services.contains(&"jitgate.v1.JitGate"), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{services:?}");
    let MessageResponse::FileDescriptorResponse(files) = next().await else {
        panic!("expected file descriptors");
    };
    let descriptors: Vec<prost_types::FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).expect("decode"))
        .collect();
    let contract = descriptors
        .iter()
        .find(|d| d.package() == "jitgate.v1")
        .unwrap_or_else(|| panic!("no jitgate.v1 file in {descriptors:#?}"));
    assert_eq!(contract.name(), "jit_gate.proto");
    let service = contract
        .service
        .iter()
        .find(|s| s.name() == "JitGate")
        .expect("service JitGate");
    let methods: Vec<&str> = service
        .method
        .iter()
        .map(prost_types::MethodDescriptorProto::name)
        .collect();
    for method in ["RequestAccess", "UpdatePolicy", "WatchEvents"] {
        assert!(methods.contains(&method), "{methods:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_uid_decides_what_it_may_do() {
    let Setup {
        ref mut api,
        ref files,
        ..
    } = Setup::new(&format!(
        "api.socket_group = \"nogroup\"\napi.principals = [{{ uid = {NOBODY}, role = \"auditor\" }}]"
    ))
    .await;
    // Other users must get through the test's directory, whatever the umask.
    std::fs::set_permissions(files.dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("open the directory to traversal");

    // Outside the socket's group the kernel refuses the connection.
    let err = client_as(files, NOBODY, NOBODY - 1)
        .await
        .expect_err("outside the socket's group");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");

    // In the group but not a configured principal: the agent refuses.
    let mut stranger = client_as(files, NOBODY - 1, NOGROUP)
        .await
        .expect("the socket's group may connect");
    expect_refused(
        "unconfigured uid",
        stranger.get_policy(proto::GetPolicyRequest {}).await,
        Code::PermissionDenied,
        &["uid 65533 is not a configured principal"],
    );

    // An auditor reads, and may not change anything.
    let mut auditor = client_as(files, NOBODY, NOGROUP)
        .await
        .expect("the socket's group may connect");
    assert_eq!(policy(&mut auditor).await, policy(api).await);
    assert!(all_grants(&mut auditor).await.is_empty());
    let source = CLIENT_V4.to_string();
    expect_refused(
        "auditor requesting access",
        auditor
            .request_access(access("auditor", &[(SSH, Protocol::Tcp, &source)], 60))
            .await,
        Code::PermissionDenied,
        &["uid:65534 has role Auditor; this call needs Broker"],
    );
    expect_refused(
        "auditor requesting access in a batch",
        auditor
            .request_access_batch(proto::AccessBatchRequest {
                requests: vec![access("auditor", &[(SSH, Protocol::Tcp, &source)], 60)],
            })
            .await,
        Code::PermissionDenied,
        &["uid:65534 has role Auditor; this call needs Broker"],
    );
    expect_refused(
        "auditor changing the policy",
        auditor.update_policy(remove(SSH, Protocol::Tcp)).await,
        Code::PermissionDenied,
        &["uid:65534 has role Auditor; this call needs Admin"],
    );
    assert!(all_grants(api).await.is_empty());
    assert_eq!(policy(api).await.revision, 1);
}
