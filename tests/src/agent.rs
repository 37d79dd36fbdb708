//! A real agent process for end-to-end tests: `jit-gate-agent` started in
//! the gated namespace (through `nsenter`, which keeps /sys/fs/bpf visible,
//! unlike `ip netns exec`), with its own configuration, database, socket
//! and pin directory, driven over its Unix socket exactly as a broker does.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use jit_gate_agent::proto::jit_gate_client::JitGateClient;
use tonic::transport::{Channel, Endpoint};

use crate::{
    env::PinDir,
    netns::{Netns, nsenter},
};

/// How long an agent may take to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

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

/// Connects a gRPC channel to the Unix socket at `path`.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    Endpoint::from_static("http://agent.invalid")
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

    /// The configuration for `interfaces`, with `extra` TOML appended
    /// (top-level keys first, then tables).
    pub fn write_config(&self, interfaces: &[&str], extra: &str) {
        let text = format!(
            "interfaces = {interfaces:?}\ndatabase = {:?}\npin_dir = {:?}\nreconcile_interval = \"1s\"\n{extra}\n[api]\nunix_socket = {:?}\n",
            self.database(),
            self.pins.path,
            self.socket(),
        );
        std::fs::write(self.config_path(), text).expect("write agent.toml");
    }

    /// Runs `jit-gate-agent <args>` in the namespace and waits for it.
    pub fn run_to_end(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().expect("run jit-gate-agent")
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
        while !files.socket().exists() {
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
