//! The packages `cargo xtask dist` builds (`cargo xtask test` builds them
//! from the tests' binaries first): what they hold, binaries that run from
//! an unpacked tree with the shipped configuration, and a real `dpkg`
//! install, removal and purge on this machine.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use jit_gate_tests::{agent::workspace_binary, env::require_root};

const DIST_DIR_VAR: &str = "JIT_GATE_DIST_DIR";
const PACKAGE: &str = "jit-gate";
const CONFFILE: &str = "/etc/jit-gate/agent.toml";

/// Files the package must install.
const FILES: [&str; 13] = [
    "/usr/bin/jit-gate-agent",
    "/usr/bin/jit-gate",
    "/lib/systemd/system/jit-gate-agent.service",
    "/lib/systemd/system/jit-gate-agent.socket",
    CONFFILE,
    "/usr/share/man/man1/jit-gate-agent.1.gz",
    "/usr/share/man/man1/jit-gate.1.gz",
    "/usr/share/man/man1/jit-gate-request.1.gz",
    "/usr/share/bash-completion/completions/jit-gate",
    "/usr/share/bash-completion/completions/jit-gate-agent",
    "/usr/share/zsh/vendor-completions/_jit-gate",
    "/usr/share/fish/vendor_completions.d/jit-gate-agent.fish",
    "/usr/share/doc/jit-gate/copyright",
];

/// The .deb and the tarball `cargo xtask test` built.
fn packages() -> (PathBuf, PathBuf) {
    let dir = std::env::var_os(DIST_DIR_VAR).unwrap_or_else(|| {
        panic!(
            "{DIST_DIR_VAR} is unset: run through `cargo xtask test`, which builds the packages first (or `cargo xtask dist --dev` and set it to target/dist-test)"
        )
    });
    let find = |suffix: &str| -> PathBuf {
        std::fs::read_dir(&dir)
            .expect("dist directory")
            .map(|e| e.expect("entry").path())
            .find(|p| p.to_string_lossy().ends_with(suffix))
            .unwrap_or_else(|| panic!("no *{suffix} in {}", Path::new(&dir).display()))
    };
    (find(".deb"), find(".tar.gz"))
}

fn run(command: &mut Command) -> Output {
    let out = command.output().expect("run command");
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(command: &mut Command) -> String {
    String::from_utf8(run(command).stdout).expect("utf-8 output")
}

fn version_of(binary: &Path) -> String {
    text(Command::new(binary).arg("--version"))
        .trim()
        .to_owned()
}

/// The binaries of a tree rooted at `root` run, report the workspace's
/// versions, accept the shipped configuration, and the bash completions
/// parse.
fn check_tree(root: &Path, what: &str) {
    for file in FILES {
        assert!(root.join(&file[1..]).is_file(), "{what}: {file} missing");
    }
    for binary in ["jit-gate-agent", "jit-gate"] {
        assert_eq!(
            version_of(&root.join("usr/bin").join(binary)),
            version_of(&workspace_binary(binary)),
            "{what}: {binary} --version"
        );
        run(Command::new("bash").arg("-n").arg(
            root.join("usr/share/bash-completion/completions")
                .join(binary),
        ));
    }
    let config = root.join(&CONFFILE[1..]);
    let checked = text(
        Command::new(root.join("usr/bin/jit-gate-agent"))
            .arg("--config")
            .arg(&config)
            .arg("check-config"),
    );
    assert!(checked.contains("valid"), "{what}: {checked}");
    let manual = text(
        Command::new("man")
            .arg("-l")
            .arg(root.join("usr/share/man/man1/jit-gate.1.gz"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80"),
    );
    assert!(manual.contains("jit-gate"), "{what}: man page: {manual}");
}

#[test]
fn the_package_declares_its_contents_dependencies_and_conffile() {
    let (deb, _) = packages();
    let field = |name: &str| text(Command::new("dpkg-deb").args(["-f"]).arg(&deb).arg(name));
    assert_eq!(field("Package").trim(), PACKAGE);
    let depends = field("Depends");
    // libnftnl11 pulls libmnl0, which the agent links through it only.
    for library in ["libc6", "libnftnl11"] {
        assert!(depends.contains(library), "Depends: {depends}");
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(dir.path()));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("conffiles")).expect("conffiles"),
        format!("{CONFFILE}\n")
    );
    // The package never starts or enables the service.
    let postinst = std::fs::read_to_string(dir.path().join("postinst")).expect("postinst");
    assert!(
        !postinst.contains("enable") && !postinst.contains(" start"),
        "{postinst}"
    );
}

#[test]
fn binaries_run_from_the_unpacked_deb_and_tarball() {
    let (deb, tarball) = packages();
    let from_deb = tempfile::tempdir().expect("temporary directory");
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(from_deb.path()));
    check_tree(from_deb.path(), "unpacked .deb");
    let from_tar = tempfile::tempdir().expect("temporary directory");
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(from_tar.path()));
    check_tree(from_tar.path(), "unpacked tarball");
}

#[test]
fn dpkg_installs_removes_and_purges_the_package() {
    require_root();
    let (deb, _) = packages();
    let status = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .expect("dpkg-query");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        !status.contains("installed") && !status.contains("config-files"),
        "{PACKAGE} is already on this machine ({status}): this test installs and removes it, so it needs a machine without it"
    );
    for file in FILES {
        assert!(
            !Path::new(file).exists(),
            "{file} exists before the install"
        );
    }
    let installed = Cleanup;
    run(Command::new("dpkg").arg("-i").arg(&deb));
    check_tree(Path::new("/"), "installed");
    // The installed unit, with its real paths, verifies clean.
    let verify = run(Command::new("systemd-analyze").args([
        "verify",
        "--man=no",
        "/lib/systemd/system/jit-gate-agent.service",
    ]));
    assert!(
        verify.stderr.is_empty(),
        "verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    run(Command::new("dpkg").args(["-r", PACKAGE]));
    for file in FILES.iter().filter(|f| **f != CONFFILE) {
        assert!(!Path::new(file).exists(), "{file} left after dpkg -r");
    }
    assert!(
        Path::new(CONFFILE).is_file(),
        "dpkg -r removed the conffile"
    );
    run(Command::new("dpkg").args(["--purge", PACKAGE]));
    assert!(
        !Path::new(CONFFILE).exists(),
        "the conffile survived the purge"
    );
    assert!(
        !Path::new("/etc/jit-gate").exists(),
        "/etc/jit-gate survived the purge"
    );
    drop(installed);
}

/// Purges the package if a check failed half-way.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
    }
}
