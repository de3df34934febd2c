//! The zc tools (zsend, zcount from the `zc` package), DPDK's testpmd and
//! the root/hugepage set-up the system tests need.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// True when the test may run; false (after recording the skip, see
/// `skip`) when it should be skipped. With CI set, a missing requirement
/// fails the test instead.
pub fn require(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but {what} is not available");
    }
    super::skip::skipped(&format!("{what} is not available"));
    false
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// zsend/zcount: release builds (built once per test process).
pub fn tool(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let st = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "-q",
                "-p",
                "zc",
                "--bin",
                "zcount",
                "--bin",
                "zsend",
            ])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("run cargo build for zsend/zcount");
        assert!(st.success(), "building zsend/zcount failed");
    });
    target_dir().join("release").join(name)
}

/// Reserves `pages` 2 MiB hugepages (at least) and mounts /dev/hugepages.
pub fn hugepages(pages: u64) -> bool {
    let total: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if total < pages {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", pages.to_string());
    }
    let _ = std::fs::create_dir_all("/dev/hugepages");
    let mounted = Command::new("mountpoint")
        .args(["-q", "/dev/hugepages"])
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        let _ = Command::new("mount")
            .args(["-t", "hugetlbfs", "nodev", "/dev/hugepages"])
            .status();
    }
    let free: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("HugePages_Free:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    free >= pages / 2
}

/// Parses the last "<key>: <number>" in testpmd's output.
pub fn testpmd_count(out: &str, key: &str) -> Option<u64> {
    out.lines()
        .filter_map(|l| {
            let i = l.find(key)?;
            l[i + key.len()..].split_whitespace().next()?.parse().ok()
        })
        .next_back()
}
