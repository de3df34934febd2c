//! zbridge between two clusters, each served by its own zc-hostd: every
//! packet crosses with exactly one copy, and both pools get every buffer back.

mod common;

use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(120);

fn tool_in(run_dir: &Path, name: &str) -> Command {
    let mut c = Command::new(bin(name));
    c.env("ZC_RUN_DIR", run_dir);
    c
}

fn spawn(mut c: Command) -> Child {
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn success(name: &str, child: Child) -> serde_json::Value {
    let out = wait_output(child, TIMEOUT);
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&out)
}

/// Waits until `d` has `spare` spare buffers again (detaching processes
/// give theirs back as the daemon sees their connections close).
fn wait_spare(d: &Daemon, spare: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.info().spare_buffers != spare {
        assert!(
            Instant::now() < deadline,
            "cluster {}: {} spare buffers, {spare} at the start",
            d.id,
            d.info().spare_buffers
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// zsend N packets of LEN bytes into `a`@3, zbridge them into `b`@0,
/// zcount --verify them there; returns (zbridge's JSON, zcount's JSON).
fn bridge(
    run: &Path,
    a: &Daemon,
    b: &Daemon,
    n: u64,
    len: usize,
) -> (serde_json::Value, serde_json::Value) {
    let (src, dst) = (a.name(3), b.name(0));
    let n_s = n.to_string();
    let mut count = tool_in(run, "zcount");
    count.args(["-i", &dst, "-n", &n_s, "--verify", "--json"]);
    let count = spawn(count);
    let mut zb = tool_in(run, "zbridge");
    zb.args(["-i", &src, "-o", &dst, "-c", &n_s, "--json"]);
    let zb = spawn(zb);
    let mut send = tool_in(run, "zsend");
    send.args(["-i", &src, "-n", &n_s, "-l", &len.to_string(), "--json"]);
    let sent = success("zsend", spawn(send));
    assert_eq!(sent["packets"], n, "{sent}");
    (success("zbridge", zb), success("zcount", count))
}

#[test]
fn packets_cross_with_one_copy_exactly_and_both_pools_get_their_buffers_back() {
    let a = Daemon::start(&["-q", "4", "--buffers", "8192", "--no-hugepages"]);
    let b = Daemon::start(&["-q", "1", "--buffers", "4096", "--no-hugepages"]);
    let (spare_a, spare_b) = (a.info().spare_buffers, b.info().spare_buffers);
    let run = shared_run_dir(&[&a, &b]);
    for (n, len) in [(200_000u64, 64u64), (50_000, 1500)] {
        let (copied, counted) = bridge(run.path(), &a, &b, n, len as usize);
        assert_eq!(copied["input"], a.name(3), "{copied}");
        assert_eq!(copied["output"], b.name(0), "{copied}");
        assert_eq!(copied["packets"], n, "{copied}");
        assert_eq!(copied["bytes"], n * len, "bytes copied: {copied}");
        assert_eq!(copied["drops"], 0, "{copied}");
        assert_eq!(counted["packets"], n, "{counted}");
        assert_eq!(counted["bytes"], n * len, "{counted}");
        // Sequence numbers and payload checksums as zsend wrote them.
        assert_eq!(counted["seq_errors"], 0, "{counted}");
        assert_eq!(counted["checksum_errors"], 0, "{counted}");
        wait_spare(&a, spare_a);
        wait_spare(&b, spare_b);
    }
}

#[test]
fn packets_longer_than_the_destination_buffers_are_dropped_and_counted() {
    let a = Daemon::start(&["-q", "4", "--buffers", "8192", "--no-hugepages"]);
    // 1024-byte buffers hold packets of up to 768 bytes.
    let b = Daemon::start(&[
        "-q",
        "1",
        "--buffers",
        "4096",
        "--buf-size",
        "1024",
        "--no-hugepages",
    ]);
    let run = shared_run_dir(&[&a, &b]);
    let mut zb = tool_in(run.path(), "zbridge");
    zb.args(["-i", &a.name(3), "-o", &b.name(0), "-t", "3", "--json"]);
    let zb = spawn(zb);
    let sent = tool_in(run.path(), "zsend")
        .args(["-i", &a.name(3), "-n", "1000", "-l", "769"])
        .output()
        .unwrap();
    assert!(sent.status.success());
    let v = success("zbridge", zb);
    assert_eq!(v["packets"], 0, "{v}");
    assert_eq!(v["drops"], 1000, "{v}");
}

#[test]
fn bad_names_are_one_line_errors() {
    let a = Daemon::start(&["-q", "1", "--buffers", "4096", "--no-hugepages"]);
    let spare = a.info().spare_buffers;
    let out = a
        .tool("zbridge")
        .args(["-i", &a.name(0), "-o", &a.name(0)])
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        &format!(
            "zbridge: -i and -o are both {}: give two different queues",
            a.name(0)
        ),
    );
    // The destination's cluster is not running: nothing stays attached.
    let missing = unique_cluster();
    let out = a
        .tool("zbridge")
        .args(["-i", &a.name(0), "-o", &format!("zc:{missing}@0")])
        .output()
        .unwrap();
    assert_one_line_error(&out, &format!("cluster {missing} is not running"));
    wait_spare(&a, spare);
}
