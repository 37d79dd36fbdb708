//! Fleet mode end to end: a real 3-member etcd cluster (TLS, client
//! certificates, access control) and 20 agents, each gating its own
//! namespace and labelled `db` or `web`. One cluster and one fleet serve
//! every case in turn (each case its own grant ids): label-addressed grants
//! enforced exactly where they should be (real TCP connects from the
//! broker), per-host outcomes, a local policy refusal, revoke everywhere,
//! an agent down catching up, an agent whose revision was compacted away
//! re-reading a snapshot, the leader killed mid-fan-out, a member cut
//! off, and etcd unreachable while grants expire on time. Two hosts'
//! fleet metrics, scraped, follow it all: connected, the revision answered,
//! and every grant counted exactly once as applied or refused.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener, TcpStream},
    process::Output,
    time::{Duration, Instant},
};

use jit_gate_agent::fleet::{
    broker::{self, GrantAsk},
    layout::{FleetPort, Outcome, StatusValue},
};
use jit_gate_tests::{
    agent::{Agent, Api},
    etcd::Cluster,
    fleet::{Broker, ClientCert, Host, Pki, add_host},
    scrape::{sample, scrape},
};

const HOSTS: usize = 20;
const PORT: u16 = 2222;
/// Host 2 (labelled db) allows the port only from a range the broker is not in.
const REFUSING_HOST: usize = 2;
/// Host 8 (labelled db) applies every grant and is never restarted: its
/// metrics, and host 2's, count every grant of the run.
const APPLYING_HOST: usize = 8;
const METRICS: &str = "127.0.0.1:9847";
/// Grants the db hosts receive in the whole run: g-label, g-catch,
/// g-keep, g-new, g-kill, g-elect, g-part, g-twice, g-short.
const DB_GRANTS: u64 = 9;
const WAIT: Duration = Duration::from_secs(40);

fn host_name(index: usize) -> String {
    format!("h{index}")
}

fn is_db(index: usize) -> bool {
    index.is_multiple_of(2)
}

struct Setup {
    // Field order is drop order: agents and their namespaces, the cluster,
    // the broker's namespace, the PKI's files.
    hosts: Vec<Host>,
    _listeners: Vec<TcpListener>,
    cluster: Cluster,
    broker: Broker,
    broker_cert: ClientCert,
    pki: Pki,
    runtime: tokio::runtime::Runtime,
}

impl Setup {
    fn new() -> Setup {
        let broker = Broker::new();
        let pki = Pki::new("fleet etcd CA");
        let cluster = Cluster::start(&broker, &pki, 3);
        cluster.add_broker_role("broker-alice");
        let broker_cert = pki.client("broker-alice");
        let mut hosts = Vec::new();
        let mut listeners = Vec::new();
        for index in 0..HOSTS {
            let host = add_host(&broker, &pki, index);
            let name = host_name(index);
            cluster.add_agent_role(&name);
            let cert = pki.client(&name);
            let label = if is_db(index) { "db" } else { "web" };
            let sources = if index == REFUSING_HOST {
                "allowed_sources = [\"203.0.113.0/24\"]\n"
            } else {
                ""
            };
            let metrics = if [REFUSING_HOST, APPLYING_HOST].contains(&index) {
                format!("[metrics]\nenabled = true\nlisten = [\"{METRICS}\"]\n")
            } else {
                String::new()
            };
            host.files.write_config(
                &[&host.interface],
                &format!(
                    "[[policy]]\nport = {PORT}\nprotocol = \"tcp\"\nmax_duration = \"1h\"\n{sources}\n{metrics}{}",
                    cluster.fleet_table(&name, &[label, "all"], &cert)
                ),
            );
            listeners.push(
                host.ns
                    .run(|| TcpListener::bind(("0.0.0.0", PORT)))
                    .expect("listener on the gated port"),
            );
            hosts.push(host);
        }
        let mut setup = Setup {
            hosts,
            _listeners: listeners,
            cluster,
            broker,
            broker_cert,
            pki,
            runtime: tokio::runtime::Runtime::new().expect("runtime"),
        };
        // A few at a time: twenty starting at once on two shared cores can
        // outlast the start timeout.
        for batch in setup.hosts.chunks_mut(4) {
            std::thread::scope(|scope| {
                for host in batch {
                    scope.spawn(|| host.agent = Some(Agent::start(&host.files)));
                }
            });
        }
        // Every agent registered before any label is resolved.
        wait_until("every agent registered", || {
            let listed = setup.cluster.etcdctl_ok(&[
                "get",
                "/jit-gate/v1/inventory/",
                "--prefix",
                "--keys-only",
            ]);
            listed.lines().filter(|l| !l.is_empty()).count() == HOSTS
        });
        setup
    }

    /// `jit-gate fleet <args>` in the broker's namespace as broker-alice.
    fn fleet(&self, args: &[&str]) -> Output {
        let endpoints = self.cluster.endpoints().join(",");
        let mut full = vec![
            "fleet".to_owned(),
            "--etcd".into(),
            endpoints,
            "--etcd-ca".into(),
            self.pki.ca_path().display().to_string(),
            "--etcd-cert".into(),
            self.broker_cert.certificate.display().to_string(),
            "--etcd-key".into(),
            self.broker_cert.key.display().to_string(),
            // etcd fsyncs every write: on a loaded two-core machine a call
            // can take seconds.
            "--etcd-timeout".into(),
            "20s".into(),
        ];
        full.extend(args.iter().map(|a| (*a).to_owned()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        self.broker.cli(&full)
    }

    fn request(&self, id: &str, label: &str, duration: &str, wait: bool) -> Output {
        let mut args = vec![
            "request",
            "2222/tcp",
            "--source",
            "198.18.0.1",
            "--duration",
            duration,
            "--label",
            label,
            "--broker",
            "broker-alice",
            "--id",
            id,
        ];
        if wait {
            args.extend(["--wait", "--wait-timeout", "30s"]);
        }
        // Once: the CLI itself retries a call that meets an election.
        self.fleet(&args)
    }

    /// Each targeted host's current outcome of `id`.
    fn outcomes(&self, id: &str) -> BTreeMap<String, Option<StatusValue>> {
        self.try_outcomes(id)
            .unwrap_or_else(|e| panic!("fleet status: {e}"))
    }

    /// Each targeted host's outcome, or why etcd did not say (an election
    /// in progress fails the call; the broker retries).
    fn try_outcomes(&self, id: &str) -> Result<BTreeMap<String, Option<StatusValue>>, String> {
        let out = self.fleet(&["--json", "status", id]);
        if !out.status.success() {
            return Err(text(&out));
        }
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("fleet status --json");
        Ok(json["hosts"]
            .as_array()
            .expect("hosts")
            .iter()
            .map(|h| {
                (
                    h["host"].as_str().expect("host").to_owned(),
                    serde_json::from_value(h["status"].clone()).expect("status value"),
                )
            })
            .collect())
    }

    /// Waits until `host`'s outcome of `id` is `outcome`.
    fn wait_outcome(&self, id: &str, hosts: &[usize], outcome: Outcome) {
        wait_until(&format!("{id}: {outcome:?} on {hosts:?}"), || {
            let Ok(outcomes) = self.try_outcomes(id) else {
                return false;
            };
            hosts.iter().all(|i| {
                outcomes
                    .get(&host_name(*i))
                    .and_then(Option::as_ref)
                    .is_some_and(|s| s.outcome == outcome)
            })
        });
    }

    /// Which hosts accept a TCP connection to the gated port from the broker.
    fn reachable(&self) -> Vec<bool> {
        let addresses: Vec<SocketAddr> = self
            .hosts
            .iter()
            .map(|h| SocketAddr::new(h.address.into(), PORT))
            .collect();
        std::thread::scope(|scope| {
            let probes: Vec<_> = addresses
                .iter()
                .map(|address| {
                    scope.spawn(|| {
                        self.broker.ns.run(|| {
                            TcpStream::connect_timeout(address, Duration::from_millis(700)).is_ok()
                        })
                    })
                })
                .collect();
            probes
                .into_iter()
                .map(|p| p.join().expect("probe"))
                .collect()
        })
    }

    fn assert_reachable_exactly(&self, expected: impl Fn(usize) -> bool, step: &str) {
        let reachable = self.reachable();
        let wanted: Vec<bool> = (0..HOSTS).map(expected).collect();
        assert_eq!(reachable, wanted, "{step}: reachable hosts (index order)");
    }

    /// How many grants host `index` created for fleet grant `id` (ever).
    fn grants_for(&self, index: usize, id: &str) -> usize {
        self.runtime.block_on(async {
            let mut api = Api::connect(&self.hosts[index].files).await;
            api.grants(true)
                .await
                .iter()
                .filter(|g| g.request_id == id)
                .count()
        })
    }

    fn fleet_status(&self, index: usize) -> jit_gate_agent::proto::FleetStatus {
        self.runtime.block_on(async {
            let mut api = Api::connect(&self.hosts[index].files).await;
            api.status().await.fleet.expect("fleet status reported")
        })
    }

    /// Host `index`'s fleet metrics, scraped as Prometheus would.
    fn fleet_metrics(&self, index: usize) -> FleetMetrics {
        let text = scrape(&self.hosts[index].ns, METRICS);
        FleetMetrics {
            connected: sample(&text, "jit_gate_fleet_connected"),
            revision: sample(&text, "jit_gate_fleet_applied_revision"),
            applied: sample(&text, "jit_gate_fleet_grants_total{outcome=\"applied\"}"),
            refused: sample(&text, "jit_gate_fleet_grants_total{outcome=\"refused\"}"),
        }
    }

    /// The metered hosts' counts: host 8 applied `applied` grants, host 2
    /// refused as many; nothing else counted.
    fn assert_counted(&self, applied: u64, step: &str) {
        let counted = |i| {
            let m = self.fleet_metrics(i);
            (m.applied, m.refused)
        };
        assert_eq!(
            counted(APPLYING_HOST),
            (applied, 0),
            "{step}: host 8 (applied, refused)"
        );
        assert_eq!(
            counted(REFUSING_HOST),
            (0, applied),
            "{step}: host 2 (applied, refused)"
        );
    }

    /// Every host applied `id` exactly once, except those refusing it.
    fn assert_applied_once(&self, id: &str, targeted: impl Fn(usize) -> bool) {
        for index in 0..HOSTS {
            let expected = usize::from(targeted(index) && index != REFUSING_HOST);
            assert_eq!(
                self.grants_for(index, id),
                expected,
                "{id}: grants on host {index}"
            );
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct FleetMetrics {
    connected: u64,
    revision: u64,
    applied: u64,
    refused: u64,
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn fleet_mode_with_a_real_etcd_cluster() {
    let mut setup = Setup::new();
    label_grant_reaches_exactly_its_hosts_and_revoke_closes_everywhere(&setup);
    agent_down_catches_up_and_restarts_apply_nothing_twice(&mut setup);
    compacted_revision_rereads_a_snapshot_and_reconciles(&mut setup);
    leader_killed_mid_fan_out_and_member_cut_off_lose_nothing(&mut setup);
    repeated_write_creates_no_second_grant(&setup);
    etcd_unreachable_enforcement_goes_on_and_grants_expire(&setup);
    // Every grant counted once, whatever reconnections redelivered.
    setup.assert_counted(DB_GRANTS, "end of the run");
}

fn label_grant_reaches_exactly_its_hosts_and_revoke_closes_everywhere(setup: &Setup) {
    setup.assert_reachable_exactly(|_| false, "before any grant");
    for index in [APPLYING_HOST, REFUSING_HOST] {
        wait_until(&format!("host {index}'s connected metric"), || {
            setup.fleet_metrics(index).connected == 1
        });
    }
    setup.assert_counted(0, "before any grant");
    let out = setup.request("g-label", "db", "10m", true);
    let printed = text(&out);
    // Host 2 refuses: --wait reports it and fails.
    assert_eq!(out.status.code(), Some(1), "{printed}");
    for index in 0..HOSTS {
        let line = printed
            .lines()
            .find(|l| l.starts_with(&format!("{}\t", host_name(index))));
        match (is_db(index), index == REFUSING_HOST) {
            (true, false) => assert!(
                line.is_some_and(|l| l.contains("applied until")),
                "host {index}: {printed}"
            ),
            (true, true) => assert!(
                line.is_some_and(|l| l.contains("refused") && l.contains("outside the prefixes")),
                "host {index}: {printed}"
            ),
            (false, _) => assert!(line.is_none(), "web host {index} answered: {printed}"),
        }
    }
    setup.assert_reachable_exactly(
        |i| is_db(i) && i != REFUSING_HOST,
        "label db granted (host 2 refused)",
    );
    let refused = setup.outcomes("g-label")[&host_name(REFUSING_HOST)]
        .clone()
        .expect("host 2 answered");
    assert_eq!(refused.outcome, Outcome::Refused);
    assert!(refused.reason.contains("198.18.0.1"), "{}", refused.reason);
    setup.assert_applied_once("g-label", is_db);
    // The metrics: the revision answered is the grant key's, each outcome
    // counted once.
    let outcomes = setup.outcomes("g-label");
    let answered = |i: usize| {
        let status = outcomes[&host_name(i)].as_ref().expect("answered");
        u64::try_from(status.grant_revision).expect("revision")
    };
    for index in [APPLYING_HOST, REFUSING_HOST] {
        wait_until(&format!("host {index}'s revision metric"), || {
            setup.fleet_metrics(index).revision == answered(index)
        });
    }
    setup.assert_counted(1, "g-label");
    // An agent cannot read another host's grants (etcd access control).
    let other = setup.pki.client("h1");
    let peek = setup.cluster.etcdctl_as(
        &other,
        &["get", "/jit-gate/v1/hosts/h0/grants/", "--prefix"],
    );
    assert!(
        !peek.status.success() && text(&peek).contains("permission denied"),
        "h1 read h0's grants: {}",
        text(&peek)
    );
    let forge = setup
        .cluster
        .etcdctl_as(&other, &["put", "/jit-gate/v1/status/h0/g-label", "{}"]);
    assert!(
        !forge.status.success(),
        "h1 wrote h0's status: {}",
        text(&forge)
    );

    let out = setup.fleet(&[
        "revoke",
        "g-label",
        "--terminate",
        "--wait",
        "--wait-timeout",
        "30s",
    ]);
    assert!(out.status.success(), "revoke: {}", text(&out));
    setup.assert_reachable_exactly(|_| false, "after revoke");
}

fn agent_down_catches_up_and_restarts_apply_nothing_twice(setup: &mut Setup) {
    const DOWN: usize = 4;
    let agent = setup.hosts[DOWN].agent.take().expect("agent");
    assert!(agent.stop().success());
    let out = setup.request("g-catch", "db", "10m", false);
    assert!(out.status.success(), "{}", text(&out));
    let up: Vec<usize> = (0..HOSTS)
        .filter(|i| is_db(*i) && *i != DOWN && *i != REFUSING_HOST)
        .collect();
    setup.wait_outcome("g-catch", &up, Outcome::Applied);
    assert!(
        setup.outcomes("g-catch")[&host_name(DOWN)].is_none(),
        "a stopped agent answered"
    );
    setup.hosts[DOWN].agent = Some(Agent::start(&setup.hosts[DOWN].files));
    setup.wait_outcome("g-catch", &[DOWN], Outcome::Applied);
    // Another agent restarts: it resumes from its revision, nothing twice.
    let agent = setup.hosts[0].agent.take().expect("agent");
    assert!(agent.stop().success());
    setup.hosts[0].agent = Some(Agent::start(&setup.hosts[0].files));
    wait_until("host 0 reconnected", || setup.fleet_status(0).connected);
    setup.assert_reachable_exactly(|i| is_db(i) && i != REFUSING_HOST, "g-catch");
    setup.assert_applied_once("g-catch", is_db);
    let revoked = setup.fleet(&["revoke", "g-catch", "--wait"]);
    assert!(revoked.status.success(), "{}", text(&revoked));
}

fn compacted_revision_rereads_a_snapshot_and_reconciles(setup: &mut Setup) {
    const HOST: usize = 6;
    let out = setup.request("g-keep", "db", "10m", true);
    assert_eq!(out.status.code(), Some(1), "host 2 refuses: {}", text(&out));
    assert_eq!(setup.grants_for(HOST, "g-keep"), 1);
    let agent = setup.hosts[HOST].agent.take().expect("agent");
    assert!(agent.stop().success());
    // While it is down: its copy of g-keep deleted, g-new written, and the
    // history it would resume from compacted away.
    setup
        .cluster
        .etcdctl_ok(&["del", "/jit-gate/v1/hosts/h6/grants/g-keep"]);
    let out = setup.request("g-new", "db", "10m", false);
    assert!(out.status.success(), "{}", text(&out));
    let header = setup.cluster.etcdctl_ok(&[
        "get",
        "/jit-gate/v1/",
        "--prefix",
        "--keys-only",
        "-w",
        "json",
    ]);
    let revision =
        serde_json::from_str::<serde_json::Value>(&header).expect("JSON")["header"]["revision"]
            .as_i64()
            .expect("revision");
    setup
        .cluster
        .etcdctl_ok(&["compact", &revision.to_string()]);
    setup.hosts[HOST].agent = Some(Agent::start(&setup.hosts[HOST].files));
    setup.wait_outcome("g-new", &[HOST], Outcome::Applied);
    setup.wait_outcome("g-keep", &[HOST], Outcome::Revoked);
    let active: Vec<String> = setup.runtime.block_on(async {
        let mut api = Api::connect(&setup.hosts[HOST].files).await;
        api.grants(false)
            .await
            .into_iter()
            .map(|g| g.request_id)
            .collect()
    });
    assert_eq!(active, ["g-new"], "host {HOST} after the snapshot");
    assert_eq!(setup.grants_for(HOST, "g-new"), 1);
    for id in ["g-keep", "g-new"] {
        let out = setup.fleet(&["revoke", id, "--wait"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    setup.assert_reachable_exactly(|_| false, "after the compaction case");
}

fn leader_killed_mid_fan_out_and_member_cut_off_lose_nothing(setup: &mut Setup) {
    let all_but_refusing: Vec<usize> = (0..HOSTS).filter(|i| *i != REFUSING_HOST).collect();
    let leader = setup.cluster.leader();
    let out = setup.request("g-kill", "all", "10m", false);
    // The write is committed; the agents' watches are still delivering it.
    setup.cluster.members[leader].kill();
    assert!(out.status.success(), "{}", text(&out));
    // Written right away, in the election: the CLI retries on its own.
    let elected = setup.request("g-elect", "all", "10m", false);
    assert!(elected.status.success(), "{}", text(&elected));
    for id in ["g-kill", "g-elect"] {
        setup.wait_outcome(id, &all_but_refusing, Outcome::Applied);
        setup.wait_outcome(id, &[REFUSING_HOST], Outcome::Refused);
        setup.assert_applied_once(id, |_| true);
    }
    setup.cluster.members[leader].restart();
    setup.cluster.wait_all_healthy();

    let cut = setup.cluster.leader();
    setup.cluster.members[cut].link(false);
    let out = setup.request("g-part", "all", "10m", false);
    assert!(out.status.success(), "{}", text(&out));
    setup.wait_outcome("g-part", &all_but_refusing, Outcome::Applied);
    setup.assert_applied_once("g-part", |_| true);
    setup.cluster.members[cut].link(true);
    setup.cluster.wait_all_healthy();
    setup.assert_reachable_exactly(|i| i != REFUSING_HOST, "g-kill and g-part");
    for id in ["g-kill", "g-elect", "g-part"] {
        let out = setup.fleet(&["revoke", id, "--wait"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    setup.assert_reachable_exactly(|_| false, "after both revokes");
}

/// A write repeated with the same plan (what the CLI does when an answer
/// was lost) writes every copy again and creates no second grant.
fn repeated_write_creates_no_second_grant(setup: &Setup) {
    let ask = GrantAsk {
        id: "g-twice".into(),
        broker: "broker-alice".into(),
        hosts: Vec::new(),
        labels: vec!["db".into()],
        source: "198.18.0.1".into(),
        ports: vec![FleetPort {
            port: PORT.into(),
            protocol: Some("tcp".into()),
        }],
        duration: Duration::from_mins(10),
        requester: "test".into(),
        justification: String::new(),
        ticket: String::new(),
    };
    let (first, again) = setup
        .cluster
        .with_client(&setup.broker.ns, &setup.broker_cert, async |client| {
            let planned = broker::plan(client, &ask).await?;
            let first = broker::write(client, &planned).await?;
            let again = broker::write(client, &planned).await?;
            // Another plan under the same id is refused.
            let other = broker::plan(client, &ask).await;
            anyhow::ensure!(
                other.is_err_and(|e| e.to_string().contains("exists already")),
                "a second plan for g-twice was accepted"
            );
            Ok((first, again))
        })
        .expect("write g-twice twice");
    assert_eq!(first.record, again.record);
    assert_eq!(
        again.committed.len(),
        HOSTS / 2,
        "every db copy written again"
    );
    let db_but_refusing: Vec<usize> = (0..HOSTS)
        .filter(|i| is_db(*i) && *i != REFUSING_HOST)
        .collect();
    setup.wait_outcome("g-twice", &db_but_refusing, Outcome::Applied);
    setup.assert_applied_once("g-twice", is_db);
    let out = setup.fleet(&["revoke", "g-twice", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
}

fn etcd_unreachable_enforcement_goes_on_and_grants_expire(setup: &Setup) {
    const LIFETIME: Duration = Duration::from_secs(20);
    let written = Instant::now();
    let out = setup.request("g-short", "db", "20s", true);
    assert_eq!(out.status.code(), Some(1), "host 2 refuses: {}", text(&out));
    for member in &setup.cluster.members {
        member.link(false);
    }
    wait_until("every agent reports etcd unreachable", || {
        (0..HOSTS).all(|i| !setup.fleet_status(i).connected)
    });
    for index in [APPLYING_HOST, REFUSING_HOST] {
        assert_eq!(setup.fleet_metrics(index).connected, 0, "host {index}");
    }
    let status = setup.fleet_status(0);
    assert!(!status.last_error.is_empty(), "{status:?}");
    assert!(status.applied_revision > 0, "{status:?}");
    assert!(
        written.elapsed() < LIFETIME,
        "too slow to check the grant while live"
    );
    setup.assert_reachable_exactly(
        |i| is_db(i) && i != REFUSING_HOST,
        "etcd unreachable, grant live",
    );
    std::thread::sleep((LIFETIME + Duration::from_secs(1)).saturating_sub(written.elapsed()));
    setup.assert_reachable_exactly(|_| false, "etcd unreachable, grant expired");
    for member in &setup.cluster.members {
        member.link(true);
    }
    setup.cluster.wait_all_healthy();
    wait_until("every agent reconnected", || {
        (0..HOSTS).all(|i| setup.fleet_status(i).connected)
    });
    for index in [APPLYING_HOST, REFUSING_HOST] {
        assert_eq!(setup.fleet_metrics(index).connected, 1, "host {index}");
    }
}
