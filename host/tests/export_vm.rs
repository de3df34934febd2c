//! A real VM on an export: QEMU (TCG unless a real KVM module is loaded)
//! started with the options `zc-hostd --qemu-args` prints, the guest
//! kernel's own virtio_net driver on the export. Host zsend's packets raise
//! the guest's rx_packets by exactly their number; the packets the guest
//! sends are counted exactly by host zcount.
//! Needs qemu-system-x86_64 and the image of vm-images/build.sh (built here);
//! skips without them unless CI is set.

mod common;

use common::tools::{self, require};
use common::Hostd;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// VMs boot one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn image() -> Option<(PathBuf, PathBuf)> {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let out = Command::new("bash")
        .arg(root.join("vm-images/build.sh"))
        .current_dir(&root)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "vm-images/build.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let dir = root.join("target/vm-images");
    Some((dir.join("vmlinuz"), dir.join("initramfs.cpio.gz")))
}

fn accel() -> &'static str {
    let m = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    if m.lines()
        .any(|l| l.starts_with("kvm_intel ") || l.starts_with("kvm_amd "))
    {
        "kvm"
    } else {
        "tcg"
    }
}

struct Qemu(std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn guest_kernel_virtio_net_receives_and_sends_exact_counts() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !require("qemu-system-x86_64", tools::have("qemu-system-x86_64")) {
        return;
    }
    let Some((kernel, initrd)) = image() else {
        require("the guest image (vm-images/build.sh)", false);
        return;
    };
    const N: u64 = 2000; // host -> guest
    const P: u64 = 20; // guest -> host (ICMP echo requests)
    let h = Hostd::start(9301, &["vm.sock,rx=0,tx=1"], &[]);
    // The QEMU options, exactly as the CLI prints them.
    let o = Command::new(env!("CARGO_BIN_EXE_zc-hostd"))
        .args(["-c", "9301", "--run-dir"])
        .arg(h.run_dir())
        .arg("--qemu-args")
        .arg(h.sock("vm.sock"))
        .args(["--vm-mem", "256M"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let qemu_args = String::from_utf8(o.stdout).unwrap();
    // IPv6 off before the link comes up and a static neighbour: the guest
    // sends nothing but the pings.
    let script = format!(
        "for f in all default; do echo 1 > /proc/sys/net/ipv6/conf/$f/disable_ipv6; done; \
         i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done; \
         echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6; \
         ip addr add 10.99.0.2/24 dev eth0; arp -i eth0 -s 10.99.0.1 02:00:00:00:00:01; \
         ip link set eth0 up; s=/sys/class/net/eth0/statistics; echo ZC-READY $(cat $s/rx_packets) $(cat $s/tx_packets); \
         i=0; while [ $(cat $s/rx_packets) -lt {N} ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done; \
         sleep 1; echo ZC-RX $(cat $s/rx_packets); \
         ping -c {P} -i 0.2 -w 8 10.99.0.1 > /dev/null; sleep 1; echo ZC-TX $(cat $s/tx_packets)"
    );
    let zcount = Command::new(tools::tool("zcount"))
        .args([
            "-i",
            "zc:9301@1",
            "-n",
            &P.to_string(),
            "-t",
            "240",
            "--json",
        ])
        .env("ZC_RUN_DIR", h.run_dir())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-machine",
        "pc",
        "-accel",
        accel(),
        "-smp",
        "1",
        "-nographic",
        "-nic",
        "none",
    ])
    .args(["-no-reboot", "-kernel"])
    .arg(&kernel)
    .arg("-initrd")
    .arg(&initrd)
    .arg("-append")
    .arg(format!("console=ttyS0 panic=-1 zc.run=\"{script}\""))
    .args(qemu_args.split_whitespace())
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut qemu, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    };
    eprintln!("{qemu:?}");
    let mut child = qemu.spawn().expect("start qemu");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let _q = Qemu(child);
    let (tx, rx) = mpsc::channel::<String>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("qemu: {l}"));
        }
    });
    let mut log = Vec::new();
    let mut wait_for = |prefix: &str, secs: u64| -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    eprintln!("[vm] {l}");
                    let hit = l.trim_start().starts_with(prefix);
                    log.push(l.clone());
                    if hit {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no {prefix} from the guest within {secs} s; serial log:\n{}",
                    log.join("\n")
                ),
            }
        }
    };
    let ready = wait_for("ZC-READY", 180);
    assert!(ready.ends_with(" 0 0"), "counters start at zero: {ready}");
    let st = Command::new(tools::tool("zsend"))
        .args([
            "-i",
            "zc:9301@0",
            "-n",
            &N.to_string(),
            "-l",
            "60",
            "-r",
            "20000",
        ])
        .env("ZC_RUN_DIR", h.run_dir())
        .status()
        .unwrap();
    assert!(st.success(), "zsend failed");
    let got: u64 = wait_for("ZC-RX", 180)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("ZC-RX count");
    assert_eq!(
        got, N,
        "the guest's rx_packets rose by exactly what zsend sent"
    );
    let sent: u64 = wait_for("ZC-TX", 120)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("ZC-TX count");
    assert_eq!(sent, P, "the guest sent only its pings");
    let z = zcount.wait_with_output().unwrap();
    let j: serde_json::Value = serde_json::from_slice(&z.stdout).expect("zcount --json");
    assert_eq!(
        j["packets"].as_u64(),
        Some(P),
        "zcount counted the guest's packets: {j}"
    );
    let s = h.export("vm.sock");
    eprintln!("{s:#?}");
    assert_eq!(
        (s.rx.packets, s.rx.copied),
        (N, N),
        "kernel buffers take the copy path"
    );
    assert_eq!(s.tx.packets, P);
    assert_eq!(s.rx.invalid_desc + s.tx.invalid_desc, 0);
    assert!(
        s.rx.interrupts > 0,
        "the sleeping kernel driver was interrupted"
    );
}
