//! A split virtqueue in guest memory, read and written through raw
//! pointers, with every guest-controlled value checked before use.
//!
//! Rings live in memory the guest writes concurrently, so nothing here forms
//! a reference into them but atomics: the indices, flags and event fields
//! that order the two sides are `AtomicU16`s (Acquire on the guest's avail
//! index, Release on the used index, SeqCst fences where a store must be
//! seen before a load); descriptors and ring entries, ordered by those, are
//! copied out with one volatile read and only the copy is checked and used.

use super::guest_mem::{GuestMap, Target};
use crate::owner::OwnerTable;
use std::sync::atomic::{compiler_fence, fence, AtomicU16, Ordering};
use thiserror::Error;
use zc_proto::buffer::VIRTIO_NET_HDR_LEN;
use zc_proto::{BufferIndex, PoolLayout};

use zc_proto::virtio::{prefetch_write, AVAIL_F_NO_INTERRUPT};
pub use zc_proto::virtio::{Desc, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY};
/// Largest queue the export accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Longest descriptor chain the export follows.
pub const MAX_CHAIN: usize = 64;

/// Guest-physical addresses and size of one virtqueue, from the frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
}

/// A ring the export cannot use: the device needs a reset.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum RingError {
    #[error("queue size {0} is not a power of two from 1 to {MAX_QUEUE_SIZE}")]
    Size(u16),
    #[error("{0} ring at {1:#x} is misaligned")]
    Align(&'static str, u64),
    #[error(
        "{what} ring at {gpa:#x} lands on a misaligned host address {host:#x} \
         (its memory region starts at a guest-physical address that is not page-aligned)"
    )]
    HostAlign {
        what: &'static str,
        gpa: u64,
        host: usize,
    },
    #[error("{0} ring at {1:#x} is outside guest memory")]
    Outside(&'static str, u64),
    #[error("{0} ring at {1:#x} lies in the zc pool outside this export's ring area")]
    PoolArea(&'static str, u64),
    #[error("avail index jumped from {from} to {to} in a ring of {size}")]
    AvailJump { from: u16, to: u16, size: u16 },
    #[error("avail ring names descriptor {head} in a ring of {size}")]
    Head { head: u16, size: u16 },
}

/// A descriptor chain the export drops (and counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescError {
    /// `next` names a descriptor outside the table.
    Index,
    /// The chain is longer than the ring or MAX_CHAIN (or loops).
    Loop,
    /// Indirect descriptors were not negotiated.
    Indirect,
    /// Device-readable where writable is needed, or the reverse.
    Direction,
    ZeroLen,
    /// Outside guest memory or straddling regions.
    Outside,
    /// Touches the pool but is not a buffer this guest holds.
    Pool,
}

/// Where the pool is and who owns its buffers: what pool descriptors are
/// checked against.
pub struct PoolCtx<'a> {
    pub layout: PoolLayout,
    pub base: *mut u8,
    pub owners: &'a OwnerTable,
    pub slot: usize,
}

impl PoolCtx<'_> {
    /// The buffer a pool descriptor at pool offset `off`, `len` bytes long,
    /// names: it must start 12 bytes before the packet data of a buffer this
    /// export's guest holds and end inside that buffer.
    #[inline]
    pub fn pool_desc(&self, off: u64, len: u32) -> Option<BufferIndex> {
        let b = self
            .layout
            .buffer_at_packet_offset(off, VIRTIO_NET_HDR_LEN)?;
        let fits = u64::from(len) <= u64::from(self.layout.max_packet() + VIRTIO_NET_HDR_LEN);
        (fits && self.owners.held_by_guest(b, self.slot)).then_some(b)
    }

    /// The zero-copy contract's exchange: descriptor `head` of `q`, which
    /// named the guest's buffer `take` (checked by `walk`), now names pool
    /// buffer `give`, 12 bytes in front of its packet; `give` passes to the
    /// guest and `take` to the host. False, with nothing changed, where the
    /// guest's memory table does not map `give` (the caller copies instead).
    #[inline(always)]
    pub fn exchange(
        &self,
        q: &SplitQueue,
        map: &GuestMap,
        head: u16,
        take: BufferIndex,
        give: BufferIndex,
    ) -> bool {
        let Some(gpa) = self
            .layout
            .packet_offset(give)
            .and_then(|off| map.pool_gpa(off - u64::from(VIRTIO_NET_HDR_LEN)))
        else {
            return false;
        };
        // Give before take, each step ordered before the next (the owner
        // table outlives a crash): killed anywhere in between, the guest is
        // recorded as holding both buffers, never neither, so a restarted
        // daemon never hands out one the descriptor may name.
        self.owners.give_to_guest(give, self.slot);
        compiler_fence(Ordering::SeqCst);
        q.set_desc_addr(head, gpa);
        compiler_fence(Ordering::SeqCst);
        self.owners.take_from_guest(take);
        true
    }

    /// Host address of pool offset `off` (checked by `pool_desc` first).
    #[inline(always)]
    pub fn host(&self, off: u64) -> *mut u8 {
        debug_assert!(off < self.layout.pool_size);
        // SAFETY: callers pass offsets inside a validated buffer, which lies
        // inside the pool mapping of pool_size bytes.
        unsafe { self.base.add(off as usize) }
    }
}

/// One checked segment of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub host: *mut u8,
    pub len: u32,
    /// The pool buffer this segment is, for a pool descriptor.
    pub pool: Option<BufferIndex>,
}

impl Default for Seg {
    fn default() -> Self {
        Seg {
            host: std::ptr::null_mut(),
            len: 0,
            pool: None,
        }
    }
}

/// A checked descriptor chain.
pub struct Chain {
    pub head: u16,
    pub segs: [Seg; MAX_CHAIN],
    pub n: usize,
    pub total: u64,
}

impl Default for Chain {
    fn default() -> Self {
        Chain {
            head: 0,
            segs: [Seg::default(); MAX_CHAIN],
            n: 0,
            total: 0,
        }
    }
}

impl Chain {
    /// The single pool buffer this chain is, for the zero-copy path.
    pub fn pool_buffer(&self) -> Option<BufferIndex> {
        if self.n == 1 {
            self.segs[0].pool
        } else {
            None
        }
    }
}

pub struct SplitQueue {
    desc: *const Desc,
    avail: *mut u8,
    used: *mut u8,
    size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    event_idx: bool,
    /// next_used when the guest was last signalled (EVENT_IDX bookkeeping).
    signalled_used: u16,
    pub addrs: RingAddrs,
}

// SAFETY: the pointers refer to guest memory kept mapped by the GuestMap the
// owner holds beside the queue; one thread uses a queue at a time.
unsafe impl Send for SplitQueue {}

/// Host address of a ring: in guest RAM, or inside this export's ring area
/// of the pool (reached through the daemon's own pool mapping).
fn ring_ptr(
    map: &GuestMap,
    what: &'static str,
    addr: u64,
    len: u64,
    align: u64,
    area: (u64, u64),
    pool_base: *mut u8,
) -> Result<*mut u8, RingError> {
    if !addr.is_multiple_of(align) {
        return Err(RingError::Align(what, addr));
    }
    let p = match map.translate(addr, len) {
        Some(Target::Ram(p)) => p,
        Some(Target::Pool(off)) if off >= area.0 && off.saturating_add(len) <= area.1 => {
            // SAFETY: the ring area lies inside the pool mapping.
            unsafe { pool_base.add(off as usize) }
        }
        Some(Target::Pool(_)) => return Err(RingError::PoolArea(what, addr)),
        None => return Err(RingError::Outside(what, addr)),
    };
    // An aligned guest address is an aligned host address only if the
    // region's guest and host starts agree modulo `align`; a frontend may
    // put a region at any guest address. Every ring access relies on the
    // host alignment (descriptors are read whole, indices are atomics).
    if !(p as usize).is_multiple_of(align as usize) {
        return Err(RingError::HostAlign {
            what,
            gpa: addr,
            host: p as usize,
        });
    }
    Ok(p)
}

/// The ring index or flags field at `p`, as the atomic it is shared as.
///
/// # Safety
/// `p` must be a 2-byte aligned field of a ring checked by `SplitQueue::new`
/// (whose host pointers are aligned as virtio asks: avail 2, used 4), in
/// guest memory that stays mapped while the reference is used: the owner
/// keeps the GuestMap beside the queue, and the reference lives for one
/// access.
#[inline(always)]
unsafe fn ring_u16<'a>(p: *mut u8) -> &'a AtomicU16 {
    debug_assert!((p as usize).is_multiple_of(2));
    // SAFETY: the caller's contract; the other side only ever accesses
    // these fields as whole, aligned 16-bit words.
    unsafe { AtomicU16::from_ptr(p.cast()) }
}

impl SplitQueue {
    /// Checks a ring's geometry and addresses. `area` is this export's ring
    /// area as pool offsets; `pool_base` the daemon's pool mapping.
    pub fn new(
        map: &GuestMap,
        a: RingAddrs,
        area: (u64, u64),
        pool_base: *mut u8,
        next_avail: u16,
        next_used: u16,
        event_idx: bool,
    ) -> Result<Self, RingError> {
        if a.size == 0 || !a.size.is_power_of_two() || a.size > MAX_QUEUE_SIZE {
            return Err(RingError::Size(a.size));
        }
        let n = u64::from(a.size);
        let desc = ring_ptr(map, "descriptor", a.desc, 16 * n, 16, area, pool_base)?;
        let avail = ring_ptr(map, "avail", a.avail, 6 + 2 * n, 2, area, pool_base)?;
        let used = ring_ptr(map, "used", a.used, 6 + 8 * n, 4, area, pool_base)?;
        Ok(SplitQueue {
            desc: desc.cast(),
            avail,
            used,
            size: a.size,
            next_avail,
            next_used,
            event_idx,
            signalled_used: next_used,
            addrs: a,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// The guest's avail index; Acquire: the entries and descriptors it
    /// published before are visible after this.
    #[inline(always)]
    fn avail_idx(&self) -> u16 {
        // SAFETY: avail.idx, 2 bytes into the avail ring checked in `new`.
        u16::from_le(unsafe { ring_u16(self.avail.add(2)) }.load(Ordering::Acquire))
    }

    /// Descriptor chains the guest made available and the device has not
    /// taken yet; an index further ahead than the ring is a broken ring.
    #[inline]
    pub fn pending(&self) -> Result<u16, RingError> {
        let idx = self.avail_idx();
        let n = idx.wrapping_sub(self.next_avail);
        if n > self.size {
            return Err(RingError::AvailJump {
                from: self.next_avail,
                to: idx,
                size: self.size,
            });
        }
        Ok(n)
    }

    /// The head of the `i`-th pending chain.
    #[inline]
    pub fn head(&self, i: u16) -> Result<u16, RingError> {
        let slot = self.next_avail.wrapping_add(i) & (self.size - 1);
        // SAFETY: slot < size, so 4 + 2 * slot + 2 <= 6 + 2 * size.
        let h = u16::from_le(unsafe {
            std::ptr::read_volatile(self.avail.add(4 + 2 * usize::from(slot)).cast::<u16>())
        });
        if h >= self.size {
            return Err(RingError::Head {
                head: h,
                size: self.size,
            });
        }
        Ok(h)
    }

    /// Hint: the chains of the next `n` pending entries are about to be
    /// read and rewritten (descriptor address, used element). Reads the
    /// avail ring unchecked: the values only steer prefetches.
    #[inline]
    pub fn prefetch_pending(&self, n: u16) {
        let mask = usize::from(self.size - 1);
        for k in 0..n {
            let slot = usize::from(self.next_avail.wrapping_add(k)) & mask;
            // SAFETY: slot < size: inside the avail ring checked in `new`.
            let h = unsafe { std::ptr::read_volatile(self.avail.add(4 + 2 * slot).cast::<u16>()) };
            let i = usize::from(u16::from_le(h)) & mask;
            prefetch_write(self.desc.wrapping_add(i).cast());
            let u = usize::from(self.next_used.wrapping_add(k)) & mask;
            if k == 0 || u % 8 == 0 {
                prefetch_write(self.used.wrapping_add(4 + 8 * u).cast_const());
            }
        }
    }

    #[inline(always)]
    fn desc(&self, i: u16) -> Desc {
        debug_assert!(i < self.size);
        // SAFETY: i < size (callers check), inside the table checked in `new`.
        let d = unsafe { std::ptr::read_volatile(self.desc.add(usize::from(i))) };
        Desc {
            addr: u64::from_le(d.addr),
            len: u32::from_le(d.len),
            flags: u16::from_le(d.flags),
            next: u16::from_le(d.next),
        }
    }

    /// Follows and checks the chain at `head`. `writable`: the device will
    /// write it (RX) rather than read it (TX).
    pub fn walk(
        &self,
        head: u16,
        writable: bool,
        map: &GuestMap,
        pool: &PoolCtx<'_>,
        out: &mut Chain,
    ) -> Result<(), DescError> {
        out.head = head;
        out.n = 0;
        out.total = 0;
        let limit = usize::from(self.size).min(MAX_CHAIN);
        let mut i = head;
        loop {
            if i >= self.size {
                return Err(DescError::Index);
            }
            if out.n == limit {
                return Err(DescError::Loop);
            }
            let d = self.desc(i);
            if d.flags & DESC_F_INDIRECT != 0 {
                return Err(DescError::Indirect);
            }
            if (d.flags & DESC_F_WRITE != 0) != writable {
                return Err(DescError::Direction);
            }
            if d.len == 0 {
                return Err(DescError::ZeroLen);
            }
            let seg = match map.translate(d.addr, u64::from(d.len)) {
                Some(Target::Ram(host)) => Seg {
                    host,
                    len: d.len,
                    pool: None,
                },
                Some(Target::Pool(off)) => {
                    let b = pool.pool_desc(off, d.len).ok_or(DescError::Pool)?;
                    Seg {
                        host: pool.host(off),
                        len: d.len,
                        pool: Some(b),
                    }
                }
                None => return Err(DescError::Outside),
            };
            out.segs[out.n] = seg;
            out.n += 1;
            out.total += u64::from(d.len);
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(());
            }
            i = d.next;
        }
    }

    /// Rewrites descriptor `i`'s address (zero-copy exchange).
    #[inline]
    fn set_desc_addr(&self, i: u16, addr: u64) {
        debug_assert!(i < self.size);
        // SAFETY: i < size (a checked head), inside the descriptor table.
        unsafe {
            std::ptr::write_volatile(
                self.desc.add(usize::from(i)).cast_mut().cast::<u64>(),
                addr.to_le(),
            )
        };
    }

    /// Writes used element number `k` of this burst (not yet visible).
    #[inline]
    pub fn put_used(&self, k: u16, id: u16, len: u32) {
        let slot = self.next_used.wrapping_add(k) & (self.size - 1);
        // One 8-byte store: id in the low half, len in the high half (the
        // UsedElem layout, little-endian).
        let v = u64::from(id) | (u64::from(len) << 32);
        // SAFETY: slot < size, so the element lies inside the used ring,
        // which is 4-byte aligned: an element is 8-byte aligned within it
        // only if the ring is, so write unaligned.
        unsafe {
            std::ptr::write_volatile(
                self.used.add(4 + 8 * usize::from(slot)).cast::<[u8; 8]>(),
                v.to_le_bytes(),
            )
        };
    }

    /// Consumes `taken` avail entries and publishes `used` used elements.
    #[inline]
    pub fn complete(&mut self, taken: u16, used: u16) {
        self.next_avail = self.next_avail.wrapping_add(taken);
        if used == 0 {
            return;
        }
        self.next_used = self.next_used.wrapping_add(used);
        // Release: the used elements (and rewritten descriptors) are
        // visible before the index that publishes them.
        // SAFETY: used.idx, 2 bytes into the used ring checked in `new`.
        unsafe { ring_u16(self.used.add(2)) }.store(self.next_used.to_le(), Ordering::Release);
    }

    /// Whether the guest wants an interrupt for what was published since the
    /// last one (VRING_AVAIL_F_NO_INTERRUPT, or EVENT_IDX's used_event).
    pub fn needs_interrupt(&mut self) -> bool {
        if self.signalled_used == self.next_used {
            return false;
        }
        fence(Ordering::SeqCst);
        let old = self.signalled_used;
        let new = self.next_used;
        // Relaxed: the SeqCst fence above orders these reads after the
        // used index store.
        let want = if self.event_idx {
            // SAFETY: used_event sits right after the avail ring's entries.
            let ev = unsafe { ring_u16(self.avail.add(4 + 2 * usize::from(self.size))) };
            let ev = u16::from_le(ev.load(Ordering::Relaxed));
            new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: the avail flags are the ring's first field.
            let flags = u16::from_le(unsafe { ring_u16(self.avail) }.load(Ordering::Relaxed));
            flags & AVAIL_F_NO_INTERRUPT == 0
        };
        self.signalled_used = new;
        want
    }

    /// Asks the guest to kick (true) or not to bother (false) when it adds
    /// buffers. With notifications on, returns whether work is already
    /// pending (the caller must then not sleep).
    pub fn set_notify(&self, on: bool) -> bool {
        if on {
            return self.notify_beyond(self.next_avail);
        }
        if !self.event_idx {
            // Relaxed: off is only a hint.
            // SAFETY: the used flags are the ring's first field.
            unsafe { ring_u16(self.used) }.store(USED_F_NO_NOTIFY.to_le(), Ordering::Relaxed);
        }
        false
    }

    /// Asks the guest to kick once its avail index moves past `seen` (the
    /// device has looked at everything up to there and needs more); returns
    /// whether it has already (the caller must then not sleep).
    pub fn notify_beyond(&self, seen: u16) -> bool {
        // Relaxed: the SeqCst fence below orders the store before the avail
        // index re-read.
        if self.event_idx {
            // SAFETY: avail_event sits right after the used ring's elements.
            let ev = unsafe { ring_u16(self.used.add(4 + 8 * usize::from(self.size))) };
            ev.store(seen.to_le(), Ordering::Relaxed);
        } else {
            // SAFETY: the used flags are the ring's first field.
            unsafe { ring_u16(self.used) }.store(0u16.to_le(), Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        self.avail_idx() != seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::export::guest_mem::FileId;
    use std::sync::Arc;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// The export's side of a ring on one thread, a driver on another, over
    /// anonymous "guest memory": every descriptor is seen once, in order,
    /// and every used element comes back with its id and length. The ring
    /// indices are the only synchronisation, so this is also what a race
    /// detector checks (built with `-Zsanitizer=thread`: the old
    /// volatile-and-fence indices are data races there, the atomics none).
    #[test]
    fn export_and_driver_on_two_threads_see_every_element_in_order() {
        struct Mem(*mut u8);
        // SAFETY: the mapping outlives both threads (joined below); each
        // side accesses only what the ring protocol gives it.
        unsafe impl Send for Mem {}
        const N: u32 = 20_000;
        const SIZE: u16 = 64;
        let (desc, avail, used) = (0u64, 0x1000u64, 0x2000u64);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let nowhere = FileId {
            dev: u64::MAX,
            ino: u64::MAX,
        };
        let map = GuestMap::new(&mem, nowhere, 0, &Arc::default(), &[]);
        let Some(Target::Ram(base)) = map.translate(0, 1 << 16) else {
            panic!("RAM not mapped");
        };
        let addrs = RingAddrs {
            desc,
            avail,
            used,
            size: SIZE,
        };
        let pool = std::ptr::null_mut();
        let mut q = SplitQueue::new(&map, addrs, (0, 0), pool, 0, 0, false).unwrap();
        let m = Mem(base);
        let driver = std::thread::spawn(move || {
            let m = m;
            let at = |off: u64| m.0.wrapping_add(off as usize);
            // SAFETY (all below): offsets inside the rings laid out above,
            // in the mapping the test keeps; indices are 2-byte aligned.
            let avail_idx = unsafe { AtomicU16::from_ptr(at(avail + 2).cast()) };
            let used_idx = unsafe { AtomicU16::from_ptr(at(used + 2).cast()) };
            let (mut sent, mut got, mut seen) = (0u32, 0u32, 0u16);
            while got < N {
                while sent < N && sent.wrapping_sub(got) < u32::from(SIZE) {
                    let slot = (sent % u32::from(SIZE)) as u64;
                    let d = Desc {
                        addr: 0x8000 + u64::from(sent),
                        len: sent + 1,
                        flags: 0,
                        next: 0,
                    };
                    unsafe {
                        std::ptr::write_volatile(at(desc + 16 * slot).cast::<Desc>(), d);
                        std::ptr::write_volatile(at(avail + 4 + 2 * slot).cast(), slot as u16);
                    }
                    sent += 1;
                    avail_idx.store(sent as u16, Ordering::Release);
                }
                let idx = used_idx.load(Ordering::Acquire);
                while seen != idx {
                    let e = at(used + 4 + 8 * u64::from(seen % SIZE));
                    let e = unsafe { std::ptr::read_volatile(e.cast::<[u32; 2]>()) };
                    assert_eq!(e, [got % u32::from(SIZE), got + 1], "used element {got}");
                    seen = seen.wrapping_add(1);
                    got += 1;
                }
                std::thread::yield_now();
            }
        });
        let mut n = 0u32;
        while n < N {
            let k = q.pending().expect("avail index in range");
            for j in 0..k {
                let head = q.head(j).unwrap();
                let d = q.desc(head);
                assert_eq!(d.addr, 0x8000 + u64::from(n + u32::from(j)), "descriptor");
                q.put_used(j, head, d.len);
            }
            q.complete(k, k);
            n += u32::from(k);
            if k == 0 {
                std::thread::yield_now();
            }
        }
        driver.join().unwrap();
    }

    /// A ring that is aligned as a guest address but not in the daemon's
    /// mapping (a region at a guest address that is not page-aligned) is
    /// refused, not read misaligned.
    #[test]
    fn rings_on_misaligned_host_addresses_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(2), 1 << 16)]).unwrap();
        let nowhere = FileId {
            dev: u64::MAX,
            ino: u64::MAX,
        };
        let map = GuestMap::new(&mem, nowhere, 0, &Arc::default(), &[]);
        let addrs = RingAddrs {
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            size: 64,
        };
        let pool = std::ptr::null_mut();
        let e = SplitQueue::new(&map, addrs, (0, 0), pool, 0, 0, false).err();
        let Some(RingError::HostAlign { what, gpa, host }) = e else {
            panic!("{e:?}");
        };
        assert_eq!((what, gpa, host % 16), ("descriptor", 0x1000, 14));
        // The same rings in a region at an aligned guest address are fine.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let map = GuestMap::new(&mem, nowhere, 0, &Arc::default(), &[]);
        assert!(SplitQueue::new(&map, addrs, (0, 0), pool, 0, 0, false).is_ok());
    }
}
