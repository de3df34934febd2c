//! Guests on one cluster: VM to VM zero-copy through a cluster queue, and
//! standard networking between two guests' kernel drivers (copy path).

mod common;

use common::vm::{self, Guest, GuestSpec};
use common::*;
use std::path::PathBuf;
use std::time::Duration;

const BOOT_AND_RUN: Duration = Duration::from_secs(300);

fn ready() -> bool {
    require(vm::have_qemu() && is_root(), "root and qemu-system-x86_64")
}

/// The export statistics of `zc-hostd stats --json`, by socket file name.
fn export_stats(d: &Daemon, name: &str) -> serde_json::Value {
    let out = d
        .tool("zc-hostd")
        .args(["-c", &d.id.to_string(), "stats", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no export {name} in {v}"))
}

/// A daemon with 2 queues and 16384 buffers exporting `a.sock` and
/// `b.sock` (in a fresh directory, returned first so that it outlives the
/// daemon) with the queue roles `a_roles` and `b_roles`.
fn two_exports(a_roles: &str, b_roles: &str) -> (tempfile::TempDir, Daemon, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (a_sock, b_sock) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let d = Daemon::start(&[
        "-q",
        "2",
        "--buffers",
        "16384",
        "--export",
        &format!("{},{a_roles}", a_sock.display()),
        "--export",
        &format!("{},{b_roles}", b_sock.display()),
    ]);
    (dir, d, a_sock, b_sock)
}

#[test]
fn vm_to_vm_zero_copy_through_one_cluster() {
    if !ready() {
        return;
    }
    let _one_at_a_time = vm::serialise();
    const N: u64 = 3000;
    // Guest A transmits into queue 0; guest B receives from queue 0.
    let (_dir, d, a_sock, b_sock) = two_exports("tx=0", "rx=0");
    let id = d.id;
    let mut b = Guest::boot(&GuestSpec {
        name: "vm-b".into(),
        run: format!("zcount -i zc:{id}@0 -n {N} --verify --json"),
        qemu_args: d.qemu_args(&b_sock, "1G"),
        ..Default::default()
    });
    // B must own its device before A sends: packets reaching a device with
    // no driver yet would wait in the queue anyway, but this keeps the run
    // short and the order obvious in the logs.
    b.wait_for("ZC-RUN", BOOT_AND_RUN);
    let mut a = Guest::boot(&GuestSpec {
        name: "vm-a".into(),
        run: format!("zsend -i zc:{id}@0 -n {N} -l 128 --json"),
        qemu_args: d.qemu_args(&a_sock, "1G"),
        ..Default::default()
    });
    let sent = a.wait_exit(BOOT_AND_RUN);
    assert_eq!(sent.status, 0, "{}", sent.log);
    let got = b.wait_exit(BOOT_AND_RUN);
    assert_eq!(got.status, 0, "{}", got.log);
    let json_line = got
        .output
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("{}", got.log));
    let v: serde_json::Value = serde_json::from_str(json_line.trim()).unwrap();
    assert_eq!(v["packets"], N, "{}", got.log);
    assert_eq!(v["bytes"], N * 128);
    assert_eq!(v["seq_errors"], 0);
    assert_eq!(v["checksum_errors"], 0);
    // Zero-copy end to end: A's packets were exchanged into the pool, and B
    // received the same buffers by exchange. Nothing was copied.
    let (sa, sb) = (export_stats(&d, "a.sock"), export_stats(&d, "b.sock"));
    assert_eq!(sa["tx"]["exchanged"], N, "{sa}");
    assert_eq!(sa["tx"]["copied"], 0, "{sa}");
    assert_eq!(sb["rx"]["exchanged"], N, "{sb}");
    assert_eq!(sb["rx"]["packets"], N, "{sb}");
    assert_eq!(sb["rx"]["copied"], 0, "{sb}");
}

#[test]
fn two_guests_kernel_drivers_ping_each_other_through_the_copy_path() {
    if !ready() {
        return;
    }
    let _one_at_a_time = vm::serialise();
    // A pair of queues joins the two guests: 0 carries A -> B, 1 carries B -> A.
    let (_dir, d, a_sock, b_sock) = two_exports("rx=1,tx=0", "rx=0,tx=1");
    // The documentation range: these addresses exist only on the two guests.
    let mut b = Guest::boot(&GuestSpec {
        name: "ping-b".into(),
        run: "echo B-UP; sleep 600".into(),
        append: "zc.ip=192.0.2.2/24".into(),
        qemu_args: d.qemu_args(&b_sock, "1G"),
        ..Default::default()
    });
    b.wait_for("B-UP", BOOT_AND_RUN);
    let mut a = Guest::boot(&GuestSpec {
        name: "ping-a".into(),
        run: "ping -c 5 -w 60 192.0.2.2".into(),
        append: "zc.ip=192.0.2.1/24".into(),
        qemu_args: d.qemu_args(&a_sock, "1G"),
        ..Default::default()
    });
    let run = a.wait_exit(BOOT_AND_RUN);
    assert_eq!(
        run.status,
        0,
        "ping failed:\n{}\nB:\n{}",
        run.log,
        b.serial()
    );
    assert!(run.output.contains("5 packets received"), "{}", run.output);
    // Kernel driver buffers are guest RAM, not pool buffers: copy path.
    let sa = export_stats(&d, "a.sock");
    assert!(sa["tx"]["copied"].as_u64().unwrap() >= 5, "{sa}");
    assert_eq!(sa["tx"]["exchanged"], 0, "{sa}");
    assert!(sa["rx"]["copied"].as_u64().unwrap() >= 5, "{sa}");
    drop(b);
}
