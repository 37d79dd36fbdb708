//! Preconditions of the kernel tests. They never skip: if something is
//! missing the test fails and says what.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use jit_gate_agent::enforce::xdp::XdpGate;

/// Panics unless running as root with bpffs mounted.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "kernel tests need root (BPF, network namespaces): run them through `cargo xtask test`, as root"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    assert!(
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("bpf")),
        "bpffs is not mounted: `cargo xtask test` mounts it (mount -t bpf bpf /sys/fs/bpf)"
    );
}

/// A name unique to this process and call, for pins, namespaces and links.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A bpffs pin directory of the test's own, removed (with everything pinned
/// in it, which detaches the program) when dropped.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> Self {
        require_root();
        PinDir {
            path: PathBuf::from("/sys/fs/bpf").join(unique_name("jgt")),
        }
    }

    /// A gate loaded with its maps pinned here.
    pub fn open_gate(&self) -> XdpGate {
        XdpGate::open(&self.path).unwrap_or_else(|e| panic!("loading the XDP program: {e}"))
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = XdpGate::remove(&self.path) {
            eprintln!("cleanup of {}: {e}", self.path.display());
        }
    }
}
