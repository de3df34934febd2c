//! The zc guest driver's PCI transport in a real VM: QEMU (TCG unless a real
//! KVM module is loaded) started with the options `zc-hostd --qemu-args`
//! prints, booting the image of vm-images/build.sh. One boot runs, in order:
//!
//! 1. host `zsend -n N` -> `zcount -i zc:C@0 -n N --verify` in the guest:
//!    exact, and every packet exchanged (none copied);
//! 2. `zsend -i zc:eth0 -n N -l 1500` in the guest (the interface name) ->
//!    host `zcount -n N --verify`: exact, every packet exchanged;
//! 3. a second opener is refused while one holds the device; the holder is
//!    killed with SIGKILL; the next open recovers the device and receives
//!    exactly M more packets (sent once it is open: packets that reach a
//!    dead driver's ring are lost with it);
//! 4. after every zc tool exited the kernel's virtio-pci/virtio_net own the
//!    device again and the interface works: the guest pings through it and
//!    host zcount counts what it sent (kernel buffers: copy path).
//!
//! Needs root, qemu-system-x86_64 and the guest image (built here); skips
//! without them unless CI is set.

mod common;

use common::vm;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const N: u64 = 2000;
const M: u64 = 500;
const PINGS: u64 = 5;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the serial console line by line.
struct Console {
    rx: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Console {
    fn wait_for(&mut self, prefix: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    eprintln!("[vm] {l}");
                    self.log.push(l.clone());
                    if let Some(i) = l.find(prefix) {
                        return l[i + prefix.len()..].trim().to_string();
                    }
                }
                Err(_) => panic!(
                    "no {prefix} from the guest within {secs} s; console:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }
}

/// The JSON summary at the start of a result line (the tool's last stderr
/// line follows it, for diagnosis).
fn guest_json(line: &str) -> serde_json::Value {
    let end = line.find('}').map_or(0, |i| i + 1);
    serde_json::from_str(&line[..end]).unwrap_or_else(|e| panic!("guest result {line:?}: {e}"))
}

#[test]
fn guest_pci_driver_in_a_vm_exact_both_ways_recovers_and_gives_the_device_back() {
    if !require(is_root(), "root (QEMU, PCI takeover in the guest)")
        || !require(vm::have_qemu(), "qemu-system-x86_64")
    {
        return;
    }
    let _g = vm::serialise();
    let vm::Image { kernel, initrd } = vm::image();
    let (d, sock) = Daemon::with_vm_export();
    let c = d.id;
    let qemu_args = d.qemu_args(&sock, "256M");

    // The kernel command line carries the script: no double quotes, and
    // short (2048 bytes in all).
    let script = format!(
        "drv() {{ for d in /sys/bus/pci/devices/*; do [ $(cat $d/device) = 0x1000 ] && basename $(readlink $d/driver || echo none); done; }}; \
         for f in all default; do echo 1 > /proc/sys/net/ipv6/conf/$f/disable_ipv6; done; \
         echo ZC-S1; zcount -i zc:{c}@0 -n {N} --verify --json >/tmp/a 2>/tmp/e; echo ZC-R1 $(cat /tmp/a) $(tail -1 /tmp/e); \
         echo ZC-D1 $(drv); \
         echo ZC-S2; zsend -i zc:eth0 -n {N} -l 1500 --json >/tmp/a 2>/tmp/e; echo ZC-R2 $(cat /tmp/a) $(tail -1 /tmp/e); \
         zcount -i zc:{c}@0 -t 600 >/dev/null 2>&1 & h=$!; sleep 3; \
         zcount -i zc:{c}@0 -n 1 >/dev/null 2>/tmp/e; echo ZC-BUSY $(cat /tmp/e); \
         kill -9 $h; wait $h; echo ZC-D3 $(drv); \
         zcount -i zc:{c}@0 -n {M} -t 200 --verify --json >/tmp/a 2>/tmp/e & h=$!; sleep 5; echo ZC-S3; wait $h; echo ZC-R3 $(cat /tmp/a) $(tail -1 /tmp/e); \
         echo ZC-D4 $(drv); \
         i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
         echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6; \
         ip addr add 10.99.0.2/24 dev eth0; ip neigh add 10.99.0.1 lladdr 02:00:00:00:00:01 dev eth0 nud permanent; ip link set eth0 up; \
         echo ZC-S4; ping -c {PINGS} -w 10 10.99.0.1 >/dev/null; sleep 1; \
         echo ZC-R4 $(cat /sys/class/net/eth0/statistics/tx_packets)"
    );
    assert!(
        !script.contains('"') && script.len() < 1800,
        "{}",
        script.len()
    );
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-machine",
        "pc",
        "-accel",
        vm::accel(),
        "-smp",
        "1",
        "-nographic",
    ])
    .args(["-nic", "none", "-no-reboot", "-kernel"])
    .arg(&kernel)
    .arg("-initrd")
    .arg(&initrd)
    .arg("-append")
    .arg(format!("console=ttyS0 panic=-1 quiet zc.run=\"{script}\""))
    .args(&qemu_args)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = qemu.spawn().expect("start qemu");
    let (tx, rx) = mpsc::channel::<String>();
    let tx2 = tx.clone();
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let _q = Kill(child);
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("qemu: {l}"));
        }
    });
    let mut con = Console {
        rx,
        log: Vec::new(),
    };
    let tool = |name: &str, args: &[&str]| {
        let mut cmd = d.tool(name);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        Kill(cmd.spawn().unwrap())
    };
    let finish = |k: Kill, what: &str| {
        let mut k = k;
        let deadline = Instant::now() + Duration::from_secs(300);
        while k.0.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "{what} did not finish; export: {:?}",
                export_named(&d, &sock)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut o = String::new();
        std::io::Read::read_to_string(k.0.stdout.as_mut().unwrap(), &mut o).unwrap();
        let mut e = String::new();
        std::io::Read::read_to_string(k.0.stderr.as_mut().unwrap(), &mut e).unwrap();
        assert!(k.0.wait().unwrap().success(), "{what}: {e}");
        o
    };

    // 1. host -> guest over PCI.
    con.wait_for("ZC-S1", 240);
    let send = tool(
        "zsend",
        &["-i", &d.name(0), "-n", &N.to_string(), "-l", "64"],
    );
    let r1 = guest_json(&con.wait_for("ZC-R1", 300));
    finish(send, "host zsend");
    assert_eq!(
        (
            &r1["packets"],
            &r1["bytes"],
            &r1["seq_errors"],
            &r1["checksum_errors"]
        ),
        (&N.into(), &(N * 64).into(), &0.into(), &0.into()),
        "{r1}"
    );
    let e = export_named(&d, &sock);
    assert_eq!(
        (e.rx.packets, e.rx.exchanged, e.rx.copied),
        (N, N, 0),
        "{e:?}"
    );
    assert_eq!(
        con.wait_for("ZC-D1", 60),
        "virtio-pci",
        "rebound after zcount"
    );

    // 2. guest -> host, opened by interface name.
    let count = tool(
        "zcount",
        &["-i", &d.name(1), "-n", &N.to_string(), "--verify", "--json"],
    );
    con.wait_for("ZC-S2", 120);
    let r2 = guest_json(&con.wait_for("ZC-R2", 300));
    assert_eq!(r2["packets"], N, "{r2}");
    let h2: serde_json::Value = serde_json::from_str(finish(count, "host zcount").trim()).unwrap();
    assert_eq!(
        (
            &h2["packets"],
            &h2["bytes"],
            &h2["seq_errors"],
            &h2["checksum_errors"]
        ),
        (&N.into(), &(N * 1500).into(), &0.into(), &0.into()),
        "{h2}"
    );
    let e = export_named(&d, &sock);
    assert_eq!(
        (e.tx.packets, e.tx.exchanged, e.tx.copied),
        (N, N, 0),
        "{e:?}"
    );

    // 3. one opener at a time; a crashed holder does not lock the device away.
    let busy = con.wait_for("ZC-BUSY", 120);
    assert!(
        busy.contains("is already open by another process (pid") && !busy.contains('\n'),
        "{busy}"
    );
    assert_eq!(
        con.wait_for("ZC-D3", 60),
        "none",
        "a SIGKILLed driver cannot rebind"
    );
    con.wait_for("ZC-S3", 60);
    let send = tool(
        "zsend",
        &["-i", &d.name(0), "-n", &M.to_string(), "-l", "200"],
    );
    let r3 = guest_json(&con.wait_for("ZC-R3", 300));
    finish(send, "host zsend");
    assert_eq!(
        (&r3["packets"], &r3["seq_errors"], &r3["checksum_errors"]),
        (&M.into(), &0.into(), &0.into()),
        "{r3} export {:?}",
        export_named(&d, &sock)
    );
    assert_eq!(
        con.wait_for("ZC-D4", 60),
        "virtio-pci",
        "the recovering open gave the device back to the driver the crashed one took it from"
    );

    // 4. standard networking works again: the kernel's packets (copy path).
    // Besides the pings the kernel may send an IGMP report when the link
    // comes up: the host counts whatever the interface sent, at least the
    // pings, all through the copy path.
    let before = export_named(&d, &sock);
    let count = tool("zcount", &["-i", &d.name(1), "-t", "25", "--json"]);
    con.wait_for("ZC-S4", 120);
    let tx_packets: u64 = con.wait_for("ZC-R4", 120).parse().unwrap();
    assert!(
        tx_packets >= PINGS,
        "the guest sent its pings: {tx_packets}"
    );
    let h4: serde_json::Value = serde_json::from_str(finish(count, "host zcount").trim()).unwrap();
    let got = h4["packets"].as_u64().unwrap();
    assert!(
        got >= PINGS && got <= tx_packets,
        "host got {got}, guest sent {tx_packets}"
    );
    let e = export_named(&d, &sock);
    assert_eq!(e.tx.copied - before.tx.copied, got, "{e:?}");
    assert_eq!(
        e.tx.exchanged, N,
        "kernel buffers are never exchanged: {e:?}"
    );
    assert_eq!(e.rx.invalid_desc + e.tx.invalid_desc, 0, "{e:?}");
}

/// `zc:eth0` given back on SIGTERM; and after its holder was killed: the
/// interface is gone (the device has no driver), yet the name still finds
/// the device, through the lock file the crashed holder left, and the next
/// open receives exactly M. First, a user who is not root is told so.
#[test]
fn an_interface_name_finds_its_device_after_a_crash() {
    if !require(is_root(), "root (QEMU, PCI takeover in the guest)")
        || !require(vm::have_qemu(), "qemu-system-x86_64")
    {
        return;
    }
    let _g = vm::serialise();
    let (d, sock) = Daemon::with_vm_export();
    // A user who is not root gets one line saying so, for either name (the
    // pool's BAR is root-only, so the tool cannot even tell the cluster).
    let not_root = |tag: &str, name: String| {
        format!(
            "su zc -c 'zcount -i {name} -n 1' 2>/tmp/nr; r=$?; echo {tag} $r $(wc -l </tmp/nr) $(cat /tmp/nr); "
        )
    };
    let script = format!(
        "echo zc:x:1000:1000::/tmp:/bin/sh >>/etc/passwd; {}{}\
         zcount -i zc:eth0 -t 600 >/dev/null 2>&1 & h=$!; sleep 3; kill -TERM $h; wait $h; \
         echo ZC-TERM $? $(ls /sys/class/net); \
         zcount -i zc:eth0 -t 600 >/dev/null 2>&1 & h=$!; sleep 3; kill -9 $h; wait $h; \
         echo ZC-IF1 $(ls /sys/class/net); \
         zcount -i zc:eth0 -n {M} -t 200 --verify --json >/tmp/a 2>/tmp/e & h=$!; sleep 5; echo ZC-S; wait $h; \
         echo ZC-GOT $(cat /tmp/a) $(tail -1 /tmp/e); echo ZC-IF2 $(ls /sys/class/net)",
        not_root("ZC-NR1", "zc:eth0".into()),
        not_root("ZC-NR2", d.name(0)),
    );
    let g = vm::Guest::boot(&vm::GuestSpec {
        name: "ifname-crash".into(),
        run: script,
        qemu_args: d.qemu_args(&sock, "256M"),
        ..Default::default()
    });
    let t = Duration::from_secs(180);
    for tag in ["ZC-NR1", "ZC-NR2"] {
        let l = g.line(tag, t);
        assert!(
            l.starts_with("1 1 zcount: ") && l.ends_with("which needs root: run this as root"),
            "{tag}: exit status, one line, the root error: {l}"
        );
    }
    assert_eq!(
        g.line("ZC-TERM", t),
        "0 eth0 lo",
        "SIGTERM: zcount exits cleanly and gives eth0 back"
    );
    assert_eq!(
        g.line("ZC-IF1", t),
        "lo",
        "eth0 left with its killed holder"
    );
    g.line("ZC-S", t);
    let send = d
        .tool("zsend")
        .args(["-i", &d.name(0), "-n", &M.to_string()])
        .output()
        .unwrap();
    assert!(send.status.success());
    let r = guest_json(&g.line("ZC-GOT", t));
    assert_eq!(
        (&r["packets"], &r["seq_errors"], &r["checksum_errors"]),
        (&M.into(), &0.into(), &0.into()),
        "{r}"
    );
    assert_eq!(
        g.line("ZC-IF2", t),
        "eth0 lo",
        "eth0 back on the kernel driver"
    );
}
