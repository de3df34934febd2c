//! Which export's guest holds which pool buffer: host-private memory, never
//! mapped into a guest, so a guest cannot grant itself buffers.
//!
//! One byte per buffer: 0 when no guest holds it, `slot + 1` when the guest
//! of export `slot` does. Only the thread serving export `slot` moves a
//! buffer into or out of its own guest's ownership (or the daemon while
//! that thread is parked), so plain relaxed atomics suffice.
//!
//! The daemon keeps the table in a file beside the cluster lock
//! (`/dev/shm/zc/<cluster>/owners`), so that a daemon started after one
//! that died knows what the guests hold (issue 14). Every change is one
//! byte store, so a crash leaves each entry either before or after it.

use crate::shm::{self, Mapping};
use std::io;
use std::mem::size_of;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use zc_proto::layout::MAX_EXPORTS;
use zc_proto::BufferIndex;

const NOBODY: u8 = 0;
const _: () = assert!(MAX_EXPORTS < u8::MAX as usize);

const MAGIC: [u8; 8] = *b"ZCOWNERS";
const VERSION: u32 = 1;
/// The entries start here, after the header.
const HEADER_BYTES: usize = 64;

#[repr(C)]
#[derive(Clone, Copy)]
struct Header {
    magic: [u8; 8],
    version: u32,
    buf_count: u32,
}
const _: () = assert!(size_of::<Header>() == 16 && size_of::<Header>() <= HEADER_BYTES);

pub struct OwnerTable {
    map: Mapping,
    buf_count: u32,
}

impl OwnerTable {
    /// A table in anonymous shared memory (nothing outlives it).
    pub fn new(buf_count: u32) -> Self {
        // SAFETY: memfd_create with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"zc-owners".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor we own.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(Self::bytes(buf_count) as u64)
            .expect("size the owner table");
        Self::init(&f, buf_count).expect("map the owner table")
    }

    fn bytes(buf_count: u32) -> usize {
        HEADER_BYTES + buf_count as usize
    }

    /// Maps a zeroed file of `bytes(buf_count)` and writes its header.
    fn init(f: &std::fs::File, buf_count: u32) -> io::Result<Self> {
        let map = Mapping::map(f.as_fd(), Self::bytes(buf_count), false)?;
        let h = Header {
            magic: MAGIC,
            version: VERSION,
            buf_count,
        };
        // SAFETY: the mapping holds the header; nobody else uses it yet.
        unsafe { std::ptr::write_volatile(map.as_ptr().cast::<Header>(), h) };
        Ok(OwnerTable { map, buf_count })
    }

    /// A new table in the file at `path`: nobody holds anything.
    pub fn create(path: &Path, buf_count: u32) -> io::Result<Self> {
        let f = shm::create_private_file(path, Self::bytes(buf_count) as u64)?;
        Self::init(&f, buf_count)
    }

    /// The table a daemon that died left at `path`, if it is one for
    /// `buf_count` buffers.
    pub fn adopt(path: &Path, buf_count: u32) -> Option<Self> {
        let f = shm::open_private_file(path)?;
        if shm::file_size(f.as_fd()).ok()? != Self::bytes(buf_count) as u64 {
            return None;
        }
        let map = Mapping::map(f.as_fd(), Self::bytes(buf_count), false).ok()?;
        // SAFETY: the mapping holds the header.
        let h = unsafe { std::ptr::read_volatile(map.as_ptr().cast::<Header>()) };
        (h.magic == MAGIC && h.version == VERSION && h.buf_count == buf_count)
            .then_some(OwnerTable { map, buf_count })
    }

    #[inline(always)]
    fn entry(&self, b: BufferIndex) -> Option<&AtomicU8> {
        let i = b.get();
        if i >= self.buf_count {
            return None;
        }
        // SAFETY: HEADER_BYTES + i < bytes(buf_count), inside the mapping,
        // which lives as long as `self`. Only this daemon maps the file, and
        // every access is atomic.
        Some(unsafe { AtomicU8::from_ptr(self.map.as_ptr().add(HEADER_BYTES + i as usize)) })
    }

    fn tag(slot: usize) -> u8 {
        debug_assert!(slot < MAX_EXPORTS);
        slot as u8 + 1
    }

    /// True when the guest of export `slot` holds `b`.
    #[inline(always)]
    pub fn held_by_guest(&self, b: BufferIndex, slot: usize) -> bool {
        self.entry(b)
            .is_some_and(|o| o.load(Ordering::Relaxed) == Self::tag(slot))
    }

    /// The guest of export `slot` now holds `b`.
    #[inline(always)]
    pub fn give_to_guest(&self, b: BufferIndex, slot: usize) {
        if let Some(o) = self.entry(b) {
            o.store(Self::tag(slot), Ordering::Relaxed);
        }
    }

    /// The host took `b` back from whichever guest held it.
    #[inline(always)]
    pub fn take_from_guest(&self, b: BufferIndex) {
        if let Some(o) = self.entry(b) {
            o.store(NOBODY, Ordering::Relaxed);
        }
    }

    /// Every buffer the guest of export `slot` holds.
    pub fn guest_buffers(&self, slot: usize) -> Vec<BufferIndex> {
        let tag = Self::tag(slot);
        self.held_where(|t| t == tag)
    }

    /// Every buffer some guest holds, with its export's slot.
    pub fn all_guest_buffers(&self) -> Vec<(BufferIndex, usize)> {
        (0..self.buf_count)
            .map(BufferIndex::new)
            .filter_map(|b| {
                let t = self.entry(b)?.load(Ordering::Relaxed);
                (t != NOBODY).then(|| (b, usize::from(t - 1)))
            })
            .collect()
    }

    fn held_where(&self, f: impl Fn(u8) -> bool) -> Vec<BufferIndex> {
        (0..self.buf_count)
            .map(BufferIndex::new)
            .filter(|&b| self.entry(b).is_some_and(|o| f(o.load(Ordering::Relaxed))))
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

    #[test]
    fn a_table_in_a_file_outlives_its_daemon_and_only_fits_its_pool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owners");
        let t = OwnerTable::create(&path, 16).unwrap();
        t.give_to_guest(BufferIndex::new(5), 2);
        t.give_to_guest(BufferIndex::new(9), 0);
        drop(t); // the daemon dies
        assert!(
            OwnerTable::adopt(&path, 17).is_none(),
            "a table of another pool"
        );
        let t = OwnerTable::adopt(&path, 16).unwrap();
        assert_eq!(
            t.all_guest_buffers(),
            vec![(BufferIndex::new(5), 2), (BufferIndex::new(9), 0)]
        );
        drop(t);
        let fresh = OwnerTable::create(&path, 16).unwrap();
        assert!(fresh.all_guest_buffers().is_empty(), "create starts over");
        std::fs::write(dir.path().join("junk"), b"ZCOWNERX").unwrap();
        assert!(OwnerTable::adopt(&dir.path().join("junk"), 16).is_none());
    }
}
