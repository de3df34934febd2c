//! State shared between an export's threads: the vhost-user protocol
//! thread and vring worker (through the backend), the poll thread, and the
//! daemon's control thread. Control-plane only: the poll thread reads one
//! atomic per loop and takes the lock only when it changed.

use super::spec::ExportSpec;
use super::stats::{ExportCounters, ExportStats};
use crate::futex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;
use vhost_user_backend::VringRwLock;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::EventNotifier;
use zc_proto::BufferIndex;

/// How long a control request waits for the poll thread.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(2);

/// A futex word the poll thread sleeps on, and anyone may ring.
#[derive(Clone, Copy)]
pub struct Doorbell(*const AtomicU32);

// SAFETY: the word lives in the cluster's queue memory or in ExportShared,
// both kept alive for as long as any Doorbell copy is used (the daemon's
// lifetime); it is only accessed atomically.
unsafe impl Send for Doorbell {}
// SAFETY: as above.
unsafe impl Sync for Doorbell {}

impl Doorbell {
    /// # Safety
    /// `word` must stay valid while the doorbell is used.
    pub unsafe fn new(word: *const AtomicU32) -> Self {
        Doorbell(word)
    }

    pub fn word(&self) -> &AtomicU32 {
        // SAFETY: `new`'s contract.
        unsafe { &*self.0 }
    }

    pub fn ring(&self) {
        self.word().fetch_add(1, Ordering::Release);
        futex::wake_all(self.word());
    }
}

/// What the other threads ask of the poll thread.
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
    /// Reclaim: park and report held buffers.
    pub pause: bool,
    pub paused: bool,
    pub held: Vec<BufferIndex>,
    /// Detach: stop for good, hand back every buffer and end the thread.
    pub quit: bool,
    pub quitted: bool,
    /// Sequence number the poll thread has handled.
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
    /// Set by the vring worker on a kick; the poll thread re-checks rings.
    pub kicked: AtomicBool,
    pub have_vrings: AtomicBool,
    pub exit: Mutex<Option<EventNotifier>>,
    /// Set when the export is being removed: the accept loop ends.
    pub closing: AtomicBool,
    /// The doorbell word of exports without an rx queue.
    pub own_word: AtomicU32,
    doorbell: Mutex<Option<Doorbell>>,
}

impl ExportShared {
    pub fn new(spec: ExportSpec, slot: usize, mac: [u8; 6]) -> Self {
        ExportShared {
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
            own_word: AtomicU32::new(0),
            doorbell: Mutex::new(None),
        }
    }

    pub fn set_doorbell(&self, d: Doorbell) {
        *self.doorbell.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
    }

    pub fn ring(&self) {
        if let Some(d) = *self.doorbell.lock().unwrap_or_else(|e| e.into_inner()) {
            d.ring();
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest request number (one relaxed-cheap load per poll loop).
    #[inline(always)]
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Changes the control state, wakes the poll thread and, if `wait`,
    /// waits until it handled the change. False on timeout.
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

    /// The poll thread: requests up to `s` are handled.
    pub fn ack(&self, g: &mut MutexGuard<'_, Ctl>, s: u64) {
        g.acked = g.acked.max(s);
        self.cv.notify_all();
    }

    /// The poll thread, parked for a reclaim: waits until resumed.
    pub fn park<'a>(&'a self, g: MutexGuard<'a, Ctl>) -> MutexGuard<'a, Ctl> {
        self.cv
            .wait_while(g, |c| c.pause)
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn notify_all(&self) {
        self.cv.notify_all();
    }

    /// Waits (bounded) until the poll thread parked; returns what it holds.
    pub fn wait_parked(&self) -> Option<Vec<BufferIndex>> {
        let g = self.lock();
        let (mut g, res) = self
            .cv
            .wait_timeout_while(g, CTL_TIMEOUT, |c| c.pause && !c.paused)
            .unwrap_or_else(|e| e.into_inner());
        if res.timed_out() || !g.paused {
            return None;
        }
        Some(std::mem::take(&mut g.held))
    }

    /// Ends the poll thread for good and returns every buffer the export
    /// held (its hands and everything its guest held); `None` if the thread
    /// did not answer in time (then it keeps them).
    pub fn quit(&self) -> Option<Vec<BufferIndex>> {
        self.request(|c| c.quit = true, true);
        let mut g = self.lock();
        g.quitted.then(|| std::mem::take(&mut g.held))
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
        }
    }
}
