//! A real VM on an export: QEMU (TCG unless a real KVM module is loaded)
//! started with the options `zc-hostd --qemu-args` prints, the guest
//! kernel's own virtio_net driver on the export. Host zsend's packets raise
//! the guest's rx_packets by exactly their number; the packets the guest
//! sends are counted exactly by host zcount.
//!
//! Needs root, qemu-system-x86_64 and the guest image (built here); skips
//! without them unless CI is set.

mod common;

use common::vm::{self, Guest, GuestSpec};
use common::*;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn guest_kernel_virtio_net_receives_and_sends_exact_counts() {
    if !require(vm::have_qemu() && is_root(), "root and qemu-system-x86_64") {
        return;
    }
    let _one_at_a_time = vm::serialise();
    const N: u64 = 2000; // host -> guest
    const P: u64 = 20; // guest -> host (ICMP echo requests)
    let (d, sock) = Daemon::with_vm_export();
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
    let zcount = d
        .tool("zcount")
        .args([
            "-i",
            &d.name(1),
            "-n",
            &P.to_string(),
            "-t",
            "240",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let g = Guest::boot(&GuestSpec {
        name: "kernel-virtio-net".into(),
        run: script,
        // The QEMU options, exactly as the CLI prints them.
        qemu_args: d.qemu_args(&sock, "256M"),
        ..Default::default()
    });
    let t = Duration::from_secs(180);
    assert_eq!(g.line("ZC-READY", t), "0 0", "counters start at zero");
    let st = d
        .tool("zsend")
        .args([
            "-i",
            &d.name(0),
            "-n",
            &N.to_string(),
            "-l",
            "60",
            "-r",
            "20000",
        ])
        .status()
        .unwrap();
    assert!(st.success(), "zsend failed");
    let got: u64 = g.line("ZC-RX", t).parse().expect("ZC-RX count");
    assert_eq!(
        got, N,
        "the guest's rx_packets rose by exactly what zsend sent"
    );
    let sent: u64 = g.line("ZC-TX", t).parse().expect("ZC-TX count");
    assert_eq!(sent, P, "the guest sent only its pings");
    let out = wait_output(zcount, Duration::from_secs(120));
    assert_eq!(
        json(&out)["packets"],
        P,
        "zcount counted the guest's packets"
    );
    let s = export_named(&d, &sock);
    assert_eq!(
        (s.rx.packets, s.rx.copied),
        (N, N),
        "kernel buffers take the copy path: {s:?}"
    );
    assert_eq!(s.tx.packets, P, "{s:?}");
    assert_eq!(s.rx.invalid_desc + s.tx.invalid_desc, 0, "{s:?}");
    assert!(
        s.rx.interrupts > 0,
        "the sleeping kernel driver was interrupted: {s:?}"
    );
}
