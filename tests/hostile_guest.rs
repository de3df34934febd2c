//! A guest that keeps rewriting the buffers it handed over (and the pool
//! header), against the same export code a VM's driver talks to, run over
//! the vhost-user socket without a VM. Inside one cluster it can change
//! what a consumer reads; zcount --verify must count that, and the daemon,
//! the cluster's other exports and new host processes must be unaffected.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(120);

/// The test-only hostile guest (examples/hostile_guest.rs).
fn hostile_guest() -> PathBuf {
    let p = bin_dir().join("examples").join("hostile_guest");
    assert!(
        p.exists(),
        "{} is missing: build every target first (cargo build --workspace --all-targets)",
        p.display()
    );
    p
}

/// A child process that is killed if the test fails before it is waited
/// for (a hostile guest left behind keeps a core busy).
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(mut c: Command) -> Running {
    Running(Some(
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ))
}

fn success(what: &str, mut child: Running) -> serde_json::Value {
    let out = wait_output(child.0.take().unwrap(), TIMEOUT);
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&out)
}

fn wait_connected(d: &Daemon, sock: &Path, connected: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while (export_named(d, sock).dev.connected != 0) != connected {
        assert!(
            Instant::now() < deadline,
            "export {} connected: {} (want {connected})",
            sock.display(),
            export_named(d, sock).dev.connected
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn rewritten_buffers_are_counted_and_nothing_else_is_affected() {
    let dir = tempfile::tempdir().unwrap();
    let (bad, good) = (dir.path().join("bad.sock"), dir.path().join("good.sock"));
    // The hostile guest sends into queue 1; a well-behaved one receives
    // queue 2, on another export of the same cluster.
    let bad_export = format!("{},tx=1", bad.display());
    let good_export = format!("{},rx=2", good.display());
    let d = Daemon::start_in(
        unique_cluster(),
        dir,
        &[
            "-q",
            "4",
            "--buffers",
            "16384",
            "--no-hugepages",
            "--export",
            &bad_export,
            "--export",
            &good_export,
        ],
    );
    let spare = d.info().spare_buffers;
    let (n_bad, n_good, len) = (50_000u64, 20_000u64, 200u64);

    let mut guest = d.tool("zcount");
    guest
        .args([
            "-i",
            &d.name(2),
            "-n",
            &n_good.to_string(),
            "--verify",
            "--json",
        ])
        .args(["--wait", "20", "--vhost-user"])
        .arg(&good);
    let guest = spawn(guest);
    wait_connected(&d, &good, true);

    let mut host_count = d.tool("zcount");
    host_count.args([
        "-i",
        &d.name(1),
        "-n",
        &n_bad.to_string(),
        "--verify",
        "--json",
    ]);
    let host_count = spawn(host_count);
    let mut hostile = Command::new(hostile_guest());
    hostile
        .env("ZC_RUN_DIR", d.run_dir.path())
        .args([
            "-i",
            &d.name(1),
            "-n",
            &n_bad.to_string(),
            "-l",
            &len.to_string(),
        ])
        .arg("--header")
        .arg("--vhost-user")
        .arg(&bad);
    let hostile = spawn(hostile);
    // The good export's traffic runs while the hostile guest does.
    let mut send = d.tool("zsend");
    send.args([
        "-i",
        &d.name(2),
        "-n",
        &n_good.to_string(),
        "-l",
        &len.to_string(),
    ])
    .args(["-r", "10000", "--json"]);
    let sent = success("host zsend", spawn(send));
    assert_eq!(sent["packets"], n_good, "{sent}");

    let h = success("hostile guest", hostile);
    assert_eq!(h["packets"], n_bad, "{h}");
    assert!(h["rewrites"].as_u64().unwrap() >= n_bad, "{h}");
    // Every packet arrives (lengths travel in the host's rings, which the
    // guest cannot reach); the rewritten payloads are counted, no crash.
    let c = success("host zcount of the hostile guest's queue", host_count);
    assert_eq!(c["packets"], n_bad, "{c}");
    assert_eq!(c["bytes"], n_bad * len, "{c}");
    assert!(
        c["checksum_errors"].as_u64().unwrap() > 0,
        "rewritten buffers must be counted: {c}"
    );
    // The other export: every packet, untouched (its buffers circulate
    // between its own guest and queue, never through the hostile one's).
    let g = success("well-behaved guest zcount", guest);
    assert_eq!(g["packets"], n_good, "{g}");
    assert_eq!(g["bytes"], n_good * len, "{g}");
    assert_eq!(g["seq_errors"], 0, "{g}");
    assert_eq!(g["checksum_errors"], 0, "{g}");

    // The daemon serves on: both exports are there and clean, and a new
    // host process attaches although the pool header is scribbled.
    for sock in [&bad, &good] {
        wait_connected(&d, sock, false);
        let e = export_named(&d, sock);
        assert_eq!(e.rx.invalid_desc + e.tx.invalid_desc, 0, "{e:?}");
    }
    let e = export_named(&d, &bad);
    assert_eq!(e.tx.packets, n_bad, "{e:?}");
    let mut magic = [0u8; 8];
    std::io::Read::read_exact(
        &mut std::fs::File::open(&d.info().pool_path).unwrap(),
        &mut magic,
    )
    .unwrap();
    assert_ne!(
        &magic, b"ZCPOOL\0\0",
        "the hostile guest rewrote the header"
    );
    let mut count = d.tool("zcount");
    count.args(["-i", &d.name(0), "-n", "1000", "--verify", "--json"]);
    let count = spawn(count);
    let mut send = d.tool("zsend");
    send.args(["-i", &d.name(0), "-n", "1000", "-l", "300"]);
    let out = wait_output(spawn(send).0.take().unwrap(), TIMEOUT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = success("host zcount after", count);
    assert_eq!(v["packets"], 1000, "{v}");
    assert_eq!(v["checksum_errors"], 0, "{v}");
    // Every buffer is back where it started.
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.info().spare_buffers != spare {
        assert!(
            Instant::now() < deadline,
            "{} spare buffers, {spare} at the start",
            d.info().spare_buffers
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
