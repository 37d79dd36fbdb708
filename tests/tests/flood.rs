//! A flood of SYNs from random spoofed sources at a gated port, against a
//! real agent (mode xdp): the audit log grows by a bounded number of
//! denial summaries per interval, whatever the number of sources, and the
//! packets they count add up to what the kernel dropped. Connections
//! refused by a grant's quota show in the status and the summaries.
#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, PerCpuArray};
use jit_gate_agent::{config::Mode, proto};
use jit_gate_common::{maps::names, verdict::Reason};
use jit_gate_tests::{
    agent::AgentHost,
    cli::Cli,
    frames::{PacketSocket, if_counts, mac_of},
    netns::{CLIENT_V4, GATED_V4},
    packets::{Packet, tcp_flag::SYN},
    traffic::{TcpEcho, tcp_connect},
};
use rand::{Rng, SeedableRng, rngs::StdRng};

const SSH: u16 = 22;
const INTERVAL: Duration = Duration::from_secs(2);
const FLOOD_FOR: Duration = Duration::from_secs(6);
const BATCH: usize = 32;
const PAUSE: Duration = Duration::from_micros(500);

fn details(event: &proto::Event) -> serde_json::Value {
    serde_json::from_str(&event.details_json).expect("event details are JSON")
}

fn denials(events: &[proto::Event]) -> Vec<serde_json::Value> {
    events
        .iter()
        .filter(|e| e.kind == proto::EventKind::AccessDenied as i32)
        .map(details)
        .collect()
}

/// Packets the kernel dropped, by all reasons together, read from the pins.
fn kernel_drops(pin_dir: &std::path::Path) -> u64 {
    let counters: PerCpuArray<MapData, u64> =
        MapData::from_pin(pin_dir.join(names::REASON_COUNTERS))
            .and_then(Map::from_map_data)
            .and_then(PerCpuArray::try_from)
            .expect("the pinned reason counters");
    Reason::ALL
        .into_iter()
        .filter(|r| !r.is_pass())
        .map(|r| {
            counters
                .get(&(r as u32), 0)
                .expect("counter")
                .iter()
                .sum::<u64>()
        })
        .sum()
}

fn database_bytes(host: &AgentHost) -> u64 {
    let db = host.files.database();
    ["", "-wal"]
        .iter()
        .filter_map(|suffix| std::fs::metadata(format!("{}{suffix}", db.display())).ok())
        .map(|m| m.len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_source_flood_is_summarized_in_bounded_records_that_add_up() {
    let host = AgentHost::new(
        Mode::Xdp,
        &format!("[denials]\nsummary_interval = \"{}s\"", INTERVAL.as_secs()),
    );
    let (_agent, mut api) = host.start().await;
    let protected_ports = api.status().await.ports.len();
    let records_before = denials(&api.audit_log().await).len();
    let bytes_before = database_bytes(&host);

    let topo = &host.topo;
    let sender = PacketSocket::sender(&topo.client, &topo.client_if);
    let macs = (
        mac_of(&topo.client, &topo.client_if),
        mac_of(&topo.gated, &topo.gated_if),
    );
    let drops_before = if_counts(&topo.client, &topo.client_if).tx_dropped;
    let mut rng = StdRng::seed_from_u64(7);
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < FLOOD_FOR {
        for _ in 0..BATCH {
            // A source from 10.0.0.0/8, a new one almost every time.
            let source = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (rng.random::<u32>() >> 8)));
            let frame = Packet::tcp(source, GATED_V4.into(), SSH, SYN)
                .src_port(rng.random_range(1024..=65_535))
                .macs(macs.0, macs.1)
                .build()
                .bytes;
            sender.send(&frame);
            sent += 1;
        }
        std::thread::sleep(PAUSE);
    }
    let flood_took = started.elapsed();
    assert_eq!(
        if_counts(&topo.client, &topo.client_if).tx_dropped,
        drops_before,
        "frames were lost in the veth pair"
    );

    // Wait until the summaries account for every drop.
    let deadline = Instant::now() + INTERVAL * 4;
    let (records, dropped_at_22, dropped_total) = loop {
        let records = denials(&api.audit_log().await);
        let port_22: u64 = records
            .iter()
            .filter(|d| d["port"] == "22/tcp")
            .map(|d| d["dropped"].as_u64().expect("dropped"))
            .sum();
        let total: u64 = records
            .iter()
            .filter(|d| d["port"].is_null())
            .map(|d| d["dropped"].as_u64().expect("dropped"))
            .sum();
        if port_22 >= sent || Instant::now() > deadline {
            break (records, port_22, total);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let status = api.status().await;
    let kernel_22 = status
        .ports
        .iter()
        .find(|p| p.port == u32::from(SSH))
        .expect("22/tcp in the status")
        .dropped_packets;
    assert_eq!(kernel_22, sent, "the kernel dropped every SYN of the flood");
    assert_eq!(
        dropped_at_22, kernel_22,
        "the summaries of 22/tcp add up to the kernel's count"
    );
    assert_eq!(
        dropped_total,
        kernel_drops(&host.files.pins.path),
        "the summaries of all drops add up to the kernel's counters"
    );

    let new_records = records.len() - records_before;
    // One summary per port with drops and one of totals per interval, for
    // the intervals the flood and the wait spanned (and one partial).
    let intervals = (flood_took.as_secs_f64() / INTERVAL.as_secs_f64()).ceil() as usize + 5;
    let bound = intervals * (protected_ports + 1);
    let growth = database_bytes(&host).saturating_sub(bytes_before);
    println!(
        "{sent} SYNs from random sources in {flood_took:.1?}: {new_records} audit records \
         (bound {bound}), database +{:.3} MB",
        growth as f64 / 1e6
    );
    assert!(
        new_records <= bound,
        "{new_records} records for {sent} denials"
    );
    let last = records
        .iter()
        .rev()
        .find(|d| d["port"] == "22/tcp")
        .expect("a summary of 22/tcp");
    let estimate = last["distinct_sources_estimate"]
        .as_u64()
        .expect("estimate");
    let sampled = last["sampled"].as_u64().expect("sampled");
    assert!(sampled > 0, "no deny event was sampled: {last}");
    assert!(
        estimate >= sampled / 2,
        "a random-source flood is estimated at {estimate} sources from {sampled} samples: {last}"
    );
    assert!(
        !last["top_sources"]
            .as_array()
            .expect("top sources")
            .is_empty()
    );
}

/// `jit-gate status` (text and JSON) shows the flow table and the port's
/// refused connections, as counted by the kernel (`refused` at least: the
/// kernel's counters only grow).
fn status_through_the_cli_shows_the_refusals(host: &AgentHost, refused: u64) {
    let cli = Cli::new(&host.files);
    let json = cli.json(&["status"]);
    let flows = &json["flows"];
    assert_eq!(flows["per_grant_quota"], 2, "{json}");
    assert!(flows["capacity"].as_u64().expect("capacity") > 0, "{json}");
    assert_eq!(flows["tracked"], 2, "the two sessions: {json}");
    assert!(
        flows["refused_quota"].as_u64().expect("refused_quota") >= refused,
        "{json}"
    );
    let ssh = json["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["port"] == SSH)
        .expect("22/tcp")
        .clone();
    assert!(
        ssh["refused_connections"].as_u64().expect("refused") >= refused,
        "{json}"
    );
    assert!(ssh["dropped_packets"].as_u64().expect("dropped") >= refused);

    let text = cli.text(&["status"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("flow table:"))
        .unwrap_or_else(|| panic!("no flow table line:\n{text}"));
    assert!(
        line.contains(&format!("2 of {} tracked, 2 per grant", flows["capacity"])),
        "{line}"
    );
    assert!(line.contains(" over quota"), "{line}");
    let header = text
        .lines()
        .find(|l| l.trim_start().starts_with("PORT"))
        .unwrap_or_else(|| panic!("no port table:\n{text}"));
    assert!(
        header.contains("DROPPED") && header.contains("REFUSED"),
        "{header}"
    );
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.trim_start().starts_with("22/tcp"))
        .unwrap_or_else(|| panic!("no row for 22/tcp:\n{text}"))
        .split_whitespace()
        .collect();
    let shown: u64 = row
        .last()
        .expect("REFUSED column")
        .parse()
        .expect("a count");
    assert!(shown >= refused, "{row:?}");
}

/// A grantee over its quota: the new connection is refused, the status
/// counts it, and the port's denial summary names the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_hits_show_in_the_status_and_the_audit_log() {
    let host = AgentHost::new(
        Mode::Xdp,
        "[flows]\nper_grant_quota = 2\n[denials]\nsummary_interval = \"1s\"",
    );
    let (_agent, mut api) = host.start().await;
    let _server = TcpEcho::start(&host.topo.gated, SocketAddr::new(GATED_V4.into(), SSH));
    let ssh = SocketAddr::new(GATED_V4.into(), SSH);
    let grant = api
        .grant("g", SSH, proto::Protocol::Tcp, CLIENT_V4, 120)
        .await;
    let _sessions: Vec<_> = (0..2)
        .map(|_| {
            tcp_connect(&host.topo.client, CLIENT_V4.into(), ssh)
                .expect_connected("within the quota")
        })
        .collect();
    tcp_connect(&host.topo.client, CLIENT_V4.into(), ssh).expect_timed_out("over the quota");

    let status = api.status().await;
    let flows = status.flows.expect("the flow table in the status");
    assert_eq!(flows.per_grant_quota, 2);
    assert!(flows.refused_quota >= 1, "{flows:?}");
    let port = status
        .ports
        .iter()
        .find(|p| p.port == u32::from(SSH))
        .expect("22/tcp");
    assert_eq!(port.refused_connections, flows.refused_quota);
    status_through_the_cli_shows_the_refusals(&host, port.refused_connections);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let refused: u64 = denials(&api.audit_log().await)
            .iter()
            .filter(|d| d["port"] == "22/tcp")
            .flat_map(|d| {
                d["refused_by_grant"]["grants"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|g| g["grant_id"] == grant.id)
            .map(|g| g["refused"].as_u64().expect("refused"))
            .sum();
        if refused == flows.refused_quota {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the audit log counts {refused} refusals under grant {}, the kernel {}",
            grant.id,
            flows.refused_quota
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
