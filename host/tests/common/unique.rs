//! Cluster ids and names no other test process on this machine uses while
//! this one runs, so that two test runs at once (two engineers, two
//! `scripts/test.sh`) never meet on a cluster, its pool or its lock. The
//! zc-host and zc test harnesses both include this file.

use std::sync::atomic::{AtomicU32, Ordering};

/// A cluster id of this test process: 2^31 + pid * 256 + n. Linux pids are
/// below 2^22 (PID_MAX_LIMIT), so the ids of two live processes differ.
pub fn cluster() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(n < 256, "one test process may use at most 256 clusters");
    (1 << 31) + (std::process::id() << 8) + n
}

/// `prefix` made unique to this test process (e.g. DPDK's --file-prefix,
/// which names its hugepage files and run directory).
pub fn name(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id())
}

/// Removes what DPDK run with `--file-prefix prefix` left after its
/// process ended: its hugepage files (their pages stay reserved until they
/// are deleted) and its run directory. A prefix of [`name`] is never used
/// again, so no later DPDK run cleans them up.
pub fn remove_dpdk_files(prefix: &str) {
    let map = format!("{prefix}map_");
    if let Ok(dir) = std::fs::read_dir("/dev/hugepages") {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&map) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{prefix}"));
}
