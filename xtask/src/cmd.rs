//! Helpers for spawning child processes with a consistent environment.

use std::{
    env,
    ffi::{OsStr, OsString},
    fmt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context, Result};

/// A child process that ran but exited unsuccessfully; `main` turns `code` into our own.
#[derive(Debug)]
pub(crate) struct Failed {
    pub what: String,
    pub code: Option<i32>,
    /// The end of the captured output, for commands run by [`run_quiet`].
    pub tail: Option<String>,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "`{}` failed with exit code {code}", self.what)?,
            None => write!(f, "`{}` was killed by a signal", self.what)?,
        }
        if let Some(tail) = &self.tail {
            write!(f, "; its output ended with:\n{tail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Failed {}

/// The workspace root, so cargo commands behave the same from any directory.
pub(crate) fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// `$CARGO_HOME`, defaulting to `~/.cargo` like cargo itself.
pub(crate) fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .filter(|h| !h.is_empty())
        .map_or_else(
            || PathBuf::from(env::var_os("HOME").unwrap_or_default()).join(".cargo"),
            PathBuf::from,
        )
}

/// PATH with `$CARGO_HOME/bin` prepended when missing: `cargo install` puts bpf-linker
/// there and aya-build finds it only through PATH, but CI shells and sudo often drop it.
fn path_with_cargo_bin() -> OsString {
    let bin = cargo_home().join("bin");
    let current = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&current).collect();
    if !dirs.contains(&bin) {
        dirs.insert(0, bin);
    }
    env::join_paths(dirs).unwrap_or(current)
}

/// A `Command` whose program lookup and environment use the augmented PATH.
pub(crate) fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("PATH", path_with_cargo_bin());
    cmd
}

/// `cargo` in the workspace root; `$CARGO` is the cargo that launched us, so nested
/// builds use the same toolchain.
pub(crate) fn cargo() -> Command {
    let mut cmd = command(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` with inherited stdio; a non-zero exit becomes a [`Failed`] error.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{what}`"))?;
    if status.success() {
        Ok(())
    } else {
        Err(Failed {
            what,
            code: status.code(),
            tail: None,
        }
        .into())
    }
}

/// Runs `cmd` and returns its output whatever the exit status (the caller decides).
pub(crate) fn output(cmd: &mut Command) -> Result<Output> {
    let what = describe(cmd);
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{what}`"))
}

/// Runs a noisy installer with its output captured, shown only if it fails, so that
/// bootstrap prints one line per step.
pub(crate) fn run_quiet(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    let out = output(cmd)?;
    if out.status.success() {
        return Ok(());
    }
    // The tail holds the actual error; a full cargo build log would bury it.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    Err(Failed {
        what,
        code: out.status.code(),
        tail: Some(tail),
    }
    .into())
}
