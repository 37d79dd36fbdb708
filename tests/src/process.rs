//! Long-running child processes (ssh sessions, `jit-gate watch`) whose
//! output is read line by line with timeouts, and which are killed on drop,
//! also when the test panics.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

/// Lines of one output stream, read on a thread of their own so that the
/// caller can wait for the next one with a timeout.
pub struct Lines {
    rx: Receiver<String>,
}

impl Lines {
    fn new(source: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(source).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { rx }
    }

    /// The next line: `Timeout` if none came within `within`,
    /// `Disconnected` once the stream has ended.
    pub fn next(&self, within: Duration) -> Result<String, RecvTimeoutError> {
        self.rx.recv_timeout(within)
    }

    /// What is left of the stream, up to its end or `within`.
    pub fn rest(&self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut lines = Vec::new();
        while let Ok(line) = self.next(deadline.saturating_duration_since(Instant::now())) {
            lines.push(line);
        }
        lines
    }
}

/// A child process with piped stdout and stderr; killed on drop.
pub struct Process {
    child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Process {
    pub fn spawn(command: &mut Command) -> std::io::Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = Lines::new(child.stdout.take().expect("piped stdout"));
        let stderr = Lines::new(child.stderr.take().expect("piped stderr"));
        Ok(Process {
            child,
            stdout,
            stderr,
        })
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on the pid of our own child, which has not been
        // reaped (that takes `&mut self`), so the pid is still ours.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "signal {signal} to pid {}", self.child.id());
    }

    /// Its exit status, if it exits within `within`.
    pub fn wait_timeout(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("child status") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
