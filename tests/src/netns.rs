//! Network namespaces joined by a veth pair, created per test with unique
//! names and deleted on drop (also when the test panics).
//!
//! Addresses come from the documentation ranges (192.0.2.0/24,
//! `2001:db8::/64`), and live only inside these namespaces.

use std::{
    ffi::OsStr,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    process::Command,
};

use crate::env::{require_root, unique_name};

/// Runs `ip` with `args`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    run("ip", args);
}

/// Runs `program` with `args`, panicking with its stderr on failure; returns its stdout.
pub(crate) fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("running `{program}` (missing? `cargo xtask bootstrap` installs it): {e}")
        });
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of the test's own.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        require_root();
        let ns = Netns {
            name: unique_name(prefix),
        };
        ip(&["netns", "add", &ns.name]);
        ns.exec_ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip` inside the namespace.
    pub fn exec_ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// Runs `program` inside the namespace (`ip netns exec`); returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `f` on a thread that has entered the namespace. Sockets created
    /// there stay in the namespace after `f` returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    enter(&self.name);
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// `program` to be run in the named namespace through `nsenter`, which
/// (unlike `ip netns exec`) keeps the host's /sys, so /sys/fs/bpf stays
/// visible; nsenter execs the program, so the child's pid is the program's.
pub fn nsenter(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(program);
    command
}

/// Moves the calling thread into the named namespace.
pub fn enter(name: &str) {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: a valid namespace fd; setns changes only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub const GATED_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const GATED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The client's main addresses.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// Second client addresses, outside the prefixes the CIDR tests grant
/// (192.0.2.0/25 and `2001:db8::/112`).
pub const CLIENT_V4_OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 130);
pub const CLIENT_V6_OUTSIDE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, 2);

/// Two namespaces: `gated` (where the gate and the servers run) and
/// `client`, joined by a veth pair.
pub struct Topology {
    pub gated: Netns,
    pub client: Netns,
    /// The gated namespace's end of the veth pair, where XDP attaches.
    pub gated_if: String,
    /// The client namespace's end of the veth pair.
    pub client_if: String,
}

impl Topology {
    pub fn new() -> Self {
        let gated = Netns::new("jgg");
        let client = Netns::new("jgc");
        let gated_if = unique_name("vg");
        let client_if = unique_name("vc");
        ip(&[
            "link", "add", &gated_if, "type", "veth", "peer", "name", &client_if,
        ]);
        ip(&["link", "set", &gated_if, "netns", &gated.name]);
        ip(&["link", "set", &client_if, "netns", &client.name]);
        let addr = |ns: &Netns, ifname: &str, a: IpAddr, len: u8| {
            let cidr = format!("{a}/{len}");
            let mut args = vec!["addr", "add", &cidr, "dev", ifname];
            if a.is_ipv6() {
                args.push("nodad");
            }
            ns.exec_ip(&args);
        };
        addr(&gated, &gated_if, GATED_V4.into(), 24);
        addr(&gated, &gated_if, GATED_V6.into(), 64);
        for a in [CLIENT_V4, CLIENT_V4_OUTSIDE] {
            addr(&client, &client_if, a.into(), 24);
        }
        for a in [CLIENT_V6, CLIENT_V6_OUTSIDE] {
            addr(&client, &client_if, a.into(), 64);
        }
        gated.exec_ip(&["link", "set", &gated_if, "up"]);
        client.exec_ip(&["link", "set", &client_if, "up"]);
        Topology {
            gated,
            client,
            gated_if,
            client_if,
        }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}
