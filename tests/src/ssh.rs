//! Real OpenSSH between test namespaces: an sshd of the test's own in the
//! gated namespace (host key, client key, configuration and pid file in a
//! temporary directory) and non-interactive ssh clients in the client
//! namespace, bound to a chosen source address.

use std::{
    fs::{DirBuilder, File},
    net::Ipv4Addr,
    os::unix::fs::DirBuilderExt,
    process::{Child, ExitStatus, Output, Stdio},
    sync::mpsc::RecvTimeoutError,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    netns::{Netns, nsenter, run},
    process::Process,
};

const SSHD: &str = "/usr/sbin/sshd";
/// The privilege-separation directory compiled into Debian's sshd; its
/// systemd unit creates it, so a host where sshd never ran lacks it.
const PRIVSEP_DIR: &str = "/run/sshd";
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long ssh waits for the TCP handshake: a dropped SYN makes a login
/// fail with "Connection timed out" after this many seconds.
const CONNECT_TIMEOUT_SECS: u32 = 3;
/// A session's remote command: the remote clock, once a second, as seconds
/// since the epoch, so each line proves the session was alive at that time.
const CLOCK: &str = "while true; do date +%s.%N; sleep 1; done";
/// How long a fresh session may take to print its first line.
const SESSION_START: Duration = Duration::from_secs(10);

/// An sshd listening on `addr` port 22 in a namespace; killed on drop.
pub struct SshServer {
    dir: tempfile::TempDir,
    child: Child,
    pub addr: Ipv4Addr,
}

impl SshServer {
    /// Generates keys and a configuration, starts sshd and waits until it
    /// listens. Root may log in with the client key only.
    pub fn start(ns: &Netns, addr: Ipv4Addr) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = |name: &str| dir.path().join(name).display().to_string();
        for key in ["host_key", "client_key"] {
            run(
                "ssh-keygen",
                &[
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "jit-gate-test",
                    "-f",
                    &path(key),
                ],
            );
        }
        std::fs::copy(path("client_key.pub"), path("authorized_keys"))
            .expect("write authorized_keys");
        let config = format!(
            "ListenAddress {addr}\nPort 22\nHostKey {}\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nAuthorizedKeysFile {}\n\
             StrictModes no\nUsePAM no\nPidFile {}\n",
            path("host_key"),
            path("authorized_keys"),
            path("sshd.pid"),
        );
        std::fs::write(path("sshd_config"), config).expect("write sshd_config");
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(PRIVSEP_DIR)
            .unwrap_or_else(|e| panic!("create {PRIVSEP_DIR}: {e}"));
        let log = File::create(path("sshd.log")).expect("sshd log");
        let child = nsenter(&ns.name, SSHD)
            .args(["-D", "-e", "-f", &path("sshd_config")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {SSHD} (openssh-server): {e}"));
        let mut server = SshServer { dir, child, addr };
        let listening = format!("Server listening on {addr} port 22.");
        let deadline = Instant::now() + START_TIMEOUT;
        while !server.log_text().contains(&listening) {
            if let Some(status) = server.child.try_wait().expect("sshd status") {
                panic!("sshd exited with {status}:\n{}", server.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "sshd is not listening after {START_TIMEOUT:?}:\n{}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// A client in `ns` connecting from `from`, which must be one of its addresses.
    pub fn client<'a>(&'a self, ns: &'a Netns, from: Ipv4Addr) -> SshClient<'a> {
        SshClient {
            server: self,
            ns,
            from,
        }
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// ssh as root to an [`SshServer`], from one namespace and source address.
pub struct SshClient<'a> {
    server: &'a SshServer,
    ns: &'a Netns,
    from: Ipv4Addr,
}

/// What became of one login.
#[derive(Debug)]
pub enum Login {
    /// Logged in and ran the command.
    Succeeded,
    /// ssh gave up on the TCP handshake: the SYN was silently dropped.
    TimedOut { message: String },
    /// Anything else (refused, authentication failed, …).
    Failed { status: ExitStatus, message: String },
}

impl Login {
    /// Panics unless the login timed out; returns ssh's message.
    pub fn expect_timed_out(self, what: &str) -> String {
        match self {
            Login::TimedOut { message } => message,
            other => panic!("ssh {what}: expected a connect timeout, got {other:?}"),
        }
    }
}

impl SshClient<'_> {
    /// ssh with `remote_command`, without any user configuration, known
    /// hosts or prompts.
    fn ssh(&self, remote_command: &str) -> std::process::Command {
        let key = self.server.dir.path().join("client_key");
        let mut command = nsenter(&self.ns.name, "ssh");
        command
            .args(["-F", "/dev/null", "-o", "BatchMode=yes"])
            .args(["-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null"])
            // Keeps "Permanently added ... to known hosts" out of the messages.
            .args(["-o", "LogLevel=ERROR"])
            .args(["-o", &format!("ConnectTimeout={CONNECT_TIMEOUT_SECS}")])
            .args(["-b", &self.from.to_string(), "-i"])
            .arg(key)
            .arg(format!("root@{}", self.server.addr))
            .arg(remote_command);
        command
    }

    /// One login that runs `true` and leaves.
    pub fn login(&self) -> Login {
        let Output { status, stderr, .. } = self
            .ssh("true")
            .stdin(Stdio::null())
            .output()
            .expect("run ssh (openssh-client)");
        let message = String::from_utf8_lossy(&stderr).trim().to_owned();
        // ssh exits with 255 for its own errors, the remote status otherwise.
        match status.code() {
            Some(0) => Login::Succeeded,
            Some(255) if message.contains("Connection timed out") => Login::TimedOut { message },
            _ => Login::Failed { status, message },
        }
    }

    /// A long-lived session printing the remote clock every second; returns
    /// once its first line has arrived.
    pub fn session(&self) -> SshSession {
        let started = SystemTime::now();
        let process = Process::spawn(&mut self.ssh(CLOCK)).expect("start ssh (openssh-client)");
        let mut session = SshSession { process };
        session.clock_after(started, SESSION_START);
        session
    }
}

/// A running ssh session (see [`SshClient::session`]); killed on drop.
pub struct SshSession {
    process: Process,
}

/// How an ssh session ended.
#[derive(Debug)]
pub struct Ended {
    pub status: ExitStatus,
    pub message: String,
}

impl SshSession {
    /// Waits up to `within` for a remote clock reading taken at or after
    /// `at`, and returns it: the session was alive then. Panics if none
    /// comes, or if the session has ended.
    pub fn clock_after(&mut self, at: SystemTime, within: Duration) -> SystemTime {
        let deadline = Instant::now() + within;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.process.stdout.next(wait) {
                Ok(line) => {
                    let seconds: f64 = line
                        .trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("unexpected session output {line:?}"));
                    let clock = UNIX_EPOCH + Duration::from_secs_f64(seconds);
                    if clock >= at {
                        return clock;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("the ssh session printed nothing for {within:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let ended = self.ended(Duration::from_secs(5));
                    panic!("the ssh session ended: {ended:?}")
                }
            }
        }
    }

    /// How the session ended, if ssh exits within `within`.
    pub fn ended(&mut self, within: Duration) -> Option<Ended> {
        let status = self.process.wait_timeout(within)?;
        let message = self.process.stderr.rest(Duration::from_secs(1)).join("\n");
        Some(Ended { status, message })
    }
}
