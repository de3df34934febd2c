//! A host interface and a VM on one cluster, both ways, in one TCG boot:
//! the peer namespace's kernel sends UDP over a veth into the interface
//! port (ingress queue 0), the export hands queue 0 to the guest, and
//! `zcount --verify` in the guest (zc guest driver) counts exactly what was
//! sent, payloads checked; then the guest's `zsend` into queue 1 leaves on
//! the interface (egress) and tcpdump on the peer captures exactly those
//! frames, byte for byte and in order.
//! Needs root and qemu-system-x86_64; skips without them unless CI is set.

mod common;
#[path = "../host/tests/common/veth.rs"]
mod veth;

use common::vm::{self, Guest, GuestSpec};
use common::*;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use veth::{Veth, IP_A, IP_B};
use zc::testpkt::Template;

const N: u64 = 1000;
const LEN: usize = 300;
const BOOT_AND_RUN: Duration = Duration::from_secs(300);

/// tcpdump on the peer for `n` frames from zsend's MAC, started and
/// listening.
fn tcpdump(v: &Veth, n: u64, file: &Path) -> Child {
    let mut dump = v
        .in_b(&["tcpdump", "-U", "-n", "-Q", "in", "-i", &v.b])
        .args(["-c", &n.to_string(), "-w"])
        .arg(file)
        // zsend's source MAC (zc::testpkt).
        .args(["ether", "src", "02:7a:63:00:00:01"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = dump.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("listening on") {
        assert_eq!(err.read(&mut byte).unwrap(), 1, "tcpdump: {seen:?}");
        seen.push(byte[0]);
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    dump
}

fn read_pcap(path: &Path) -> Vec<Vec<u8>> {
    let mut r = pcap_file::pcap::PcapReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut out = Vec::new();
    while let Some(p) = r.next_packet() {
        out.push(p.unwrap().data.into_owned());
    }
    out
}

fn nic(d: &Daemon) -> zc_host::port::nic::NicPortStats {
    use zc_host::control::{Reply, Request};
    let sock = zc_host::client::connect(d.run_dir.path(), d.id).unwrap();
    match zc_host::client::call(&sock, &Request::Stats).unwrap() {
        (Reply::Stats { mut nics, .. }, _) => nics.remove(0),
        (r, _) => panic!("unexpected reply {r:?}"),
    }
}

#[test]
fn peer_to_a_guest_and_back_through_an_interface_port_exactly() {
    if !require(vm::have_qemu() && is_root(), "root and qemu-system-x86_64") {
        return;
    }
    let _one_at_a_time = vm::serialise();
    let v = Veth::new();
    // The daemon (and the QEMU it serves) run in the port's namespace.
    Veth::enter(&v.ns_a);
    let (d, sock) = Daemon::with_vm_export_and(&["--nic", &format!("{},ingress=0,egress=1", v.a)]);
    let c = d.id;
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("out.pcap");
    let mut dump = tcpdump(&v, N, &cap);
    let mut g = Guest::boot(&GuestSpec {
        name: "nic-vm".into(),
        run: format!(
            "zcount -i zc:{c}@0 -n {N} --verify --json >/tmp/c; echo ZC-COUNT $(cat /tmp/c); \
             zsend -i zc:{c}@1 -n {N} -l {LEN} -r 2000 --json >/tmp/s; echo ZC-SENT $(cat /tmp/s)"
        ),
        qemu_args: d.qemu_args(&sock, "1G"),
        ..Default::default()
    });
    // zcount prints its first stats line once it holds the device.
    g.wait_for("Absolute Stats", BOOT_AND_RUN);
    let b = v.ns_b.clone();
    std::thread::spawn(move || {
        Veth::enter(&b);
        let t = Template::new(LEN);
        let s = std::net::UdpSocket::bind((IP_B, 0)).unwrap();
        for i in 0..N {
            // The payload after zsend's UDP header: the peer's kernel builds
            // a frame that carries zsend's sequence and checksum.
            s.send_to(&t.packet(i)[42..], (IP_A, 9999)).unwrap();
            if i % 64 == 63 {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    })
    .join()
    .unwrap();

    let counted = g.line("ZC-COUNT", BOOT_AND_RUN);
    let j: serde_json::Value = serde_json::from_str(&counted)
        .unwrap_or_else(|e| panic!("guest zcount: {counted:?}: {e}\n{}", g.serial()));
    assert_eq!(j["packets"], N, "{j}");
    assert_eq!(j["bytes"], N * LEN as u64, "{j}");
    assert_eq!(j["seq_errors"], 0, "{j}");
    assert_eq!(j["checksum_errors"], 0, "{j}");

    let run = g.wait_exit(BOOT_AND_RUN);
    assert_eq!(run.status, 0, "{}", run.log);
    let deadline = Instant::now() + Duration::from_secs(30);
    while dump.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "tcpdump saw fewer than {N}: {:?}\n{}",
            nic(&d),
            run.log
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = read_pcap(&cap);
    assert_eq!(seen.len(), N as usize);
    let t = Template::new(LEN);
    for (i, f) in seen.iter().enumerate() {
        assert!(*f == t.packet(i as u64), "frame {i} differs");
    }

    // The port carried exactly those, and the export moved them by
    // exchanging buffers: no copy between the interface port and the guest.
    let n = nic(&d);
    assert_eq!(
        (n.counters.rx_packets, n.counters.tx_packets),
        (N, N),
        "{n:?}"
    );
    let e = export_named(&d, &sock);
    assert_eq!((e.rx.exchanged, e.rx.copied), (N, 0), "{e:?}");
    assert_eq!((e.tx.exchanged, e.tx.copied), (N, 0), "{e:?}");
}
