//! Boots guests of the zc image (vm-images/build.sh) under QEMU, runs one
//! command in each (kernel command line `zc.run="..."`) and returns what it
//! printed. KVM only where kvm_intel or kvm_amd is loaded; TCG otherwise.
//! Every QEMU started here is killed on drop, and each guest's serial log is
//! kept (and quoted in failure messages).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Kernel and initramfs of the guest image.
#[derive(Clone, Debug)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the image once per test process (a no-op when it is up to date).
pub fn image() -> Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let root = repo_root();
            let out = Command::new("bash")
                .arg(root.join("vm-images/build.sh"))
                .current_dir(&root)
                .output()
                .expect("run vm-images/build.sh");
            assert!(
                out.status.success(),
                "vm-images/build.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let dir = root.join("target/vm-images");
            Image {
                kernel: dir.join("vmlinuz"),
                initrd: dir.join("initramfs.cpio.gz"),
            }
        })
        .clone()
}

/// "kvm" where a real KVM module is loaded, else "tcg". /dev/kvm alone is
/// not enough: a PVM host offers one that crashes stock guest kernels.
pub fn accel() -> &'static str {
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    let real_kvm = modules
        .lines()
        .any(|l| l.starts_with("kvm_intel ") || l.starts_with("kvm_amd "));
    if real_kvm && Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "tcg"
    }
}

pub fn have_qemu() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Guests boot one at a time per test process: TCG guests need a core each
/// and the machine has two.
pub fn serialise() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// What to boot.
#[derive(Clone, Debug, Default)]
pub struct GuestSpec {
    pub name: String,
    /// The command the guest runs (zc.run=); empty for none.
    pub run: String,
    /// Options from `zc-hostd --qemu-args` (split on white space).
    pub qemu_args: Vec<String>,
    /// More kernel command line, e.g. "zc.ip=192.0.2.1/24".
    pub append: String,
    /// Guest RAM when qemu_args does not set it.
    pub mem: String,
    /// A QMP socket to create (for hot-plug tests).
    pub qmp: Option<PathBuf>,
}

/// A running guest; QEMU is killed when this is dropped.
pub struct Guest {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// What a guest's command printed, and its exit status.
#[derive(Debug)]
pub struct GuestRun {
    pub status: i32,
    /// Console lines between `ZC-RUN` and `ZC-EXIT`.
    pub output: String,
    pub log: String,
}

impl Guest {
    pub fn boot(spec: &GuestSpec) -> Guest {
        let img = image();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(format!("{}-serial.log", spec.name));
        let mut append = String::from("console=ttyS0 quiet panic=-1");
        if !spec.append.is_empty() {
            append.push(' ');
            append.push_str(&spec.append);
        }
        if !spec.run.is_empty() {
            assert!(
                !spec.run.contains('"'),
                "zc.run cannot contain double quotes: {}",
                spec.run
            );
            append.push_str(&format!(" zc.run=\"{}\"", spec.run));
        }
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine",
            "pc",
            "-accel",
            accel(),
            "-smp",
            "1",
            "-nic",
            "none",
            "-no-reboot",
        ])
        .args(["-display", "none", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initrd)
        .arg("-append")
        .arg(&append);
        if !spec.qemu_args.iter().any(|a| a == "-m") {
            cmd.args([
                "-m",
                if spec.mem.is_empty() {
                    "512M"
                } else {
                    &spec.mem
                },
            ]);
        }
        cmd.args(&spec.qemu_args);
        if let Some(qmp) = &spec.qmp {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("qemu-stderr.log")).unwrap())
            .spawn()
            .expect("spawn qemu-system-x86_64");
        Guest {
            name: spec.name.clone(),
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn qemu_stderr(&self) -> String {
        std::fs::read_to_string(self.log.with_file_name("qemu-stderr.log")).unwrap_or_default()
    }

    /// Waits until the serial console shows `needle` (e.g. a readiness line
    /// printed by the guest's command).
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.serial().contains(needle) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "guest {} exited ({status}) before printing {needle:?}\nserial:\n{}\nqemu: {}",
                    self.name,
                    self.serial(),
                    self.qemu_stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "guest {} did not print {needle:?} within {timeout:?}\nserial:\n{}",
                self.name,
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a console line that starts with `prefix` (the echoed
    /// command line starts with ZC-RUN, so it never matches) and returns
    /// the rest of it.
    pub fn line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .serial()
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_string))
            {
                return l.trim().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "guest {} printed no {prefix} within {timeout:?}; serial:\n{}",
                self.name,
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for `ZC-EXIT` and QEMU's exit; returns what the command printed.
    pub fn wait_exit(&mut self, timeout: Duration) -> GuestRun {
        let deadline = Instant::now() + timeout;
        let mut child = self.child.take().expect("guest running");
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "guest {} timed out after {timeout:?}\nserial:\n{}\nqemu: {}",
                    self.name,
                    self.serial(),
                    self.qemu_stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = self.serial();
        let status = log
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("ZC-EXIT ")
                    .and_then(|s| s.trim().parse().ok())
            })
            .unwrap_or_else(|| {
                panic!(
                    "guest {} stopped without ZC-EXIT\nserial:\n{log}\nqemu: {}",
                    self.name,
                    self.qemu_stderr()
                )
            });
        let output = log
            .lines()
            .skip_while(|l| !l.starts_with("ZC-RUN "))
            .skip(1)
            .take_while(|l| !l.starts_with("ZC-EXIT "))
            .collect::<Vec<_>>()
            .join("\n");
        GuestRun {
            status,
            output,
            log,
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
