//! Skipped tests, made visible. A test that lacks something this machine
//! does not have (root, QEMU, DPDK, hugepages) passes without running, and
//! cargo shows nothing of a passing test's output: so a skip is written
//! straight to stderr (not through `eprintln!`, which the test harness
//! captures) and, when `$ZC_SKIP_LOG` names a file, appended to it as one
//! line. `scripts/test.sh` sets it, lists the skips at the end and fails
//! on any. The zc-host and zc test harnesses both include this file.

use std::io::Write;

/// Records that the running test is skipped because of `why`.
pub fn skipped(why: &str) {
    let exe = std::env::current_exe().ok();
    // target/<profile>/deps/host_cluster-0123abcd: the test binary's name.
    let binary = exe
        .as_deref()
        .and_then(|p| p.file_stem())
        .and_then(|s| s.to_str())
        .map_or("?", |s| s.rsplit_once('-').map_or(s, |(name, _)| name))
        .to_string();
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    let line = format!("{binary}::{test}: {why}");
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {line} (set CI=1 to make this a failure)"
    );
    if let Some(log) = std::env::var_os("ZC_SKIP_LOG") {
        // One write of one line in append mode: lines of tests running at
        // the same time do not mix.
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log)
            .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
        if let Err(e) = appended {
            panic!("cannot record the skip in ZC_SKIP_LOG={log:?}: {e}");
        }
    }
}
