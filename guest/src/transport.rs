//! What the driver core needs from a transport, and the one sequence that
//! brings a device up on any of them: features, both virtqueues in the
//! export's ring area, the core for the wanted direction, start.

use crate::core::{Addressing, Bell, RxCore, TxCore};
use crate::error::{Direction, GuestError, Result};
use crate::init::F_RING_EVENT_IDX;
use crate::pool::PoolMap;
use crate::virtq::{DriverQueue, RingLayout, MAX_QUEUE_SIZE, QUEUE_SLOT_BYTES};
use std::sync::Arc;
use zc_proto::layout::ExportEntry;

/// virtio-net queue numbers.
pub const RXQ: u16 = 0;
pub const TXQ: u16 = 1;

/// Pool offsets of one queue's parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueOffsets {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// A way to reach a virtio-net device.
pub trait Transport {
    /// Resets the device and negotiates features; returns them.
    fn begin(&mut self) -> Result<u64>;
    /// Largest queue size (a power of two) the device takes for queue `q`,
    /// at most `limit`.
    fn queue_size(&mut self, q: u16, limit: u16) -> Result<u16>;
    /// Gives the device queue `q` (rings at these pool offsets, zeroed and
    /// initialised already) and returns how to notify it.
    fn setup_queue(&mut self, q: u16, at: QueueOffsets) -> Result<Bell>;
    /// Lets the device run.
    fn start(&mut self) -> Result<()>;
    /// Guest-physical address of pool offset 0, as the device sees it.
    fn pool_gpa(&self) -> u64;
}

/// The core for one direction.
pub enum Core {
    Rx(RxCore),
    Tx(TxCore),
}

/// Brings the device behind `t` up for `dir` on export `slot` of `pool`.
pub fn bring_up<T: Transport>(
    t: &mut T,
    pool: &Arc<PoolMap>,
    slot: usize,
    entry: &ExportEntry,
    dir: Direction,
) -> Result<Core> {
    pool.check_direction(entry, dir)?;
    let area = pool.ring_area(slot, entry)?;
    let features = t.begin()?;
    // Read the stock after the device reset: a reset is when the host
    // rewrites it with everything this export's guest holds.
    let stock = pool.stock(slot)?;
    let event_idx = features & F_RING_EVENT_IDX != 0;
    let addr = Addressing {
        layout: *pool.layout(),
        gpa_base: t.pool_gpa(),
    };
    let mut cores: [Option<(DriverQueue, Bell)>; 2] = [None, None];
    for q in [RXQ, TXQ] {
        let size = t.queue_size(q, MAX_QUEUE_SIZE)?;
        let l = RingLayout::new(size).ok_or_else(|| GuestError::Device {
            bdf: String::new(),
            msg: format!("queue {q} size {size} is unusable"),
        })?;
        let base = area + u64::from(q) * QUEUE_SLOT_BYTES;
        // SAFETY: base..base + l.bytes (<= QUEUE_SLOT_BYTES) lies in this
        // export's ring area, inside the pool mapping (ring_area checked the
        // entry; every pool holds all ring areas), kept mapped by the view
        // the core holds; 16-byte aligned; the device does not use it
        // before setup_queue below.
        let dq = unsafe { DriverQueue::new(pool.base().add(base as usize), l, event_idx) };
        let bell = t.setup_queue(
            q,
            QueueOffsets {
                size,
                desc: base + l.desc,
                avail: base + l.avail,
                used: base + l.used,
            },
        )?;
        cores[usize::from(q)] = Some((dq, bell));
    }
    let [rx, tx] = cores;
    let core = match dir {
        Direction::Rx => {
            let (q, bell) = rx.expect("set up above");
            let need = crate::core::RX_RESERVE + 1;
            if stock.len() < need {
                return Err(GuestError::Stock {
                    have: stock.len(),
                    want: need,
                });
            }
            Core::Rx(RxCore::new(q, pool.view(), addr, &stock, bell))
        }
        Direction::Tx => {
            let (q, bell) = tx.expect("set up above");
            Core::Tx(TxCore::new(q, pool.view(), addr, &stock, bell))
        }
    };
    t.start()?;
    Ok(core)
}
