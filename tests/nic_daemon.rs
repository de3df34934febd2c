//! Interface ports run by zc-hostd (`--nic`, `nic add|del`) on a veth pair
//! between two network namespaces the tests make and delete: traffic from
//! the peer namespace (its kernel's UDP stack, tcpreplay of a capture the
//! test writes) counted and checked by `zcount -i zc:IFNAME --verify`, and
//! `zsend -i zc:IFNAME` captured on the peer by tcpdump; the daemon's
//! per-port stats; bad input as one line with every buffer kept.

mod common;
#[path = "../host/tests/common/veth.rs"]
mod veth;

use common::*;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use veth::{sh, Veth, IP_A, IP_B};
use zc::testpkt::Template;
use zc_host::control::{Reply, Request};
use zc_host::port::nic::NicPortStats;

const TIMEOUT: Duration = Duration::from_secs(60);

fn root() -> bool {
    require(is_root(), "root (network namespaces, AF_XDP)")
}

/// A veth pair and a zc-hostd in namespace `a` serving its end. The
/// calling thread stays in namespace `a`, so the tools it starts are there.
struct Rig {
    // Dropped first: the daemon goes before its interface does.
    d: Daemon,
    v: Veth,
}

fn rig(nic: &str) -> Rig {
    rig_with(nic, &[])
}

/// `rig` with more zc-hostd options.
fn rig_with(nic: &str, extra: &[&str]) -> Rig {
    let v = Veth::new();
    Veth::enter(&v.ns_a);
    let spec = nic.replace("IF", &v.a);
    // Queues deeper than any test's packet count: a zcount the loaded
    // machine deschedules for a while must not turn into queue-full drops
    // (in a loaded suite run 2000 gentle packets arrived as 1824, in
    // sequence, the tail missing: most likely a full 1024-slot queue).
    let mut args = vec![
        "-q",
        "4",
        "--queue-len",
        "2048",
        "--buffers",
        "24576",
        "--no-hugepages",
    ];
    if !nic.is_empty() {
        args.extend(["--nic", &spec]);
    }
    args.extend_from_slice(extra);
    let d = Daemon::start(&args);
    Rig { d, v }
}

impl Rig {
    fn name(&self) -> String {
        format!("zc:{}", self.v.a)
    }

    fn nics(&self) -> Vec<NicPortStats> {
        let sock = zc_host::client::connect(self.d.run_dir.path(), self.d.id).unwrap();
        match zc_host::client::call(&sock, &Request::Stats).unwrap() {
            (Reply::Stats { nics, .. }, _) => nics,
            (r, _) => panic!("unexpected reply {r:?}"),
        }
    }

    fn spare(&self) -> u32 {
        self.d.info().spare_buffers
    }

    fn hostd(&self, args: &[&str]) -> Output {
        self.d
            .tool("zc-hostd")
            .args(["-c", &self.d.id.to_string()])
            .args(args)
            .output()
            .unwrap()
    }

    /// Waits until the daemon's port counters satisfy `ok`.
    fn wait_nic(&self, what: &str, ok: impl Fn(&NicPortStats) -> bool) -> NicPortStats {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = self.nics().into_iter().next().expect("one interface port");
            if ok(&n) {
                return n;
            }
            assert!(Instant::now() < deadline, "never {what}: {n:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `zcount -i zc:IFNAME -n N --verify --json`, idle and waiting.
    fn zcount(&self, n: u32) -> Child {
        let child = self
            .d
            .tool("zcount")
            .args([
                "-i",
                &self.name(),
                "-n",
                &n.to_string(),
                "--verify",
                "--json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_blocked_in(child.id(), "futex", "idle on the ingress queue");
        child
    }
}

/// zcount's summary says exactly `n` packets arrived, in sequence, intact.
fn assert_counted(out: &Output, n: u32) {
    assert!(
        out.status.success(),
        "zcount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json(out);
    assert_eq!(j["packets"], n, "{j}");
    assert_eq!(j["seq_errors"], 0, "{j}");
    assert_eq!(j["checksum_errors"], 0, "{j}");
}

/// zsend's packets as UDP datagrams from the peer's kernel: the payload
/// is everything after the UDP header of the packet, so the frame the
/// kernel builds around it carries zsend's sequence and checksum.
fn udp_from_peer(v: &Veth, n: u32, len: usize) -> std::thread::JoinHandle<()> {
    let b = v.ns_b.clone();
    std::thread::spawn(move || {
        Veth::enter(&b);
        let t = Template::new(len);
        let s = std::net::UdpSocket::bind((IP_B, 0)).unwrap();
        for i in 0..n {
            s.send_to(&t.packet(u64::from(i))[42..], (IP_A, 9999))
                .unwrap();
            if i % 64 == 63 {
                // Gentle: the kernel's own queues are not under test.
                std::thread::sleep(Duration::from_micros(500));
            }
        }
    })
}

fn write_pcap(path: &Path, frames: &[Vec<u8>]) {
    use pcap_file::pcap::{PcapPacket, PcapWriter};
    let mut w = PcapWriter::new(std::fs::File::create(path).unwrap()).unwrap();
    for (i, f) in frames.iter().enumerate() {
        let ts = Duration::from_secs(1_700_000_000) + Duration::from_micros(50) * i as u32;
        w.write_packet(&PcapPacket::new(ts, f.len() as u32, f))
            .unwrap();
    }
}

fn read_pcap(path: &Path) -> Vec<Vec<u8>> {
    let mut r = pcap_file::pcap::PcapReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut out = Vec::new();
    while let Some(p) = r.next_packet() {
        out.push(p.unwrap().data.into_owned());
    }
    out
}

fn ingress_from_the_kernel_stack(mode: &str) {
    if !root() {
        return;
    }
    let r = rig(&format!("IF,ingress=0,egress=1,mode={mode}"));
    let spare = r.spare();
    const N: u32 = 2000;
    const LEN: usize = 300;
    let count = r.zcount(N);
    udp_from_peer(&r.v, N, LEN).join().unwrap();
    let out = wait_output(count, TIMEOUT);
    assert_counted(&out, N);
    let n = r.wait_nic("all counted", |n| n.counters.rx_packets >= u64::from(N));
    let want = if mode == "packet" { "packet" } else { "xdp" };
    assert_eq!(n.counters.mode, want, "{n:?}");
    assert!(!n.counters.zero_copy, "veth has no AF_XDP zero-copy: {n:?}");
    assert_eq!(
        n.counters.rx_packets,
        u64::from(N),
        "exactly the peer's: {n:?}"
    );
    assert_eq!(n.counters.rx_bytes, u64::from(N) * LEN as u64, "{n:?}");
    assert_eq!(n.counters.rx_copied, u64::from(N), "{n:?}");
    let c = &n.counters;
    assert_eq!(
        c.drop_queue_full + c.drop_kernel_ring_full + c.drop_fill_ring_empty + c.drop_too_long,
        0,
        "{n:?}"
    );
    assert_eq!((n.ingress, n.egress), (Some(0), Some(1)));
    assert_eq!(n.name, format!("nic:{}@0", r.v.a));
    // zcount gave back what it held when it left: the spare list is whole.
    assert_eq!(r.spare(), spare);
    // The same counters in `stats --json` and the text line.
    let js = r.hostd(&["stats", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&js.stdout).unwrap();
    let nic = &j["nics"][0];
    assert_eq!(nic["rx_packets"], N, "{nic}");
    assert_eq!(nic["rx_bytes"], u64::from(N) * LEN as u64, "{nic}");
    assert_eq!(nic["rx_copied"], N, "{nic}");
    assert_eq!(nic["mode"], want, "{nic}");
    assert_eq!(nic["zero_copy"], false, "{nic}");
    for k in [
        "drop_kernel_ring_full",
        "drop_fill_ring_empty",
        "drop_queue_full",
        "tx_packets",
    ] {
        assert_eq!(nic[k], 0, "{k}: {nic}");
    }
    let text = String::from_utf8(r.hostd(&["stats"]).stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("nic "))
        .unwrap_or_else(|| panic!("no nic line in {text}"));
    assert!(
        line.contains(&format!(
            "rx {N} pkts {} B (0 zero-copy, {N} copied)",
            N as usize * LEN
        )) && line.contains("drops: 0 kernel ring full, 0 fill ring empty, 0 cluster queue full"),
        "{line}"
    );
}

#[test]
fn xdp_port_of_the_daemon_hands_zcount_exactly_what_the_peer_stack_sends() {
    ingress_from_the_kernel_stack("auto");
}

#[test]
fn packet_port_of_the_daemon_hands_zcount_exactly_what_the_peer_stack_sends() {
    ingress_from_the_kernel_stack("packet");
}

#[test]
fn tcpreplay_of_a_capture_arrives_whole_in_zcount() {
    if !root() {
        return;
    }
    let r = rig("IF,ingress=2");
    let dir = tempfile::tempdir().unwrap();
    // zsend's packets of many lengths, as a capture tcpreplay sends.
    const N: u32 = 1000;
    let frames: Vec<Vec<u8>> = (0..N)
        .map(|i| Template::new(60 + (i as usize * 37) % 1455).packet(u64::from(i)))
        .collect();
    let cap = dir.path().join("in.pcap");
    write_pcap(&cap, &frames);
    let count = r.zcount(N);
    let out =
        r.v.in_b(&["tcpreplay", "-q", "--pps", "20000", "-i", &r.v.b])
            .arg(&cap)
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "tcpreplay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_counted(&wait_output(count, TIMEOUT), N);
    let bytes: usize = frames.iter().map(Vec::len).sum();
    let n = r.wait_nic("all counted", |n| n.counters.rx_packets >= u64::from(N));
    assert_eq!(n.counters.rx_packets, u64::from(N), "{n:?}");
    assert_eq!(n.counters.rx_bytes, bytes as u64, "{n:?}");
}

/// Starts tcpdump on the peer for `n` frames from `src`, and waits until
/// it listens.
fn tcpdump(v: &Veth, n: u32, src: &str, file: &Path) -> Child {
    let mut dump = v
        .in_b(&[
            "tcpdump",
            "-U",
            "-n",
            "-i",
            &v.b,
            "-c",
            &n.to_string(),
            "-w",
        ])
        .arg(file)
        .args(["ether", "src", src])
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

fn egress_to_the_peer(mode: &str) {
    if !root() {
        return;
    }
    let r = rig(&format!("IF,ingress=0,egress=1,mode={mode}"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.pcap");
    const N: u32 = 1500;
    const LEN: usize = 400;
    // zsend's source MAC (zc::testpkt).
    let mut dump = tcpdump(&r.v, N, "02:7a:63:00:00:01", &file);
    let out =
        r.d.tool("zsend")
            .args([
                "-i",
                &r.name(),
                "-n",
                &N.to_string(),
                "-l",
                &LEN.to_string(),
            ])
            .args(["-r", "20000", "--json"])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "zsend: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while dump.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "tcpdump saw fewer than {N}: {:?}",
            r.nics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = read_pcap(&file);
    assert_eq!(seen.len(), N as usize);
    let t = Template::new(LEN);
    for (i, f) in seen.iter().enumerate() {
        assert!(*f == t.packet(i as u64), "frame {i} differs");
    }
    let n = r.wait_nic("all sent", |n| n.counters.tx_packets >= u64::from(N));
    assert_eq!(
        n.counters.tx_packets,
        u64::from(N),
        "exactly zsend's: {n:?}"
    );
    assert_eq!(n.counters.tx_bytes, u64::from(N) * LEN as u64, "{n:?}");
    assert_eq!(n.counters.tx_errors, 0, "{n:?}");
    // Nothing else came in meanwhile (tcpdump on the peer sends nothing).
    assert_eq!(n.counters.rx_packets, 0, "{n:?}");
}

#[test]
fn zsend_through_the_xdp_port_reaches_the_peer_exactly() {
    egress_to_the_peer("xdp");
}

#[test]
fn zsend_through_the_packet_port_reaches_the_peer_exactly() {
    egress_to_the_peer("packet");
}

/// A start that fails prints one line and leaves nothing behind.
fn refused_at_start(args: &[&str], want: &str) {
    let run = tempfile::tempdir().unwrap();
    let id = unique_cluster();
    let out = Command::new(bin("zc-hostd"))
        .args(["-c", &id.to_string(), "--run-dir"])
        .arg(run.path())
        .args(["-q", "4", "--buffers", "8192", "--no-hugepages"])
        .args(args)
        .output()
        .unwrap();
    assert_one_line_error(&out, want);
    assert!(
        !Path::new(&format!("/dev/shm/zc/{id}/pool")).exists(),
        "the pool of a refused start is gone"
    );
}

#[test]
fn bad_nic_options_are_one_line_and_leave_every_buffer_in_the_pool() {
    if !root() {
        return;
    }
    // The control socket's group is nobody's (65534), so nobody gets in
    // and meets the daemon's own refusal of admin requests.
    let r = rig_with("", &["--group", "65534"]);
    let a = r.v.a.clone();
    // At start-up.
    refused_at_start(
        &["--nic", "zc-no-such0,ingress=0"],
        "zc-hostd: error: no interface zc-no-such0 (ip link lists the interfaces)",
    );
    refused_at_start(
        &["--nic", &format!("{a},ingress=0,queue=5")],
        &format!("{a} has receive queues 0..0 (1 of them): queue 5 does not exist"),
    );
    refused_at_start(
        &["--nic", &format!("{a},ingress=9")],
        "queue 9 does not exist: cluster",
    );
    refused_at_start(
        &["--nic", &a],
        &format!("--nic {a}: needs ingress=Q (what arrives goes there), egress=Q (what is sent there leaves) or both"),
    );
    refused_at_start(
        &["--nic", &format!("{a},ingress=0,mode=packet,zerocopy=on")],
        "zerocopy=on needs AF_XDP: it contradicts mode=packet",
    );
    refused_at_start(
        &["--nic", &format!("{a},ingress=0,zerocopy=on")],
        &format!("{a}: driver veth has no AF_XDP zero-copy support (zerocopy=on); use zerocopy=auto or off"),
    );
    // Without root's capabilities (uid 0 keeps its files, not its powers).
    let run = tempfile::tempdir().unwrap();
    let out = Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all", "--"])
        .arg(bin("zc-hostd"))
        .args(["-c", &unique_cluster().to_string(), "--run-dir"])
        .arg(run.path())
        .args(["-q", "4", "--buffers", "8192", "--no-hugepages"])
        .args(["--nic", &format!("{a},ingress=0")])
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        &format!("{a}: AF_XDP needs root (CAP_NET_ADMIN and CAP_BPF)"),
    );

    // On the running daemon: each refusal one line, the spare count kept.
    let spare = r.spare();
    let add = |spec: &str| r.hostd(&["nic", "add", spec]);
    assert_one_line_error(
        &add("zc-no-such0,ingress=0"),
        "zc-hostd: error: no interface zc-no-such0 (ip link lists the interfaces)",
    );
    assert_one_line_error(
        &add(&format!("{a},ingress=0,queue=3")),
        "queue 3 does not exist",
    );
    assert_one_line_error(
        &add(&format!("{a},egress=4")),
        "queue 4 does not exist: cluster",
    );
    assert_eq!(r.spare(), spare);
    // Another XDP program on the interface: refused unless taken over.
    sh(&[
        "ip",
        "-n",
        &r.v.ns_a,
        "link",
        "set",
        "dev",
        &a,
        "xdpdrv",
        "obj",
        "/usr/lib/x86_64-linux-gnu/bpf/xdpfilt_alw_all.o",
        "sec",
        "xdp",
    ]);
    let out = add(&format!("{a},ingress=0"));
    assert_one_line_error(&out, &format!("{a} already runs XDP program "));
    assert_one_line_error(&out, "zc does not replace it unless told to (takeover)");
    assert_eq!(r.spare(), spare);
    // The same at start-up.
    refused_at_start(
        &["--nic", &format!("{a},ingress=0")],
        "zc does not replace it unless told to (takeover)",
    );
    let out = add(&format!("{a},ingress=0,takeover"));
    assert!(
        out.status.success(),
        "takeover: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The queue roles are the port's now: a second port on them is refused.
    assert_one_line_error(
        &add(&format!("{a},ingress=0,queue=0,mode=packet")),
        &format!("nic:{a}@0 runs already"),
    );
    let out = r.hostd(&["nic", "del", &a]);
    assert!(
        out.status.success(),
        "del: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r.spare(), spare, "every buffer is back after nic del");
    // Not root: nobody (uid 65534) may use the cluster, not change its ports.
    let tools = tempfile::tempdir().unwrap();
    let perm = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    perm(tools.path());
    perm(r.d.run_dir.path());
    std::fs::copy(bin("zc-hostd"), tools.path().join("zc-hostd")).unwrap();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(tools.path().join("zc-hostd"))
            .args(["-c", &r.d.id.to_string()])
            .args(args)
            .env("ZC_RUN_DIR", r.d.run_dir.path())
            .output()
            .unwrap()
    };
    let out = as_nobody(&["stats"]);
    assert!(
        out.status.success(),
        "nobody is in the socket's group: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_one_line_error(
        &as_nobody(&["nic", "add", &format!("{a},ingress=0")]),
        &format!(
            "cluster {}: uid 65534 may not add interface ports: only root (or zc-hostd's own user) may",
            r.d.id
        ),
    );
    assert_eq!(r.spare(), spare);
    assert!(r.nics().is_empty());
    assert_one_line_error(
        &r.hostd(&["nic", "del", &a]),
        &format!("no interface port nic:{a}@0; the interface ports: none"),
    );
    // zc:IFNAME with no port serving it, and a port without that side.
    let out =
        r.d.tool("zsend")
            .args(["-i", &r.name(), "-n", "1"])
            .output()
            .unwrap();
    assert_one_line_error(&out, &format!("no zc-hostd here serves interface {a}"));
    assert!(add(&format!("{a},ingress=0,mode=packet")).status.success());
    let out =
        r.d.tool("zsend")
            .args(["-i", &r.name(), "-n", "1"])
            .output()
            .unwrap();
    assert_one_line_error(
        &out,
        &format!(
            "the interface port nic:{a}@0 of cluster {} has no egress queue",
            r.d.id
        ),
    );
    assert!(r.hostd(&["nic", "del", &a]).status.success());
    assert_eq!(r.spare(), spare);
}

#[test]
fn nic_add_and_del_on_a_running_daemon_carry_traffic_and_give_every_buffer_back() {
    if !root() {
        return;
    }
    let r = rig("");
    let a = r.v.a.clone();
    let spare = r.spare();
    assert!(r.nics().is_empty());
    let out = r.hostd(&["nic", "add", &format!("{a},ingress=1,egress=2")]);
    assert!(
        out.status.success(),
        "add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(&format!(
            "added: nic nic:{a}@0: ingress zc:{}@1 egress zc:{}@2 | xdp (copy)",
            r.d.id, r.d.id
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "receive: zcount -i zc:{a}\nsend: zsend -i zc:{a}\n"
        )),
        "{text}"
    );
    assert!(r.spare() < spare, "the port holds buffers while it runs");
    const N: u32 = 500;
    let count = r.zcount(N);
    udp_from_peer(&r.v, N, 100).join().unwrap();
    assert_counted(&wait_output(count, TIMEOUT), N);
    let out = r.hostd(&["nic", "del", &format!("{a},ingress=1,egress=2")]);
    assert!(
        out.status.success(),
        "del: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with(&format!("removed nic:{a}@0; ")), "{text}");
    assert!(
        text.ends_with(&format!(" buffers back in the pool ({spare} spare)\n")),
        "{text}"
    );
    assert_eq!(r.spare(), spare);
    assert!(r.nics().is_empty());
    // The program went with the port.
    let show = Command::new("ip")
        .args(["-n", &r.v.ns_a, "-d", "link", "show", "dev", &a])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&show.stdout).contains("prog/xdp"));
}
