//! DPDK's testpmd as an independent vhost-user client of an export:
//! virtio_user txonly into the export, counted exactly by host zcount; host
//! zsend through the export, counted exactly by testpmd rxonly.
//! Needs root, hugepages and dpdk-testpmd; skips without them unless CI is set.

mod common;

use common::tools::{self, require};
use common::{unique, Hostd};
use std::io::{BufRead, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// testpmd needs most of the hugepages: one DPDK test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn can_run() -> bool {
    require("root (for hugepages)", tools::is_root())
        && require("dpdk-testpmd", tools::have("dpdk-testpmd"))
        && require("stdbuf", tools::have("stdbuf"))
        && require("1024 free 2 MiB hugepages", tools::hugepages(1024))
}

/// testpmd in interactive mode on the export's socket, lcores on both
/// cores, its output collected as it comes so that a test can wait for
/// what testpmd says instead of sleeping.
struct Testpmd {
    child: Child,
    prefix: String,
    out: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Testpmd {
    fn start(sock: &std::path::Path, prefix: &str, mode: &str) -> Testpmd {
        // Unbuffered: testpmd's printf output reaches the pipe when
        // printed, not when it exits (the prompt always does).
        let mut child = Command::new("stdbuf")
            .args(["-o0", "-e0", "dpdk-testpmd"])
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
            .expect("start dpdk-testpmd");
        let out = Arc::new(Mutex::new(String::new()));
        let readers = [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ]
        .into_iter()
        .map(|mut r| {
            let out = out.clone();
            // Raw reads, not lines: the prompt ends without a newline.
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        })
        .collect();
        Testpmd {
            child,
            prefix: prefix.to_string(),
            out,
            readers,
        }
    }

    /// Output so far, in bytes: where to look from for what a command says.
    fn mark(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    /// Waits until the output from `from` on contains `pat`; returns it.
    fn wait_for(&mut self, from: usize, pat: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let since = self.out.lock().unwrap()[from..].to_string();
            if since.contains(pat) {
                return since;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("testpmd exited ({st}) before saying {pat:?}:\n{since}");
            }
            assert!(
                Instant::now() < deadline,
                "testpmd never said {pat:?}:\n{since}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn cmd(&mut self, c: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(c.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
    }

    /// Runs `c` and returns what testpmd said up to `end`.
    fn run(&mut self, c: &str, end: &str) -> String {
        let from = self.mark();
        self.cmd(c);
        self.wait_for(from, end)
    }

    /// The port's RX-packets count, from `show port stats`.
    fn rx_packets(&mut self) -> u64 {
        let out = self.run("show port stats 0", "Tx-pps:");
        tools::testpmd_count(&out, "RX-packets:").expect("RX-packets in port stats")
    }

    /// Quits testpmd; returns all it said.
    fn finish(mut self) -> String {
        self.cmd("quit");
        drop(self.child.stdin.take());
        self.child.wait().unwrap();
        unique::remove_dpdk_files(&self.prefix);
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
        let s = self.out.lock().unwrap().clone();
        eprintln!("{s}");
        s
    }
}

/// Waits until testpmd has its port up (virtio_user started the device:
/// both rings set up, DRIVER_OK) and the export sees the frontend.
fn wait_ready(h: &Hostd, name: &str, tp: &mut Testpmd) {
    tp.wait_for(0, "testpmd> ");
    h.wait_stats(name, "testpmd connected", |s| s.dev.connected == 1);
}

#[test]
fn testpmd_txonly_into_an_export_is_counted_exactly_by_zcount() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !can_run() {
        return;
    }
    let h = Hostd::start(&["tp.sock,rx=0,tx=1"], &[]);
    let spare = h.stats().0.spare_buffers;
    let mut zcount = Command::new(tools::tool("zcount"))
        .args(["-i", &format!("zc:{}@1", h.cluster), "--json"])
        .env("ZC_RUN_DIR", h.run_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // zcount has attached once it has taken its buffers.
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.stats().0.spare_buffers == spare {
        assert!(Instant::now() < deadline, "zcount never attached");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut tp = Testpmd::start(&h.sock("tp.sock"), &unique::name("zctx"), "txonly");
    wait_ready(&h, "tp.sock", &mut tp);
    tp.run("start", "packet forwarding - ports=");
    // Traffic for a while: how long does not matter, every packet is counted.
    std::thread::sleep(Duration::from_secs(3));
    let stopped = tp.run("stop", "Done.");
    let sent = tools::testpmd_count(&stopped, "TX-packets:").expect("testpmd TX-packets");
    assert!(sent > 10_000, "testpmd sent only {sent}");
    // The export drains the virtqueue before testpmd disconnects, and
    // zcount counts it all before it is stopped.
    h.wait_stats("tp.sock", "every packet testpmd sent", |s| {
        s.tx.packets >= sent
    });
    let mut stderr = std::io::BufReader::new(zcount.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut line = String::new();
    loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "zcount exited");
        let counted = line
            .strip_prefix("Absolute Stats: ")
            .and_then(|r| r.split(' ').next()?.parse::<u64>().ok());
        if counted.is_some_and(|n| n >= sent) {
            break;
        }
        assert!(Instant::now() < deadline, "zcount is at {line}");
    }
    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(zcount.id() as i32, libc::SIGINT) };
    let z = zcount.wait_with_output().unwrap();
    let out = tp.finish();
    assert_eq!(
        tools::testpmd_count(&out, "TX-packets:"),
        Some(sent),
        "no packet after stop"
    );
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
    let mut tp = Testpmd::start(&h.sock("rp.sock"), &unique::name("zcrx"), "rxonly");
    wait_ready(&h, "rp.sock", &mut tp);
    tp.run("start", "packet forwarding - ports=");
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
    h.wait_stats("rp.sock", "every packet zsend sent", |s| s.rx.packets >= N);
    // testpmd has received what the export delivered before it stops.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = tp.rx_packets();
        if got >= N {
            break;
        }
        assert!(Instant::now() < deadline, "testpmd received {got} of {N}");
        std::thread::sleep(Duration::from_millis(50));
    }
    tp.run("stop", "Done.");
    let out = tp.finish();
    let got = tools::testpmd_count(&out, "RX-packets:").expect("testpmd RX-packets");
    let s = h.export("rp.sock");
    assert_eq!(s.rx.packets, N, "{s:?}");
    assert_eq!(got, N, "testpmd received exactly what zsend sent");
}
