//! The pool as the guest driver sees it: a shared mapping (the ivshmem BAR,
//! or the pool file for vhost-user), its validated header, the export
//! directory and each export's stock list.
//!
//! The host writes all of it and may rewrite the directory at any time, so
//! everything is read with volatile loads and checked before use.

use crate::error::{GuestError, Result};
use std::fs::File;
use std::mem::offset_of;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use zc_proto::layout::{
    ExportEntry, PoolHeader, EXPORT_ACTIVE, HEADER_SIZE, MAX_EXPORTS, NO_QUEUE, RING_AREA_SIZE,
};
use zc_proto::{BufferIndex, PoolLayout, PoolMemory, PoolView};

pub use zc_proto::layout::{MAX_STOCK, STOCK_OFFSET};

/// A MAP_SHARED mapping of a pool, unmapped on drop.
pub struct PoolMap {
    ptr: NonNull<u8>,
    len: usize,
    layout: PoolLayout,
}

// SAFETY: the mapping is plain shared memory accessed only through raw
// pointers and volatile operations; the owner may move between threads.
unsafe impl Send for PoolMap {}
// SAFETY: as above; &PoolMap only reads through volatile loads.
unsafe impl Sync for PoolMap {}

// SAFETY: ptr..ptr + len is mapped read-write from `map` until drop, at a
// fixed address.
unsafe impl PoolMemory for PoolMap {
    fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn size(&self) -> usize {
        self.len
    }
}

impl PoolMap {
    /// Maps `len` bytes of `file` (a pool file, or a PCI BAR's `resource2`)
    /// and checks that it holds a zc pool.
    pub fn map(file: &File, len: u64, path: &Path) -> Result<Self> {
        if len < HEADER_SIZE {
            return Err(GuestError::Pool(format!(
                "{} is {len} bytes, smaller than a pool header",
                path.display()
            )));
        }
        let ulen = usize::try_from(len).map_err(|_| GuestError::Pool("too large".into()))?;
        // SAFETY: a fresh shared mapping chosen by the kernel; the fd is
        // valid for the call; failure is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ulen,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(GuestError::io(path, std::io::Error::last_os_error()));
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| GuestError::Pool("NULL map".into()))?;
        let mut map = PoolMap {
            ptr,
            len: ulen,
            // Replaced below once the header checks out.
            layout: PoolLayout::new(0, zc_proto::buffer::MIN_BUF_SIZE, 1)
                .map_err(|e| GuestError::Pool(e.to_string()))?,
        };
        // SAFETY: len >= HEADER_SIZE >= size_of::<PoolHeader>().
        let header = unsafe { std::ptr::read_volatile(map.ptr.as_ptr().cast::<PoolHeader>()) };
        map.layout = PoolLayout::from_header(&header, len)
            .map_err(|e| GuestError::Pool(format!("{}: {e}", path.display())))?;
        Ok(map)
    }

    /// Reads just the cluster id of a would-be pool, mapping only its first
    /// page (discovery looks at every ivshmem device; sysfs `resource` files
    /// of memory BARs can be mapped but not read).
    pub fn peek_cluster(file: &File) -> Option<u32> {
        let len = file.metadata().ok()?.len();
        if len < HEADER_SIZE {
            return None;
        }
        // SAFETY: a fresh read-only shared mapping of the first page; checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                HEADER_SIZE as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let mut h = [0u8; 16];
        for (i, b) in h.iter_mut().enumerate() {
            // SAFETY: i < 16 < HEADER_SIZE, inside the mapping.
            *b = unsafe { std::ptr::read_volatile(p.cast::<u8>().add(i)) };
        }
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(p, HEADER_SIZE as usize) };
        if h[..8] != zc_proto::layout::POOL_MAGIC {
            return None;
        }
        Some(u32::from_le_bytes([h[12], h[13], h[14], h[15]]))
    }

    pub fn layout(&self) -> &PoolLayout {
        &self.layout
    }

    pub fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// A view that keeps this mapping alive (and so do its clones).
    pub fn view(self: &Arc<Self>) -> PoolView {
        PoolView::owning(self.clone(), self.layout)
            .expect("from_header checked the layout against the mapped length")
    }

    /// The active entries of the export directory, read consistently (the
    /// host's seqlock), as (slot, entry).
    pub fn exports(&self) -> Vec<(usize, ExportEntry)> {
        let base = self.ptr.as_ptr();
        // SAFETY: export_seq lies in the header page, inside the mapping.
        let seq = unsafe { base.add(offset_of!(PoolHeader, export_seq)).cast::<u32>() };
        for _ in 0..10_000 {
            // SAFETY: as above.
            let s1 = unsafe { std::ptr::read_volatile(seq) };
            fence(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let entries: Vec<(usize, ExportEntry)> = (0..MAX_EXPORTS)
                .map(|i| {
                    // SAFETY: exports[i] (i < MAX_EXPORTS) lies in the header page.
                    let e = unsafe {
                        std::ptr::read_volatile(
                            base.add(offset_of!(PoolHeader, exports))
                                .cast::<ExportEntry>()
                                .add(i),
                        )
                    };
                    (i, e)
                })
                .filter(|(_, e)| e.state == EXPORT_ACTIVE)
                .collect();
            fence(Ordering::Acquire);
            // SAFETY: as above.
            if unsafe { std::ptr::read_volatile(seq) } == s1 {
                return entries;
            }
        }
        Vec::new()
    }

    /// The export whose `dir` queue is `queue`.
    pub fn export_for_queue(
        &self,
        queue: u16,
        dir: crate::error::Direction,
    ) -> Result<(usize, ExportEntry)> {
        self.exports()
            .into_iter()
            .find(|(_, e)| match dir {
                crate::error::Direction::Rx => e.rx_queue == queue,
                crate::error::Direction::Tx => e.tx_queue == queue,
            })
            .ok_or(GuestError::NoExport {
                cluster: self.layout.cluster_id,
                queue,
                dir: dir.option(),
            })
    }

    /// The export with this MAC.
    pub fn export_for_mac(&self, mac: [u8; 6]) -> Option<(usize, ExportEntry)> {
        self.exports().into_iter().find(|(_, e)| e.mac == mac)
    }

    /// Exports without a tx queue: sinks that consume (exchange and drop)
    /// whatever their guest sends.
    pub fn sinks(&self) -> Vec<(usize, ExportEntry)> {
        self.exports()
            .into_iter()
            .filter(|(_, e)| e.tx_queue == NO_QUEUE)
            .collect()
    }

    /// Checks that export `e` may be used by `dir`: receiving needs an rx
    /// queue; sending needs a tx queue or goes into a sink (an export
    /// without tx consumes what its guest sends).
    pub fn check_direction(&self, e: &ExportEntry, dir: crate::error::Direction) -> Result<()> {
        if dir == crate::error::Direction::Rx && e.rx_queue == NO_QUEUE {
            return Err(GuestError::WrongDirection {
                cluster: self.layout.cluster_id,
                mac: crate::error::mac_string(&e.mac),
                dir: dir.option(),
            });
        }
        Ok(())
    }

    /// Pool offset of slot `slot`'s ring area, after checking that the entry
    /// names exactly that area.
    pub fn ring_area(&self, slot: usize, e: &ExportEntry) -> Result<u64> {
        let want = PoolLayout::ring_area_offset(slot)
            .ok_or_else(|| GuestError::Pool(format!("export slot {slot} out of range")))?;
        if e.ring_offset != want || e.ring_size != RING_AREA_SIZE {
            return Err(GuestError::Pool(format!(
                "export {slot} names ring area {:#x}+{:#x}, expected {want:#x}+{RING_AREA_SIZE:#x}",
                e.ring_offset, e.ring_size
            )));
        }
        Ok(want)
    }

    /// The stock list of export `slot`: distinct, in-range buffer indices.
    pub fn stock(&self, slot: usize) -> Result<Vec<BufferIndex>> {
        let area = PoolLayout::ring_area_offset(slot)
            .ok_or_else(|| GuestError::Pool(format!("export slot {slot} out of range")))?;
        // SAFETY: area + STOCK_OFFSET + 8 + 4 * MAX_STOCK <= area + RING_AREA_SIZE,
        // inside the ring areas, which every validated pool holds.
        let p = unsafe {
            self.ptr
                .as_ptr()
                .add((area + STOCK_OFFSET) as usize)
                .cast::<u32>()
        };
        // SAFETY: p is inside the mapping (above).
        let n = unsafe { std::ptr::read_volatile(p) } as usize;
        fence(Ordering::Acquire);
        if n > MAX_STOCK {
            return Err(GuestError::Pool(format!(
                "export {slot}'s stock list claims {n} buffers (at most {MAX_STOCK})"
            )));
        }
        let count = self.layout.buf_count;
        let mut seen = vec![false; count as usize];
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: i < n <= MAX_STOCK, inside the stock list.
            let b = unsafe { std::ptr::read_volatile(p.add(2 + i)) };
            if b >= count || std::mem::replace(&mut seen[b as usize], true) {
                return Err(GuestError::Pool(format!(
                    "export {slot}'s stock list names buffer {b} twice or out of range"
                )));
            }
            out.push(BufferIndex::new(b));
        }
        Ok(out)
    }

    /// Writes export `slot`'s stock list (tests and fixture pools).
    pub fn write_stock(&self, slot: usize, stock: &[BufferIndex]) {
        let Some(area) = PoolLayout::ring_area_offset(slot) else {
            return;
        };
        let n = stock.len().min(MAX_STOCK);
        // SAFETY: as in `stock`: inside the ring area.
        unsafe {
            let p = self
                .ptr
                .as_ptr()
                .add((area + STOCK_OFFSET) as usize)
                .cast::<u32>();
            std::ptr::write_volatile(p, 0);
            fence(Ordering::SeqCst);
            for (i, b) in stock[..n].iter().enumerate() {
                std::ptr::write_volatile(p.add(2 + i), b.get());
            }
            fence(Ordering::SeqCst);
            std::ptr::write_volatile(p, n as u32);
        }
    }

    /// Writes directory entry `slot` (tests and fixture pools).
    pub fn write_export(&self, slot: usize, e: ExportEntry) {
        if slot >= MAX_EXPORTS {
            return;
        }
        // SAFETY: exports[slot] and export_seq lie in the header page.
        unsafe {
            let base = self.ptr.as_ptr();
            let seq = base.add(offset_of!(PoolHeader, export_seq)).cast::<u32>();
            let s = std::ptr::read_volatile(seq) | 1;
            std::ptr::write_volatile(seq, s);
            fence(Ordering::SeqCst);
            std::ptr::write_volatile(
                base.add(offset_of!(PoolHeader, exports))
                    .cast::<ExportEntry>()
                    .add(slot),
                e,
            );
            fence(Ordering::SeqCst);
            std::ptr::write_volatile(seq, s.wrapping_add(1));
        }
    }
}

impl Drop for PoolMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping this value created.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Creates a pool file holding a valid header (tests and fixtures that run
/// the driver against a backend other than zc-hostd).
pub fn create_pool_file(path: &Path, layout: &PoolLayout) -> Result<File> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| GuestError::io(path, e))?;
    f.set_len(layout.pool_size)
        .map_err(|e| GuestError::io(path, e))?;
    let h = layout.header();
    // SAFETY: PoolHeader is repr(C) plain data without padding holes that
    // matter for a byte copy; we view it as bytes only to write it.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&h as *const PoolHeader).cast::<u8>(),
            std::mem::size_of::<PoolHeader>(),
        )
    };
    f.write_all_at(bytes, 0)
        .map_err(|e| GuestError::io(path, e))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Direction;

    fn fixture() -> (tempfile::TempDir, PoolMap) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool");
        let layout = PoolLayout::new(7, 2048, 64).unwrap();
        let f = create_pool_file(&path, &layout).unwrap();
        let map = PoolMap::map(&f, layout.pool_size, &path).unwrap();
        (dir, map)
    }

    #[test]
    fn directory_and_stock_are_read_and_checked() {
        let (_d, map) = fixture();
        assert_eq!(map.layout().cluster_id, 7);
        assert!(map.exports().is_empty());
        let e = ExportEntry {
            state: EXPORT_ACTIVE,
            mac: [2, 0x7a, 0, 7, 0, 1],
            rx_queue: 1,
            tx_queue: NO_QUEUE,
            _pad: 0,
            ring_offset: PoolLayout::ring_area_offset(3).unwrap(),
            ring_size: RING_AREA_SIZE,
        };
        map.write_export(3, e);
        let (slot, got) = map.export_for_queue(1, Direction::Rx).unwrap();
        assert_eq!((slot, got), (3, e));
        assert!(matches!(
            map.export_for_queue(1, Direction::Tx),
            Err(GuestError::NoExport { queue: 1, .. })
        ));
        assert!(map.check_direction(&e, Direction::Tx).is_ok(), "a sink");
        assert_eq!(map.sinks(), vec![(3, e)]);
        let no_rx = ExportEntry {
            rx_queue: NO_QUEUE,
            tx_queue: 2,
            ..e
        };
        assert!(map.check_direction(&no_rx, Direction::Rx).is_err());
        assert_eq!(map.ring_area(3, &e).unwrap(), e.ring_offset);
        assert!(map.ring_area(2, &e).is_err());
        assert_eq!(map.export_for_mac(e.mac).map(|x| x.0), Some(3));

        let stock: Vec<BufferIndex> = (10..20).map(BufferIndex::new).collect();
        map.write_stock(3, &stock);
        assert_eq!(map.stock(3).unwrap(), stock);
        map.write_stock(3, &[BufferIndex::new(5), BufferIndex::new(5)]);
        assert!(map.stock(3).is_err(), "duplicate");
        map.write_stock(3, &[BufferIndex::new(64)]);
        assert!(map.stock(3).is_err(), "out of range");
    }

    #[test]
    fn a_file_without_a_pool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(PoolMap::peek_cluster(&f), None);
        let layout = PoolLayout::new(7, 2048, 64).unwrap();
        let p2 = dir.path().join("pool7");
        let f7 = create_pool_file(&p2, &layout).unwrap();
        assert_eq!(PoolMap::peek_cluster(&f7), Some(7));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let e = PoolMap::map(&f, 8192, &path).err().unwrap().to_string();
        assert!(e.contains("bad magic"), "{e}");
    }
}
