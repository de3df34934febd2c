//! Interface ports on real interfaces: a veth pair between two network
//! namespaces the test makes (and deletes), the port on one end driven by a
//! `Workers` instance with a cluster's queues, traffic from the other end
//! (the kernel's UDP stack, tcpreplay) and captured there (tcpdump).

#[path = "common/skip.rs"]
mod skip;
#[path = "common/veth.rs"]
mod veth;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use veth::{sh, Veth, IP_A, IP_B};
use zc_host::cluster::Cluster;
use zc_host::pool::PoolOptions;
use zc_host::port::nic::{Mode, NicConfig, NicError, NicParts, NicPort, ZeroCopy};
use zc_host::port::Port;
use zc_host::queues::{QueueGeometry, Side};
use zc_host::ring::{Consumer, Producer};
use zc_host::worker::{PortId, Workers};
use zc_proto::{BufferHandle, BufferIndex, PoolLayout};

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let ok = unsafe { libc::geteuid() } == 0;
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run these tests as root"
        );
        skip::skipped("needs root (network namespaces, AF_XDP)");
    }
    ok
}

/// A cluster with two queues: 0 (ingress: what the port receives) and 1
/// (egress: what it sends).
struct Rig {
    cluster: Cluster,
    _dir: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.cluster.remove_files();
    }
}

const INGRESS: u16 = 0;
const EGRESS: u16 = 1;

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        static N: AtomicU32 = AtomicU32::new(0);
        let id = 90_000_000 + std::process::id() % 100_000 * 10 + N.fetch_add(1, Ordering::Relaxed);
        let layout = PoolLayout::new(id, 2048, 8192).unwrap();
        let cluster = Cluster::create(
            &PoolOptions {
                layout,
                hugepages_dir: dir.path().join("none"),
                // shmem: AF_XDP pins only shmem and hugetlbfs pages.
                fallback_dir: "/dev/shm".into(),
                force_fallback: true,
            },
            QueueGeometry {
                queue_count: 2,
                ring_size: 512,
            },
        )
        .unwrap();
        Rig { cluster, _dir: dir }
    }

    fn parts(&mut self, n: u32, ingress: bool, egress: bool) -> NicParts {
        NicParts {
            pool: self.cluster.pool().view().clone(),
            ingress: ingress.then(|| self.cluster.queues().producer(INGRESS)),
            egress: egress.then(|| self.cluster.queues().consumer(EGRESS)),
            queues: self.cluster.queues().clone(),
            bells: self
                .cluster
                .queues()
                .bell(EGRESS, Side::Consumer)
                .filter(|_| egress)
                .map(|b| b.as_raw_fd())
                .into_iter()
                .collect(),
            buffers: self.cluster.take_spare(n).unwrap(),
        }
    }

    fn hand(&mut self) -> Vec<BufferHandle> {
        self.cluster
            .take_spare(32)
            .unwrap()
            .into_iter()
            // SAFETY: spares the cluster gave this test alone.
            .map(|b| unsafe { BufferHandle::from_raw(b, 0) })
            .collect()
    }
}

fn cfg(v: &Veth, mode: Mode, zerocopy: ZeroCopy) -> NicConfig {
    NicConfig {
        ifname: v.a.clone(),
        queue: 0,
        mode,
        zerocopy,
        takeover: false,
    }
}

/// Receives exactly `n` packets from the ingress queue, then checks that
/// no more come for a moment.
fn recv(rig: &Rig, rx: &mut Consumer, hand: &mut [BufferHandle], n: usize) -> Vec<Vec<u8>> {
    let view = rig.cluster.pool().view().clone();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut quiet_until = None;
    loop {
        let k = rx.recv_burst(hand);
        out.extend(hand[..k].iter().map(|h| view.packet(h).to_vec()));
        if out.len() >= n && quiet_until.is_none() {
            quiet_until = Some(Instant::now() + Duration::from_millis(300));
        }
        if quiet_until.is_some_and(|q| Instant::now() > q) || Instant::now() > deadline {
            return out;
        }
        if k == 0 {
            rx.wait(Duration::from_millis(2));
        }
    }
}

/// The UDP payload the peer's kernel sends: a sequence number and bytes
/// that depend on it.
fn payload(i: u32, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len).map(|j| (i as usize * 7 + j) as u8).collect();
    p[..4].copy_from_slice(&i.to_be_bytes());
    p
}

/// Ethernet frames from A's MAC to B's (or the reverse) carrying `i`.
fn frame(dst: &str, src: &str, i: u32, len: usize) -> Vec<u8> {
    let mac = |s: &str| -> Vec<u8> {
        s.split(':')
            .map(|x| u8::from_str_radix(x, 16).unwrap())
            .collect()
    };
    let mut f = mac(dst);
    f.extend(mac(src));
    // A local experimental EtherType: no stack on either side acts on it.
    f.extend([0x88, 0xb5]);
    f.extend(payload(i, len - 14));
    f
}

fn udp_from_b(v: &Veth, n: u32, len: usize) -> std::thread::JoinHandle<()> {
    let b = v.ns_b.clone();
    std::thread::spawn(move || {
        Veth::enter(&b);
        let s = std::net::UdpSocket::bind((IP_B, 0)).unwrap();
        for i in 0..n {
            s.send_to(&payload(i, len), (IP_A, 9999)).unwrap();
            if i % 64 == 63 {
                // Gentle: the kernel's own queues are not under test.
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    })
}

fn udp_payload(frame: &[u8]) -> Option<&[u8]> {
    // Ethernet (14) + IPv4 without options (20) + UDP (8).
    (frame.len() >= 42 && frame[12..14] == [0x08, 0x00] && frame[23] == 17).then(|| &frame[42..])
}

/// Runs the port on a worker; returns the port and the buffers it was given.
fn start(
    w: &Workers,
    rig: &mut Rig,
    c: &NicConfig,
    ingress: bool,
    egress: bool,
) -> Vec<BufferIndex> {
    let parts = rig.parts(1024, ingress, egress);
    let given = parts.buffers.clone();
    let port = NicPort::open(c, parts).unwrap_or_else(|(e, _)| panic!("open: {e}"));
    w.add(PortId(1), Box::new(port), None)
        .unwrap_or_else(|e| panic!("add: {e:?}"));
    given
}

fn stop_and_count(w: &Workers, mut given: Vec<BufferIndex>) {
    let port = w.take(PortId(1)).unwrap();
    let mut back = port.stop();
    back.sort();
    given.sort();
    assert_eq!(back.len(), given.len(), "every buffer comes back");
    // The port swaps buffers with the queues, so identities differ; none
    // may come back twice.
    back.dedup();
    assert_eq!(back.len(), given.len(), "no buffer comes back twice");
}

fn ingress_from_the_kernel_stack(mode: Mode) {
    if !root() {
        return;
    }
    let v = Veth::new();
    Veth::enter(&v.ns_a);
    let mut rig = Rig::new();
    let w = Workers::start(1, &[]).unwrap();
    let c = cfg(&v, mode, ZeroCopy::Auto);
    let spare0 = rig.cluster.spare_count();
    let parts = rig.parts(1024, true, false);
    let given = parts.buffers.clone();
    let port = NicPort::open(&c, parts).unwrap_or_else(|(e, _)| panic!("open: {e}"));
    let counters = port.counters();
    w.add(PortId(1), Box::new(port), None).unwrap();
    let mut rx = rig.cluster.queues().consumer(INGRESS);
    let mut hand = rig.hand();
    // Let the worker fall asleep first: arrivals must wake it.
    std::thread::sleep(Duration::from_millis(50));
    const N: u32 = 3000;
    let sender = udp_from_b(&v, N, 200);
    let got = recv(&rig, &mut rx, &mut hand, N as usize);
    sender.join().unwrap();
    assert_eq!(got.len(), N as usize, "exactly the peer's packets");
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f.len(), 14 + 20 + 8 + 200);
        assert_eq!(
            udp_payload(f),
            Some(&payload(i as u32, 200)[..]),
            "packet {i}"
        );
    }
    let s = counters.snapshot();
    let want_mode = if mode == Mode::Packet {
        "packet"
    } else {
        "xdp"
    };
    assert_eq!(s.mode, want_mode);
    assert!(!s.zero_copy, "veth has no AF_XDP zero-copy");
    assert_eq!(s.rx_packets, u64::from(N));
    assert_eq!(s.rx_bytes, u64::from(N) * 242);
    assert_eq!(s.rx_copied, u64::from(N), "{s:?}");
    // AF_XDP writes at +256: below that headroom the port moves each frame.
    let realigned = if mode == Mode::Xdp && zc_proto::buffer::HEADROOM < 256 {
        u64::from(N)
    } else {
        0
    };
    assert_eq!(s.rx_realigned, realigned, "{s:?}");
    assert_eq!(
        s.drop_queue_full + s.bad_descs + s.drop_too_long,
        0,
        "{s:?}"
    );
    // Every buffer comes back, none twice: the port's and the test's
    // hands together are as many as were taken, and the spare list is
    // whole again.
    let mut back = w.take(PortId(1)).unwrap().stop();
    back.extend(hand.drain(..).map(|h| h.index()));
    back.sort();
    back.dedup();
    assert_eq!(back.len(), given.len() + 32);
    rig.cluster.give_spare(back);
    assert_eq!(rig.cluster.spare_count(), spare0);
}

#[test]
fn xdp_port_receives_exactly_what_the_peer_stack_sends() {
    ingress_from_the_kernel_stack(Mode::Xdp);
}

#[test]
fn packet_port_receives_exactly_what_the_peer_stack_sends() {
    ingress_from_the_kernel_stack(Mode::Packet);
}

#[test]
fn a_full_ingress_queue_drops_and_counts_the_rest() {
    if !root() {
        return;
    }
    let v = Veth::new();
    Veth::enter(&v.ns_a);
    let mut rig = Rig::new();
    let w = Workers::start(1, &[]).unwrap();
    let c = cfg(&v, Mode::Xdp, ZeroCopy::Auto);
    let parts = rig.parts(1024, true, false);
    let port = NicPort::open(&c, parts).unwrap_or_else(|(e, _)| panic!("open: {e}"));
    let counters = port.counters();
    w.add(PortId(1), Box::new(port), None).unwrap();
    // Nobody consumes the ingress queue: its 512 slots fill, the rest is
    // dropped by the port and counted as such.
    const N: u32 = 2000;
    udp_from_b(&v, N, 100).join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = counters.snapshot();
        let seen = s.rx_packets + s.drop_queue_full;
        if seen == u64::from(N) {
            assert_eq!(s.rx_packets, 512, "{s:?}");
            assert_eq!(s.drop_queue_full, u64::from(N) - 512, "{s:?}");
            assert_eq!(s.drop_kernel_ring_full + s.drop_fill_ring_empty, 0, "{s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{s:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut rx = rig.cluster.queues().consumer(INGRESS);
    let mut hand = rig.hand();
    let got = recv(&rig, &mut rx, &mut hand, 512);
    assert_eq!(got.len(), 512);
    for (i, f) in got.iter().enumerate() {
        assert_eq!(
            udp_payload(f),
            Some(&payload(i as u32, 100)[..]),
            "packet {i}"
        );
    }
    w.take(PortId(1)).unwrap().stop();
}

#[test]
fn a_stalled_port_lets_the_kernel_drop_for_want_of_fill_buffers() {
    if !root() {
        return;
    }
    let v = Veth::new();
    Veth::enter(&v.ns_a);
    let mut rig = Rig::new();
    let w = Workers::start(1, &[]).unwrap();
    let c = cfg(&v, Mode::Xdp, ZeroCopy::Auto);
    // 200 buffers, all lent to the fill ring (the port has no egress).
    let parts = rig.parts(200, true, false);
    let port = NicPort::open(&c, parts).unwrap_or_else(|(e, _)| panic!("open: {e}"));
    let counters = port.counters();
    w.add(PortId(1), Box::new(port), None).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    const N: u32 = 500;
    {
        // The worker holds still: the kernel fills the 200 buffers, then
        // has none for the other 300.
        let (_, paused) = w.pause().expect("workers pause");
        udp_from_b(&v, N, 100).join().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(paused);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = counters.snapshot();
        if s.rx_packets + s.drop_fill_ring_empty == u64::from(N) {
            assert_eq!(s.rx_packets, 200, "{s:?}");
            assert_eq!(s.drop_fill_ring_empty, 300, "{s:?}");
            assert_eq!(s.drop_kernel_ring_full + s.drop_too_long, 0, "{s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{s:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(w.take(PortId(1)).unwrap().stop().len(), 200);
}

fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    let mut out = Vec::new();
    out.extend(0xa1b2_c3d4_u32.to_le_bytes());
    out.extend(2u16.to_le_bytes());
    out.extend(4u16.to_le_bytes());
    out.extend(0u32.to_le_bytes());
    out.extend(0u32.to_le_bytes());
    out.extend(65535u32.to_le_bytes());
    out.extend(1u32.to_le_bytes());
    for (i, f) in frames.iter().enumerate() {
        out.extend((1000 + i as u32).to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend((f.len() as u32).to_le_bytes());
        out.extend((f.len() as u32).to_le_bytes());
        out.extend(f);
    }
    std::fs::write(path, out).unwrap();
}

fn read_pcap(path: &Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= b.len() {
        let incl = u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()) as usize;
        out.push(b[at + 16..at + 16 + incl].to_vec());
        at += 16 + incl;
    }
    out
}

fn both_ways(mode: Mode) {
    if !root() {
        return;
    }
    let v = Veth::new();
    Veth::enter(&v.ns_a);
    let mut rig = Rig::new();
    let w = Workers::start(1, &[]).unwrap();
    let c = cfg(&v, mode, ZeroCopy::Auto);
    let given = start(&w, &mut rig, &c, true, true);
    let dir = tempfile::tempdir().unwrap();

    // In: tcpreplay on the peer replays frames of every length.
    let lens: Vec<usize> = (0..500).map(|i| 60 + (i * 37) % 1455).collect();
    let frames: Vec<Vec<u8>> = lens
        .iter()
        .enumerate()
        .map(|(i, &l)| frame(&v.mac_a, &v.mac_b, i as u32, l))
        .collect();
    let cap = dir.path().join("in.pcap");
    write_pcap(&cap, &frames);
    let mut rx = rig.cluster.queues().consumer(INGRESS);
    let mut hand = rig.hand();
    let out = v
        .in_b(&["tcpreplay", "-q", "--pps", "20000", "-i", &v.b])
        .arg(&cap)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tcpreplay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = recv(&rig, &mut rx, &mut hand, frames.len());
    assert_eq!(got.len(), frames.len());
    for (i, (g, f)) in got.iter().zip(&frames).enumerate() {
        assert!(
            g == f,
            "frame {i} differs ({} vs {} bytes)",
            g.len(),
            f.len()
        );
    }

    // Out: what goes into the egress queue leaves on the wire, captured
    // by tcpdump on the peer.
    let sent_cap = dir.path().join("out.pcap");
    let mut dump = v
        .in_b(&["tcpdump", "-U", "-n", "-i", &v.b, "-c", "400", "-w"])
        .arg(&sent_cap)
        .args(["ether", "src", &v.mac_a])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // tcpdump says "listening on" once its socket is open.
    {
        use std::io::Read;
        let mut err = dump.stderr.take().unwrap();
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !String::from_utf8_lossy(&seen).contains("listening on") {
            assert_eq!(err.read(&mut byte).unwrap(), 1, "tcpdump: {seen:?}");
            seen.push(byte[0]);
        }
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    }
    let outgoing: Vec<Vec<u8>> = (0..400)
        .map(|i| frame(&v.mac_b, &v.mac_a, i, 60 + (i as usize * 53) % 1455))
        .collect();
    let mut tx: Producer = rig.cluster.queues().producer(EGRESS);
    let view = rig.cluster.pool().view().clone();
    let mut thand = rig.hand();
    for chunk in outgoing.chunks(32) {
        for (h, f) in thand.iter_mut().zip(chunk) {
            view.packet_mut(h).fill(f).unwrap();
        }
        let mut sent = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent < chunk.len() {
            let n = tx.send_burst(&mut thand[sent..chunk.len()]);
            sent += n;
            if n == 0 {
                assert!(Instant::now() < deadline, "egress stalled");
                tx.wait(Duration::from_millis(1));
            }
        }
        // Paced: tcpdump's socket buffer is not under test.
        std::thread::sleep(Duration::from_millis(2));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while dump.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "tcpdump saw fewer than 400");
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = read_pcap(&sent_cap);
    assert_eq!(seen.len(), 400);
    for (i, (s, f)) in seen.iter().zip(&outgoing).enumerate() {
        assert!(
            s == f,
            "sent frame {i} differs ({} vs {} bytes)",
            s.len(),
            f.len()
        );
    }
    rig.cluster
        .give_spare(hand.into_iter().chain(thand).map(|h| h.index()).collect());
    stop_and_count(&w, given);
}

#[test]
fn xdp_port_both_ways_with_tcpreplay_and_tcpdump() {
    both_ways(Mode::Xdp);
}

#[test]
fn packet_port_both_ways_with_tcpreplay_and_tcpdump() {
    both_ways(Mode::Packet);
}

#[test]
fn refusals_are_one_line_and_give_every_buffer_back() {
    if !root() {
        return;
    }
    let v = Veth::new();
    Veth::enter(&v.ns_a);
    let mut rig = Rig::new();
    let open = |rig: &mut Rig, c: &NicConfig| {
        let parts = rig.parts(512, true, true);
        let mut given = parts.buffers.clone();
        match NicPort::open(c, parts) {
            Ok(p) => (Ok(p), given),
            Err((e, mut back)) => {
                back.sort();
                given.sort();
                assert_eq!(back, given, "a refused port gives back what it got");
                rig.cluster.give_spare(back);
                (Err(e), given)
            }
        }
    };
    let spare = rig.cluster.spare_count();
    let msg = |r: Result<NicPort, NicError>| r.err().expect("refused").to_string();

    let mut c = cfg(&v, Mode::Xdp, ZeroCopy::On);
    assert_eq!(
        msg(open(&mut rig, &c).0),
        format!(
            "{}: driver veth has no AF_XDP zero-copy support (zerocopy=on); use zerocopy=auto or off",
            v.a
        )
    );
    c.zerocopy = ZeroCopy::Auto;
    c.ifname = "zc-no-such0".into();
    assert_eq!(
        msg(open(&mut rig, &c).0),
        "no interface zc-no-such0 (ip link lists the interfaces)"
    );
    c.ifname = v.a.clone();
    c.queue = 5;
    assert_eq!(
        msg(open(&mut rig, &c).0),
        format!(
            "{} has receive queues 0..0 (1 of them): queue 5 does not exist",
            v.a
        )
    );
    c.queue = 0;
    assert_eq!(rig.cluster.spare_count(), spare);

    // Another XDP program on the interface: refused, in auto mode too,
    // unless taken over.
    let (first, first_given) = open(&mut rig, &c);
    let first = first.unwrap();
    for mode in [Mode::Xdp, Mode::Auto] {
        c.mode = mode;
        let e = msg(open(&mut rig, &c).0);
        assert!(
            e.starts_with(&format!("{} already runs XDP program ", v.a))
                && e.contains("(xsk_def_prog); zc does not replace it unless told to (takeover)"),
            "{e}"
        );
    }
    let mut back = Box::new(first).stop();
    back.sort();
    let mut g = first_given;
    g.sort();
    assert_eq!(back, g);
    rig.cluster.give_spare(back);

    // A program someone attached through netlink (iproute2) is taken
    // over when asked to.
    sh(&[
        "ip",
        "-n",
        &v.ns_a,
        "link",
        "set",
        "dev",
        &v.a,
        "xdpdrv",
        "obj",
        "/usr/lib/x86_64-linux-gnu/bpf/xdpfilt_alw_all.o",
        "sec",
        "xdp",
    ]);
    c.mode = Mode::Xdp;
    let e = msg(open(&mut rig, &c).0);
    assert!(e.contains("already runs XDP program"), "{e}");
    c.takeover = true;
    let (taken, given) = open(&mut rig, &c);
    let taken = taken.unwrap_or_else(|e| panic!("takeover: {e}"));
    let mut back = Box::new(taken).stop();
    back.sort();
    let mut g = given;
    g.sort();
    assert_eq!(back, g);
    rig.cluster.give_spare(back);
    assert_eq!(rig.cluster.spare_count(), spare);
    // The port took its program with it: the interface runs none now.
    let show = Command::new("ip")
        .args(["-n", &v.ns_a, "-d", "link", "show", "dev", &v.a])
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(!show.contains("prog/xdp"), "{show}");
}
