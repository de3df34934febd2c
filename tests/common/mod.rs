//! Test harness for the multi-process tests: starts zc-hostd, zsend and
//! zcount as real processes and cleans up after them.
#![allow(dead_code)]

// One copy of these for both harnesses (zc's and zc-host's tests).
#[path = "../../host/tests/common/skip.rs"]
pub mod skip;
#[path = "../../host/tests/common/unique.rs"]
pub mod unique;
pub mod vm;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory holding this build's binaries (target/<profile>).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// A binary of the workspace; zc-hostd belongs to zc-host, so it is only
/// there when the whole workspace was built (`cargo test --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo test --workspace)",
        p.display()
    );
    p
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Skips a test that needs something this machine lacks (visibly, see
/// `skip`), except in CI, where everything the tests need is installed and
/// a skip is a failure.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    assert!(!in_ci(), "CI must provide {what}");
    skip::skipped(&format!("needs {what}"));
    false
}

/// A cluster id no other test process on this machine uses (see `unique`).
pub fn unique_cluster() -> u32 {
    unique::cluster()
}

pub fn free_hugepages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("HugePages_Free:"))
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

pub fn hugetlbfs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.contains(" /dev/hugepages hugetlbfs")))
}

/// A running zc-hostd with its own run directory.
pub struct Daemon {
    pub id: u32,
    pub run_dir: tempfile::TempDir,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `zc-hostd -c <id> <args>` and waits for its control socket.
    pub fn start(args: &[&str]) -> Daemon {
        Self::start_id(unique_cluster(), args)
    }

    pub fn start_id(id: u32, args: &[&str]) -> Daemon {
        let run_dir = tempfile::tempdir().unwrap();
        Self::start_in(id, run_dir, args)
    }

    pub fn start_in(id: u32, run_dir: tempfile::TempDir, args: &[&str]) -> Daemon {
        let log = run_dir.path().join(format!("zc-hostd-{id}.log"));
        let child = Command::new(bin("zc-hostd"))
            .args(["-c", &id.to_string(), "--run-dir"])
            .arg(run_dir.path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn zc-hostd");
        let mut d = Daemon {
            id,
            run_dir,
            child: Some(child),
            log,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log_text().contains(" ready: ") {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("zc-hostd exited with {status}: {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "zc-hostd not ready: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn ctl(&self) -> PathBuf {
        self.run_dir.path().join(self.id.to_string()).join("ctl")
    }

    pub fn name(&self, queue: u16) -> String {
        format!("zc:{}@{queue}", self.id)
    }

    /// A command for a zc tool talking to this daemon.
    pub fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(bin(name));
        c.env("ZC_RUN_DIR", self.run_dir.path());
        c
    }

    /// A daemon (8192 buffers, no hugepages needed) with one export on
    /// `<tmp>/vm.sock`: rx=0 (host to guest), tx=1 (guest to host).
    pub fn with_vm_export() -> (Daemon, PathBuf) {
        Self::with_vm_export_and(&[])
    }

    /// As [`Daemon::with_vm_export`], with more zc-hostd options.
    pub fn with_vm_export_and(extra: &[&str]) -> (Daemon, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vm.sock");
        let export = format!("{},rx=0,tx=1", sock.display());
        let mut args = vec!["--buffers", "8192", "--no-hugepages", "--export", &export];
        args.extend_from_slice(extra);
        let d = Daemon::start_in(unique_cluster(), dir, &args);
        (d, sock)
    }

    /// `zc-hostd --qemu-args SOCKET --vm-mem MEM`, split into arguments:
    /// the QEMU options exactly as the CLI prints them.
    pub fn qemu_args(&self, sock: &Path, mem: &str) -> Vec<String> {
        let out = self
            .tool("zc-hostd")
            .args(["-c", &self.id.to_string(), "--qemu-args"])
            .arg(sock)
            .args(["--vm-mem", mem])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "--qemu-args: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .map(String::from)
            .collect()
    }

    pub fn info(&self) -> zc_host::control::ClusterInfo {
        zc_host::client::cluster_info(self.run_dir.path(), self.id).expect("cluster info")
    }

    /// Sends a signal and waits for the daemon to exit.
    pub fn stop(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, sig) };
        child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: as in stop().
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        // A failed test shows what the daemon saw (its run dir goes away).
        if std::thread::panicking() {
            eprintln!("--- zc-hostd -c {} log ---\n{}", self.id, self.log_text());
        }
        remove_dead_cluster_state(self.id);
    }
}

/// Deletes what a killed daemon of test cluster `id` left in /dev/shm/zc
/// (a daemon stopped by a signal it can handle removes it itself). Only
/// when nobody holds the cluster's lock: a successor started in the same
/// test may still serve it.
fn remove_dead_cluster_state(id: u32) {
    use std::os::fd::AsRawFd;
    let dir = Path::new("/dev/shm/zc").join(id.to_string());
    let Ok(lock) = std::fs::File::open(dir.join("lock")) else {
        return;
    };
    // SAFETY: flock on a descriptor we own; released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A run directory in which the control sockets of all `daemons` are
/// found (each daemon has its own: a link per cluster to its directory),
/// for a tool that opens names of several clusters, such as zbridge.
pub fn shared_run_dir(daemons: &[&Daemon]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for d in daemons {
        let id = d.id.to_string();
        std::os::unix::fs::symlink(d.run_dir.path().join(&id), dir.path().join(&id)).unwrap();
    }
    dir
}

/// Waits until process `pid`'s main thread is blocked in a kernel function
/// whose name contains `what` (`/proc/PID/wchan`: "nanosleep" in a sleep,
/// "futex" in a futex wait): how a test sees that a tool reached a state
/// it prints nothing about. `state` names that state for the failure.
pub fn wait_blocked_in(pid: u32, what: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        if wchan.contains(what) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} never got {state} (blocked in {wchan:?})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads a tool's stderr until a once-a-second `Absolute Stats: N pkts`
/// line has N >= `min`; returns N.
pub fn wait_absolute_stats(stderr: &mut impl std::io::BufRead, min: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut line = String::new();
    loop {
        line.clear();
        let n = stderr.read_line(&mut line).unwrap();
        assert!(n > 0, "the tool exited before counting {min} packets");
        if let Some(pkts) = line
            .strip_prefix("Absolute Stats: ")
            .and_then(|r| r.split(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if pkts >= min {
                return pkts;
            }
        }
        assert!(Instant::now() < deadline, "never {min} packets: {line}");
    }
}

/// Waits for a child with a timeout, killing it if it overruns.
pub fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "process timed out after {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The JSON line a tool printed with --json.
pub fn json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no JSON on stdout; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
}

/// Asserts a failed run printed exactly one line to stderr containing `want`.
pub fn assert_one_line_error(out: &Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(
        lines[0].contains(want),
        "expected {want:?} in: {}",
        lines[0]
    );
}

/// Per-export counters of a running daemon (`zc-hostd stats`).
pub fn export_stats(d: &Daemon) -> Vec<zc_host::stats::ExportStats> {
    use zc_host::control::{Reply, Request};
    let sock = zc_host::client::connect(d.run_dir.path(), d.id).expect("control socket");
    match zc_host::client::call(&sock, &Request::Stats).expect("stats") {
        (Reply::Stats { exports, .. }, _) => exports,
        (r, _) => panic!("unexpected reply {r:?}"),
    }
}

/// The export of `d` whose socket is `path`.
pub fn export_named(d: &Daemon, path: &Path) -> zc_host::stats::ExportStats {
    export_stats(d)
        .into_iter()
        .find(|e| Path::new(&e.path) == path)
        .unwrap_or_else(|| panic!("no export {}", path.display()))
}
