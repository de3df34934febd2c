//! A veth pair between two network namespaces, made for one test and
//! deleted when dropped: `a` where the port runs, `b` the peer.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair: `a` (where the port runs) and
/// `b` (the peer). IPv6 is off so that the kernel sends nothing of its own.
pub struct Veth {
    pub ns_a: String,
    pub ns_b: String,
    pub a: String,
    pub b: String,
    pub mac_a: String,
    pub mac_b: String,
}

pub const IP_A: &str = "10.213.0.1";
pub const IP_B: &str = "10.213.0.2";

impl Veth {
    pub fn new() -> Veth {
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let v = Veth {
            ns_a: format!("zcnica{tag}"),
            ns_b: format!("zcnicb{tag}"),
            a: format!("zna{tag}"),
            b: format!("znb{tag}"),
            mac_a: "02:5a:00:00:00:01".into(),
            mac_b: "02:5a:00:00:00:02".into(),
        };
        for ns in [&v.ns_a, &v.ns_b] {
            sh(&["ip", "netns", "add", ns]);
            for k in ["all", "default"] {
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{k}.disable_ipv6=1"),
                ]);
            }
        }
        sh(&[
            "ip", "link", "add", &v.a, "netns", &v.ns_a, "address", &v.mac_a, "type", "veth",
            "peer", "name", &v.b, "netns", &v.ns_b, "address", &v.mac_b,
        ]);
        for (ns, dev, ip, peer_ip, peer_mac) in [
            (&v.ns_a, &v.a, IP_A, IP_B, &v.mac_b),
            (&v.ns_b, &v.b, IP_B, IP_A, &v.mac_a),
        ] {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                dev,
            ]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            // No ARP on the wire: what is counted is only what tests send.
            sh(&[
                "ip",
                "-n",
                ns,
                "neigh",
                "replace",
                peer_ip,
                "lladdr",
                peer_mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        v
    }

    /// Moves the calling thread into namespace `ns` (threads it starts
    /// afterwards, such as workers, are in it too).
    pub fn enter(ns: &str) {
        let f = File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: setns on a namespace file we opened, for this thread.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    }

    pub fn in_b(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns_b]).args(args);
        c
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        for ns in [&self.ns_a, &self.ns_b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
