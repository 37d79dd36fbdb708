//! The `jit-gate` binary as a new user meets it: mistakes a person makes
//! on the command line are refused with a message saying what to do, before
//! any agent is contacted, and a socket the user may not open names the
//! setting that would let them.

#![allow(
    unused_crate_dependencies,
    reason = "a binary or test links every dependency of its package; the library is where an unused one shows"
)]

use std::{
    os::unix::{fs::PermissionsExt as _, net::UnixListener, process::CommandExt as _},
    path::Path,
    process::{Command, Output},
};

/// The unprivileged user the socket test runs the CLI as.
const NOBODY: u32 = 65534;

fn jit_gate(socket: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_jit-gate"));
    command.arg("--agent").arg(socket).args(args);
    command
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the command, which must fail as a usage error (exit status 2)
/// whose message contains every one of `says`.
fn usage_error(command: &mut Command, says: &[&str]) {
    let out = command.output().expect("run jit-gate");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let text = stderr(&out);
    for needle in says {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
}

#[test]
fn command_line_mistakes_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().expect("temporary directory");
    // No agent listens here: each mistake must be caught before connecting.
    let socket = dir.path().join("none.sock");
    let request = ["request", "22", "--source", "192.0.2.7", "--until"];

    let mut local = request.to_vec();
    local.push("2030-01-31T18:00:00");
    usage_error(
        &mut jit_gate(&socket, &local),
        &["has no time zone", "add Z for UTC or an offset"],
    );
    usage_error(
        &mut jit_gate(&socket, &["--timeout", "0", "status"]),
        &["timeout of 0"],
    );
    usage_error(
        &mut jit_gate(&socket, &["status", "--timeout", "0ms"]),
        &["timeout of 0"],
    );
    usage_error(
        &mut jit_gate(&socket, &["grants", "--agent", "/run/other.sock"]),
        &[
            "unexpected argument '--agent'",
            "hint: --agent is an option of jit-gate itself: give it before the command",
        ],
    );
    usage_error(
        &mut jit_gate(&socket, &["status", "--agents-file", "fleet.txt"]),
        &["hint: --agents-file is an option of jit-gate itself"],
    );
    // Global options work on either side: no hint for those, and no error.
    let out = jit_gate(&socket, &["status", "--json", "--timeout", "1s"])
        .output()
        .expect("run jit-gate");
    assert_eq!(out.status.code(), Some(1), "no agent there: {out:?}");
    assert!(!stderr(&out).contains("hint:"), "{out:?}");
}

#[test]
fn a_user_who_cannot_open_the_socket_is_told_about_socket_group() {
    let dir = tempfile::tempdir().expect("temporary directory");
    // The directory may be entered by anyone, the socket opened by root
    // only: as the agent leaves it without `socket_group`.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the directory");
    let socket = dir.path().join("agent.sock");
    let _listener = UnixListener::bind(&socket).expect("bind the socket");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .expect("chmod the socket");

    let out = jit_gate(&socket, &["status"])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("run jit-gate as nobody");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = stderr(&out);
    for needle in [
        "Permission denied",
        "api.socket_group",
        "api.principals",
        &socket.display().to_string(),
    ] {
        assert!(text.contains(needle), "{needle:?} missing from: {text}");
    }
}
