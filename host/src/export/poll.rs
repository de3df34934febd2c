//! The export's poll thread: moves packets between the cluster queues and
//! the guest's virtqueues, busy while there is traffic and asleep on a
//! futex (woken by the cluster queue's producer or by guest kicks) when
//! there is none.

use super::guest_mem::{FileId, GuestMap};
use super::owner::OwnerTable;
use super::shared::{Ctl, Doorbell, ExportShared};
use super::stats::{RxStats, TxStats};
use super::virtq::{Chain, PoolCtx, RingAddrs, RingError, SplitQueue};
use crate::daemon::cluster::Cluster;
use crate::futex;
use crate::ring::{Consumer, Producer};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use zc_proto::{BufferHandle, BufferIndex, PoolLayout};

/// Packets moved per step and direction.
pub const BURST: usize = 32;
/// How long the thread keeps polling after the last packet before it sleeps.
const IDLE_SPIN: Duration = Duration::from_micros(200);
/// Longest sleep; rings are re-checked after it even without a wake-up.
const MAX_SLEEP: Duration = Duration::from_millis(500);
/// Sleep while the cluster's tx queue is full (its consumer does not wake us).
const BLOCKED_SLEEP: Duration = Duration::from_micros(200);

pub const RXQ: usize = 0;
pub const TXQ: usize = 1;

/// The guest device while a frontend has it set up.
pub struct Device {
    pub map: GuestMap,
    pub queues: [Option<SplitQueue>; 2],
    pub mrg_rxbuf: bool,
}

pub struct Worker {
    pub shared: Arc<ExportShared>,
    /// Keeps the pool and queue mappings alive.
    _cluster: Arc<Mutex<Cluster>>,
    pub owners: Arc<OwnerTable>,
    pub layout: PoolLayout,
    pub pool_base: *mut u8,
    pub pool_id: FileId,
    pub area: (u64, u64),
    pub rx_end: Option<Consumer>,
    pub tx_end: Option<Producer>,
    /// Host-to-guest hand: rx_hand[rx_pos..rx_have] are packets not yet delivered.
    pub rx_hand: Vec<BufferHandle>,
    pub rx_pos: usize,
    pub rx_have: usize,
    /// Guest-to-host hand: empties to fill, and full buffers not yet sent.
    pub tx_empties: Vec<BufferHandle>,
    pub tx_pending: Vec<BufferHandle>,
    /// Without a tx queue: the next hand buffer to give the guest.
    pub tx_turn: usize,
    pub dev: Option<Device>,
    pub vrings: Option<Vec<VringRwLock>>,
    pub mem_gen: u64,
    pub features: u64,
    pub broken: bool,
    /// Ring set-ups that failed, not retried until the frontend changes them.
    failed: [Option<RingAddrs>; 2],
    pub chain: Box<Chain>,
    pub rx_stats: RxStats,
    pub tx_stats: TxStats,
    seen: u64,
    doorbell: Doorbell,
}

// SAFETY: pool_base points into the pool mapping kept alive by `_cluster`;
// the worker is moved once into its thread and used only there.
unsafe impl Send for Worker {}

/// Everything a worker is built from.
pub struct WorkerParts {
    pub shared: Arc<ExportShared>,
    pub cluster: Arc<Mutex<Cluster>>,
    pub rx_end: Option<Consumer>,
    pub tx_end: Option<Producer>,
    pub rx_hand: Vec<BufferIndex>,
    pub tx_hand: Vec<BufferIndex>,
}

impl Worker {
    pub fn new(p: WorkerParts) -> std::io::Result<Self> {
        let (owners, layout, pool_base, pool_id) = {
            let c = p.cluster.lock().unwrap_or_else(|e| e.into_inner());
            let view = c.pool().view();
            (
                c.owners().clone(),
                *c.pool().layout(),
                view.base(),
                FileId::of(c.pool().file())?,
            )
        };
        let area_start = PoolLayout::ring_area_offset(p.shared.slot).unwrap_or(0);
        let doorbell = match &p.rx_end {
            // SAFETY: the word lies in the queue memory `cluster` keeps mapped.
            Some(c) => unsafe { Doorbell::new(c.wake_word()) },
            // SAFETY: ExportShared outlives the worker and every doorbell copy
            // (the backend and the control thread hold it in Arcs too).
            None => unsafe { Doorbell::new(&p.shared.own_word) },
        };
        p.shared.set_doorbell(doorbell);
        let handles = |v: Vec<BufferIndex>| {
            v.into_iter()
                .map(|b| BufferHandle::from_raw(b, 0))
                .collect::<Vec<_>>()
        };
        let mut tx_pending = Vec::new();
        tx_pending.reserve_exact(BURST);
        Ok(Worker {
            shared: p.shared,
            _cluster: p.cluster,
            owners,
            layout,
            pool_base,
            pool_id,
            area: (area_start, area_start + zc_proto::layout::RING_AREA_SIZE),
            rx_end: p.rx_end,
            tx_end: p.tx_end,
            rx_hand: handles(p.rx_hand),
            rx_pos: 0,
            rx_have: 0,
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
            doorbell,
        })
    }

    pub fn pool_ctx(&self) -> PoolCtx<'_> {
        PoolCtx {
            layout: self.layout,
            base: self.pool_base,
            owners: &self.owners,
            slot: self.shared.slot,
        }
    }

    /// Every buffer this export holds outside the rings.
    fn held(&self) -> Vec<BufferIndex> {
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

    pub fn run(mut self) {
        let mut iter: u32 = 0;
        let mut idle: u32 = 0;
        let mut idle_start = Instant::now();
        loop {
            let s = self.shared.seq();
            if s != self.seen && !self.control(s) {
                return;
            }
            let kicked = self.shared.kicked.load(Ordering::Acquire)
                && self.shared.kicked.swap(false, Ordering::AcqRel);
            if kicked || iter.is_multiple_of(1 << 16) {
                self.refresh();
            }
            iter = iter.wrapping_add(1);
            let moved = if self.dev.is_some() && !self.broken {
                match self.rx_step().and_then(|a| Ok(a + self.tx_step()?)) {
                    Ok(n) => n,
                    Err(e) => {
                        self.mark_broken(e);
                        0
                    }
                }
            } else {
                // Packets taken from a guest before its device went away
                // still go to the cluster queue.
                self.flush_tx();
                0
            };
            if moved > 0 {
                idle = 0;
                continue;
            }
            idle += 1;
            // Back off a little: re-reading the guest's avail index in a
            // tight loop steals its cache line from the guest.
            for _ in 0..4 {
                std::hint::spin_loop();
            }
            if idle == 64 {
                idle_start = Instant::now();
            }
            if idle < 64 || !idle.is_multiple_of(64) || idle_start.elapsed() < IDLE_SPIN {
                continue;
            }
            self.sleep();
            idle = 0;
        }
    }

    pub fn publish(&self) {
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

    fn clear_broken(&mut self) {
        self.broken = false;
        self.shared
            .counters
            .dev
            .needs_reset
            .store(0, Ordering::Relaxed);
    }

    /// Sleeps until a kick, a packet on the rx queue, a control request or
    /// a timeout. Guest notifications are on only while asleep.
    fn sleep(&mut self) {
        let word = self.doorbell.word();
        let seq = word.load(Ordering::Acquire);
        let mut busy = self.shared.seq() != self.seen || self.shared.kicked.load(Ordering::Acquire);
        let rx_waiting =
            self.rx_pos < self.rx_have || self.rx_end.as_mut().is_some_and(|c| c.arm_wakeup());
        let blocked = !self.tx_pending.is_empty();
        if let Some(dev) = self.dev.as_ref().filter(|_| !self.broken) {
            if let Some(q) = &dev.queues[RXQ] {
                busy |= q.set_notify(true) && rx_waiting;
            }
            if let Some(q) = &dev.queues[TXQ] {
                busy |= q.set_notify(true) && !blocked;
            }
        }
        if !busy {
            self.shared
                .counters
                .dev
                .sleeps
                .fetch_add(1, Ordering::Relaxed);
            let t = if blocked { BLOCKED_SLEEP } else { MAX_SLEEP };
            futex::wait(word, seq, t);
        }
        if let Some(c) = self.rx_end.as_mut() {
            c.disarm_wakeup();
        }
        if let Some(dev) = self.dev.as_ref() {
            for q in dev.queues.iter().flatten() {
                q.set_notify(false);
            }
        }
    }

    /// Handles control requests up to `s`; false when the export is removed
    /// and the thread must end.
    fn control(&mut self, s: u64) -> bool {
        let shared = self.shared.clone();
        let mut g = shared.lock();
        if g.quit {
            // The rings' state goes back to the frontend; the buffers go to
            // whoever asked (Export::stop frees them and their ownership).
            for i in 0..2 {
                self.stop_queue(i);
            }
            g.held = self.held();
            g.quitted = true;
            self.seen = s;
            shared.ack(&mut g, s);
            return false;
        }
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
        if g.pause {
            g.held = self.held();
            g.paused = true;
            shared.ack(&mut g, s);
            g = shared.park(g);
            g.paused = false;
        }
        self.seen = s;
        shared.ack(&mut g, s);
        true
    }

    pub fn view(&self) -> zc_proto::PoolView {
        // SAFETY: pool_base maps pool_size bytes kept alive by `_cluster`.
        unsafe { zc_proto::PoolView::new(self.pool_base, self.layout) }
    }

    /// Takes the new memory table, features and vrings.
    fn apply(&mut self, g: &mut Ctl) {
        self.features = g.acked_features;
        if self.vrings.is_none() {
            self.vrings = g.vrings.clone();
        }
        if g.mem_gen != self.mem_gen {
            self.mem_gen = g.mem_gen;
            if let Some(mem) = &g.mem {
                let m = mem.memory();
                let map = GuestMap::new(&m, self.pool_id, self.layout.pool_size);
                if map.bad_pool_regions > 0 {
                    log::warn!(
                        "export {}: a memory region maps the zc pool beyond its end; it is ignored",
                        self.shared.name
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
        super::directory::write_stock(&self.view(), self.shared.slot, &stock);
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
    pub fn wants_interrupt(&mut self, i: usize) -> bool {
        self.dev
            .as_mut()
            .and_then(|d| d.queues[i].as_mut())
            .is_some_and(|q| q.needs_interrupt())
    }

    /// Signals the guest's call eventfd of ring `i`.
    pub fn signal(&self, i: usize) {
        if let Some(v) = self.vrings.as_ref().and_then(|v| v.get(i)) {
            let _ = v.signal_used_queue();
        }
    }
}
