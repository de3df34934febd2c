//! Single-producer single-consumer rings of buffer handles in shared memory.
//!
//! A ring of `size` slots always holds `size` buffers: slots the consumer has
//! not reached yet hold full buffers, the others hold empty ones. Sending
//! swaps the sender's full buffer into the next empty slot and hands the empty
//! one back; receiving swaps the receiver's empty buffer into the next full
//! slot. Nothing is allocated and no lock is taken: each side publishes its
//! index with one release store per burst and refreshes its cached copy of
//! the other index only when the cache says the ring looks full or empty.
//!
//! Ring memory is host-private (never in the pool a guest maps), but another
//! process writes it, so every slot read is validated before it becomes a
//! handle; a slot that fails is skipped and counted, never trusted.

use crate::futex;
use std::mem::{offset_of, size_of};
use std::os::fd::RawFd;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;
use zc_proto::{BufferHandle, BufferIndex};

/// The control block at the start of every ring; slots follow it.
/// Each side's index sits alone on its cache line so the two cores do not
/// fight over one line; the sleep flags change rarely and get their own.
#[repr(C)]
pub struct RingShared {
    prod: AtomicU32,
    _pad0: [u8; 60],
    cons: AtomicU32,
    _pad1: [u8; 60],
    cons_sleeping: AtomicU32,
    cons_wake: AtomicU32,
    _pad2: [u8; 56],
    prod_sleeping: AtomicU32,
    prod_wake: AtomicU32,
    _pad3: [u8; 56],
}

pub const RING_HEADER_SIZE: usize = 256;
const _: () = assert!(size_of::<RingShared>() == RING_HEADER_SIZE);
const _: () = assert!(offset_of!(RingShared, cons) == 64);
const _: () = assert!(offset_of!(RingShared, cons_sleeping) == 128);
const _: () = assert!(offset_of!(RingShared, prod_sleeping) == 192);

/// What a side's `*_sleeping` word says: awake, asleep on the futex word
/// beside it (a host process), or asleep on the ring's bell (an eventfd a
/// worker waits on together with many other things).
const AWAKE: u32 = 0;
const ASLEEP_FUTEX: u32 = 1;
const ASLEEP_BELL: u32 = 2;

/// Wakes a side that said it sleeps (`mode`, read from its sleeping word).
#[inline]
fn wake(mode: u32, word: &AtomicU32, bell: Option<RawFd>) {
    match (mode, bell) {
        (AWAKE, _) => {}
        (ASLEEP_BELL, Some(fd)) => {
            let one = 1u64;
            // SAFETY: writes 8 bytes from a local to an eventfd the owner of
            // this end keeps open (set_peer_bell's contract); a full counter
            // (EAGAIN) means the sleeper is woken already.
            unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        }
        // A futex sleeper, or a bell sleeper we cannot ring (it still
        // looks again within its longest sleep).
        _ => {
            word.fetch_add(1, Ordering::Release);
            futex::wake_all(word);
        }
    }
}

/// Smallest and largest ring sizes (slots); sizes are powers of two.
pub const MIN_RING_SIZE: u32 = 64;
pub const MAX_RING_SIZE: u32 = 1 << 20;

/// Bytes a ring of `size` slots occupies.
pub const fn ring_bytes(size: u32) -> usize {
    RING_HEADER_SIZE + 8 * size as usize
}

#[inline(always)]
fn encode(index: BufferIndex, len: u32) -> u64 {
    u64::from(index.get()) | (u64::from(len) << 32)
}

/// What a slot may legally contain: buffer indices and packet lengths of
/// the pool the ring carries.
#[derive(Clone, Copy, Debug)]
pub struct SlotLimits {
    pub buf_count: u32,
    pub max_len: u32,
}

impl SlotLimits {
    #[inline(always)]
    fn decode(&self, v: u64) -> Option<(BufferIndex, u32)> {
        let (idx, len) = (v as u32, (v >> 32) as u32);
        (idx < self.buf_count && len <= self.max_len).then_some((BufferIndex::new(idx), len))
    }
}

/// Where a ring lives in a mapping. Both ends are built from this.
#[derive(Clone, Copy, Debug)]
struct RingPtrs {
    shared: *const RingShared,
    slots: *const AtomicU64,
    mask: u32,
}

impl RingPtrs {
    /// # Safety
    /// `base` must point to `ring_bytes(size)` bytes, 64-byte aligned, mapped
    /// for as long as the returned value is used; `size` a power of two.
    unsafe fn new(base: *mut u8, size: u32) -> Self {
        debug_assert!(size.is_power_of_two());
        RingPtrs {
            shared: base.cast(),
            // SAFETY: the slots start RING_HEADER_SIZE bytes in, inside the region.
            slots: unsafe { base.add(RING_HEADER_SIZE) }.cast(),
            mask: size - 1,
        }
    }

    #[inline(always)]
    fn shared(&self) -> &RingShared {
        // SAFETY: `new`'s contract keeps the header mapped; RingShared holds
        // only atomics, so a shared reference is sound under concurrent writes.
        unsafe { &*self.shared }
    }

    #[inline(always)]
    fn slot(&self, pos: u32) -> &AtomicU64 {
        // SAFETY: pos & mask < size, so the slot lies inside the ring; atomics
        // tolerate concurrent access by the other process.
        unsafe { &*self.slots.add((pos & self.mask) as usize) }
    }

    fn size(&self) -> u32 {
        self.mask + 1
    }
}

/// Writes a fresh ring: both indices 0, every slot an empty buffer.
///
/// # Safety
/// `base` must point to `ring_bytes(size)` writable bytes, 64-byte aligned,
/// that no other process uses yet; `size` must be a power of two.
pub unsafe fn init_ring(base: *mut u8, size: u32, empties: &[BufferIndex]) {
    assert_eq!(empties.len(), size as usize);
    // SAFETY: forwarded contract.
    let r = unsafe { RingPtrs::new(base, size) };
    let s = r.shared();
    for a in [
        &s.prod,
        &s.cons,
        &s.cons_sleeping,
        &s.cons_wake,
        &s.prod_sleeping,
        &s.prod_wake,
    ] {
        a.store(0, Ordering::Relaxed);
    }
    for (i, idx) in empties.iter().enumerate() {
        r.slot(i as u32).store(encode(*idx, 0), Ordering::Relaxed);
    }
    fence(Ordering::Release);
}

/// The buffer indices a ring holds, read by the daemon when no process is
/// attached (to rebuild the free list). Out-of-range entries are skipped.
///
/// # Safety
/// Same region contract as [`init_ring`]; nobody may be writing the ring.
pub unsafe fn ring_contents(
    base: *mut u8,
    size: u32,
    limits: SlotLimits,
) -> Vec<Option<BufferIndex>> {
    // SAFETY: forwarded contract.
    let r = unsafe { RingPtrs::new(base, size) };
    (0..size)
        .map(|i| {
            limits
                .decode(r.slot(i).load(Ordering::Acquire) & 0xffff_ffff)
                .map(|(b, _)| b)
        })
        .collect()
}

/// Replaces slot `i` (daemon repair of a duplicate or corrupt entry).
///
/// # Safety
/// Same region contract as [`init_ring`]; nobody may be writing the ring.
pub unsafe fn set_slot(base: *mut u8, size: u32, i: u32, idx: BufferIndex) {
    // SAFETY: forwarded contract.
    let r = unsafe { RingPtrs::new(base, size) };
    r.slot(i).store(encode(idx, 0), Ordering::Release);
}

/// Indices of a ring as seen from outside: (produced, consumed).
///
/// # Safety
/// Same region contract as [`init_ring`].
pub unsafe fn ring_indices(base: *mut u8, size: u32) -> (u32, u32) {
    // SAFETY: forwarded contract.
    let r = unsafe { RingPtrs::new(base, size) };
    (
        r.shared().prod.load(Ordering::Acquire),
        r.shared().cons.load(Ordering::Acquire),
    )
}

/// The sending end. `Send` but not `Sync`: one thread owns it.
pub struct Producer {
    ring: RingPtrs,
    head: u32,
    cons_cache: u32,
    limits: SlotLimits,
    bad_slots: u64,
    /// The consumer's bell, when the consumer may be a worker.
    cons_bell: Option<RawFd>,
}

// SAFETY: the raw pointers refer to a shared mapping kept alive by the
// owner of this endpoint; the endpoint itself is used by one thread at a time.
unsafe impl Send for Producer {}

impl Producer {
    /// # Safety
    /// As [`init_ring`], for a ring that was initialised; the caller must be
    /// the only producer (the daemon enforces this).
    pub unsafe fn attach(base: *mut u8, size: u32, limits: SlotLimits) -> Self {
        // SAFETY: forwarded contract.
        let ring = unsafe { RingPtrs::new(base, size) };
        let head = ring.shared().prod.load(Ordering::Acquire);
        let cons_cache = ring.shared().cons.load(Ordering::Acquire);
        Producer {
            ring,
            head,
            cons_cache,
            limits,
            bad_slots: 0,
            cons_bell: None,
        }
    }

    #[inline(always)]
    fn free(&self) -> u32 {
        // The consumer can be at most a ring behind and never ahead. An
        // index outside that is corrupt; trusting it would overwrite slots
        // it has not consumed (or the same slot twice in one burst), so
        // nothing is free until it says something possible.
        let used = self.head.wrapping_sub(self.cons_cache);
        self.ring.size().saturating_sub(used)
    }

    /// Swaps `bufs[..n]` (full) for empty buffers; returns `n`.
    #[inline]
    pub fn send_burst(&mut self, bufs: &mut [BufferHandle]) -> usize {
        if (self.free() as usize) < bufs.len() {
            self.cons_cache = self.ring.shared().cons.load(Ordering::Acquire);
        }
        let budget = (self.free() as usize).min(bufs.len());
        if budget == 0 {
            return 0;
        }
        let mut sent = 0;
        for i in 0..budget {
            let slot = self.ring.slot(self.head.wrapping_add(i as u32));
            match self.limits.decode(slot.load(Ordering::Relaxed)) {
                Some((empty, _)) => {
                    let b = &mut bufs[sent];
                    slot.store(encode(b.index(), b.len()), Ordering::Relaxed);
                    // SAFETY: the slot held `empty`, which now passes to the
                    // sender; the sender's buffer went into the slot.
                    unsafe { b.replace(empty, 0) };
                    sent += 1;
                }
                None => self.bad_slots += 1,
            }
        }
        self.head = self.head.wrapping_add(budget as u32);
        let s = self.ring.shared();
        s.prod.store(self.head, Ordering::Release);
        fence(Ordering::SeqCst);
        wake(
            s.cons_sleeping.load(Ordering::Relaxed),
            &s.cons_wake,
            self.cons_bell,
        );
        sent
    }

    /// Where to ring a consumer that sleeps on its bell.
    ///
    /// # Safety
    /// `fd` must be an eventfd that stays open for as long as this end is used.
    pub unsafe fn set_peer_bell(&mut self, fd: RawFd) {
        self.cons_bell = Some(fd);
    }

    /// For a worker about to sleep: asks the consumer to ring this end's
    /// bell when it frees a slot; returns whether a slot is free already
    /// (then do not sleep). Call [`Producer::disarm`] when awake.
    pub fn arm(&mut self) -> bool {
        let s = self.ring.shared();
        s.prod_sleeping.store(ASLEEP_BELL, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.cons_cache = s.cons.load(Ordering::Acquire);
        self.free() != 0
    }

    pub fn disarm(&mut self) {
        self.ring
            .shared()
            .prod_sleeping
            .store(AWAKE, Ordering::Relaxed);
    }

    /// Sleeps until the consumer frees a slot or `timeout` passes.
    pub fn wait(&mut self, timeout: Duration) {
        let s = self.ring.shared();
        let seq = s.prod_wake.load(Ordering::Acquire);
        s.prod_sleeping.store(ASLEEP_FUTEX, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.cons_cache = s.cons.load(Ordering::Acquire);
        if self.free() == 0 {
            futex::wait(&s.prod_wake, seq, timeout);
        }
        s.prod_sleeping.store(AWAKE, Ordering::Relaxed);
    }

    /// Slots that held something other than a valid empty buffer.
    pub fn bad_slots(&self) -> u64 {
        self.bad_slots
    }
}

/// The receiving end. `Send` but not `Sync`: one thread owns it.
///
/// Zero-length packets are never delivered: a slot with length 0 in the
/// consumer's region is an empty left behind by a killed consumer.
pub struct Consumer {
    ring: RingPtrs,
    head: u32,
    prod_cache: u32,
    limits: SlotLimits,
    bad_slots: u64,
    /// The producer's bell, when the producer may be a worker.
    prod_bell: Option<RawFd>,
}

// SAFETY: as for Producer.
unsafe impl Send for Consumer {}

impl Consumer {
    /// # Safety
    /// As [`Producer::attach`], for the only consumer.
    pub unsafe fn attach(base: *mut u8, size: u32, limits: SlotLimits) -> Self {
        // SAFETY: forwarded contract.
        let ring = unsafe { RingPtrs::new(base, size) };
        let head = ring.shared().cons.load(Ordering::Acquire);
        let prod_cache = ring.shared().prod.load(Ordering::Acquire);
        Consumer {
            ring,
            head,
            prod_cache,
            limits,
            bad_slots: 0,
            prod_bell: None,
        }
    }

    #[inline(always)]
    fn ready(&self) -> u32 {
        let n = self.prod_cache.wrapping_sub(self.head);
        if n > self.ring.size() {
            0
        } else {
            n
        }
    }

    /// Swaps `bufs[..n]` (empty) for received packets; returns `n`.
    #[inline]
    pub fn recv_burst(&mut self, bufs: &mut [BufferHandle]) -> usize {
        if (self.ready() as usize) < bufs.len() {
            self.prod_cache = self.ring.shared().prod.load(Ordering::Acquire);
        }
        let budget = (self.ready() as usize).min(bufs.len());
        if budget == 0 {
            return 0;
        }
        let mut got = 0;
        for i in 0..budget {
            let slot = self.ring.slot(self.head.wrapping_add(i as u32));
            match self.limits.decode(slot.load(Ordering::Relaxed)) {
                // An empty buffer where a packet should be: a consumer was
                // killed after swapping this slot but before publishing its
                // index. The packet left with it; the empty stays for the
                // producer.
                Some((_, 0)) => {}
                Some((full, len)) => {
                    let b = &mut bufs[got];
                    slot.store(encode(b.index(), 0), Ordering::Relaxed);
                    // SAFETY: the slot held `full`, which now passes to the
                    // receiver; the receiver's empty went into the slot.
                    unsafe { b.replace(full, len) };
                    got += 1;
                }
                None => self.bad_slots += 1,
            }
        }
        self.head = self.head.wrapping_add(budget as u32);
        let s = self.ring.shared();
        s.cons.store(self.head, Ordering::Release);
        fence(Ordering::SeqCst);
        wake(
            s.prod_sleeping.load(Ordering::Relaxed),
            &s.prod_wake,
            self.prod_bell,
        );
        got
    }

    /// Where to ring a producer that sleeps on its bell.
    ///
    /// # Safety
    /// `fd` must be an eventfd that stays open for as long as this end is used.
    pub unsafe fn set_peer_bell(&mut self, fd: RawFd) {
        self.prod_bell = Some(fd);
    }

    /// Sleeps until the producer publishes a packet or `timeout` passes.
    pub fn wait(&mut self, timeout: Duration) {
        let s = self.ring.shared();
        let seq = s.cons_wake.load(Ordering::Acquire);
        s.cons_sleeping.store(ASLEEP_FUTEX, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.prod_cache = s.prod.load(Ordering::Acquire);
        if self.ready() == 0 {
            futex::wait(&s.cons_wake, seq, timeout);
        }
        s.cons_sleeping.store(AWAKE, Ordering::Relaxed);
    }

    pub fn bad_slots(&self) -> u64 {
        self.bad_slots
    }

    /// For a worker about to sleep: asks the producer to ring this end's
    /// bell when it publishes; returns whether packets are waiting already
    /// (then do not sleep). Call [`Consumer::disarm`] when awake.
    pub fn arm(&mut self) -> bool {
        let s = self.ring.shared();
        s.cons_sleeping.store(ASLEEP_BELL, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.prod_cache = s.prod.load(Ordering::Acquire);
        self.ready() != 0
    }

    pub fn disarm(&mut self) {
        self.ring
            .shared()
            .cons_sleeping
            .store(AWAKE, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A 64-byte aligned heap region standing in for the shared mapping.
    struct Region(Vec<AtomicU64>);
    impl Region {
        fn new(size: u32) -> Self {
            Region(
                (0..ring_bytes(size) / 8 + 8)
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            )
        }
        fn base(&self) -> *mut u8 {
            let p = self.0.as_ptr() as usize;
            ((p + 63) & !63) as *mut u8
        }
    }

    const LIMITS: SlotLimits = SlotLimits {
        buf_count: 1000,
        max_len: 1984,
    };

    fn ring(size: u32) -> (Region, Producer, Consumer) {
        let r = Region::new(size);
        let empties: Vec<_> = (0..size).map(BufferIndex::new).collect();
        // SAFETY: the region is large enough, aligned, and outlives the ends.
        unsafe {
            init_ring(r.base(), size, &empties);
            let p = Producer::attach(r.base(), size, LIMITS);
            let c = Consumer::attach(r.base(), size, LIMITS);
            (r, p, c)
        }
    }

    /// Handles for buffers `first..first + n`; each test keeps the ranges
    /// it makes apart, as transports keep buffers apart.
    fn hand(first: u32, n: u32, len: u32) -> Vec<BufferHandle> {
        (first..first + n)
            // SAFETY: test handles into no real pool, one per index.
            .map(|i| unsafe { BufferHandle::from_raw(BufferIndex::new(i), len) })
            .collect()
    }

    #[test]
    fn swaps_preserve_every_buffer_and_length() {
        let (_r, mut p, mut c) = ring(64);
        let mut tx = hand(500, 8, 60);
        assert_eq!(p.send_burst(&mut tx), 8);
        // The sender now holds the ring's former empties 0..8.
        assert_eq!(
            tx.iter().map(|h| h.index().get()).collect::<Vec<_>>(),
            (0..8).collect::<Vec<_>>()
        );
        assert!(tx.iter().all(|h| h.is_empty()));
        let mut rx = hand(600, 16, 0);
        assert_eq!(c.recv_burst(&mut rx), 8);
        assert_eq!(
            rx[..8].iter().map(|h| h.index().get()).collect::<Vec<_>>(),
            (500..508).collect::<Vec<_>>()
        );
        assert!(rx[..8].iter().all(|h| h.len() == 60));
        // The receiver's old buffers went into the ring and come back to the sender.
        let mut tx2 = hand(700, 64, 1);
        assert_eq!(p.send_burst(&mut tx2), 64);
        let mut back: Vec<u32> = tx2.iter().map(|h| h.index().get()).collect();
        back.sort();
        let mut want: Vec<u32> = (8..64).chain(600..608).collect();
        want.sort();
        assert_eq!(back, want);
    }

    #[test]
    fn full_and_empty_rings_move_nothing() {
        let (_r, mut p, mut c) = ring(64);
        let mut rx = hand(900, 4, 0);
        assert_eq!(c.recv_burst(&mut rx), 0);
        let mut tx = hand(100, 64, 60);
        assert_eq!(p.send_burst(&mut tx), 64);
        let mut more = hand(200, 1, 60);
        assert_eq!(p.send_burst(&mut more), 0);
        assert_eq!(more[0].index().get(), 200);
    }

    #[test]
    fn corrupt_slots_are_skipped_and_counted() {
        let (r, mut p, mut c) = ring(64);
        let mut tx = hand(100, 4, 60);
        assert_eq!(p.send_burst(&mut tx), 4);
        // Another process scribbles an out-of-range index and a huge length.
        // SAFETY: test region, no concurrent writer.
        unsafe {
            let slots = r.base().add(RING_HEADER_SIZE).cast::<AtomicU64>();
            (*slots.add(1)).store(5000, Ordering::Relaxed);
            (*slots.add(2)).store(7 | (5000u64 << 32), Ordering::Relaxed);
        }
        let mut rx = hand(600, 4, 0);
        assert_eq!(c.recv_burst(&mut rx), 2);
        assert_eq!(c.bad_slots(), 2);
        assert_eq!(rx[0].index().get(), 100);
        assert_eq!(rx[1].index().get(), 103);
    }

    #[test]
    fn a_corrupt_consumer_index_overwrites_no_unconsumed_slot() {
        let (r, mut p, mut c) = ring(64);
        let cons = || {
            // SAFETY: the consumer index lies in the test region's header.
            unsafe {
                &*r.base()
                    .add(offset_of!(RingShared, cons))
                    .cast::<AtomicU32>()
            }
        };
        // 4 packets consumed, 10 waiting in slots 4..14.
        assert_eq!(p.send_burst(&mut hand(100, 4, 60)), 4);
        assert_eq!(c.recv_burst(&mut hand(600, 4, 0)), 4);
        assert_eq!(p.send_burst(&mut hand(200, 10, 60)), 10);
        // The consumer's index claims more than was produced, then more
        // than a ring behind: either way nothing may be sent, not even a
        // burst of two rings' worth.
        for bogus in [0x8000_0000, 14 + 1, 14u32.wrapping_sub(65)] {
            cons().store(bogus, Ordering::Release);
            let mut tx = hand(300, 128, 60);
            assert_eq!(p.send_burst(&mut tx), 0, "consumer index {bogus:#x}");
            assert!(
                tx.iter()
                    .enumerate()
                    .all(|(i, h)| h.index().get() == 300 + i as u32 && h.len() == 60),
                "the sender's buffers are untouched"
            );
        }
        // Once the index is sane again, the 10 waiting packets arrive intact
        // and the producer fills exactly the 54 free slots.
        cons().store(4, Ordering::Release);
        let mut tx = hand(300, 128, 61);
        assert_eq!(p.send_burst(&mut tx), 54);
        // SAFETY: as above; the dead consumer is replaced.
        let mut c = unsafe { Consumer::attach(r.base(), 64, LIMITS) };
        let mut rx = hand(700, 64, 0);
        assert_eq!(c.recv_burst(&mut rx), 64);
        let got: Vec<(u32, u32)> = rx.iter().map(|h| (h.index().get(), h.len())).collect();
        let want: Vec<(u32, u32)> = (200..210)
            .map(|i| (i, 60))
            .chain((300..354).map(|i| (i, 61)))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_consumer_killed_mid_burst_leaves_no_phantom_packets() {
        let (r, mut p, mut c) = ring(64);
        let mut tx = hand(100, 8, 60);
        assert_eq!(p.send_burst(&mut tx), 8);
        // Simulate a consumer that swapped 3 slots and died before
        // publishing its index: the slots hold its empty buffers.
        // SAFETY: test region, no concurrent writer.
        unsafe {
            let slots = r.base().add(RING_HEADER_SIZE).cast::<AtomicU64>();
            for i in 0..3 {
                (*slots.add(i)).store(
                    encode(BufferIndex::new(700 + i as u32), 0),
                    Ordering::Relaxed,
                );
            }
        }
        let _ = c;
        // SAFETY: as above; the dead consumer is gone.
        c = unsafe { Consumer::attach(r.base(), 64, LIMITS) };
        let mut rx = hand(800, 8, 0);
        assert_eq!(c.recv_burst(&mut rx), 5);
        assert_eq!(
            rx[..5].iter().map(|h| h.index().get()).collect::<Vec<_>>(),
            (103..108).collect::<Vec<_>>()
        );
        assert_eq!(c.bad_slots(), 0);
    }

    #[test]
    fn two_threads_move_a_million_packets_in_order() {
        let (_r, mut p, mut c) = ring(256);
        const N: u64 = 1_000_000;
        let sender = std::thread::spawn(move || {
            let mut tx = hand(300, 32, 0);
            let mut seq = 0u64;
            let mut pending = 0;
            while seq < N || pending > 0 {
                while pending < tx.len() && seq < N {
                    // Carry the sequence number in the length field (mod 1024).
                    let idx = tx[pending].index();
                    // SAFETY: the handle keeps its own buffer.
                    unsafe { tx[pending].replace(idx, (seq % 1024) as u32 + 1) };
                    seq += 1;
                    pending += 1;
                }
                let n = p.send_burst(&mut tx[..pending]);
                tx[..pending].rotate_left(n);
                pending -= n;
                if n == 0 {
                    p.wait(Duration::from_millis(1));
                }
            }
        });
        let mut rx = hand(600, 32, 0);
        let mut got = 0u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while got < N && Instant::now() < deadline {
            let n = c.recv_burst(&mut rx);
            for h in &rx[..n] {
                assert_eq!(u64::from(h.len()), got % 1024 + 1);
                got += 1;
            }
            if n == 0 {
                c.wait(Duration::from_millis(1));
            }
        }
        sender.join().unwrap();
        assert_eq!(got, N);
    }

    /// An eventfd's count, read without blocking (0 when never rung).
    fn rung(fd: &std::os::fd::OwnedFd) -> u64 {
        use std::os::fd::AsRawFd;
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local from our own eventfd.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }

    fn eventfd() -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: a fresh eventfd; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: we own the new descriptor.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn a_sleeping_worker_is_rung_on_its_bell_and_only_while_it_sleeps() {
        use std::os::fd::AsRawFd;
        let (_r, mut p, mut c) = ring(64);
        let (cons_bell, prod_bell) = (eventfd(), eventfd());
        // SAFETY: both eventfds outlive the ends.
        unsafe {
            p.set_peer_bell(cons_bell.as_raw_fd());
            c.set_peer_bell(prod_bell.as_raw_fd());
        }
        let mut tx = hand(100, 4, 60);
        assert_eq!(p.send_burst(&mut tx), 4);
        assert_eq!(rung(&cons_bell), 0, "an awake consumer is not rung");
        assert!(c.arm(), "packets already wait: do not sleep");
        let mut rx = hand(600, 4, 0);
        assert_eq!(c.recv_burst(&mut rx), 4);
        assert!(!c.arm());
        let mut tx = hand(200, 1, 60);
        assert_eq!(p.send_burst(&mut tx), 1);
        assert_eq!(rung(&cons_bell), 1);
        c.disarm();
        assert_eq!(p.send_burst(&mut hand(300, 1, 60)), 1);
        assert_eq!(rung(&cons_bell), 0);
        // The producer side: full ring, armed, the consumer frees a slot.
        let mut fill = hand(400, 64, 60);
        assert_eq!(p.send_burst(&mut fill), 62);
        assert!(!p.arm(), "a full ring: sleep");
        assert_eq!(c.recv_burst(&mut hand(700, 1, 0)), 1);
        assert_eq!(rung(&prod_bell), 1);
        assert!(p.arm());
        p.disarm();
    }
}
