//! The operator CLI `jit-gate`, run as a process against a test agent's
//! socket: its text for people, its JSON for checks.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;

use crate::agent::{AgentFiles, workspace_binary};

/// `jit-gate --agent <socket>` for one agent.
pub struct Cli {
    socket: PathBuf,
}

impl Cli {
    pub fn new(files: &AgentFiles) -> Self {
        Cli {
            socket: files.socket(),
        }
    }

    /// The command, ready for a subcommand (global options go first).
    pub fn command(&self) -> Command {
        let mut command = Command::new(workspace_binary("jit-gate"));
        command.arg("--agent").arg(&self.socket);
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run jit-gate")
    }

    /// The text output of a command that must succeed.
    pub fn text(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "jit-gate {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 output")
    }

    /// The `result` of `jit-gate --json <args>`, which must succeed on this
    /// one agent.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let rows: Value = serde_json::from_str(&self.text(&full)).expect("JSON output");
        let [row] = rows.as_array().expect("an array of rows").as_slice() else {
            panic!("one row per agent expected: {rows}")
        };
        assert_eq!(row["ok"], true, "{row}");
        row["result"].clone()
    }

    /// The grants `jit-gate grants` lists (with `--all`: ended ones too).
    pub fn grants(&self, all: bool) -> Vec<Value> {
        let args: &[&str] = if all {
            &["grants", "--all"]
        } else {
            &["grants"]
        };
        let result = self.json(args);
        result["grants"].as_array().expect("grants array").clone()
    }

    /// Waits up to `within` until grant `id` is in `state`; returns it.
    pub fn wait_for_state(&self, id: u64, state: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let grants = self.grants(true);
            let grant = grants
                .iter()
                .find(|g| g["id"] == id)
                .unwrap_or_else(|| panic!("grant {id} is not listed: {grants:?}"));
            if grant["state"] == state {
                return grant.clone();
            }
            assert!(
                Instant::now() < deadline,
                "grant {id} is not {state} after {within:?}: {grant}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An RFC 3339 timestamp of the CLI's JSON.
pub fn time(value: &Value) -> SystemTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {value}"));
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("time {text:?}: {e}"))
}
