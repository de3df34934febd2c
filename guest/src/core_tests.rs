//! The driver core against an in-test device: exchange and copy in both
//! directions, notification suppression, and hostile devices.

use super::*;
use crate::testdev::TestDevice;
use crate::virtq::{RingLayout, USED_F_NO_NOTIFY};
use vmm_sys_util::eventfd::EFD_NONBLOCK;
use zc_proto::packet::PACKET_HEADROOM;

const GPA: u64 = 0x1_0000_0000;
const QSIZE: u16 = 16;

struct Rig {
    _mem: Vec<u128>,
    view: PoolView,
    addr: Addressing,
    dev: TestDevice,
    kicks: EventFd,
}

impl Rig {
    /// A pool of 256 buffers holding 192-byte packets; the driver's stock is 0..stock.
    fn new(stock: u32, event_idx: bool) -> (Rig, DriverQueue, Vec<BufferIndex>, Bell) {
        let layout = PoolLayout::new(1, zc_proto::buffer::HEADROOM + 192, 256).unwrap();
        let mut mem = vec![0u128; layout.pool_size as usize / 16];
        let base = mem.as_mut_ptr().cast::<u8>();
        // SAFETY: mem holds pool_size bytes and lives in the Rig with the view.
        let view = unsafe { PoolView::new(base, layout) };
        let l = RingLayout::new(QSIZE).unwrap();
        let area = PoolLayout::ring_area_offset(0).unwrap() as usize;
        // SAFETY: the ring area is inside the pool memory, 16-byte aligned.
        let qmem = unsafe { base.add(area) };
        // SAFETY: qmem holds the ring (a 64 KiB area), nobody uses it yet.
        let q = unsafe { DriverQueue::new(qmem, l, event_idx) };
        // SAFETY: the same queue memory.
        let dev = unsafe { TestDevice::new(qmem, l) };
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let kicks = kick.try_clone().unwrap();
        let bell = Bell::Eventfd {
            kick,
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let stock = (0..stock).map(BufferIndex::new).collect();
        let addr = Addressing {
            layout,
            gpa_base: GPA,
        };
        (
            Rig {
                _mem: mem,
                view,
                addr,
                dev,
                kicks,
            },
            q,
            stock,
            bell,
        )
    }

    fn kicks(&self) -> u64 {
        self.kicks.read().unwrap_or(0)
    }

    /// Pool offset of a device address.
    fn off(&self, addr: u64) -> usize {
        (addr - GPA) as usize
    }

    /// The host puts `bytes` into buffer `b` as a packet.
    fn host_fill(&self, b: u32, bytes: &[u8]) {
        let off = self.addr.layout.packet_offset(BufferIndex::new(b)).unwrap() as usize;
        // SAFETY: the packet region of buffer b lies inside the pool memory.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.view.base().add(off), bytes.len())
        };
    }

    fn read_at(&self, off: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        // SAFETY: callers pass ranges inside the pool memory.
        unsafe { std::ptr::copy_nonoverlapping(self.view.base().add(off), v.as_mut_ptr(), len) };
        v
    }
}

#[test]
fn rx_exchange_hands_over_the_hosts_buffer_and_reposts_the_callers() {
    let (mut r, q, stock, bell) = Rig::new(100, false);
    let mut rx = RxCore::new(q, r.view.clone(), r.addr, &stock, bell);
    assert_eq!(rx.posted(), usize::from(QSIZE));
    assert_eq!(r.kicks(), 1, "the device had not asked for quiet");
    let mut hand = rx.take_buffers(8).unwrap();
    assert_eq!(rx.recv_burst(&mut hand), 0);
    // The device takes 5 descriptors and exchanges host buffers 200..205 in.
    let mut given = Vec::new();
    for i in 0..5u32 {
        let (head, d) = r.dev.pop().unwrap();
        assert_eq!(d.flags, DESC_F_WRITE);
        assert_eq!(d.len, 12 + 192);
        let old = r.addr.buffer(d.addr).unwrap();
        assert!(old.get() < 100, "the driver posted its own stock");
        given.push(old);
        let hb = 200 + i;
        r.host_fill(hb, &[i as u8 + 1; 60]);
        r.dev.set_addr(head, r.addr.desc_addr(BufferIndex::new(hb)));
        r.dev.used(u32::from(head), 12 + 60);
    }
    let before: Vec<u32> = hand.iter().map(|h| h.index().get()).collect();
    assert_eq!(rx.recv_burst(&mut hand[..3]), 3);
    assert_eq!(rx.recv_burst(&mut hand[3..]), 2);
    for (i, h) in hand[..5].iter().enumerate() {
        assert_eq!(h.index().get(), 200 + i as u32);
        assert_eq!(h.len(), 60);
        assert_eq!(r.view.packet(h).to_vec(), vec![i as u8 + 1; 60]);
    }
    // The caller's old buffers went back into the ring in place of the host's.
    let mut reposted = Vec::new();
    let mut heads = Vec::new();
    while let Some((h, d)) = r.dev.pop() {
        reposted.push(r.addr.buffer(d.addr).unwrap().get());
        heads.push(h);
    }
    // 11 descriptors the device had not taken yet, then the 5 reposted.
    assert_eq!(reposted.len(), 16);
    assert_eq!(reposted[11..], before[..5]);
    assert_eq!(rx.stats().exchanged, 5);
    assert_eq!(rx.stats().packets, 5);
    // A stock buffer exchanged out is the host's now: the device may hand it
    // back later without that being a duplicate.
    r.dev.set_addr(heads[0], r.addr.desc_addr(given[0]));
    r.dev.used(u32::from(heads[0]), 12 + 60);
    assert_eq!(rx.recv_burst(&mut hand[..1]), 1);
    assert_eq!(hand[0].index(), given[0]);
    assert!(rx.failure().is_none());
    assert_eq!(rx.stats().exchanged, 6);
}

#[test]
fn rx_copy_path_keeps_the_same_buffer() {
    let (mut r, q, stock, bell) = Rig::new(100, false);
    let mut rx = RxCore::new(q, r.view.clone(), r.addr, &stock, bell);
    let mut hand = rx.take_buffers(4).unwrap();
    let (head, d) = r.dev.pop().unwrap();
    let b = r.addr.buffer(d.addr).unwrap();
    r.host_fill(b.get(), &[9; 100]);
    r.dev.used(u32::from(head), 112);
    assert_eq!(rx.recv_burst(&mut hand), 1);
    assert_eq!(hand[0].index(), b);
    assert_eq!(r.view.packet(&hand[0]).to_vec(), vec![9; 100]);
    assert_eq!(rx.stats().copied, 1);
}

#[test]
fn tx_exchange_returns_the_buffer_the_descriptor_names_after_completion() {
    let (mut r, q, stock, bell) = Rig::new(40, false);
    let mut tx = TxCore::new(q, r.view.clone(), r.addr, &stock, bell);
    let mut hand = tx.take_buffers(8).unwrap();
    for (i, h) in hand.iter_mut().enumerate() {
        r.view.packet_mut(h).fill(&[i as u8; 64]).unwrap();
    }
    let sent: Vec<u32> = hand.iter().map(|h| h.index().get()).collect();
    assert_eq!(tx.send_burst(&mut hand), 8);
    assert!(hand
        .iter()
        .all(|h| h.is_empty() && !sent.contains(&h.index().get())));
    assert_eq!(r.kicks(), 1);
    for i in 0..8u32 {
        let (head, d) = r.dev.pop().unwrap();
        assert_eq!(d.flags, 0);
        assert_eq!(d.len, 12 + 64);
        assert_eq!(r.addr.buffer(d.addr).unwrap().get(), sent[i as usize]);
        let off = r.off(d.addr);
        assert_eq!(r.read_at(off, 12), vec![0; 12], "zeroed virtio-net header");
        assert_eq!(r.read_at(off + 12, 64), vec![i as u8; 64]);
        // The host keeps the packet and returns an empty buffer.
        r.dev
            .set_addr(head, r.addr.desc_addr(BufferIndex::new(150 + i)));
        r.dev.used(u32::from(head), 0);
    }
    // 40 stock - 8 in hand - 8 swapped out = 24 free; after the completions
    // the 8 host buffers are free too.
    let mut more = tx.take_buffers(24).unwrap();
    assert!(tx.take_buffers(1).is_err());
    for h in &mut more {
        r.view.packet_mut(h).fill(&[0xee; 60]).unwrap();
    }
    assert_eq!(
        tx.send_burst(&mut more[..16]),
        8,
        "8 descriptors free after reap"
    );
    assert!(more[..8]
        .iter()
        .all(|h| (150..158).contains(&h.index().get())));
    assert_eq!(tx.stats().exchanged, 8);
    assert!(tx.failure().is_none());
}

#[test]
fn no_kicks_while_the_device_polls() {
    let (r, q, stock, bell) = Rig::new(60, false);
    r.dev.set_no_notify(true);
    let mut tx = TxCore::new(q, r.view.clone(), r.addr, &stock, bell);
    let mut hand = tx.take_buffers(4).unwrap();
    for h in &mut hand {
        r.view.packet_mut(h).fill(&[1; 60]).unwrap();
    }
    assert_eq!(tx.send_burst(&mut hand), 4);
    assert_eq!(r.kicks(), 0);
    assert_eq!(r.dev.avail_flags(), crate::virtq::AVAIL_F_NO_INTERRUPT);
    r.dev.set_no_notify(false);
    for h in &mut hand {
        r.view.packet_mut(h).fill(&[1; 60]).unwrap();
    }
    assert_eq!(tx.send_burst(&mut hand), 4);
    assert_eq!(r.kicks(), 1, "the device went to sleep: one kick per burst");
    let _ = USED_F_NO_NOTIFY;
}

#[test]
fn tx_with_event_idx_kicks_when_the_device_asks() {
    let (r, q, stock, bell) = Rig::new(60, true);
    let mut tx = TxCore::new(q, r.view.clone(), r.addr, &stock, bell);
    let mut hand = tx.take_buffers(2).unwrap();
    // avail_event = 0: the first publish crosses it.
    assert_eq!(tx.send_burst(&mut hand), 2);
    assert_eq!(r.kicks(), 1);
}

/// A device that writes `bad` for the first completion: the driver stops
/// the queue with `want` and leaves the caller's handles alone.
fn rx_hostile(corrupt: impl FnOnce(&mut Rig, u16), want: impl Fn(Violation) -> bool) {
    let (mut r, q, stock, bell) = Rig::new(100, false);
    let mut rx = RxCore::new(q, r.view.clone(), r.addr, &stock, bell);
    let mut hand = rx.take_buffers(4).unwrap();
    let before: Vec<u32> = hand.iter().map(|h| h.index().get()).collect();
    let (head, _) = r.dev.pop().unwrap();
    corrupt(&mut r, head);
    assert_eq!(rx.recv_burst(&mut hand), 0);
    let v = rx.failure().expect("violation detected");
    assert!(want(v), "unexpected {v:?}");
    assert!(!v.to_string().contains('\n'));
    assert_eq!(
        before,
        hand.iter().map(|h| h.index().get()).collect::<Vec<_>>()
    );
    assert_eq!(rx.recv_burst(&mut hand), 0, "the queue stays stopped");
}

#[test]
fn hostile_device_out_of_range_id() {
    rx_hostile(
        |r, _| r.dev.used(u32::from(QSIZE), 60),
        |v| matches!(v, Violation::UsedId { id: 16, .. }),
    );
    rx_hostile(
        |r, _| r.dev.used(u32::MAX, 60),
        |v| matches!(v, Violation::UsedId { .. }),
    );
}

#[test]
fn hostile_device_id_not_in_flight() {
    // Only 16 - 0 are posted, so use a TX core where nothing is in flight
    // but one descriptor, then complete a different one.
    let (mut r, q, stock, bell) = Rig::new(40, false);
    let mut tx = TxCore::new(q, r.view.clone(), r.addr, &stock, bell);
    let mut hand = tx.take_buffers(1).unwrap();
    assert_eq!(tx.send_burst(&mut hand), 1);
    let (head, _) = r.dev.pop().unwrap();
    r.dev.used(u32::from(head) + 1, 0);
    assert_eq!(tx.send_burst(&mut hand), 0);
    assert!(matches!(tx.failure(), Some(Violation::UsedId { .. })));
}

#[test]
fn hostile_device_lengths() {
    rx_hostile(
        |r, h| r.dev.used(u32::from(h), 12 + 193),
        |v| {
            matches!(
                v,
                Violation::UsedLen {
                    len: 205,
                    max: 204,
                    ..
                }
            )
        },
    );
    rx_hostile(
        |r, h| r.dev.used(u32::from(h), 11),
        |v| matches!(v, Violation::UsedLen { len: 11, .. }),
    );
}

#[test]
fn hostile_device_addresses() {
    // Not at a packet offset minus 12.
    rx_hostile(
        |r, h| {
            let a = r.dev.desc(h).addr;
            r.dev.set_addr(h, a + 1);
            r.dev.used(u32::from(h), 60);
        },
        |v| matches!(v, Violation::Addr { .. }),
    );
    // Outside the pool, below and above.
    for addr in [0, GPA - 12, u64::MAX, GPA + (4 << 20)] {
        rx_hostile(
            move |r, h| {
                r.dev.set_addr(h, addr);
                r.dev.used(u32::from(h), 60);
            },
            |v| matches!(v, Violation::Addr { .. }),
        );
    }
    // A buffer the driver already holds (another descriptor's).
    rx_hostile(
        |r, h| {
            let other = r.dev.desc(h + 1).addr;
            r.dev.set_addr(h, other);
            r.dev.used(u32::from(h), 60);
        },
        |v| matches!(v, Violation::Duplicate { .. }),
    );
}

#[test]
fn hostile_device_used_index_jump() {
    rx_hostile(
        |r, _| r.dev.set_used_idx(QSIZE + 1),
        |v| matches!(v, Violation::UsedJump { to: 17, .. }),
    );
}

#[test]
fn a_partial_burst_before_a_violation_is_delivered() {
    let (mut r, q, stock, bell) = Rig::new(100, false);
    let mut rx = RxCore::new(q, r.view.clone(), r.addr, &stock, bell);
    let mut hand = rx.take_buffers(4).unwrap();
    let (h0, _) = r.dev.pop().unwrap();
    r.dev.used(u32::from(h0), 70);
    r.dev.used(999, 70);
    assert_eq!(rx.recv_burst(&mut hand), 1);
    assert_eq!(hand[0].len(), 58);
    assert!(rx.failure().is_some());
    let _ = PACKET_HEADROOM;
}

#[test]
fn rx_buffers_returned_unused_go_back_into_the_ring() {
    let (mut r, q, stock, bell) = Rig::new(100, false);
    let mut rx = RxCore::new(q, r.view.clone(), r.addr, &stock, bell);
    let mut hand = rx.take_buffers(4).unwrap();
    let before: Vec<u32> = hand.iter().map(|h| h.index().get()).collect();
    let (h0, d0) = r.dev.pop().unwrap();
    let (h1, _) = r.dev.pop().unwrap();
    r.dev.used(u32::from(h0), 0);
    r.dev.used(u32::from(h1), 12 + 60);
    assert_eq!(rx.recv_burst(&mut hand), 1);
    assert_eq!(hand[0].len(), 60);
    assert_eq!(
        hand[1..]
            .iter()
            .map(|h| h.index().get())
            .collect::<Vec<_>>(),
        before[1..]
    );
    let mut again = Vec::new();
    while let Some((h, d)) = r.dev.pop() {
        again.push((h, d.addr));
    }
    assert_eq!(again.len(), 16);
    assert_eq!(
        again[14],
        (h0, d0.addr),
        "the unused buffer is offered again"
    );
    assert_eq!(again[15].1, r.addr.desc_addr(BufferIndex::new(before[0])));
    assert!(rx.failure().is_none());
}

#[test]
fn holdings_after_a_stop_count_unseen_exchanges() {
    let (mut r, q, stock, bell) = Rig::new(40, false);
    let mut tx = TxCore::new(q, r.view.clone(), r.addr, &stock, bell);
    let mut hand = tx.take_buffers(4).unwrap();
    assert_eq!(tx.send_burst(&mut hand), 4);
    // The device exchanges two descriptors but the driver never reaps them.
    let (h0, d0) = r.dev.pop().unwrap();
    let (h1, _) = r.dev.pop().unwrap();
    r.dev.set_addr(h0, r.addr.desc_addr(BufferIndex::new(200)));
    r.dev.set_addr(h1, r.addr.desc_addr(BufferIndex::new(201)));
    let held = tx.holdings();
    assert_eq!(
        held.len(),
        40,
        "as many as the stock: buffers only change hands"
    );
    assert!(held.contains(&BufferIndex::new(200)) && held.contains(&BufferIndex::new(201)));
    assert!(!held.contains(&r.addr.buffer(d0.addr).unwrap()));
}

#[test]
fn a_device_that_returns_every_buffer_unused_is_an_error_not_a_livelock() {
    let (mut r, q, stock, bell) = Rig::new(100, false);
    let mut rx = RxCore::new(q, r.view.clone(), r.addr, &stock, bell);
    let mut hand = rx.take_buffers(4).unwrap();
    for _ in 0..10 {
        while let Some((h, _)) = r.dev.pop() {
            r.dev.used(u32::from(h), 0);
        }
        assert_eq!(rx.recv_burst(&mut hand), 0);
        let _ = rx.recv_burst(&mut hand);
    }
    assert!(
        matches!(rx.failure(), Some(Violation::Rejected { .. })),
        "{:?}",
        rx.failure()
    );
}

/// Both cores of one device over one pool: the RX queue where [`Rig::new`]
/// puts it, the TX queue in the next queue slot, one shared [`Held`] set;
/// the driver's stock is 0..stock, of which RX gets the first `rx_stock`.
fn duplex(stock: u32, rx_stock: usize) -> (Rig, RxCore, TxCore, TestDevice) {
    let (r, q, stock, bell) = Rig::new(stock, false);
    let l = RingLayout::new(QSIZE).unwrap();
    let area = PoolLayout::ring_area_offset(0).unwrap() + crate::virtq::QUEUE_SLOT_BYTES;
    // SAFETY: the second queue slot of the ring area lies inside the pool
    // memory, 16-byte aligned, and only this queue and its device use it.
    let (tq, tdev) = unsafe {
        let mem = r.view.base().add(area as usize);
        (DriverQueue::new(mem, l, false), TestDevice::new(mem, l))
    };
    let tbell = Bell::Eventfd {
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        call: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let (rh, th) = Held::pair(r.addr.layout.buf_count);
    let (rs, ts) = stock.split_at(rx_stock);
    let rx = RxCore::sharing(q, r.view.clone(), r.addr, rs, bell, rh);
    let tx = TxCore::sharing(tq, r.view.clone(), r.addr, ts, tbell, th);
    (r, rx, tx, tdev)
}

#[test]
fn a_received_buffer_is_sent_as_is_on_the_same_devices_tx() {
    let (mut r, mut rx, mut tx, mut tdev) = duplex(120, 80);
    let mut hand = rx.take_buffers(1).unwrap();
    // The host exchanges its buffer 200, holding a packet, into RX.
    let (head, _) = r.dev.pop().unwrap();
    r.host_fill(200, &[7; 60]);
    r.dev
        .set_addr(head, r.addr.desc_addr(BufferIndex::new(200)));
    r.dev.used(u32::from(head), 12 + 60);
    assert_eq!(rx.recv_burst(&mut hand), 1);
    assert_eq!(hand[0].index().get(), 200);
    // A reflector sends that very buffer back: TX takes it, no copy.
    assert_eq!(tx.send_burst(&mut hand), 1);
    let (th, d) = tdev.pop().unwrap();
    assert_eq!(r.addr.buffer(d.addr).unwrap().get(), 200);
    assert_eq!(r.read_at(r.off(d.addr) + 12, 60), vec![7; 60]);
    assert_ne!(hand[0].index().get(), 200, "an empty TX buffer in return");
    // The host takes it and returns buffer 201; later it hands 200 to RX
    // again, which is no duplicate: the device holds it.
    tdev.set_addr(th, r.addr.desc_addr(BufferIndex::new(201)));
    tdev.used(u32::from(th), 0);
    // The TX buffer in hand goes into the RX ring on the next receive.
    let from_tx = hand[0].index();
    let (head, _) = r.dev.pop().unwrap();
    r.dev
        .set_addr(head, r.addr.desc_addr(BufferIndex::new(200)));
    r.dev.used(u32::from(head), 12 + 60);
    assert_eq!(rx.recv_burst(&mut hand), 1);
    assert_eq!(hand[0].index().get(), 200);
    let mut reposted = Vec::new();
    while let Some((_, d)) = r.dev.pop() {
        reposted.push(r.addr.buffer(d.addr).unwrap());
    }
    assert_eq!(reposted.last(), Some(&from_tx));
    assert!(rx.failure().is_none() && tx.failure().is_none());
}

#[test]
fn a_tx_completion_naming_a_buffer_in_rxs_hand_is_a_duplicate() {
    let (r, mut rx, mut tx, mut tdev) = duplex(120, 80);
    let mut rx_hand = rx.take_buffers(1).unwrap();
    let mut hand = tx.take_buffers(1).unwrap();
    r.view.packet_mut(&mut hand[0]).fill(&[1; 60]).unwrap();
    assert_eq!(tx.send_burst(&mut hand), 1);
    // The device claims to return the buffer the caller holds from RX.
    let (th, _) = tdev.pop().unwrap();
    tdev.set_addr(th, r.addr.desc_addr(rx_hand[0].index()));
    tdev.used(u32::from(th), 0);
    let mut more = tx.take_buffers(20).unwrap();
    let _ = tx.send_burst(&mut more);
    assert!(
        matches!(tx.failure(), Some(Violation::Duplicate { .. })),
        "{:?}",
        tx.failure()
    );
    assert!(rx.failure().is_none(), "RX is not concerned");
    assert_eq!(rx.recv_burst(&mut rx_hand), 0);
}
