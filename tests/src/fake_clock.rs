//! A wall clock that tests can step for one process tree only: Debian's
//! libfaketime preloaded into the agent, reading its offset from a control
//! file on every call, with the monotonic and boot clocks left alone. The
//! machine's clock is never touched.

use std::{path::PathBuf, process::Command, time::Duration};

/// Where Debian's `libfaketime` package puts the preload library.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// How far the probed clocks may be apart beyond the offset (the probe
/// reads them one after the other, and the test's own reading is earlier).
const PROBE_SLACK: Duration = Duration::from_secs(2);

/// A control file and the environment that makes a process read its wall
/// clock through it.
pub struct FakeClock {
    dir: tempfile::TempDir,
}

impl FakeClock {
    /// A clock with no offset yet.
    pub fn new() -> Self {
        assert!(
            std::path::Path::new(LIBFAKETIME).is_file(),
            "{LIBFAKETIME} is missing: `cargo xtask bootstrap` installs Debian's faketime package"
        );
        let clock = FakeClock {
            dir: tempfile::tempdir().expect("temporary directory"),
        };
        clock.set_offset_secs(0);
        clock
    }

    fn control(&self) -> PathBuf {
        self.dir.path().join("faketime")
    }

    /// The environment that puts a process on this clock: only
    /// `CLOCK_REALTIME` (and what derives from it) is offset, and the file is
    /// read again on every call, so a step applies at once.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("LD_PRELOAD", LIBFAKETIME.to_owned()),
            (
                "FAKETIME_TIMESTAMP_FILE",
                self.control().display().to_string(),
            ),
            ("FAKETIME_NO_CACHE", "1".to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Steps the wall clock to `seconds` away from the real one (negative:
    /// back). The file is replaced whole, so a reader never sees half of it.
    pub fn set_offset_secs(&self, seconds: i64) {
        let staged = self.dir.path().join("faketime.new");
        std::fs::write(&staged, format!("{seconds:+}\n")).expect("write the faketime file");
        std::fs::rename(&staged, self.control()).expect("replace the faketime file");
    }

    /// Panics unless a process on this clock sees the wall clock `seconds`
    /// off and the monotonic and boot clocks as they are.
    pub fn verify(&self, seconds: i64) {
        let probe = crate::agent::workspace_binary("clock-probe");
        let real = |clock| {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: a valid, writable timespec.
            assert_eq!(unsafe { libc::clock_gettime(clock, &raw mut ts) }, 0);
            i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
        };
        let before = [
            libc::CLOCK_REALTIME,
            libc::CLOCK_MONOTONIC,
            libc::CLOCK_BOOTTIME,
        ]
        .map(real);
        let out = Command::new(&probe)
            .envs(self.env())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", probe.display()));
        assert!(out.status.success(), "{}: {out:?}", probe.display());
        let seen: Vec<i128> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.parse().expect("a clock reading"))
            .collect();
        let offset = i128::from(seconds) * 1_000_000_000;
        for ((name, was), (now, shift)) in ["CLOCK_REALTIME", "CLOCK_MONOTONIC", "CLOCK_BOOTTIME"]
            .iter()
            .zip(before)
            .zip(seen.into_iter().zip([offset, 0, 0]))
        {
            let apart = now - was - shift;
            assert!(
                (0..=PROBE_SLACK.as_nanos() as i128).contains(&apart),
                "{name} under the fake clock is {apart} ns away from the real one plus {shift} ns"
            );
        }
    }
}

impl Default for FakeClock {
    fn default() -> Self {
        Self::new()
    }
}
