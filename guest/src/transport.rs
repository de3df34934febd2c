//! What the driver core needs from a transport, and the one sequence that
//! brings a device up on any of them: features, both virtqueues in the
//! export's ring area, the cores for the wanted directions, start.

use crate::core::{Addressing, Bell, Held, RxCore, TxCore, RX_RESERVE};
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

/// Which cores to bring a device up with: one direction, or both (one
/// process receiving and sending on the device, as a ping or a reflector).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ends {
    Rx,
    Tx,
    Both,
}

impl Ends {
    fn rx(self) -> bool {
        self != Ends::Tx
    }
}

impl From<Direction> for Ends {
    fn from(d: Direction) -> Ends {
        match d {
            Direction::Rx => Ends::Rx,
            Direction::Tx => Ends::Tx,
        }
    }
}

/// The cores a device was brought up with.
pub struct Cores {
    pub rx: Option<RxCore>,
    pub tx: Option<TxCore>,
}

/// Buffers a TX core gets at least when both ends share the stock: enough
/// for a caller's burst and the core's reap threshold.
const TX_MIN_STOCK: usize = 64;

/// How many of `stock` buffers the RX core of a device with both ends gets:
/// half, or what fills its ring and reserve if that is less, never below
/// what RX needs.
fn rx_share(stock: usize, rx_size: u16) -> usize {
    (stock / 2)
        .min(usize::from(rx_size) + RX_RESERVE)
        .max(RX_RESERVE + 1)
        .min(stock)
}

/// Brings the device behind `t` up with `ends` on export `slot` of `pool`.
pub fn bring_up<T: Transport>(
    t: &mut T,
    pool: &Arc<PoolMap>,
    slot: usize,
    entry: &ExportEntry,
    ends: Ends,
) -> Result<Cores> {
    if ends.rx() {
        pool.check_direction(entry, Direction::Rx)?;
    }
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
    let mut queues: [Option<(DriverQueue, Bell)>; 2] = [None, None];
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
        queues[usize::from(q)] = Some((dq, bell));
    }
    let [rx, tx] = queues.map(|q| q.expect("set up above"));
    let need = match ends {
        Ends::Rx => RX_RESERVE + 1,
        Ends::Tx => 0,
        Ends::Both => RX_RESERVE + 1 + TX_MIN_STOCK,
    };
    if stock.len() < need {
        return Err(GuestError::Stock {
            have: stock.len(),
            want: need,
        });
    }
    let layout = pool.layout();
    let cores = match ends {
        Ends::Rx => Cores {
            rx: Some(RxCore::new(rx.0, pool.view(), addr, &stock, rx.1)),
            tx: None,
        },
        Ends::Tx => Cores {
            rx: None,
            tx: Some(TxCore::new(tx.0, pool.view(), addr, &stock, tx.1)),
        },
        Ends::Both => {
            let (rh, th) = Held::pair(layout.buf_count);
            let (rs, ts) = stock.split_at(rx_share(stock.len(), rx.0.size()));
            Cores {
                rx: Some(RxCore::sharing(rx.0, pool.view(), addr, rs, rx.1, rh)),
                tx: Some(TxCore::sharing(tx.0, pool.view(), addr, ts, tx.1, th)),
            }
        }
    };
    t.start()?;
    Ok(cores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_split_the_stock_so_each_can_work() {
        // The export's default stock, rings of 512 (vhost-user) and 256 (PCI).
        assert_eq!(rx_share(1024, 512), 512);
        assert_eq!(rx_share(1024, 256), 256 + RX_RESERVE);
        // A small stock still gives RX what it needs; TX the rest.
        assert_eq!(rx_share(160, 512), RX_RESERVE + 16);
        assert_eq!(rx_share(130, 512), RX_RESERVE + 1);
    }
}
