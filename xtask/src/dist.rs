//! `cargo xtask dist`: a Debian package and a tarball for the host
//! architecture, built with Debian's own tools (dpkg-deb, dpkg-shlibdeps,
//! tar): both binaries in /usr/bin (the XDP program is inside the agent, so
//! a host needs no Rust toolchain), the systemd units, the default
//! configuration (a conffile), man pages and shell completions for both
//! binaries. The tarball holds the same tree, rooted at `/`.

use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail, ensure};

use crate::cmd::{self, cargo, command, workspace_root};

/// The package's name (one package for the agent and the CLI).
const PACKAGE: &str = "jit-gate";
const BINARIES: [&str; 2] = ["jit-gate-agent", "jit-gate"];
const UNITS: [&str; 2] = ["jit-gate-agent.service", "jit-gate-agent.socket"];
const CONFIG: &str = "etc/jit-gate/agent.toml";
/// Where the packages of the debug build go (`--dev`, `cargo xtask test`).
pub(crate) const TEST_DIR: &str = "target/dist-test";
/// Tells the package tests where `cargo xtask test` put the packages.
pub(crate) const DIST_DIR_VAR: &str = "JIT_GATE_DIST_DIR";
/// Where the binaries write their man pages and completions.
const DOCS_VAR: &str = "JIT_GATE_WRITE_DOCS";
/// Completion files as each binary writes them, and where Debian's shells
/// look for them.
const COMPLETIONS: [(&str, &str, &str); 3] = [
    (
        "bash",
        "{}.bash",
        "usr/share/bash-completion/completions/{}",
    ),
    ("zsh", "_{}", "usr/share/zsh/vendor-completions/_{}"),
    (
        "fish",
        "{}.fish",
        "usr/share/fish/vendor_completions.d/{}.fish",
    ),
];

/// Installed by the package; never starts or enables the service (an
/// operator first sets the interfaces and the policy), only tells a running
/// systemd about the units and restarts an agent already running on upgrade.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    if [ -n "$2" ]; then
        systemctl try-restart jit-gate-agent.service || true
    fi
fi
"#;

/// Removal stops the agent (its binary goes); enforcement stays in place,
/// as with every stop: `jit-gate-agent remove` first takes the gate away.
const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop jit-gate-agent.service jit-gate-agent.socket || true
fi
"#;

const POSTRM: &str = "#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
";

/// Which build goes in: release for distribution, dev for the tests (the
/// same tree, built once with the tests' binaries, uncompressed).
#[derive(Clone, Copy)]
pub(crate) enum Profile {
    Release,
    Dev,
}

impl Profile {
    fn target_dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Dev => "debug",
        }
    }
}

/// Builds the binaries and writes the .deb and the tarball into `out`;
/// returns their paths.
pub(crate) fn run(profile: Profile, out: &Path) -> Result<[PathBuf; 2]> {
    let mut build = cargo();
    build.args(["build", "-p", "jit-gate-agent", "--bins"]);
    if let Profile::Release = profile {
        build.arg("--release");
    }
    cmd::run(&mut build)?;
    let bin_dir = workspace_root().join("target").join(profile.target_dir());
    let version = version(&bin_dir.join("jit-gate-agent"))?;
    let arch = stdout(command("dpkg").arg("--print-architecture"))?;
    let stage = out.join("stage");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }
    fs::create_dir_all(&stage)?;
    stage_tree(&stage, &bin_dir)?;
    let deb = out.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    let tarball = out.join(format!("{PACKAGE}-{version}-{arch}.tar.gz"));
    // The tarball first: it holds the tree without the package's metadata.
    cmd::run(
        command("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .args(["--mtime=@0", "-C"])
            .arg(&stage)
            .arg("-czf")
            .arg(&tarball)
            .args(["etc", "lib", "usr"]),
    )?;
    write_debian_metadata(&stage, &bin_dir, &version, &arch)?;
    let compression = match profile {
        Profile::Release => "-Zxz",
        Profile::Dev => "-Znone",
    };
    cmd::run(
        command("dpkg-deb")
            .args(["--root-owner-group", compression, "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    println!("dist: {}\ndist: {}", deb.display(), tarball.display());
    Ok([deb, tarball])
}

/// The version the agent binary reports (`jit-gate-agent 0.1.0`).
fn version(agent: &Path) -> Result<String> {
    let text = stdout(command(agent).arg("--version"))?;
    text.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("no version in {text:?}"))
}

fn stdout(command: &mut std::process::Command) -> Result<String> {
    let out = cmd::output(command)?;
    ensure!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// The installed tree: binaries (stripped), units, configuration, man
/// pages (compressed, as Debian ships them), completions, copyright.
fn stage_tree(stage: &Path, bin_dir: &Path) -> Result<()> {
    let dist = workspace_root().join("dist");
    let docs = stage.join("docs");
    for binary in BINARIES {
        let to = stage.join("usr/bin").join(binary);
        install(&bin_dir.join(binary), &to, 0o755)?;
        cmd::run(command("strip").arg("--strip-debug").arg(&to))?;
        cmd::run(command(&to).env(DOCS_VAR, &docs))?;
        for (shell, written, installed) in COMPLETIONS {
            install(
                &docs
                    .join("completions")
                    .join(shell)
                    .join(written.replace("{}", binary)),
                &stage.join(installed.replace("{}", binary)),
                0o644,
            )?;
        }
    }
    for unit in UNITS {
        install(
            &dist.join(unit),
            &stage.join("lib/systemd/system").join(unit),
            0o644,
        )?;
    }
    install(&dist.join("agent.toml"), &stage.join(CONFIG), 0o600)?;
    fs::set_permissions(
        stage.join("etc/jit-gate"),
        fs::Permissions::from_mode(0o700),
    )?;
    let man = stage.join("usr/share/man/man1");
    fs::create_dir_all(&man)?;
    for page in fs::read_dir(docs.join("man1"))? {
        let page = page?.path();
        let name = page.file_name().context("page name")?;
        install(&page, &man.join(name), 0o644)?;
    }
    cmd::run(
        command("gzip").args(["-9n"]).args(
            fs::read_dir(&man)?
                .map(|p| p.map(|p| p.path()))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    )?;
    fs::remove_dir_all(&docs)?;
    let doc = stage.join("usr/share/doc").join(PACKAGE);
    fs::create_dir_all(&doc)?;
    fs::write(
        doc.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: jit-gate\n\nFiles: *\nLicense: Apache-2.0\n \
         On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.\n",
    )?;
    install(
        &workspace_root().join("README.md"),
        &doc.join("README.md"),
        0o644,
    )?;
    Ok(())
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(to.parent().context("no parent")?)?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// DEBIAN/: control (dependencies from dpkg-shlibdeps), conffiles and the
/// maintainer scripts.
fn write_debian_metadata(stage: &Path, bin_dir: &Path, version: &str, arch: &str) -> Result<()> {
    let depends = shared_library_depends(bin_dir)?;
    let installed_kib = du_kib(stage)?;
    let meta = stage.join("DEBIAN");
    fs::create_dir_all(&meta)?;
    let mut control = String::new();
    write!(
        control,
        "Package: {PACKAGE}\nVersion: {version}\nArchitecture: {arch}\n\
         Maintainer: jit-gate maintainers <jit-gate@localhost>\nSection: net\nPriority: optional\n\
         Installed-Size: {installed_kib}\nDepends: {depends}\nHomepage: https://github.com/jit-gate/jit-gate\n\
         Description: just-in-time access gate for management ports\n \
         An XDP program and nftables rules keep management ports (SSH, RDP, WinRM)\n \
         closed; the agent opens them for one source for a bounded time when a\n \
         broker or an operator asks, and audits every change. The package does\n \
         not start the agent: set the interfaces and the policy in\n \
         /etc/jit-gate/agent.toml, then enable jit-gate-agent.socket and .service.\n"
    )?;
    fs::write(meta.join("control"), control)?;
    fs::write(meta.join("conffiles"), format!("/{CONFIG}\n"))?;
    for (name, text) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        fs::write(meta.join(name), text)?;
        fs::set_permissions(meta.join(name), fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// The packages of the shared libraries the binaries link (libc6,
/// libnftnl11, libmnl0, …) with minimum versions, as dpkg-shlibdeps
/// computes them from the libraries' symbols files.
fn shared_library_depends(bin_dir: &Path) -> Result<String> {
    let work = tempfile_dir()?;
    fs::create_dir_all(work.join("debian"))?;
    fs::write(
        work.join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
    )?;
    let mut shlibdeps = command("dpkg-shlibdeps");
    shlibdeps.current_dir(&work).arg("-O");
    for binary in BINARIES {
        shlibdeps.arg(format!("-e{}", bin_dir.join(binary).display()));
    }
    let text = stdout(&mut shlibdeps)?;
    fs::remove_dir_all(&work)?;
    let Some(depends) = text.lines().find_map(|l| l.strip_prefix("shlibs:Depends=")) else {
        bail!("dpkg-shlibdeps printed no shlibs:Depends: {text}");
    };
    Ok(depends.to_owned())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = workspace_root()
        .join("target")
        .join(format!("dist-shlibdeps-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn du_kib(dir: &Path) -> Result<u64> {
    let text = stdout(command("du").args(["-sk"]).arg(dir))?;
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du printed {text:?}"))
}
