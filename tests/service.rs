//! zc-hostd as a systemd service: the template unit passes
//! `systemd-analyze verify`, and under the journal (stderr being the
//! stream JOURNAL_STREAM names, as systemd sets it) every line carries a
//! syslog priority and no timestamp.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !require(have, "systemd-analyze (apt-get install systemd)") {
        return;
    }
    let unit = repo().join("contrib/zc-hostd@.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        text.contains("EnvironmentFile=-/etc/zc/%i.conf")
            && text.contains("ExecStart=/usr/local/bin/zc-hostd -c %i $ZC_HOSTD_OPTS"),
        "instance = cluster id, options from /etc/zc/<cluster>.conf:\n{text}"
    );
    // A root of its own: systemd's units, the unit, and this build's
    // zc-hostd where the unit expects it (verify checks the command).
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["usr/lib/systemd", "usr/local/bin", "etc/systemd/system"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    let st = Command::new("cp")
        .args(["-a", "/lib/systemd/system"])
        .arg(r.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(st.success(), "copy systemd's units");
    std::fs::copy(bin("zc-hostd"), r.join("usr/local/bin/zc-hostd")).unwrap();
    std::fs::copy(&unit, r.join("etc/systemd/system/zc-hostd@.service")).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .arg("zc-hostd@99.service")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    assert!(err.trim().is_empty(), "no warnings: {err}");
}

/// Runs zc-hostd until ready, stops it, returns what it wrote to stderr;
/// with `journal`, JOURNAL_STREAM names that stderr file.
fn run_daemon(journal: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let file = std::fs::File::create(&log).unwrap();
    let m = file.metadata().unwrap();
    let id = unique_cluster();
    let mut cmd = Command::new(bin("zc-hostd"));
    cmd.args(["-c", &id.to_string(), "--run-dir"])
        .arg(dir.path())
        .args(["--no-hugepages", "--buffers", "8192"])
        .stdout(Stdio::null())
        .stderr(file);
    if journal {
        cmd.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
    } else {
        // Another stream's: not this stderr.
        cmd.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino() + 1));
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains(" ready: ")
    {
        assert!(
            Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "zc-hostd not ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(&log).unwrap()
}

#[test]
fn under_the_journal_lines_carry_syslog_priorities_and_no_timestamps() {
    let text = run_daemon(true);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>zc-hostd: warning: pool of ")),
        "the fallback warning at priority 4:\n{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>zc-hostd: cluster ") && l.contains(" ready: ")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<6>zc-hostd: cluster ") && l.contains(" stopped (SIGTERM)")),
        "{text}"
    );
    for l in &lines {
        let p = l.as_bytes();
        assert!(
            p.len() > 3 && p[0] == b'<' && p[1].is_ascii_digit() && p[2] == b'>',
            "every line has a priority: {l:?}"
        );
        assert!(
            !l.contains("[20"),
            "no timestamp (journald adds its own): {l:?}"
        );
    }
    let plain = run_daemon(false);
    assert!(
        plain.lines().all(|l| !l.starts_with('<')),
        "elsewhere no prefixes:\n{plain}"
    );
    assert!(plain.contains("zc-hostd: warning: pool of "), "{plain}");
}
