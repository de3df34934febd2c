//! `zc-hostd attach` / `detach` against running guests (QEMU, TCG unless a
//! real KVM module is loaded) booted with no zc devices at all: the pool
//! and the export arrive by ACPI PCI hot-plug, the guest's `zcount --wait`
//! opens them, and detach takes everything away again, buffers included.
//!
//! Needs root, qemu-system-x86_64 and the guest image (built here); skips
//! without them unless CI is set.

mod common;

use common::vm::{self, Guest, GuestSpec};
use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Output;
use std::time::Duration;
use zc_host::qmp::Qmp;

fn ready() -> bool {
    require(vm::have_qemu() && is_root(), "root and qemu-system-x86_64")
}

/// A guest with shared RAM (vhost-user needs it), a QMP socket, and no zc
/// device; it runs `script`.
fn boot(name: &str, qmp: &Path, script: &str, extra: &[&str]) -> Guest {
    let mut qemu_args: Vec<String> = [
        "-m",
        "256M",
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
        "-numa",
        "node,memdev=mem",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    qemu_args.extend(extra.iter().map(|s| s.to_string()));
    Guest::boot(&GuestSpec {
        name: name.into(),
        run: script.into(),
        qemu_args,
        qmp: Some(qmp.to_path_buf()),
        ..Default::default()
    })
}

fn line(g: &Guest, prefix: &str, secs: u64) -> String {
    g.line(prefix, Duration::from_secs(secs))
}

/// The JSON summary a guest's zcount printed after `prefix`.
fn summary(g: &Guest, prefix: &str) -> Value {
    let l = line(g, prefix, 180);
    let end = l.find('}').map_or(0, |i| i + 1);
    serde_json::from_str(&l[..end]).unwrap_or_else(|e| panic!("{prefix} {l:?}: {e}"))
}

fn hostd(d: &Daemon, args: &[&str]) -> Output {
    d.tool("zc-hostd")
        .args(["-c", &d.id.to_string()])
        .args(args)
        .output()
        .unwrap()
}

fn attach(d: &Daemon, qmp: &Path, export: &str) -> Output {
    hostd(
        d,
        &["attach", "--qmp", qmp.to_str().unwrap(), "--export", export],
    )
}

fn detach(d: &Daemon, qmp: &Path, export: &str) -> Output {
    hostd(
        d,
        &["detach", "--qmp", qmp.to_str().unwrap(), "--export", export],
    )
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stats(d: &Daemon) -> Value {
    serde_json::from_str(&ok(&hostd(d, &["stats", "--json"]))).unwrap()
}

fn spare(d: &Daemon) -> u32 {
    d.info().spare_buffers
}

fn zsend(d: &Daemon, queue: u16, n: u64) {
    let out = d
        .tool("zsend")
        .args(["-i", &d.name(queue), "-n", &n.to_string()])
        .output()
        .unwrap();
    ok(&out);
}

/// The guest waits for its device, counts, then waits until the devices
/// are gone (detach) and counts again on the re-attached export.
fn count_twice_script(c: u32, q: u16, n1: u64, n2: u64) -> String {
    format!(
        "echo ZC-BOOTED; \
         zcount -i zc:{c}@{q} --wait 180 -n {n1} --verify --json >/tmp/a 2>/tmp/e; echo ZC-R1 $(cat /tmp/a) $(tail -1 /tmp/e); \
         i=0; while grep -q -e 0x1000 -e 0x1110 /sys/bus/pci/devices/*/device && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done; \
         echo ZC-GONE $(cat /sys/bus/pci/devices/*/device); \
         zcount -i zc:{c}@{q} --wait 180 -n {n2} --verify --json >/tmp/a 2>/tmp/e; echo ZC-R2 $(cat /tmp/a) $(tail -1 /tmp/e); \
         sleep 600"
    )
}

fn assert_exact(s: &Value, n: u64) {
    assert_eq!(s["packets"], n, "{s}");
    assert_eq!(s["seq_errors"], 0, "{s}");
    assert_eq!(s["checksum_errors"], 0, "{s}");
}

#[test]
fn attach_count_detach_and_attach_again() {
    if !ready() {
        return;
    }
    let _one_at_a_time = vm::serialise();
    const N1: u64 = 3000;
    const N2: u64 = 700;
    let d = Daemon::start(&["-q", "4", "--buffers", "8192", "--no-hugepages"]);
    let c = d.id;
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("vm.qmp");
    let g = boot("hotplug", &qmp, &count_twice_script(c, 2, N1, N2), &[]);
    line(&g, "ZC-BOOTED", 120);
    let spare0 = spare(&d);

    let out = ok(&attach(&d, &qmp, "rx=2"));
    assert!(
        out.contains(&format!(
            "attached: VM {}: device zc{c}-rx2 = export rx=2",
            qmp.display()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("zcount -i zc:{c}@2 --wait 60")),
        "{out}"
    );
    let st = stats(&d);
    let att = &st["attachments"];
    assert_eq!(att.as_array().unwrap().len(), 1, "{st}");
    assert_eq!(att[0]["vm"], qmp.display().to_string());
    assert_eq!(att[0]["device"], format!("zc{c}-rx2"));
    assert_eq!(att[0]["rx_queue"], 2);
    assert_eq!(
        att[0]["mac"],
        format!("02:7a:{:02x}:{:02x}:00:02", (c >> 8) & 0xff, c & 0xff)
    );

    zsend(&d, 2, N1);
    assert_exact(&summary(&g, "ZC-R1"), N1);
    let e = &stats(&d)["exports"][0];
    assert_eq!(e["name"], "attach-rx2.sock", "{e}");
    assert_eq!(e["rx"]["exchanged"], N1, "zero-copy: {e}");
    assert_eq!(e["rx"]["copied"], 0, "{e}");

    let out = ok(&detach(&d, &qmp, "rx=2"));
    assert!(
        out.contains(&format!("buffers back in the pool ({spare0} spare)")),
        "{out}"
    );
    assert_eq!(spare(&d), spare0, "every buffer came back");
    let st = stats(&d);
    assert_eq!(st["exports"], json!([]), "{st}");
    assert_eq!(st["attachments"], json!([]), "{st}");
    let gone = line(&g, "ZC-GONE", 60);
    assert!(
        !gone.contains("0x1000") && !gone.contains("0x1110"),
        "virtio-net and ivshmem gone from the guest's PCI bus: {gone}"
    );

    ok(&attach(&d, &qmp, "rx=2"));
    zsend(&d, 2, N2);
    assert_exact(&summary(&g, "ZC-R2"), N2);
    assert_eq!(stats(&d)["exports"][0]["rx"]["exchanged"], N2);
    ok(&detach(&d, &qmp, "rx=2"));
    assert_eq!(spare(&d), spare0);
}

#[test]
fn two_running_guests_attached_to_one_cluster_count_their_own_traffic() {
    if !ready() {
        return;
    }
    let _one_at_a_time = vm::serialise();
    // Guest A holds two exports (rx=0, and rx=2,tx=3), guest B one (rx=1).
    const NA: u64 = 1200;
    const NB: u64 = 800;
    const NA2: u64 = 600;
    const NA3: u64 = 400;
    let d = Daemon::start(&["-q", "4", "--buffers", "8192", "--no-hugepages"]);
    let c = d.id;
    let dir = tempfile::tempdir().unwrap();
    let (qa, qb) = (dir.path().join("a.qmp"), dir.path().join("b.qmp"));
    let gone = "i=0; while grep -q -e 0x1000 -e 0x1110 /sys/bus/pci/devices/*/device && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done; \
                echo ZC-GONE $(cat /sys/bus/pci/devices/*/device); sleep 600";
    let count = |tag: &str, q: u16, n: u64| {
        format!(
            "zcount -i zc:{c}@{q} --wait 180 -n {n} --verify --json >/tmp/a 2>/tmp/e; echo {tag} $(cat /tmp/a) $(tail -1 /tmp/e); "
        )
    };
    let script_a = format!(
        "echo ZC-BOOTED; {}{}zsend -i zc:{c}@3 --wait 180 -n {NA3} >/dev/null 2>/tmp/e; echo ZC-R3 $? $(tail -1 /tmp/e); {gone}",
        count("ZC-R1", 0, NA),
        count("ZC-R2", 2, NA2)
    );
    let script_b = format!("echo ZC-BOOTED; {}{gone}", count("ZC-R1", 1, NB));
    let a = boot("guest-a", &qa, &script_a, &[]);
    let b = boot("guest-b", &qb, &script_b, &[]);
    line(&a, "ZC-BOOTED", 180);
    line(&b, "ZC-BOOTED", 180);
    let spare0 = spare(&d);
    ok(&attach(&d, &qa, "rx=0"));
    ok(&attach(&d, &qb, "rx=1"));
    ok(&attach(&d, &qa, "rx=2,tx=3"));
    let st = stats(&d);
    let devices: Vec<(&str, &str)> = st["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["vm"].as_str().unwrap(), a["device"].as_str().unwrap()))
        .collect();
    let (pa, pb) = (qa.to_str().unwrap(), qb.to_str().unwrap());
    let (d0, d1, d2) = (
        format!("zc{c}-rx0"),
        format!("zc{c}-rx1"),
        format!("zc{c}-rx2-tx3"),
    );
    assert_eq!(
        devices,
        [(pa, d0.as_str()), (pb, d1.as_str()), (pa, d2.as_str())],
        "{st}"
    );
    let host_count = d
        .tool("zcount")
        .args([
            "-i",
            &d.name(3),
            "-n",
            &NA3.to_string(),
            "--verify",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    zsend(&d, 0, NA);
    zsend(&d, 1, NB);
    zsend(&d, 2, NA2);
    assert_exact(&summary(&a, "ZC-R1"), NA);
    assert_exact(&summary(&b, "ZC-R1"), NB);
    assert_exact(&summary(&a, "ZC-R2"), NA2);
    assert!(
        line(&a, "ZC-R3", 180).starts_with('0'),
        "guest zsend failed"
    );
    let out = wait_output(host_count, Duration::from_secs(60));
    assert_exact(&common::json(&out), NA3);
    let exports = stats(&d)["exports"].clone();
    for (i, n) in [NA, NB, NA2].into_iter().enumerate() {
        assert_eq!(exports[i]["rx"]["exchanged"], n, "{exports}");
    }
    assert_eq!(exports[2]["tx"]["exchanged"], NA3, "{exports}");

    ok(&detach(&d, &qa, "rx=0"));
    assert!(
        qom_names(&qa, "/objects").contains(&format!("zcpool{c}")),
        "A's pool stays while A has another export"
    );
    ok(&detach(&d, &qa, "rx=2,tx=3"));
    let gone_a = line(&a, "ZC-GONE", 60);
    assert!(
        !gone_a.contains("0x1000") && !gone_a.contains("0x1110"),
        "{gone_a}"
    );
    assert_eq!(stats(&d)["attachments"].as_array().unwrap().len(), 1);
    assert_eq!(
        spare(&d),
        spare0 - 1088,
        "B's export still holds its stock (1024) and hands (32 rx, 32 tx)"
    );
    // A daemon that stops takes its devices out of the VMs still attached.
    let mut d = d;
    d.stop(libc::SIGTERM);
    let gone_b = line(&b, "ZC-GONE", 60);
    assert!(
        !gone_b.contains("0x1000") && !gone_b.contains("0x1110"),
        "B's devices removed at shutdown: {gone_b}"
    );
}

/// What QEMU has under `path` in its QOM tree (e.g. "/objects").
fn qom_names(qmp: &Path, path: &str) -> Vec<String> {
    let mut q = Qmp::connect(qmp).unwrap();
    q.execute("qom-list", json!({ "path": path }))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn bad_attaches_fail_clearly_and_leave_nothing_behind() {
    if !ready() {
        return;
    }
    let _one_at_a_time = vm::serialise();
    let d = Daemon::start(&["-q", "4", "--buffers", "8192", "--no-hugepages"]);
    let c = d.id;
    let dir = tempfile::tempdir().unwrap();
    let qmp = dir.path().join("vm.qmp");
    // A device that already uses the id attach gives rx=1's virtio-net, so
    // QEMU refuses the last step (device_add) after pool, chardev and netdev.
    let taken = format!("virtio-rng-pci,id=zc{c}-rx1");
    let g = boot(
        "errors",
        &qmp,
        "echo ZC-BOOTED; sleep 600",
        &["-device", &taken],
    );
    line(&g, "ZC-BOOTED", 120);
    let spare0 = spare(&d);
    let nothing_left = |why: &str| {
        assert_eq!(spare(&d), spare0, "{why}: buffers");
        let st = stats(&d);
        assert_eq!(st["exports"], json!([]), "{why}: {st}");
        assert_eq!(st["attachments"], json!([]), "{why}: {st}");
        assert!(
            !qom_names(&qmp, "/objects").contains(&format!("zcpool{c}")),
            "{why}: pool memory backend left in QEMU"
        );
        let mut devices = qom_names(&qmp, "/machine/peripheral");
        devices.sort();
        assert_eq!(
            devices,
            ["type".to_string(), format!("zc{c}-rx1")],
            "{why}: only the guest's own device"
        );
    };

    let out = attach(&d, Path::new("/nonexistent/vm.qmp"), "rx=0");
    assert_one_line_error(
        &out,
        "zc-hostd: error: VM /nonexistent/vm.qmp: cannot connect to QMP socket /nonexistent/vm.qmp: No such file or directory (os error 2) (start QEMU with -qmp unix:/nonexistent/vm.qmp,server=on,wait=off)",
    );
    nothing_left("bad QMP path");

    let out = attach(&d, &qmp, "rx=9");
    assert_one_line_error(
        &out,
        &format!("queue 9 does not exist: cluster {c} has queues 0..3"),
    );
    nothing_left("queue out of range");

    let out = attach(&d, &qmp, "rx=1");
    assert_one_line_error(
        &out,
        &format!(
            "zc-hostd: error: VM {}: QEMU refused device_add: ",
            qmp.display()
        ),
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(&format!("zc{c}-rx1")), "QEMU's words: {text}");
    nothing_left("device_add refused");

    ok(&attach(&d, &qmp, "rx=0"));
    let out = attach(&d, &qmp, "rx=0");
    assert_one_line_error(
        &out,
        &format!(
            "zc-hostd: error: VM {} already has the export rx=0 (QEMU device zc{c}-rx0); detach it first",
            qmp.display()
        ),
    );
    let out = detach(&d, &qmp, "rx=3");
    assert_one_line_error(
        &out,
        &format!(
            "has no export rx=3 attached by this zc-hostd; attached: rx=0 on {}",
            qmp.display()
        ),
    );
    assert_eq!(stats(&d)["attachments"].as_array().unwrap().len(), 1);
    ok(&detach(&d, &qmp, "rx=0"));
    nothing_left("after detach");

    // A VM that died with an export attached: detach removes the host side.
    ok(&attach(&d, &qmp, "rx=0"));
    drop(g);
    let out = detach(&d, &qmp, "rx=0");
    let text = ok(&out);
    assert!(text.contains("1088 buffers back in the pool"), "{text}");
    let warn = String::from_utf8_lossy(&out.stderr);
    assert!(
        warn.contains(&format!(
            "zc-hostd: warning: VM {} is gone: its QMP socket does not answer",
            qmp.display()
        )) && warn.contains("removed the host side only"),
        "{warn}"
    );
    assert_eq!(spare(&d), spare0);
    assert_eq!(stats(&d)["exports"], json!([]));
}
