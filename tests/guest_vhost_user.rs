//! The zc guest driver over the vhost-user transport against zc-hostd's
//! export, as separate processes: host zsend -> export -> guest-driver
//! zcount, and guest-driver zsend -> export -> host zcount, with exact
//! counts, clean payloads, and proof that every packet was exchanged, not
//! copied.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

struct Setup {
    d: Daemon,
    sock: PathBuf,
}

/// A daemon with one export: rx=0 (host to guest), tx=1 (guest to host).
fn setup() -> Setup {
    let (d, sock) = Daemon::with_vm_export();
    Setup { d, sock }
}

fn run(mut c: Command) -> std::process::Child {
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn ok_json(out: std::process::Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&out)
}

/// Waits until the export has no frontend (the last one disconnected).
fn wait_disconnected(s: &Setup) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while export_named(&s.d, &s.sock).dev.connected != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "frontend still connected"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Host zsend -> export rx=0 -> guest-driver zcount --verify.
fn host_to_guest(s: &Setup, n: u64, len: usize) -> serde_json::Value {
    let mut count = s.d.tool("zcount");
    count
        .args([
            "-i",
            &s.d.name(0),
            "-n",
            &n.to_string(),
            "--verify",
            "--json",
        ])
        .arg("--vhost-user")
        .arg(&s.sock);
    let count = run(count);
    let mut send = s.d.tool("zsend");
    send.args([
        "-i",
        &s.d.name(0),
        "-n",
        &n.to_string(),
        "-l",
        &len.to_string(),
        "--json",
    ]);
    let sent = ok_json(wait_output(run(send), TIMEOUT), "host zsend");
    assert_eq!(sent["packets"], n);
    let v = ok_json(wait_output(count, TIMEOUT), "guest zcount");
    wait_disconnected(s);
    v
}

/// Guest-driver zsend -> export tx=1 -> host zcount --verify.
fn guest_to_host(s: &Setup, n: u64, len: usize) -> serde_json::Value {
    let mut count = s.d.tool("zcount");
    count.args([
        "-i",
        &s.d.name(1),
        "-n",
        &n.to_string(),
        "--verify",
        "--json",
    ]);
    let count = run(count);
    let mut send = s.d.tool("zsend");
    send.args([
        "-i",
        &s.d.name(1),
        "-n",
        &n.to_string(),
        "-l",
        &len.to_string(),
        "--json",
    ])
    .arg("--vhost-user")
    .arg(&s.sock);
    let sent = ok_json(wait_output(run(send), TIMEOUT), "guest zsend");
    assert_eq!(sent["packets"], n);
    let v = ok_json(wait_output(count, TIMEOUT), "host zcount");
    wait_disconnected(s);
    v
}

fn assert_exact(v: &serde_json::Value, n: u64, len: u64) {
    assert_eq!(v["packets"], n, "{v}");
    assert_eq!(v["bytes"], n * len, "{v}");
    assert_eq!(v["seq_errors"], 0, "{v}");
    assert_eq!(v["checksum_errors"], 0, "{v}");
}

#[test]
fn guest_driver_receives_exactly_and_every_packet_is_exchanged() {
    let s = setup();
    let n = 20_000;
    let mut total = 0;
    for len in [64usize, 1500] {
        let v = host_to_guest(&s, n, len);
        assert_exact(&v, n, len as u64);
        total += n;
        let e = export_named(&s.d, &s.sock);
        assert_eq!(e.rx.packets, total, "{e:?}");
        assert_eq!(e.rx.exchanged, total, "zero-copy path: {e:?}");
        assert_eq!(e.rx.copied, 0, "{e:?}");
        assert_eq!(e.rx.invalid_desc, 0, "{e:?}");
    }
}

#[test]
fn guest_driver_sends_exactly_and_every_packet_is_exchanged() {
    let s = setup();
    let n = 20_000;
    let mut total = 0;
    for len in [64usize, 1500] {
        let v = guest_to_host(&s, n, len);
        assert_exact(&v, n, len as u64);
        total += n;
        let e = export_named(&s.d, &s.sock);
        assert_eq!(e.tx.packets, total, "{e:?}");
        assert_eq!(e.tx.exchanged, total, "zero-copy path: {e:?}");
        assert_eq!(e.tx.copied, 0, "{e:?}");
        assert_eq!(e.tx.invalid_desc + e.tx.drop_bad_len, 0, "{e:?}");
    }
}

#[test]
fn both_directions_in_turn_keep_the_guests_buffers_consistent() {
    // Buffers move between host and guest by exchange; after several
    // reconnects in both directions the stock the host hands the next driver
    // must still be exactly what that guest holds (no invalid descriptors).
    let s = setup();
    for round in 0..3 {
        assert_exact(&host_to_guest(&s, 5_000, 60), 5_000, 60);
        assert_exact(&guest_to_host(&s, 5_000, 60), 5_000, 60);
        let e = export_named(&s.d, &s.sock);
        assert_eq!(
            e.rx.invalid_desc + e.tx.invalid_desc,
            0,
            "round {round}: {e:?}"
        );
        assert_eq!(e.rx.copied + e.tx.copied, 0, "round {round}: {e:?}");
    }
}

#[test]
fn packets_taken_before_the_guest_left_still_reach_the_queue() {
    // With nobody reading queue 1 (64 slots), the export takes 96 packets
    // from the guest: 64 fill the queue, the last 32 wait in the export,
    // already completed to the guest, which then leaves. Those 32 must go
    // out once the queue drains, not wait for the next guest.
    let (d, sock) = Daemon::with_vm_export_and(&["--queue-len", "64"]);
    let s = Setup { d, sock };
    let mut send = s.d.tool("zsend");
    send.args(["-i", &s.d.name(1), "-n", "96", "--json", "--vhost-user"])
        .arg(&s.sock);
    let sent = ok_json(wait_output(run(send), TIMEOUT), "guest zsend");
    assert_eq!(sent["packets"], 96);
    wait_disconnected(&s);
    let mut count = s.d.tool("zcount");
    count.args([
        "-i",
        &s.d.name(1),
        "-n",
        "96",
        "-t",
        "10",
        "--verify",
        "--json",
    ]);
    let v = ok_json(wait_output(run(count), TIMEOUT), "host zcount");
    assert_exact(&v, 96, 60);
}

#[test]
fn wrong_socket_or_queue_is_a_one_line_error() {
    let s = setup();
    // No export delivers queue 2.
    let mut c = s.d.tool("zcount");
    c.args(["-i", &s.d.name(2), "-n", "1"])
        .arg("--vhost-user")
        .arg(&s.sock);
    let out = wait_output(run(c), TIMEOUT);
    assert_one_line_error(&out, "no export for queue 2 (rx=2)");
    // A socket nobody listens on.
    let mut c = s.d.tool("zsend");
    c.args([
        "-i",
        &s.d.name(1),
        "-n",
        "1",
        "--vhost-user",
        "/nonexistent/zc.sock",
    ]);
    let out = wait_output(run(c), TIMEOUT);
    assert_one_line_error(&out, "cannot connect");
    // No pool file for a cluster nobody runs.
    let mut c = Command::new(bin("zcount"));
    c.env("ZC_RUN_DIR", s.d.run_dir.path())
        .args(["-i", "zc:4000000000@0", "--vhost-user"])
        .arg(&s.sock);
    let out = wait_output(run(c), TIMEOUT);
    assert_one_line_error(&out, "--pool PATH");
}

#[test]
fn guest_driver_sends_into_a_sink_export_which_exchanges_every_packet() {
    // An export without tx consumes what its guest sends: each pool buffer
    // is exchanged for an empty one, then dropped. The guest driver reaches
    // it over vhost-user when no export sends into the queue it names; with
    // two sinks, the MAC each socket reports says which one it is.
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("sink.sock");
    let sink2 = dir.path().join("sink2.sock");
    let other = dir.path().join("other.sock");
    let (e_sink, e_sink2, e_other) = (
        format!("{},rx=0", sink.display()),
        format!("{},rx=4,mac=02:00:00:00:00:42", sink2.display()),
        format!("{},rx=1,tx=2", other.display()),
    );
    let d = Daemon::start_in(
        unique_cluster(),
        dir,
        &[
            "-q",
            "5",
            "--buffers",
            "16384",
            "--no-hugepages",
            "--export",
            &e_sink,
            "--export",
            &e_sink2,
            "--export",
            &e_other,
        ],
    );
    let n = 20_000u64;
    let mut total = 0;
    for len in [64usize, 1500] {
        let mut send = d.tool("zsend");
        send.args([
            "-i",
            &d.name(3),
            "-n",
            &n.to_string(),
            "-l",
            &len.to_string(),
        ])
        .arg("--json")
        .arg("--vhost-user")
        .arg(&sink);
        let sent = ok_json(wait_output(run(send), TIMEOUT), "guest zsend into the sink");
        assert_eq!(sent["packets"], n);
        total += n;
        let e = export_named(&d, &sink);
        assert_eq!(
            (e.tx.packets, e.tx.exchanged, e.tx.drop_no_queue),
            (total, total, total),
            "every packet exchanged and dropped: {e:?}"
        );
        assert_eq!(
            e.tx.copied + e.tx.invalid_desc + e.tx.drop_bad_len,
            0,
            "{e:?}"
        );
    }
    assert_eq!(
        export_named(&d, &sink2).tx.packets,
        0,
        "the other sink saw nothing"
    );
    // The other export still refuses what it does not serve: receiving
    // needs an rx queue, and queue 3 has none.
    let mut c = d.tool("zcount");
    c.args(["-i", &d.name(3), "-n", "1", "--vhost-user"])
        .arg(&other);
    let out = wait_output(run(c), TIMEOUT);
    assert_one_line_error(&out, "no export for queue 3 (rx=3)");
    // Queue 2 has an export of its own: a sink's socket is not it, and the
    // error names both MACs.
    let mut c = d.tool("zsend");
    c.args(["-i", &d.name(2), "-n", "1", "--vhost-user"])
        .arg(&sink2);
    let out = wait_output(run(c), TIMEOUT);
    let want = format!(
        "this socket serves the device with MAC 02:00:00:00:00:42, but the export of that queue has MAC {}: use that export's socket",
        export_named(&d, &other).mac
    );
    assert_one_line_error(&out, &want);
    assert_eq!(export_named(&d, &sink2).tx.packets, 0);
}
