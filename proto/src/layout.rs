//! The pool file: a header page, one ring area per export, then the buffers.
//!
//! ```text
//! 0            header page (PoolHeader, export directory)
//! 64 KiB       ring area of export 0, 1, ... (RING_AREA_SIZE each)
//! 8 MiB        buffer 0, 1, ... (buf_size each, packet data at HEADROOM)
//! ...          padding up to pool_size (a power of two: it is a PCI BAR)
//! ```
//!
//! The host writes the header; guests read it. A guest can scribble on its
//! mapping, so the host never reads decisions back out of the pool: it keeps
//! its own [`PoolLayout`]. Guests validate what they read with
//! [`PoolLayout::from_header`].

use crate::buffer::{BufferIndex, HEADROOM, MAX_BUF_SIZE, MIN_BUF_SIZE};
use std::mem::{offset_of, size_of};
use thiserror::Error;

pub const POOL_MAGIC: [u8; 8] = *b"ZCPOOL\0\0";
/// 2: room for 124 exports (one host serves many VMs), buffers at 8 MiB.
pub const POOL_VERSION: u32 = 2;

/// Pools are mapped from 2 MiB hugepages; every region boundary that matters
/// to QEMU's memory table is a multiple of this.
pub const HUGEPAGE_SIZE: u64 = 2 << 20;

pub const HEADER_SIZE: u64 = 4096;
pub const RING_AREAS_OFFSET: u64 = 64 << 10;
/// Room for one export's virtqueues: two split rings of up to 1024 entries
/// (16 B descriptors + avail + used = 26.6 KiB each), page aligned.
pub const RING_AREA_SIZE: u64 = 64 << 10;
/// As many as the header page's directory holds.
pub const MAX_EXPORTS: usize = 124;
/// The first buffer, on the first hugepage after the ring areas.
pub const BUFFERS_OFFSET: u64 = (RING_AREAS_OFFSET + RING_AREA_SIZE * MAX_EXPORTS as u64)
    .div_ceil(HUGEPAGE_SIZE)
    * HUGEPAGE_SIZE;

/// Offset of an export's stock list inside its ring area. The first half of
/// the area holds the guest driver's virtqueues (two of up to 512 entries);
/// the second half lists the buffers the guest starts with:
/// `u32 count, u32 reserved, u32 index[count]`. The host's truth is its
/// private owner table; the guest may scribble on this list.
pub const STOCK_OFFSET: u64 = RING_AREA_SIZE / 2;
/// Most buffers a stock list can name.
pub const MAX_STOCK: usize = ((RING_AREA_SIZE - STOCK_OFFSET) as usize - 8) / 4;
const _: () = assert!(STOCK_OFFSET + 8 + 4 * MAX_STOCK as u64 <= RING_AREA_SIZE);

/// `rx_queue`/`tx_queue` value of an export that has no such direction.
pub const NO_QUEUE: u16 = u16::MAX;

pub const EXPORT_FREE: u32 = 0;
pub const EXPORT_ACTIVE: u32 = 1;

/// One entry of the export directory: which virtio-net MAC serves which
/// cluster queues, and where the guest driver puts that device's rings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportEntry {
    pub state: u32,
    pub mac: [u8; 6],
    /// Cluster queue whose packets the device delivers to the guest.
    pub rx_queue: u16,
    /// Cluster queue that receives what the guest transmits.
    pub tx_queue: u16,
    pub _pad: u16,
    /// Pool offset of this export's ring area.
    pub ring_offset: u64,
    pub ring_size: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolHeader {
    pub magic: [u8; 8],
    pub version: u32,
    pub cluster_id: u32,
    pub pool_size: u64,
    pub buf_size: u32,
    pub buf_headroom: u32,
    pub buf_count: u32,
    pub export_capacity: u32,
    pub buffers_offset: u64,
    pub ring_areas_offset: u64,
    pub ring_area_size: u64,
    /// Odd while the host rewrites the export directory (a seqlock), so a
    /// reader can retry instead of seeing half an entry.
    pub export_seq: u32,
    pub _reserved: [u32; 15],
    pub exports: [ExportEntry; MAX_EXPORTS],
}

const _: () = assert!(size_of::<ExportEntry>() == 32);
const _: () = assert!(offset_of!(ExportEntry, mac) == 4);
const _: () = assert!(offset_of!(ExportEntry, rx_queue) == 10);
const _: () = assert!(offset_of!(ExportEntry, tx_queue) == 12);
const _: () = assert!(offset_of!(ExportEntry, ring_offset) == 16);
const _: () = assert!(offset_of!(PoolHeader, version) == 8);
const _: () = assert!(offset_of!(PoolHeader, cluster_id) == 12);
const _: () = assert!(offset_of!(PoolHeader, pool_size) == 16);
const _: () = assert!(offset_of!(PoolHeader, buf_size) == 24);
const _: () = assert!(offset_of!(PoolHeader, buf_count) == 32);
const _: () = assert!(offset_of!(PoolHeader, buffers_offset) == 40);
const _: () = assert!(offset_of!(PoolHeader, ring_areas_offset) == 48);
const _: () = assert!(offset_of!(PoolHeader, ring_area_size) == 56);
const _: () = assert!(offset_of!(PoolHeader, export_seq) == 64);
const _: () = assert!(offset_of!(PoolHeader, exports) == 128);
const _: () = assert!(size_of::<PoolHeader>() == 128 + 32 * MAX_EXPORTS);
const _: () = assert!(size_of::<PoolHeader>() as u64 <= HEADER_SIZE);
const _: () = assert!(BUFFERS_OFFSET == 4 * HUGEPAGE_SIZE);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("buffer size {0} is out of range: use {MIN_BUF_SIZE}..={MAX_BUF_SIZE} bytes")]
    BufSize(u32),
    #[error("buffer size {0} is not a multiple of 64 bytes (cache line)")]
    BufAlign(u32),
    #[error("buffer count must be at least 1")]
    NoBuffers,
    #[error("a pool of {count} buffers of {size} bytes does not fit in 2^40 bytes")]
    TooLarge { count: u32, size: u32 },
    #[error("not a zc pool (bad magic)")]
    Magic,
    #[error("zc pool version {0} is not supported (expected {POOL_VERSION})")]
    Version(u32),
    #[error("zc pool header is inconsistent: {0}")]
    Inconsistent(&'static str),
}

/// The geometry of a pool, computed once by the host and checked by guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLayout {
    pub cluster_id: u32,
    pub buf_size: u32,
    pub buf_count: u32,
    pub pool_size: u64,
}

impl PoolLayout {
    pub fn new(cluster_id: u32, buf_size: u32, buf_count: u32) -> Result<Self, LayoutError> {
        if !(MIN_BUF_SIZE..=MAX_BUF_SIZE).contains(&buf_size) {
            return Err(LayoutError::BufSize(buf_size));
        }
        if !buf_size.is_multiple_of(64) {
            return Err(LayoutError::BufAlign(buf_size));
        }
        if buf_count == 0 {
            return Err(LayoutError::NoBuffers);
        }
        let too_large = LayoutError::TooLarge {
            count: buf_count,
            size: buf_size,
        };
        let data = u64::from(buf_count) * u64::from(buf_size);
        let used = BUFFERS_OFFSET.checked_add(data).ok_or(too_large)?;
        // ivshmem exposes the pool as a PCI BAR, and BARs are powers of two.
        let pool_size = used
            .checked_next_power_of_two()
            .ok_or(LayoutError::TooLarge {
                count: buf_count,
                size: buf_size,
            })?;
        if pool_size > 1 << 40 {
            return Err(LayoutError::TooLarge {
                count: buf_count,
                size: buf_size,
            });
        }
        Ok(PoolLayout {
            cluster_id,
            buf_size,
            buf_count,
            pool_size,
        })
    }

    /// Largest packet a buffer holds.
    pub const fn max_packet(&self) -> u32 {
        self.buf_size - HEADROOM
    }

    /// Pool offset of a buffer's first byte, or `None` for an index out of range.
    #[inline(always)]
    pub fn buffer_offset(&self, index: BufferIndex) -> Option<u64> {
        (index.get() < self.buf_count)
            .then(|| BUFFERS_OFFSET + u64::from(index.get()) * u64::from(self.buf_size))
    }

    /// Pool offset of a buffer's packet data.
    #[inline(always)]
    pub fn packet_offset(&self, index: BufferIndex) -> Option<u64> {
        self.buffer_offset(index).map(|o| o + u64::from(HEADROOM))
    }

    /// The buffer whose packet data starts exactly at `offset - hdr_len`,
    /// i.e. a descriptor that starts `hdr_len` bytes in front of the packet.
    #[inline]
    pub fn buffer_at_packet_offset(&self, offset: u64, hdr_len: u32) -> Option<BufferIndex> {
        let rel = offset
            .checked_add(u64::from(hdr_len))?
            .checked_sub(BUFFERS_OFFSET + u64::from(HEADROOM))?;
        let size = u64::from(self.buf_size);
        // Both sides call this per packet: shift and mask for the usual
        // power-of-two buffer sizes instead of a 64-bit division.
        let idx = if size.is_power_of_two() {
            if rel & (size - 1) != 0 {
                return None;
            }
            rel >> size.trailing_zeros()
        } else {
            if rel % size != 0 {
                return None;
            }
            rel / size
        };
        (idx < u64::from(self.buf_count)).then(|| BufferIndex::new(idx as u32))
    }

    /// Pool offset of export `slot`'s ring area.
    pub fn ring_area_offset(slot: usize) -> Option<u64> {
        (slot < MAX_EXPORTS).then(|| RING_AREAS_OFFSET + RING_AREA_SIZE * slot as u64)
    }

    /// The header the host writes at offset 0 (export directory empty).
    pub fn header(&self) -> PoolHeader {
        PoolHeader {
            magic: POOL_MAGIC,
            version: POOL_VERSION,
            cluster_id: self.cluster_id,
            pool_size: self.pool_size,
            buf_size: self.buf_size,
            buf_headroom: HEADROOM,
            buf_count: self.buf_count,
            export_capacity: MAX_EXPORTS as u32,
            buffers_offset: BUFFERS_OFFSET,
            ring_areas_offset: RING_AREAS_OFFSET,
            ring_area_size: RING_AREA_SIZE,
            export_seq: 0,
            _reserved: [0; 15],
            exports: [ExportEntry::default(); MAX_EXPORTS],
        }
    }

    /// Validates a header read from a mapping of `mapped_len` bytes.
    pub fn from_header(h: &PoolHeader, mapped_len: u64) -> Result<Self, LayoutError> {
        if h.magic != POOL_MAGIC {
            return Err(LayoutError::Magic);
        }
        if h.version != POOL_VERSION {
            return Err(LayoutError::Version(h.version));
        }
        if h.buf_headroom != HEADROOM
            || h.buffers_offset != BUFFERS_OFFSET
            || h.ring_areas_offset != RING_AREAS_OFFSET
            || h.ring_area_size != RING_AREA_SIZE
            || h.export_capacity != MAX_EXPORTS as u32
        {
            return Err(LayoutError::Inconsistent("fixed offsets differ"));
        }
        let layout = PoolLayout::new(h.cluster_id, h.buf_size, h.buf_count)?;
        if layout.pool_size != h.pool_size {
            return Err(LayoutError::Inconsistent(
                "pool size does not match the buffers",
            ));
        }
        if h.pool_size > mapped_len {
            return Err(LayoutError::Inconsistent("pool is larger than the mapping"));
        }
        Ok(layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pool_is_a_power_of_two_holding_every_buffer() {
        let l = PoolLayout::new(99, 2048, 65536).unwrap();
        assert_eq!(l.pool_size, 256 << 20);
        let last = l.buffer_offset(BufferIndex::new(65535)).unwrap();
        assert!(last + 2048 <= l.pool_size);
        assert_eq!(l.buffer_offset(BufferIndex::new(65536)), None);
        assert_eq!(l.max_packet(), 2048 - HEADROOM);
    }

    #[test]
    fn small_pool_is_still_a_power_of_two() {
        let l = PoolLayout::new(1, 2048, 16).unwrap();
        assert_eq!(l.pool_size, 16 << 20);
        assert!(l.pool_size.is_power_of_two());
    }

    #[test]
    fn rejects_bad_geometry() {
        assert_eq!(PoolLayout::new(1, 100, 10), Err(LayoutError::BufSize(100)));
        assert_eq!(
            PoolLayout::new(1, 2000, 10),
            Err(LayoutError::BufAlign(2000))
        );
        assert_eq!(PoolLayout::new(1, 2048, 0), Err(LayoutError::NoBuffers));
        assert!(matches!(
            PoolLayout::new(1, MAX_BUF_SIZE - 64, u32::MAX),
            Err(LayoutError::TooLarge { .. })
        ));
    }

    #[test]
    fn packet_offsets_map_back_to_buffers() {
        let l = PoolLayout::new(1, 2048, 100).unwrap();
        let off = l.packet_offset(BufferIndex::new(7)).unwrap();
        assert_eq!(off, BUFFERS_OFFSET + 7 * 2048 + u64::from(HEADROOM));
        assert_eq!(
            l.buffer_at_packet_offset(off - 12, 12),
            Some(BufferIndex::new(7))
        );
        assert_eq!(l.buffer_at_packet_offset(off - 11, 12), None);
        assert_eq!(l.buffer_at_packet_offset(off, 12), None);
        assert_eq!(l.buffer_at_packet_offset(0, 12), None);
        assert_eq!(l.buffer_at_packet_offset(u64::MAX, 12), None);
        let past = l.packet_offset(BufferIndex::new(99)).unwrap() + 2048;
        assert_eq!(l.buffer_at_packet_offset(past - 12, 12), None);
        // The same answers where the buffer size is no power of two.
        let l = PoolLayout::new(1, 2112, 100).unwrap();
        for i in [0, 7, 99] {
            let off = l.packet_offset(BufferIndex::new(i)).unwrap();
            assert_eq!(
                l.buffer_at_packet_offset(off - 12, 12),
                Some(BufferIndex::new(i))
            );
            assert_eq!(l.buffer_at_packet_offset(off - 12 + 64, 12), None);
            assert_eq!(l.buffer_at_packet_offset(off - 12 + 2048, 12), None);
        }
        let past = l.packet_offset(BufferIndex::new(99)).unwrap() + 2112;
        assert_eq!(l.buffer_at_packet_offset(past - 12, 12), None);
    }

    #[test]
    fn header_round_trips_and_rejects_tampering() {
        let l = PoolLayout::new(99, 2048, 1024).unwrap();
        let h = l.header();
        assert_eq!(PoolLayout::from_header(&h, l.pool_size), Ok(l));
        assert!(PoolLayout::from_header(&h, l.pool_size - 1).is_err());
        let mut bad = h;
        bad.magic[0] = b'X';
        assert_eq!(
            PoolLayout::from_header(&bad, l.pool_size),
            Err(LayoutError::Magic)
        );
        let mut bad = h;
        bad.version = 1;
        assert_eq!(
            PoolLayout::from_header(&bad, l.pool_size),
            Err(LayoutError::Version(1))
        );
        let mut bad = h;
        bad.buf_count = 4_000_000;
        assert!(PoolLayout::from_header(&bad, l.pool_size).is_err());
        let mut bad = h;
        bad.buffers_offset = 0;
        assert!(PoolLayout::from_header(&bad, l.pool_size).is_err());
    }

    #[test]
    fn ring_areas_fit_before_the_buffers() {
        let last = PoolLayout::ring_area_offset(MAX_EXPORTS - 1).unwrap();
        assert!(last + RING_AREA_SIZE <= BUFFERS_OFFSET);
        assert_eq!(PoolLayout::ring_area_offset(MAX_EXPORTS), None);
    }
}
