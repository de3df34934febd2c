//! The frontend's memory table as the export sees it: guest-physical
//! ranges mapped into the daemon, and among them the pool, recognised by
//! the (device, inode) of the region's file.

use super::sigbus::{self, page_size, FaultFlag, Registration};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

/// Identity of the pool file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(f: &std::fs::File) -> std::io::Result<Self> {
        let m = f.metadata()?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

struct Region {
    gpa: u64,
    end: u64,
    host: *mut u8,
    /// Pool offset of the region's first byte, for the pool region.
    pool_base: Option<u64>,
    /// Guest RAM's SIGBUS registration. Declared before `map`, so it is
    /// dropped (unregistered) while the mapping still exists.
    _guard: Option<Registration>,
    map: Arc<MmapRegion<()>>,
}

/// Where a guest-physical range lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Ordinary guest memory at this host address.
    Ram(*mut u8),
    /// The pool, at this pool offset.
    Pool(u64),
}

/// A snapshot of the memory table. Holds the mappings, so host pointers it
/// returns stay valid while it lives even if the frontend changes the table.
/// Its guest RAM regions are registered with `sigbus` while it lives: a
/// page that vanishes under them (the file shrank) is replaced and counted
/// in the export's fault flag instead of killing the daemon.
#[derive(Default)]
pub struct GuestMap {
    regions: Vec<Region>,
    /// Regions backed by the pool file but not wholly inside it: nothing in
    /// them is usable.
    pub bad_pool_regions: usize,
    /// Guest RAM regions left out because they could not be registered
    /// with the SIGBUS handler (a touch could not be contained).
    pub unguarded_regions: usize,
}

// SAFETY: the raw pointers point into mappings owned by the Arcs held beside
// them; the map itself is immutable after construction.
unsafe impl Send for GuestMap {}

impl GuestMap {
    /// Builds the map from the frontend's table; `pool` identifies the pool
    /// file and its size. Guest RAM faults count in `faults`; the RAM
    /// regions of the maps in `poisoned` (maps that faulted before: they
    /// hold zero pages now, not the guest's memory) are left out.
    pub fn new(
        mem: &GuestMemoryMmap<()>,
        pool: FileId,
        pool_size: u64,
        faults: &Arc<FaultFlag>,
        poisoned: &[GuestMap],
    ) -> Self {
        let mut map = GuestMap::default();
        for r in mem.iter() {
            let m = r.get_mmap();
            if poisoned
                .iter()
                .any(|pm| pm.ram_mappings().any(|p| Arc::ptr_eq(p, &m)))
            {
                continue;
            }
            let gpa = r.start_addr().0;
            let len = r.len();
            let mut pool_base = None;
            if let Some(fo) = m.file_offset() {
                if FileId::of(fo.file()).ok() == Some(pool) {
                    match fo.start().checked_add(len) {
                        Some(end) if end <= pool_size => pool_base = Some(fo.start()),
                        _ => {
                            map.bad_pool_regions += 1;
                            continue;
                        }
                    }
                }
            }
            let Some(end) = gpa.checked_add(len) else {
                continue;
            };
            // The pool region is reached through the daemon's own pool
            // mapping, never through this one: nothing to guard (see `sigbus`).
            let guard = if pool_base.is_none() {
                let page = m.file_offset().map_or(4096, |fo| page_size(fo.file()));
                // SAFETY: the registration is dropped before `m` (field
                // order of Region), so the range stays mapped while
                // registered; it is the frontend's memory, which the
                // handler may replace.
                match unsafe { sigbus::register(m.as_ptr(), len as usize, page, faults) } {
                    Some(g) => Some(g),
                    None => {
                        map.unguarded_regions += 1;
                        continue;
                    }
                }
            } else {
                None
            };
            map.regions.push(Region {
                gpa,
                end,
                host: m.as_ptr(),
                pool_base,
                _guard: guard,
                map: m,
            });
        }
        // Pool regions first: the zero-copy path translates pool descriptors
        // and pool offsets for every packet, and searches in this order.
        map.regions.sort_by_key(|r| r.pool_base.is_none());
        map
    }

    /// The mappings of guest RAM regions (not the pool's).
    pub fn ram_mappings(&self) -> impl Iterator<Item = &Arc<MmapRegion<()>>> {
        self.regions
            .iter()
            .filter(|r| r.pool_base.is_none())
            .map(|r| &r.map)
    }

    pub fn has_pool(&self) -> bool {
        self.regions.iter().any(|r| r.pool_base.is_some())
    }

    /// Translates `[gpa, gpa + len)`, which must lie inside one region.
    #[inline]
    pub fn translate(&self, gpa: u64, len: u64) -> Option<Target> {
        let end = gpa.checked_add(len)?;
        let r = self.regions.iter().find(|r| gpa >= r.gpa && end <= r.end)?;
        let off = gpa - r.gpa;
        Some(match r.pool_base {
            Some(base) => Target::Pool(base + off),
            // SAFETY: gpa + len <= r.end, so the result lies inside the mapping.
            None => Target::Ram(unsafe { r.host.add(off as usize) }),
        })
    }

    /// The guest-physical address of pool offset `off`, if the pool is mapped.
    pub fn pool_gpa(&self, off: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let base = r.pool_base?;
            (off >= base && off - base < r.end - r.gpa).then(|| r.gpa + (off - base))
        })
    }
}
