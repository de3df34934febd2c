//! zc under libvirt: a real libvirtd (started here when none runs, and
//! stopped again), TCG domains whose QEMU runs as libvirt's own user
//! (qemu.conf untouched: zc-hostd --vm-group lets it in), one defined from
//! `zc-hostd --libvirt-xml`, one given an export at run time with
//! `attach --libvirt` and `detach --libvirt`, and the errors an operator
//! meets. Every domain, log and process made here is removed.
//!
//! Needs root, QEMU, libvirt (scripts/setup.sh installs it) and the guest
//! image (built here); skips without them unless CI is set.

mod common;

use common::vm::{self, image};
use common::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const URI: &str = "qemu:///system";

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ready() -> bool {
    require(
        is_root() && vm::have_qemu() && have("virsh") && have("libvirtd") && have("virtlogd"),
        "root, qemu-system-x86_64 and libvirt (libvirt-daemon-system, libvirt-clients)",
    )
}

fn virsh(args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .expect("run virsh")
}

/// libvirtd and virtlogd for the test: the machine's if they run, else
/// started here (`-d`) and stopped by pid when the test ends.
struct Libvirtd {
    started: Vec<(PathBuf, u32)>,
}

fn pid_in(file: &Path) -> Option<u32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

impl Libvirtd {
    fn ensure() -> Libvirtd {
        let mut l = Libvirtd {
            started: Vec::new(),
        };
        if virsh(&["version"]).status.success() {
            return l;
        }
        for (daemon, pidfile) in [
            ("virtlogd", "/run/virtlogd.pid"),
            ("libvirtd", "/run/libvirtd.pid"),
        ] {
            let pidfile = PathBuf::from(pidfile);
            if pid_in(&pidfile).is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()) {
                continue;
            }
            let st = Command::new(daemon).arg("-d").status().unwrap();
            assert!(st.success(), "{daemon} -d failed");
            let deadline = Instant::now() + Duration::from_secs(10);
            let pid = loop {
                if let Some(p) = pid_in(&pidfile) {
                    break p;
                }
                assert!(Instant::now() < deadline, "{daemon} wrote no pid file");
                std::thread::sleep(Duration::from_millis(50));
            };
            l.started.push((pidfile, pid));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !virsh(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "libvirtd does not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
        l
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for (_, pid) in self.started.iter().rev() {
            // SAFETY: kill on the pid of a daemon this test started.
            unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A domain of this test: destroyed, undefined and its QEMU log removed on drop.
struct Domain {
    name: String,
    serial: PathBuf,
}

impl Domain {
    /// Defines and starts a TCG domain running `run` from the guest
    /// image; `extra_domain` goes into <domain>, `devices` into <devices>.
    fn start(dir: &Path, tag: &str, run: &str, extra_domain: &str, devices: &str) -> Domain {
        let img = readable_image(dir);
        let name = unique::name(&format!("zc-test-{tag}"));
        let serial = dir.join(format!("{name}.serial"));
        let kind = if vm::accel() == "kvm" { "kvm" } else { "qemu" };
        let run = run
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        let xml = format!(
            "<domain type='{kind}'>\n<name>{name}</name>\n<memory unit='MiB'>256</memory>\n<vcpu>1</vcpu>\n\
             <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel><initrd>{}</initrd>\n\
             <cmdline>console=ttyS0 quiet panic=-1 zc.run=\"{run}\"</cmdline></os>\n\
             <features><acpi/></features>\n<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>\n\
             {extra_domain}\n<devices>\n<serial type='file'><source path='{}'/></serial>\n{devices}\n</devices>\n</domain>\n",
            img.kernel.display(),
            img.initrd.display(),
            serial.display()
        );
        let file = dir.join(format!("{name}.xml"));
        std::fs::write(&file, &xml).unwrap();
        let d = Domain { name, serial };
        let out = virsh(&["define", file.to_str().unwrap()]);
        assert!(out.status.success(), "define: {}\n{xml}", stderr(&out));
        let out = virsh(&["start", &d.name]);
        assert!(out.status.success(), "start: {}\n{xml}", stderr(&out));
        d
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// The rest of the first console line starting with `prefix`.
    fn line(&self, prefix: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            // Whole lines only: the console may be read mid-line.
            if let Some(l) = self
                .console()
                .split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_string))
            {
                return l.trim().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "domain {} printed no {prefix} within {secs} s; console:\n{}\nQEMU log:\n{}",
                self.name,
                self.console(),
                self.qemu_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The JSON summary zcount printed after `prefix`.
    fn summary(&self, prefix: &str) -> Value {
        let l = self.line(prefix, 240);
        let end = l.find('}').map_or(0, |i| i + 1);
        serde_json::from_str(&l[..end]).unwrap_or_else(|e| panic!("{prefix} {l:?}: {e}"))
    }

    fn xml(&self) -> String {
        let out = virsh(&["dumpxml", &self.name]);
        assert!(out.status.success(), "dumpxml: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn log_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/log/libvirt/qemu/{}.log", self.name))
    }

    fn qemu_log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
        let _ = std::fs::remove_file(self.log_path());
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The guest image copied into `dir` (one of [`open_dir`]'s), files 0644:
/// libvirt's QEMU runs as libvirt-qemu and cannot open the image where the
/// checkout is private (a clone under `mktemp -d`, mode 0700).
fn readable_image(dir: &Path) -> vm::Image {
    let img = image();
    let copy = |from: &Path| {
        let to = dir.join(from.file_name().expect("image files have names"));
        if !to.exists() {
            std::fs::copy(from, &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        to
    };
    vm::Image {
        kernel: copy(&img.kernel),
        initrd: copy(&img.initrd),
    }
}

/// A directory libvirt's QEMU (user libvirt-qemu) can reach: the export
/// sockets, the run directory and the consoles live in it.
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn daemon(dir: &Path, extra: &[&str]) -> Daemon {
    let _ = dir;
    daemon_in(unique_cluster(), open_dir(), extra)
}

/// The daemon of `daemon`, for cluster `id` in run directory `run` (the
/// same ones again: a restart).
fn daemon_in(id: u32, run: tempfile::TempDir, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "-q",
        "4",
        "--buffers",
        "8192",
        "--no-hugepages",
        "--vm-group",
        "libvirt-qemu",
    ];
    args.extend_from_slice(extra);
    Daemon::start_in(id, run, &args)
}

fn hostd(d: &Daemon, args: &[&str]) -> Output {
    d.tool("zc-hostd")
        .args(["-c", &d.id.to_string()])
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "failed: {}", stderr(out));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stats(d: &Daemon) -> Value {
    serde_json::from_str(&ok(&hostd(d, &["stats", "--json"]))).unwrap()
}

fn zsend(d: &Daemon, queue: u16, n: u64) {
    ok(&d
        .tool("zsend")
        .args(["-i", &d.name(queue), "-n", &n.to_string()])
        .output()
        .unwrap());
}

fn assert_exact(s: &Value, n: u64) {
    assert_eq!(s["packets"], n, "{s}");
    assert_eq!(s["seq_errors"], 0, "{s}");
    assert_eq!(s["checksum_errors"], 0, "{s}");
}

fn libvirt_args<'a>(verb: &'a str, domain: &'a str, export: &'a str) -> [&'a str; 5] {
    [verb, "--libvirt", domain, "--export", export]
}

#[test]
fn a_domain_from_libvirt_xml_and_one_attached_at_run_time_count_zero_copy() {
    if !ready() {
        return;
    }
    let _one_at_a_time = vm::serialise();
    let _libvirtd = Libvirtd::ensure();
    const N: u64 = 3000;
    const N2: u64 = 1500;
    let dir = open_dir();
    let sock = dir.path().join("vm1.sock");
    let export = format!("{},rx=0", sock.display());
    let d = daemon(dir.path(), &["--export", &export]);
    let c = d.id;
    let link = PathBuf::from(format!("/dev/shm/zcpool{c}"));
    assert_eq!(
        std::fs::read_link(&link).unwrap().display().to_string(),
        d.info().pool_path,
        "the pool's name for libvirt"
    );

    // A domain defined from what --libvirt-xml prints.
    let xml = ok(&hostd(&d, &["--libvirt-xml", sock.to_str().unwrap()]));
    let (in_domain, in_devices) = xml
        .split_once("<!-- In <devices>: -->")
        .unwrap_or_else(|| panic!("no devices part in:\n{xml}"));
    assert!(
        in_devices.contains(&format!("<shmem name='zcpool{c}'>")),
        "{xml}"
    );
    let a = Domain::start(
        dir.path(),
        "a",
        &format!("echo ZC-BOOTED; zcount -i zc:{c}@0 -n {N} --verify --json >/tmp/a 2>/tmp/e; echo ZC-R1 $(cat /tmp/a) $(tail -1 /tmp/e); sleep 600"),
        in_domain,
        in_devices,
    );
    a.line("ZC-BOOTED", 180);
    zsend(&d, 0, N);
    assert_exact(&a.summary("ZC-R1"), N);
    let e = &stats(&d)["exports"][0];
    assert_eq!(e["rx"]["packets"], N, "{e}");
    assert_eq!(e["rx"]["exchanged"], N, "zero-copy: {e}");
    assert_eq!(e["rx"]["copied"], 0, "{e}");
    let log = a.qemu_log();
    assert!(
        !log.contains("warning:"),
        "QEMU warned at the domain's start:\n{log}"
    );

    // The <reconnect> of --libvirt-xml: libvirt gives QEMU a chardev that
    // reconnects, and QEMU is back on the export of a daemon that was
    // killed and started again, within 3 s, on the same pool link.
    assert!(
        log.contains("reconnect=1"),
        "libvirt gave the chardev no reconnect:\n{log}"
    );
    let mut d = d;
    d.stop(libc::SIGKILL);
    let run = std::mem::replace(&mut d.run_dir, tempfile::tempdir().unwrap());
    let d = daemon_in(c, run, &["--export", &export]);
    let back = Instant::now();
    loop {
        let e = &stats(&d)["exports"][0];
        if e["dev"]["connected"] == 1 {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(3),
            "QEMU did not reconnect within 3 s: {e}\n{}",
            a.qemu_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::read_link(&link).unwrap().display().to_string(),
        d.info().pool_path,
        "the pool's name for libvirt survives the restart"
    );
    drop(a);

    // A running domain with shared memory and no zc device: attach, count,
    // detach.
    let b = Domain::start(
        dir.path(),
        "b",
        &format!(
            "echo ZC-BOOTED; zcount -i zc:{c}@2 --wait 180 -n {N2} --verify --json >/tmp/a 2>/tmp/e; echo ZC-R1 $(cat /tmp/a) $(tail -1 /tmp/e); \
             i=0; while grep -q -e 0x1000 -e 0x1110 /sys/bus/pci/devices/*/device && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done; \
             echo ZC-GONE $(cat /sys/bus/pci/devices/*/device); sleep 600"
        ),
        &zc_host::libvirt::memory_backing(),
        "",
    );
    b.line("ZC-BOOTED", 180);
    let spare0 = d.info().spare_buffers;
    let out = ok(&hostd(&d, &libvirt_args("attach", &b.name, "rx=2")));
    assert!(
        out.contains(&format!(
            "attached: VM {} on {URI}: device zc{c}-rx2 = export rx=2",
            b.name
        )),
        "{out}"
    );
    let st = stats(&d);
    assert_eq!(
        st["attachments"][0]["vm"],
        format!("{} on {URI}", b.name),
        "{st}"
    );
    let live = b.xml();
    assert!(live.contains("<interface type='vhostuser'>"), "{live}");
    assert!(
        live.contains(&format!("<shmem name='zcpool{c}'>")),
        "{live}"
    );
    zsend(&d, 2, N2);
    assert_exact(&b.summary("ZC-R1"), N2);
    let e = &stats(&d)["exports"][1];
    assert_eq!(e["name"], "attach-rx2.sock", "{e}");
    assert_eq!(e["rx"]["exchanged"], N2, "zero-copy: {e}");
    assert_eq!(e["rx"]["copied"], 0, "{e}");

    let out = ok(&hostd(&d, &libvirt_args("detach", &b.name, "rx=2")));
    assert!(
        out.contains(&format!("buffers back in the pool ({spare0} spare)")),
        "{out}"
    );
    assert_eq!(d.info().spare_buffers, spare0, "every buffer came back");
    let live = b.xml();
    assert!(
        !live.contains("vhostuser") && !live.contains("<shmem"),
        "devices gone from the domain XML:\n{live}"
    );
    let gone = b.line("ZC-GONE", 60);
    assert!(
        !gone.contains("0x1000") && !gone.contains("0x1110"),
        "virtio-net and ivshmem gone from the guest's PCI bus: {gone}"
    );
    assert_eq!(stats(&d)["attachments"], json!([]));
    let log = b.qemu_log();
    assert!(!log.contains("F_CONFIG"), "{log}");
    drop(b);

    let mut d = d;
    d.stop(libc::SIGTERM);
    assert!(!link.exists(), "the pool link goes with the daemon");
}

#[test]
fn libvirt_errors_are_one_line_and_leave_nothing_attached() {
    if !ready() {
        return;
    }
    let _one_at_a_time = vm::serialise();
    let _libvirtd = Libvirtd::ensure();
    let dir = open_dir();
    let d = daemon(dir.path(), &[]);
    let spare0 = d.info().spare_buffers;
    let nothing_left = |why: &str| {
        assert_eq!(d.info().spare_buffers, spare0, "{why}: buffers");
        let st = stats(&d);
        assert_eq!(st["exports"], json!([]), "{why}: {st}");
        assert_eq!(st["attachments"], json!([]), "{why}: {st}");
    };

    let nowhere = "qemu:///system?socket=/nonexistent/libvirt-sock";
    let out = hostd(
        &d,
        &[
            "attach",
            "--libvirt",
            "vm1",
            "--connect",
            nowhere,
            "--export",
            "rx=0",
        ],
    );
    assert_one_line_error(
        &out,
        &format!("zc-hostd: error: VM vm1 on {nowhere}: cannot reach libvirt at {nowhere}: "),
    );
    assert!(
        stderr(&out).contains("(is libvirtd running?)"),
        "{}",
        stderr(&out)
    );
    nothing_left("no libvirtd");

    let out = hostd(
        &d,
        &libvirt_args("attach", "zc-test-no-such-domain", "rx=0"),
    );
    assert_one_line_error(
        &out,
        &format!("zc-hostd: error: VM zc-test-no-such-domain on {URI}: libvirt at {URI} has no domain named zc-test-no-such-domain (see virsh -c {URI} list --all)"),
    );
    nothing_left("unknown domain");

    let plain = Domain::start(dir.path(), "plain", "echo ZC-BOOTED; sleep 600", "", "");
    let out = hostd(&d, &libvirt_args("attach", &plain.name, "rx=0"));
    assert_one_line_error(
        &out,
        &format!(
            "zc-hostd: error: VM {} on {URI}: its memory is not shared, which vhost-user needs: add <memoryBacking>",
            plain.name
        ),
    );
    nothing_left("no shared memory");
    let live = plain.xml();
    assert!(
        !live.contains("vhostuser") && !live.contains("<shmem"),
        "nothing added to the domain:\n{live}"
    );
}
