//! The export port: cluster queues served to a virtual machine as a
//! vhost-user virtio-net device.
//!
//! The vhost-user protocol runs on threads of its own (`backend`, behind
//! the relay in `shim`) and hands ring and memory changes to the port
//! through `shared`; the port itself is stepped by a worker and moves
//! packets between the cluster queues and the guest's virtqueues (`rx`,
//! `tx`), exchanging pool buffers where the guest's descriptors name them
//! and copying otherwise. Guest rings are reached through `virtq` and
//! `guest_mem`, which check everything the guest controls; the export's
//! slot in the pool's export directory is written by `directory`.

pub mod backend;
pub mod directory;
pub mod guest_mem;
pub mod mem_table;
pub mod qemu_args;
pub mod rx;
pub mod shared;
pub mod shim;
pub mod sigbus;
pub mod spec;
pub mod tx;
pub mod virtq;

use crate::owner::OwnerTable;
use crate::pool::Pool;
use crate::port::{Arm, Port};
use crate::queues::QueueArea;
use crate::ring::{Consumer, Producer};
use crate::stats::{RxStats, TxStats};
use guest_mem::{FileId, GuestMap};
use shared::{Ctl, ExportShared};
pub use spec::ExportSpec;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use virtq::{Chain, RingAddrs, RingError, SplitQueue};
use vm_memory::GuestAddressSpace;
use zc_proto::{BufferHandle, BufferIndex, PoolLayout};

/// Buffers a guest may hold by default (the bound on buffers in flight
/// towards one export's guest on the zero-copy path).
pub const DEFAULT_STOCK: u32 = 1024;

/// Packets moved per step and direction.
pub const BURST: usize = 32;
/// While the cluster's tx queue is full and its consumer does not ring
/// (a host process sleeping on a futex rings; one that polls does not),
/// look again this often.
const BLOCKED_SLEEP: Duration = Duration::from_millis(1);

pub const RXQ: usize = 0;
pub const TXQ: usize = 1;

/// The guest device while a frontend has it set up.
struct Device {
    map: GuestMap,
    queues: [Option<SplitQueue>; 2],
    mrg_rxbuf: bool,
}

/// Everything an export port is made of: handed over by whoever claimed
/// its queue roles and buffers from the cluster.
pub struct ExportParts {
    pub shared: Arc<ExportShared>,
    pub pool: Arc<Pool>,
    pub owners: Arc<OwnerTable>,
    /// Keeps the ring memory of `rx_end` and `tx_end` (and their bells) alive.
    pub queues: Arc<QueueArea>,
    pub rx_end: Option<Consumer>,
    pub tx_end: Option<Producer>,
    /// Descriptors the ends' peers ring when this port sleeps on them.
    pub bells: Vec<RawFd>,
    pub rx_hand: Vec<BufferIndex>,
    pub tx_hand: Vec<BufferIndex>,
    /// Packets a predecessor's port held (a graceful restart): delivered
    /// before anything new is taken from the rx queue, and sent into the
    /// tx queue first; they come on top of the hands' empties.
    pub rx_packets: Vec<(BufferIndex, u32)>,
    pub tx_pending: Vec<(BufferIndex, u32)>,
}

pub struct ExportPort {
    shared: Arc<ExportShared>,
    /// Keep the pool and the queue mappings alive.
    _pool: Arc<Pool>,
    _queues: Arc<QueueArea>,
    owners: Arc<OwnerTable>,
    layout: PoolLayout,
    pool_base: *mut u8,
    pool_id: FileId,
    area: (u64, u64),
    rx_end: Option<Consumer>,
    tx_end: Option<Producer>,
    bells: Vec<RawFd>,
    /// Host-to-guest hand: rx_hand[rx_pos..rx_have] are packets not yet delivered.
    rx_hand: Vec<BufferHandle>,
    rx_pos: usize,
    rx_have: usize,
    /// The packet at rx_pos needs more buffers than the guest has posted:
    /// the avail index it saw then. Until the guest posts beyond it the
    /// packet cannot move, so the worker may sleep.
    rx_wait: Option<u16>,
    /// Guest-to-host hand: empties to fill, and full buffers not yet sent.
    tx_empties: Vec<BufferHandle>,
    tx_pending: Vec<BufferHandle>,
    /// Without a tx queue: the next hand buffer to give the guest.
    tx_turn: usize,
    dev: Option<Device>,
    vrings: Option<Vec<VringRwLock>>,
    mem_gen: u64,
    features: u64,
    broken: bool,
    /// Ring set-ups that failed, not retried until the frontend changes them.
    failed: [Option<RingAddrs>; 2],
    chain: Box<Chain>,
    rx_stats: RxStats,
    tx_stats: TxStats,
    seen: u64,
    steps: u32,
    /// The fault flag's count when last handled.
    faults_seen: u64,
    /// Maps of devices whose guest RAM faulted: the handler put zero pages
    /// where the guest's vanished, so their RAM regions are never used
    /// again. Kept, with their SIGBUS registrations, while the frontend's
    /// table still names those regions: vhost-user-backend itself reads a
    /// ring's used index at SET_VRING_ADDR, and that read must stay covered.
    poisoned: Vec<GuestMap>,
}

// SAFETY: pool_base points into the pool mapping kept alive by `_pool`; the
// port is used by one worker thread at a time and moved between them whole.
unsafe impl Send for ExportPort {}

impl ExportPort {
    pub fn new(p: ExportParts) -> std::io::Result<Self> {
        let area_start = PoolLayout::ring_area_offset(p.shared.slot).unwrap_or(0);
        let handles = |v: Vec<BufferIndex>| {
            v.into_iter()
                // SAFETY: the cluster gave these buffers to this export's
                // hands alone.
                .map(|b| unsafe { BufferHandle::from_raw(b, 0) })
                .collect::<Vec<_>>()
        };
        let packets = |v: Vec<(BufferIndex, u32)>| {
            v.into_iter()
                // SAFETY: the cluster gave these buffers, holding packets of
                // these lengths, to this export's hands alone.
                .map(|(b, len)| unsafe { BufferHandle::from_raw(b, len) })
                .collect::<Vec<_>>()
        };
        let rx_have = p.rx_packets.len();
        let mut rx_hand = packets(p.rx_packets);
        rx_hand.extend(handles(p.rx_hand));
        let mut tx_pending = packets(p.tx_pending);
        tx_pending.reserve(BURST);
        Ok(ExportPort {
            pool_id: FileId::of(p.pool.file())?,
            layout: *p.pool.layout(),
            pool_base: p.pool.view().base(),
            _pool: p.pool,
            _queues: p.queues,
            owners: p.owners,
            area: (area_start, area_start + zc_proto::layout::RING_AREA_SIZE),
            rx_end: p.rx_end,
            tx_end: p.tx_end,
            bells: p.bells,
            rx_hand,
            rx_pos: 0,
            rx_have,
            rx_wait: None,
            tx_empties: handles(p.tx_hand),
            tx_pending,
            tx_turn: 0,
            dev: None,
            vrings: None,
            mem_gen: 0,
            features: 0,
            broken: false,
            failed: [None, None],
            chain: Box::default(),
            rx_stats: RxStats::default(),
            tx_stats: TxStats::default(),
            seen: 0,
            steps: 0,
            faults_seen: 0,
            poisoned: Vec::new(),
            shared: p.shared,
        })
    }

    fn publish(&self) {
        let c = &self.shared.counters;
        c.rx.publish(&self.rx_stats);
        c.tx.publish(&self.tx_stats);
    }

    fn mark_broken(&mut self, e: RingError) {
        self.broken = true;
        let d = &self.shared.counters.dev;
        d.needs_reset.store(1, Ordering::Relaxed);
        d.broken_rings.fetch_add(1, Ordering::Relaxed);
        log::error!(
            "export {}: {e}: device marked NEEDS_RESET; it stays stopped until the frontend resets its rings or reconnects",
            self.shared.name
        );
    }

    /// Handles faults the SIGBUS handler contained in this export's guest
    /// memory since the last look (one atomic load when there were none):
    /// the device is dropped and marked NEEDS_RESET, and its RAM mappings
    /// are never used again. True if there was one.
    #[inline]
    fn mem_fault(&mut self) -> bool {
        let n = self.shared.mem_faults.count();
        if n == self.faults_seen {
            return false;
        }
        self.faults_seen = n;
        if let Some(dev) = self.dev.take() {
            self.poisoned.push(dev.map);
        }
        self.failed = [None, None];
        self.broken = true;
        let d = &self.shared.counters.dev;
        d.needs_reset.store(1, Ordering::Relaxed);
        d.mem_faults.fetch_add(1, Ordering::Relaxed);
        log::error!(
            "export {}: guest memory vanished under the device (its file shrank); \
             device marked NEEDS_RESET; it stays stopped until the frontend sends a new memory table or reconnects",
            self.shared.name
        );
        true
    }

    fn clear_broken(&mut self) {
        self.broken = false;
        self.shared
            .counters
            .dev
            .needs_reset
            .store(0, Ordering::Relaxed);
    }

    /// Handles the control requests up to `s` (from the vhost-user thread).
    fn control(&mut self, s: u64) {
        let shared = self.shared.clone();
        let mut g = shared.lock();
        for i in 0..2 {
            if std::mem::take(&mut g.stop[i]) {
                self.stop_queue(i);
            }
        }
        if std::mem::take(&mut g.drop_device) {
            for i in 0..2 {
                self.stop_queue(i);
            }
            self.dev = None;
            self.vrings = None;
            self.failed = [None, None];
            // Rebuild the device from the memory table, if there still is one.
            self.mem_gen = u64::MAX;
            self.clear_broken();
            self.publish_stock();
        }
        self.apply(&mut g);
        self.seen = s;
        shared.ack(&mut g, s);
    }

    fn view(&self) -> &zc_proto::PoolView {
        self._pool.view()
    }

    /// Takes the new memory table, features and vrings.
    fn apply(&mut self, g: &mut Ctl) {
        self.features = g.acked_features;
        if self.vrings.is_none() {
            self.vrings = g.vrings.clone();
        }
        if g.mem_gen != self.mem_gen {
            self.mem_gen = g.mem_gen;
            // A poisoned map whose RAM mappings only it still holds has left
            // the frontend's table (and without a table, none is left).
            self.poisoned
                .retain(|m| g.mem.is_some() && m.ram_mappings().any(|p| Arc::strong_count(p) > 1));
            if let Some(mem) = &g.mem {
                let m = mem.memory();
                let map = GuestMap::new(
                    &m,
                    self.pool_id,
                    self.layout.pool_size,
                    &self.shared.mem_faults,
                    &self.poisoned,
                );
                if map.bad_pool_regions > 0 {
                    log::warn!(
                        "export {}: a memory region maps the zc pool beyond its end; it is ignored",
                        self.shared.name
                    );
                }
                if map.unguarded_regions > 0 {
                    log::warn!(
                        "export {}: {} guest memory regions could not be guarded against SIGBUS; they are ignored",
                        self.shared.name,
                        map.unguarded_regions
                    );
                }
                let old = self.dev.take();
                let mut dev = Device {
                    map,
                    queues: [None, None],
                    mrg_rxbuf: false,
                };
                // Rings keep their indices across a memory table change.
                if let Some(old) = old {
                    for (i, q) in old.queues.into_iter().enumerate() {
                        if let Some(q) = q {
                            match SplitQueue::new(
                                &dev.map,
                                q.addrs,
                                self.area,
                                self.pool_base,
                                q.next_avail,
                                q.next_used,
                                self.event_idx(),
                            ) {
                                Ok(nq) => dev.queues[i] = Some(nq),
                                Err(e) => self.mark_broken(e),
                            }
                        }
                    }
                }
                self.dev = Some(dev);
            }
        }
        if let Some(d) = self.dev.as_mut() {
            d.mrg_rxbuf =
                self.features & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF) != 0;
        }
        self.refresh_rings();
    }

    fn event_idx(&self) -> bool {
        self.features & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX) != 0
    }

    /// Writes ring `i`'s position back to its vring and stops using it.
    fn stop_queue(&mut self, i: usize) {
        let Some(q) = self.dev.as_mut().and_then(|d| d.queues[i].take()) else {
            return;
        };
        if let Some(v) = self.vrings.as_ref().and_then(|v| v.get(i)) {
            v.set_queue_next_avail(q.next_avail);
            v.set_queue_next_used(q.next_used);
        }
        if self
            .dev
            .as_ref()
            .is_some_and(|d| d.queues.iter().all(Option::is_none))
        {
            self.clear_broken();
            self.publish_stock();
        }
    }

    /// With every ring stopped (a device reset, or the frontend gone) the
    /// driver that held the guest's buffers is gone: list all of them, from
    /// the owner table, as the stock the next driver starts with.
    fn publish_stock(&self) {
        let stock = self.owners.guest_buffers(self.shared.slot);
        directory::write_stock(self.view(), self.shared.slot, &stock);
    }

    /// Starts using rings the frontend made ready, drops those it stopped.
    fn refresh(&mut self) {
        if self.vrings.is_none() && self.shared.have_vrings.load(Ordering::Acquire) {
            self.vrings = self.shared.lock().vrings.clone();
        }
        self.refresh_rings();
    }

    /// As `refresh`, with the vrings already known (the control lock held).
    fn refresh_rings(&mut self) {
        let Some(vrings) = self.vrings.clone() else {
            return;
        };
        let event_idx = self.event_idx();
        for (i, v) in vrings.iter().enumerate().take(2) {
            let (active, addrs, avail, used) = {
                let st = v.get_ref();
                let q = st.get_queue();
                (
                    q.ready() && st.is_enabled(),
                    RingAddrs {
                        desc: q.desc_table(),
                        avail: q.avail_ring(),
                        used: q.used_ring(),
                        size: q.size(),
                    },
                    q.next_avail(),
                    q.next_used(),
                )
            };
            let Some(dev) = self.dev.as_mut() else {
                return;
            };
            match (&dev.queues[i], active) {
                (Some(q), true) if q.addrs == addrs => {}
                (None, true) if self.failed[i] == Some(addrs) => {}
                (_, true) => {
                    if self.broken {
                        // A re-set-up ring is a reset of the broken device.
                        self.broken = false;
                        self.shared
                            .counters
                            .dev
                            .needs_reset
                            .store(0, Ordering::Relaxed);
                    }
                    match SplitQueue::new(
                        &dev.map,
                        addrs,
                        self.area,
                        self.pool_base,
                        avail,
                        used,
                        event_idx,
                    ) {
                        Ok(q) => {
                            q.set_notify(false);
                            dev.queues[i] = Some(q);
                            if i == RXQ {
                                self.rx_wait = None;
                            }
                        }
                        Err(e) => {
                            dev.queues[i] = None;
                            self.failed[i] = Some(addrs);
                            self.mark_broken(e);
                        }
                    }
                }
                (Some(_), false) => dev.queues[i] = None,
                (None, false) => self.failed[i] = None,
            }
        }
    }

    /// Whether the guest asked for an interrupt for ring `i`'s new used entries.
    fn wants_interrupt(&mut self, i: usize) -> bool {
        self.dev
            .as_mut()
            .and_then(|d| d.queues[i].as_mut())
            .is_some_and(|q| q.needs_interrupt())
    }

    /// Signals the guest's call eventfd of ring `i`.
    fn signal(&self, i: usize) {
        if let Some(v) = self.vrings.as_ref().and_then(|v| v.get(i)) {
            let _ = v.signal_used_queue();
        }
    }

    /// Every buffer this export holds outside the rings: its hands and
    /// whatever its guest holds (the owner table knows).
    fn held_buffers(&self) -> Vec<BufferIndex> {
        let mut v: Vec<BufferIndex> = self
            .rx_hand
            .iter()
            .chain(&self.tx_empties)
            .chain(&self.tx_pending)
            .map(|h| h.index())
            .collect();
        v.extend(self.owners.guest_buffers(self.shared.slot));
        v
    }
}

impl Port for ExportPort {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn step(&mut self) -> usize {
        let s = self.shared.seq();
        if s != self.seen {
            self.control(s);
        }
        let kicked = self.shared.kicked.load(Ordering::Acquire)
            && self.shared.kicked.swap(false, Ordering::AcqRel);
        if kicked || self.steps.is_multiple_of(1 << 16) {
            self.refresh();
        }
        self.steps = self.steps.wrapping_add(1);
        let moved = if self.dev.is_some() && !self.broken {
            match self.rx_step().and_then(|a| Ok(a + self.tx_step()?)) {
                Ok(n) => n,
                // What a ring read after a contained fault is zeros, not the
                // guest's: the fault is the news, not the ring.
                Err(e) if !self.mem_fault() => {
                    self.mark_broken(e);
                    0
                }
                Err(_) => 0,
            }
        } else {
            // Packets taken from a guest before its device went away
            // still go to the cluster queue.
            self.flush_tx();
            0
        };
        self.mem_fault();
        moved
    }

    /// Guest notifications are on only while the worker sleeps.
    fn arm(&mut self) -> Arm {
        let mut busy = self.shared.seq() != self.seen || self.shared.kicked.load(Ordering::Acquire);
        let rx_waiting =
            self.rx_pos < self.rx_have || self.rx_end.as_mut().is_some_and(|c| c.arm());
        let blocked = !self.tx_pending.is_empty();
        // Blocked on a full tx queue: the consumer rings when it frees a slot.
        let room = blocked && self.tx_end.as_mut().is_some_and(|p| p.arm());
        busy |= room;
        if let Some(dev) = self.dev.as_ref().filter(|_| !self.broken) {
            if let Some(q) = &dev.queues[RXQ] {
                busy |= match self.rx_wait {
                    // A packet waits for more buffers: only new ones help.
                    Some(seen) if self.rx_pos < self.rx_have => q.notify_beyond(seen),
                    _ => q.set_notify(true) && rx_waiting,
                };
            }
            if let Some(q) = &dev.queues[TXQ] {
                busy |= q.set_notify(true) && !blocked;
            }
        }
        if busy {
            Arm::Busy
        } else if blocked {
            Arm::SleepAtMost(BLOCKED_SLEEP)
        } else {
            Arm::Sleep
        }
    }

    fn disarm(&mut self, slept: bool) {
        if let Some(c) = self.rx_end.as_mut() {
            c.disarm();
        }
        if let Some(p) = self.tx_end.as_mut() {
            p.disarm();
        }
        if let Some(dev) = self.dev.as_ref() {
            for q in dev.queues.iter().flatten() {
                q.set_notify(false);
            }
        }
        if slept {
            self.shared
                .counters
                .dev
                .sleeps
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.shared.bell_fd()];
        v.extend(&self.bells);
        v
    }

    fn held(&self) -> Vec<BufferIndex> {
        self.held_buffers()
    }

    fn hands(&self) -> Option<crate::handover::PortHands> {
        let packet = |h: &BufferHandle| (h.index().get(), h.len());
        let (mut rx_empty, mut rx_packets) = (Vec::new(), Vec::new());
        for (i, h) in self.rx_hand.iter().enumerate() {
            if (self.rx_pos..self.rx_have).contains(&i) {
                rx_packets.push(packet(h));
            } else {
                rx_empty.push(h.index().get());
            }
        }
        Some(crate::handover::PortHands {
            rx_packets,
            rx_empty,
            tx_pending: self.tx_pending.iter().map(packet).collect(),
            tx_empty: self.tx_empties.iter().map(|h| h.index().get()).collect(),
        })
    }

    /// The rings' state goes back to the frontend; the buffers go to
    /// whoever stops the export (it frees them and their ownership).
    fn stop(mut self: Box<Self>) -> Vec<BufferIndex> {
        for i in 0..2 {
            self.stop_queue(i);
        }
        self.publish();
        self.held_buffers()
    }
}
