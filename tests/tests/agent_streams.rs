//! Event streams cost bounded memory: a read-only caller opening 1,000
//! `WatchEvents` streams that replay the whole log and never read does not
//! grow the agent by more than tens of MB, other calls stay fast meanwhile,
//! the per-principal stream limit holds, and memory comes back after; a
//! reader that stalls is ended with a status saying where to resume.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::time::{Duration, Instant};

use jit_gate_agent::proto::{self, Protocol};
use jit_gate_tests::{
    agent::{Agent, AgentFiles, access, client, connect},
    netns::Topology,
};
use tonic::Code;

const STREAMS: usize = 1000;
const CONNECTIONS: usize = 10;
/// Records in the log before the streams replay it, each about 1.3 KiB.
const RECORDS: usize = 2000;
/// "Tens of MB": the growth allowed while every stream is stalled.
const MAX_GROWTH_KIB: u64 = 64 * 1024;
/// A call during the stall must answer within this (seconds on main).
const FAST: Duration = Duration::from_secs(2);

fn vm_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_replaying_streams_cost_bounded_memory_and_other_calls_stay_fast() {
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    files.write_config(
        &[&topo.gated_if],
        &format!("api.max_streams_per_principal = {STREAMS}\napi.stream_stall_timeout = \"10m\""),
    );
    let agent = Agent::start(&files);
    let mut api = client(&files).await;
    let justification = "j".repeat(1000);
    for i in 0..RECORDS {
        let source = format!("198.18.{}.{}", i / 256, i % 256);
        let mut request = access(&format!("r{i}"), &[(22, Protocol::Tcp, &source)], 3600);
        request.justification.clone_from(&justification);
        api.request_access(request).await.expect("grant");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = vm_rss_kib(agent.pid());

    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(connect(&files.socket()).await.expect("connect"));
    }
    let mut stalled = Vec::new();
    for i in 0..STREAMS {
        let mut watcher =
            proto::jit_gate_client::JitGateClient::new(channels[i % CONNECTIONS].clone());
        let stream = watcher
            .watch_events(proto::WatchEventsRequest {
                after_sequence: Some(0),
                kinds: Vec::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("stream {i}: {e}"))
            .into_inner();
        // Kept, never read.
        stalled.push(stream);
    }
    // One more than the limit is refused.
    let extra = proto::jit_gate_client::JitGateClient::new(channels[0].clone())
        .watch_events(proto::WatchEventsRequest {
            after_sequence: Some(0),
            kinds: Vec::new(),
        })
        .await
        .expect_err("over the per-principal limit");
    assert_eq!(extra.code(), Code::ResourceExhausted, "{extra}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = vm_rss_kib(agent.pid());

    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let started = Instant::now();
        api.get_status(proto::GetStatusRequest {})
            .await
            .expect("status");
        let source = format!("198.19.0.{i}");
        api.request_access(access(
            &format!("during{i}"),
            &[(22, Protocol::Tcp, &source)],
            60,
        ))
        .await
        .expect("grant during the stall");
        slowest = slowest.max(started.elapsed());
    }

    drop(stalled);
    drop(channels);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = vm_rss_kib(agent.pid());
    eprintln!(
        "agent VmRSS: {before} KiB before, {during} KiB with {STREAMS} stalled replaying streams \
         (+{} KiB), {after} KiB after they closed; slowest GetStatus+RequestAccess pair during the stall: {slowest:?}",
        during.saturating_sub(before)
    );
    assert!(
        during.saturating_sub(before) <= MAX_GROWTH_KIB,
        "{STREAMS} stalled streams grew the agent from {before} KiB to {during} KiB"
    );
    assert!(slowest < FAST, "calls during the stall took {slowest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stalls_is_ended_with_where_to_resume() {
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    files.write_config(&[&topo.gated_if], "api.stream_stall_timeout = \"1s\"");
    let _agent = Agent::start(&files);
    let mut api = client(&files).await;
    let justification = "j".repeat(1000);
    for i in 0..300 {
        let source = format!("198.18.{}.{}", i / 256, i % 256);
        let mut request = access(&format!("r{i}"), &[(22, Protocol::Tcp, &source)], 3600);
        request.justification.clone_from(&justification);
        api.request_access(request).await.expect("grant");
    }
    // A client with 64 KiB flow-control windows: the agent can send it
    // only that much until it reads.
    let socket = files.socket();
    let channel = tonic::transport::Endpoint::from_static("http://agent.invalid")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .expect("connect");
    let mut stream = proto::jit_gate_client::JitGateClient::new(channel)
        .watch_events(proto::WatchEventsRequest {
            after_sequence: Some(0),
            kinds: Vec::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut received = 0u64;
    let ended = loop {
        match stream.message().await {
            Ok(Some(event)) => received = event.sequence,
            Ok(None) => panic!("the stream ended without a status after {received}"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended}");
    assert!(
        ended
            .message()
            .contains(&format!("resume with after_sequence = {received}")),
        "{ended} (last received {received})"
    );
    assert!(received > 0 && received < 300, "{received}");

    // Streams whose readers left free their slots at once, even when
    // nothing happens: the default limit (16) is available again.
    for round in 0..2 {
        let mut open = Vec::new();
        for i in 0..16 {
            let stream = api
                .watch_events(proto::WatchEventsRequest::default())
                .await
                .unwrap_or_else(|e| panic!("round {round}, stream {i}: {e}"));
            open.push(stream);
        }
        drop(open);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
