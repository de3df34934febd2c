//! Bounds-checked access to packet bytes in a mapped pool.
//!
//! The pool is shared with other processes and with guests, which may write
//! any buffer at any time. So nothing here hands out `&[u8]` into the pool:
//! bytes move with raw-pointer copies and volatile scalar accesses, and every
//! offset is checked against the buffer's capacity first.

use crate::buffer::{BufferHandle, HEADROOM};
use crate::layout::PoolLayout;
use std::fmt;
use std::marker::PhantomData;
use std::ptr;
use std::sync::Arc;

/// Memory a pool is mapped in (a shared mapping of the pool file or BAR).
///
/// # Safety
/// `base()..base() + size()` must stay mapped, readable and writable, at
/// that address, for as long as the value lives.
pub unsafe trait PoolMemory: Send + Sync {
    fn base(&self) -> *mut u8;
    fn size(&self) -> usize;
}

/// A mapped pool: base address plus validated geometry.
///
/// Cloned, not copied: a view from [`PoolView::owning`] (what every
/// transport's [`crate::QueueEnd::pool`] hands out) keeps the mapping alive,
/// so a clone may outlive the queue end it came from, and nothing can write
/// through a view into memory that is no longer mapped. A plain copy cannot
/// be made:
///
/// ```compile_fail,E0507
/// use zc_proto::{PoolView, QueueEnd};
/// fn keep(rx: &impl QueueEnd) -> PoolView {
///     *rx.pool() // error: a copy would not keep the mapping alive; clone() does
/// }
/// ```
///
/// Cloning costs one reference count increment; packet access through a
/// view touches no count at all, so a tool clones the view once and uses
/// it for every packet.
#[derive(Clone)]
pub struct PoolView {
    base: *mut u8,
    layout: PoolLayout,
    /// The mapping `base` points into, for a view that keeps it alive;
    /// `None` for one whose creator vouched for the memory (`new`).
    _mem: Option<Arc<dyn PoolMemory>>,
}

// SAFETY: PoolView is an address plus geometry (and a thread-safe owner of
// the mapping); all access through it is by raw pointer within the mapping,
// which is valid from any thread.
unsafe impl Send for PoolView {}
// SAFETY: as above; shared access performs no unsynchronised Rust-level mutation.
unsafe impl Sync for PoolView {}

impl fmt::Debug for PoolView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolView")
            .field("base", &self.base)
            .field("layout", &self.layout)
            .field("owning", &self._mem.is_some())
            .finish()
    }
}

impl PoolView {
    /// A view of the pool in `mem` that keeps `mem` mapped for as long as
    /// the view or a clone of it lives. `None` if the pool does not fit.
    pub fn owning(mem: Arc<dyn PoolMemory>, layout: PoolLayout) -> Option<Self> {
        (layout.pool_size <= mem.size() as u64).then(|| PoolView {
            base: mem.base(),
            layout,
            _mem: Some(mem),
        })
    }

    /// A view that does not keep its memory mapped.
    ///
    /// # Safety
    /// `base` must point to a mapping of at least `layout.pool_size` bytes
    /// that stays mapped for as long as this view or any clone of it is
    /// used. So such a view must not reach code that may keep a clone
    /// longer: a transport gives its users views from [`PoolView::owning`].
    pub unsafe fn new(base: *mut u8, layout: PoolLayout) -> Self {
        PoolView {
            base,
            layout,
            _mem: None,
        }
    }

    pub fn layout(&self) -> &PoolLayout {
        &self.layout
    }

    pub fn base(&self) -> *mut u8 {
        self.base
    }

    #[inline(always)]
    fn packet_ptr(&self, h: &BufferHandle) -> *mut u8 {
        let off = self
            .layout
            .packet_offset(h.index())
            .unwrap_or_else(|| panic!("buffer {} does not belong to this pool", h.index()));
        // SAFETY: packet_offset returned Some, so the offset lies inside the
        // mapping of pool_size bytes that `new`'s contract guarantees.
        unsafe { self.base.add(off as usize) }
    }

    /// Hints the CPU to bring the start of a buffer's packet into cache.
    #[inline(always)]
    pub fn prefetch(&self, h: &BufferHandle) {
        #[cfg(target_arch = "x86_64")]
        if let Some(off) = self.layout.packet_offset(h.index()) {
            // SAFETY: prefetch never faults or writes; the address is inside
            // the mapping anyway (packet_offset checked the index).
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch::<_MM_HINT_T0>(self.base.add(off as usize).cast_const().cast());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = h;
    }

    /// Read access to the packet a handle holds. Panics if the handle belongs
    /// to a different pool (a programming error, like an out-of-range index).
    #[inline(always)]
    pub fn packet<'a>(&self, h: &'a BufferHandle) -> PacketRef<'a> {
        let len = h.len().min(self.layout.max_packet()) as usize;
        PacketRef {
            ptr: self.packet_ptr(h),
            len,
            _h: PhantomData,
        }
    }

    /// Write access to the buffer a handle holds.
    #[inline(always)]
    pub fn packet_mut<'a>(&self, h: &'a mut BufferHandle) -> PacketMut<'a> {
        let ptr = self.packet_ptr(h);
        PacketMut {
            ptr,
            cap: self.layout.max_packet() as usize,
            handle: h,
        }
    }
}

/// The bytes of a received packet.
pub struct PacketRef<'a> {
    ptr: *const u8,
    len: usize,
    _h: PhantomData<&'a BufferHandle>,
}

impl PacketRef<'_> {
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies packet bytes from `offset` into `out`; returns how many were copied.
    #[inline]
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> usize {
        let n = self.len.saturating_sub(offset).min(out.len());
        if n > 0 {
            // SAFETY: offset + n <= len <= buffer capacity, so the source is
            // inside this buffer; `out` is a distinct local slice of >= n bytes.
            unsafe { ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), n) };
        }
        n
    }

    /// The little-endian u64 at `offset`, if the packet is long enough.
    #[inline(always)]
    pub fn read_u64_le(&self, offset: usize) -> Option<u64> {
        (offset.checked_add(8)? <= self.len).then(|| {
            // SAFETY: offset + 8 <= len, inside the buffer; a volatile read
            // because another process may write the buffer concurrently.
            unsafe { read_u64_volatile(self.ptr.add(offset)) }
        })
    }

    /// The little-endian u32 at `offset`, if the packet is long enough.
    #[inline(always)]
    pub fn read_u32_le(&self, offset: usize) -> Option<u32> {
        (offset.checked_add(4)? <= self.len).then(|| {
            // SAFETY: offset + 4 <= len, inside the buffer.
            unsafe { read_u32_volatile(self.ptr.add(offset)) }
        })
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        self.read_at(0, &mut v);
        v
    }
}

/// Error from [`PacketMut`] when a write or length exceeds the buffer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{wanted} bytes do not fit in a buffer of {capacity} bytes")]
pub struct CapacityError {
    pub wanted: usize,
    pub capacity: usize,
}

/// The writable buffer behind a handle the caller owns.
pub struct PacketMut<'a> {
    ptr: *mut u8,
    cap: usize,
    handle: &'a mut BufferHandle,
}

impl PacketMut<'_> {
    /// Bytes a packet in this buffer may have.
    #[inline(always)]
    pub fn capacity(&self) -> usize {
        self.cap
    }

    #[inline(always)]
    pub fn set_len(&mut self, len: usize) -> Result<(), CapacityError> {
        if len > self.cap {
            return Err(CapacityError {
                wanted: len,
                capacity: self.cap,
            });
        }
        self.handle.set_len_checked(len as u32);
        Ok(())
    }

    #[inline(always)]
    pub fn write_at(&mut self, offset: usize, bytes: &[u8]) -> Result<(), CapacityError> {
        let end = offset.saturating_add(bytes.len());
        if end > self.cap {
            return Err(CapacityError {
                wanted: end,
                capacity: self.cap,
            });
        }
        // SAFETY: offset + len <= capacity, so the destination lies in this
        // buffer, which the caller owns through the handle; `bytes` is local.
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(offset), bytes.len()) };
        Ok(())
    }

    #[inline(always)]
    pub fn write_u64_le(&mut self, offset: usize, v: u64) -> Result<(), CapacityError> {
        self.write_at(offset, &v.to_le_bytes())
    }

    #[inline(always)]
    pub fn write_u32_le(&mut self, offset: usize, v: u32) -> Result<(), CapacityError> {
        self.write_at(offset, &v.to_le_bytes())
    }

    /// The u64 at `offset` of the buffer (not bounded by the packet length).
    #[inline(always)]
    pub fn read_u64_le(&self, offset: usize) -> Option<u64> {
        (offset.checked_add(8)? <= self.cap).then(|| {
            // SAFETY: offset + 8 <= capacity, inside the buffer.
            unsafe { read_u64_volatile(self.ptr.add(offset)) }
        })
    }

    /// A reflector's one change to a packet: destination and source MAC
    /// swapped, in place. False (nothing changed) for a packet too short
    /// to hold both.
    #[inline(always)]
    pub fn swap_macs(&mut self) -> bool {
        let len = self.handle.len() as usize;
        if len < 12 {
            return false;
        }
        let (Some(a), Some(b)) = (self.read_u64_le(0), self.read_u64_le(8)) else {
            return false;
        };
        // a = dst[0..6] src[0..2], b = src[2..6] + 4 bytes after the MACs.
        let (a, b) = (a.to_le_bytes(), b.to_le_bytes());
        let mut head = [0u8; 12];
        head[..6].copy_from_slice(&[a[6], a[7], b[0], b[1], b[2], b[3]]);
        head[6..].copy_from_slice(&a[..6]);
        self.write_at(0, &head).is_ok()
    }

    /// Writes `bytes` as the whole packet.
    pub fn fill(&mut self, bytes: &[u8]) -> Result<(), CapacityError> {
        self.write_at(0, bytes)?;
        self.set_len(bytes.len())
    }

    /// Makes this buffer's packet a copy of `src` (a packet of this pool or
    /// of another one): one copy, pool to pool, with no bounce buffer.
    #[inline(always)]
    pub fn copy_from(&mut self, src: &PacketRef<'_>) -> Result<(), CapacityError> {
        if src.len > self.cap {
            return Err(CapacityError {
                wanted: src.len,
                capacity: self.cap,
            });
        }
        // SAFETY: src.len bytes lie inside the source buffer (PacketRef's
        // length is bounded by its capacity) and fit in this one, which the
        // caller owns through the handle. Two different handles are two
        // different buffers, so the ranges never overlap. The source may be
        // written concurrently by another process: the copy then holds
        // whatever bytes it read, which a byte copy tolerates.
        unsafe { ptr::copy_nonoverlapping(src.ptr, self.ptr, src.len) };
        self.handle.set_len_checked(src.len as u32);
        Ok(())
    }
}

/// The little-endian u64 at `p`, read volatile: one 8-byte load where `p` is
/// aligned (packet fields usually are: packets start 64-byte aligned), else
/// byte by byte (a volatile `[u8; 8]` read is eight loads and shifts, which
/// made reading a packet head the costliest part of stamping one).
///
/// # Safety
/// `p..p + 8` must be readable.
#[inline(always)]
unsafe fn read_u64_volatile(p: *const u8) -> u64 {
    if (p as usize).is_multiple_of(8) {
        // SAFETY: aligned, and readable by the caller's contract.
        u64::from_le(unsafe { ptr::read_volatile(p.cast::<u64>()) })
    } else {
        // SAFETY: readable by the caller's contract; no alignment needed.
        u64::from_le_bytes(unsafe { ptr::read_volatile(p.cast::<[u8; 8]>()) })
    }
}

/// As [`read_u64_volatile`], four bytes.
///
/// # Safety
/// `p..p + 4` must be readable.
#[inline(always)]
unsafe fn read_u32_volatile(p: *const u8) -> u32 {
    if (p as usize).is_multiple_of(4) {
        // SAFETY: aligned, and readable by the caller's contract.
        u32::from_le(unsafe { ptr::read_volatile(p.cast::<u32>()) })
    } else {
        // SAFETY: readable by the caller's contract; no alignment needed.
        u32::from_le_bytes(unsafe { ptr::read_volatile(p.cast::<[u8; 4]>()) })
    }
}

/// Where packet data starts relative to the buffer, for transports.
pub const PACKET_HEADROOM: u32 = HEADROOM;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::BufferIndex;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Heap memory standing in for a mapping; says when it is freed.
    struct Heap {
        base: *mut u8,
        _mem: Vec<u8>,
        freed: Arc<AtomicBool>,
    }
    // SAFETY: the memory is only reached through `base`, by raw pointer,
    // like a shared mapping.
    unsafe impl Send for Heap {}
    // SAFETY: as above.
    unsafe impl Sync for Heap {}
    // SAFETY: `base` is the Vec's buffer, which stays at one address and
    // lives as long as the value.
    unsafe impl PoolMemory for Heap {
        fn base(&self) -> *mut u8 {
            self.base
        }
        fn size(&self) -> usize {
            self._mem.len()
        }
    }
    impl Drop for Heap {
        fn drop(&mut self) {
            self.freed.store(true, Ordering::SeqCst);
        }
    }

    fn heap(layout: &PoolLayout) -> (Arc<Heap>, Arc<AtomicBool>) {
        let freed = Arc::new(AtomicBool::new(false));
        let mut mem = vec![0u8; layout.pool_size as usize];
        let h = Arc::new(Heap {
            base: mem.as_mut_ptr(),
            _mem: mem,
            freed: freed.clone(),
        });
        (h, freed)
    }

    fn with_pool(f: impl FnOnce(PoolView)) {
        let layout = PoolLayout::new(1, HEADROOM + 192, 4).unwrap();
        let (mem, _) = heap(&layout);
        f(PoolView::owning(mem, layout).unwrap());
    }

    /// A handle for a test buffer nothing else names.
    fn handle(i: u32, len: u32) -> BufferHandle {
        // SAFETY: each test makes one handle per buffer of its own pool.
        unsafe { BufferHandle::from_raw(BufferIndex::new(i), len) }
    }

    #[test]
    fn copy_from_copies_across_pools_and_refuses_what_does_not_fit() {
        let big = PoolLayout::new(1, HEADROOM + 256, 4).unwrap();
        let small = PoolLayout::new(2, HEADROOM + 64, 4).unwrap();
        let (m1, _) = heap(&big);
        let (m2, _) = heap(&small);
        let (src_pool, dst_pool) = (
            PoolView::owning(m1, big).unwrap(),
            PoolView::owning(m2, small).unwrap(),
        );
        let mut src = handle(1, 0);
        let bytes: Vec<u8> = (0..60u8).collect();
        src_pool.packet_mut(&mut src).fill(&bytes).unwrap();
        let mut dst = handle(2, 0);
        dst_pool
            .packet_mut(&mut dst)
            .copy_from(&src_pool.packet(&src))
            .unwrap();
        assert_eq!(dst.len(), 60);
        assert_eq!(dst_pool.packet(&dst).to_vec(), bytes);
        src_pool.packet_mut(&mut src).fill(&[9u8; 65]).unwrap();
        assert_eq!(
            dst_pool
                .packet_mut(&mut dst)
                .copy_from(&src_pool.packet(&src)),
            Err(CapacityError {
                wanted: 65,
                capacity: 64
            })
        );
        assert_eq!(dst.len(), 60, "a refused copy leaves the buffer as it was");
    }

    #[test]
    fn writes_and_reads_stay_inside_the_buffer() {
        with_pool(|pool| {
            let mut h = handle(3, 0);
            let mut p = pool.packet_mut(&mut h);
            assert_eq!(p.capacity(), 192);
            p.fill(&[7u8; 100]).unwrap();
            p.write_u64_le(8, 0x1122334455667788).unwrap();
            assert_eq!(
                p.write_at(190, &[0; 3]),
                Err(CapacityError {
                    wanted: 193,
                    capacity: 192
                })
            );
            assert_eq!(
                p.set_len(193),
                Err(CapacityError {
                    wanted: 193,
                    capacity: 192
                })
            );
            assert_eq!(h.len(), 100);
            let r = pool.packet(&h);
            assert_eq!(r.read_u64_le(8), Some(0x1122334455667788));
            assert_eq!(r.read_u64_le(93), None);
            assert_eq!(r.read_u64_le(usize::MAX), None);
            let mut out = [0u8; 16];
            assert_eq!(r.read_at(96, &mut out), 4);
            assert_eq!(r.to_vec().len(), 100);
        });
    }

    #[test]
    #[should_panic(expected = "does not belong to this pool")]
    fn foreign_handle_is_caught() {
        with_pool(|pool| {
            let h = handle(4, 0);
            let _ = pool.packet(&h);
        });
    }

    /// What a copied view allowed (a view outliving the queue end that
    /// mapped its memory) is a clone that keeps the memory now.
    #[test]
    fn a_clone_keeps_the_memory_until_the_last_view_is_gone() {
        let layout = PoolLayout::new(1, HEADROOM + 192, 4).unwrap();
        let (mem, freed) = heap(&layout);
        let first = PoolView::owning(mem, layout).unwrap();
        let second = first.clone();
        drop(first);
        assert!(!freed.load(Ordering::SeqCst), "freed under a live clone");
        let mut h = handle(2, 0);
        second.packet_mut(&mut h).fill(b"still mapped").unwrap();
        assert_eq!(second.packet(&h).to_vec(), b"still mapped");
        drop(second);
        assert!(freed.load(Ordering::SeqCst), "the last view frees it");
    }

    #[test]
    fn a_pool_larger_than_its_memory_has_no_view() {
        let small = PoolLayout::new(1, HEADROOM + 192, 4).unwrap();
        let big = PoolLayout::new(1, 2048, 65536).unwrap();
        assert!(big.pool_size > small.pool_size);
        let (mem, _) = heap(&small);
        assert!(PoolView::owning(mem, big).is_none());
    }
}
