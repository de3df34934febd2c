//! The export directory in the pool header, and each export's stock list.
//!
//! Writes go through the daemon's own mapping of the pool with volatile
//! stores; readers (guests) follow the `export_seq` seqlock: odd while the
//! host rewrites an entry.
//!
//! The stock list tells a zc guest driver which buffers it starts with. It
//! sits in the second half of the export's ring area (the first half, 32 KiB,
//! holds the driver's virtqueues of up to 512 entries each):
//! `u32 count, u32 reserved, u32 index[count]`. The guest may scribble on it;
//! the host's truth is the owner table.

use std::mem::offset_of;
use std::sync::atomic::{fence, Ordering};
use zc_proto::layout::{ExportEntry, PoolHeader, RING_AREA_SIZE};
pub use zc_proto::layout::{MAX_STOCK, STOCK_OFFSET};
use zc_proto::{BufferIndex, PoolLayout, PoolView};

/// Publishes (or, with `None`, clears) export `slot`'s directory entry.
pub fn write_entry(view: &PoolView, slot: usize, entry: Option<ExportEntry>) {
    let Some(ring_offset) = PoolLayout::ring_area_offset(slot) else {
        return;
    };
    let hdr = view.base().cast::<PoolHeader>();
    let e = entry.map_or_else(ExportEntry::default, |e| ExportEntry {
        ring_offset,
        ring_size: RING_AREA_SIZE,
        ..e
    });
    // SAFETY: the pool mapping starts with the header page (PoolView's
    // contract); export_seq and exports[slot] (slot < MAX_EXPORTS, checked by
    // ring_area_offset) lie inside it. Volatile accesses through raw pointers
    // because guests map the same page.
    unsafe {
        let seq = hdr
            .cast::<u8>()
            .add(offset_of!(PoolHeader, export_seq))
            .cast::<u32>();
        let s = std::ptr::read_volatile(seq);
        let s = s | 1;
        std::ptr::write_volatile(seq, s);
        fence(Ordering::SeqCst);
        let ent = hdr
            .cast::<u8>()
            .add(offset_of!(PoolHeader, exports))
            .cast::<ExportEntry>()
            .add(slot);
        std::ptr::write_volatile(ent, e);
        fence(Ordering::SeqCst);
        std::ptr::write_volatile(seq, s.wrapping_add(1));
    }
}

/// Reads export `slot`'s entry back (tests and `stats`).
pub fn read_entry(view: &PoolView, slot: usize) -> Option<ExportEntry> {
    PoolLayout::ring_area_offset(slot)?;
    // SAFETY: as in write_entry; a plain volatile read of a Copy struct.
    let e = unsafe {
        std::ptr::read_volatile(
            view.base()
                .add(offset_of!(PoolHeader, exports))
                .cast::<ExportEntry>()
                .add(slot),
        )
    };
    Some(e)
}

/// Writes the stock list of export `slot`.
pub fn write_stock(view: &PoolView, slot: usize, stock: &[BufferIndex]) {
    let Some(area) = PoolLayout::ring_area_offset(slot) else {
        return;
    };
    let n = stock.len().min(MAX_STOCK);
    // SAFETY: area + STOCK_OFFSET + 8 + 4 * MAX_STOCK <= area + RING_AREA_SIZE,
    // inside the ring areas, which lie before the buffers in every pool.
    unsafe {
        let p = view
            .base()
            .add((area + STOCK_OFFSET) as usize)
            .cast::<u32>();
        std::ptr::write_volatile(p, 0);
        fence(Ordering::SeqCst);
        for (i, b) in stock[..n].iter().enumerate() {
            std::ptr::write_volatile(p.add(2 + i), b.get());
        }
        std::ptr::write_volatile(p.add(1), 0);
        fence(Ordering::SeqCst);
        std::ptr::write_volatile(p, n as u32);
    }
}

/// Reads export `slot`'s stock list (what a guest driver does).
pub fn read_stock(view: &PoolView, slot: usize) -> Vec<u32> {
    let Some(area) = PoolLayout::ring_area_offset(slot) else {
        return Vec::new();
    };
    // SAFETY: as in write_stock; the count is clamped to MAX_STOCK.
    unsafe {
        let p = view
            .base()
            .add((area + STOCK_OFFSET) as usize)
            .cast::<u32>();
        let n = (std::ptr::read_volatile(p) as usize).min(MAX_STOCK);
        (0..n)
            .map(|i| std::ptr::read_volatile(p.add(2 + i)))
            .collect()
    }
}
