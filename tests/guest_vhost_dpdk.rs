//! The guest driver's vhost-user transport against an independent backend:
//! DPDK testpmd's vhost PMD, in rxonly mode and in macswap mode. DPDK
//! copies (no exchange), so this checks the frontend side alone: memory
//! table (memfd plus the pool file), ring setup, kicks, completions,
//! reconnects. testpmd's own counter must equal what guest-driver zsend
//! sent, exactly, and every zping probe comes back once. The zc-hostd
//! daemon is only there for the pool and its export directory.
//! Needs root, dpdk-testpmd and 128 free 2 MiB hugepages; skips without
//! them unless CI is set.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Testpmd {
    child: std::process::Child,
    log: std::path::PathBuf,
    prefix: String,
}

impl Testpmd {
    /// The last RX-packets figure testpmd printed.
    fn rx_packets(&self) -> u64 {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .rev()
            .filter_map(|l| l.trim().strip_prefix("RX-packets:"))
            .find_map(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        // SAFETY: kill on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        unique::remove_dpdk_files(&self.prefix);
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ready() -> bool {
    require(is_root(), "root (DPDK)")
        && require(
            have("dpdk-testpmd"),
            "dpdk-testpmd (apt-get install dpdk-dev)",
        )
        && require(
            hugetlbfs_mounted() && free_hugepages() >= 128,
            "128 free 2 MiB hugepages on /dev/hugepages",
        )
}

/// One testpmd at a time: of two started at once by these tests, one did
/// not create its socket within 30 s.
fn one_testpmd() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// testpmd with a vhost PMD on `<dir>/dpdk.sock`, forwarding with `fwd`
/// (testpmd's options after `--`), once its socket is there.
fn testpmd(dir: &std::path::Path, fwd: &[&str]) -> (Testpmd, std::path::PathBuf) {
    let sock = dir.join("dpdk.sock");
    let log = dir.join("testpmd.log");
    let prefix = unique::name("zcgt");
    let child = Command::new("dpdk-testpmd")
        .args([
            "--lcores",
            "0@0,1@1",
            "-n",
            "1",
            "--no-pci",
            "--socket-mem",
            "256",
        ])
        .arg("--file-prefix")
        .arg(&prefix)
        .arg("--vdev")
        .arg(format!("net_vhost0,iface={},queues=1", sock.display()))
        .arg("--")
        .args(fwd)
        .args(["--nb-cores", "1", "-a", "--stats-period", "1"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dpdk-testpmd");
    let pmd = Testpmd { child, log, prefix };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "testpmd did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (pmd, sock)
}

#[test]
fn guest_driver_zsend_into_dpdk_vhost_pmd_counts_exactly() {
    if !ready() {
        return;
    }
    let _one = one_testpmd();
    let dir = tempfile::tempdir().unwrap();
    let export = format!("{},rx=0,tx=1", dir.path().join("zc.sock").display());
    let d = Daemon::start(&["--buffers", "8192", "--no-hugepages", "--export", &export]);
    let (pmd, sock) = testpmd(dir.path(), &["--forward-mode=rxonly"]);
    let n = 50_000u64;
    let mut total = 0;
    for len in ["64", "1500"] {
        let out = d
            .tool("zsend")
            .args(["-i", &d.name(1), "-n", &n.to_string(), "-l", len, "--json"])
            .arg("--vhost-user")
            .arg(&sock)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(json(&out)["packets"], n);
        total += n;
        let deadline = Instant::now() + Duration::from_secs(20);
        while pmd.rx_packets() != total {
            assert!(
                Instant::now() < deadline,
                "testpmd counted {} of {total}",
                pmd.rx_packets()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Nothing more arrives later.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(pmd.rx_packets(), total);
}

/// Both directions of one device against DPDK: guest-driver zping, its
/// probes reflected by testpmd's macswap inside the vhost PMD (the latency
/// benchmark's DPDK side). Copies both ways, so no reply comes back in its
/// probe's buffer.
#[test]
fn guest_driver_zping_through_dpdk_macswap_gets_every_reply() {
    if !ready() {
        return;
    }
    let _one = one_testpmd();
    let dir = tempfile::tempdir().unwrap();
    let export = format!("{},rx=0,tx=1", dir.path().join("zc.sock").display());
    let d = Daemon::start(&["--buffers", "8192", "--no-hugepages", "--export", &export]);
    let (pmd, sock) = testpmd(
        dir.path(),
        &["--forward-mode=macswap", "--port-topology=loop"],
    );
    let n = 3000u64;
    let out = d
        .tool("zping")
        .args([
            "-i",
            &d.name(1),
            "-c",
            &n.to_string(),
            "-r",
            "5000",
            "--json",
        ])
        .arg("--vhost-user")
        .arg(&sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    for (k, want) in [
        ("sent", n),
        ("received", n),
        ("lost", 0),
        ("bad", 0),
        ("duplicates", 0),
        ("same_buffer", 0),
    ] {
        assert_eq!(v[k], want, "{k} in {v}");
    }
    assert!(v["rtt_ns"]["min"].as_u64().unwrap() > 0, "{v}");
    drop(pmd);
}
