//! Prometheus metrics scraped from a real agent: the per-port counters
//! match what a sender in the client namespace sent (all dropped without a
//! grant, all passed with one), and grants, audit events, RPC latencies and
//! enforcement health show; the textfile holds the same exposition. With
//! nftables alone, its drop counter counts what a sender sent without a
//! grant; a held request shows as pending; reconciliations are timed.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use jit_gate_agent::{config::Mode, proto};
use jit_gate_tests::{
    agent::{Agent, AgentHost, Api, request},
    netns::{CLIENT_V4, GATED_V4},
    scrape::{self, sample},
    traffic::{UdpSink, udp_send},
};

const PORT: u16 = 5514;
const LISTEN: &str = "127.0.0.1:9847";
const DROPPED: u64 = 40;
const PASSED: u64 = 25;

/// GET /metrics from inside the gated namespace.
fn scrape(host: &AgentHost) -> String {
    scrape::scrape(&host.topo.gated, LISTEN)
}

fn port_packets(text: &str, verdict: &str) -> u64 {
    sample(
        text,
        &format!(
            "jit_gate_xdp_port_packets_total{{port=\"{PORT}\",protocol=\"udp\",verdict=\"{verdict}\"}}"
        ),
    )
}

/// Sends `count` numbered datagrams and waits until the last one arrives
/// (`arrives`) or has had time to (dropped).
fn send(host: &AgentHost, sink: &UdpSink, tag: &str, count: u64, arrives: bool) {
    let to = SocketAddr::new(IpAddr::V4(GATED_V4), PORT);
    for n in 0..count {
        udp_send(
            &host.topo.client,
            CLIENT_V4.into(),
            to,
            format!("{tag}-{n}").as_bytes(),
        );
    }
    let last = format!("{tag}-{}", count - 1);
    assert_eq!(sink.arrives(last.as_bytes()), arrives, "{tag}");
}

/// An agent in `mode` with metrics on (`metrics` more `[metrics]` keys),
/// protecting UDP `PORT` (`rule` more keys of its rule), and a sink on it.
async fn start(mode: Mode, metrics: &str, rule: &str) -> (AgentHost, Agent, Api, UdpSink) {
    let host = AgentHost::new(
        mode,
        &format!(
            "[metrics]\nenabled = true\nlisten = [\"{LISTEN}\"]\n{metrics}\n\
             [[policy]]\nport = {PORT}\nprotocol = \"udp\"\n{rule}\n"
        ),
    );
    let (agent, api) = host.start().await;
    agent.wait_for_log(&["metrics on http://127.0.0.1:9847/metrics"]);
    let sink = UdpSink::start(
        &host.topo.gated,
        SocketAddr::new(IpAddr::V4(GATED_V4), PORT),
    );
    (host, agent, api, sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_counters_match_the_packets_sent() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let textfile = dir.path().join("jit_gate.prom");
    let (host, _agent, mut api, sink) = start(
        Mode::XdpAndNftables,
        &format!("textfile = {textfile:?}\ntextfile_interval = \"200ms\""),
        "",
    )
    .await;

    let before = scrape(&host);
    assert_eq!(port_packets(&before, "dropped"), 0);
    assert_eq!(sample(&before, "jit_gate_grants_active"), 0);
    assert_eq!(
        sample(
            &before,
            &format!(
                "jit_gate_interface_healthy{{interface=\"{}\",mode=\"xdp-native\"}}",
                host.topo.gated_if
            )
        ),
        1
    );
    assert_eq!(sample(&before, "jit_gate_layer_healthy{layer=\"xdp\"}"), 1);
    assert_eq!(sample(&before, "jit_gate_requests_pending"), 0);

    // No grant: every datagram dropped, and counted once.
    send(&host, &sink, "closed", DROPPED, false);
    let closed = scrape(&host);
    assert_eq!(port_packets(&closed, "dropped"), DROPPED);
    assert_eq!(port_packets(&closed, "passed"), 0);
    assert_eq!(
        sample(
            &closed,
            "jit_gate_xdp_verdicts_total{reason=\"drop_no_grant\"}"
        ),
        DROPPED
    );
    // XDP dropped them first: nothing reached the nftables drop rule.
    assert_eq!(
        sample(&closed, "jit_gate_nftables_dropped_packets_total"),
        0
    );

    // A grant: every datagram passes.
    api.client
        .request_access(request(
            "metrics-1",
            PORT,
            proto::Protocol::Udp,
            CLIENT_V4,
            600,
        ))
        .await
        .expect("grant");
    send(&host, &sink, "open", PASSED, true);
    let open = scrape(&host);
    assert_eq!(port_packets(&open, "passed"), PASSED);
    assert_eq!(port_packets(&open, "dropped"), DROPPED);
    assert_eq!(sample(&open, "jit_gate_grants_active"), 1);
    assert_eq!(
        sample(
            &open,
            &format!("jit_gate_port_grants_active{{port=\"{PORT}\",protocol=\"udp\"}}")
        ),
        1
    );
    assert_eq!(
        sample(&open, "jit_gate_audit_events_total{kind=\"grant-created\"}"),
        1
    );
    assert_eq!(
        sample(
            &open,
            "jit_gate_rpc_duration_seconds_count{method=\"jitgate.v1.JitGate/RequestAccess\"}"
        ),
        1
    );

    // The textfile for node_exporter: the same exposition, rewritten.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let written = std::fs::read_to_string(&textfile).unwrap_or_default();
        if written.contains(&format!("verdict=\"passed\"}} {PASSED}")) {
            assert!(written.ends_with("# EOF\n"), "{written}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "textfile:\n{written}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sum of histogram `name` (a decimal number).
fn sum(text: &str, name: &str) -> f64 {
    let series = format!("{name}_sum ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nftables_drops_pending_requests_and_reconciliation_times_are_scraped() {
    let (host, _agent, mut api, sink) = start(Mode::Nftables, "", "approvals = 1").await;
    let before = scrape(&host);
    assert_eq!(
        sample(&before, "jit_gate_nftables_dropped_packets_total"),
        0
    );

    // No grant: nftables drops every datagram, and its rule counts them.
    send(&host, &sink, "nft-closed", DROPPED, false);
    let closed = scrape(&host);
    assert_eq!(
        sample(&closed, "jit_gate_nftables_dropped_packets_total"),
        DROPPED
    );
    assert!(sample(&closed, "jit_gate_nftables_dropped_bytes_total") >= DROPPED * 28);

    // The port needs an approval: the request waits, and is counted.
    let held = api
        .client
        .request_access(request(
            "metrics-held",
            PORT,
            proto::Protocol::Udp,
            CLIENT_V4,
            600,
        ))
        .await
        .expect("held")
        .into_inner();
    assert!(held.grants.is_empty(), "{held:?}");
    let pending = scrape(&host);
    assert_eq!(sample(&pending, "jit_gate_requests_pending"), 1);

    // Reconciliation runs every second here: its times are recorded.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(&host);
        let count = sample(&text, "jit_gate_reconcile_duration_seconds_count");
        if count >= 2 {
            assert!(sum(&text, "jit_gate_reconcile_duration_seconds") > 0.0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{count} reconciliations"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
