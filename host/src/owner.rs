//! Which export's guest holds which pool buffer: host-private memory, never
//! mapped into a guest, so a guest cannot grant itself buffers.
//!
//! One byte per buffer: 0 when no guest holds it, `slot + 1` when the guest
//! of export `slot` does. Only the thread serving export `slot` moves a
//! buffer into or out of its own guest's ownership (or the daemon while
//! that thread is parked), so plain relaxed atomics suffice.

use std::sync::atomic::{AtomicU8, Ordering};
use zc_proto::layout::MAX_EXPORTS;
use zc_proto::BufferIndex;

const NOBODY: u8 = 0;
const _: () = assert!(MAX_EXPORTS < u8::MAX as usize);

pub struct OwnerTable {
    owner: Box<[AtomicU8]>,
}

impl OwnerTable {
    pub fn new(buf_count: u32) -> Self {
        OwnerTable {
            owner: (0..buf_count).map(|_| AtomicU8::new(NOBODY)).collect(),
        }
    }

    fn tag(slot: usize) -> u8 {
        debug_assert!(slot < MAX_EXPORTS);
        slot as u8 + 1
    }

    /// True when the guest of export `slot` holds `b`.
    #[inline(always)]
    pub fn held_by_guest(&self, b: BufferIndex, slot: usize) -> bool {
        self.owner
            .get(b.get() as usize)
            .is_some_and(|o| o.load(Ordering::Relaxed) == Self::tag(slot))
    }

    /// The guest of export `slot` now holds `b`.
    #[inline(always)]
    pub fn give_to_guest(&self, b: BufferIndex, slot: usize) {
        if let Some(o) = self.owner.get(b.get() as usize) {
            o.store(Self::tag(slot), Ordering::Relaxed);
        }
    }

    /// The host took `b` back from whichever guest held it.
    #[inline(always)]
    pub fn take_from_guest(&self, b: BufferIndex) {
        if let Some(o) = self.owner.get(b.get() as usize) {
            o.store(NOBODY, Ordering::Relaxed);
        }
    }

    /// Every buffer the guest of export `slot` holds.
    pub fn guest_buffers(&self, slot: usize) -> Vec<BufferIndex> {
        let tag = Self::tag(slot);
        self.owner
            .iter()
            .enumerate()
            .filter(|(_, o)| o.load(Ordering::Relaxed) == tag)
            .map(|(i, _)| BufferIndex::new(i as u32))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_is_per_export_and_out_of_range_is_nobodys() {
        let t = OwnerTable::new(8);
        let b = BufferIndex::new(3);
        assert!(!t.held_by_guest(b, 0));
        t.give_to_guest(b, 0);
        assert!(t.held_by_guest(b, 0));
        assert!(!t.held_by_guest(b, 1));
        assert_eq!(t.guest_buffers(0), vec![b]);
        assert!(t.guest_buffers(1).is_empty());
        t.take_from_guest(b);
        assert!(!t.held_by_guest(b, 0));
        let far = BufferIndex::new(8);
        t.give_to_guest(far, 0);
        assert!(!t.held_by_guest(far, 0));
    }
}
