//! The CLI as a broker of a fleet: one request fanned out over mutual TLS
//! to fifty real agents, each in its own namespace, with some down, hung
//! or slow — one row per agent, one request id, the exit status and the
//! summary line; then a retry with the same id.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::time::Duration;

use jit_gate_agent::config::Mode;
use jit_gate_tests::fleet::Fleet;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_fans_out_to_fifty_agents_some_down_or_slow() {
    const HOSTS: usize = 50;
    let mut fleet = Fleet::new(
        HOSTS,
        Mode::Nftables,
        r#"[{ uri = "urn:jit-gate:broker", role = "broker" }]"#,
    );
    fleet.start();
    let broker = fleet.pki.client("broker");
    let (down, hung, slow, by_socket) = ([3, 17], [5, 23], 40, 10);
    for index in down {
        fleet.hosts[index].agent.take().unwrap().kill();
    }
    for index in hung.into_iter().chain([slow]) {
        fleet.hosts[index]
            .agent
            .as_ref()
            .unwrap()
            .signal(libc::SIGSTOP);
    }
    let list: String = fleet
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            if i == by_socket {
                format!("{}\n", h.files.socket().display())
            } else {
                format!("{}  # host {i}\n", h.url())
            }
        })
        .collect();
    let hosts_file = fleet.pki.dir.path().join("agents.txt");
    std::fs::write(&hosts_file, format!("# the fleet\n\n{list}")).unwrap();
    let paths = [
        hosts_file.display().to_string(),
        fleet.pki.ca_path().display().to_string(),
        broker.certificate.display().to_string(),
        broker.key.display().to_string(),
    ];
    let run = |global: &[&str], request: &[&str]| {
        let mut args = vec![
            "--agents-file",
            &paths[0],
            "--ca",
            &paths[1],
            "--cert",
            &paths[2],
            "--key",
            &paths[3],
            "--timeout",
            "4s",
        ];
        args.extend_from_slice(global);
        args.extend([
            "request",
            "22",
            "--source",
            "198.18.0.1",
            "--duration",
            "10m",
        ]);
        args.extend_from_slice(request);
        fleet.broker.cli(&args)
    };

    // The slow agent wakes up well within the timeout.
    let slow_pid = fleet.hosts[slow].agent.as_ref().unwrap().pid();
    let waker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        // SAFETY: kill on the pid of an agent this test started.
        unsafe { libc::kill(slow_pid, libc::SIGCONT) };
    });
    let out = run(&["--json"], &[]);
    waker.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let rows: Value = serde_json::from_slice(&out.stdout).expect("JSON rows");
    let rows = rows.as_array().expect("rows");
    assert_eq!(rows.len(), HOSTS);
    let mut request_id = None;
    for (index, row) in rows.iter().enumerate() {
        let host = &fleet.hosts[index];
        let agent = if index == by_socket {
            host.files.socket().display().to_string()
        } else {
            host.url()
        };
        assert_eq!(row["agent"], agent.as_str(), "row {index}: {row}");
        let code = &row["error"]["code"];
        if down.contains(&index) {
            assert_eq!(code, "Unavailable", "host {index} is down: {row}");
        } else if hung.contains(&index) {
            assert_eq!(code, "DeadlineExceeded", "host {index} hangs: {row}");
        } else {
            assert_eq!(row["ok"], true, "host {index}: {row}");
            let id = row["result"]["grants"][0]["request_id"].clone();
            assert_eq!(request_id.get_or_insert(id.clone()), &id, "one request id");
        }
    }
    // Stopped for 1.5 s from just before the CLI started.
    assert!(
        rows[slow]["latency_ms"].as_f64().unwrap() >= 1000.0,
        "{}",
        rows[slow]
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("summary: 50 agents: 46 ok, 2 failed, 2 timed out; latency p50 "),
        "{stderr}"
    );

    // A retry with the same request id, once the hung agents are back:
    // the same grants where they were made, new ones where they were not.
    for index in hung {
        fleet.hosts[index]
            .agent
            .as_ref()
            .unwrap()
            .signal(libc::SIGCONT);
    }
    let request_id = request_id.unwrap();
    let out = run(&[], &["--request-id", request_id.as_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("summary: 50 agents: 48 ok, 2 failed, 0 timed out;"),
        "{text}"
    );
    let replayed = lines.iter().filter(|l| l.contains("(replayed)")).count();
    assert_eq!(replayed, 46, "{text}");
}
