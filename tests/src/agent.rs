//! A real agent process for end-to-end tests: `jit-gate-agent` started in
//! the gated namespace (through `nsenter`, which keeps /sys/fs/bpf visible,
//! unlike `ip netns exec`), with its own configuration, database, socket
//! and pin directory, driven over its Unix socket exactly as a broker does.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use jit_gate_agent::proto::{self, access_request::Lifetime, jit_gate_client::JitGateClient};
use tonic::transport::{Channel, Endpoint};

use crate::{
    env::PinDir,
    netns::{Netns, nsenter},
};

/// How long an agent may take to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an expected audit record or log line may take to appear.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

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
}

impl AgentFiles {
    pub fn new(ns: &Netns) -> Self {
        AgentFiles {
            dir: tempfile::tempdir().expect("temporary directory"),
            pins: PinDir::new(),
            ns: ns.name.clone(),
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
        let text = format!(
            "interfaces = {interfaces:?}\ndatabase = {:?}\npin_dir = {:?}\nreconcile_interval = \"1s\"\napi.unix_socket = {:?}\n{extra}\n",
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
        match outcome.recv_timeout(START_TIMEOUT) {
            Ok(output) => output.expect("wait for jit-gate-agent"),
            Err(_) => {
                // SAFETY: kill on the pid of our own child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("jit-gate-agent {args:?} still running after {START_TIMEOUT:?}");
            }
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = nsenter(&self.ns, workspace_binary("jit-gate-agent"));
        command
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .env("RUST_LOG", "info");
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
        let log = files.dir.path().join("agent.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("agent log");
        let child = files
            .command(&[])
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start jit-gate-agent (nsenter from util-linux)");
        let mut agent = Agent { child, log };
        let deadline = Instant::now() + START_TIMEOUT;
        // Connecting, not the path existing: a stopped agent leaves its socket.
        while std::os::unix::net::UnixStream::connect(files.socket()).is_err() {
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

    /// SIGTERM and wait: a graceful stop.
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.wait().expect("wait for agent")
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
    // The channel connects once, over this stream.
    let stream = Mutex::new(Some(tokio::net::UnixStream::from_std(stream)?));
    let channel = endpoint()
        .connect_with_connector(tower::service_fn(move |_| {
            let stream = stream.lock().expect("stream lock").take();
            async move {
                stream
                    .map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the one connection is used up"))
            }
        }))
        .await
        .map_err(std::io::Error::other)?;
    Ok(JitGateClient::new(channel))
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
    }
}

/// Every grant the agent knows, ended ones included, newest first.
pub async fn all_grants(api: &mut JitGateClient<Channel>) -> Vec<proto::Grant> {
    api.list_grants(proto::ListGrantsRequest {
        include_ended: true,
        port: 0,
        limit: 0,
    })
    .await
    .expect("list grants")
    .into_inner()
    .grants
}

pub async fn policy(api: &mut JitGateClient<Channel>) -> proto::Policy {
    api.get_policy(proto::GetPolicyRequest {})
        .await
        .expect("get policy")
        .into_inner()
}

/// Replays the audit log from the start (after_sequence = 0), following it
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
            Err(_) => panic!("timed out waiting for events; got {events:#?}"),
        }
    }
    events
}
