//! Setting up the mutual-TLS listener: `tls init` gives a working pair in
//! one command; missing or bad TLS material refuses the start before
//! anything is attached; the listener's port can never be protected; and
//! the listener itself is closed to networks outside `allowed_networks`.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use jit_gate_agent::{config::Mode, proto};
use jit_gate_tests::{
    agent::{Agent, client, workspace_binary},
    fleet::{Fleet, TLS_PORT},
    netns::nsenter,
};
use tonic::Code;

const BROKER_ONLY: &str = r#"[{ uri = "urn:jit-gate:broker", role = "broker" }]"#;

#[test]
fn tls_init_gives_a_working_mtls_pair() {
    let mut fleet = Fleet::new(1, Mode::Nftables, BROKER_ONLY);
    let host = &fleet.hosts[0];
    let dir = host.files.dir.path().join("tls");
    // Run where the agent runs: the server certificate names this
    // namespace's addresses.
    let out = nsenter(&host.ns.name, workspace_binary("jit-gate-agent"))
        .args(["tls", "init", "--dir"])
        .arg(&dir)
        .args(["--client", "ops"])
        .output()
        .expect("run jit-gate-agent tls init");
    assert!(out.status.success(), "{out:?}");
    let snippet = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(
        snippet.contains(&format!("\"0.0.0.0:{TLS_PORT}\"")),
        "{snippet}"
    );
    host.files
        .write_config(&[], &format!("mode = \"nftables\"\n{snippet}"));
    fleet.hosts[0].agent = Some(Agent::start(&fleet.hosts[0].files));
    let host = &fleet.hosts[0];
    let path = |name: &str| dir.join(name).display().to_string();
    let out = fleet.broker.cli(&[
        "--agent",
        &host.url(),
        "--ca",
        &path("ca.pem"),
        "--cert",
        &path("client-ops.pem"),
        "--key",
        &path("client-ops.key"),
        "request",
        "22",
        "--source",
        "198.18.0.1",
        "--duration",
        "5m",
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("198.18.0.1"), "{text}");
    // The same files from a client configuration file, relative paths.
    std::fs::write(
        dir.join("client.toml"),
        "ca = \"ca.pem\"\ncertificate = \"client-ops.pem\"\nkey = \"client-ops.key\"\n",
    )
    .unwrap();
    let out = fleet.broker.cli(&[
        "--agent",
        &host.url(),
        "--client-config",
        &path("client.toml"),
        "grants",
    ]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn missing_or_bad_tls_material_refuses_the_start_before_anything_is_attached() {
    let fleet = Fleet::new(1, Mode::XdpAndNftables, BROKER_ONLY);
    let host = &fleet.hosts[0];
    let missing = host.files.dir.path().join("missing.key");
    let garbage = host.files.dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let ca = fleet.pki.ca_path();
    for (replace, with, needle) in [
        (
            &host.server_cert.key,
            &missing,
            format!("{}: No such file", missing.display()),
        ),
        (
            &host.server_cert.certificate,
            &garbage,
            format!("{}: certificate 1:", garbage.display()),
        ),
    ] {
        let config = host
            .tls_config(&[&ca], "")
            .replace(&format!("{replace:?}"), &format!("{with:?}"));
        host.files.write_config(&[&host.interface], &config);
        for args in [&["check-config"][..], &[]] {
            let out = host.files.run_to_end(args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(
                stderr.contains("invalid configuration, nothing attached")
                    && stderr.contains(&needle),
                "{args:?}: {stderr}"
            );
        }
        assert!(host.files.nft_table().is_none(), "nftables table created");
        let pinned = std::fs::read_dir(&host.files.pins.path).map_or(0, Iterator::count);
        assert_eq!(pinned, 0, "something was pinned");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_port_cannot_be_protected() {
    let mut fleet = Fleet::new(1, Mode::Nftables, BROKER_ONLY);
    let host = &fleet.hosts[0];
    let ca = fleet.pki.ca_path();
    host.configure(
        Mode::Nftables,
        &[&ca],
        &format!("api.tls.principals = {BROKER_ONLY}\n[[policy]]\nport = {TLS_PORT}\nprotocol = \"both\"\n"),
    );
    let out = host.files.run_to_end(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "port {TLS_PORT}/tcp is the agent's own TLS listener"
        )),
        "{stderr}"
    );
    assert!(host.files.nft_table().is_none());

    host.configure(
        Mode::Nftables,
        &[&ca],
        &format!("api.tls.principals = {BROKER_ONLY}\n"),
    );
    fleet.start();
    let mut admin = client(&fleet.hosts[0].files).await;
    let refused = admin
        .update_policy(proto::UpdatePolicyRequest {
            change: Some(proto::update_policy_request::Change::UpsertRule(
                proto::PortRule {
                    port: TLS_PORT.into(),
                    protocol: proto::Protocol::Tcp as i32,
                    ..Default::default()
                },
            )),
            expected_revision: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused}");
    assert!(refused.message().contains("allowed_networks"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_is_closed_to_networks_outside_allowed_networks() {
    let mut fleet = Fleet::new(1, Mode::Nftables, BROKER_ONLY);
    let ca = fleet.pki.ca_path();
    let principals = format!("api.tls.principals = {BROKER_ONLY}\n");
    fleet.hosts[0].configure(
        Mode::Nftables,
        &[&ca],
        &format!("{principals}api.tls.allowed_networks = [\"203.0.113.0/24\"]\n"),
    );
    fleet.start();
    let host = &fleet.hosts[0];
    let broker = fleet.pki.client_config(Some(&fleet.pki.client("broker")));
    let err = fleet
        .broker
        .handshake(broker.clone(), host.tls_address())
        .await
        .unwrap_err();
    assert!(!err.contains("alert"), "closed before any TLS: {err}");
    let agent = host.agent.as_ref().unwrap();
    agent.wait_for_log(&["refused: address outside api.tls.allowed_networks"]);

    host.configure(
        Mode::Nftables,
        &[&ca],
        &format!("{principals}api.tls.allowed_networks = [\"198.18.0.0/15\"]\n"),
    );
    agent.signal(libc::SIGHUP);
    agent.wait_for_log(&["configuration reloaded from"]);
    fleet
        .broker
        .handshake(broker, host.tls_address())
        .await
        .expect("allowed after the reload");
}
