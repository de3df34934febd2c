//! The driver core: RX and TX over one split virtqueue each, moving pool
//! buffers, never bytes.
//!
//! Every descriptor is one pool buffer: its address is the guest-physical
//! address of the buffer's packet data minus the 12-byte virtio-net header.
//! After the device completes a descriptor, the driver owns whatever buffer
//! the descriptor names *then* (the zero-copy contract's exchange; a copying
//! device leaves the address alone). Every value the device wrote is checked
//! before use; a violation stops the queue with an error, the driver never
//! touches memory on a device's say-so.

use crate::error::Violation;
pub use crate::held::Held;
use crate::virtq::{Desc, DriverQueue, DESC_F_WRITE};
use std::os::fd::AsRawFd;
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;
use zc_proto::buffer::{HEADROOM, VIRTIO_NET_HDR_LEN};
use zc_proto::{BufferHandle, BufferIndex, PoolLayout, PoolView};

/// How long a driver without interrupts (PCI, poll mode) sleeps per wait.
pub const POLL_SLEEP: Duration = Duration::from_millis(1);

/// How the driver tells the device about new buffers, and waits for it.
pub enum Bell {
    /// vhost-user: the kick and call eventfds of one virtqueue.
    Eventfd { kick: EventFd, call: EventFd },
    /// virtio-pci: the queue's notify address in the mapped BAR. No
    /// interrupts: waiting sleeps for short spells.
    Mmio { notify: *mut u16, queue: u16 },
}

// SAFETY: `notify` points into a BAR mapping that the device owner keeps
// alive as long as the core; it is only written with volatile stores.
unsafe impl Send for Bell {}

impl Bell {
    #[inline]
    fn kick(&self) {
        match self {
            Bell::Eventfd { kick, .. } => {
                let _ = kick.write(1);
            }
            // SAFETY: notify lies in the mapped notify region (checked when
            // the capability was walked); a 16-bit write is what virtio-pci
            // expects.
            Bell::Mmio { notify, queue } => unsafe { std::ptr::write_volatile(*notify, *queue) },
        }
    }

    fn has_interrupts(&self) -> bool {
        matches!(self, Bell::Eventfd { .. })
    }

    /// Waits for an interrupt (eventfd) or, without interrupts, sleeps.
    fn wait(&self, timeout: Duration) {
        match self {
            Bell::Eventfd { call, .. } => {
                let mut pfd = libc::pollfd {
                    fd: call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // ppoll, not poll: a wait shorter than a millisecond (a
                // latency probe due in 100 us) must not round to zero.
                let ts = libc::timespec {
                    tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
                    tv_nsec: timeout.subsec_nanos() as libc::c_long,
                };
                // SAFETY: one pollfd and one timespec we own, for the
                // duration of the call; no signal mask change.
                let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
                if r > 0 {
                    let _ = call.read();
                }
            }
            Bell::Mmio { .. } => std::thread::sleep(timeout.min(POLL_SLEEP)),
        }
    }
}

/// Between buffer indices and the addresses the device sees.
#[derive(Clone, Copy, Debug)]
pub struct Addressing {
    pub layout: PoolLayout,
    /// Guest-physical address of pool offset 0.
    pub gpa_base: u64,
}

impl Addressing {
    /// The descriptor address of buffer `b`: its packet data minus the header.
    #[inline(always)]
    pub fn desc_addr(&self, b: BufferIndex) -> u64 {
        let off = self
            .layout
            .packet_offset(b)
            .unwrap_or_else(|| panic!("buffer {b} does not belong to this pool"));
        self.gpa_base + off - u64::from(VIRTIO_NET_HDR_LEN)
    }

    /// The buffer a device-written address names, if it is a descriptor
    /// address of a pool buffer.
    #[inline(always)]
    pub fn buffer(&self, addr: u64) -> Option<BufferIndex> {
        let off = addr.checked_sub(self.gpa_base)?;
        self.layout.buffer_at_packet_offset(off, VIRTIO_NET_HDR_LEN)
    }

    /// Bytes a descriptor covers at most: header plus the largest packet.
    pub fn max_desc_len(&self) -> u32 {
        VIRTIO_NET_HDR_LEN + self.layout.max_packet()
    }
}

const NOT_POSTED: u32 = u32::MAX;

/// Counters of one core (what the driver saw; the host counts its own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub packets: u64,
    /// Completions that came back naming a different buffer.
    pub exchanged: u64,
    /// Completions that came back naming the same buffer (copy path).
    pub copied: u64,
    pub kicks: u64,
}

/// What both directions share: the queue, the addressing, the buffers.
struct Common {
    q: DriverQueue,
    addr: Addressing,
    held: Held,
    /// Buffer each descriptor carries while in flight, and its length.
    posted: Vec<u32>,
    posted_len: Vec<u32>,
    view: PoolView,
    /// Empty buffers the driver holds and has not posted or handed out.
    free: Vec<BufferIndex>,
    bell: Bell,
    failed: Option<Violation>,
    stats: CoreStats,
}

impl Common {
    fn new(
        q: DriverQueue,
        view: PoolView,
        addr: Addressing,
        stock: &[BufferIndex],
        bell: Bell,
        mut held: Held,
    ) -> Self {
        assert_eq!(view.layout(), &addr.layout, "one pool");
        let mut free = Vec::with_capacity(stock.len());
        for &b in stock {
            if held.adopt(b) {
                free.push(b);
            }
        }
        let size = usize::from(q.size());
        Common {
            q,
            addr,
            held,
            posted: vec![NOT_POSTED; size],
            posted_len: vec![0; size],
            view,
            free,
            bell,
            failed: None,
            stats: CoreStats::default(),
        }
    }

    fn fail(&mut self, v: Violation) {
        if self.failed.is_none() {
            log::error!("zc-guest: the device broke the zc contract: {v}; this queue stops");
            self.failed = Some(v);
        }
    }

    /// Validates used element `k` and takes the buffer its descriptor now
    /// names: returns (descriptor id, buffer, used length).
    #[inline(always)]
    fn complete(
        &mut self,
        k: u16,
        min_len: u32,
        max_len: u32,
    ) -> Result<(u16, BufferIndex, u32), Violation> {
        let e = self.q.used_elem(k);
        let size = self.q.size();
        let id = match u16::try_from(e.id) {
            Ok(id) if id < size && self.posted[usize::from(id)] != NOT_POSTED => id,
            _ => return Err(Violation::UsedId { id: e.id, size }),
        };
        let max = max_len.min(self.posted_len(id));
        if e.len < min_len || e.len > max {
            return Err(Violation::UsedLen {
                id,
                len: e.len,
                min: min_len,
                max,
            });
        }
        let a = self.q.desc_addr(id);
        let b = self.addr.buffer(a).ok_or(Violation::Addr { id, addr: a })?;
        let old = BufferIndex::new(self.posted[usize::from(id)]);
        if !self.held.complete(old, b) {
            return Err(Violation::Duplicate { id, buf: b.get() });
        }
        if b != old {
            self.stats.exchanged += 1;
        } else {
            self.stats.copied += 1;
        }
        self.posted[usize::from(id)] = NOT_POSTED;
        Ok((id, b, e.len))
    }

    /// The length a descriptor was posted with (from our own bookkeeping:
    /// the device may not change it, and we never read it back).
    #[inline(always)]
    fn posted_len(&self, id: u16) -> u32 {
        self.posted_len[usize::from(id)]
    }

    #[inline(always)]
    fn post(&mut self, id: u16, b: BufferIndex, len: u32, flags: u16) {
        assert!(
            self.held.post(b),
            "buffer {b} is not one this device's queues handed out"
        );
        self.q.write_desc(
            id,
            Desc {
                addr: self.addr.desc_addr(b),
                len,
                flags,
                next: 0,
            },
        );
        self.posted[usize::from(id)] = b.get();
        self.posted_len[usize::from(id)] = len;
        self.q.push_avail(id);
    }

    #[inline(always)]
    fn publish(&mut self) {
        if self.q.publish() {
            self.bell.kick();
            self.stats.kicks += 1;
        }
    }

    /// Every buffer this driver holds once the device has stopped: what the
    /// bookkeeping says, with each in-flight descriptor counted by the buffer
    /// it names now (the device may have exchanged it without the driver
    /// seeing the completion). Only meaningful after the device stopped.
    /// Cores sharing a set ([`Held::pair`]) both list what is in hand.
    fn holdings(&mut self) -> Vec<BufferIndex> {
        let posted: Vec<(BufferIndex, Option<BufferIndex>)> = (0..self.q.size())
            .filter(|&id| self.posted[usize::from(id)] != NOT_POSTED)
            .map(|id| {
                (
                    BufferIndex::new(self.posted[usize::from(id)]),
                    self.addr.buffer(self.q.desc_addr(id)),
                )
            })
            .collect();
        self.held.holdings(&posted)
    }

    fn take_buffers(&mut self, n: usize) -> std::io::Result<Vec<BufferHandle>> {
        if n > self.free.len() {
            return Err(std::io::Error::other(format!(
                "the export gave this driver {} spare buffers, fewer than the {n} asked for",
                self.free.len()
            )));
        }
        let at = self.free.len() - n;
        Ok(self
            .free
            .split_off(at)
            .into_iter()
            // SAFETY: the free list holds buffers this driver holds and has
            // neither posted nor handed out; split_off hands each out once.
            .map(|b| unsafe { BufferHandle::from_raw(b, 0) })
            .collect())
    }

    /// Sleeps until the device completes something or `timeout` passes.
    fn wait(&mut self, timeout: Duration) {
        if self.failed.is_some() {
            std::thread::sleep(timeout.min(POLL_SLEEP * 10));
            return;
        }
        if self.bell.has_interrupts() {
            if !self.q.set_interrupts(true) {
                self.bell.wait(timeout);
            }
            self.q.set_interrupts(false);
        } else {
            self.bell.wait(timeout);
        }
    }
}

/// Receiving: every descriptor is a device-writable pool buffer; a received
/// packet is swapped into the caller's handle and the caller's old buffer
/// goes straight back into the ring in its place.
pub struct RxCore {
    c: Common,
    desc_len: u32,
    /// Buffers returned unused in a row (a device refusing our buffers).
    unused_run: u32,
}

/// A TX core takes back completed descriptors when fewer than this many
/// descriptors or empty buffers are left (or fewer than a burst asks).
const REAP_BELOW: usize = 64;

/// How far ahead of the completion it checks a TX reap prefetches.
const REAP_AHEAD: u16 = 16;

/// Buffers an RX core keeps back from the ring for `take_buffers`.
pub const RX_RESERVE: usize = 64;

impl RxCore {
    /// Fills the ring from `stock`, keeping RX_RESERVE buffers for the caller.
    pub fn new(
        q: DriverQueue,
        view: PoolView,
        addr: Addressing,
        stock: &[BufferIndex],
        bell: Bell,
    ) -> Self {
        let held = Held::new(addr.layout.buf_count);
        Self::sharing(q, view, addr, stock, bell, held)
    }

    /// As [`RxCore::new`], holding buffers in `held` (one half of
    /// [`Held::pair`], the other the device's TX core's).
    pub fn sharing(
        q: DriverQueue,
        view: PoolView,
        addr: Addressing,
        stock: &[BufferIndex],
        bell: Bell,
        held: Held,
    ) -> Self {
        let mut c = Common::new(q, view, addr, stock, bell, held);
        let desc_len = addr.max_desc_len();
        let post = c
            .free
            .len()
            .saturating_sub(RX_RESERVE)
            .min(usize::from(c.q.size()));
        for id in 0..post as u16 {
            let b = c.free.pop().expect("counted above");
            c.post(id, b, desc_len, DESC_F_WRITE);
        }
        c.publish();
        RxCore {
            c,
            desc_len,
            unused_run: 0,
        }
    }

    pub fn take_buffers(&mut self, n: usize) -> std::io::Result<Vec<BufferHandle>> {
        self.c.take_buffers(n)
    }

    /// See [`Common::holdings`]: call after the device stopped.
    pub fn holdings(&mut self) -> Vec<BufferIndex> {
        self.c.holdings()
    }

    /// Descriptors in the ring waiting for packets.
    pub fn posted(&self) -> usize {
        self.c.posted.iter().filter(|&&p| p != NOT_POSTED).count()
    }

    #[inline]
    pub fn recv_burst(&mut self, bufs: &mut [BufferHandle]) -> usize {
        if self.c.failed.is_some() {
            return 0;
        }
        let ready = match self.c.q.used_ready() {
            Ok(n) => n,
            Err(j) => {
                let in_flight = self.c.q.in_flight();
                self.c.fail(Violation::UsedJump {
                    from: j.from,
                    to: j.to,
                    in_flight,
                });
                return 0;
            }
        };
        let want = usize::from(ready).min(bufs.len()) as u16;
        let hdr = VIRTIO_NET_HDR_LEN;
        let max = self.desc_len;
        // n packets delivered out of k used elements consumed.
        let mut n = 0u16;
        let mut k = 0u16;
        while n < want && k < ready {
            k += 1;
            let k = k - 1;
            match self.c.complete(k, 0, max) {
                // A device returns a buffer unused with length 0 (it dropped
                // the packet meant for it): straight back into the ring.
                Ok((id, b, 0)) => {
                    self.c.post(id, b, max, DESC_F_WRITE);
                    self.unused_run += 1;
                    if self.unused_run > 4 * u32::from(self.c.q.size()) {
                        self.c.fail(Violation::Rejected {
                            count: self.unused_run,
                        });
                        break;
                    }
                }
                Ok((id, _, len)) if len < hdr => {
                    self.c.fail(Violation::UsedLen {
                        id,
                        len,
                        min: hdr,
                        max,
                    });
                    break;
                }
                Ok((id, b, len)) => {
                    // SAFETY: complete() checked that b is a buffer this
                    // driver posted and now holds again, named by no handle;
                    // the caller's empty goes into the ring in its place.
                    let (mine, _) = unsafe { bufs[usize::from(n)].replace(b, len - hdr) };
                    self.c.post(id, mine, max, DESC_F_WRITE);
                    self.unused_run = 0;
                    n += 1;
                }
                Err(v) => {
                    self.c.fail(v);
                    break;
                }
            }
        }
        self.c.q.consume(k);
        self.c.publish();
        self.c.stats.packets += u64::from(n);
        usize::from(n)
    }

    pub fn wait(&mut self, timeout: Duration) {
        self.c.wait(timeout)
    }

    pub fn failure(&self) -> Option<Violation> {
        self.c.failed
    }

    pub fn stats(&self) -> CoreStats {
        self.c.stats
    }
}

/// Descriptor ids not in flight. Hands out the id of the next avail slot
/// when it is free, which it always is with a device that completes in
/// order (the zc export does): then descriptors are used in ring order, a
/// burst fills whole descriptor lines, and every avail entry keeps the
/// value it had a lap ago, so the driver never rewrites it (the line stays
/// shared with the device's core instead of bouncing). Otherwise the next
/// free id after it.
struct DescIds {
    free: Vec<bool>,
    count: usize,
}

impl DescIds {
    fn new(size: u16) -> Self {
        DescIds {
            free: vec![true; usize::from(size)],
            count: usize::from(size),
        }
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.count
    }

    /// Id `id` (< size: complete() checked it) is free again.
    #[inline(always)]
    fn put(&mut self, id: u16) {
        let f = &mut self.free[usize::from(id)];
        if !*f {
            *f = true;
            self.count += 1;
        }
    }

    /// A free id, `want` if it is free.
    #[inline(always)]
    fn take(&mut self, want: u16) -> Option<u16> {
        if self.count == 0 {
            return None;
        }
        let mask = self.free.len() - 1;
        let mut i = usize::from(want) & mask;
        for _ in 0..self.free.len() {
            if self.free[i] {
                self.free[i] = false;
                self.count -= 1;
                return Some(i as u16);
            }
            i = (i + 1) & mask;
        }
        None
    }
}

/// Sending: the caller's filled buffer goes into a device-readable
/// descriptor and the caller gets an empty buffer the driver holds; completed
/// descriptors return whatever buffer they name to the driver's free list.
pub struct TxCore {
    c: Common,
    /// Descriptor ids not in flight.
    free_desc: DescIds,
}

impl TxCore {
    pub fn new(
        q: DriverQueue,
        view: PoolView,
        addr: Addressing,
        stock: &[BufferIndex],
        bell: Bell,
    ) -> Self {
        let held = Held::new(addr.layout.buf_count);
        Self::sharing(q, view, addr, stock, bell, held)
    }

    /// As [`TxCore::new`], holding buffers in `held` (see [`RxCore::sharing`]).
    pub fn sharing(
        q: DriverQueue,
        view: PoolView,
        addr: Addressing,
        stock: &[BufferIndex],
        bell: Bell,
        held: Held,
    ) -> Self {
        let c = Common::new(q, view, addr, stock, bell, held);
        let free_desc = DescIds::new(c.q.size());
        TxCore { c, free_desc }
    }

    pub fn take_buffers(&mut self, n: usize) -> std::io::Result<Vec<BufferHandle>> {
        self.c.take_buffers(n)
    }

    /// See [`Common::holdings`]: call after the device stopped.
    pub fn holdings(&mut self) -> Vec<BufferIndex> {
        self.c.holdings()
    }

    /// Takes back what the device completed.
    #[inline]
    fn reap(&mut self) {
        let ready = match self.c.q.used_ready() {
            Ok(n) => n,
            Err(j) => {
                let in_flight = self.c.q.in_flight();
                self.c.fail(Violation::UsedJump {
                    from: j.from,
                    to: j.to,
                    in_flight,
                });
                return;
            }
        };
        // The completed descriptors are read (their new address): fetch
        // their lines a window ahead, many in parallel but not more than
        // the CPU keeps in flight. (The ids are hints only; complete()
        // checks what it uses.)
        for k in 0..ready.min(REAP_AHEAD) {
            self.c.q.prefetch_desc(self.c.q.used_elem(k).id);
        }
        let mut n = 0;
        // The used length of a TX descriptor carries no meaning (devices
        // write 0 or the bytes read); it may not exceed what was posted.
        let max = self.c.addr.max_desc_len();
        while n < ready {
            if n + REAP_AHEAD < ready {
                self.c
                    .q
                    .prefetch_desc(self.c.q.used_elem(n + REAP_AHEAD).id);
            }
            match self.c.complete(n, 0, max) {
                Ok((id, b, _)) => {
                    self.c.free.push(b);
                    self.free_desc.put(id);
                    n += 1;
                }
                Err(v) => {
                    self.c.fail(v);
                    break;
                }
            }
        }
        self.c.q.consume(n);
    }

    #[inline]
    pub fn send_burst(&mut self, bufs: &mut [BufferHandle]) -> usize {
        if self.c.failed.is_some() {
            return 0;
        }
        // Reap lazily, as DPDK's virtio PMD frees TX buffers only below a
        // threshold: one pass over many completions pays the round trips to
        // the device's core (used index, then elements, then descriptors)
        // once, not once per burst.
        let low = REAP_BELOW.max(bufs.len());
        if self.free_desc.len() < low || self.c.free.len() < low {
            self.reap();
            if self.c.failed.is_some() {
                return 0;
            }
        }
        let n = bufs.len().min(self.free_desc.len()).min(self.c.free.len());
        self.c.q.prefetch_next_descs(n as u16);
        let layout = self.c.addr.layout;
        let pool = self.c.view.base();
        for h in &mut bufs[..n] {
            let id = self.free_desc.take(self.c.q.next_slot()).expect("counted");
            let fresh = self.c.free.pop().expect("counted");
            // SAFETY: fresh came off the free list (held, unposted, named by
            // no handle); the caller's full buffer is posted below.
            let (b, len) = unsafe { h.replace(fresh, 0) };
            let len = len.min(layout.max_packet());
            // The virtio-net header (all zero: no offloads) in front of the
            // packet. Usually it is zero already (only a host's RX writes
            // it): then leave the line clean. Read as two words (the header
            // starts 52 bytes into the 64-byte aligned buffer).
            if let Some(off) = layout.buffer_offset(b) {
                let hdr = off + u64::from(HEADROOM - VIRTIO_NET_HDR_LEN);
                // SAFETY: hdr..hdr + 12 lies in buffer b's headroom inside the
                // pool mapping (buffer_offset checked the index); b is ours
                // (post() asserts it below), so nobody else writes it.
                unsafe {
                    let p = pool.add(hdr as usize);
                    let lo = std::ptr::read_volatile(p.cast::<u32>());
                    let hi = std::ptr::read_volatile(p.add(4).cast::<u64>());
                    if lo != 0 || hi != 0 {
                        std::ptr::write_volatile(p.cast::<[u8; 12]>(), [0; 12]);
                    }
                };
            }
            self.c.post(id, b, VIRTIO_NET_HDR_LEN + len, 0);
        }
        if n > 0 {
            self.c.publish();
            self.c.stats.packets += n as u64;
        }
        n
    }

    /// Waits until a descriptor may be free again.
    pub fn wait(&mut self, timeout: Duration) {
        self.reap();
        if self.free_desc.len() > 0 && !self.c.free.is_empty() {
            return;
        }
        self.c.wait(timeout)
    }

    pub fn failure(&self) -> Option<Violation> {
        self.c.failed
    }

    pub fn stats(&self) -> CoreStats {
        self.c.stats
    }

    /// Descriptors the device has not completed.
    pub fn in_flight(&self) -> usize {
        usize::from(self.c.q.size()) - self.free_desc.len()
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
