//! A real agent process for end-to-end tests: `jit-gate-agent` started in
//! the gated namespace (through `nsenter`, which keeps /sys/fs/bpf visible,
//! unlike `ip netns exec`), with its own configuration, database, socket
//! and pin directory, driven over its Unix socket exactly as a broker does;
//! and an independent reading of what the kernel enforces (nftables table,
//! pinned XDP maps) to compare with the grants the agent lists.

use std::{
    collections::BTreeMap,
    fmt::Display,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use jit_gate_agent::{
    clock::wall_to_boot_ns,
    config::Mode,
    enforce::nft::{DEFAULT_TABLE, NftGate},
    net::{GrantTarget, Protocol},
    proto::{self, access_request::Lifetime, jit_gate_client::JitGateClient},
};
use jit_gate_common::maps::{
    CIDR_KEY_FIXED_BITS, CidrDataV4, CidrDataV6, GrantKeyV4, GrantKeyV6, GrantValue, names,
};
use tonic::transport::{Channel, Endpoint};

use crate::{
    env::PinDir,
    netns::{Netns, Topology, nsenter},
};

/// How long an agent may take to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an expected audit record or log line may take to appear.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an agent may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Path of a binary of the workspace, built beside the running executable
/// (a binary in target/<profile>/ or a test in target/<profile>/deps/).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let here = exe.parent().expect("target directory");
    let candidates = [
        here.join(name),
        here.parent().map(|p| p.join(name)).unwrap_or_default(),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{name} is missing beside {}: build it with `cargo build -p jit-gate-agent` (`cargo xtask test` and `bench` do)",
                exe.display()
            )
        })
}

fn endpoint() -> Endpoint {
    Endpoint::from_static("http://agent.invalid")
}

/// Connects a gRPC channel to the Unix socket at `path`.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    endpoint()
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

/// Files of one agent: kept across restarts of its process.
pub struct AgentFiles {
    pub dir: tempfile::TempDir,
    pub pins: PinDir,
    pub ns: String,
    /// Environment given to the agent process (e.g. a fake wall clock).
    pub env: Vec<(String, String)>,
}

impl AgentFiles {
    pub fn new(ns: &Netns) -> Self {
        AgentFiles {
            dir: tempfile::tempdir().expect("temporary directory"),
            pins: PinDir::new(),
            ns: ns.name.clone(),
            env: Vec::new(),
        }
    }

    /// Files whose pin directory is not on bpffs, where XDP cannot load.
    pub fn off_bpffs(ns: &Netns) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let pins = PinDir {
            path: dir.path().join("pins"),
        };
        AgentFiles {
            dir,
            pins,
            ns: ns.name.clone(),
            env: Vec::new(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("run/agent.sock")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    pub fn database(&self) -> PathBuf {
        self.dir.path().join("agent.db")
    }

    /// Runs SQL on the (stopped) agent's database, as someone with the file
    /// would.
    pub fn sql(&self, statement: &str) {
        let status = Command::new("python3")
            .args([
                "-c",
                "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); db.executescript(sys.argv[2]); db.commit()",
            ])
            .arg(self.database())
            .arg(statement)
            .status()
            .expect("python3");
        assert!(status.success(), "{statement}");
    }

    /// The agent's nftables table in its namespace as `nft -j` prints it,
    /// or `None` if there is no such table.
    pub fn nft_table(&self) -> Option<serde_json::Value> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args(["--", "nft", "-j", "list", "table", "inet", "jit_gate"])
            .output()
            .expect("run nft (nftables)");
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("No such file or directory"),
                "nft list table: {stderr}"
            );
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).expect("nft -j prints JSON"))
    }

    /// The elements of the table's grant sets (`allow_*`): one per granted
    /// (source, protocol, port). Panics if the table is missing.
    pub fn nft_granted(&self) -> Vec<serde_json::Value> {
        let table = self.nft_table().expect("table inet jit_gate exists");
        table["nftables"]
            .as_array()
            .expect("nftables array")
            .iter()
            .filter_map(|object| object.get("set"))
            .filter(|set| set["name"].as_str().is_some_and(|n| n.starts_with("allow")))
            .flat_map(|set| set["elem"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The configuration for `interfaces`, with `extra` TOML appended
    /// (top-level keys first, then tables; `[api]` keys as dotted keys,
    /// `api.socket_group = ...`).
    pub fn write_config(&self, interfaces: &[&str], extra: &str) {
        // A test may choose its own interval in `extra`; 1 s otherwise.
        let reconcile = if extra.contains("reconcile_interval") {
            ""
        } else {
            "reconcile_interval = \"1s\"\n"
        };
        let text = format!(
            "interfaces = {interfaces:?}\ndatabase = {:?}\npin_dir = {:?}\n{reconcile}api.unix_socket = {:?}\n{extra}\n",
            self.database(),
            self.pins.path,
            self.socket(),
        );
        std::fs::write(self.config_path(), text).expect("write agent.toml");
    }

    /// Runs `jit-gate-agent <args>` in the namespace and waits for it to
    /// exit; kills it and panics if it is still running after `START_TIMEOUT`.
    pub fn run_to_end(&self, args: &[&str]) -> Output {
        let child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run jit-gate-agent");
        let pid = child.id() as i32;
        let (done, outcome) = mpsc::channel();
        std::thread::spawn(move || done.send(child.wait_with_output()));
        if let Ok(output) = outcome.recv_timeout(START_TIMEOUT) {
            output.expect("wait for jit-gate-agent")
        } else {
            // SAFETY: kill on the pid of our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("jit-gate-agent {args:?} still running after {START_TIMEOUT:?}");
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        self.command_via(&[], args)
    }

    /// `jit-gate-agent --config … <args>` in the namespace, started through
    /// `launcher` (a program and its arguments that exec the agent, like
    /// systemd-socket-activate) if given.
    pub fn command_via(&self, launcher: &[&str], args: &[&str]) -> Command {
        let agent = workspace_binary("jit-gate-agent");
        let mut command = match launcher {
            [] => nsenter(&self.ns, &agent),
            [program, rest @ ..] => {
                let mut command = nsenter(&self.ns, program);
                command.args(rest).arg(&agent);
                command
            }
        };
        command
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }
}

/// A running agent process; killed on drop.
pub struct Agent {
    child: Child,
    pub log: PathBuf,
}

impl Agent {
    /// Starts the agent and waits until its API answers.
    pub fn start(files: &AgentFiles) -> Agent {
        Agent::start_command(files, files.command(&[]))
    }

    /// Starts the agent as `command` (see `AgentFiles::command_via`) and
    /// waits until it serves: its socket may accept connections (queued)
    /// before the gate is attached, so readiness is the agent's own
    /// "serving on" line, new in its log.
    pub fn start_command(files: &AgentFiles, mut command: Command) -> Agent {
        let log = files.dir.path().join("agent.log");
        let served_before = serving_lines(&log);
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("agent log");
        let child = command
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start jit-gate-agent (nsenter from util-linux)");
        let mut agent = Agent { child, log };
        let deadline = Instant::now() + START_TIMEOUT;
        // Connecting (which also starts a socket-activated agent), then the
        // agent saying it serves: a stopped agent leaves its socket.
        while std::os::unix::net::UnixStream::connect(files.socket()).is_err()
            || serving_lines(&agent.log) <= served_before
        {
            if let Some(status) = agent.child.try_wait().expect("agent status") {
                panic!(
                    "agent exited with {status} before serving:\n{}",
                    agent.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent did not open its socket:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the agent's log has a line containing every one of `needles`.
    pub fn wait_for_log(&self, needles: &[&str]) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let text = self.log_text();
            if text
                .lines()
                .any(|line| needles.iter().all(|n| line.contains(n)))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` to the agent process (nsenter execs it, same pid).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on the pid of our own child process.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "signal {signal} to agent");
    }

    /// SIGTERM and wait: a graceful stop, which must not take long.
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("agent status") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent still running {STOP_TIMEOUT:?} after SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and wait: a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many times the log at `path` says the agent serves.
fn serving_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("serving on"))
        .count()
}

/// A gRPC client of the agent at `files`.
pub async fn client(files: &AgentFiles) -> JitGateClient<Channel> {
    let channel = connect(&files.socket())
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", files.socket().display()));
    JitGateClient::new(channel)
}

/// A gRPC client of the agent at `files` whose connection carries the
/// credentials `uid`/`gid` (no supplementary groups), as a non-root process
/// would. They are switched on a thread of its own with raw syscalls, which
/// change that thread only (glibc's wrappers would change every thread of
/// the test), and the kernel records them at connect(2) as the peer
/// credentials the agent reads. Err: the socket refused the connection.
pub async fn client_as(
    files: &AgentFiles,
    uid: u32,
    gid: u32,
) -> std::io::Result<JitGateClient<Channel>> {
    Ok(JitGateClient::new(channel_as(files, uid, gid).await?))
}

/// The channel behind `client_as`, for other services (health, reflection).
pub async fn channel_as(files: &AgentFiles, uid: u32, gid: u32) -> std::io::Result<Channel> {
    let path = files.socket();
    let stream = std::thread::spawn(move || {
        let check = |rc: libc::c_long| {
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        // SAFETY: plain credential syscalls on this thread, which ends here.
        unsafe {
            check(libc::syscall(
                libc::SYS_setgroups,
                0,
                std::ptr::null::<libc::gid_t>(),
            ))?;
            check(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
            check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
        }
        std::os::unix::net::UnixStream::connect(path)
    })
    .join()
    .expect("connecting thread")?;
    stream.set_nonblocking(true)?;
    one_connection(endpoint(), tokio::net::UnixStream::from_std(stream)?).await
}

/// A gRPC channel over `stream`, connected once (it cannot reconnect).
pub async fn one_connection<S>(endpoint: Endpoint, stream: S) -> std::io::Result<Channel>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let stream = Mutex::new(Some(stream));
    endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let stream = stream.lock().expect("stream lock").take();
            async move {
                stream
                    .map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the one connection is used up"))
            }
        }))
        .await
        .map_err(std::io::Error::other)
}

/// An access request for `ports` as (port, protocol, source), lasting
/// `seconds`, with a requester and a justification.
pub fn access(
    id: &str,
    ports: &[(u16, proto::Protocol, &str)],
    seconds: i64,
) -> proto::AccessRequest {
    proto::AccessRequest {
        request_id: id.into(),
        ports: ports
            .iter()
            .map(|&(port, protocol, source)| proto::PortAccess {
                port: port.into(),
                protocol: protocol as i32,
                source: source.into(),
            })
            .collect(),
        lifetime: Some(Lifetime::Duration(prost_types::Duration {
            seconds,
            nanos: 0,
        })),
        requester: "alice".into(),
        justification: "maintenance".into(),
        ticket: String::new(),
        max_connections: 0,
    }
}

/// A request for one port, `seconds` long.
pub fn request(
    id: &str,
    port: u16,
    protocol: proto::Protocol,
    source: impl Display,
    seconds: i64,
) -> proto::AccessRequest {
    access(id, &[(port, protocol, &source.to_string())], seconds)
}

/// Active grants, or every grant (newest first), every page.
pub async fn list_grants(
    api: &mut JitGateClient<Channel>,
    include_ended: bool,
) -> Vec<proto::Grant> {
    let mut grants = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = api
            .list_grants(proto::ListGrantsRequest {
                include_ended,
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .expect("list grants")
            .into_inner();
        grants.extend(page.grants);
        if page.next_page_token.is_empty() {
            return grants;
        }
        page_token = page.next_page_token;
    }
}

/// Every grant the agent knows, ended ones included, newest first, less
/// the time each has left (so that two listings compare equal).
pub async fn all_grants(api: &mut JitGateClient<Channel>) -> Vec<proto::Grant> {
    without_remaining(list_grants(api, true).await)
}

pub async fn policy(api: &mut JitGateClient<Channel>) -> proto::Policy {
    api.get_policy(proto::GetPolicyRequest {})
        .await
        .expect("get policy")
        .into_inner()
}

/// Replays the audit log from the start (`after_sequence` = 0), following it
/// live, until `done` holds for the events of `kinds` received so far;
/// panics if that takes longer than `EVENT_TIMEOUT`.
pub async fn events_until(
    api: &mut JitGateClient<Channel>,
    kinds: &[proto::EventKind],
    mut done: impl FnMut(&[proto::Event]) -> bool,
) -> Vec<proto::Event> {
    let mut stream = api
        .watch_events(proto::WatchEventsRequest {
            after_sequence: Some(0),
            kinds: kinds.iter().map(|k| *k as i32).collect(),
        })
        .await
        .expect("watch events")
        .into_inner();
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    let mut events = Vec::new();
    while !done(&events) {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(event))) => events.push(event),
            Ok(other) => panic!("event stream ended: {other:?}; got {events:#?}"),
            Err(elapsed) => panic!("waiting for events: {elapsed}; got {events:#?}"),
        }
    }
    events
}

/// Grants as listed, less the time each has left (which changes between
/// two listings of the same grants).
pub fn without_remaining(grants: Vec<proto::Grant>) -> Vec<proto::Grant> {
    grants
        .into_iter()
        .map(|g| proto::Grant {
            remaining: None,
            ..g
        })
        .collect()
}

/// A timestamp of the API as wall-clock time.
pub fn wall_time(at: Option<prost_types::Timestamp>) -> SystemTime {
    let at = at.expect("timestamp set");
    SystemTime::try_from(at).expect("timestamp in range")
}

/// The target a listed grant opens.
pub fn target_of(grant: &proto::Grant) -> GrantTarget {
    let protocol = match proto::Protocol::try_from(grant.protocol) {
        Ok(proto::Protocol::Tcp) => Protocol::Tcp,
        Ok(proto::Protocol::Udp) => Protocol::Udp,
        other => panic!("grant {} has protocol {other:?}", grant.id),
    };
    GrantTarget {
        source: grant.source.parse().expect("grant source"),
        protocol,
        port: grant.port.try_into().expect("grant port"),
    }
}

/// The agent's API as a broker uses it; every call must succeed.
pub struct Api {
    pub client: JitGateClient<Channel>,
}

impl Api {
    pub async fn connect(files: &AgentFiles) -> Api {
        Api {
            client: client(files).await,
        }
    }

    /// One grant for `source` on (port, protocol), `seconds` long.
    pub async fn grant(
        &mut self,
        id: &str,
        port: u16,
        protocol: proto::Protocol,
        source: impl Display,
        seconds: i64,
    ) -> proto::Grant {
        let mut granted = self
            .client
            .request_access(request(id, port, protocol, source, seconds))
            .await
            .unwrap_or_else(|e| panic!("request {id}: {e}"))
            .into_inner()
            .grants;
        assert_eq!(granted.len(), 1, "request {id}: {granted:?}");
        granted.remove(0)
    }

    pub async fn revoke(&mut self, grant_id: u64, terminate: bool) -> proto::RevokeGrantResponse {
        self.client
            .revoke_grant(proto::RevokeGrantRequest {
                grant_id,
                terminate_connections: terminate,
                reason: "end-to-end test".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("revoke {grant_id}: {e}"))
            .into_inner()
    }

    /// Active grants, or every grant (newest first).
    pub async fn grants(&mut self, include_ended: bool) -> Vec<proto::Grant> {
        list_grants(&mut self.client, include_ended).await
    }

    pub async fn grant_by_id(&mut self, id: u64) -> proto::Grant {
        self.grants(true)
            .await
            .into_iter()
            .find(|g| g.id == id)
            .unwrap_or_else(|| panic!("grant {id} is not listed"))
    }

    pub async fn status(&mut self) -> proto::Status {
        self.client
            .get_status(proto::GetStatusRequest {})
            .await
            .expect("get status")
            .into_inner()
    }

    pub async fn connections(&mut self) -> Vec<proto::Connection> {
        self.client
            .list_connections(proto::ListConnectionsRequest {})
            .await
            .expect("list connections")
            .into_inner()
            .connections
    }

    /// Events from now on, or stored ones after `after` first.
    pub async fn watch(&mut self, after: Option<u64>) -> Events {
        let stream = self
            .client
            .watch_events(proto::WatchEventsRequest {
                after_sequence: after,
                kinds: Vec::new(),
            })
            .await
            .expect("watch events")
            .into_inner();
        Events(stream)
    }

    /// Every stored event.
    pub async fn audit_log(&mut self) -> Vec<proto::Event> {
        self.watch(Some(0)).await.until_quiet().await
    }
}

/// How long an event stream must stay silent to count as drained.
const QUIET: Duration = Duration::from_millis(500);

/// A `WatchEvents` stream.
pub struct Events(tonic::Streaming<proto::Event>);

impl Events {
    /// The next event of `kind` for which `wanted` holds, skipping others;
    /// panics if none comes by `deadline`.
    pub async fn expect(
        &mut self,
        kind: proto::EventKind,
        deadline: SystemTime,
        wanted: impl Fn(&proto::Event) -> bool,
    ) -> proto::Event {
        loop {
            let left = deadline
                .duration_since(SystemTime::now())
                .unwrap_or_else(|_| panic!("no {kind:?} event by the deadline"));
            let event = tokio::time::timeout(left, self.0.message())
                .await
                .unwrap_or_else(|_| panic!("no {kind:?} event by the deadline"))
                .expect("event stream")
                .expect("event stream ended");
            if event.kind == kind as i32 && wanted(&event) {
                return event;
            }
        }
    }

    /// Skips events until the stream ends; panics unless the agent ended it
    /// with UNAVAILABLE (stopping).
    pub async fn expect_unavailable(&mut self) {
        loop {
            let next = tokio::time::timeout(STOP_TIMEOUT, self.0.message())
                .await
                .expect("the event stream outlives the agent");
            match next {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the event stream ended without a status"),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
                    return;
                }
            }
        }
    }

    /// Every event until none comes for a while.
    pub async fn until_quiet(&mut self) -> Vec<proto::Event> {
        let mut events = Vec::new();
        while let Ok(next) = tokio::time::timeout(QUIET, self.0.message()).await {
            events.push(next.expect("event stream").expect("event stream ended"));
        }
        events
    }
}

/// The XDP grant maps opened from their pins, not through the agent's
/// loader (which would load and re-pin the program).
pub struct PinnedGrants {
    exact_v4: HashMap<MapData, GrantKeyV4, GrantValue>,
    exact_v6: HashMap<MapData, GrantKeyV6, GrantValue>,
    cidr_v4: LpmTrie<MapData, CidrDataV4, GrantValue>,
    cidr_v6: LpmTrie<MapData, CidrDataV6, GrantValue>,
}

fn pinned<T: TryFrom<Map, Error = MapError>>(pin_dir: &Path, name: &str) -> T {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Map::from_map_data(data)
        .and_then(T::try_from)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

impl PinnedGrants {
    pub fn open(pin_dir: &Path) -> Self {
        PinnedGrants {
            exact_v4: pinned(pin_dir, names::GRANTS_V4),
            exact_v6: pinned(pin_dir, names::GRANTS_V6),
            cidr_v4: pinned(pin_dir, names::CIDR_GRANTS_V4),
            cidr_v6: pinned(pin_dir, names::CIDR_GRANTS_V6),
        }
    }

    /// Every entry, by the target it opens.
    pub fn read(&self) -> BTreeMap<GrantTarget, GrantValue> {
        let target = |source: IpNet, protocol: u8, port: u16| GrantTarget {
            source,
            protocol: Protocol::from_number(protocol).expect("TCP or UDP"),
            port,
        };
        let mut out = BTreeMap::new();
        for item in &self.exact_v4 {
            let (k, v) = item.expect(names::GRANTS_V4);
            out.insert(target(IpAddr::from(k.addr).into(), k.protocol, k.port), v);
        }
        for item in &self.exact_v6 {
            let (k, v) = item.expect(names::GRANTS_V6);
            out.insert(target(IpAddr::from(k.addr).into(), k.protocol, k.port), v);
        }
        // LPM data: protocol, port in network order, then the address.
        let cidr = |key: &[u8], prefix_len: u32, addr: IpAddr| {
            let len = (prefix_len - CIDR_KEY_FIXED_BITS) as u8;
            let port = u16::from_be_bytes([key[1], key[2]]);
            target(IpNet::new(addr, len).expect("prefix length"), key[0], port)
        };
        for item in &self.cidr_v4 {
            let (k, v) = item.expect(names::CIDR_GRANTS_V4);
            let addr: [u8; 4] = k.data()[3..].try_into().expect("IPv4 address");
            out.insert(cidr(&k.data(), k.prefix_len(), addr.into()), v);
        }
        for item in &self.cidr_v6 {
            let (k, v) = item.expect(names::CIDR_GRANTS_V6);
            let addr: [u8; 16] = k.data()[3..].try_into().expect("IPv6 address");
            out.insert(cidr(&k.data(), k.prefix_len(), addr.into()), v);
        }
        out
    }

    /// Deletes the entry of an exact IPv4 target by hand.
    pub fn remove_v4(&mut self, target: &GrantTarget) {
        self.exact_v4
            .remove(&exact_v4_key(target))
            .unwrap_or_else(|e| panic!("remove {target}: {e}"));
    }

    /// Writes an entry for an exact IPv4 target by hand.
    pub fn insert_v4(&mut self, target: &GrantTarget, value: GrantValue) {
        self.exact_v4
            .insert(exact_v4_key(target), value, 0)
            .unwrap_or_else(|e| panic!("insert {target}: {e}"));
    }
}

fn exact_v4_key(target: &GrantTarget) -> GrantKeyV4 {
    match target.source {
        IpNet::V4(net) if target.is_exact() => {
            GrantKeyV4::new(net.addr().octets(), target.protocol.number(), target.port)
        }
        _ => panic!("{target} is not an exact IPv4 target"),
    }
}

/// How far an nftables element's remaining timeout may be from the grant's
/// (the table is read a few milliseconds after "now" is taken).
const NFT_TIMEOUT_SLACK: Duration = Duration::from_secs(1);
/// How far an XDP entry's expiry may be from the grant's: the agent and the
/// test each convert wall-clock time to boot time; the agent rewrites an
/// entry more than 100 ms off.
const XDP_EXPIRY_SLACK: Duration = Duration::from_millis(250);

/// A gated host run by a real agent: the topology, the agent's files and
/// which enforcers it is expected to program. Each test has its own.
pub struct AgentHost {
    // Field order is drop order: the pins (detaching XDP), then the namespaces.
    pub files: AgentFiles,
    pub topo: Topology,
    /// Whether XDP enforces; nftables always does in the modes tested here.
    pub xdp: bool,
}

impl AgentHost {
    /// An agent in `mode` on the gated end of the veth pair, with `extra`
    /// configuration (top-level keys first, then tables).
    pub fn new(mode: Mode, extra: &str) -> Self {
        let topo = Topology::new();
        let files = AgentFiles::new(&topo.gated);
        Self::configured(topo, files, mode.uses_xdp(), mode, extra)
    }

    /// An agent in mode "xdp+nftables" whose pin directory is not on bpffs.
    pub fn without_bpffs() -> Self {
        let topo = Topology::new();
        let files = AgentFiles::off_bpffs(&topo.gated);
        Self::configured(topo, files, false, Mode::XdpAndNftables, "")
    }

    fn configured(topo: Topology, files: AgentFiles, xdp: bool, mode: Mode, extra: &str) -> Self {
        files.write_config(
            &[&topo.gated_if],
            &format!("mode = \"{}\"\n{extra}", mode.name()),
        );
        AgentHost { files, topo, xdp }
    }

    /// Starts the agent and connects to it.
    pub async fn start(&self) -> (Agent, Api) {
        let agent = Agent::start(&self.files);
        let api = Api::connect(&self.files).await;
        (agent, api)
    }

    /// The allowed elements of the agent's nftables table in the gated
    /// namespace; `None` if the table does not exist.
    pub fn nft_allowed(&self) -> Option<BTreeMap<GrantTarget, Duration>> {
        self.topo
            .gated
            .run(|| NftGate::new(DEFAULT_TABLE).read())
            .unwrap_or_else(|e| panic!("reading table inet {DEFAULT_TABLE}: {e}"))
            .map(|read| read.state.allowed)
    }

    /// Runs `nft <args>` in the gated namespace (changes behind the agent's back).
    pub fn nft(&self, args: &[&str]) {
        self.topo.gated.exec("nft", args);
    }

    pub fn pinned_grants(&self) -> PinnedGrants {
        PinnedGrants::open(&self.files.pins.path)
    }

    /// Panics unless both enforcers hold exactly the targets of the active
    /// `grants`, each with the latest expiry among its grants. The grants in
    /// these tests never nest prefixes on one port, so an entry carries its
    /// own grants' expiry only.
    pub fn assert_enforces(&self, grants: &[proto::Grant], step: &str) {
        report(step, grants, &self.mismatches(grants));
    }

    /// `assert_enforces` with the active grants the agent lists, listed
    /// again after reading the kernel so that a grant ending meanwhile is not
    /// taken for a mismatch.
    pub async fn assert_enforced(&self, api: &mut Api, step: &str) {
        for _ in 0..3 {
            let before = api.grants(false).await;
            let problems = self.mismatches(&before);
            if without_remaining(api.grants(false).await) == without_remaining(before.clone()) {
                return report(step, &before, &problems);
            }
        }
        panic!("{step}: the active grants kept changing");
    }

    fn mismatches(&self, grants: &[proto::Grant]) -> Vec<String> {
        // Per target: the latest (expiry, id), which the kernel entry carries.
        let mut wanted: BTreeMap<GrantTarget, (SystemTime, u64)> = BTreeMap::new();
        for grant in grants {
            let entry = (wall_time(grant.expires_at), grant.id);
            let slot = wanted.entry(target_of(grant)).or_insert(entry);
            *slot = (*slot).max(entry);
        }
        let mut problems = Vec::new();
        let now = SystemTime::now();
        match self.nft_allowed() {
            None => problems.push(format!("nftables: table {DEFAULT_TABLE} is missing")),
            Some(allowed) => {
                let read_at = SystemTime::now();
                for (target, (expires, id)) in &wanted {
                    match allowed.get(target) {
                        // The kernel times an element out on its own, a
                        // moment before the agent's timer ends the grant.
                        None if read_at >= *expires => {}
                        None => {
                            problems
                                .push(format!("nftables: no element for {target} (grant {id})"));
                        }
                        Some(left) => {
                            let want = expires.duration_since(now).unwrap_or_default();
                            if left.abs_diff(want) > NFT_TIMEOUT_SLACK {
                                problems.push(format!(
                                    "nftables: {target} times out in {left:?}, grant {id} in {want:?}"
                                ));
                            }
                        }
                    }
                }
                for target in allowed.keys().filter(|t| !wanted.contains_key(t)) {
                    problems.push(format!(
                        "nftables: {target} allowed without an active grant"
                    ));
                }
            }
        }
        if self.xdp {
            let entries = self.pinned_grants().read();
            for (target, (expires, id)) in &wanted {
                match entries.get(target) {
                    None => problems.push(format!("XDP: no entry for {target} (grant {id})")),
                    Some(value) => {
                        let want = wall_to_boot_ns(*expires);
                        let off = Duration::from_nanos(value.expires_at_boot_ns.abs_diff(want));
                        if value.grant_id != *id || off > XDP_EXPIRY_SLACK {
                            problems.push(format!(
                                "XDP: {target} carries grant {} expiring {off:?} away from grant {id}",
                                value.grant_id
                            ));
                        }
                    }
                }
            }
            for target in entries.keys().filter(|t| !wanted.contains_key(t)) {
                problems.push(format!("XDP: {target} allowed without an active grant"));
            }
        } else if self.files.pins.path.join(names::GRANTS_V4).exists() {
            problems.push(format!(
                "XDP: maps pinned in {} although XDP should not run",
                self.files.pins.path.display()
            ));
        }
        problems
    }
}

fn report(step: &str, grants: &[proto::Grant], problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{step}: the kernel does not enforce the active grants [{}]:\n{}",
        grants
            .iter()
            .map(|g| format!("{} {}", g.id, target_of(g)))
            .collect::<Vec<_>>()
            .join(", "),
        problems.join("\n")
    );
}

/// Runs `tests/python/<script>` with `args` and returns the JSON objects it
/// prints, one per line; panics, with its output, if it fails.
pub fn python(script: &str, args: &[&std::ffi::OsStr]) -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(script);
    let out = Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("python3 (`cargo xtask bootstrap` installs grpcio)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect()
}

/// Every stored event `request` selects (`ExportAudit`), oldest first.
pub async fn export_events(
    api: &mut JitGateClient<Channel>,
    request: proto::ExportAuditRequest,
) -> Vec<proto::Event> {
    let mut stream = api
        .export_audit(request)
        .await
        .expect("export")
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.expect("export stream") {
        events.push(event);
    }
    events
}
