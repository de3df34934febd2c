//! A test frontend for zc-hostd exports: a memfd as "guest RAM", the pool
//! file as a second region, split virtqueues driven from the driver side,
//! and the `vhost` crate's frontend speaking vhost-user to the daemon.
#![allow(dead_code)]

pub mod skip;
pub mod tools;
pub mod unique;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;
use zc_host::client;
use zc_host::control::{ClusterInfo, Reply, Request};
use zc_host::shm::Mapping;
use zc_host::stats::ExportStats;
use zc_proto::PoolLayout;

pub const VERSION_1: u64 = 1 << 32;
pub const EVENT_IDX: u64 = 1 << 29;
pub const MRG_RXBUF: u64 = 1 << 15;
pub const HDR: usize = 12;
/// Where the test puts the pool in guest-physical space.
pub const POOL_GPA: u64 = 0x1_0000_0000;
pub const RAM_SIZE: usize = 32 << 20;

/// zc-hostd as a child process, stopped with SIGTERM on drop.
pub struct Hostd {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub cluster: u32,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Hostd {
    /// Starts a daemon of a cluster of its own (`unique::cluster`) with a
    /// small pool in /dev/shm and `exports` (`name,rx=..` with the name
    /// relative to the temp dir).
    pub fn start(exports: &[&str], extra: &[&str]) -> Hostd {
        let cluster = unique::cluster();
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_zc-hostd"));
        cmd.args(["-c", &cluster.to_string(), "-q", "4", "--buffers", "8192"])
            .args(["--queue-len", "256", "--no-hugepages", "--stock", "512"])
            .arg("--run-dir")
            .arg(dir.path().join("run"));
        for e in exports {
            cmd.arg("--export")
                .arg(format!("{}/{e}", dir.path().display()));
        }
        cmd.args(extra);
        // If the test process dies (a timeout kills it), so does the daemon.
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            })
        };
        cmd.env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ready: queues") {
                    let _ = tx.send(());
                }
                eprintln!("[zc-hostd] {line}");
                l2.lock().unwrap().push(line);
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("zc-hostd did not start");
        Hostd {
            child,
            dir,
            cluster,
            log,
        }
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn sock(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// What became of the daemon, without reaping it: for failure messages
    /// (given a moment to finish dying, since a closed socket comes first).
    pub fn fate(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        let (r, pid, status, code) = loop {
            // SAFETY: waitid on our own child with WNOWAIT (it stays
            // waitable) writes into the siginfo we own.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
            // SAFETY: as above.
            let r = unsafe { libc::waitid(libc::P_PID, self.child.id(), &mut info, flags) };
            // SAFETY: waitid filled in a SIGCHLD siginfo (or left it zeroed).
            let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
            if r != 0 || pid != 0 || Instant::now() >= deadline {
                break (r, pid, status, info.si_code);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        match (r, pid, code) {
            (0, 0, _) => "zc-hostd still runs".into(),
            (0, _, libc::CLD_EXITED) => format!("zc-hostd exited with status {status}"),
            (0, _, _) => format!("zc-hostd was killed by signal {status}"),
            _ => "zc-hostd is gone".into(),
        }
    }

    pub fn stats(&self) -> (ClusterInfo, Vec<ExportStats>) {
        let fail = |e: &dyn std::fmt::Display| -> ! { panic!("stats: {e} ({})", self.fate()) };
        let s = client::connect(&self.run_dir(), self.cluster).unwrap_or_else(|e| fail(&e));
        match client::call(&s, &Request::Stats).unwrap_or_else(|e| fail(&e)) {
            (Reply::Stats { info, exports, .. }, _) => (info, exports),
            r => panic!("unexpected reply {r:?}"),
        }
    }

    pub fn export(&self, name: &str) -> ExportStats {
        self.stats()
            .1
            .into_iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("no export {name}"))
    }

    /// Waits until `f` holds for export `name`'s statistics.
    pub fn wait_stats(
        &self,
        name: &str,
        what: &str,
        f: impl Fn(&ExportStats) -> bool,
    ) -> ExportStats {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.export(name);
            if f(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:#?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the workers have just gone to sleep, with a whole sleep
    /// ahead of them (up to 500 ms): export `name`'s `sleeps` counter moves
    /// (a worker woke from a sleep), then every worker thread blocks in
    /// epoll again. Whatever the test does next must wake them.
    pub fn wait_asleep(&self, name: &str) {
        let before = self.export(name).dev.sleeps;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.export(name).dev.sleeps == before {
            assert!(Instant::now() < deadline, "{name}: the worker never slept");
            std::thread::sleep(Duration::from_micros(200));
        }
        let pid = self.child.id();
        loop {
            let awake: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .filter_map(|t| {
                    let dir = t.ok()?.path();
                    let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
                    let wchan = std::fs::read_to_string(dir.join("wchan")).unwrap_or_default();
                    (comm.starts_with("zc-worker-") && !wchan.contains("epoll"))
                        .then(|| format!("{} in {wchan:?}", comm.trim()))
                })
                .collect();
            if awake.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "workers never slept again: {awake:?}"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// CPU seconds (user + system) the daemon has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the ")" that ends the command name: utime is the
        // 12th, stime the 13th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    pub fn log_count(&self, s: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(s))
            .count()
    }

    /// Panics if the daemon is no longer running, with its exit status.
    pub fn assert_running(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("zc-hostd is gone: {st}");
        }
    }

    pub fn log_contains(&self, s: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(s))
    }
}

impl Drop for Hostd {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Shared guest RAM: a memfd mapped here, at guest-physical 0.
pub struct Ram {
    pub fd: OwnedFd,
    pub map: Mapping,
}

impl Ram {
    pub fn new(size: usize) -> Ram {
        Ram::with_file_len(size, size)
    }

    /// `size` bytes of mapping over a memfd of `file_len` bytes (an
    /// unsealed memfd: it can shrink later). Where the file is shorter,
    /// the test must not touch the rest.
    pub fn with_file_len(size: usize, file_len: usize) -> Ram {
        // SAFETY: memfd_create with a valid C string; result checked.
        let raw = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our memfd.
        assert_eq!(
            unsafe { libc::ftruncate(fd.as_raw_fd(), file_len as i64) },
            0
        );
        let map = Mapping::map(std::os::fd::AsFd::as_fd(&fd), size, false).unwrap();
        Ram { fd, map }
    }

    /// Shrinks the memfd to `len` bytes under everybody's mappings.
    pub fn truncate(&self, len: usize) {
        // SAFETY: ftruncate on our memfd.
        assert_eq!(
            unsafe { libc::ftruncate(self.fd.as_raw_fd(), len as i64) },
            0
        );
    }
}

/// The pool file, mapped by the test frontend.
pub struct PoolMap {
    pub file: std::fs::File,
    pub map: std::sync::Arc<Mapping>,
    pub layout: PoolLayout,
}

impl PoolMap {
    pub fn open(info: &ClusterInfo) -> PoolMap {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&info.pool_path)
            .unwrap();
        let map = std::sync::Arc::new(
            Mapping::map(
                std::os::fd::AsFd::as_fd(&file),
                info.pool_size as usize,
                false,
            )
            .unwrap(),
        );
        let layout = PoolLayout::new(info.cluster, info.buf_size, info.buf_count).unwrap();
        PoolMap { file, map, layout }
    }

    pub fn view(&self) -> zc_proto::PoolView {
        zc_proto::PoolView::owning(self.map.clone(), self.layout).expect("mapped pool_size bytes")
    }

    /// Guest-physical address of a pool descriptor for buffer `b`.
    pub fn desc_gpa(&self, b: u32) -> u64 {
        POOL_GPA
            + self
                .layout
                .packet_offset(zc_proto::BufferIndex::new(b))
                .unwrap()
            - HDR as u64
    }

    pub fn buffer_of_gpa(&self, gpa: u64) -> Option<u32> {
        self.layout
            .buffer_at_packet_offset(gpa.checked_sub(POOL_GPA)?, HDR as u32)
            .map(|b| b.get())
    }
}

/// Guest memory as the test sees it: RAM at 0 (at `ram_gpa` in the table
/// a hostile frontend sends), the pool at POOL_GPA.
pub struct Mem {
    pub ram: Ram,
    pub pool: Option<PoolMap>,
    pub ram_gpa: u64,
}

impl Mem {
    /// The vhost-user memory table: RAM at `ram_gpa` (normally 0) and, when
    /// mapped, the pool at POOL_GPA.
    pub fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        let mut regions = vec![VhostUserMemoryRegionInfo {
            guest_phys_addr: self.ram_gpa,
            memory_size: self.ram.map.len() as u64,
            userspace_addr: self.ram.map.as_ptr() as u64 + self.ram_gpa,
            mmap_offset: 0,
            mmap_handle: self.ram.fd.as_raw_fd(),
        }];
        if let Some(p) = &self.pool {
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: POOL_GPA,
                memory_size: p.layout.pool_size,
                userspace_addr: p.map.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: p.file.as_raw_fd(),
            });
        }
        regions
    }

    pub fn ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        if gpa >= POOL_GPA {
            let p = self.pool.as_ref().unwrap();
            let off = (gpa - POOL_GPA) as usize;
            assert!(off + len <= p.map.len());
            // SAFETY: checked to be inside the mapping.
            unsafe { p.map.as_ptr().add(off) }
        } else {
            assert!(gpa as usize + len <= self.ram.map.len());
            // SAFETY: checked to be inside the mapping.
            unsafe { self.ram.map.as_ptr().add(gpa as usize) }
        }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        // SAFETY: ptr() checked the range; test memory shared with the daemon.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr(gpa, data.len()), data.len())
        }
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        // SAFETY: as in write.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(gpa, len), v.as_mut_ptr(), len) };
        v
    }

    pub fn w16(&self, gpa: u64, v: u16) {
        // SAFETY: aligned field inside a ring the test placed in RAM.
        unsafe { std::ptr::write_volatile(self.ptr(gpa, 2).cast::<u16>(), v) }
    }
    pub fn r16(&self, gpa: u64) -> u16 {
        // SAFETY: as in w16.
        unsafe { std::ptr::read_volatile(self.ptr(gpa, 2).cast::<u16>()) }
    }
    pub fn w32(&self, gpa: u64, v: u32) {
        // SAFETY: as in w16.
        unsafe { std::ptr::write_volatile(self.ptr(gpa, 4).cast::<u32>(), v) }
    }
    pub fn r32(&self, gpa: u64) -> u32 {
        // SAFETY: as in w16.
        unsafe { std::ptr::read_volatile(self.ptr(gpa, 4).cast::<u32>()) }
    }
    pub fn w64(&self, gpa: u64, v: u64) {
        // SAFETY: as in w16.
        unsafe { std::ptr::write_volatile(self.ptr(gpa, 8).cast::<u64>(), v) }
    }
    pub fn r64(&self, gpa: u64) -> u64 {
        // SAFETY: as in w16.
        unsafe { std::ptr::read_volatile(self.ptr(gpa, 8).cast::<u64>()) }
    }
}

/// The driver side of one split virtqueue placed in guest RAM.
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub avail_idx: u16,
    pub used_seen: u16,
    free: Vec<u16>,
    pub kick: EventFd,
    pub call: EventFd,
}

#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub gpa: u64,
    pub len: u32,
    pub write: bool,
}

impl DriverQueue {
    pub fn new(base: u64, size: u16) -> DriverQueue {
        let n = u64::from(size);
        DriverQueue {
            size,
            desc: base,
            avail: base + 16 * n,
            used: (base + 16 * n + 6 + 2 * n + 4095) & !4095,
            avail_idx: 0,
            used_seen: 0,
            free: (0..size).rev().collect(),
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    pub fn end(&self) -> u64 {
        self.used + 6 + 8 * u64::from(self.size)
    }

    pub fn write_desc(&self, m: &Mem, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * u64::from(i);
        m.w64(d, addr);
        m.w32(d + 8, len);
        m.w16(d + 12, flags);
        m.w16(d + 14, next);
    }

    pub fn desc_addr(&self, m: &Mem, i: u16) -> u64 {
        m.r64(self.desc + 16 * u64::from(i))
    }

    /// Adds a chain; returns its head (without publishing it).
    pub fn add(&mut self, m: &Mem, segs: &[Seg]) -> u16 {
        let ids: Vec<u16> = (0..segs.len())
            .map(|_| self.free.pop().expect("ring full"))
            .collect();
        for (k, s) in segs.iter().enumerate() {
            let last = k + 1 == segs.len();
            let flags = if last { 0 } else { 1 } | if s.write { 2 } else { 0 };
            self.write_desc(
                m,
                ids[k],
                s.gpa,
                s.len,
                flags,
                if last { 0 } else { ids[k + 1] },
            );
        }
        self.push_head(m, ids[0]);
        ids[0]
    }

    /// Puts `head` in the avail ring (not yet published).
    pub fn push_head(&mut self, m: &Mem, head: u16) {
        let slot = self.avail_idx % self.size;
        m.w16(self.avail + 4 + 2 * u64::from(slot), head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes the avail index and kicks.
    pub fn publish(&mut self, m: &Mem) {
        fence(Ordering::SeqCst);
        m.w16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        let _ = self.kick.write(1);
    }

    /// Publishes the avail index and kicks only if the device asked for it
    /// (no VRING_USED_F_NO_NOTIFY; with EVENT_IDX, avail_event passed), as
    /// a real driver does; returns whether it kicked.
    pub fn publish_notify(&mut self, m: &Mem, event_idx: bool) -> bool {
        let old = m.r16(self.avail + 2);
        fence(Ordering::SeqCst);
        m.w16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        let kick = if event_idx {
            let ev = m.r16(self.used + 4 + 8 * u64::from(self.size));
            self.avail_idx.wrapping_sub(ev).wrapping_sub(1) < self.avail_idx.wrapping_sub(old)
        } else {
            m.r16(self.used) & 1 == 0
        };
        if kick {
            let _ = self.kick.write(1);
        }
        kick
    }

    /// Used elements published since the last call.
    pub fn take_used(&mut self, m: &Mem) -> Vec<(u16, u32)> {
        fence(Ordering::SeqCst);
        let idx = m.r16(self.used + 2);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            out.push((m.r32(e) as u16, m.r32(e + 4)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Returns a completed chain's descriptors to the free list.
    pub fn recycle(&mut self, m: &Mem, head: u16) {
        let mut i = head;
        for _ in 0..self.size {
            self.free.push(i);
            let d = self.desc + 16 * u64::from(i);
            if m.r16(d + 12) & 1 == 0 {
                break;
            }
            i = m.r16(d + 14);
        }
    }

    /// Waits until `n` used elements arrived in total (beyond `have`).
    pub fn wait_used(&mut self, m: &Mem, n: usize) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while out.len() < n {
            out.extend(self.take_used(m));
            assert!(
                Instant::now() < deadline,
                "timed out: {} of {n} used elements",
                out.len()
            );
            std::thread::yield_now();
        }
        out
    }
}

/// A vhost-user frontend with RX (0) and TX (1) queues in guest RAM.
pub struct TestFrontend {
    pub fe: Frontend,
    pub mem: Mem,
    pub rx: DriverQueue,
    pub tx: DriverQueue,
    pub features: u64,
    /// Next free guest RAM address for packet buffers.
    pub heap: u64,
}

pub struct Setup {
    pub features: u64,
    pub size: u16,
    pub with_pool: bool,
    /// RAM the memory table declares (and the test maps).
    pub ram_size: usize,
    /// Size of the RAM memfd, when it is not `ram_size`.
    pub ram_file_len: Option<usize>,
    /// Guest-physical address of RAM in the memory table, which also says
    /// the region starts that far into the frontend's mapping, at file
    /// offset 0: for a non-zero value a hostile table, whose guest and
    /// frontend addresses agree but whose file offsets are off by as much.
    pub ram_gpa: u64,
    /// Whether `connect` sets up and enables both rings.
    pub start_queues: bool,
}

impl Setup {
    /// The default set-up, offering `features` instead.
    pub fn with_features(features: u64) -> Setup {
        Setup {
            features,
            ..Setup::default()
        }
    }
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            features: VERSION_1 | EVENT_IDX | MRG_RXBUF,
            size: 256,
            with_pool: true,
            ram_size: RAM_SIZE,
            ram_file_len: None,
            ram_gpa: 0,
            start_queues: true,
        }
    }
}

impl TestFrontend {
    pub fn connect(h: &Hostd, sock: &str, s: Setup) -> TestFrontend {
        Self::try_connect(h, sock, s).unwrap()
    }

    /// As `connect`, with the first request the daemon failed or closed
    /// the connection on as the error.
    pub fn try_connect(h: &Hostd, sock: &str, s: Setup) -> vhost::Result<TestFrontend> {
        let (info, _) = h.stats();
        let path = h.sock(sock);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut fe = loop {
            match Frontend::connect(&path, 2) {
                Ok(f) => break f,
                Err(e) => {
                    assert!(Instant::now() < deadline, "cannot connect to {path:?}: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let mem = Mem {
            ram: Ram::with_file_len(s.ram_size, s.ram_file_len.unwrap_or(s.ram_size)),
            pool: s.with_pool.then(|| PoolMap::open(&info)),
            ram_gpa: s.ram_gpa,
        };
        fe.set_owner()?;
        let offered = fe.get_features()?;
        let pf = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_ne!(
            offered & pf,
            0,
            "QEMU's vhost-user-net needs PROTOCOL_FEATURES"
        );
        let features = s.features & offered;
        fe.set_features(features | pf)?;
        let prot = fe.get_protocol_features()?;
        fe.set_protocol_features(prot)?;
        fe.set_mem_table(&mem.regions())?;
        let rx = DriverQueue::new(0, s.size);
        let tx = DriverQueue::new((rx.end() + 4095) & !4095, s.size);
        let heap = (tx.end() + 0xffff) & !0xffff;
        let mut t = TestFrontend {
            fe,
            mem,
            rx,
            tx,
            features,
            heap,
        };
        for i in 0..2 {
            if s.start_queues {
                t.try_start_queue(i)?;
            }
        }
        // A request with a reply: the daemon has taken everything before it.
        t.fe.get_features()?;
        Ok(t)
    }

    pub fn ram_va(&self, gpa: u64) -> u64 {
        self.mem.ram.map.as_ptr() as u64 + gpa
    }

    pub fn start_queue(&mut self, i: usize) {
        self.try_start_queue(i).unwrap()
    }

    pub fn try_start_queue(&mut self, i: usize) -> vhost::Result<()> {
        let q = if i == 0 { &self.rx } else { &self.tx };
        let cfg = VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: self.mem.ram.map.as_ptr() as u64 + q.desc,
            used_ring_addr: self.mem.ram.map.as_ptr() as u64 + q.used,
            avail_ring_addr: self.mem.ram.map.as_ptr() as u64 + q.avail,
            log_addr: None,
        };
        self.fe.set_vring_num(i, q.size)?;
        self.fe.set_vring_addr(i, &cfg)?;
        self.fe.set_vring_base(i, 0)?;
        self.fe.set_vring_call(i, &q.call)?;
        self.fe.set_vring_kick(i, &q.kick)?;
        self.fe.set_vring_enable(i, true)
    }

    /// Guest RAM for a buffer of `len` bytes.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.heap;
        self.heap = (self.heap + len + 63) & !63;
        assert!(self.heap <= self.mem.ram.map.len() as u64);
        a
    }
}

/// Packet `i` of a test stream: `len` bytes, deterministic content.
pub fn payload(i: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| (i.wrapping_mul(31).wrapping_add(k as u32 * 7) % 251) as u8)
        .collect()
}
