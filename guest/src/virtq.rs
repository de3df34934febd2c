//! The driver side of a split virtqueue (virtio 1.x, 2.7): descriptor table,
//! avail ring and used ring in memory the device reads and writes at any
//! time.
//!
//! Nothing here forms a reference into that memory but atomics: the
//! indices, flags and event fields that order the two sides are
//! `AtomicU16`s (Release on the avail index, Acquire on the used index,
//! SeqCst fences where a store must be seen before a load); descriptors and
//! ring entries, ordered by those, are volatile reads and writes through raw
//! pointers, and every value the device wrote is returned as a plain copy
//! for the caller to check. The queue only knows offsets and indices; what a descriptor's
//! address means is the driver core's business.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use zc_proto::virtio::prefetch_write;
pub use zc_proto::virtio::{
    Desc, UsedElem, AVAIL_F_NO_INTERRUPT, DESC_F_NEXT, DESC_F_WRITE, USED_F_NO_NOTIFY,
};

/// Largest queue the driver places in an export's ring area (two queues of
/// this size fit in the area's first half; the second half is the host's
/// stock list).
pub const MAX_QUEUE_SIZE: u16 = 512;
/// Bytes of ring area each of the two queues gets.
pub const QUEUE_SLOT_BYTES: u64 = 16 << 10;

/// Offsets of one queue's three parts, relative to the queue's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Bytes from the descriptor table to the end of the used ring.
    pub bytes: u64,
}

impl RingLayout {
    /// Descriptor table at 0 (16-byte aligned), avail ring right after it,
    /// used ring after that on the next cache line (virtio 1.x asks 4 bytes),
    /// each with its event field. `None` if `size` is not a power of two in
    /// 1..=MAX_QUEUE_SIZE.
    pub fn new(size: u16) -> Option<Self> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return None;
        }
        let n = u64::from(size);
        let desc = 0;
        let avail = 16 * n;
        // The used ring starts on a cache line of its own: the device writes
        // its index for every burst, and sharing a line with the driver's
        // avail entries and used_event would bounce that line between the
        // two sides' cores (virtio needs 4-byte alignment only).
        let used = (avail + 6 + 2 * n).next_multiple_of(CACHE_LINE);
        let bytes = used + 6 + 8 * n;
        Some(RingLayout {
            size,
            desc,
            avail,
            used,
            bytes,
        })
    }
}

/// Cache line size the ring layout separates the two sides' fields by.
const CACHE_LINE: u64 = 64;

const _: () = assert!(
    (16 * 512 + 6 + 2 * 512u64).next_multiple_of(CACHE_LINE) + 6 + 8 * 512 <= QUEUE_SLOT_BYTES
);

/// The ring index or flags field at `p`, as the atomic it is shared as.
///
/// # Safety
/// `p` must be a field of a queue's rings inside the memory given to
/// `DriverQueue::new` (16-byte aligned, with the avail ring at a multiple
/// of 16 and the used ring at a multiple of 64 from it, so every such
/// field is 2-byte aligned), which stays mapped while the queue lives; the
/// reference lives for one access.
#[inline(always)]
unsafe fn ring_u16<'a>(p: *mut u8) -> &'a AtomicU16 {
    debug_assert!((p as usize).is_multiple_of(2));
    // SAFETY: the caller's contract; the device only ever accesses these
    // fields as whole, aligned 16-bit words.
    unsafe { AtomicU16::from_ptr(p.cast()) }
}

/// One split virtqueue, driver side.
pub struct DriverQueue {
    desc: *mut Desc,
    avail: *mut u8,
    used: *mut u8,
    size: u16,
    event_idx: bool,
    /// Next avail index to publish (private shadow of avail.idx).
    avail_idx: u16,
    /// avail.idx as last published.
    published: u16,
    /// Next used element to consume.
    last_used: u16,
    /// What each avail slot holds: only this driver writes the avail ring,
    /// so a private copy tells when an entry need not be rewritten.
    pushed: Box<[u16]>,
    /// used_event as last written (EVENT_IDX), and whether interrupts are on.
    used_event: u16,
    interrupts: bool,
}

// SAFETY: the pointers refer to shared memory that the owner keeps mapped
// for the queue's lifetime; one thread uses a queue at a time (&mut self).
unsafe impl Send for DriverQueue {}

/// The used ring moved further than the queue has descriptors in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedJump {
    pub from: u16,
    pub to: u16,
}

impl DriverQueue {
    /// Takes over the queue memory at `mem` and initialises it: descriptors
    /// and both rings zeroed, interrupts suppressed.
    ///
    /// # Safety
    /// `mem` must point to `layout.bytes` writable bytes, 16-byte aligned,
    /// that stay mapped while the queue lives, and no device may be using
    /// that memory yet.
    pub unsafe fn new(mem: *mut u8, layout: RingLayout, event_idx: bool) -> Self {
        debug_assert!((mem as usize).is_multiple_of(16));
        for i in 0..layout.bytes as usize {
            // SAFETY: i < layout.bytes, inside the memory the caller gave.
            unsafe { std::ptr::write_volatile(mem.add(i), 0) };
        }
        // SAFETY: the three offsets lie inside `layout.bytes` (RingLayout::new).
        let mut q = unsafe {
            DriverQueue {
                desc: mem.add(layout.desc as usize).cast(),
                avail: mem.add(layout.avail as usize),
                used: mem.add(layout.used as usize),
                size: layout.size,
                event_idx,
                avail_idx: 0,
                published: 0,
                last_used: 0,
                pushed: vec![0; usize::from(layout.size)].into_boxed_slice(),
                used_event: 0,
                interrupts: true,
            }
        };
        q.set_interrupts(false);
        q
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors made available and not yet returned through the used ring.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    #[inline(always)]
    pub fn write_desc(&mut self, i: u16, d: Desc) {
        assert!(
            i < self.size,
            "descriptor {i} outside a ring of {}",
            self.size
        );
        // Two 8-byte stores (addr; len, flags and next): fewer store-buffer
        // entries than one per field.
        let rest = u64::from(d.len) | u64::from(d.flags) << 32 | u64::from(d.next) << 48;
        // SAFETY: i < size, inside the descriptor table, whose entries are
        // 16-byte aligned (`new`'s contract).
        unsafe {
            let p = self.desc.add(usize::from(i)).cast::<u64>();
            std::ptr::write_volatile(p, d.addr.to_le());
            std::ptr::write_volatile(p.add(1), rest.to_le());
        }
    }

    /// The address descriptor `i` holds now (the device may have rewritten it).
    #[inline(always)]
    pub fn desc_addr(&self, i: u16) -> u64 {
        assert!(
            i < self.size,
            "descriptor {i} outside a ring of {}",
            self.size
        );
        // SAFETY: i < size, inside the descriptor table; addr is its first field.
        u64::from_le(unsafe {
            std::ptr::read_volatile(self.desc.add(usize::from(i)).cast::<u64>())
        })
    }

    /// Hint: descriptor `i` (taken modulo the size: any value is harmless)
    /// is about to be read and rewritten.
    #[inline(always)]
    pub fn prefetch_desc(&self, i: u32) {
        let i = i as usize & usize::from(self.size - 1);
        prefetch_write(self.desc.wrapping_add(i).cast_const().cast());
    }

    /// Hint: the next `n` pushes will write the descriptors of their own
    /// slots (descriptors used in ring order): fetch those lines for
    /// writing, all at once.
    #[inline(always)]
    pub fn prefetch_next_descs(&self, n: u16) {
        let mask = usize::from(self.size - 1);
        let first = usize::from(self.avail_idx) & mask;
        // Four descriptors per 64-byte line.
        for k in (0..usize::from(n)).step_by(4) {
            let i = (first + k) & mask;
            prefetch_write(self.desc.wrapping_add(i).cast_const().cast());
        }
    }

    /// The avail slot the next `push_avail` fills.
    #[inline(always)]
    pub fn next_slot(&self) -> u16 {
        self.avail_idx & (self.size - 1)
    }

    /// Queues descriptor `head` in the avail ring (visible after `publish`).
    /// An entry that already holds `head` (descriptors used in ring order)
    /// is not rewritten: the line stays shared with the device's core
    /// instead of being taken back for every burst.
    #[inline(always)]
    pub fn push_avail(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx & (self.size - 1));
        if self.pushed[slot] != head {
            self.pushed[slot] = head;
            // SAFETY: slot < size, so 4 + 2 * slot + 2 <= 4 + 2 * size.
            unsafe {
                std::ptr::write_volatile(self.avail.add(4 + 2 * slot).cast::<u16>(), head.to_le())
            };
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes everything pushed visible to the device. Returns whether the
    /// device asked to be notified about it (VRING_USED_F_NO_NOTIFY clear,
    /// or with EVENT_IDX, avail_event crossed).
    #[inline]
    pub fn publish(&mut self) -> bool {
        let old = self.published;
        let new = self.avail_idx;
        if old == new {
            return false;
        }
        // Release: the entries and descriptors are visible before the index
        // that publishes them.
        // SAFETY: avail + 2 is the avail ring's idx field.
        unsafe { ring_u16(self.avail.add(2)) }.store(new.to_le(), Ordering::Release);
        self.published = new;
        // The device's flag or event index must be read after our index
        // write: the fence orders them, the loads themselves are Relaxed.
        fence(Ordering::SeqCst);
        if self.event_idx {
            // SAFETY: avail_event sits right after the used ring's elements.
            let ev = unsafe { ring_u16(self.used.add(4 + 8 * usize::from(self.size))) };
            need_event(u16::from_le(ev.load(Ordering::Relaxed)), new, old)
        } else {
            // SAFETY: the used ring's first field is its flags.
            let flags = u16::from_le(unsafe { ring_u16(self.used) }.load(Ordering::Relaxed));
            flags & USED_F_NO_NOTIFY == 0
        }
    }

    /// Used elements the device published and the driver has not consumed.
    /// More than are in flight means the device broke the ring.
    #[inline]
    pub fn used_ready(&self) -> Result<u16, UsedJump> {
        // Acquire: the used elements (and rewritten descriptors) the device
        // published before this index are visible after it.
        // SAFETY: used + 2 is the used ring's idx field.
        let idx = u16::from_le(unsafe { ring_u16(self.used.add(2)) }.load(Ordering::Acquire));
        let n = idx.wrapping_sub(self.last_used);
        if n > self.in_flight() {
            return Err(UsedJump {
                from: self.last_used,
                to: idx,
            });
        }
        Ok(n)
    }

    /// The `k`-th unconsumed used element, as the device wrote it.
    #[inline(always)]
    pub fn used_elem(&self, k: u16) -> UsedElem {
        let slot = self.last_used.wrapping_add(k) & (self.size - 1);
        // SAFETY: slot < size, so the element lies inside the used ring.
        let e = unsafe {
            std::ptr::read_volatile(self.used.add(4 + 8 * usize::from(slot)).cast::<UsedElem>())
        };
        UsedElem {
            id: u32::from_le(e.id),
            len: u32::from_le(e.len),
        }
    }

    /// Marks `n` used elements consumed. With EVENT_IDX and interrupts off,
    /// keeps used_event far ahead so the device never finds a reason to
    /// interrupt while the driver polls: half the index space ahead,
    /// rewritten only when less than a quarter is left (a write per burst
    /// would take the line from the device's core every time).
    #[inline]
    pub fn consume(&mut self, n: u16) {
        self.last_used = self.last_used.wrapping_add(n);
        if self.event_idx
            && !self.interrupts
            && self.used_event.wrapping_sub(self.last_used) < 0x4000
        {
            self.write_used_event(self.last_used.wrapping_add(0x8000));
        }
    }

    fn write_used_event(&mut self, v: u16) {
        self.used_event = v;
        // Relaxed: a hint to the device; where it must be seen before a
        // load, `set_interrupts` fences.
        // SAFETY: used_event sits right after the avail ring's entries.
        unsafe { ring_u16(self.avail.add(4 + 2 * usize::from(self.size))) }
            .store(v.to_le(), Ordering::Relaxed);
    }

    /// Asks for an interrupt on the next used element (`on`), or for none
    /// (poll mode). After switching on, returns whether used elements are
    /// already waiting: then the caller must not sleep.
    pub fn set_interrupts(&mut self, on: bool) -> bool {
        self.interrupts = on;
        let flags = if on { 0 } else { AVAIL_F_NO_INTERRUPT };
        // SAFETY: the avail ring's first field is its flags.
        unsafe { ring_u16(self.avail) }.store(flags.to_le(), Ordering::Relaxed);
        if self.event_idx {
            let ev = if on {
                self.last_used
            } else {
                self.last_used.wrapping_add(0x8000)
            };
            self.write_used_event(ev);
        }
        if !on {
            return false;
        }
        fence(Ordering::SeqCst);
        !matches!(self.used_ready(), Ok(0))
    }

    /// The used index as the device last wrote it (tests, diagnostics).
    pub fn last_used(&self) -> u16 {
        self.last_used
    }
}

/// virtio's vring_need_event: has `new` passed `event` since `old`?
#[inline(always)]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// 16-byte aligned zeroed test memory.
    pub struct TestMem {
        buf: Vec<u128>,
    }

    impl TestMem {
        pub fn new(bytes: usize) -> Self {
            TestMem {
                buf: vec![0; bytes.div_ceil(16)],
            }
        }
        pub fn ptr(&mut self) -> *mut u8 {
            self.buf.as_mut_ptr().cast()
        }
    }

    #[test]
    fn layouts_fit_their_slot_and_reject_bad_sizes() {
        let l = RingLayout::new(512).unwrap();
        assert_eq!(l.avail, 8192);
        assert_eq!(l.used, 9280);
        assert_eq!(l.used % 64, 0, "the used ring has its own cache line");
        assert!(l.bytes <= QUEUE_SLOT_BYTES);
        assert_eq!(RingLayout::new(256).unwrap().used % 4, 0);
        for bad in [0, 3, 1024, 513] {
            assert_eq!(RingLayout::new(bad), None);
        }
    }

    #[test]
    fn need_event_matches_the_spec_formula() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 10, 0));
        assert!(!need_event(10, 10, 0));
        assert!(need_event(u16::MAX, 0, u16::MAX - 1));
    }

    #[test]
    fn publish_reports_the_devices_notification_wish() {
        let l = RingLayout::new(8).unwrap();
        let mut m = TestMem::new(l.bytes as usize);
        // SAFETY: TestMem holds layout.bytes bytes and outlives the queue.
        let mut q = unsafe { DriverQueue::new(m.ptr(), l, false) };
        q.push_avail(0);
        assert!(q.publish(), "flags clear: notify");
        // SAFETY: used flags are the first u16 of the used ring in test memory.
        unsafe { std::ptr::write_volatile(m.ptr().add(l.used as usize).cast::<u16>(), 1) };
        q.push_avail(1);
        assert!(!q.publish(), "NO_NOTIFY: stay quiet");
        assert!(!q.publish(), "nothing new");
        // SAFETY: avail flags, the first u16 of the avail ring.
        let af = unsafe { std::ptr::read_volatile(m.ptr().add(l.avail as usize).cast::<u16>()) };
        assert_eq!(af, AVAIL_F_NO_INTERRUPT);
    }

    #[test]
    fn event_idx_kicks_only_when_avail_event_is_crossed() {
        let l = RingLayout::new(8).unwrap();
        let mut m = TestMem::new(l.bytes as usize);
        // SAFETY: as above.
        let mut q = unsafe { DriverQueue::new(m.ptr(), l, true) };
        let avail_event = l.used as usize + 4 + 8 * 8;
        // SAFETY: avail_event lies inside the used ring of test memory.
        unsafe { std::ptr::write_volatile(m.ptr().add(avail_event).cast::<u16>(), 3) };
        q.push_avail(0);
        q.push_avail(1);
        assert!(!q.publish(), "idx 2 has not passed event 3");
        q.push_avail(2);
        q.push_avail(3);
        assert!(q.publish(), "idx 4 passed event 3");
        // used_event stays far ahead while polling.
        let used_event = l.avail as usize + 4 + 2 * 8;
        // SAFETY: used_event lies inside the avail ring of test memory.
        let ue = unsafe { std::ptr::read_volatile(m.ptr().add(used_event).cast::<u16>()) };
        assert_eq!(ue, 0x8000);
    }

    /// The driver on one thread, a device on another, over the same ring
    /// memory: every descriptor reaches the device and every used element
    /// comes back, in order, with the values written. The ring indices are
    /// the only synchronisation, so this is also what a race detector
    /// checks: built with `-Zsanitizer=thread`, it reports the old
    /// volatile-and-fence indices as data races and these atomics as none.
    #[test]
    fn driver_and_device_on_two_threads_see_every_element_in_order() {
        struct Mem(*mut u8);
        // SAFETY: the memory outlives both threads (joined below) and each
        // side accesses only what the ring protocol gives it.
        unsafe impl Send for Mem {}
        const N: u32 = 20_000;
        let l = RingLayout::new(64).unwrap();
        let mut m = TestMem::new(l.bytes as usize);
        let shared = Mem(m.ptr());
        // SAFETY: TestMem holds layout.bytes bytes and outlives the queue.
        let mut q = unsafe { DriverQueue::new(m.ptr(), l, false) };
        let device = std::thread::spawn(move || {
            let shared = shared;
            // SAFETY: the queue memory the driver was built on.
            let mut d = unsafe { crate::testdev::TestDevice::new(shared.0, l) };
            let mut n = 0;
            while n < N {
                match d.pop() {
                    Some((head, desc)) => {
                        assert_eq!(desc.addr, 0x1000 + u64::from(n), "descriptor {n}");
                        d.used(u32::from(head), desc.len);
                        n += 1;
                    }
                    None => std::thread::yield_now(),
                }
            }
        });
        let (mut sent, mut got) = (0u32, 0u32);
        while got < N {
            while sent < N && q.in_flight() < l.size {
                let i = q.next_slot();
                let d = Desc {
                    addr: 0x1000 + u64::from(sent),
                    len: sent,
                    flags: 0,
                    next: 0,
                };
                q.write_desc(i, d);
                q.push_avail(i);
                sent += 1;
            }
            q.publish();
            let k = q.used_ready().expect("no used jump");
            for j in 0..k {
                assert_eq!(q.used_elem(j).len, got, "used element {got}");
                got += 1;
            }
            q.consume(k);
            if k == 0 {
                std::thread::yield_now();
            }
        }
        device.join().unwrap();
    }

    #[test]
    fn used_index_beyond_what_is_in_flight_is_reported() {
        let l = RingLayout::new(4).unwrap();
        let mut m = TestMem::new(l.bytes as usize);
        // SAFETY: as above.
        let mut q = unsafe { DriverQueue::new(m.ptr(), l, false) };
        q.push_avail(0);
        q.publish();
        // SAFETY: used idx inside test memory.
        unsafe { std::ptr::write_volatile(m.ptr().add(l.used as usize + 2).cast::<u16>(), 2) };
        assert_eq!(q.used_ready(), Err(UsedJump { from: 0, to: 2 }));
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(m.ptr().add(l.used as usize + 2).cast::<u16>(), 1) };
        assert_eq!(q.used_ready(), Ok(1));
        assert!(q.set_interrupts(true), "a used element is waiting");
    }
}
