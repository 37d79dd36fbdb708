//! `cargo xtask bootstrap`: makes a fresh machine of the project's kind ready.
//!
//! Every step checks first and stays silent when already satisfied, so running it
//! before every task costs well under a second; a step prints one line only when it
//! installs something.

use std::{
    collections::HashSet,
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::cmd::{self, command};

/// Tools and headers the agent, the tests and the demo need from Debian.
const DEBIAN_PACKAGES: &[&str] = &[
    "xdp-tools",
    "bpftool",
    "nftables",
    "conntrack",
    "libnftnl-dev",
    "libmnl-dev",
    "openssh-server",
    "openssh-client",
    "socat",
    "protobuf-compiler",
    "libprotobuf-dev",
    "iproute2",
    "pkg-config",
    "iperf3",
    // The live benchmark: GRO on the receiving veth, TSO off on the sending
    // one; iptables is one of its contenders.
    "ethtool",
    "iptables",
    // libfaketime: the clock tests step the agent's wall clock alone.
    "faketime",
    // systemd-socket-activate, to pass the API socket as systemd does.
    "systemd",
    // A stock TLS 1.2 client, which the mutual-TLS listener must refuse.
    "openssl",
    // `cargo xtask dist`: dpkg-shlibdeps (the package's library dependencies)
    // and strip; man, to read the packaged man pages in the tests.
    "dpkg-dev",
    "binutils",
    "man-db",
    // setpriv: the unit tests call the agent as an unprivileged user.
    "util-linux",
    // Fleet mode: the tests run a real etcd cluster and set it up with etcdctl.
    "etcd-server",
    "etcd-client",
];

/// Python modules of the stock gRPC client the end-to-end tests drive the agent
/// with (module name, `PyPI` package).
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("grpc", "grpcio"),
    ("grpc_reflection", "grpcio-reflection"),
    ("grpc_health", "grpcio-health-checking"),
];

/// aya-build links the XDP program with this exact bpf-linker.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Runs every step; returns whether anything had to be installed or mounted.
pub(crate) fn run() -> Result<bool> {
    ensure_root()?;
    // Non-short-circuiting `|` so every step runs.
    Ok(debian_packages()? | python_packages()? | nightly_components()? | bpf_linker()? | bpffs()?)
}

fn ensure_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "bootstrap must run as root: it installs Debian packages and mounts bpffs, \
             and the tests load XDP programs"
        );
    }
    Ok(())
}

fn debian_packages() -> Result<bool> {
    let missing = missing_debian_packages()?;
    if missing.is_empty() {
        return Ok(false);
    }
    println!(
        "bootstrap: installing Debian packages: {}",
        missing.join(" ")
    );
    // Only refresh the index when we actually install: it is the slow part.
    cmd::run_quiet(apt_get().args(["update", "-qq"]))?;
    cmd::run_quiet(
        apt_get()
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )?;
    let still = missing_debian_packages()?;
    if !still.is_empty() {
        bail!("apt-get did not install: {}", still.join(" "));
    }
    Ok(true)
}

/// Installs the Python modules that `python3` cannot import, with pip.
fn python_packages() -> Result<bool> {
    let importable = |module: &str| {
        cmd::output(command("python3").args(["-c", &format!("import {module}")]))
            .is_ok_and(|out| out.status.success())
    };
    let missing: Vec<&str> = PYTHON_PACKAGES
        .iter()
        .filter(|(module, _)| !importable(module))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    println!(
        "bootstrap: installing Python packages: {}",
        missing.join(" ")
    );
    cmd::run_quiet(
        command("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&missing),
    )?;
    if let Some((module, package)) = PYTHON_PACKAGES.iter().find(|(m, _)| !importable(m)) {
        bail!("pip installed {package} but python3 still cannot import {module}");
    }
    Ok(true)
}

fn apt_get() -> std::process::Command {
    let mut cmd = command("apt-get");
    // CI has no terminal: never let debconf ask a question.
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

fn missing_debian_packages() -> Result<Vec<&'static str>> {
    // One dpkg-query for all packages keeps the no-op path fast. It exits non-zero when
    // a package is unknown to dpkg, but still lists the known ones, so ignore the status.
    let out = cmd::output(
        command("dpkg-query")
            .args(["-W", "-f=${Package}\t${Status}\n"])
            .args(DEBIAN_PACKAGES),
    )
    .context("dpkg-query is needed: bootstrap supports Debian-based machines only")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed: HashSet<&str> = stdout
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(_, status)| *status == "install ok installed")
        .map(|(pkg, _)| pkg)
        .collect();
    Ok(DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !installed.contains(pkg))
        .collect())
}

/// `-Z build-std=core` for the bpfel target needs the nightly toolchain's
/// sources; `cargo xtask test` runs the nightly clippy on the XDP program.
fn nightly_components() -> Result<bool> {
    let out = cmd::output(command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !out.status.success() {
        bail!(
            "the nightly toolchain is missing; it builds the XDP program and is preinstalled \
             on this kind of machine (it cannot be downloaded here): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let listed = String::from_utf8_lossy(&out.stdout);
    let installed = |component: &str| {
        listed.lines().any(|line| {
            line.split_whitespace()
                .next()
                .is_some_and(|name| name == component || name.starts_with(&format!("{component}-")))
        })
    };
    let mut added = false;
    for component in ["rust-src", "clippy"] {
        if installed(component) {
            continue;
        }
        println!("bootstrap: adding {component} to the nightly toolchain");
        cmd::run_quiet(command("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            "nightly",
        ]))?;
        added = true;
    }
    Ok(added)
}

/// The bpf-linker on PATH (which includes `$CARGO_HOME/bin`) reports the wanted
/// version. Running it, rather than asking cargo what it installed, also catches a
/// binary whose libLLVM has gone away (its rpath points at a folder that may vanish,
/// or at a nightly toolchain that was replaced).
fn bpf_linker_ok() -> bool {
    cmd::output(command("bpf-linker").arg("--version")).is_ok_and(|out| {
        out.status.success()
            && String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .any(|word| word == BPF_LINKER_VERSION)
    })
}

fn bpf_linker() -> Result<bool> {
    if bpf_linker_ok() {
        return Ok(false);
    }
    // Debian's LLVM is too old, so link against the libLLVM inside the nightly toolchain.
    let (lib, major) = nightly_libllvm()?;
    // bpf-linker records `<prefix>/lib` as its rpath, so the prefix must outlive the
    // build: keep it in CARGO_HOME next to the binary, not in a target dir or /tmp.
    let prefix = cmd::cargo_home().join("jit-gate-llvm");
    let lib_dir = prefix.join("lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    // `libLLVM.so` is what the linker looks for at build time; the binary then loads
    // the library by its soname (the real file's name) from the rpath, so link both.
    let soname = lib.file_name().context("libLLVM path has no file name")?;
    for name in [Path::new("libLLVM.so"), Path::new(soname)] {
        let link = lib_dir.join(name);
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing stale {}", link.display()))?;
        }
        symlink(&lib, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), lib.display()))?;
    }

    println!(
        "bootstrap: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} (about a minute)"
    );
    let feature = format!("llvm-{major}");
    let install = |locked: bool| {
        let mut cargo = cmd::cargo();
        cargo
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            // --force: a broken copy of the same version is still "installed" to cargo.
            .args(["--force", "--no-default-features", "--features", &feature]);
        if locked {
            cargo.arg("--locked");
        }
        cmd::run_quiet(&mut cargo)
    };
    // --locked pins the dependencies bpf-linker was released with; it fails if the
    // crate ships no lockfile, so fall back to a fresh resolution.
    install(true).or_else(|_| install(false))?;
    if !bpf_linker_ok() {
        bail!(
            "bpf-linker was installed into {} but `bpf-linker --version` still does not report \
             {BPF_LINKER_VERSION}; is another bpf-linker earlier in PATH?",
            cmd::cargo_home().join("bin").display()
        );
    }
    Ok(true)
}

/// Finds `<nightly sysroot>/lib/libLLVM.so.<ver>` and its major version.
///
/// The real shared object is named `libLLVM.so.22.1-rust-…`; the similarly named
/// `libLLVM-22-rust-….so` is only a linker script, so it must not be picked.
fn nightly_libllvm() -> Result<(PathBuf, u32)> {
    let out = cmd::output(command("rustc").args(["+nightly", "--print", "sysroot"]))?;
    if !out.status.success() {
        bail!(
            "`rustc +nightly --print sysroot` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let lib_dir = Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("lib");
    let entries =
        fs::read_dir(&lib_dir).with_context(|| format!("listing {}", lib_dir.display()))?;
    for entry in entries {
        let name = entry?.file_name();
        let Some(version) = name.to_str().and_then(|n| n.strip_prefix("libLLVM.so.")) else {
            continue;
        };
        let major = version
            .split(['.', '-'])
            .next()
            .and_then(|m| m.parse().ok())
            .with_context(|| format!("no LLVM major version in {name:?}"))?;
        return Ok((lib_dir.join(&name), major));
    }
    bail!("no libLLVM.so.* in {}", lib_dir.display())
}

/// Pinned maps and links live on bpffs; a fresh machine may not have it mounted.
fn bpffs() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
    });
    if mounted {
        return Ok(false);
    }
    println!("bootstrap: mounting bpffs at /sys/fs/bpf");
    cmd::run_quiet(command("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    Ok(true)
}
