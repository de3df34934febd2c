//! The vhost-user transport: this process is the frontend (what QEMU is for
//! a VM) on an export's socket. Its "guest memory" is a small memfd at
//! guest-physical 0 (like a VM's RAM) and the pool file at POOL_GPA (like
//! the ivshmem BAR), so the backend sees the same memory table shape as
//! with a VM and recognises the pool by its file.

use crate::core::Bell;
use crate::error::{GuestError, Result};
use crate::init::negotiate;
use crate::transport::{QueueOffsets, Transport};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest-physical address of the pool in the memory table (where QEMU's
/// hot-plugged ivshmem BAR lands, 4 GiB).
pub const POOL_GPA: u64 = 0x1_0000_0000;
/// Size of the memfd standing in for guest RAM at guest-physical 0.
pub const RAM_SIZE: u64 = 2 << 20;

const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// A memfd mapping, unmapped on drop.
struct Ram {
    fd: OwnedFd,
    ptr: *mut u8,
}

impl Ram {
    fn new() -> std::io::Result<Ram> {
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"zc-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), RAM_SIZE as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh shared mapping of the memfd; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Ram { fd, ptr: p.cast() })
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: the mapping this value created.
        unsafe { libc::munmap(self.ptr.cast(), RAM_SIZE as usize) };
    }
}

/// A connection to a vhost-user backend, driving one virtio-net device.
pub struct VhostUser {
    path: PathBuf,
    fe: Frontend,
    ram: Ram,
    pool_file: File,
    pool_ptr: *mut u8,
    pool_size: u64,
    protocol: bool,
    started: [bool; 2],
}

// SAFETY: pool_ptr and the memfd mapping stay valid while this value lives
// (their owners are kept alongside); they are only passed to the backend as
// numbers.
unsafe impl Send for VhostUser {}

impl VhostUser {
    /// Connects to `path`; the pool is `pool_file`, mapped at `pool_ptr`.
    pub fn connect(
        path: &Path,
        pool_file: File,
        pool_ptr: *mut u8,
        pool_size: u64,
    ) -> Result<Self> {
        let err = |msg: String| GuestError::VhostUser {
            path: path.to_path_buf(),
            msg,
        };
        let fe = Frontend::connect(path, 2).map_err(|e| {
            err(format!(
                "cannot connect ({e}); is zc-hostd running with --export {},...?",
                path.display()
            ))
        })?;
        let ram = Ram::new().map_err(|e| err(format!("memfd: {e}")))?;
        Ok(VhostUser {
            path: path.to_path_buf(),
            fe,
            ram,
            pool_file,
            pool_ptr,
            pool_size,
            protocol: false,
            started: [false; 2],
        })
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> GuestError {
        GuestError::VhostUser {
            path: self.path.clone(),
            msg: format!("{what}: {e}"),
        }
    }
}

impl Transport for VhostUser {
    fn begin(&mut self) -> Result<u64> {
        self.fe.set_owner().map_err(|e| self.err("SET_OWNER", e))?;
        let offered = self
            .fe
            .get_features()
            .map_err(|e| self.err("GET_FEATURES", e))?;
        let mut f = negotiate(offered).map_err(|e| self.err("features", e))?;
        if offered & F_PROTOCOL_FEATURES != 0 {
            f |= F_PROTOCOL_FEATURES;
            self.protocol = true;
        }
        // Protocol features are set before SET_FEATURES (as QEMU does).
        if self.protocol {
            let pf = self
                .fe
                .get_protocol_features()
                .map_err(|e| self.err("GET_PROTOCOL_FEATURES", e))?;
            // Not CONFIG: which export a socket serves is the daemon's
            // word (see `queue::open_vhost_user`), and zc-hostd does not
            // offer CONFIG (QEMU's vhost-user-net warns about it).
            let want = pf & VhostUserProtocolFeatures::REPLY_ACK;
            self.fe
                .set_protocol_features(want)
                .map_err(|e| self.err("SET_PROTOCOL_FEATURES", e))?;
        }
        self.fe
            .set_features(f)
            .map_err(|e| self.err("SET_FEATURES", e))?;
        let regions = [
            VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: RAM_SIZE,
                userspace_addr: self.ram.ptr as u64,
                mmap_offset: 0,
                mmap_handle: self.ram.fd.as_raw_fd(),
            },
            VhostUserMemoryRegionInfo {
                guest_phys_addr: POOL_GPA,
                memory_size: self.pool_size,
                userspace_addr: self.pool_ptr as u64,
                mmap_offset: 0,
                mmap_handle: self.pool_file.as_raw_fd(),
            },
        ];
        self.fe
            .set_mem_table(&regions)
            .map_err(|e| self.err("SET_MEM_TABLE", e))?;
        Ok(f & !F_PROTOCOL_FEATURES)
    }

    fn queue_size(&mut self, _q: u16, limit: u16) -> Result<u16> {
        // The frontend chooses; the zc host takes up to 1024, DPDK 32768.
        Ok(limit)
    }

    fn setup_queue(&mut self, q: u16, at: QueueOffsets) -> Result<Bell> {
        let i = usize::from(q);
        let ua = |off: u64| self.pool_ptr as u64 + off;
        let cfg = VringConfigData {
            queue_max_size: at.size,
            queue_size: at.size,
            flags: 0,
            desc_table_addr: ua(at.desc),
            used_ring_addr: ua(at.used),
            avail_ring_addr: ua(at.avail),
            log_addr: None,
        };
        let kick = EventFd::new(EFD_NONBLOCK).map_err(|e| self.err("eventfd", e))?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(|e| self.err("eventfd", e))?;
        self.fe
            .set_vring_num(i, at.size)
            .map_err(|e| self.err("SET_VRING_NUM", e))?;
        self.fe
            .set_vring_base(i, 0)
            .map_err(|e| self.err("SET_VRING_BASE", e))?;
        self.fe
            .set_vring_addr(i, &cfg)
            .map_err(|e| self.err("SET_VRING_ADDR", e))?;
        self.fe
            .set_vring_call(i, &call)
            .map_err(|e| self.err("SET_VRING_CALL", e))?;
        self.fe
            .set_vring_kick(i, &kick)
            .map_err(|e| self.err("SET_VRING_KICK", e))?;
        self.started[i] = true;
        Ok(Bell::Eventfd { kick, call })
    }

    fn start(&mut self) -> Result<()> {
        if self.protocol {
            for i in 0..2 {
                if self.started[i] {
                    self.fe
                        .set_vring_enable(i, true)
                        .map_err(|e| self.err("SET_VRING_ENABLE", e))?;
                }
            }
        }
        Ok(())
    }

    fn pool_gpa(&self) -> u64 {
        POOL_GPA
    }
}

impl VhostUser {
    /// Stops the rings: the backend writes their state back and stops
    /// touching them and the buffers.
    pub fn stop(&mut self) {
        for i in 0..2 {
            if std::mem::take(&mut self.started[i]) {
                let _ = self.fe.get_vring_base(i);
            }
        }
    }
}

impl Drop for VhostUser {
    fn drop(&mut self) {
        self.stop();
    }
}
