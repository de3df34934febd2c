//! State shared between an export's threads: the vhost-user protocol
//! thread and vring worker (through the backend), the worker that steps
//! the export's port, and the daemon's control thread. Control-plane only:
//! the port reads one atomic per step and takes the lock only when it
//! changed.

use super::sigbus::FaultFlag;
use super::spec::ExportSpec;
use crate::stats::{ExportCounters, ExportStats};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use vhost_user_backend::VringRwLock;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::EventNotifier;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long a control request waits for the port to handle it.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(2);

/// What the other threads ask of the port.
#[derive(Default)]
pub struct Ctl {
    /// The current connection's vrings (from the vring worker).
    pub vrings: Option<Vec<VringRwLock>>,
    pub mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    pub mem_gen: u64,
    pub acked_features: u64,
    /// GET_VRING_BASE: stop using ring i and write its state back.
    pub stop: [bool; 2],
    /// Disconnect or reset: forget the device.
    pub drop_device: bool,
    /// Sequence number the port has handled.
    pub acked: u64,
}

pub struct ExportShared {
    pub spec: ExportSpec,
    pub slot: usize,
    pub mac: [u8; 6],
    pub name: String,
    pub counters: ExportCounters,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    seq: AtomicU64,
    /// Set by the vring worker on a kick; the port re-checks rings.
    pub kicked: AtomicBool,
    pub have_vrings: AtomicBool,
    pub exit: Mutex<Option<EventNotifier>>,
    /// Set when the export is being removed: the accept loop ends.
    pub closing: AtomicBool,
    /// Rung on kicks and control requests: one of the port's wake-ups.
    bell: EventFd,
    /// Faults the SIGBUS handler contained in this export's guest memory
    /// (it rings the bell too).
    pub mem_faults: Arc<FaultFlag>,
}

impl ExportShared {
    pub fn new(spec: ExportSpec, slot: usize, mac: [u8; 6]) -> std::io::Result<Self> {
        let bell = EventFd::new(EFD_NONBLOCK)?;
        let mem_faults = Arc::new(FaultFlag::new(Some(bell.try_clone()?)));
        Ok(ExportShared {
            name: spec.name(),
            spec,
            slot,
            mac,
            counters: ExportCounters::default(),
            ctl: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            seq: AtomicU64::new(0),
            kicked: AtomicBool::new(false),
            have_vrings: AtomicBool::new(false),
            exit: Mutex::new(None),
            closing: AtomicBool::new(false),
            bell,
            mem_faults,
        })
    }

    /// Wakes the worker that steps the port, if it sleeps.
    pub fn ring(&self) {
        // A full counter (EAGAIN) means a wake-up is pending already.
        let _ = self.bell.write(1);
    }

    pub fn bell_fd(&self) -> RawFd {
        self.bell.as_raw_fd()
    }

    pub fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest request number (one relaxed-cheap load per poll loop).
    #[inline(always)]
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Changes the control state, wakes the port and, if `wait`, waits
    /// until it handled the change. False on timeout (the port is not on
    /// a worker, or its worker is parked).
    pub fn request(&self, f: impl FnOnce(&mut Ctl), wait: bool) -> bool {
        let mut g = self.lock();
        f(&mut g);
        let s = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        self.ring();
        if !wait {
            return true;
        }
        let (g, res) = self
            .cv
            .wait_timeout_while(g, CTL_TIMEOUT, |c| c.acked < s)
            .unwrap_or_else(|e| e.into_inner());
        drop(g);
        !res.timed_out()
    }

    /// The port: requests up to `s` are handled.
    pub fn ack(&self, g: &mut MutexGuard<'_, Ctl>, s: u64) {
        g.acked = g.acked.max(s);
        self.cv.notify_all();
    }

    pub fn stats(&self) -> ExportStats {
        let c = &self.counters;
        ExportStats {
            name: self.name.clone(),
            path: self.spec.path.display().to_string(),
            mac: super::spec::MacDisplay(&self.mac).to_string(),
            rx_queue: self.spec.rx,
            tx_queue: self.spec.tx,
            rx: c.rx.snapshot(),
            tx: c.tx.snapshot(),
            dev: c.dev.snapshot(),
            worker: None,
        }
    }
}
