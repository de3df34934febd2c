//! Reflector ports (`--reflect in=Q,out=Q`): every packet consumed from
//! cluster queue `in` goes into queue `out` with its destination and source
//! MAC addresses swapped, as testpmd's `--forward-mode=macswap` does inside
//! DPDK's backend.
//!
//! It runs on the daemon's workers beside the other ports, so a probe from
//! a VM can go guest → export → queue → reflector → queue → export → guest
//! in one poll thread, with no process to wake in between (what a latency
//! measurement needs: `zping --reflect` as a host process is a third thread
//! on the probe's path).
//!
//! Zero-copy: the buffer that arrived is the buffer that leaves. The port
//! holds one burst of empty buffers; receiving swaps them into `in`'s ring
//! for the packets, sending swaps the packets into `out`'s ring for
//! empties, so the hand is a burst of empties again after every step.
//! What does not fit into `out` is dropped and counted (its buffer stays in
//! the hand as an empty), as testpmd drops what its tx burst refuses: a
//! slow consumer of `out` never stalls `in` or the worker.

mod spec;
mod stats;

pub use spec::{port_name, ReflectSpec, ReflectSpecError, ReflectTarget};
pub use stats::{reflect_line, ReflectCounters, ReflectPortStats, ReflectStats};

use crate::port::{Arm, Port};
use crate::queues::QueueArea;
use crate::ring::{Consumer, Producer};
use std::os::fd::RawFd;
use std::sync::Arc;
use zc_proto::{BufferHandle, BufferIndex, PoolView};

/// Packets moved per step.
pub const BURST: usize = 32;

/// What a reflector is made of: the pool, its two queue ends and a burst
/// of empty buffers.
pub struct ReflectParts {
    pub name: String,
    pub pool: PoolView,
    /// The consumer end of `in`.
    pub input: Consumer,
    /// The producer end of `out`.
    pub output: Producer,
    /// Keeps the ring memory of the ends (and their bells) alive.
    pub queues: Arc<QueueArea>,
    /// `in`'s consumer bell: its producer rings it while the worker sleeps.
    pub bell: RawFd,
    /// Exactly [`BURST`] empty buffers, the port's alone.
    pub buffers: Vec<BufferIndex>,
}

pub struct ReflectPort {
    name: String,
    pool: PoolView,
    input: Consumer,
    output: Producer,
    _queues: Arc<QueueArea>,
    bell: RawFd,
    hand: Vec<BufferHandle>,
    stats: ReflectStats,
    counters: Arc<ReflectCounters>,
}

impl ReflectPort {
    pub fn new(p: ReflectParts) -> ReflectPort {
        let hand = p
            .buffers
            .into_iter()
            // SAFETY: the cluster gave these buffers to this port alone.
            .map(|b| unsafe { BufferHandle::from_raw(b, 0) })
            .collect();
        ReflectPort {
            name: p.name,
            pool: p.pool,
            input: p.input,
            output: p.output,
            _queues: p.queues,
            bell: p.bell,
            hand,
            stats: ReflectStats::default(),
            counters: Arc::new(ReflectCounters::default()),
        }
    }

    /// Counters that any thread may read while the port runs.
    pub fn counters(&self) -> Arc<ReflectCounters> {
        self.counters.clone()
    }

    fn indices(&self) -> Vec<BufferIndex> {
        self.hand.iter().map(|h| h.index()).collect()
    }
}

/// Makes `h` an empty buffer again (a packet dropped, its buffer kept).
fn empty(h: &mut BufferHandle) {
    let i = h.index();
    // SAFETY: the handle keeps the buffer it names.
    unsafe { h.replace(i, 0) };
}

impl Port for ReflectPort {
    fn name(&self) -> &str {
        &self.name
    }

    fn step(&mut self) -> usize {
        let n = self.input.recv_burst(&mut self.hand);
        if n == 0 {
            return 0;
        }
        // Swap in place; runts go behind the packets that leave and stay
        // in the hand as empties.
        let mut k = 0;
        let mut bytes = 0u64;
        for i in 0..n {
            let len = self.hand[i].len();
            if self.pool.packet_mut(&mut self.hand[i]).swap_macs() {
                bytes += u64::from(len);
                self.hand.swap(i, k);
                k += 1;
            } else {
                empty(&mut self.hand[i]);
                self.stats.drop_runt += 1;
            }
        }
        let sent = self.output.send_burst(&mut self.hand[..k]);
        // The sent packets' places hold empties from `out` now; the rest
        // could not go: dropped, their buffers kept as empties.
        for h in &mut self.hand[sent..k] {
            bytes -= u64::from(h.len());
            empty(h);
        }
        let s = &mut self.stats;
        s.reflected += sent as u64;
        s.bytes += bytes;
        s.drop_queue_full += (k - sent) as u64;
        s.bad_slots = self.input.bad_slots() + self.output.bad_slots();
        self.counters.publish(s);
        n
    }

    fn arm(&mut self) -> Arm {
        if self.input.arm() {
            Arm::Busy
        } else {
            Arm::Sleep
        }
    }

    fn disarm(&mut self, _slept: bool) {
        self.input.disarm();
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        vec![self.bell]
    }

    fn held(&self) -> Vec<BufferIndex> {
        self.indices()
    }

    fn stop(self: Box<Self>) -> Vec<BufferIndex> {
        self.indices()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queues::{QueueGeometry, Side};
    use std::os::fd::AsRawFd;
    use zc_proto::PoolLayout;

    const SLOTS: u32 = 64;

    /// Two queues of 64 slots over a heap pool: the test produces into
    /// queue 0 and consumes queue 1, the reflector sits in between.
    struct Rig {
        _mem: Vec<u8>,
        _dir: tempfile::TempDir,
        pool: PoolView,
        to_port: Producer,
        from_port: Consumer,
        port: ReflectPort,
        /// The test's own buffers, after the rings' and the port's.
        next: u32,
    }

    fn rig() -> Rig {
        let layout = PoolLayout::new(1, 2048, 1024).unwrap();
        let mut mem = vec![0u8; layout.pool_size as usize];
        // SAFETY: `mem` lives in the rig, as long as every use of the view.
        let pool = unsafe { PoolView::new(mem.as_mut_ptr(), layout) };
        let dir = tempfile::tempdir().unwrap();
        let geometry = QueueGeometry {
            queue_count: 2,
            ring_size: SLOTS,
        };
        let empties: Vec<BufferIndex> = (0..2 * SLOTS).map(BufferIndex::new).collect();
        let queues = Arc::new(
            QueueArea::create(&dir.path().join("q"), geometry, &layout, &empties).unwrap(),
        );
        let port = ReflectPort::new(ReflectParts {
            name: port_name(0),
            pool: pool.clone(),
            input: queues.consumer(0),
            output: queues.producer(1),
            queues: queues.clone(),
            bell: queues.bell(0, Side::Consumer).unwrap().as_raw_fd(),
            buffers: (2 * SLOTS..2 * SLOTS + BURST as u32)
                .map(BufferIndex::new)
                .collect(),
        });
        Rig {
            to_port: queues.producer(0),
            from_port: queues.consumer(1),
            _mem: mem,
            _dir: dir,
            pool,
            port,
            next: 2 * SLOTS + BURST as u32,
        }
    }

    impl Rig {
        /// Sends `n` packets of `len` bytes: dst MAC [i; 6], src MAC
        /// [100 + i; 6], then a byte of its number; returns their buffers.
        fn send(&mut self, n: u32, len: usize) -> Vec<u32> {
            let mut hand: Vec<BufferHandle> = (self.next..self.next + n)
                // SAFETY: test buffers no ring or port holds.
                .map(|i| unsafe { BufferHandle::from_raw(BufferIndex::new(i), 0) })
                .collect();
            self.next += n;
            let mut sent = Vec::new();
            for (i, h) in hand.iter_mut().enumerate() {
                let mut p = [0u8; 64];
                p[..6].fill(i as u8);
                p[6..12].fill(100 + i as u8);
                p[12] = i as u8;
                self.pool.packet_mut(h).fill(&p[..len]).unwrap();
                sent.push(h.index().get());
            }
            assert_eq!(self.to_port.send_burst(&mut hand), n as usize);
            sent
        }

        fn recv(&mut self) -> Vec<(u32, Vec<u8>)> {
            let mut hand: Vec<BufferHandle> = (self.next..self.next + SLOTS)
                // SAFETY: as in `send`.
                .map(|i| unsafe { BufferHandle::from_raw(BufferIndex::new(i), 0) })
                .collect();
            self.next += SLOTS;
            let n = self.from_port.recv_burst(&mut hand);
            hand[..n]
                .iter()
                .map(|h| (h.index().get(), self.pool.packet(h).to_vec()))
                .collect()
        }
    }

    #[test]
    fn every_packet_leaves_in_its_own_buffer_with_its_macs_swapped() {
        let mut r = rig();
        let sent = r.send(10, 64);
        assert_eq!(r.port.step(), 10);
        let got = r.recv();
        assert_eq!(
            got.iter().map(|g| g.0).collect::<Vec<_>>(),
            sent,
            "zero-copy, in order"
        );
        for (i, (_, p)) in got.iter().enumerate() {
            assert_eq!(p.len(), 64);
            assert_eq!(&p[..6], &[100 + i as u8; 6], "new dst = old src");
            assert_eq!(&p[6..12], &[i as u8; 6], "new src = old dst");
            assert_eq!(p[12], i as u8);
        }
        let s = r.port.counters().snapshot();
        assert_eq!((s.reflected, s.bytes, s.drop_queue_full), (10, 640, 0));
        // The hand is a burst of empties again, none of them a sent packet.
        let held = r.port.held();
        assert_eq!(held.len(), BURST);
        assert!(held.iter().all(|b| !sent.contains(&b.get())));
        assert_eq!(r.port.step(), 0, "nothing more to do");
    }

    #[test]
    fn runts_and_what_does_not_fit_are_dropped_and_counted_and_no_buffer_is_lost() {
        let mut r = rig();
        r.send(1, 11);
        r.send(2, 12);
        r.port.step();
        let got = r.recv();
        assert_eq!(got.len(), 2, "a 12-byte packet has both MACs");
        // Fill `out` (64 slots) and offer 6 more while nobody consumes it.
        for _ in 0..2 {
            r.send(32, 60);
            assert_eq!(r.port.step(), 32);
        }
        r.send(6, 60);
        assert_eq!(r.port.step(), 6);
        let s = r.port.counters().snapshot();
        assert_eq!(
            (s.reflected, s.drop_runt, s.drop_queue_full, s.bad_slots),
            (66, 1, 6, 0)
        );
        assert_eq!(s.bytes, 24 + 64 * 60);
        // Every buffer is somewhere: 64 packets in `out`, and the port's
        // hand of 32 distinct buffers (the dropped ones among them).
        assert_eq!(r.recv().len(), 64);
        let mut held: Vec<u32> = r.port.held().iter().map(|b| b.get()).collect();
        held.sort();
        held.dedup();
        assert_eq!(held.len(), BURST);
        assert_eq!(Box::new(r.port).stop().len(), BURST);
    }
}
