//! The PCI transport, inside a VM: the pool is the BAR2 of an ivshmem-plain
//! device, the export is a virtio-net PCI function taken from its kernel
//! driver for as long as the queue is open.
//!
//! Taking a function over: lock it (one process at a time, a lock file with
//! flock), remember its driver, keep drivers off it (driver_override),
//! unbind, enable memory decoding, set Bus Master and INTx-disable, map the
//! modern BAR and walk the capabilities. Giving it back (drop, panic,
//! signal): reset, restore the command register, clear the override, bind
//! the driver it had. After a crash the lock file says which driver that
//! was, and the next open resets the device first anyway.

pub mod caps;
pub mod sysfs;

use crate::cleanup::{self, Registration, Release};
use crate::core::Bell;
use crate::error::{mac_string, Direction, GuestError, Result};
use crate::init::{self, QueueAddrs, Regs};
use crate::pool::PoolMap;
use crate::transport::{Cores, Ends, QueueOffsets, Transport};
use caps::VirtioCaps;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use sysfs::{PciDev, CMD_INTX_DISABLE, CMD_MASTER, CMD_MEMORY};

/// A shared mapping of a sysfs `resourceN` file.
pub struct Bar {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: device memory accessed only with volatile operations.
unsafe impl Send for Bar {}

impl Bar {
    pub fn map(path: &Path) -> Result<(File, Bar)> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| GuestError::io(path, e))?;
        let len = f.metadata().map_err(|e| GuestError::io(path, e))?.len() as usize;
        // SAFETY: a fresh shared mapping of the whole resource; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED || len == 0 {
            return Err(GuestError::io(path, std::io::Error::last_os_error()));
        }
        Ok((f, Bar { ptr: p.cast(), len }))
    }

    /// Pointer to `len` bytes at `off`, if inside the BAR.
    fn at(&self, off: u64, len: u64) -> Option<*mut u8> {
        let end = off.checked_add(len)?;
        // SAFETY: off + len <= self.len, inside the mapping.
        (end <= self.len as u64).then(|| unsafe { self.ptr.add(off as usize) })
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        // SAFETY: the mapping this value created.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// virtio_pci_common_cfg offsets (virtio 1.x, 4.1.4.3).
mod cc {
    pub const DFSELECT: u64 = 0x00;
    pub const DF: u64 = 0x04;
    pub const GFSELECT: u64 = 0x08;
    pub const GF: u64 = 0x0c;
    pub const MSIX: u64 = 0x10;
    pub const NUMQ: u64 = 0x12;
    pub const STATUS: u64 = 0x14;
    pub const Q_SELECT: u64 = 0x16;
    pub const Q_SIZE: u64 = 0x18;
    pub const Q_MSIX: u64 = 0x1a;
    pub const Q_ENABLE: u64 = 0x1c;
    pub const Q_NOFF: u64 = 0x1e;
    pub const Q_DESC: u64 = 0x20;
    pub const Q_AVAIL: u64 = 0x28;
    pub const Q_USED: u64 = 0x30;
    pub const SIZE: u64 = 0x38;
}

/// The common configuration registers in the mapped BAR.
pub struct ModernRegs {
    base: *mut u8,
}

impl ModernRegs {
    fn r8(&self, o: u64) -> u8 {
        // SAFETY: o < cc::SIZE, inside the common structure (checked when built).
        unsafe { std::ptr::read_volatile(self.base.add(o as usize)) }
    }
    fn w8(&mut self, o: u64, v: u8) {
        // SAFETY: as in r8.
        unsafe { std::ptr::write_volatile(self.base.add(o as usize), v) }
    }
    fn r16(&self, o: u64) -> u16 {
        // SAFETY: as in r8; naturally aligned.
        u16::from_le(unsafe { std::ptr::read_volatile(self.base.add(o as usize).cast()) })
    }
    fn w16(&mut self, o: u64, v: u16) {
        // SAFETY: as in r16.
        unsafe { std::ptr::write_volatile(self.base.add(o as usize).cast(), v.to_le()) }
    }
    fn r32(&self, o: u64) -> u32 {
        // SAFETY: as in r8; naturally aligned.
        u32::from_le(unsafe { std::ptr::read_volatile(self.base.add(o as usize).cast()) })
    }
    fn w32(&mut self, o: u64, v: u32) {
        // SAFETY: as in r32.
        unsafe { std::ptr::write_volatile(self.base.add(o as usize).cast(), v.to_le()) }
    }
    fn w64(&mut self, o: u64, v: u64) {
        self.w32(o, v as u32);
        self.w32(o + 4, (v >> 32) as u32);
    }
}

impl Regs for ModernRegs {
    fn status(&self) -> u8 {
        self.r8(cc::STATUS)
    }
    fn set_status(&mut self, s: u8) {
        self.w8(cc::STATUS, s)
    }
    fn device_features(&mut self) -> u64 {
        self.w32(cc::DFSELECT, 0);
        let lo = self.r32(cc::DF);
        self.w32(cc::DFSELECT, 1);
        let hi = self.r32(cc::DF);
        u64::from(lo) | (u64::from(hi) << 32)
    }
    fn set_driver_features(&mut self, f: u64) {
        self.w32(cc::GFSELECT, 0);
        self.w32(cc::GF, f as u32);
        self.w32(cc::GFSELECT, 1);
        self.w32(cc::GF, (f >> 32) as u32);
    }
    fn num_queues(&self) -> u16 {
        self.r16(cc::NUMQ)
    }
    fn select_queue(&mut self, q: u16) {
        self.w16(cc::Q_SELECT, q)
    }
    fn queue_size(&self) -> u16 {
        self.r16(cc::Q_SIZE)
    }
    fn set_queue_size(&mut self, n: u16) {
        self.w16(cc::Q_SIZE, n)
    }
    fn set_queue_vector(&mut self, v: u16) {
        self.w16(cc::Q_MSIX, v)
    }
    fn set_queue_addrs(&mut self, desc: u64, avail: u64, used: u64) {
        self.w64(cc::Q_DESC, desc);
        self.w64(cc::Q_AVAIL, avail);
        self.w64(cc::Q_USED, used);
    }
    fn set_queue_enable(&mut self) {
        self.w16(cc::Q_ENABLE, 1)
    }
}

/// Where per-device lock files live (`$ZC_GUEST_STATE`, default /run/zc-guest).
fn state_dir() -> PathBuf {
    std::env::var_os("ZC_GUEST_STATE").map_or_else(|| PathBuf::from("/run/zc-guest"), PathBuf::from)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The lock on one PCI function: held while the file is open.
struct Lock {
    file: File,
    path: PathBuf,
}

/// What a lock file says about its device: lines of pid, kernel driver and
/// interface name (`-` for none).
struct Record {
    driver: Option<String>,
    ifname: Option<String>,
}

impl Record {
    fn read(path: &Path) -> Record {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let field = |i| {
            text.lines()
                .nth(i)
                .map(str::trim)
                .filter(|v| !v.is_empty() && *v != "-")
                .map(String::from)
        };
        Record {
            driver: field(1),
            ifname: field(2),
        }
    }
}

impl Lock {
    /// Takes the lock of `bdf`; returns it and what a previous owner (a
    /// crashed one) recorded.
    fn take(bdf: &str) -> Result<(Lock, Record)> {
        let dir = state_dir();
        std::fs::create_dir_all(&dir).map_err(|e| GuestError::io(&dir, e))?;
        let path = dir.join(format!("{bdf}.lock"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| GuestError::io(&path, e))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.lines().next()?.trim().parse().ok())
                .unwrap_or(0);
            return Err(GuestError::Busy {
                what: format!("PCI device {bdf}"),
                pid,
            });
        }
        let previous = Record::read(&path);
        Ok((Lock { file, path }, previous))
    }

    /// Writes who holds the device, the driver to give it back to, and its
    /// interface name (so that `zc:<ifname>` still finds it after a crash,
    /// when the interface is gone).
    fn record(&mut self, driver: Option<&str>, ifname: Option<&str>) {
        let _ = self.file.set_len(0);
        let _ = (&self.file).write_all(
            format!(
                "{}\n{}\n{}\n",
                std::process::id(),
                driver.unwrap_or("-"),
                ifname.unwrap_or("-")
            )
            .as_bytes(),
        );
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A virtio-net PCI function owned by this process.
pub struct PciDevice {
    dev: PciDev,
    root: PathBuf,
    regs: ModernRegs,
    caps: VirtioCaps,
    /// `None` once unmapped, on the way out.
    notify: Option<Bar>,
    /// The mapping `regs` points into; `None` once unmapped.
    common: Option<Bar>,
    pool_gpa: u64,
    driver: Option<String>,
    command: u16,
    enabled_by_us: bool,
    /// What a panic or a fatal signal does to give the device back.
    release: Option<Registration>,
    _lock: Lock,
}

// SAFETY: the raw pointers point into BAR mappings owned by this value.
unsafe impl Send for PciDevice {}

impl PciDevice {
    /// Takes `dev` over (see the module comment).
    fn take(root: &Path, dev: PciDev, pool_gpa: u64) -> Result<Self> {
        if !is_root() {
            return Err(GuestError::NotRoot { bdf: dev.bdf });
        }
        let (mut lock, previous) = Lock::take(&dev.bdf)?;
        let driver = dev.driver().or(previous.driver);
        let ifname = dev.kernel_ifname().or(previous.ifname);
        lock.record(driver.as_deref(), ifname.as_deref());
        let give_back = |dev: &PciDev| {
            let _ = dev.set_override(None);
            if let Some(d) = &driver {
                let _ = dev.bind(root, d);
            }
        };
        match Self::claim(root, &dev, driver.clone(), pool_gpa, lock) {
            Ok(p) => Ok(p),
            Err(e) => {
                give_back(&dev);
                Err(e)
            }
        }
    }

    fn claim(
        root: &Path,
        dev: &PciDev,
        driver: Option<String>,
        pool_gpa: u64,
        lock: Lock,
    ) -> Result<Self> {
        let dev = dev.clone();
        dev.set_override(Some("zc-guest"))?;
        dev.unbind()?;
        let enabled_by_us = dev.enable()?;
        let command = dev.command()? & !CMD_INTX_DISABLE;
        dev.set_command(command | CMD_MEMORY | CMD_MASTER | CMD_INTX_DISABLE)?;
        let caps = caps::walk(&dev.config()?).ok_or_else(|| GuestError::Device {
            bdf: dev.bdf.clone(),
            msg: "no virtio-pci modern capabilities: start QEMU with a modern or transitional virtio-net-pci".into(),
        })?;
        let (_, common) = Bar::map(&dev.resource_path(caps.common.bar))?;
        let (_, notify) = if caps.notify.bar == caps.common.bar {
            Bar::map(&dev.resource_path(caps.common.bar))?
        } else {
            Bar::map(&dev.resource_path(caps.notify.bar))?
        };
        let base = common
            .at(u64::from(caps.common.offset), cc::SIZE)
            .filter(|_| u64::from(caps.common.length) >= cc::SIZE)
            .ok_or_else(|| GuestError::Device {
                bdf: dev.bdf.clone(),
                msg: "common configuration lies outside its BAR".into(),
            })?;
        let mut writes = vec![];
        let override_path = dev.dir.join("driver_override");
        if override_path.exists() {
            writes.push((cstr(&override_path), b"\n".to_vec()));
        }
        if let Some(d) = &driver {
            writes.push((
                cstr(&root.join("bus/pci/drivers").join(d).join("bind")),
                dev.bdf.clone().into_bytes(),
            ));
        }
        let release = cleanup::register(Release {
            // SAFETY: STATUS < cc::SIZE, inside the checked common structure.
            status: unsafe { base.add(cc::STATUS as usize) },
            writes,
        });
        log::info!(
            "zc-guest: took over PCI device {} (driver {})",
            dev.bdf,
            driver.as_deref().unwrap_or("none")
        );
        Ok(PciDevice {
            regs: ModernRegs { base },
            root: root.to_path_buf(),
            caps,
            notify: Some(notify),
            common: Some(common),
            pool_gpa,
            driver,
            command,
            enabled_by_us,
            release,
            _lock: lock,
            dev,
        })
    }

    pub fn bdf(&self) -> &str {
        &self.dev.bdf
    }

    /// Resets the device (it stops using rings and buffers); the kernel
    /// driver gets it back when this value drops.
    pub fn stop(&mut self) {
        let _ = init::reset(&mut self.regs);
    }

    fn err(&self, msg: impl Into<String>) -> GuestError {
        GuestError::Device {
            bdf: self.dev.bdf.clone(),
            msg: msg.into(),
        }
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_default()
}

impl Transport for PciDevice {
    fn begin(&mut self) -> Result<u64> {
        Ok(init::begin(&mut self.regs)?)
    }

    fn queue_size(&mut self, q: u16, limit: u16) -> Result<u16> {
        Ok(init::queue_size(&mut self.regs, q, limit)?)
    }

    fn setup_queue(&mut self, q: u16, at: QueueOffsets) -> Result<Bell> {
        let gpa = |off: u64| self.pool_gpa + off;
        let a = QueueAddrs {
            size: at.size,
            desc: gpa(at.desc),
            avail: gpa(at.avail),
            used: gpa(at.used),
        };
        self.regs.select_queue(q);
        let noff = u64::from(self.regs.r16(cc::Q_NOFF));
        init::setup_queue(&mut self.regs, q, a);
        let off =
            u64::from(self.caps.notify.offset) + noff * u64::from(self.caps.notify_multiplier);
        let notify = self
            .notify
            .as_ref()
            .and_then(|n| n.at(off, 2))
            .ok_or_else(|| {
                self.err(format!(
                    "notify address {off:#x} of queue {q} lies outside its BAR"
                ))
            })?;
        Ok(Bell::Mmio {
            notify: notify.cast(),
            queue: q,
        })
    }

    fn start(&mut self) -> Result<()> {
        // Interrupts off for the device as a whole (no MSI-X vector).
        self.regs.w16(cc::MSIX, init::NO_VECTOR);
        Ok(init::finish(&mut self.regs)?)
    }

    fn pool_gpa(&self) -> u64 {
        self.pool_gpa
    }
}

impl Drop for PciDevice {
    /// Gives the device back. The signal-time release goes first: it resets
    /// the device through the common BAR and binds the kernel driver, so
    /// once the BAR is unmapped it would write to nothing, and once the
    /// driver has the device it would reset a device the kernel owns. A
    /// signal after that leaves the device unreset and unbound, as a
    /// SIGKILL does; the lock file's record lets the next open recover it.
    fn drop(&mut self) {
        if let Some(r) = self.release.take() {
            if !r.unregister() {
                log::info!(
                    "zc-guest: PCI device {} was given back already (panic)",
                    self.dev.bdf
                );
                return;
            }
        }
        let _ = init::reset(&mut self.regs);
        let _ = self.dev.set_command(self.command & !CMD_MASTER);
        if self.enabled_by_us {
            let _ = self.dev.disable();
        }
        // `regs` points into `common`: not used again.
        self.notify = None;
        self.common = None;
        let _ = self.dev.set_override(None);
        if let Some(d) = &self.driver {
            if let Err(e) = self.dev.bind(&self.root, d) {
                log::warn!("zc-guest: cannot give {} back to {d}: {e}", self.dev.bdf);
            }
        }
        log::info!("zc-guest: gave PCI device {} back", self.dev.bdf);
    }
}

/// The ivshmem pool of `cluster`: the device, its pool mapping and the
/// guest-physical base of its BAR2.
pub fn find_pool(root: &Path, cluster: u32) -> Result<(PciDev, PoolMap, u64)> {
    for d in sysfs::devices(root).into_iter().filter(PciDev::is_ivshmem) {
        match peek(&d) {
            Peek::Cluster(c) if c == cluster => {}
            Peek::NotRoot => return Err(GuestError::NotRoot { bdf: d.bdf }),
            _ => continue,
        }
        let path = d.resource_path(2);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| GuestError::io(&path, e))?;
        let (gpa, size) = d.bar(2)?;
        let pool = PoolMap::map(&f, size, &path)?;
        return Ok((d, pool, gpa));
    }
    Err(GuestError::NoPool { cluster })
}

/// What BAR2 of an ivshmem device shows this process.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Peek {
    /// The pool of this cluster.
    Cluster(u32),
    /// Only root may read it (sysfs resource files are 0600): it may well
    /// hold a zc pool.
    NotRoot,
    /// No zc pool, or unreadable for another reason.
    Nothing,
}

fn peek(d: &PciDev) -> Peek {
    match File::open(d.resource_path(2)) {
        Ok(f) => PoolMap::peek_cluster(&f).map_or(Peek::Nothing, Peek::Cluster),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Peek::NotRoot,
        Err(_) => Peek::Nothing,
    }
}

/// Whether an ivshmem device on the bus holds the pool of `cluster` (any
/// cluster if `None`), or may hold it but only root can tell: then the
/// PCI transport's open says that it needs root.
pub fn has_pool(root: &Path, cluster: Option<u32>) -> bool {
    sysfs::devices(root)
        .into_iter()
        .filter(PciDev::is_ivshmem)
        .any(|d| match peek(&d) {
            Peek::Cluster(c) => cluster.is_none_or(|want| want == c),
            Peek::NotRoot => true,
            Peek::Nothing => false,
        })
}

/// Every ivshmem zc pool on the bus, mapped.
fn all_pools(root: &Path) -> Result<Vec<(PoolMap, u64)>> {
    let mut v = Vec::new();
    for d in sysfs::devices(root).into_iter().filter(PciDev::is_ivshmem) {
        match peek(&d) {
            Peek::Cluster(cluster) => {
                if let Ok((_, p, gpa)) = find_pool(root, cluster) {
                    v.push((p, gpa));
                }
            }
            Peek::NotRoot => return Err(GuestError::NotRoot { bdf: d.bdf }),
            Peek::Nothing => {}
        }
    }
    Ok(v)
}

/// MAC of a virtio-net function: from its kernel interface, or (unbound)
/// from its device configuration.
fn device_mac(d: &PciDev) -> Option<[u8; 6]> {
    if let Some(m) = d.kernel_mac() {
        return Some(m);
    }
    if d.driver().is_some() {
        return None;
    }
    let c = caps::walk(&d.config().ok()?)?;
    let dc = c.device?;
    let _ = d.enable();
    let cmd = d.command().ok()?;
    if cmd & CMD_MEMORY == 0 {
        d.set_command(cmd | CMD_MEMORY).ok()?;
    }
    let (_, bar) = Bar::map(&d.resource_path(dc.bar)).ok()?;
    let p = bar.at(u64::from(dc.offset), 6)?;
    let mut m = [0u8; 6];
    for (i, b) in m.iter_mut().enumerate() {
        // SAFETY: p..p + 6 lies in the device config structure inside the BAR.
        *b = unsafe { std::ptr::read_volatile(p.add(i)) };
    }
    Some(m)
}

/// The virtio-net function with MAC `mac`.
fn find_net(root: &Path, mac: [u8; 6]) -> Option<PciDev> {
    sysfs::devices(root)
        .into_iter()
        .filter(PciDev::is_virtio_net)
        .find(|d| device_mac(d) == Some(mac))
}

/// Opens the PCI device of the export whose `by` queue is `queue` of
/// `cluster`, with the cores `ends` asks for.
pub fn open_queue(
    cluster: u32,
    queue: u16,
    by: Direction,
    ends: Ends,
) -> Result<(Cores, PciDevice, Arc<PoolMap>)> {
    let root = sysfs::sys_root();
    let (_, pool, gpa) = find_pool(&root, cluster)?;
    let pool = Arc::new(pool);
    let (slot, entry) = pool.export_for_queue(queue, by)?;
    let dev = find_net(&root, entry.mac).ok_or_else(|| GuestError::NoDevice {
        cluster,
        mac: mac_string(&entry.mac),
    })?;
    let mut pci = PciDevice::take(&root, dev, gpa)?;
    let cores = crate::transport::bring_up(&mut pci, &pool, slot, &entry, ends)?;
    Ok((cores, pci, pool))
}

/// Opens the virtio-net device behind interface `ifname` with the cores
/// `ends` asks for; its export is found by MAC among the zc pools on the bus.
pub fn open_interface(ifname: &str, ends: Ends) -> Result<(Cores, PciDevice, Arc<PoolMap>)> {
    let root = sysfs::sys_root();
    let dev_dir = match sysfs::interface_device(&root, ifname) {
        Some(d) => d,
        None if root.join("class/net").join(ifname).exists() => {
            return Err(GuestError::NotVirtio {
                ifname: ifname.into(),
            })
        }
        None => match recover_interface(&root, ifname)? {
            Some(d) => d,
            None => return Err(GuestError::NoInterface(ifname.into())),
        },
    };
    let dev = sysfs::devices(&root)
        .into_iter()
        .find(|d| std::fs::canonicalize(&d.dir).ok().as_deref() == Some(dev_dir.as_path()))
        .filter(PciDev::is_virtio_net)
        .ok_or_else(|| GuestError::NotVirtio {
            ifname: ifname.into(),
        })?;
    let mac = dev.kernel_mac().ok_or_else(|| GuestError::NotVirtio {
        ifname: ifname.into(),
    })?;
    for (pool, gpa) in all_pools(&root)? {
        if let Some((slot, entry)) = pool.export_for_mac(mac) {
            let pool = Arc::new(pool);
            let mut pci = PciDevice::take(&root, dev, gpa)?;
            let cores = crate::transport::bring_up(&mut pci, &pool, slot, &entry, ends)?;
            return Ok((cores, pci, pool));
        }
    }
    Err(GuestError::NotAnExport {
        ifname: ifname.into(),
        mac: mac_string(&mac),
    })
}

/// After a crash the device behind `ifname` is left without a driver, so
/// the interface is gone; the lock file the crashed holder left names it.
/// Gives the device back to the driver recorded there and waits for the
/// interface to return; its sysfs device directory, or `None` when no lock
/// file names `ifname`.
fn recover_interface(root: &Path, ifname: &str) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(state_dir()) else {
        return Ok(None);
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(bdf) = file.strip_suffix(".lock") else {
            continue;
        };
        if Record::read(&e.path()).ifname.as_deref() != Some(ifname) {
            continue;
        }
        // Busy if its holder is alive: that error is the answer.
        let (lock, previous) = Lock::take(bdf)?;
        let Some(driver) = previous.driver else {
            return Ok(None);
        };
        let Some(dev) = sysfs::devices(root).into_iter().find(|d| d.bdf == bdf) else {
            return Ok(None);
        };
        let _ = dev.set_override(None);
        dev.bind(root, &driver)?;
        drop(lock);
        log::info!("zc-guest: gave {bdf} back to {driver} after a crash; waiting for {ifname}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Some(d) = sysfs::interface_device(root, ifname) {
                return Ok(Some(d));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        return Ok(None);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::time::{Duration, Instant};

    const BDF: &str = "0000:00:04.0";
    const DRIVER: &str = "virtio-pci";

    /// A virtio-net function in a fake sysfs tree under `root`, bound to
    /// DRIVER, with QEMU's capability layout over a file for BAR4. The
    /// driver's `bind` file is a FIFO, so a test sees when it is written.
    fn fake_net(root: &Path) -> PciDev {
        let d = root.join("bus/pci/devices").join(BDF);
        let drv = root.join("bus/pci/drivers").join(DRIVER);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::create_dir_all(&drv).unwrap();
        for (f, v) in [
            ("vendor", "0x1af4\n"),
            ("device", "0x1000\n"),
            ("subsystem_device", "0x0001\n"),
            ("enable", "1\n"),
            ("driver_override", "\n"),
        ] {
            std::fs::write(d.join(f), v).unwrap();
        }
        std::fs::write(d.join("config"), caps::tests::qemu_net_config()).unwrap();
        std::fs::write(d.join("resource4"), vec![0u8; 0x4000]).unwrap();
        std::fs::write(drv.join("unbind"), "").unwrap();
        let fifo = CString::new(drv.join("bind").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink(&drv, d.join("driver")).unwrap();
        sysfs::devices(root)
            .into_iter()
            .find(|p| p.bdf == BDF)
            .unwrap()
    }

    /// Open descriptors of this process on `path`.
    fn fds_on(path: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t == path)
            .count()
    }

    fn mapped(path: &Path) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines().any(|l| l.ends_with(path.to_str().unwrap()))
    }

    /// A fatal signal (its handler: cleanup::release_all) at the moment the
    /// kernel driver gets the device back must not release it again: by
    /// then the release is unregistered and the BARs are unmapped. The
    /// driver's bind file is a full pipe, so giving the device back stops
    /// right in the bind write while the test looks and "signals".
    #[test]
    fn a_signal_while_the_driver_is_rebound_does_not_release_the_device_again() {
        let _one = cleanup::RELEASING.lock().unwrap_or_else(|e| e.into_inner());
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let dev = fake_net(&root);
        let lock_path = root.join("lock");
        let lock = Lock {
            file: File::create(&lock_path).unwrap(),
            path: lock_path,
        };
        let pci = PciDevice::claim(&root, &dev, Some(DRIVER.into()), 0xf800_0000, lock).unwrap();
        // The kernel's unbind removes the link; the fake tree's does not.
        std::fs::remove_file(dev.dir.join("driver")).unwrap();
        let bind = root.join("bus/pci/drivers").join(DRIVER).join("bind");
        let bar = dev.resource_path(4);
        assert!(mapped(&bar));
        // Reader and writer of the FIFO at once: fill it.
        let pipe = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&bind)
            .unwrap();
        let junk = [b'.'; 4096];
        while (&pipe).write(&junk).is_ok() {}
        let dropper = std::thread::spawn(move || drop(pci));
        let deadline = Instant::now() + Duration::from_secs(10);
        while fds_on(&bind) < 2 {
            assert!(Instant::now() < deadline, "the device was never rebound");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Giving back is in the bind write now.
        let bar_mapped = mapped(&bar);
        let status_at = cc::STATUS;
        let bar_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&bar)
            .unwrap();
        bar_file.write_all_at(&[0x0f], status_at).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let signal = std::thread::spawn(move || {
            cleanup::release_all();
            let _ = done_tx.send(());
        });
        let released_quietly = done_rx.recv_timeout(Duration::from_secs(1)).is_ok();
        let mut status = [0u8];
        bar_file.read_exact_at(&mut status, status_at).unwrap();
        // Let every writer finish, and collect what they bound.
        let mut written = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut &pipe, &mut buf) {
                Ok(n) => written.extend_from_slice(&buf[..n]),
                Err(_) if dropper.is_finished() && signal.is_finished() => break,
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        dropper.join().unwrap();
        signal.join().unwrap();
        let binds = written
            .windows(BDF.len())
            .filter(|w| *w == BDF.as_bytes())
            .count();
        assert!(
            released_quietly && status[0] == 0x0f && binds == 1,
            "a signal after the rebind released the device again: release returned {released_quietly}, \
             status {:#x} (0x0f untouched), {binds} bind writes",
            status[0]
        );
        assert!(
            !bar_mapped,
            "BAR4 was still mapped when the driver got the device"
        );
        assert_eq!(
            std::fs::read_to_string(dev.dir.join("driver_override")).unwrap(),
            "\n"
        );
    }
}
