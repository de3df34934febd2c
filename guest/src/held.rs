//! Which pool buffers a driver core owns, so that a device can never make
//! it hand out one buffer twice.
//!
//! A core alone on its device keeps one private set: the buffers in its
//! hands (free list, the caller's handles) and those posted in its ring.
//!
//! The RX and TX cores of one device opened by one process (a ping, a
//! reflector) pass buffers between them: a buffer received may be sent. So
//! they share the set of buffers *in hand*, while each keeps the buffers
//! posted in its own ring apart: a TX descriptor in flight may have been
//! exchanged by the device already (the guest owns what the descriptor
//! names only once it sees the completion, and TX reaps lazily), and the
//! device may hand that buffer to RX before TX looks. Within one ring the
//! used order settles it; across the two rings nothing does, so a buffer
//! posted in the other ring is not counted against a completion.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use zc_proto::BufferIndex;

/// One bit per pool buffer, private memory.
struct Bits(Vec<u64>);

impl Bits {
    fn new(buf_count: u32) -> Self {
        Bits(vec![0; (buf_count as usize).div_ceil(64)])
    }

    /// Sets `b`'s bit; false if it was set already (or is out of range).
    #[inline(always)]
    fn take(&mut self, b: BufferIndex) -> bool {
        let i = b.get() as usize;
        let Some(w) = self.0.get_mut(i / 64) else {
            return false;
        };
        let m = 1u64 << (i % 64);
        let was = *w & m != 0;
        *w |= m;
        !was
    }

    #[inline(always)]
    fn give(&mut self, b: BufferIndex) {
        let i = b.get() as usize;
        if let Some(w) = self.0.get_mut(i / 64) {
            *w &= !(1u64 << (i % 64));
        }
    }

    #[inline(always)]
    fn holds(&self, b: BufferIndex) -> bool {
        let i = b.get() as usize;
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// As [`Bits`], shared by two cores that may run on two threads: every
/// change is one atomic read-modify-write. Relaxed is enough: a handle that
/// moves from one core's thread to the other's travels through the
/// caller's own synchronisation, which orders the bit with it.
struct SharedBits(Arc<[AtomicU64]>);

impl SharedBits {
    fn new(buf_count: u32) -> Self {
        SharedBits(
            (0..(buf_count as usize).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        )
    }

    #[inline(always)]
    fn word(&self, b: BufferIndex) -> Option<(&AtomicU64, u64)> {
        let i = b.get() as usize;
        Some((self.0.get(i / 64)?, 1u64 << (i % 64)))
    }

    /// Sets `b`'s bit; false if it was set already (or is out of range).
    #[inline(always)]
    fn take(&self, b: BufferIndex) -> bool {
        self.word(b)
            .is_some_and(|(w, m)| w.fetch_or(m, Ordering::Relaxed) & m == 0)
    }

    /// Clears `b`'s bit; false if it was not set.
    #[inline(always)]
    fn release(&self, b: BufferIndex) -> bool {
        self.word(b)
            .is_some_and(|(w, m)| w.fetch_and(!m, Ordering::Relaxed) & m != 0)
    }

    fn holds(&self, b: BufferIndex) -> bool {
        self.word(b)
            .is_some_and(|(w, m)| w.load(Ordering::Relaxed) & m != 0)
    }
}

enum Kind {
    /// In hand or posted in this core's ring.
    Own(Bits),
    Shared {
        /// In either core's hands (shared with the other core).
        hand: SharedBits,
        /// Posted in this core's ring.
        posted: Bits,
    },
}

/// The buffers one core owns.
pub struct Held {
    kind: Kind,
    buf_count: u32,
}

impl Held {
    /// The set of a core alone on its device.
    pub fn new(buf_count: u32) -> Self {
        Held {
            kind: Kind::Own(Bits::new(buf_count)),
            buf_count,
        }
    }

    /// The sets of the RX and the TX core of one device.
    pub fn pair(buf_count: u32) -> (Held, Held) {
        let hand = SharedBits::new(buf_count);
        let one = |hand| Held {
            kind: Kind::Shared {
                hand,
                posted: Bits::new(buf_count),
            },
            buf_count,
        };
        let other = SharedBits(hand.0.clone());
        (one(hand), one(other))
    }

    /// Takes `b` (a stock buffer) into hand; false if it is owned already.
    pub fn adopt(&mut self, b: BufferIndex) -> bool {
        match &mut self.kind {
            Kind::Own(bits) => bits.take(b),
            Kind::Shared { hand, posted } => !posted.holds(b) && hand.take(b),
        }
    }

    /// `b` goes into a descriptor of this core's ring; false if it is not
    /// in hand (not a buffer this device's driver handed out).
    #[inline(always)]
    pub fn post(&mut self, b: BufferIndex) -> bool {
        match &mut self.kind {
            Kind::Own(bits) => bits.holds(b),
            Kind::Shared { hand, posted } => hand.release(b) && posted.take(b),
        }
    }

    /// A descriptor that carried `old` completed naming `new` (the same
    /// buffer on the copy path): `new` is in hand now. False, and nothing
    /// changes, if the driver owns `new` already: a device handing out one
    /// buffer twice.
    #[inline(always)]
    pub fn complete(&mut self, old: BufferIndex, new: BufferIndex) -> bool {
        match &mut self.kind {
            Kind::Own(bits) => {
                if new != old {
                    if !bits.take(new) {
                        return false;
                    }
                    bits.give(old);
                }
                true
            }
            Kind::Shared { hand, posted } => {
                if new != old && posted.holds(new) || !hand.take(new) {
                    return false;
                }
                posted.give(old);
                true
            }
        }
    }

    /// Whether `b` is in hand (or, alone on a device, posted).
    pub fn holds(&self, b: BufferIndex) -> bool {
        match &self.kind {
            Kind::Own(bits) => bits.holds(b),
            Kind::Shared { hand, posted } => hand.holds(b) || posted.holds(b),
        }
    }

    /// Every buffer owned once the device has stopped, given each posted
    /// descriptor's buffer `old` and the pool buffer it names `now` (the
    /// device may have exchanged it without the driver seeing the
    /// completion). A shared set lists what both cores have in hand.
    pub fn holdings(&self, posted: &[(BufferIndex, Option<BufferIndex>)]) -> Vec<BufferIndex> {
        let n = self.buf_count;
        let in_hand = |b: BufferIndex| match &self.kind {
            Kind::Own(bits) => bits.holds(b),
            Kind::Shared { hand, .. } => hand.holds(b),
        };
        let mut set: Vec<bool> = (0..n).map(|i| in_hand(BufferIndex::new(i))).collect();
        let mut mark = |b: BufferIndex, on: bool| {
            if let Some(s) = set.get_mut(b.get() as usize) {
                *s = on;
            }
        };
        for &(old, now) in posted {
            let fresh = now.filter(|&b| b == old || !in_hand(b));
            match (&self.kind, fresh) {
                // Alone, `old` is counted already: move it to what the
                // descriptor names now.
                (Kind::Own(_), Some(b)) if b != old => {
                    mark(old, false);
                    mark(b, true);
                }
                (Kind::Own(_), _) => {}
                (Kind::Shared { .. }, b) => mark(b.unwrap_or(old), true),
            }
        }
        (0..n)
            .map(BufferIndex::new)
            .filter(|b| set[b.get() as usize])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(i: u32) -> BufferIndex {
        BufferIndex::new(i)
    }

    #[test]
    fn alone_a_completion_naming_an_owned_buffer_is_refused() {
        let mut h = Held::new(128);
        assert!(h.adopt(b(1)) && h.adopt(b(2)) && !h.adopt(b(1)));
        assert!(h.post(b(1)) && !h.post(b(9)));
        // Descriptor with 1 comes back naming 2, which the core holds.
        assert!(!h.complete(b(1), b(2)));
        assert!(h.complete(b(1), b(70)));
        assert!(h.holds(b(70)) && !h.holds(b(1)));
        assert!(h.complete(b(2), b(2)), "the copy path keeps the buffer");
    }

    #[test]
    fn a_pair_shares_what_is_in_hand_but_not_what_is_posted() {
        let (mut rx, mut tx) = Held::pair(128);
        assert!(rx.adopt(b(1)) && tx.adopt(b(2)));
        assert!(!tx.adopt(b(1)), "one stock, no buffer twice");
        // TX posts 2; the device exchanges it and hands it to RX before TX
        // sees the completion: no duplicate.
        assert!(tx.post(b(2)));
        assert!(rx.post(b(1)));
        assert!(rx.complete(b(1), b(2)));
        // The buffer RX received may be sent on TX.
        assert!(tx.complete(b(2), b(3)));
        assert!(tx.post(b(2)), "received on RX, sent on TX");
        // A device naming a buffer in hand, or posted in the same ring.
        assert!(!rx.complete(b(9), b(3)), "3 is in TX's hand");
        assert!(rx.post(b(3)) && rx.adopt(b(4)) && rx.post(b(4)));
        assert!(!rx.complete(b(3), b(4)), "4 is posted in this ring");
        assert!(rx.complete(b(3), b(3)));
    }

    #[test]
    fn holdings_follow_each_descriptor_to_the_buffer_it_names() {
        let mut h = Held::new(16);
        for i in 0..4 {
            assert!(h.adopt(b(i)));
        }
        assert!(h.post(b(0)) && h.post(b(1)));
        // 0 was exchanged for 10; 1 names 2, which is in hand: kept as 1.
        let got = h.holdings(&[(b(0), Some(b(10))), (b(1), Some(b(2)))]);
        assert_eq!(got, vec![b(1), b(2), b(3), b(10)]);
        let (mut rx, mut tx) = Held::pair(16);
        assert!(rx.adopt(b(0)) && tx.adopt(b(1)) && tx.post(b(1)));
        assert_eq!(tx.holdings(&[(b(1), Some(b(5)))]), vec![b(0), b(5)]);
        assert_eq!(tx.holdings(&[(b(1), None)]), vec![b(0), b(1)]);
    }
}
