//! Stock gRPC clients in another language reach the agent with their
//! default options: Python's grpcio (health, reflection, then the `JitGate`
//! service found through reflection, a batch of requests among its calls)
//! on the Unix socket, whatever `:authority` it sends for a `unix:` target.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use jit_gate_tests::{
    agent::{Agent, AgentFiles, python},
    netns::Topology,
};
use serde_json::Value;

/// Runs `tests/python/stock_client.py` against the agent's socket and returns
/// its steps by name.
fn python_steps(files: &AgentFiles) -> std::collections::BTreeMap<String, Value> {
    python("stock_client.py", &[files.socket().as_os_str()])
        .into_iter()
        .map(|step| (step["step"].as_str().expect("step name").to_owned(), step))
        .collect()
}

#[test]
fn python_grpcio_with_default_options_uses_health_reflection_and_the_api() {
    let topo = Topology::new();
    let files = AgentFiles::new(&topo.gated);
    files.write_config(&[&topo.gated_if], "");
    let _agent = Agent::start(&files);

    let steps = python_steps(&files);
    // grpc.health.v1.HealthCheckResponse.SERVING
    assert_eq!(steps["health"]["status"], 1, "{steps:?}");
    let services = steps["reflection"]["services"]
        .as_array()
        .expect("services");
    for wanted in ["jitgate.v1.JitGate", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == wanted), "{services:?}");
    }
    assert_eq!(
        steps["GetStatus"]["version"],
        env!("CARGO_PKG_VERSION"),
        "{steps:?}"
    );
    assert_eq!(steps["GetStatus"]["configured_mode"], "xdp+nftables");
    // An error status reaches the stock client intact, code and message.
    assert_eq!(steps["RevokeGrant"]["code"], "NOT_FOUND", "{steps:?}");
    assert_eq!(steps["RevokeGrant"]["message"], "no grant 424242");
    // A batch's nested messages built from Python dicts; the good request
    // granted, the bad one refused in its place (3: INVALID_ARGUMENT).
    let results = &steps["RequestAccessBatch"]["results"];
    assert_eq!(
        results[0]["grants"],
        serde_json::json!(["198.51.100.7/32"]),
        "{steps:?}"
    );
    assert_eq!(results[1]["code"], 3, "{steps:?}");
    let message = results[1]["message"].as_str().expect("a refusal's message");
    assert!(message.contains("not-an-address"), "{message}");
    assert_eq!(results.as_array().map(Vec::len), Some(2), "{steps:?}");
}
