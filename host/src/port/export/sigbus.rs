//! Containing SIGBUS from guest memory whose file shrank after it was mapped.
//!
//! `mem_table` refuses regions larger than their files, but a file can
//! still shrink later: QEMU's `memory-backend-memfd` seals its memfd against
//! that by default (seen here, QEMU 10: F_SEAL_SHRINK | F_SEAL_GROW |
//! F_SEAL_SEAL), while `seal=off`, `memory-backend-file` guest RAM and other
//! frontends' files can be truncated at any time. A touch of a page past
//! the new end raises SIGBUS, whose default action ends the daemon and
//! every export with it.
//!
//! So a process-wide handler knows the host ranges of the guest regions the
//! exports currently use (a fixed table of slots, each a seqlock of atomics,
//! so the handler is async-signal-safe: it takes no lock and allocates
//! nothing). For a fault inside one it replaces the faulting page with an
//! anonymous one (`mmap(MAP_FIXED)`), counts the fault in the owning
//! export's `FaultFlag` (which also rings the port's bell), and returns:
//! the access is retried on the new page, and the export's port, on its
//! next step, marks the device NEEDS_RESET and drops it. A fault anywhere else gets the action that was there before
//! (the default one, or Rust's own stack-overflow handler, which falls back
//! to the default), so a real crash stays a crash.
//!
//! Who registers: `GuestMap`, for each guest RAM region it holds, for
//! exactly as long as it holds the region's mapping (its `Registration` is
//! dropped before the `Arc` of the mapping), so a range is never registered
//! while unmapped and the handler never replaces pages of memory that has
//! since been reused for something else. The port builds the map of a new
//! table before vhost-user-backend handles the frontend's next message
//! (`update_memory` waits for it), and keeps it until the table is
//! replaced or the frontend is gone, also after a fault (the poisoned maps
//! of `ExportPort`). That covers every touch: the port's, through the map,
//! on whichever worker steps it, and the one vhost-user-backend makes
//! itself (it reads a ring's used index at SET_VRING_ADDR). A table holds at most 8 regions and an export at
//! most three maps (the current one, the one being replaced, a poisoned
//! one still named by the table), so the slots cannot run out.
//!
//! The pool region is not registered: the export reaches the pool through
//! the daemon's own mapping of the pool file, never through the frontend's
//! region of it; the pool file is the daemon's, and whoever could shrink it
//! is inside the cluster's trust domain (it can write every buffer). A pool
//! that lost pages is a cluster that no longer works for anybody, and the
//! daemon cannot heal that by substituting zero pages: it stays a crash.

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use vmm_sys_util::eventfd::EventFd;

/// Counts faults the handler contained in one export's guest memory, and
/// wakes whoever steps the export (the fault may come from another thread,
/// the vhost-user one, while the port's worker sleeps).
#[derive(Debug, Default)]
pub struct FaultFlag {
    count: AtomicU64,
    /// The handler writes to it; its own descriptor (a dup), so it stays
    /// open for as long as any registration can name this flag.
    bell: Option<EventFd>,
}

impl FaultFlag {
    pub fn new(bell: Option<EventFd>) -> Self {
        FaultFlag {
            count: AtomicU64::new(0),
            bell,
        }
    }

    /// Faults contained so far (the port compares with what it saw).
    #[inline(always)]
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Async-signal-safe: an atomic add and one write(2).
    fn raise(&self) {
        self.count.fetch_add(1, Ordering::Release);
        if let Some(b) = &self.bell {
            let one = 1u64;
            // SAFETY: an 8-byte write from a local to our own eventfd; a
            // full counter (EAGAIN) means a wake-up is pending anyway.
            unsafe { libc::write(b.as_raw_fd(), (&raw const one).cast(), 8) };
        }
    }
}

/// Slots for registered ranges: every region of every export's memory
/// table, twice over while a table changes (the old map is dropped after
/// the new one is built). vhost-user tables hold at most 8 regions.
const SLOTS: usize = 4 * zc_proto::layout::MAX_EXPORTS * 8;

struct Slot {
    /// Claimed by a registration (free slots are found with a swap).
    taken: AtomicBool,
    /// Seqlock: odd while the fields below change.
    seq: AtomicU64,
    start: AtomicUsize,
    end: AtomicUsize,
    /// Page size of the mapping (a huge page for hugetlbfs files).
    page: AtomicUsize,
    flag: AtomicPtr<FaultFlag>,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    taken: AtomicBool::new(false),
    seq: AtomicU64::new(0),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    page: AtomicUsize::new(0),
    flag: AtomicPtr::new(std::ptr::null_mut()),
};

static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

impl Slot {
    /// Writer side of the seqlock (one writer: whoever took the slot).
    fn write(&self, start: usize, end: usize, page: usize, flag: *mut FaultFlag) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.start.store(start, Ordering::Relaxed);
        self.end.store(end, Ordering::Relaxed);
        self.page.store(page, Ordering::Relaxed);
        self.flag.store(flag, Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// Reader side: a consistent (start, end, page, flag), or None while
    /// the slot changes or is empty.
    fn read(&self) -> Option<(usize, usize, usize, *mut FaultFlag)> {
        let s1 = self.seq.load(Ordering::Acquire);
        if s1 % 2 == 1 {
            return None;
        }
        let v = (
            self.start.load(Ordering::Relaxed),
            self.end.load(Ordering::Relaxed),
            self.page.load(Ordering::Relaxed),
            self.flag.load(Ordering::Relaxed),
        );
        fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == s1 && v.0 < v.1 && !v.3.is_null()).then_some(v)
    }
}

/// A registered range; unregisters when dropped.
pub struct Registration {
    slot: usize,
    /// Keeps the flag alive while the handler may write to it.
    _flag: Arc<FaultFlag>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        s.write(0, 0, 0, std::ptr::null_mut());
        s.taken.store(false, Ordering::Release);
    }
}

/// The handler's fallback: the action SIGBUS had before ours.
struct Previous(libc::sigaction);
// SAFETY: plain data (a handler address, flags and a mask), written once
// before the handler is installed and only read afterwards.
unsafe impl Sync for Previous {}
// SAFETY: as above.
unsafe impl Send for Previous {}

static PREVIOUS: OnceLock<Previous> = OnceLock::new();

/// Registers `[start, start + len)`, a mapping of guest memory in pages of
/// `page` bytes, as owned by the export whose flag is `flag`; installs the
/// handler on first use. None if the table is full or the handler cannot be
/// installed (the caller must then not use the range).
///
/// # Safety
/// The range must stay mapped until the registration is dropped, and must
/// be guest memory the daemon may replace with anonymous pages (a frontend's
/// region, nothing the daemon itself relies on).
pub unsafe fn register(
    start: *mut u8,
    len: usize,
    page: usize,
    flag: &Arc<FaultFlag>,
) -> Option<Registration> {
    if !install() || len == 0 || !page.is_power_of_two() {
        return None;
    }
    let end = (start as usize).checked_add(len)?;
    let slot = TABLE
        .iter()
        .position(|s| !s.taken.swap(true, Ordering::AcqRel))?;
    TABLE[slot].write(start as usize, end, page, Arc::as_ptr(flag).cast_mut());
    Some(Registration {
        slot,
        _flag: flag.clone(),
    })
}

/// Installs the handler once; false if that failed.
fn install() -> bool {
    static DONE: OnceLock<bool> = OnceLock::new();
    *DONE.get_or_init(|| {
        // SAFETY: sigaction with a zeroed struct we fill in; reading the
        // old action first, so the handler has its fallback before it can run.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return false;
            }
            let _ = PREVIOUS.set(Previous(old));
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) == 0
        }
    })
}

/// Replaces the page at `addr` if a registered range holds it; true if so.
/// Async-signal-safe: atomics and one mmap system call.
fn contain(addr: usize) -> bool {
    let mut replaced = false;
    for s in &TABLE {
        let Some((start, end, page, flag)) = s.read() else {
            continue;
        };
        if addr < start || addr >= end {
            continue;
        }
        if !replaced {
            // Mappings start on a page boundary, so the page holding addr
            // starts at or after `start`.
            let at = (addr & !(page - 1)).max(start);
            // SAFETY: [at, at + page) lies in a registered mapping of guest
            // memory (register's contract), which may be replaced; MAP_FIXED
            // swaps it for zeroed anonymous memory in one step.
            let p = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return false;
            }
            replaced = true;
        }
        // SAFETY: a slot read consistently names a live flag: the
        // registration that wrote it holds an Arc of it until it clears the
        // slot, and the export it belongs to holds another for its whole
        // life. A range holding the faulting address is memory the faulting
        // thread is using: the port's worker, through a map it owns, or the
        // export's own vhost-user thread (the export, and so the flag, lives).
        unsafe { (*flag).raise() };
    }
    replaced
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // si_code > 0: raised by the kernel for a real access (BUS_ADRERR, ...).
    if code > 0 && contain(addr) {
        return;
    }
    // Not ours: the previous action takes over. A real fault recurs when
    // the access is retried on return; a signal someone sent is raised again
    // (it is delivered once this handler returns).
    // SAFETY: sigaction and raise are async-signal-safe; PREVIOUS was set
    // before this handler was installed.
    unsafe {
        match PREVIOUS.get() {
            Some(p) => libc::sigaction(sig, &p.0, std::ptr::null_mut()),
            None => libc::signal(sig, libc::SIG_DFL) as libc::c_int,
        };
        if code <= 0 {
            libc::raise(sig);
        }
    }
}

/// The page size of a mapping of `file`: its huge page size on hugetlbfs
/// (a mapping there can only be replaced in whole huge pages), else the
/// system's.
pub fn page_size(file: &std::fs::File) -> usize {
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    // SAFETY: fstatfs writes into the struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the descriptor is open.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } == 0
        && st.f_type as i64 == HUGETLBFS_MAGIC
        && st.f_bsize > 0
    {
        return st.f_bsize as usize;
    }
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_in_a_registered_range_is_replaced_and_flagged() {
        let page = 4096usize;
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 * page as u64).unwrap();
        // SAFETY: a fresh shared mapping of our file; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p.cast::<u8>();
        // SAFETY: inside the mapping, file still large enough.
        unsafe { std::ptr::write_volatile(p, 7) };
        let flag = Arc::new(FaultFlag::default());
        assert_eq!(page_size(&f), page);
        // SAFETY: the mapping lives until munmap below, after the drop.
        let reg = unsafe { register(p, 4 * page, page, &flag) }.unwrap();
        f.set_len(page as u64).unwrap();
        // SAFETY: page 2 is past the file's end now: SIGBUS, contained.
        let v = unsafe { std::ptr::read_volatile(p.add(2 * page + 8)) };
        assert_eq!(v, 0, "a zero page replaced the vanished one");
        assert_eq!(flag.count(), 1);
        // SAFETY: page 0 is still in the file.
        assert_eq!(unsafe { std::ptr::read_volatile(p) }, 7);
        // SAFETY: page 2 is anonymous now: no second fault.
        unsafe { std::ptr::write_volatile(p.add(2 * page), 1) };
        assert_eq!(flag.count(), 1);
        drop(reg);
        // SAFETY: our own mapping.
        unsafe { libc::munmap(p.cast(), 4 * page) };
        assert!(TABLE
            .iter()
            .all(|s| s.read().is_none_or(|v| v.0 != p as usize)));
    }
}
