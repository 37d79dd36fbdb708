//! Remote brokers over mutual TLS, end to end: a broker namespace drives
//! real agents in gated namespaces through their TCP listeners — from Rust,
//! the `jit-gate` CLI and Python's grpcio — and grants are enforced as over
//! the Unix socket; every kind of refused client gets its precise answer,
//! changes nothing and is audited when its certificate names it.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use jit_gate_agent::proto::jit_gate_client::JitGateClient;
use jit_gate_agent::{config::Mode, proto};
use jit_gate_tests::{
    agent::{client, request},
    fleet::{BROKER_V4, Fleet, Host, Pki},
    traffic::{TcpEcho, expect_access},
};
use rustls::ClientConfig;
use serde_json::Value;
use tonic::{Code, transport::Channel};

const SSH: u16 = 22;
const PRINCIPALS: &str = r#"[
  { uri = "urn:jit-gate:broker", role = "broker" },
  { uri = "urn:jit-gate:auditor", role = "auditor" },
  { uri = "urn:jit-gate:expired", role = "broker" },
  { uri = "urn:jit-gate:early", role = "broker" },
  { uri = "urn:jit-gate:revoked", role = "broker" },
]"#;

fn ssh(host: &Host) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(host.address), SSH)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_drives_agents_over_mtls_from_rust_the_cli_and_python() {
    let mut fleet = Fleet::new(3, Mode::XdpAndNftables, PRINCIPALS);
    fleet.start();
    let broker_cert = fleet.pki.client("broker");
    let config = fleet.pki.client_config(Some(&broker_cert));
    let from = IpAddr::V4(BROKER_V4);
    let _servers: Vec<TcpEcho> = fleet
        .hosts
        .iter()
        .map(|h| TcpEcho::start(&h.ns, ssh(h)))
        .collect();
    let probes = |opens: bool| -> Vec<(IpAddr, SocketAddr, bool)> {
        fleet.hosts.iter().map(|h| (from, ssh(h), opens)).collect()
    };
    expect_access(&fleet.broker.ns, "before any grant", &probes(false));

    // Rust, over one mTLS connection per agent: watch, request, list.
    let mut apis = Vec::new();
    for host in &fleet.hosts {
        apis.push(
            fleet
                .broker
                .api(config.clone(), host.tls_address())
                .await
                .expect("mTLS connection"),
        );
    }
    let mut watch = apis[0]
        .watch_events(proto::WatchEventsRequest {
            after_sequence: None,
            kinds: vec![proto::EventKind::GrantRevoked as i32],
        })
        .await
        .expect("watch over mTLS")
        .into_inner();
    let mut grants = Vec::new();
    for api in &mut apis {
        let granted = api
            .request_access(request("rust-1", SSH, proto::Protocol::Tcp, BROKER_V4, 600))
            .await
            .expect("request over mTLS")
            .into_inner();
        assert_eq!(granted.grants.len(), 1);
        let grant = granted.grants[0].clone();
        assert_eq!(grant.principal, "uri:urn:jit-gate:broker");
        grants.push(grant);
    }
    expect_access(&fleet.broker.ns, "granted over mTLS", &probes(true));
    let listed = apis[1]
        .list_grants(proto::ListGrantsRequest::default())
        .await
        .expect("list over mTLS")
        .into_inner()
        .grants;
    assert_eq!(
        listed.iter().map(|g| g.id).collect::<Vec<_>>(),
        [grants[1].id]
    );

    for (api, grant) in apis.iter_mut().zip(&grants) {
        api.revoke_grant(proto::RevokeGrantRequest {
            grant_id: grant.id,
            terminate_connections: false,
            reason: "done".into(),
        })
        .await
        .expect("revoke over mTLS");
    }
    let revoked = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the revoke reaches the watcher")
        .expect("event stream")
        .expect("an event");
    assert_eq!(revoked.grant_id, grants[0].id);
    assert_eq!(revoked.principal, "uri:urn:jit-gate:broker");
    expect_access(&fleet.broker.ns, "revoked over mTLS", &probes(false));

    // The CLI, as a broker: two agents over mTLS and one over its socket.
    let ca = fleet.pki.ca_path();
    let socket = fleet.hosts[2].files.socket();
    let args: Vec<String> = [
        "--agent",
        &fleet.hosts[0].url(),
        "--agent",
        &fleet.hosts[1].url(),
        "--agent",
        &socket.display().to_string(),
        "--ca",
        &ca.display().to_string(),
        "--cert",
        &broker_cert.certificate.display().to_string(),
        "--key",
        &broker_cert.key.display().to_string(),
        "--json",
        "request",
        "22",
        "--source",
        &BROKER_V4.to_string(),
        "--duration",
        "10m",
    ]
    .map(str::to_owned)
    .to_vec();
    let out = fleet
        .broker
        .cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{out:?}");
    let rows: Value = serde_json::from_slice(&out.stdout).expect("JSON rows");
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), 3, "{rows:?}");
    let request_ids: Vec<&Value> = rows
        .iter()
        .map(|r| &r["result"]["grants"][0]["request_id"])
        .collect();
    assert!(
        request_ids.iter().all(|id| *id == request_ids[0]),
        "{rows:?}"
    );
    assert_eq!(
        rows[0]["result"]["grants"][0]["principal"],
        "uri:urn:jit-gate:broker"
    );
    // Root on the socket is admin, and named by its uid.
    assert_eq!(rows[2]["result"]["grants"][0]["principal"], "uid:0");
    expect_access(&fleet.broker.ns, "granted by the CLI", &probes(true));

    // Python's grpcio, with a client certificate and reflection only.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/grpc_tls_client.py");
    let out = fleet
        .broker
        .command("python3")
        .args([
            script,
            &fleet.hosts[0].tls_address().to_string(),
            &ca.display().to_string(),
            &broker_cert.certificate.display().to_string(),
            &broker_cert.key.display().to_string(),
            "198.51.100.9",
        ])
        .output()
        .expect("run python3 (`cargo xtask bootstrap` installs grpcio)");
    assert!(
        out.status.success(),
        "python grpcio client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python: Value = serde_json::from_slice(&out.stdout).expect("python JSON");
    assert_eq!(python["health"], "SERVING", "{python}");
    assert_eq!(python["mode"], "xdp+nftables", "{python}");
    let services = python["services"].as_array().expect("services");
    for service in ["jitgate.v1.JitGate", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == service), "{python}");
    }
    assert_eq!(
        python["grants"][0]["principal"], "uri:urn:jit-gate:broker",
        "{python}"
    );
    assert_eq!(python["grants"][0]["source"], "198.51.100.9/32", "{python}");
}

/// The audit records of refused callers.
async fn refusals(api: &mut JitGateClient<Channel>) -> Vec<proto::Event> {
    let mut stream = api
        .watch_events(proto::WatchEventsRequest {
            after_sequence: Some(0),
            kinds: vec![proto::EventKind::CallRefused as i32],
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    while let Ok(Ok(Some(event))) =
        tokio::time::timeout(Duration::from_millis(500), stream.message()).await
    {
        events.push(event);
    }
    events
}

fn detail(event: &proto::Event, key: &str) -> Value {
    let details: Value = serde_json::from_str(&event.details_json).expect("details JSON");
    details[key].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_client_gets_its_answer_changes_nothing_and_is_audited_if_named() {
    let mut fleet = Fleet::new(1, Mode::Nftables, PRINCIPALS);
    let pki = &fleet.pki;
    let hour = Duration::from_hours(1);
    let (expired, _) = pki.client_with("expired", "expired", |leaf| {
        leaf.not_before -= 3 * hour;
        leaf.not_after = leaf.not_before + hour;
    });
    let (early, _) = pki.client_with("early", "early", |leaf| {
        leaf.not_before += 2 * hour;
    });
    let (revoked, serial) = pki.client_with("revoked", "revoked", |_| {});
    let crl = pki.write_crl(&[serial], 1);
    let stranger = pki.client("stranger");
    let auditor = pki.client("auditor");
    let broker = pki.client("broker");
    let other = Pki::new("another CA");
    // Name configured principals, but come from a CA the agent does not trust.
    let impostor = other.client("broker");
    let (forged, _) = other.client_with("forged", "expired", |leaf| {
        leaf.not_before -= 3 * hour;
        leaf.not_after = leaf.not_before + hour;
    });
    fleet.hosts[0].configure(
        Mode::Nftables,
        &[&pki.ca_path()],
        &format!("api.tls.crl = [{crl:?}]\napi.tls.principals = {PRINCIPALS}\n"),
    );
    fleet.start();
    let pki = &fleet.pki;
    let host = &fleet.hosts[0];
    let to = host.tls_address();
    let broker_api = &fleet.broker;
    let mut admin = client(&host.files).await;
    let policy_before = admin
        .get_policy(proto::GetPolicyRequest {})
        .await
        .expect("policy")
        .into_inner();

    // Handshakes that fail, each with its TLS alert.
    for (what, config, alert) in [
        (
            "no certificate",
            pki.client_config(None),
            "CertificateRequired",
        ),
        (
            "unknown CA",
            pki.client_config(Some(&impostor)),
            "UnknownCA",
        ),
        // webpki checks the dates before the signature: told as expired,
        // never audited under the name it forges.
        (
            "expired, unknown CA",
            pki.client_config(Some(&forged)),
            "CertificateExpired",
        ),
        (
            "expired",
            pki.client_config(Some(&expired)),
            "CertificateExpired",
        ),
        (
            "not yet valid",
            pki.client_config(Some(&early)),
            "CertificateExpired",
        ),
        (
            "revoked",
            pki.client_config(Some(&revoked)),
            "CertificateRevoked",
        ),
    ] {
        let outcome = broker_api.handshake(config, to).await;
        let error = outcome.expect_err(what);
        assert!(error.contains(alert), "{what}: {error}");
    }
    // A client that does not trust the agent's CA stops on its own side.
    let err = broker_api
        .handshake(other.client_config(Some(&broker)), to)
        .await
        .unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");

    // Verified, but no role / too low a role: refused per call.
    let mut nobody = broker_api
        .api(pki.client_config(Some(&stranger)), to)
        .await
        .expect("a verified certificate connects");
    let status = nobody
        .get_status(proto::GetStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(
        status
            .message()
            .contains("uri:urn:jit-gate:stranger has no role"),
        "{status}"
    );
    let mut reader = broker_api
        .api(pki.client_config(Some(&auditor)), to)
        .await
        .expect("auditor connects");
    reader
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("an auditor reads");
    let status = reader
        .request_access(request("aud-1", SSH, proto::Protocol::Tcp, BROKER_V4, 60))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(
        status
            .message()
            .contains("role Auditor; this call needs Broker"),
        "{status}"
    );

    // Plaintext gRPC, a plaintext HTTP/2 preface, and TLS 1.2: refused.
    let plain = broker_api.ns.run(|| {
        use std::io::{Read as _, Write as _};
        let mut tcp = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")?;
        let mut answer = Vec::new();
        let _ = tcp.read_to_end(&mut answer);
        Ok::<_, std::io::Error>(answer)
    });
    let answer = plain.expect("plaintext connection");
    // Nothing, or a TLS alert record (content type 21): never HTTP/2.
    assert!(
        answer.is_empty() || answer[0] == 21,
        "plaintext got {answer:?}"
    );
    let tls12 = broker_api
        .command("openssl")
        .args(["s_client", "-tls1_2", "-connect", &to.to_string()])
        .args(["-CAfile", &pki.ca_path().display().to_string()])
        .args(["-cert", &broker.certificate.display().to_string()])
        .args(["-key", &broker.key.display().to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl (`cargo xtask bootstrap` installs it)");
    let text = String::from_utf8_lossy(&tls12.stderr).to_string()
        + &String::from_utf8_lossy(&tls12.stdout);
    assert!(!tls12.status.success(), "TLS 1.2 accepted: {text}");
    assert!(text.contains("protocol version"), "TLS 1.2: {text}");

    // Nothing changed.
    let mut good = broker_api
        .api(pki.client_config(Some(&broker)), to)
        .await
        .expect("broker connects");
    let listed = good
        .list_grants(proto::ListGrantsRequest {
            include_ended: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .grants;
    assert!(listed.is_empty(), "{listed:?}");
    let policy_after = good
        .get_policy(proto::GetPolicyRequest {})
        .await
        .expect("policy")
        .into_inner();
    assert_eq!(policy_after, policy_before);

    // Audited: refusals whose certificate chains to the CA, under its name;
    // nothing for clients that could not be identified.
    let events = refusals(&mut admin).await;
    // Refused handshakes carry their reason; refused calls, their code.
    let audited: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            let why = detail(e, "reason");
            let why = why.as_str().map_or_else(|| detail(e, "code"), Value::from);
            (
                e.principal.clone(),
                why.as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for expected in [
        ("uri:urn:jit-gate:expired", "expired"),
        ("uri:urn:jit-gate:early", "not-yet-valid"),
        ("uri:urn:jit-gate:revoked", "revoked"),
        ("uri:urn:jit-gate:stranger", "PermissionDenied"),
        ("uri:urn:jit-gate:auditor", "PermissionDenied"),
    ] {
        assert!(
            audited.contains(&(expected.0.to_owned(), expected.1.to_owned())),
            "{expected:?} not audited: {audited:?}"
        );
    }
    // Exactly these: the forged and the unknown-CA certificates are not believed.
    assert_eq!(audited.len(), 5, "{audited:?}");
    let remote = detail(&events[0], "remote");
    assert!(
        remote
            .as_str()
            .unwrap()
            .starts_with(&format!("{BROKER_V4}:")),
        "{remote}"
    );
    // The others are in the log, with their reason.
    let agent = host.agent.as_ref().unwrap();
    agent.wait_for_log(&["refused: no client certificate"]);
    agent.wait_for_log(&["refused: client certificate not issued by a configured CA"]);
    agent.wait_for_log(&["refused: client cannot speak TLS 1.3"]);
    agent.wait_for_log(&["refused: not a TLS client"]);
}

/// Waits until the agent's log holds `count` lines containing `needle`.
fn wait_for_lines(host: &Host, needle: &str, count: usize) {
    let agent = host.agent.as_ref().expect("agent running");
    for _ in 0..300 {
        if agent
            .log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
            >= count
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "fewer than {count} log lines with {needle:?}:\n{}",
        agent.log_text()
    );
}

/// The SHA-256 of the certificate the agent at `to` presents now.
async fn served_certificate(fleet: &Fleet, config: Arc<ClientConfig>, to: SocketAddr) -> Vec<u8> {
    let stream = fleet.broker.tls(config, to).await.expect("TLS connection");
    let certificate = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("server certificate")[0]
        .clone();
    certificate.to_vec()
}

async fn next_grant(stream: &mut tonic::Streaming<proto::Event>) -> proto::Event {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the event arrives")
        .expect("the stream stays open")
        .expect("an event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_on_sighup_under_an_open_stream_and_a_bad_reload_keeps_serving() {
    let principals = r#"[{ uri = "urn:jit-gate:broker", role = "broker" }, { uri = "urn:jit-gate:ops", role = "broker" }]"#;
    let mut fleet = Fleet::new(1, Mode::Nftables, principals);
    let (ops, ops_serial) = fleet.pki.client_with("client-ops", "ops", |_| {});
    fleet.start();
    let host = &fleet.hosts[0];
    let to = host.tls_address();
    let broker = fleet.pki.client_config(Some(&fleet.pki.client("broker")));
    let ops_config = fleet.pki.client_config(Some(&ops));

    let mut watcher = fleet.broker.api(broker.clone(), to).await.expect("connect");
    let mut stream = watcher
        .watch_events(proto::WatchEventsRequest {
            after_sequence: None,
            kinds: vec![proto::EventKind::GrantCreated as i32],
        })
        .await
        .expect("watch")
        .into_inner();
    let mut ops_api = fleet
        .broker
        .api(ops_config.clone(), to)
        .await
        .expect("connect");
    ops_api
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("ops reads");
    let first = served_certificate(&fleet, broker.clone(), to).await;

    // Rotate: a new server certificate and key in the same files, and a
    // revocation list that revokes ops.
    fleet.pki.server("server-0", host.address);
    let crl = fleet.pki.write_crl(&[ops_serial], 1);
    host.configure(
        Mode::Nftables,
        &[&fleet.pki.ca_path()],
        &format!("api.tls.crl = [{crl:?}]\napi.tls.principals = {principals}\n"),
    );
    host.agent.as_ref().unwrap().signal(libc::SIGHUP);
    wait_for_lines(host, "configuration reloaded from", 1);
    let second = served_certificate(&fleet, broker.clone(), to).await;
    assert_ne!(first, second, "new handshakes get the new certificate");

    let mut fresh = fleet.broker.api(broker.clone(), to).await.expect("connect");
    let granted = fresh
        .request_access(request("rot-1", SSH, proto::Protocol::Tcp, BROKER_V4, 600))
        .await
        .expect("request after rotation")
        .into_inner();
    let event = next_grant(&mut stream).await;
    assert_eq!(
        event.grant_id, granted.grants[0].id,
        "the open stream goes on"
    );
    // The watcher's own connection still takes calls.
    watcher
        .list_grants(proto::ListGrantsRequest::default())
        .await
        .expect("a call on the connection opened before the rotation");
    // Ops' open connection: its next call is checked against the new set.
    let refused = ops_api
        .get_status(proto::GetStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
    assert!(
        refused.message().contains("client certificate revoked"),
        "{refused}"
    );
    let err = fleet.broker.handshake(ops_config, to).await.unwrap_err();
    assert!(err.contains("CertificateRevoked"), "{err}");

    // A bad file: the running set stays, and the log says why.
    let key = &host.server_cert.key;
    std::fs::remove_file(key).unwrap();
    std::fs::write(
        key,
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    host.agent.as_ref().unwrap().signal(libc::SIGHUP);
    wait_for_lines(
        host,
        "reload refused, running configuration kept: api.tls:",
        1,
    );
    let log = host.agent.as_ref().unwrap().log_text();
    assert!(
        log.contains(&format!("{}: not a usable private key", key.display())),
        "{log}"
    );
    assert_eq!(served_certificate(&fleet, broker.clone(), to).await, second);
    let granted = fresh
        .request_access(request("rot-2", SSH, proto::Protocol::Tcp, BROKER_V4, 600))
        .await
        .expect("request after a refused reload")
        .into_inner();
    let event = next_grant(&mut stream).await;
    assert_eq!(
        event.grant_id, granted.grants[0].id,
        "the stream is still open"
    );
    // A graceful stop ends the stream and the listener.
    let status = fleet.hosts[0].agent.take().unwrap().stop();
    assert!(status.success(), "{status}");
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream ends with the agent");
    assert_eq!(ended.unwrap_err().code(), Code::Unavailable);
}
