//! The shipped systemd units (dist/): their exposure score and `systemd-analyze
//! verify`, and the real agent run by a private systemd under exactly their
//! sandbox — only paths, logs and the test's network namespace are added in a
//! drop-in: it starts, gates real traffic, reloads (a refused reload fails
//! `systemctl reload` and keeps the running configuration), serves a
//! `socket_group` and the mutual-TLS listener.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use jit_gate_agent::proto::{self, jit_gate_client::JitGateClient};
use jit_gate_tests::{
    agent::{AgentFiles, AgentHost, Api, connect, one_connection, request, workspace_binary},
    env::PinDir,
    fleet::Pki,
    netns::{CLIENT_V4, CLIENT_V4_OUTSIDE, GATED_V4, Topology},
    systemd::PrivateSystemd,
    traffic::{TcpEcho, expect_access},
};
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint};

/// The exposure `systemd-analyze security` may give the shipped service.
const MAX_EXPOSURE: f64 = 2.0;
const SERVICE: &str = "jit-gate-agent.service";
const SOCKET: &str = "jit-gate-agent.socket";
/// Where the shipped units put the binary and the configuration.
const INSTALLED_AGENT: &str = "/usr/bin/jit-gate-agent";
const INSTALLED_CONFIG: &str = "/etc/jit-gate/agent.toml";
/// The API socket as the manager's namespace sees it.
const API_SOCKET: &str = "/run/jit-gate/agent.sock";
const SSH: u16 = 22;
const RDP: u16 = 3389;
const TLS_PORT: u16 = 7443;
const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;

fn dist(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist")
        .join(name)
}

fn read_dist(name: &str) -> String {
    std::fs::read_to_string(dist(name)).unwrap_or_else(|e| panic!("read dist/{name}: {e}"))
}

/// A directory for one test's files outside /tmp, /home and /root, which
/// the unit hides from the agent: in the target directory.
fn unit_test_dir() -> tempfile::TempDir {
    let agent = workspace_binary("jit-gate-agent");
    let target = agent.parent().expect("target directory");
    for hidden in ["/tmp", "/var/tmp", "/home", "/root", "/run/user"] {
        assert!(
            !target.starts_with(hidden),
            "the unit hides {hidden} from the agent (ProtectHome/PrivateTmp): build the workspace elsewhere than {}",
            target.display()
        );
    }
    tempfile::Builder::new()
        .prefix("unit-test-")
        .tempdir_in(target)
        .expect("test directory")
}

/// The shipped units with the binary and configuration at `agent` and
/// `config`: the only change to their text.
fn units_at(agent: &Path, config: &Path) -> Vec<(&'static str, String)> {
    [SERVICE, SOCKET]
        .into_iter()
        .map(|name| {
            let text = read_dist(name)
                .replace(INSTALLED_AGENT, agent.to_str().expect("utf-8 path"))
                .replace(INSTALLED_CONFIG, config.to_str().expect("utf-8 path"));
            (name, text)
        })
        .collect()
}

#[test]
fn the_shipped_service_exposure_is_at_most_2() {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(dist(SERVICE))
        .output()
        .expect("run systemd-analyze (systemd)");
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split_once("Overall exposure level for ")?
                .1
                .split_once(": ")
        })
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no overall exposure in:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}:\n{text}"
    );
}

#[test]
fn the_shipped_units_verify_clean() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "").expect("write configuration");
    let mut paths = Vec::new();
    for (name, text) in units_at(&workspace_binary("jit-gate-agent"), &config) {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write unit");
        paths.push(path);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .expect("run systemd-analyze (systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

/// A gated namespace whose agent is the shipped unit run by a private
/// systemd.
struct UnitHost {
    // Field order is drop order: the manager (and the agent in it), then
    // the pins and namespaces.
    manager: PrivateSystemd,
    host: AgentHost,
}

impl UnitHost {
    /// The agent's configuration is `extra` TOML after the test's paths;
    /// `service` and `socket` are drop-in lines added to the units.
    fn start(extra: &str, service: &str, socket: &str) -> UnitHost {
        let topo = Topology::new();
        let files = AgentFiles {
            dir: unit_test_dir(),
            pins: PinDir::new(),
            ns: topo.gated.name.clone(),
            env: Vec::new(),
        };
        let host = AgentHost {
            files,
            topo,
            xdp: true,
        };
        let dir = host.files.dir.path().to_owned();
        write_config(&host, extra);
        let mut units = units_at(
            &workspace_binary("jit-gate-agent"),
            &host.files.config_path(),
        );
        // Plumbing only: the test's namespace, files and log; the sandbox
        // settings stay as shipped.
        units.push((
            "jit-gate-agent.service.d/test.conf",
            format!(
                "[Service]\nNetworkNamespacePath=/run/netns/{ns}\nConfigurationDirectory=\nStateDirectory=\n\
                 ReadWritePaths={dir}\nStandardOutput=append:{dir}/agent.log\nStandardError=append:{dir}/agent.log\n\
                 Environment=RUST_LOG=info\n{service}\n",
                ns = host.topo.gated.name,
                dir = dir.display(),
            ),
        ));
        units.push((
            "jit-gate-agent.socket.d/test.conf",
            format!("[Socket]\n{socket}\n"),
        ));
        let manager = PrivateSystemd::boot(&dir.join("systemd"), &units);
        let unit = UnitHost { manager, host };
        let started = unit.manager.systemctl(&["start", SOCKET, SERVICE]);
        assert!(
            started.status.success(),
            "systemctl start: {}\n{}\nagent log:\n{}",
            String::from_utf8_lossy(&started.stderr),
            String::from_utf8_lossy(
                &unit
                    .manager
                    .systemctl(&["status", "--full", SERVICE])
                    .stdout
            ),
            unit.log()
        );
        unit
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.host.files.dir.path().join("agent.log")).unwrap_or_default()
    }

    async fn api(&self) -> Api {
        let socket = self.manager.path(API_SOCKET);
        let channel = connect(&socket)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", socket.display(), self.log()));
        Api {
            client: JitGateClient::new(channel),
        }
    }

    /// `/proc/<main pid>/status` of the service, as its manager sees it.
    fn main_process_status(&self) -> String {
        let pid = self
            .manager
            .systemctl_ok(&["show", "-p", "MainPID", "--value", SERVICE]);
        std::fs::read_to_string(self.manager.path(&format!("/proc/{}/status", pid.trim())))
            .expect("main process status")
    }

    fn reload(&self) -> std::process::Output {
        self.manager.systemctl(&["reload", SERVICE])
    }

    fn assert_active(&self, step: &str) {
        let state = self.manager.systemctl(&["is-active", SERVICE]);
        assert_eq!(
            String::from_utf8_lossy(&state.stdout).trim(),
            "active",
            "{step}:\n{}",
            self.log()
        );
    }
}

fn write_config(host: &AgentHost, extra: &str) {
    let dir = host.files.dir.path();
    std::fs::write(
        host.files.config_path(),
        format!(
            "interfaces = [{:?}]\ndatabase = {:?}\npin_dir = {:?}\nreconcile_interval = \"1s\"\n{extra}\n",
            host.topo.gated_if,
            dir.join("agent.db"),
            host.files.pins.path,
        ),
    )
    .expect("write agent.toml");
}

fn policy(ports: &[u16]) -> String {
    ports.iter().fold(String::new(), |mut text, p| {
        let _ = write!(text, "[[policy]]\nport = {p}\nprotocol = \"tcp\"\n");
        text
    })
}

async fn policy_ports(api: &mut Api) -> Vec<u32> {
    let policy = api
        .client
        .get_policy(proto::GetPolicyRequest {})
        .await
        .expect("policy")
        .into_inner();
    policy.rules.iter().map(|r| r.port).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_gates_and_reloads_under_the_shipped_unit() {
    let unit = UnitHost::start(&policy(&[SSH]), "", "");
    unit.assert_active("started");
    // The sandbox is applied: a system-call filter and the three capabilities.
    let status = unit.main_process_status();
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:\t"))
        .expect("CapBnd");
    let expected = (1u64 << 12) | (1 << 38) | (1 << 39); // NET_ADMIN, PERFMON, BPF
    assert_eq!(u64::from_str_radix(bounding, 16).expect("hex"), expected);

    let ssh = SocketAddr::new(IpAddr::V4(GATED_V4), SSH);
    let _server = TcpEcho::start(&unit.host.topo.gated, ssh);
    let client = &unit.host.topo.client;
    expect_access(
        client,
        "before any grant",
        &[(CLIENT_V4.into(), ssh, false)],
    );
    let mut api = unit.api().await;
    api.client
        .request_access(request("unit-1", SSH, proto::Protocol::Tcp, CLIENT_V4, 600))
        .await
        .expect("grant under the unit");
    expect_access(client, "granted", &[(CLIENT_V4.into(), ssh, true)]);
    unit.host.assert_enforced(&mut api, "granted").await;

    // A good file: `systemctl reload` returns once it is applied.
    write_config(&unit.host, &policy(&[SSH, RDP]));
    let out = unit.reload();
    assert!(out.status.success(), "reload: {out:?}\n{}", unit.log());
    assert_eq!(
        policy_ports(&mut api).await,
        [u32::from(SSH), u32::from(RDP)]
    );

    // A broken file and a restart-only change: the reload job fails, the
    // agent keeps running with the configuration it had.
    for (step, extra, reason) in [
        ("invalid TOML", None, "invalid configuration"),
        (
            "restart-only change",
            Some(format!("nft_table = \"other\"\n{}", policy(&[SSH]))),
            "field `nft_table` cannot change without a restart",
        ),
    ] {
        match extra {
            Some(extra) => write_config(&unit.host, &extra),
            None => std::fs::write(unit.host.files.config_path(), "interfaces = [").expect("write"),
        }
        let out = unit.reload();
        assert!(
            !out.status.success(),
            "{step}: reload succeeded\n{}",
            unit.log()
        );
        assert!(
            unit.log().contains(reason),
            "{step}: no {reason:?} in\n{}",
            unit.log()
        );
        unit.assert_active(step);
        assert_eq!(
            policy_ports(&mut api).await,
            [u32::from(SSH), u32::from(RDP)],
            "{step}"
        );
    }
    expect_access(
        client,
        "after refused reloads",
        &[(CLIENT_V4.into(), ssh, true)],
    );

    // Stopping leaves enforcement in place.
    unit.manager.systemctl_ok(&["stop", SERVICE]);
    expect_access(client, "agent stopped", &[(CLIENT_V4.into(), ssh, true)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unit_serves_a_socket_group_and_the_mtls_listener() {
    let pki = Pki::new("unit-test-ca");
    let server = pki.server("server", GATED_V4);
    let broker = pki.client("broker");
    // The agent cannot see /tmp (PrivateTmp): its TLS files go beside its
    // configuration.
    let tls_files = |dir: &Path| -> [PathBuf; 3] {
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls).expect("tls dir");
        [
            (pki.ca_path(), "ca.pem"),
            (server.certificate.clone(), "server.pem"),
            (server.key.clone(), "server.key"),
        ]
        .map(|(from, name)| {
            std::fs::copy(&from, tls.join(name)).expect("copy TLS file");
            tls.join(name)
        })
    };
    let listen = SocketAddr::new(IpAddr::V4(GATED_V4), TLS_PORT);
    let staging = unit_test_dir();
    let [ca, cert, key] = tls_files(staging.path());
    let extra = format!(
        "api.socket_group = \"nogroup\"\napi.principals = [{{ uid = {NOBODY}, role = \"auditor\" }}]\n\
         api.tls.listen = [\"{listen}\"]\napi.tls.certificate = {cert:?}\napi.tls.key = {key:?}\n\
         api.tls.client_ca = [{ca:?}]\napi.tls.principals = [{{ uri = \"urn:jit-gate:broker\", role = \"broker\" }}]\n{}",
        policy(&[SSH])
    );
    // The brokers' address is allowed; the unit denies every other.
    let unit = UnitHost::start(
        &extra,
        &format!("IPAddressAllow={CLIENT_V4}"),
        "SocketGroup=nogroup\nSocketMode=0660",
    );
    unit.assert_active("started");

    // A caller in the socket's group (and configured): served.
    let as_user = |gid: u32| {
        unit.manager
            .inside("setpriv")
            .args(["--reuid", &NOBODY.to_string(), "--regid", &gid.to_string()])
            .args(["--clear-groups", "--"])
            .arg(workspace_binary("jit-gate"))
            .args(["--agent", API_SOCKET, "--json", "status"])
            .output()
            .expect("run jit-gate through setpriv")
    };
    let member = as_user(NOGROUP);
    assert!(
        member.status.success(),
        "member of the socket group: {member:?}\n{}",
        unit.log()
    );
    // The same uid outside the group: the socket refuses it.
    let outsider = as_user(NOGROUP - 1);
    assert!(
        !outsider.status.success(),
        "outside the group: {outsider:?}"
    );
    assert!(
        String::from_utf8_lossy(&outsider.stdout).contains("Permission denied"),
        "{outsider:?}"
    );

    // The mutual-TLS listener under the unit: a broker from the allowed
    // address is served; from another address its packets never reach the
    // listener (IPAddressDeny=any).
    let config = pki.client_config(Some(&broker));
    let mut api = tls_client(&unit.host.topo, CLIENT_V4.into(), listen, config.clone())
        .await
        .unwrap_or_else(|e| panic!("mTLS from the allowed address: {e}\n{}", unit.log()));
    let granted = api
        .request_access(request(
            "unit-tls",
            SSH,
            proto::Protocol::Tcp,
            CLIENT_V4,
            600,
        ))
        .await
        .expect("grant over mTLS under the unit")
        .into_inner();
    assert_eq!(granted.grants[0].principal, "uri:urn:jit-gate:broker");
    let denied = tls_client(&unit.host.topo, CLIENT_V4_OUTSIDE.into(), listen, config).await;
    assert!(denied.is_err(), "IPAddressDeny let another address in");
}

/// A gRPC client over mutual TLS from `source` in the client namespace.
async fn tls_client(
    topo: &Topology,
    source: IpAddr,
    to: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<JitGateClient<Channel>> {
    let tcp = topo
        .client
        .run(|| -> std::io::Result<std::net::TcpStream> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(source, 0).into())?;
            socket.connect_timeout(&to.into(), std::time::Duration::from_secs(3))?;
            Ok(socket.into())
        })?;
    tcp.set_nonblocking(true)?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            ServerName::IpAddress(to.ip().into()),
            tokio::net::TcpStream::from_std(tcp)?,
        )
        .await?;
    let endpoint = Endpoint::from_shared(format!("http://{to}")).expect("endpoint");
    Ok(JitGateClient::new(one_connection(endpoint, tls).await?))
}
