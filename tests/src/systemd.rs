//! A private systemd for tests of the shipped units: the service manager
//! runs as PID 1 of new PID, mount, UTS and cgroup namespaces, in cgroups of
//! its own below the test's (it never touches the machine's cgroup roots),
//! with a private /run and a unit directory of the test's. Units run under
//! their real sandbox settings; systemctl reaches the manager via nsenter.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::env::{require_root, unique_name};

/// How long the manager may take to answer systemctl after it starts.
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

/// Mounts the cgroup hierarchies below the test's own cgroups, gives the
/// manager a fresh /run (keeping /run/netns, so units can join the test's
/// namespaces) and starts systemd with the test's units only.
const BOOT: &str = r#"set -eu
while read -r sub mountpoint; do mount --bind "$sub" "$mountpoint"; done < "$DIR/cgroups"
mkdir -p "$DIR/netns"
mount --rbind /run/netns "$DIR/netns"
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/netns
mount --rbind "$DIR/netns" /run/netns
exec env -i container=jit-gate-test SYSTEMD_UNIT_PATH="$DIR/units" \
    /lib/systemd/systemd --system --unit=jit-gate-test.target --log-target=console --show-status=no
"#;

/// The manager's own target and the ones units name by default.
const STUB_TARGETS: [&str; 9] = [
    "jit-gate-test.target",
    "sysinit.target",
    "basic.target",
    "sockets.target",
    "shutdown.target",
    "network-online.target",
    "network.target",
    "multi-user.target",
    "slices.target",
];

pub struct PrivateSystemd {
    launcher: Child,
    /// The manager's pid as the test sees it.
    pub pid: i32,
    pub dir: PathBuf,
    cgroups: Vec<PathBuf>,
}

impl PrivateSystemd {
    /// Boots a manager whose unit directory holds `units` (file name, text);
    /// nothing is started but an empty target.
    pub fn boot(dir: &Path, units: &[(&str, String)]) -> Self {
        require_root();
        let unit_dir = dir.join("units");
        std::fs::create_dir_all(&unit_dir).expect("unit directory");
        // The targets units depend on by default, empty: nothing of the
        // machine's boot runs in this manager.
        for target in STUB_TARGETS {
            std::fs::write(unit_dir.join(target), "[Unit]\nDescription=test stub\n")
                .expect("write target");
        }
        for (name, text) in units {
            let path = unit_dir.join(name);
            std::fs::create_dir_all(path.parent().expect("unit parent")).expect("drop-in dir");
            std::fs::write(path, text).expect("write unit");
        }
        let cgroups = own_cgroups(&unique_name("jit-gate-systemd-"));
        let lines = cgroups
            .iter()
            .fold(String::new(), |mut lines, (sub, mountpoint)| {
                let _ = writeln!(lines, "{} {}", sub.display(), mountpoint.display());
                lines
            });
        std::fs::write(dir.join("cgroups"), lines).expect("write cgroup list");
        let mut launcher = Command::new("unshare");
        launcher
            .args([
                "--cgroup",
                "--pid",
                "--fork",
                "--mount",
                "--uts",
                "--mount-proc",
            ])
            .args(["--propagation", "private", "sh", "-c", BOOT])
            .env("DIR", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("systemd.log")).expect("log file"));
        // Enter the new cgroups before the cgroup namespace is made, so
        // that they are its root.
        let procs: Vec<PathBuf> = cgroups
            .iter()
            .map(|(sub, _)| sub.join("cgroup.procs"))
            .collect();
        // SAFETY: the closure writes files only (no allocation-dependent
        // locks held across fork in this single call path).
        unsafe {
            use std::os::unix::process::CommandExt as _;
            launcher.pre_exec(move || {
                for procs in &procs {
                    std::fs::write(procs, b"0")?;
                }
                Ok(())
            });
        }
        let launcher = launcher.spawn().expect("start unshare (util-linux)");
        let mut manager = PrivateSystemd {
            pid: 0,
            launcher,
            dir: dir.to_owned(),
            cgroups: cgroups.into_iter().map(|(sub, _)| sub).collect(),
        };
        manager.pid = manager.wait_for_manager();
        manager
    }

    /// The manager's pid once it answers systemctl.
    fn wait_for_manager(&mut self) -> i32 {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(status) = self.launcher.try_wait().expect("launcher status") {
                panic!("systemd exited with {status}:\n{}", self.log());
            }
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.launcher.id()))
                    .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                let pid: i32 = pid.parse().expect("pid");
                self.pid = pid;
                if self.systemctl(&["show", "-p", "Version"]).status.success()
                    && std::fs::read_link(format!("/proc/{pid}/exe"))
                        .is_ok_and(|exe| exe.ends_with("systemd"))
                {
                    return pid;
                }
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not answer within {BOOT_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("systemd.log")).unwrap_or_default()
    }

    /// `systemctl <args>` against this manager.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        self.inside("systemctl")
            .args(["--no-pager", "--no-ask-password"])
            .args(args)
            .output()
            .expect("run systemctl")
    }

    /// `systemctl <args>`, which must succeed.
    pub fn systemctl_ok(&self, args: &[&str]) -> String {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl {args:?}: {}{}\nmanager log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `program` run in the manager's mount and PID namespaces (where its
    /// /run is).
    pub fn inside(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg("-t")
            .arg(self.pid.to_string())
            .args(["-m", "-p", "--"])
            .arg(program);
        command
    }

    /// A path of the manager's mount namespace, as the test (root) reaches it.
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.pid))
    }
}

impl Drop for PrivateSystemd {
    fn drop(&mut self) {
        // Killing PID 1 of the namespace ends every process in it.
        if self.pid > 0 {
            // SAFETY: kill on the manager this test started.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
        for cgroup in &self.cgroups {
            remove_cgroup(cgroup);
        }
    }
}

/// For each cgroup hierarchy the test belongs to: a new child of the
/// test's cgroup in it, and the hierarchy's mount point.
fn own_cgroups(name: &str) -> Vec<(PathBuf, PathBuf)> {
    let memberships = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        // ... mountpoint (field 5) ... - fstype source superoptions
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mountpoint = left.split(' ').nth(4).unwrap_or_default();
        let mut right = right.split(' ');
        let fstype = right.next().unwrap_or_default();
        let options = right.nth(1).unwrap_or_default();
        let controllers: Vec<&str> = options
            .split(',')
            .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains("relatime"))
            .collect();
        let path = memberships.lines().find_map(|m| {
            let mut parts = m.splitn(3, ':');
            let (_, listed, path) = (parts.next()?, parts.next()?, parts.next()?);
            let matches = match fstype {
                "cgroup2" => listed.is_empty(),
                "cgroup" => {
                    !listed.is_empty() && listed.split(',').all(|c| controllers.contains(&c))
                }
                _ => false,
            };
            matches.then_some(path)
        });
        if let Some(path) = path {
            let sub = Path::new(mountpoint)
                .join(path.trim_start_matches('/'))
                .join(name);
            std::fs::create_dir(&sub)
                .unwrap_or_else(|e| panic!("creating cgroup {}: {e}", sub.display()));
            // A cpuset cgroup takes no process before it has CPUs and nodes.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = std::fs::read_to_string(sub.parent().expect("parent").join(file))
                {
                    std::fs::write(sub.join(file), value.trim())
                        .unwrap_or_else(|e| panic!("{file} of {}: {e}", sub.display()));
                }
            }
            found.push((sub, PathBuf::from(mountpoint)));
        }
    }
    assert!(!found.is_empty(), "no cgroup hierarchy mounted");
    found
}

/// Removes a cgroup and the ones the manager made below it, deepest first
/// (their processes are gone once the namespace's PID 1 is).
fn remove_cgroup(cgroup: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while cgroup.exists() {
        let mut dirs = Vec::new();
        collect_dirs(cgroup, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            let _ = std::fs::remove_dir(dir);
        }
        if Instant::now() > deadline {
            eprintln!("cgroup {} still busy; left behind", cgroup.display());
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), out);
        }
    }
}
