//! zc-hostd, zsend and zcount as separate processes, the way users run them.

mod common;

use common::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(120);

/// zcount -n N --verify and zsend -n N -l LEN; returns zcount's JSON.
fn transfer(d: &Daemon, queue: u16, n: u64, len: usize) -> serde_json::Value {
    let name = d.name(queue);
    let count = d
        .tool("zcount")
        .args(["-i", &name, "-n", &n.to_string(), "--verify", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let send = d
        .tool("zsend")
        .args([
            "-i",
            &name,
            "-n",
            &n.to_string(),
            "-l",
            &len.to_string(),
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sent = wait_output(send, TIMEOUT);
    assert!(
        sent.status.success(),
        "zsend: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    assert_eq!(json(&sent)["packets"], n);
    let counted = wait_output(count, TIMEOUT);
    assert!(
        counted.status.success(),
        "zcount: {}",
        String::from_utf8_lossy(&counted.stderr)
    );
    json(&counted)
}

fn assert_exact(v: &serde_json::Value, n: u64, len: u64) {
    assert_eq!(v["packets"], n, "{v}");
    assert_eq!(v["bytes"], n * len, "{v}");
    assert_eq!(v["seq_errors"], 0, "{v}");
    assert_eq!(v["checksum_errors"], 0, "{v}");
}

#[test]
fn exact_counts_and_clean_payloads_for_64_and_1500_byte_packets() {
    let d = Daemon::start(&["-q", "2", "--buffers", "8192", "--no-hugepages"]);
    assert_exact(&transfer(&d, 0, 300_000, 64), 300_000, 64);
    assert_exact(&transfer(&d, 1, 100_000, 1500), 100_000, 1500);
    // The same queue again: buffers came back, a new pair attaches.
    assert_exact(&transfer(&d, 0, 50_000, 1500), 50_000, 1500);
    assert_eq!(
        d.info().spare_buffers,
        8192 - 2 * 1024,
        "every buffer is back in the spare list"
    );
}

#[test]
fn stats_lines_appear_once_a_second() {
    let d = Daemon::start(&["-q", "1", "--buffers", "4096", "--no-hugepages"]);
    let count = d
        .tool("zcount")
        .args(["-i", &d.name(0), "-t", "2.5"])
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let send = d
        .tool("zsend")
        .args(["-i", &d.name(0), "-r", "1000", "-n", "2000"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = wait_output(count, TIMEOUT);
    wait_output(send, TIMEOUT);
    let err = String::from_utf8_lossy(&out.stderr);
    let absolute = err
        .lines()
        .filter(|l| l.starts_with("Absolute Stats: "))
        .count();
    let actual = err
        .lines()
        .filter(|l| l.starts_with("Actual Stats: ") && l.ends_with(" Gbps"))
        .count();
    assert!(
        absolute >= 3 && actual >= 2,
        "expected per-second stats and a summary:\n{err}"
    );
    assert!(err.contains("====="), "{err}");
}

#[test]
fn hugetlbfs_pool_when_hugepages_are_reserved() {
    if !require(
        is_root() && hugetlbfs_mounted() && free_hugepages() >= 64,
        "root and 64 free hugepages on /dev/hugepages",
    ) {
        return;
    }
    let d = Daemon::start(&["-q", "1", "--buffers", "16384"]);
    let log = d.log_text();
    assert!(!log.contains("warning"), "{log}");
    assert!(log.contains(", hugepages)"), "{log}");
    let pool = format!("/dev/hugepages/zc/{}/pool", d.id);
    assert!(std::path::Path::new(&pool).exists());
    assert_eq!(d.info().pool_path, pool);
    assert!(d.info().hugepages);
    assert_exact(&transfer(&d, 0, 200_000, 64), 200_000, 64);
}

#[test]
fn fallback_pool_warns_once_and_works() {
    let d = Daemon::start(&[
        "-q",
        "1",
        "--buffers",
        "4096",
        "--hugepages",
        "/nonexistent-hugetlbfs",
    ]);
    let log = d.log_text();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("echo") && warnings[0].contains("/proc/sys/vm/nr_hugepages"),
        "{log}"
    );
    assert!(
        warnings[0].contains("/nonexistent-hugetlbfs"),
        "says why: {log}"
    );
    assert_eq!(d.info().pool_path, format!("/dev/shm/zc/{}/pool", d.id));
    assert!(!d.info().hugepages);
    assert_exact(&transfer(&d, 0, 100_000, 64), 100_000, 64);
}

#[test]
fn unknown_cluster_is_a_one_line_error() {
    let run_dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin("zcount"))
        .env("ZC_RUN_DIR", run_dir.path())
        .args(["-i", "zc:4242@0"])
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        "cluster 4242 is not running: no zc-hostd control socket at",
    );
    assert_one_line_error(&out, "(start it with: zc-hostd -c 4242)");
}

#[test]
fn wait_lets_a_tool_start_before_its_cluster_and_says_how_long_it_waited() {
    let out = std::process::Command::new(bin("zcount"))
        .env("ZC_RUN_DIR", tempfile::tempdir().unwrap().path())
        .args(["-i", "zc:4243@0", "--wait", "0.5"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "cluster 4243 is not running: ");
    assert_one_line_error(&out, "(waited 0.5 s for it to appear)");

    let id = unique_cluster();
    let run_dir = tempfile::tempdir().unwrap();
    let zcount = std::process::Command::new(bin("zcount"))
        .env("ZC_RUN_DIR", run_dir.path())
        .args(["-i", &format!("zc:{id}@0"), "--wait", "30", "-n", "500"])
        .args(["--verify", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It tried, found no cluster, and sleeps before trying again.
    wait_blocked_in(zcount.id(), "nanosleep", "to wait for its cluster");
    let d = Daemon::start_in(
        id,
        run_dir,
        &["-q", "1", "--buffers", "4096", "--no-hugepages"],
    );
    let send = d
        .tool("zsend")
        .args(["-i", &d.name(0), "-n", "500"])
        .output()
        .unwrap();
    assert!(send.status.success());
    let out = wait_output(zcount, std::time::Duration::from_secs(30));
    assert_exact(&json(&out), 500, 60);
}

#[test]
fn daemon_killed_hard_is_reported_and_restart_takes_over() {
    let mut d = Daemon::start(&["-q", "1", "--buffers", "4096", "--no-hugepages"]);
    let id = d.id;
    d.stop(libc::SIGKILL);
    assert!(d.ctl().exists(), "a killed daemon leaves its socket behind");
    let out = d
        .tool("zsend")
        .args(["-i", &d.name(0), "-n", "1"])
        .output()
        .unwrap();
    assert_one_line_error(&out, &format!("cluster {id} is not running: "));
    assert_one_line_error(&out, "left over from a zc-hostd that exited");
    // Starting over the stale cluster works and serves traffic.
    let run_dir = std::mem::replace(&mut d.run_dir, tempfile::tempdir().unwrap());
    let d2 = Daemon::start_in(
        id,
        run_dir,
        &["-q", "1", "--buffers", "4096", "--no-hugepages"],
    );
    assert_exact(&transfer(&d2, 0, 10_000, 64), 10_000, 64);
}

#[test]
fn second_daemon_for_a_cluster_names_the_first() {
    let d = Daemon::start(&["-q", "1", "--buffers", "4096", "--no-hugepages"]);
    let out = std::process::Command::new(bin("zc-hostd"))
        .args([
            "-c",
            &d.id.to_string(),
            "--no-hugepages",
            "--buffers",
            "4096",
            "--run-dir",
        ])
        .arg(d.run_dir.path())
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        &format!(
            "cluster {} is already served by zc-hostd (pid {}, run directory {})",
            d.id,
            d.pid(),
            d.run_dir.path().display()
        ),
    );
    // The first daemon is untouched.
    assert_exact(&transfer(&d, 0, 1000, 64), 1000, 64);
}

#[test]
fn queue_out_of_range_is_a_one_line_error() {
    let d = Daemon::start(&["-q", "2", "--buffers", "8192", "--no-hugepages"]);
    let out = d.tool("zcount").args(["-i", &d.name(2)]).output().unwrap();
    assert_one_line_error(
        &out,
        &format!(
            "zc:{}@2: queue 2 does not exist: cluster {} has queues 0..1",
            d.id, d.id
        ),
    );
    let out = d
        .tool("zsend")
        .args(["-i", &d.name(7), "-n", "1"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "queue 7 does not exist");
}

#[test]
fn malformed_names_are_one_line_errors() {
    let out = std::process::Command::new(bin("zcount"))
        .args(["-i", "zc:99"])
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        "'zc:99' has no queue: expected zc:<cluster>@<queue>, e.g. zc:99@0",
    );
    let out = std::process::Command::new(bin("zsend"))
        .args(["-i", "eth0"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "'eth0' is not a zc name");
}

#[test]
fn second_consumer_is_refused_with_the_holders_pid() {
    let d = Daemon::start(&["-q", "1", "--buffers", "4096", "--no-hugepages"]);
    let spare = d.info().spare_buffers;
    // The first ends by itself after the producer's 10: a SIGINT could
    // stop it before it has read them.
    let first = d
        .tool("zcount")
        .args(["-i", &d.name(0), "-n", "10"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first has attached and taken its buffers.
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.info().spare_buffers == spare {
        assert!(Instant::now() < deadline, "first zcount never attached");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = d.tool("zcount").args(["-i", &d.name(0)]).output().unwrap();
    assert_one_line_error(
        &out,
        &format!(
            "queue 0 of cluster {} already has a consumer (pid {})",
            d.id,
            first.id()
        ),
    );
    // A producer on the same queue is fine.
    let sent = d
        .tool("zsend")
        .args(["-i", &d.name(0), "-n", "10"])
        .output()
        .unwrap();
    assert!(sent.status.success());
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Absolute Stats: 10 pkts"));
    // Both are gone: the cluster took every buffer back.
    assert_eq!(d.info().spare_buffers, spare);
}

#[test]
fn packet_length_out_of_range_leaves_nothing_behind() {
    let d = Daemon::start(&["-q", "1", "--buffers", "4096", "--no-hugepages"]);
    let spare = d.info().spare_buffers;
    let out = d
        .tool("zsend")
        .args(["-i", &d.name(0), "-l", "59"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "-l 59 is too short: packets are at least 60 bytes");
    let out = d
        .tool("zsend")
        .args(["-i", &d.name(0), "-l", "1793"])
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        &format!(
            "-l 1793 is too long: zc:{}@0 has 2048-byte buffers, so packets are 60..=1792 bytes",
            d.id
        ),
    );
    assert_eq!(d.info().spare_buffers, spare, "no buffers were taken");
    // The producer role was released: the largest legal length goes through.
    assert_exact(&transfer(&d, 0, 1000, 1792), 1000, 1792);
}

#[test]
fn zcount_killed_mid_stream_is_replaced_and_counting_continues() {
    let d = Daemon::start(&["-q", "1", "--buffers", "4096", "--no-hugepages"]);
    let name = d.name(0);
    let mut send = d
        .tool("zsend")
        .args(["-i", &name, "-r", "200000"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut victim = d
        .tool("zcount")
        .args(["-i", &name, "--verify"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed while packets flow into it: it has counted some already.
    let mut stderr = std::io::BufReader::new(victim.stderr.take().unwrap());
    let counted = wait_absolute_stats(&mut stderr, 1);
    assert!(counted > 0);
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    let out = wait_output(
        d.tool("zcount")
            .args(["-i", &name, "-n", "100000", "--verify", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        TIMEOUT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["packets"], 100_000, "{v}");
    assert_eq!(v["checksum_errors"], 0, "{v}");
    assert_eq!(
        v["seq_errors"], 0,
        "the stream continues where the ring stood: {v}"
    );
    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(send.id() as i32, libc::SIGINT) };
    assert!(send.wait().unwrap().success());
    assert!(d.log_text().lines().all(|l| !l.contains("panic")));
}

/// A view of the pool taken from a queue end may outlive it: the clone
/// keeps the pool mapped. (A copied view, as zcount and zsend made before
/// views became owning, wrote into unmapped memory here.)
#[test]
fn a_pool_view_outlives_its_queue_end() {
    use zc::QueueEnd;
    let d = Daemon::start(&["-q", "1", "--buffers", "4096", "--no-hugepages"]);
    let mut tx = zc_host::client::HostTx::open(d.run_dir.path(), d.id, 0).unwrap();
    let mut bufs = tx.take_buffers(1).unwrap();
    let view = tx.pool().clone();
    drop(tx);
    let msg = b"written after the queue end was dropped";
    view.packet_mut(&mut bufs[0]).fill(msg).unwrap();
    assert_eq!(view.packet(&bufs[0]).to_vec(), msg);
}

#[test]
fn sigint_and_sigterm_remove_the_clusters_files() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut d = Daemon::start(&["-q", "1", "--buffers", "4096", "--no-hugepages"]);
        let pool = std::path::PathBuf::from(d.info().pool_path);
        assert!(pool.exists() && d.ctl().exists());
        let status = d.stop(sig);
        assert!(status.success(), "{status}");
        assert!(!pool.exists(), "pool removed");
        assert!(!d.ctl().exists(), "control socket removed");
        assert!(
            !d.run_dir.path().join(d.id.to_string()).exists(),
            "run directory removed"
        );
        assert!(d.log_text().contains("stopped"), "{}", d.log_text());
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn idle_tools_sleep_instead_of_spinning() {
    let d = Daemon::start(&["-q", "2", "--buffers", "8192", "--no-hugepages"]);
    // A consumer with nothing to read, and a producer whose queue is full.
    let mut count = d
        .tool("zcount")
        .args(["-i", &d.name(0)])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut send = d
        .tool("zsend")
        .args(["-i", &d.name(1), "-n", "5000"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Both asleep on their queues: zsend once its queue is full.
    wait_blocked_in(count.id(), "futex", "idle");
    wait_blocked_in(send.id(), "futex", "blocked on its full queue");
    let (c0, s0, d0) = (
        cpu_seconds(count.id()),
        cpu_seconds(send.id()),
        cpu_seconds(d.pid()),
    );
    std::thread::sleep(Duration::from_secs(2));
    let (c1, s1, d1) = (
        cpu_seconds(count.id()),
        cpu_seconds(send.id()),
        cpu_seconds(d.pid()),
    );
    assert!(
        c1 - c0 < 0.3,
        "idle zcount used {:.2} s of CPU in 2 s",
        c1 - c0
    );
    assert!(
        s1 - s0 < 0.3,
        "blocked zsend used {:.2} s of CPU in 2 s",
        s1 - s0
    );
    assert!(
        d1 - d0 < 0.1,
        "idle zc-hostd used {:.2} s of CPU in 2 s",
        d1 - d0
    );
    // Both wake up and finish when the other side appears.
    let out = wait_output(
        d.tool("zcount")
            .args(["-i", &d.name(1), "-n", "5000", "--verify", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        TIMEOUT,
    );
    assert_exact(&json(&out), 5000, 60);
    assert!(send.wait().unwrap().success());
    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(count.id() as i32, libc::SIGINT) };
    assert!(count.wait().unwrap().success());
}
