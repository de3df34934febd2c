//! zping and its reflector as real processes: on the host through two
//! cluster queues, and as the guest driver over vhost-user (no VM) through
//! an export to a host reflector. Exact counts, every round trip in its own
//! buffer, and a reflector killed mid-run is lost probes, not a hang. The
//! daemon's own reflector port (`--reflect`, `reflect add|del`) in place of
//! the process, on the host and behind an export.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child killed (if still running) when dropped.
struct Running(Option<Child>);

impl Running {
    fn spawn(mut c: Command) -> Running {
        Running(Some(
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"),
        ))
    }

    fn pid(&self) -> i32 {
        self.0.as_ref().unwrap().id() as i32
    }

    /// Sends `sig` and collects the output.
    fn stop(mut self, sig: i32) -> std::process::Output {
        let c = self.0.take().unwrap();
        // SAFETY: kill on the pid of a child we spawned and have not reaped.
        unsafe { libc::kill(c.id() as i32, sig) };
        wait_output(c, Duration::from_secs(10))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `zping --reflect -i IN -o OUT` (plus `extra`) for daemon `d`.
fn reflector(d: &Daemon, input: u16, output: u16, extra: &[&str]) -> Running {
    let mut c = d.tool("zping");
    c.args([
        "--reflect",
        "-i",
        &d.name(input),
        "-o",
        &d.name(output),
        "--json",
    ])
    .args(extra);
    let r = Running::spawn(c);
    // The reflector holds its roles once it prints nothing but has attached;
    // probes sent before that simply wait in the queue.
    std::thread::sleep(Duration::from_millis(300));
    r
}

/// Runs zping to completion (at most `limit`) and returns its JSON summary.
fn ping(mut c: Command, limit: Duration) -> serde_json::Value {
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zping");
    let out = wait_output(child, limit);
    assert!(
        out.status.success(),
        "zping failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&out)
}

/// Every probe came back, once, in the buffer it left in, within a second.
fn assert_all_back(v: &serde_json::Value, n: u64) {
    for (k, want) in [
        ("sent", n),
        ("received", n),
        ("lost", 0),
        ("late", 0),
        ("duplicates", 0),
        ("bad", 0),
        ("skipped", 0),
        ("same_buffer", n),
    ] {
        assert_eq!(v[k], want, "{k} in {v}");
    }
    let rtt = &v["rtt_ns"];
    let (min, max) = (rtt["min"].as_u64().unwrap(), rtt["max"].as_u64().unwrap());
    assert!(min > 0, "every round trip takes time: {rtt}");
    assert!(
        max < 1_000_000_000,
        "every round trip under a second: {rtt}"
    );
    for p in ["p50", "p90", "p99", "p99.9"] {
        let x = rtt[p].as_u64().unwrap();
        assert!(min <= x && x <= max, "{p} {x} outside {min}..={max}");
    }
    let counted: u64 = v["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let (lo, hi) = (b[0].as_u64().unwrap(), b[1].as_u64().unwrap());
            assert!(
                lo <= hi && hi >= min && lo <= max,
                "bucket {b} outside the range"
            );
            b[2].as_u64().unwrap()
        })
        .sum();
    assert_eq!(counted, n, "the histogram holds every reply");
}

#[test]
fn host_probes_through_a_reflector_come_back_exactly_in_their_own_buffers() {
    let d = Daemon::start(&["-q", "2", "--buffers", "8192", "--no-hugepages"]);
    let r = reflector(&d, 0, 1, &[]);
    const N: u64 = 3000;
    let mut c = d.tool("zping");
    c.args(["-i", &d.name(0), "-o", &d.name(1), "-c", &N.to_string()])
        .args(["-r", "5000", "-l", "64", "--json"]);
    assert_all_back(&ping(c, Duration::from_secs(30)), N);
    // The interrupt path: zping sleeps in the queue's wait between probes.
    let mut c = d.tool("zping");
    c.args(["-i", &d.name(0), "-o", &d.name(1), "-c", "500"])
        .args(["-r", "1000", "-l", "1500", "--sleep", "--json"]);
    let v = ping(c, Duration::from_secs(30));
    assert_all_back(&v, 500);
    assert_eq!(v["len"], 1500);
    let out = r.stop(libc::SIGINT);
    let v = json(&out);
    assert_eq!(v["packets"], N + 500, "the reflector sent back every probe");
    assert_eq!(v["bytes"], N * 64 + 500 * 1500);
    assert_eq!(v["drops"], 0);
}

#[test]
fn a_sleeping_reflector_still_returns_every_probe() {
    let d = Daemon::start(&["-q", "2", "--buffers", "8192", "--no-hugepages"]);
    let _r = reflector(&d, 0, 1, &["--sleep"]);
    let mut c = d.tool("zping");
    c.args(["-i", &d.name(0), "-o", &d.name(1), "-c", "1000"])
        .args(["-r", "2000", "--sleep", "--json"]);
    assert_all_back(&ping(c, Duration::from_secs(30)), 1000);
}

#[test]
fn a_reflector_killed_mid_run_is_lost_probes_not_a_hang() {
    let d = Daemon::start(&["-q", "2", "--buffers", "8192", "--no-hugepages"]);
    let r = reflector(&d, 0, 1, &[]);
    const N: u64 = 8000;
    let mut c = d.tool("zping");
    c.args(["-i", &d.name(0), "-o", &d.name(1), "-c", &N.to_string()])
        .args(["-r", "2000", "--timeout", "0.5", "--json"]);
    let start = Instant::now();
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: kill on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(r.pid(), libc::SIGKILL) };
    // 4 s of probes, then half a second for the last replies; far less
    // than the limit unless zping waits for replies that never come.
    let out = wait_output(child, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let v = json(&out);
    let n = |k: &str| v[k].as_u64().unwrap();
    assert!(n("received") > 0, "probes came back before the kill: {v}");
    assert!(n("lost") > 0, "probes after the kill are lost: {v}");
    assert_eq!(n("received") + n("lost"), n("sent"), "{v}");
    // The queue to the dead reflector filled up: what did not fit was
    // skipped, so the run still ended on time.
    assert!(n("skipped") > 0, "{v}");
    assert_eq!(n("sent") + n("skipped"), N, "{v}");
    assert_eq!(n("received"), n("same_buffer"), "{v}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(" lost)"), "{stderr}");
    assert!(stderr.contains("is the reflector running?"), "{stderr}");
}

#[test]
fn a_host_queue_alone_is_one_way_and_the_error_says_to_add_o() {
    let d = Daemon::start(&["-q", "2", "--buffers", "8192", "--no-hugepages"]);
    let out = d.tool("zping").args(["-i", &d.name(0)]).output().unwrap();
    assert_one_line_error(
        &out,
        &format!(
            "zping: {}: a cluster queue on this host carries one direction; give the queue the replies come back on with -o (e.g. -o {})",
            d.name(0),
            d.name(1)
        ),
    );
    let out = d
        .tool("zping")
        .args(["-i", &d.name(0), "-o", &d.name(1), "-l", "61"])
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        "zping: -l 61 is too short: probes are at least 62 bytes",
    );
}

#[test]
fn guest_driver_zping_over_vhost_user_through_an_export_to_a_host_reflector() {
    let (d, sock) = Daemon::with_vm_export();
    // The export delivers queue 0 to its guest and takes queue 1 from it;
    // the host reflector turns queue 1 back into queue 0.
    let r = reflector(&d, 1, 0, &[]);
    const N: u64 = 3000;
    let mut c = d.tool("zping");
    c.args([
        "-i",
        &d.name(1),
        "-c",
        &N.to_string(),
        "-r",
        "5000",
        "--json",
    ])
    .arg("--vhost-user")
    .arg(&sock);
    let v = ping(c, Duration::from_secs(30));
    assert_all_back(&v, N);
    assert_eq!(v["reply_name"], d.name(1), "one device, both directions");
    let e = export_named(&d, &sock);
    assert_eq!((e.tx.exchanged, e.tx.copied), (N, 0), "{e:?}");
    assert_eq!((e.rx.exchanged, e.rx.copied), (N, 0), "{e:?}");
    drop(r);
    let out = d
        .tool("zping")
        .args(["-i", &d.name(1), "-o", &d.name(0)])
        .arg("--vhost-user")
        .arg(&sock)
        .output()
        .unwrap();
    assert_one_line_error(&out, "-o zc:");
    assert!(String::from_utf8_lossy(&out.stderr).contains("leave out -o"));
}

/// `zc-hostd stats --json` of `d`.
fn stats_json(d: &Daemon) -> serde_json::Value {
    let out = d
        .tool("zc-hostd")
        .args(["-c", &d.id.to_string(), "stats", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&out)
}

/// `zc-hostd -c ID ARGS` against `d`: its stdout, which must be a success.
fn hostd(d: &Daemon, args: &[&str]) -> String {
    let out = d
        .tool("zc-hostd")
        .args(["-c", &d.id.to_string()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn host_probes_through_the_daemons_reflector_port_come_back_exactly() {
    let d = Daemon::start(&[
        "-q",
        "2",
        "--buffers",
        "8192",
        "--no-hugepages",
        "--reflect",
        "in=0,out=1",
    ]);
    assert!(
        d.log_text().contains(&format!(
            "reflector reflect:0 ready: zc:{0}@0 back into zc:{0}@1",
            d.id
        )),
        "{}",
        d.log_text()
    );
    const N: u64 = 3000;
    let mut c = d.tool("zping");
    c.args(["-i", &d.name(0), "-o", &d.name(1), "-c", &N.to_string()])
        .args(["-r", "5000", "-l", "64", "--json"]);
    assert_all_back(&ping(c, Duration::from_secs(30)), N);
    let v = stats_json(&d);
    let r = &v["reflectors"][0];
    assert_eq!(r["name"], "reflect:0", "{v}");
    assert_eq!((r["in"].as_u64(), r["out"].as_u64()), (Some(0), Some(1)));
    assert_eq!(r["reflected"], N, "{r}");
    assert_eq!(r["bytes"], N * 64, "{r}");
    assert_eq!(
        (r["drop_queue_full"].as_u64(), r["drop_runt"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(r["worker"], 0);
    let text = hostd(&d, &["stats"]);
    let want = format!(
        "reflect reflect:0: in zc:{0}@0 out zc:{0}@1 | reflected {N} pkts {1} B | drops: 0 out queue full, 0 runts",
        d.id,
        N * 64
    );
    assert!(text.contains(&want), "{want:?} not in:\n{text}");
    // The queue's consumer role is the port's while it runs.
    let out = d
        .tool("zping")
        .args(["--reflect", "-i", &d.name(0), "-o", &d.name(1)])
        .output()
        .unwrap();
    assert_one_line_error(&out, "is the consumer side of port reflect:0");
    // Removed, its buffers are back; added again, it starts from zero.
    let removed = hostd(&d, &["reflect", "del", "in=0"]);
    let spare = d.info().spare_buffers;
    assert_eq!(
        removed.trim(),
        format!("removed reflect:0; 32 buffers back in the pool ({spare} spare)")
    );
    let added = hostd(&d, &["reflect", "add", "in=0,out=1"]);
    assert!(added.starts_with("added: reflect reflect:0: "), "{added}");
    assert_eq!(d.info().spare_buffers, spare - 32);
    let mut c = d.tool("zping");
    c.args(["-i", &d.name(0), "-o", &d.name(1), "-c", "500"])
        .args(["-r", "5000", "-l", "1500", "--json"]);
    assert_all_back(&ping(c, Duration::from_secs(30)), 500);
    let r = &stats_json(&d)["reflectors"][0];
    assert_eq!(
        (r["reflected"].as_u64(), r["bytes"].as_u64()),
        (Some(500), Some(500 * 1500))
    );
    let out = d
        .tool("zc-hostd")
        .args(["-c", &d.id.to_string(), "reflect", "del", "in=1"])
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        "zc-hostd: error: no reflector consumes queue 1; the reflectors: reflect:0 (in=0,out=1)",
    );
}

#[test]
fn guest_driver_zping_through_an_export_to_the_daemons_reflector_on_the_same_worker() {
    // The bench's layout: guest driver -> export tx=1 -> reflector ->
    // queue 0 -> export rx=0 -> guest driver, no host process in between.
    let (d, sock) = Daemon::with_vm_export_and(&["--reflect", "in=1,out=0"]);
    const N: u64 = 3000;
    let mut c = d.tool("zping");
    c.args([
        "-i",
        &d.name(1),
        "-c",
        &N.to_string(),
        "-r",
        "5000",
        "--json",
    ])
    .arg("--vhost-user")
    .arg(&sock);
    assert_all_back(&ping(c, Duration::from_secs(30)), N);
    let e = export_named(&d, &sock);
    assert_eq!((e.tx.exchanged, e.tx.copied), (N, 0), "{e:?}");
    assert_eq!((e.rx.exchanged, e.rx.copied), (N, 0), "{e:?}");
    let v = stats_json(&d);
    assert_eq!(v["reflectors"][0]["reflected"], N, "{v}");
    assert_eq!(
        (&v["exports"][0]["worker"], &v["reflectors"][0]["worker"]),
        (&serde_json::json!(0), &serde_json::json!(0)),
        "one worker runs both: {v}"
    );
}

#[test]
fn a_bad_reflect_spec_is_one_line_and_no_daemon_starts() {
    let run_dir = tempfile::tempdir().unwrap();
    for (spec, want) in [
        (
            "in=1,out=1",
            "zc-hostd: error: --reflect in=1,out=1: in and out are both queue 1: every reply would come straight back to the reflector; use two queues",
        ),
        ("in=1", "zc-hostd: error: --reflect in=1: needs in=Q (the queue it consumes) and out=Q"),
        ("in=1,out=0,to=2", "zc-hostd: error: --reflect in=1,out=0,to=2: unknown option \"to=2\""),
        ("in=5,out=0", "zc-hostd: error: --reflect in=5,out=0: queue 5 does not exist: cluster "),
    ] {
        let id = unique_cluster();
        let out = std::process::Command::new(bin("zc-hostd"))
            .args(["-c", &id.to_string(), "-q", "2", "--buffers", "8192", "--no-hugepages"])
            .arg("--run-dir")
            .arg(run_dir.path())
            .args(["--reflect", spec])
            .output()
            .unwrap();
        assert_one_line_error(&out, want);
        assert!(
            !run_dir.path().join(id.to_string()).join("ctl").exists(),
            "{spec}: no control socket is left"
        );
    }
}
