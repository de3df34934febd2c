//! Exports on a few workers, with real processes: many guest drivers on one
//! daemon, an idle daemon that costs no CPU, and ports moved between
//! workers under traffic without losing or reordering a packet.

mod common;

use common::tools::tool;
use common::Hostd;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// CPU time (user + system, in clock ticks) of every thread of `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the ")" that ends the command name: utime is the 12th,
    // stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as u64
}

/// A zc tool with the daemon's run directory.
fn zc_tool(h: &Hostd, name: &str, args: &[&str]) -> Child {
    Command::new(tool(name))
        .args(args)
        .env("ZC_RUN_DIR", h.run_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` (killing it after `within`) and returns its output.
fn finish(child: Child, within: Duration, what: &str) -> Output {
    let pid = child.id() as i32;
    let t = std::thread::spawn(move || child.wait_with_output().unwrap());
    let deadline = Instant::now() + within;
    while !t.is_finished() {
        if Instant::now() > deadline {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let out = t.join().unwrap();
            panic!(
                "{what} did not finish in {within:?}: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    t.join().unwrap()
}

fn json(out: &Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{what}: {e}: {text}"))
}

/// The daemon's CLI against `h`.
fn hostd_cli(h: &Hostd, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zc-hostd"))
        .args(["-c", &h.cluster.to_string(), "--run-dir"])
        .arg(h.run_dir())
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn sixty_four_guest_drivers_on_two_workers_and_an_idle_daemon_sleeps() {
    const EXPORTS: usize = 64;
    const N: u64 = 2000;
    let socks: Vec<String> = (0..EXPORTS).map(|i| format!("e{i}.sock,rx={i}")).collect();
    let socks: Vec<&str> = socks.iter().map(String::as_str).collect();
    let h = Hostd::start(
        &socks,
        &[
            "-q",
            "64",
            "--queue-len",
            "64",
            "--buffers",
            "32768",
            "--stock",
            "160",
            "--workers",
            "2",
        ],
    );
    let cluster = h.cluster;
    // One container-mode guest driver per export, each on its own socket.
    let counters: Vec<Child> = (0..EXPORTS)
        .map(|i| {
            let sock = h.sock(&format!("e{i}.sock"));
            zc_tool(
                &h,
                "zcount",
                &[
                    "-i",
                    &format!("zc:{cluster}@{i}"),
                    "--vhost-user",
                    sock.to_str().unwrap(),
                    "-n",
                    &N.to_string(),
                    "--verify",
                    "--json",
                ],
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut counters = counters;
    loop {
        let waiting: Vec<usize> = h
            .stats()
            .1
            .iter()
            .enumerate()
            .filter(|(_, e)| e.dev.connected == 0)
            .map(|(i, _)| i)
            .collect();
        if waiting.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let i = waiting[0];
            let c = counters.swap_remove(i);
            let out = finish(c, Duration::from_secs(1), "zcount");
            panic!(
                "{} guest drivers did not connect ({waiting:?}); zcount {i}: {:?} {}",
                waiting.len(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Both workers carry ports (least loaded first: 32 each).
    let (_, exports) = h.stats();
    for w in 0..2 {
        let n = exports.iter().filter(|e| e.worker == Some(w)).count();
        assert_eq!(n, EXPORTS / 2, "worker {w} runs {n} of {EXPORTS} exports");
    }
    // 64 connected devices and no traffic: the daemon sleeps.
    std::thread::sleep(Duration::from_secs(1));
    let t0 = cpu_ticks(h.child.id());
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let used = cpu_ticks(h.child.id()) - t0;
    let limit = start.elapsed().as_secs_f64() * ticks_per_second() as f64 / 100.0;
    assert!(
        (used as f64) < limit,
        "an idle daemon with {EXPORTS} connected exports used {used} ticks in 10 s (limit {limit:.1}, 1% of one core)"
    );
    // Then every guest gets exactly its packets, checked.
    let senders: Vec<Child> = (0..EXPORTS)
        .map(|i| {
            zc_tool(
                &h,
                "zsend",
                &[
                    "-i",
                    &format!("zc:{cluster}@{i}"),
                    "-n",
                    &N.to_string(),
                    "-l",
                    "60",
                ],
            )
        })
        .collect();
    for (i, s) in senders.into_iter().enumerate() {
        let out = finish(s, Duration::from_secs(120), &format!("zsend {i}"));
        assert!(out.status.success(), "zsend {i}: {out:?}");
    }
    for (i, c) in counters.into_iter().enumerate() {
        let j = json(
            &finish(c, Duration::from_secs(120), &format!("zcount {i}")),
            "zcount",
        );
        assert_eq!(j["packets"], N, "export {i}: {j}");
        assert_eq!(j["seq_errors"], 0, "export {i}: {j}");
        assert_eq!(j["checksum_errors"], 0, "export {i}: {j}");
    }
    let (_, exports) = h.stats();
    assert_eq!(
        exports.iter().map(|e| e.rx.packets).sum::<u64>(),
        N * EXPORTS as u64
    );
    assert!(exports
        .iter()
        .all(|e| e.rx.exchanged == N && e.rx.copied == 0));
}

#[test]
fn ports_moved_between_workers_under_traffic_lose_nothing() {
    const N: u64 = 3_000_000;
    let h = Hostd::start(&["in.sock,rx=0", "out.sock,tx=1"], &["--workers", "2"]);
    let cluster = h.cluster;
    let run = |args: &[&str]| {
        let out = hostd_cli(&h, args);
        assert!(
            out.status.success(),
            "zc-hostd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let sock = |n: &str| h.sock(n).to_str().unwrap().to_string();
    // Host -> export in.sock -> guest driver, and guest driver -> export
    // out.sock -> host, both checked packet by packet.
    let guest_rx = zc_tool(
        &h,
        "zcount",
        &[
            "-i",
            &format!("zc:{cluster}@0"),
            "--vhost-user",
            &sock("in.sock"),
            "-n",
            &N.to_string(),
            "--verify",
            "--json",
        ],
    );
    let host_rx = zc_tool(
        &h,
        "zcount",
        &[
            "-i",
            &format!("zc:{cluster}@1"),
            "-n",
            &N.to_string(),
            "--verify",
            "--json",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.export("in.sock").dev.connected == 0 {
        assert!(Instant::now() < deadline, "guest zcount did not connect");
        std::thread::sleep(Duration::from_millis(20));
    }
    let host_tx = zc_tool(
        &h,
        "zsend",
        &["-i", &format!("zc:{cluster}@0"), "-n", &N.to_string()],
    );
    let guest_tx = zc_tool(
        &h,
        "zsend",
        &[
            "-i",
            &format!("zc:{cluster}@1"),
            "--vhost-user",
            &sock("out.sock"),
            "-n",
            &N.to_string(),
        ],
    );
    // Move both ports back and forth while packets flow.
    let mut moves = 0;
    let mut mid_traffic = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, e) = h.stats();
        let (a, b) = (&e[0], &e[1]);
        let flowing = a.rx.packets > 0 && a.rx.packets < N && b.tx.packets < N;
        if !flowing && moves > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "traffic did not end: {e:?}");
        if a.rx.packets == 0 {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        for (name, now) in [("in.sock", a.worker), ("out.sock", b.worker)] {
            let to = 1 - now.unwrap();
            let out = run(&["move", name, &to.to_string()]);
            assert_eq!(
                out.trim(),
                format!("port {name}: moved from worker {} to worker {to}", 1 - to)
            );
            moves += 1;
        }
        if flowing {
            mid_traffic += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        mid_traffic >= 3,
        "only {mid_traffic} rounds of moves happened while packets flowed"
    );
    for (c, what) in [(guest_rx, "guest zcount"), (host_rx, "host zcount")] {
        let j = json(&finish(c, Duration::from_secs(120), what), what);
        assert_eq!(j["packets"], N, "{what}: {j}");
        assert_eq!(j["seq_errors"], 0, "{what}: {j}");
        assert_eq!(j["checksum_errors"], 0, "{what}: {j}");
    }
    for (s, what) in [(host_tx, "host zsend"), (guest_tx, "guest zsend")] {
        let out = finish(s, Duration::from_secs(60), what);
        assert!(out.status.success(), "{what}: {out:?}");
    }
    // Errors a user can meet.
    let out = hostd_cli(&h, &["move", "nope.sock", "1"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "zc-hostd: error: no port is named nope.sock; the ports: in.sock, out.sock"
    );
    let out = hostd_cli(&h, &["move", "in.sock", "2"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "zc-hostd: error: there is no worker 2: this zc-hostd runs workers 0..1"
    );
    let text = run(&["stats"]);
    assert!(text.contains("worker 0: "), "{text}");
    assert!(text.contains("worker 1: "), "{text}");
}
