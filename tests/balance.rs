//! Distribution inside a cluster: zsend's multi-flow traffic, the balancer
//! (`zc-hostd --balance`) splitting it by a symmetric flow hash and fanning
//! it out by reference, as separate processes the way users run them.

mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn zsend_flows_reach_zcount_as_that_many_flows_both_ways() {
    let d = Daemon::start(&["-q", "1", "--buffers", "4096", "--no-hugepages"]);
    let name = d.name(0);
    let count = d
        .tool("zcount")
        .args(["-i", &name, "-n", "5000", "--verify", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let send = d
        .tool("zsend")
        .args(["-i", &name, "-n", "5000", "--flows", "100", "--seed", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_output(send, TIMEOUT).status.success());
    let v = json(&wait_output(count, TIMEOUT));
    assert_eq!(v["packets"], 5000, "{v}");
    assert_eq!(v["flows"], 100, "{v}");
    assert_eq!(v["flow_directions"], 200, "{v}");
    assert_eq!(v["checksum_errors"], 0, "payloads are zsend's: {v}");
    assert_eq!(v["seq_errors"], 0, "{v}");
    // --seed without --flows is a usage error, before anything is opened.
    let out = d
        .tool("zsend")
        .args(["-i", &name, "-n", "1", "--seed", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--flows"));
}

/// 32-bit FNV-1a, written here again so the test does not take the
/// daemon's word for how packets are split.
fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The documented symmetric 5-tuple hash of a UDP/IPv4 packet: lower
/// endpoint (address, port big-endian), higher endpoint, protocol 17.
fn reference_5tuple(a: ([u8; 4], u16), b: ([u8; 4], u16)) -> u32 {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut bytes = Vec::new();
    for (addr, port) in [lo, hi] {
        bytes.extend_from_slice(&addr);
        bytes.extend_from_slice(&port.to_be_bytes());
    }
    bytes.push(17);
    fnv1a(&bytes)
}

fn balancers(d: &Daemon) -> Vec<zc_host::port::balancer::BalancePortStats> {
    use zc_host::control::{Reply, Request};
    let sock = zc_host::client::connect(d.run_dir.path(), d.id).expect("control socket");
    match zc_host::client::call(&sock, &Request::Stats).expect("stats") {
        (Reply::Stats { balancers, .. }, _) => balancers,
        (r, _) => panic!("unexpected reply {r:?}"),
    }
}

fn count(d: &Daemon, queue: u16, n: u64, verify: bool) -> std::process::Child {
    let name = d.name(queue);
    let n = n.to_string();
    let mut args = vec!["-i", &name, "-n", &n, "-t", "60", "--json"];
    if verify {
        args.push("--verify");
    }
    d.tool("zcount")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn send(d: &Daemon, queue: u16, n: u64, flows: u32, seed: u64) {
    let out = d
        .tool("zsend")
        .args([
            "-i",
            &d.name(queue),
            "-n",
            &n.to_string(),
            "--flows",
            &flows.to_string(),
            "--seed",
            &seed.to_string(),
            // The consumers keep up at this rate on a busy 2-core machine:
            // no queue fills, so nothing may be dropped.
            "-r",
            "20000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until each counter is attached and idle, asleep on its queue's
/// futex: what it sends from now on reaches them.
fn wait_consumers(counters: &[std::process::Child]) {
    for c in counters {
        wait_blocked_in(c.id(), "futex", "waiting for packets");
    }
}

#[test]
fn hashed_group_splits_flows_exactly_and_the_other_group_sees_everything() {
    const N: u64 = 8_000;
    const K: u32 = 80;
    const SEED: u64 = 11;
    let d = Daemon::start(&[
        "-q",
        "5",
        "--no-hugepages",
        // Rings longer than any queue's share: a consumer the busy machine
        // stalls for a while loses nothing.
        "--queue-len",
        "4096",
        "--balance",
        "in=0,out=1+2+3/4,hash=5tuple",
    ]);
    // The reference split: packet seq belongs to flow (seq / 2) % K.
    let flows = zc::testpkt::Flows::new(K as usize, SEED);
    let mut want_pkts = [0u64; 3];
    let mut want_flows = [0u64; 3];
    let queue_of = |f: usize| {
        let x = flows.get(f);
        (reference_5tuple((x.a, x.a_port), (x.b, x.b_port)) % 3) as usize
    };
    for f in 0..K as usize {
        want_flows[queue_of(f)] += 1;
    }
    for seq in 0..N {
        want_pkts[queue_of(flows.of(seq).0)] += 1;
    }
    assert!(want_pkts.iter().all(|&p| p > 0), "{want_pkts:?}");
    let counters: Vec<_> = (0..3)
        .map(|i| count(&d, 1 + i as u16, want_pkts[i], false))
        .chain([count(&d, 4, N, true)])
        .collect();
    wait_consumers(&counters);
    send(&d, 0, N, K, SEED);
    let got: Vec<serde_json::Value> = counters
        .into_iter()
        .map(|c| json(&wait_output(c, TIMEOUT)))
        .collect();
    for i in 0..3 {
        let v = &got[i];
        assert_eq!(v["packets"], want_pkts[i], "queue {}: {v}", i + 1);
        assert_eq!(v["flows"], want_flows[i], "queue {}: {v}", i + 1);
        assert_eq!(v["flow_directions"], 2 * want_flows[i], "both ways: {v}");
    }
    let v = &got[3];
    assert_eq!(v["packets"], N, "{v}");
    assert_eq!(v["flows"], u64::from(K), "{v}");
    assert_eq!(
        (v["seq_errors"].as_u64(), v["checksum_errors"].as_u64()),
        (Some(0), Some(0)),
        "queue 4 sees every packet, in order, intact: {v}"
    );
    // The daemon's own count agrees, and nothing was dropped.
    let b = &balancers(&d)[0];
    assert_eq!(b.name, "balance:in=0,out=1+2+3/4");
    assert_eq!(b.counters.packets_in, N);
    let fwd: Vec<(u16, u64, u64)> = b
        .counters
        .outputs
        .iter()
        .map(|o| (o.queue, o.forwarded, o.dropped))
        .collect();
    assert_eq!(
        fwd,
        [
            (1, want_pkts[0], 0),
            (2, want_pkts[1], 0),
            (3, want_pkts[2], 0),
            (4, N, 0)
        ]
    );
    assert_eq!(
        b.groups.iter().map(|g| g.forwarded).collect::<Vec<_>>(),
        [N, N]
    );
}

#[test]
fn bad_balance_specs_are_one_line_and_no_daemon_starts() {
    for (spec, want) in [
        (
            "in=0,out=1+2/2",
            "queue 2 is given twice; every queue belongs to one group",
        ),
        ("in=0,out=1/0", "queue 0 is both read (in) and fed (out)"),
        (
            "in=0,out=1,hash=crc",
            "unknown hash \"crc\"; use rr, ip, 5tuple or fanout",
        ),
        ("in=0,out=1+7", "queue 7 does not exist: cluster"),
    ] {
        let run = tempfile::tempdir().unwrap();
        let id = unique_cluster().to_string();
        let out = std::process::Command::new(bin("zc-hostd"))
            .args(["-c", &id, "--run-dir"])
            .arg(run.path())
            .args([
                "-q",
                "4",
                "--buffers",
                "1024",
                "--no-hugepages",
                "--balance",
                spec,
            ])
            .output()
            .unwrap();
        assert_one_line_error(&out, want);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("--balance {spec}")),
            "names the spec: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !run.path().join(&id).join("ctl").exists(),
            "no control socket: the daemon did not start"
        );
    }
}

#[test]
fn balance_add_and_del_on_a_running_daemon_split_round_robin_and_give_every_buffer_back() {
    const N: u64 = 2_000;
    let d = Daemon::start(&[
        "-q",
        "3",
        "--queue-len",
        "4096",
        "--buffers",
        "32768",
        "--no-hugepages",
    ]);
    let spare = d.info().spare_buffers;
    let hostd = |args: &[&str]| {
        d.tool("zc-hostd")
            .args(["-c", &d.id.to_string()])
            .args(args)
            .output()
            .unwrap()
    };
    let added = hostd(&["balance", "add", "in=0,out=1+2,hash=rr"]);
    assert!(added.status.success(), "{added:?}");
    assert_eq!(balancers(&d).len(), 1);
    let counters = [count(&d, 1, N / 2, true), count(&d, 2, N / 2, true)];
    wait_consumers(&counters);
    send(&d, 0, N, 10, 1);
    // Round-robin within the group: exactly half each, intact.
    for c in counters {
        let v = json(&wait_output(c, TIMEOUT));
        assert_eq!(v["packets"], N / 2, "{v}");
        assert_eq!(v["checksum_errors"], 0, "{v}");
    }
    let b = &balancers(&d)[0];
    assert_eq!(b.counters.packets_in, N, "{b:?}");
    let del = hostd(&["balance", "del", "in=0"]);
    assert!(del.status.success(), "{del:?}");
    assert!(balancers(&d).is_empty());
    assert_eq!(d.info().spare_buffers, spare, "every buffer back after del");
    // Deleting what is not there is one line that names what is.
    let again = hostd(&["balance", "del", "in=0"]);
    assert!(!again.status.success());
    assert_eq!(
        String::from_utf8_lossy(&again.stderr),
        "zc-hostd: error: no balancer reads in=0; the balancers: none\n"
    );
}
