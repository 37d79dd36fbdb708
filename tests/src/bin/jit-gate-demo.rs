//! `cargo xtask demo`: the product at work, in namespaces it creates. A real
//! `jit-gate-agent` gates the gated namespace's veth (XDP and nftables), a
//! real OpenSSH server listens behind it, and the operator CLI `jit-gate`
//! opens and closes SSH for a client in the client namespace. Each step
//! says what should happen and checks that it did; any surprise ends the
//! demo with a non-zero exit. Everything it creates is removed at the end,
//! also on failure (every fixture cleans up on drop).

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    path::Path,
    sync::mpsc::RecvTimeoutError,
    time::{Duration, SystemTime},
};

use jit_gate_tests::{
    agent::{Agent, AgentFiles},
    cli::{Cli, time},
    netns::{CLIENT_V4, GATED_V4, Topology, nsenter},
    process::Process,
    ssh::{SshClient, SshServer},
};
use serde_json::Value;

const GRANT: &str = "10s";
/// How long the agent may take to record what the kernel already enforces.
const SETTLE: Duration = Duration::from_secs(5);

/// Numbered steps: each announces what it does and what should happen.
#[derive(Default)]
struct Steps(usize);

impl Steps {
    fn next(&mut self, what: &str, expect: &str) {
        self.0 += 1;
        println!("\n[{}] {what}\n    expect: {expect}", self.0);
    }
}

fn ok(text: &str) {
    println!("    ok: {text}");
}

/// Runs `jit-gate <args>` and shows the command and its output.
fn show(cli: &Cli, args: &[&str]) {
    println!("    $ jit-gate {}", args.join(" "));
    for line in cli.text(args).lines() {
        println!("      {line}");
    }
}

/// Requests SSH for the client, shows the CLI's answer and returns the
/// grant (the only active one).
fn request(cli: &Cli) -> Value {
    let source = CLIENT_V4.to_string();
    show(
        cli,
        &[
            "request",
            "22",
            "--source",
            &source,
            "--duration",
            GRANT,
            "--justification",
            "demo",
        ],
    );
    let [grant] = cli.grants(false).try_into().unwrap_or_else(|grants| {
        panic!("exactly one active grant expected, got {grants:?}");
    });
    assert_eq!(grant["port"], 22, "{grant}");
    assert_eq!(grant["source"], format!("{source}/32"), "{grant}");
    grant
}

fn grant_id(grant: &Value) -> u64 {
    grant["id"].as_u64().expect("grant id")
}

fn expect_dropped(client: &SshClient<'_>, when: &str) {
    let message = client.login().expect_timed_out(when);
    ok(&format!("ssh gave up: \"{message}\""));
}

/// Streams the audit log from its start until an event of `last_kind`.
fn show_audit(cli: &Cli, last_kind: &str) {
    println!("    $ jit-gate watch --after 0");
    let mut watch =
        Process::spawn(cli.command().args(["watch", "--after", "0"])).expect("run jit-gate watch");
    loop {
        match watch.stdout.next(SETTLE) {
            Ok(line) => {
                println!("      {line}");
                if line.contains(last_kind) {
                    break;
                }
            }
            Err(RecvTimeoutError::Timeout) => panic!("no {last_kind} event in the audit log"),
            Err(RecvTimeoutError::Disconnected) => panic!(
                "jit-gate watch ended: {}",
                watch.stderr.rest(SETTLE).join("\n")
            ),
        }
    }
    // The CLI's way to stop watching, as Ctrl-C would.
    watch.signal(libc::SIGINT);
    let status = watch.wait_timeout(SETTLE).expect("watch stops on SIGINT");
    assert!(status.success(), "jit-gate watch: {status}");
}

/// Whether the namespace still holds the agent's nftables table.
fn nft_table_exists(ns: &str) -> bool {
    nsenter(ns, "nft")
        .args(["list", "table", "inet", "jit_gate"])
        .output()
        .expect("run nft")
        .status
        .success()
}

fn main() {
    let mut steps = Steps::default();

    steps.next(
        "Setting up: a client and a gated namespace joined by veth, jit-gate-agent on the gated side, OpenSSH behind it",
        "the agent serves its socket; sshd listens on 192.0.2.1:22",
    );
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    files.write_config(&[&topo.gated_if], "");
    let agent = Agent::start(&files);
    let sshd = SshServer::start(&topo.gated, GATED_V4);
    let client = sshd.client(&topo.client, CLIENT_V4);
    let cli = Cli::new(&files);
    ok(&format!(
        "agent pid {} on {} in namespace {}; sshd in the same namespace; client {CLIENT_V4} in {}",
        agent.pid(),
        topo.gated_if,
        topo.gated.name,
        topo.client.name
    ));

    steps.next(
        "The gate's state, as an operator sees it",
        "XDP and nftables on the veth; TCP 22 protected by the default policy; no grant",
    );
    show(&cli, &["status"]);
    show(&cli, &["policy", "show"]);
    let status = cli.json(&["status"]);
    // Every interface is gated (loopback by nftables); the veth by XDP.
    let veth = status["interfaces"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["name"] == topo.gated_if.as_str()))
        .unwrap_or_else(|| panic!("{} is not in the status: {status}", topo.gated_if));
    assert!(
        veth["mode"].as_str().is_some_and(|m| m.starts_with("xdp")),
        "{status}"
    );
    assert_eq!(status["nftables_active"], true, "{status}");
    assert_eq!(status["active_grants"], 0, "{status}");
    let policy = cli.json(&["policy", "show"]);
    let rules = policy["rules"].as_array().expect("rules");
    assert!(
        rules
            .iter()
            .any(|r| r["port"] == 22 && r["protocol"] == "tcp"),
        "{policy}"
    );
    ok(&format!(
        "enforcement {}, nftables active, 22/tcp protected",
        veth["mode"]
    ));

    steps.next(
        "ssh root@192.0.2.1 from the client, before any grant",
        "no answer at all: the SYN is dropped, ssh times out",
    );
    expect_dropped(&client, "before any grant");

    steps.next(
        &format!("Requesting SSH for {CLIENT_V4} for {GRANT}, then a long-lived ssh session"),
        "one active grant; the session logs in and prints the remote clock every second",
    );
    let first = request(&cli);
    let mut session = client.session();
    ok("logged in: the session prints the remote clock");
    show(&cli, &["connections"]);
    let connections = cli.json(&["connections"]);
    assert!(
        connections["connections"]
            .as_array()
            .expect("connections")
            .iter()
            .any(|c| c["grant_id"] == first["id"]
                && c["remote"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(&format!("{CLIENT_V4}:")))),
        "the session is not listed under grant {}: {connections}",
        first["id"]
    );
    ok("the agent lists the session under the grant");

    steps.next(
        "Waiting for the grant to expire",
        "the grant is expired; the open session goes on; a new ssh is dropped again",
    );
    let expires = time(&first["expires_at"]);
    std::thread::sleep(
        expires
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    );
    cli.wait_for_state(grant_id(&first), "expired", SETTLE);
    show(&cli, &["grants", "--all"]);
    let clock = session.clock_after(expires, SETTLE);
    ok(&format!(
        "the session still prints: remote clock {:.1} s past the expiry",
        clock
            .duration_since(expires)
            .unwrap_or_default()
            .as_secs_f64()
    ));
    expect_dropped(&client, "after expiry");

    steps.next(
        "Requesting again, opening a second session, then `jit-gate revoke --terminate`",
        "both of the client's sessions end (ssh exits with 255): the new one, and the one that \
         outlived grant 1, which no live grant covers now",
    );
    let second = request(&cli);
    let mut second_session = client.session();
    session.clock_after(SystemTime::now(), SETTLE);
    ok("logged in under the new grant; the first session is still printing");
    let id = grant_id(&second).to_string();
    show(
        &cli,
        &["revoke", &id, "--terminate", "--reason", "demo over"],
    );
    for (name, session) in [("first", &mut session), ("second", &mut second_session)] {
        let ended = session
            .ended(SETTLE)
            .unwrap_or_else(|| panic!("the {name} session survived revoke --terminate"));
        assert_eq!(ended.status.code(), Some(255), "{ended:?}");
        ok(&format!(
            "{name} session: ssh ended with exit code 255: \"{}\"",
            ended.message
        ));
    }
    cli.wait_for_state(grant_id(&second), "revoked", SETTLE);
    show_audit(&cli, "connections-terminated");

    steps.next(
        "Cleaning up: stopping the agent, `jit-gate-agent remove`, stopping sshd, deleting the namespaces",
        "enforcement outlives the agent until removed; then no pins, nftables table or namespaces left",
    );
    let status = agent.stop();
    assert!(status.success(), "agent stopped with {status}");
    assert!(files.pins.path.exists(), "pins gone with the agent");
    assert!(
        nft_table_exists(&topo.gated.name),
        "nftables table gone with the agent"
    );
    ok("agent stopped; XDP pins and nftables table stay in place (fail closed)");
    let removed = files.run_to_end(&["remove"]);
    assert!(
        removed.status.success(),
        "jit-gate-agent remove: {}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert!(!files.pins.path.exists(), "pins left behind");
    assert!(
        !nft_table_exists(&topo.gated.name),
        "nftables table left behind"
    );
    ok("gate removed: XDP detached, pins and nftables table gone");
    let namespaces = [topo.gated.name.clone(), topo.client.name.clone()];
    drop(sshd);
    drop(topo);
    assert!(
        namespaces
            .iter()
            .all(|ns| !Path::new("/run/netns").join(ns).exists()),
        "namespaces left behind"
    );
    ok("sshd stopped, namespaces deleted");
    println!("\nDemo complete: every check passed.");
}
