//! The virtio 1.x split ring (spec 2.7) as both sides see it: the host's
//! export reads what a driver wrote, the guest driver reads what the device
//! wrote. Layouts are checked at compile time.

use std::mem::{offset_of, size_of};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
pub const USED_F_NO_NOTIFY: u16 = 1;

/// One descriptor table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}
const _: () = assert!(size_of::<Desc>() == 16);
const _: () = assert!(offset_of!(Desc, addr) == 0);
const _: () = assert!(offset_of!(Desc, len) == 8);
const _: () = assert!(offset_of!(Desc, flags) == 12);
const _: () = assert!(offset_of!(Desc, next) == 14);

/// One used ring entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}
const _: () = assert!(size_of::<UsedElem>() == 8);
const _: () = assert!(offset_of!(UsedElem, len) == 4);

/// Asks the CPU to fetch the cache line at `p` for writing (x86 PREFETCHW).
/// Ring lines move between the two sides' cores: a side that reads an entry
/// and then rewrites it (a descriptor's address, a used element) takes the
/// line once, in exclusive state, instead of shared first and again to
/// write; and a store to a prefetched line does not stall the store buffer.
/// A hint only: it never faults, reads no value and writes nothing, so any
/// address is allowed (one outside a mapping is simply ignored).
#[inline(always)]
pub fn prefetch_write(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHW is a hint: no access in the memory model, no fault
    // for any address; x86_64 CPUs without it treat it as a no-op.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
        _mm_prefetch::<_MM_HINT_ET0>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
