//! A real etcd cluster (Debian's `etcd-server`) for the fleet-mode tests:
//! members in network namespaces of their own on the broker's bridge,
//! clients over TLS with client certificates (the test PKI) and etcd's
//! access control on, set up with `etcdctl` exactly as README "Fleet mode"
//! says; members killed, restarted and cut off; all removed on drop.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use jit_gate_agent::fleet::EtcdOptions;

use crate::{
    env::unique_name,
    fleet::{BROKER_V4, Broker, ClientCert, Pki},
    netns::Netns,
};

pub const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);
/// etcd fsyncs every write: on a loaded two-core machine a call can take
/// seconds.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// The address of member `index`.
pub fn member_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(BROKER_V4) + 100 + index as u32)
}

/// Fails loudly where the Debian packages are missing.
fn require(program: &str) -> PathBuf {
    let path = PathBuf::from("/usr/bin").join(program);
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask bootstrap` installs etcd-server and etcd-client",
        path.display()
    );
    path
}

pub struct Member {
    // Field order is drop order: the process, then its namespace.
    process: Option<Child>,
    pub ns: Netns,
    /// The member's end of its link to the bridge (in `ns`).
    pub interface: String,
    pub name: String,
    pub address: Ipv4Addr,
    /// Kept for the member's life (removed on drop).
    _data: tempfile::TempDir,
    log: PathBuf,
    arguments: Vec<String>,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("https://{}:{CLIENT_PORT}", self.address)
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("etcd log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "/usr/bin/etcd"])
            .args(&self.arguments)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.process = Some(child);
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// Its link to the bridge down (`false`) or up.
    pub fn link(&self, up: bool) {
        self.ns.exec_ip(&[
            "link",
            "set",
            &self.interface,
            if up { "up" } else { "down" },
        ]);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The etcd process's id while it runs (`ip netns exec` execs it).
    pub fn pid(&self) -> Option<i32> {
        self.process.as_ref().map(|child| child.id() as i32)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of `members`, with TLS for clients, client certificates
/// required, and access control on (user `root` from the CA's `root`
/// certificate).
pub struct Cluster {
    pub members: Vec<Member>,
    pub root: ClientCert,
    ca: PathBuf,
    broker_ns: String,
}

impl Cluster {
    pub fn start(broker: &Broker, pki: &Pki, count: usize) -> Cluster {
        require("etcd");
        require("etcdctl");
        let token = unique_name("jgetcd");
        let names: Vec<String> = (0..count).map(|i| format!("m{i}")).collect();
        let initial = names
            .iter()
            .enumerate()
            .map(|(i, name)| format!("{name}=http://{}:{PEER_PORT}", member_address(i)))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (index, name) in names.iter().enumerate() {
            let address = member_address(index);
            let ns = Netns::new("jge");
            let interface = broker.join(&ns, address);
            let cert = pki.server(&format!("etcd-{name}"), address);
            let data = tempfile::tempdir().expect("etcd data directory");
            let log = data.path().join("etcd.log");
            let client_url = format!("https://{address}:{CLIENT_PORT}");
            let peer_url = format!("http://{address}:{PEER_PORT}");
            let arguments = [
                "--name",
                name,
                "--data-dir",
                &data.path().join("data").display().to_string(),
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &initial,
                "--initial-cluster-token",
                &token,
                "--initial-cluster-state",
                "new",
                "--cert-file",
                &cert.certificate.display().to_string(),
                "--key-file",
                &cert.key.display().to_string(),
                "--trusted-ca-file",
                &pki.ca_path().display().to_string(),
                "--client-cert-auth",
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ]
            .map(str::to_owned)
            .to_vec();
            let mut member = Member {
                process: None,
                ns,
                interface,
                name: name.clone(),
                address,
                _data: data,
                log,
                arguments,
            };
            member.start();
            members.push(member);
        }
        let cluster = Cluster {
            members,
            root: pki.client("root"),
            ca: pki.ca_path(),
            broker_ns: broker.ns.name.clone(),
        };
        cluster.wait_healthy();
        // Before access control: the root user and role (README).
        cluster.etcdctl_ok(&[
            "user",
            "add",
            "root",
            "--new-user-password",
            &unique_name("pw"),
        ]);
        cluster.etcdctl_ok(&["user", "grant-role", "root", "root"]);
        cluster.etcdctl_ok(&["auth", "enable"]);
        cluster
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// `etcdctl` in the broker's namespace as `client`.
    pub fn etcdctl_as(&self, client: &ClientCert, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.broker_ns, "/usr/bin/etcdctl"])
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .arg(format!("--cacert={}", self.ca.display()))
            .arg(format!("--cert={}", client.certificate.display()))
            .arg(format!("--key={}", client.key.display()))
            .arg("--command-timeout=5s")
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    /// `etcdctl` as root; panics with its output on failure.
    pub fn etcdctl_ok(&self, args: &[&str]) -> String {
        let out = self.etcdctl_as(&self.root, args);
        assert!(
            out.status.success(),
            "etcdctl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            let out = self.etcdctl_as(&self.root, &["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy within {HEALTHY_WITHIN:?}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.members
                    .iter()
                    .map(Member::log_text)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The index of the member that leads now.
    pub fn leader(&self) -> usize {
        let json = self.etcdctl_ok(&["endpoint", "status", "--write-out=json"]);
        let statuses: serde_json::Value =
            serde_json::from_str(&json).expect("endpoint status JSON");
        let leader = statuses
            .as_array()
            .expect("array")
            .iter()
            .find(|s| s["Status"]["leader"] == s["Status"]["header"]["member_id"])
            .expect("a member leads");
        let endpoint = leader["Endpoint"].as_str().expect("endpoint");
        self.members
            .iter()
            .position(|m| m.endpoint() == endpoint)
            .expect("leader among the members")
    }

    /// Waits until every member answers again (after a restart or link up).
    pub fn wait_all_healthy(&self) {
        self.wait_healthy();
    }

    /// The etcd user and role of agent `host`: read its grants, write its
    /// status, inventory and presence (README "Fleet mode").
    pub fn add_agent_role(&self, host: &str) {
        let role = format!("jit-gate-agent-{host}");
        self.etcdctl_ok(&["role", "add", &role]);
        for (permission, key, prefix) in [
            ("read", format!("/jit-gate/v1/hosts/{host}/grants/"), true),
            ("readwrite", format!("/jit-gate/v1/status/{host}/"), true),
            ("readwrite", format!("/jit-gate/v1/inventory/{host}"), false),
            ("readwrite", format!("/jit-gate/v1/presence/{host}"), false),
        ] {
            let prefix = format!("--prefix={prefix}");
            self.etcdctl_ok(&["role", "grant-permission", &role, permission, &key, &prefix]);
        }
        self.etcdctl_ok(&[
            "user",
            "add",
            host,
            "--new-user-password",
            &unique_name("pw"),
        ]);
        self.etcdctl_ok(&["user", "grant-role", host, &role]);
    }

    /// The etcd user and role of broker `name` (README "Fleet mode").
    pub fn add_broker_role(&self, name: &str) {
        let role = "jit-gate-broker";
        if !self
            .etcdctl_ok(&["role", "list"])
            .lines()
            .any(|l| l == role)
        {
            self.etcdctl_ok(&["role", "add", role]);
            for (permission, key) in [
                ("read", "/jit-gate/v1/inventory/"),
                ("read", "/jit-gate/v1/presence/"),
                ("read", "/jit-gate/v1/status/"),
                ("readwrite", "/jit-gate/v1/hosts/"),
                ("readwrite", "/jit-gate/v1/grants/"),
            ] {
                self.etcdctl_ok(&[
                    "role",
                    "grant-permission",
                    role,
                    permission,
                    key,
                    "--prefix=true",
                ]);
            }
        }
        self.etcdctl_ok(&[
            "user",
            "add",
            name,
            "--new-user-password",
            &unique_name("pw"),
        ]);
        self.etcdctl_ok(&["user", "grant-role", name, role]);
    }

    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// Runs `call` with an etcd client of the library `jit-gate fleet`
    /// uses, connected from namespace `ns` as `client`, on a runtime of its
    /// own there.
    pub fn with_client<T: Send>(
        &self,
        ns: &Netns,
        client: &ClientCert,
        call: impl AsyncFnOnce(&mut etcd_client::Client) -> anyhow::Result<T> + Send,
    ) -> anyhow::Result<T> {
        let options = EtcdOptions::new(
            self.endpoints(),
            Some((&self.ca, &client.certificate, &client.key)),
            CALL_TIMEOUT,
        )?;
        ns.run(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async move {
                    let mut client = options.connect().await?;
                    call(&mut client).await
                })
        })
    }

    /// The `[fleet]` table of agent `host`, labelled `labels`, presenting
    /// `cert` to this cluster.
    pub fn fleet_table(&self, host: &str, labels: &[&str], cert: &ClientCert) -> String {
        format!(
            "[fleet]\nendpoints = {:?}\nhost = \"{host}\"\nlabels = {labels:?}\n\
             timeout = \"2s\"\ntls = {{ ca = {:?}, certificate = {:?}, key = {:?} }}\n",
            self.endpoints(),
            self.ca,
            cert.certificate,
            cert.key
        )
    }
}
