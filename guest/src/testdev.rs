//! A device side of a split virtqueue over the same memory, for tests of the
//! driver: it pops what the driver made available, may rewrite descriptor
//! addresses (the zero-copy exchange) and publishes used elements, including
//! hostile ones.
#![cfg(test)]

use crate::virtq::{Desc, RingLayout, USED_F_NO_NOTIFY};
use std::sync::atomic::{AtomicU16, Ordering};

pub struct TestDevice {
    mem: *mut u8,
    l: RingLayout,
    pub last_avail: u16,
    pub used_idx: u16,
}

impl TestDevice {
    /// # Safety
    /// `mem` must be the queue memory the driver's DriverQueue was built on.
    pub unsafe fn new(mem: *mut u8, l: RingLayout) -> Self {
        TestDevice {
            mem,
            l,
            last_avail: 0,
            used_idx: 0,
        }
    }

    fn at<T>(&self, off: u64) -> *mut T {
        assert!(off < self.l.bytes);
        // SAFETY: off < layout.bytes, inside the queue memory.
        unsafe { self.mem.add(off as usize).cast() }
    }

    /// A ring index or flags field, as the atomic the driver shares it as.
    fn field(&self, off: u64) -> &AtomicU16 {
        // SAFETY: `at` checked the offset; ring fields are 2-byte aligned in
        // the queue memory (RingLayout), which outlives the device.
        unsafe { AtomicU16::from_ptr(self.at::<u16>(off)) }
    }

    pub fn avail_idx(&self) -> u16 {
        self.field(self.l.avail + 2).load(Ordering::Acquire)
    }

    pub fn avail_flags(&self) -> u16 {
        self.field(self.l.avail).load(Ordering::Relaxed)
    }

    /// The next available head and its descriptor.
    pub fn pop(&mut self) -> Option<(u16, Desc)> {
        if self.avail_idx() == self.last_avail {
            return None;
        }
        let slot = self.last_avail & (self.l.size - 1);
        // SAFETY: inside the avail ring.
        let head = unsafe {
            std::ptr::read_volatile(self.at::<u16>(self.l.avail + 4 + 2 * u64::from(slot)))
        };
        self.last_avail = self.last_avail.wrapping_add(1);
        Some((head, self.desc(head)))
    }

    pub fn desc(&self, i: u16) -> Desc {
        // SAFETY: i < size (asserted by `at`), inside the descriptor table.
        unsafe { std::ptr::read_volatile(self.at::<Desc>(self.l.desc + 16 * u64::from(i))) }
    }

    pub fn set_addr(&self, i: u16, addr: u64) {
        // SAFETY: inside the descriptor table.
        unsafe { std::ptr::write_volatile(self.at::<u64>(self.l.desc + 16 * u64::from(i)), addr) }
    }

    /// Writes a used element (id, len) and publishes it.
    pub fn used(&mut self, id: u32, len: u32) {
        let slot = self.used_idx & (self.l.size - 1);
        // SAFETY: inside the used ring.
        unsafe {
            std::ptr::write_volatile(self.at::<u32>(self.l.used + 4 + 8 * u64::from(slot)), id);
            std::ptr::write_volatile(self.at::<u32>(self.l.used + 8 + 8 * u64::from(slot)), len);
        }
        self.used_idx = self.used_idx.wrapping_add(1);
        self.set_used_idx(self.used_idx);
    }

    /// Publishes a used index as is (hostile devices jump it).
    pub fn set_used_idx(&self, idx: u16) {
        self.field(self.l.used + 2).store(idx, Ordering::Release);
    }

    /// The device polls: asks the driver not to kick.
    pub fn set_no_notify(&self, on: bool) {
        let v = if on { USED_F_NO_NOTIFY } else { 0 };
        self.field(self.l.used).store(v, Ordering::Relaxed);
    }
}
