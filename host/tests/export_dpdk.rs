//! DPDK's testpmd as an independent vhost-user client of an export:
//! virtio_user txonly into the export, counted exactly by host zcount; host
//! zsend through the export, counted exactly by testpmd rxonly.
//! Needs root, hugepages and dpdk-testpmd; skips without them unless CI is set.

mod common;

use common::tools::{self, require};
use common::{unique, Hostd};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// testpmd needs most of the hugepages: one DPDK test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn can_run() -> bool {
    require("root (for hugepages)", tools::is_root())
        && require("dpdk-testpmd", tools::have("dpdk-testpmd"))
        && require("1024 free 2 MiB hugepages", tools::hugepages(1024))
}

/// testpmd in interactive mode on the export's socket, lcores on both cores.
fn testpmd(sock: &std::path::Path, prefix: &str, mode: &str) -> Child {
    Command::new("dpdk-testpmd")
        .args([
            "--lcores",
            "0@0,1@1",
            "-n",
            "1",
            "--no-pci",
            "--socket-mem",
            "256",
        ])
        .args(["--file-prefix", prefix, "--single-file-segments"])
        .arg("--vdev")
        .arg(format!("virtio_user0,path={},queues=1", sock.display()))
        .args(["--", "-i", "--nb-cores", "1", "--txpkts", "64"])
        .arg(format!("--forward-mode={mode}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dpdk-testpmd")
}

/// Quits testpmd (started with --file-prefix `prefix`); returns its output.
fn finish(mut tp: Child, prefix: &str) -> String {
    let _ = tp.stdin.as_mut().unwrap().write_all(b"quit\n");
    drop(tp.stdin.take());
    let out = tp.wait_with_output().unwrap();
    unique::remove_dpdk_files(prefix);
    let s =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{s}");
    s
}

fn cmd(tp: &mut Child, c: &str) {
    tp.stdin.as_mut().unwrap().write_all(c.as_bytes()).unwrap();
    tp.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
}

fn wait_ready(h: &Hostd, name: &str) {
    h.wait_stats(name, "testpmd connected", |s| s.dev.connected == 1);
    // Both rings set up: testpmd starts its port only after DRIVER_OK.
    std::thread::sleep(Duration::from_secs(2));
}

#[test]
fn testpmd_txonly_into_an_export_is_counted_exactly_by_zcount() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !can_run() {
        return;
    }
    let h = Hostd::start(&["tp.sock,rx=0,tx=1"], &[]);
    let zcount = Command::new(tools::tool("zcount"))
        .args(["-i", &format!("zc:{}@1", h.cluster), "-t", "12", "--json"])
        .env("ZC_RUN_DIR", h.run_dir())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let prefix = unique::name("zctx");
    let mut tp = testpmd(&h.sock("tp.sock"), &prefix, "txonly");
    wait_ready(&h, "tp.sock");
    cmd(&mut tp, "start");
    std::thread::sleep(Duration::from_secs(3));
    cmd(&mut tp, "stop");
    // Let the export drain the virtqueue before testpmd disconnects.
    std::thread::sleep(Duration::from_secs(1));
    let out = finish(tp, &prefix);
    let sent = tools::testpmd_count(&out, "TX-packets:").expect("testpmd TX-packets");
    assert!(sent > 10_000, "testpmd sent only {sent}");
    let z = zcount.wait_with_output().unwrap();
    let j: serde_json::Value = serde_json::from_slice(&z.stdout).expect("zcount --json");
    let s = h.export("tp.sock");
    eprintln!("testpmd sent {sent}; zcount {j}; export {s:?}");
    assert_eq!(s.tx.packets, sent, "export counted what testpmd sent");
    assert_eq!(
        j["packets"].as_u64(),
        Some(sent),
        "zcount counted what testpmd sent"
    );
    assert_eq!(s.tx.invalid_desc + s.tx.drop_bad_len, 0);
    assert_eq!(s.tx.copied, sent, "virtio-user buffers take the copy path");
}

#[test]
fn zsend_through_an_export_is_counted_exactly_by_testpmd_rxonly() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !can_run() {
        return;
    }
    let h = Hostd::start(&["rp.sock,rx=0,tx=1"], &[]);
    let prefix = unique::name("zcrx");
    let mut tp = testpmd(&h.sock("rp.sock"), &prefix, "rxonly");
    wait_ready(&h, "rp.sock");
    cmd(&mut tp, "start");
    std::thread::sleep(Duration::from_millis(500));
    const N: u64 = 200_000;
    let st = Command::new(tools::tool("zsend"))
        .args([
            "-i",
            &format!("zc:{}@0", h.cluster),
            "-n",
            &N.to_string(),
            "-l",
            "64",
        ])
        .env("ZC_RUN_DIR", h.run_dir())
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.export("rp.sock").rx.packets < N && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    cmd(&mut tp, "stop");
    let out = finish(tp, &prefix);
    let got = tools::testpmd_count(&out, "RX-packets:").expect("testpmd RX-packets");
    let s = h.export("rp.sock");
    assert_eq!(s.rx.packets, N, "{s:?}");
    assert_eq!(got, N, "testpmd received exactly what zsend sent");
}
