//! A start that cannot lock the operator out: what can fail is checked
//! before anything is attached (a missing group fails `check-config` and
//! the start, leaving no XDP, table or socket); only a directory the agent
//! creates is chmod'ed; its files are 0600 whatever the umask; a database
//! deleted while enforcement state exists stops the start until the
//! documented recovery flag, whose use opens the new chain; and the socket
//! works when systemd passes it (socket activation, as the shipped
//! jit-gate-agent.socket does).

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::os::unix::fs::PermissionsExt;

use jit_gate_agent::proto;
use jit_gate_tests::{
    agent::{Agent, AgentFiles, client},
    netns::Topology,
};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn a_missing_group_is_refused_by_check_config_before_anything_is_attached() {
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    files.write_config(&[&topo.gated_if], "api.socket_group = \"no-such-group-jg\"");
    for args in [&["check-config"][..], &[]] {
        let out = files.run_to_end(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr.contains("field `api.socket_group`: no group named \"no-such-group-jg\""),
            "{args:?}: {stderr}"
        );
        assert!(!files.pins.path.exists(), "{args:?}: pinned something");
        assert!(files.nft_table().is_none(), "{args:?}: nftables table");
        assert!(!files.socket().exists(), "{args:?}: socket");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_private_and_a_lost_database_needs_the_recovery_flag() {
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    files.write_config(
        &[&topo.gated_if],
        &format!(
            "[audit]\nsigning_key = {:?}",
            files.dir.path().join("keys/audit.key")
        ),
    );
    // The socket's directory exists, readable by all: it stays so.
    let run = files.socket().parent().unwrap().to_owned();
    std::fs::create_dir_all(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    // SAFETY: umask affects this test process and the agent it starts.
    let old = unsafe { libc::umask(0o022) };
    let agent = Agent::start(&files);
    unsafe { libc::umask(old) };
    let mut api = client(&files).await;
    api.get_status(proto::GetStatusRequest {})
        .await
        .expect("serving");
    assert_eq!(mode(&run), 0o755, "an existing directory is left alone");
    assert_eq!(mode(&files.socket()), 0o600);
    assert_eq!(mode(&files.database()), 0o600);
    assert_eq!(mode(&files.dir.path().join("keys/audit.key")), 0o600);
    drop(api);
    assert!(agent.stop().success());

    // The database is lost; enforcement state remains.
    for suffix in ["", "-wal", "-shm"] {
        let mut path = files.database().into_os_string();
        path.push(suffix);
        let _ = std::fs::remove_file(path);
    }
    let out = files.run_to_end(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for needle in [
        "is missing but enforcement state exists",
        "--reinitialize",
        "nothing was attached",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
    assert!(!files.database().exists(), "created a database anyway");
    assert!(
        files.nft_table().is_some(),
        "the refused start changed enforcement"
    );

    // The recovery flag starts a new chain that says so first.
    let _agent = Agent::start_command(&files, files.command_via(&[], &["--reinitialize"]));
    let mut api = client(&files).await;
    let first = api
        .export_audit(proto::ExportAuditRequest::default())
        .await
        .expect("export")
        .into_inner()
        .message()
        .await
        .expect("stream")
        .expect("a first record");
    assert_eq!(first.sequence, 1);
    assert_eq!(
        first.kind,
        proto::EventKind::DatabaseReinitialized as i32,
        "{first:?}"
    );
    assert!(first.message.contains("nftables table inet"), "{first:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_on_a_socket_passed_by_systemd() {
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    files.write_config(&[&topo.gated_if], "");
    std::fs::create_dir_all(files.socket().parent().unwrap()).unwrap();
    let socket = files.socket();
    let launcher = [
        "systemd-socket-activate",
        "--listen",
        socket.to_str().unwrap(),
        "--",
    ];
    let agent = Agent::start_command(&files, files.command_via(&launcher, &[]));
    let mut api = client(&files).await;
    let status = api
        .get_status(proto::GetStatusRequest {})
        .await
        .expect("served on the passed socket")
        .into_inner();
    assert_eq!(status.configured_mode, "xdp+nftables");
    agent.wait_for_log(&["using the socket passed by systemd"]);
}
