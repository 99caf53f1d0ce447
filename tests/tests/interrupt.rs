//! A test process ended by a signal (Ctrl-C in a terminal, SIGTERM from a
//! runner, SIGHUP when its terminal goes) leaves nothing behind: not its
//! namespaces, pins or directories, and none of its child processes.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use overlay_tests::{lab::ChildGuard, require_root, stdout};

/// What the holder said it made.
#[derive(Default, Debug)]
struct Made {
    namespaces: Vec<String>,
    directories: Vec<PathBuf>,
    pids: Vec<i32>,
}

impl Made {
    fn namespace_exists(name: &str) -> bool {
        Path::new("/run/netns").join(name).exists()
    }

    /// Alive, and not a zombie awaiting its parent.
    fn process_runs(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
    }

    fn left(&self) -> Vec<String> {
        let mut left: Vec<String> = self.namespaces.iter().filter(|n| Self::namespace_exists(n)).map(|n| format!("namespace {n}")).collect();
        left.extend(self.directories.iter().filter(|d| d.exists()).map(|d| format!("directory {}", d.display())));
        left.extend(self.pids.iter().filter(|&&p| Self::process_runs(p)).map(|p| format!("process {p}")));
        left
    }
}

/// Removes whatever the holder left, so a failing run of this test does
/// not leave it either.
impl Drop for Made {
    fn drop(&mut self) {
        for &pid in &self.pids {
            // SAFETY: a plain signal; the pid is the holder's child, whose
            // parent is gone, so nothing else reuses it before init reaps.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for name in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
        for dir in &self.directories {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn a_test_process_ended_by_a_signal_leaves_nothing_behind() {
    require_root();
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM"), (libc::SIGHUP, "SIGHUP")] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_overlay-test-holder"));
        command.stdout(Stdio::piped());
        // As from a terminal: a runner in the background (`nohup`, `&` in
        // a script) hands these signals down ignored, and an ignored signal
        // neither ends a process nor lets a handler be installed.
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    libc::signal(signal, libc::SIG_DFL);
                }
                Ok(())
            });
        }
        let mut holder = ChildGuard(command.spawn().expect("starting overlay-test-holder"));
        let mut made = Made::default();
        let mut ready = false;
        for line in BufReader::new(holder.0.stdout.take().expect("the holder's stdout")).lines() {
            let line = line.expect("reading the holder");
            match line.split_once(' ') {
                Some(("netns", ns)) => made.namespaces.push(ns.to_owned()),
                Some(("dir", dir)) => made.directories.push(dir.into()),
                Some(("pid", pid)) => made.pids.push(pid.parse().expect("a pid")),
                _ if line == "ready" => {
                    ready = true;
                    break;
                }
                _ => panic!("the holder said {line:?}"),
            }
        }
        assert!(ready, "the holder ended before it was ready");
        // Control: all of it is there.
        assert!(made.namespaces.iter().all(|n| Made::namespace_exists(n)), "{made:?}");
        assert!(made.directories.iter().all(|d| d.is_dir()), "{made:?}");
        assert!(made.pids.iter().all(|&p| Made::process_runs(p)), "{made:?}");
        assert!(stdout("ip", &["-n", &made.namespaces[0], "link", "show", "hold0"]).contains("hold0"));

        // SAFETY: a plain signal to our own child.
        unsafe { libc::kill(holder.0.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = holder.0.try_wait().expect("waiting for the holder") {
                break status;
            }
            assert!(Instant::now() < deadline, "the holder did not exit within 10 s of {name}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(status.code(), Some(130), "the holder's exit after {name}: {status}");
        // Killed processes are reaped by init, not at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !made.left().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(made.left(), Vec::<String>::new(), "left behind after {name}");
    }
}
