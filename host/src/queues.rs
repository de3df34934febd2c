//! The cluster's queues: one file holding every ring, host-private (never
//! in the pool a guest maps) and shared with attached host processes.
//!
//! The file lives beside the cluster lock (`/dev/shm/zc/<cluster>/queues`,
//! mode 0600) rather than in a memfd, so that a daemon started after one
//! that died takes the same rings over, packets in them included (issue 14).
//! Its header is written last: a file whose creation was cut short has no
//! magic and is never adopted.

use crate::ring::{self, Consumer, Producer, SlotLimits, MAX_RING_SIZE, MIN_RING_SIZE};
use crate::shm::{self, Mapping};
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use thiserror::Error;
use zc_proto::{BufferIndex, PoolLayout};

const MAGIC: [u8; 8] = *b"ZCQUEUES";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 4096;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AreaHeader {
    magic: [u8; 8],
    version: u32,
    queue_count: u32,
    ring_size: u32,
    buf_count: u32,
    max_len: u32,
    _pad: u32,
    ring_stride: u64,
}
const _: () = assert!(size_of::<AreaHeader>() == 40);
const _: () = assert!(offset_of!(AreaHeader, ring_stride) == 32);

#[derive(Debug, Error)]
pub enum QueueError {
    #[error(
        "ring size {0} is invalid: use a power of two from {MIN_RING_SIZE} to {MAX_RING_SIZE}"
    )]
    RingSize(u32),
    #[error("{queues} queues of {ring_size} slots need {need} buffers, the pool has {have}: add --buffers or lower --queue-len")]
    NotEnoughBuffers {
        queues: u16,
        ring_size: u32,
        need: u64,
        have: u32,
    },
    #[error("cannot create queue memory: {0}")]
    Create(io::Error),
    #[error("queue memory from the daemon is invalid: {0}")]
    Invalid(&'static str),
    #[error("cannot map queue memory: {0}")]
    Map(io::Error),
}

/// Geometry of the queue area, as the daemon chose it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueGeometry {
    pub queue_count: u16,
    pub ring_size: u32,
}

impl QueueGeometry {
    fn stride(&self) -> usize {
        ring::ring_bytes(self.ring_size).next_multiple_of(4096)
    }

    fn bytes(&self) -> usize {
        HEADER_BYTES + self.stride() * usize::from(self.queue_count)
    }

    /// Buffers the rings hold: they must leave at least as many spare.
    pub fn check(&self, layout: &PoolLayout) -> Result<(), QueueError> {
        if !self.ring_size.is_power_of_two()
            || !(MIN_RING_SIZE..=MAX_RING_SIZE).contains(&self.ring_size)
        {
            return Err(QueueError::RingSize(self.ring_size));
        }
        let need = 2 * u64::from(self.queue_count) * u64::from(self.ring_size);
        if need > u64::from(layout.buf_count) {
            return Err(QueueError::NotEnoughBuffers {
                queues: self.queue_count,
                ring_size: self.ring_size,
                need,
                have: layout.buf_count,
            });
        }
        Ok(())
    }
}

pub struct QueueArea {
    fd: OwnedFd,
    map: Mapping,
    geometry: QueueGeometry,
    limits: SlotLimits,
    /// Per queue, the eventfds that wake a worker sleeping on it: [the
    /// consumer's, the producer's]. Only the daemon has them all; a process
    /// attached to a queue gets the bell of the other side.
    bells: Vec<[OwnedFd; 2]>,
}

/// A fresh non-blocking eventfd.
fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Which side of a queue a bell wakes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Consumer = 0,
    Producer = 1,
}

impl QueueArea {
    /// Creates the area in a new file at `path` with every ring full of
    /// empty buffers taken from `empties` (which must hold `queue_count *
    /// ring_size` of them).
    pub fn create(
        path: &std::path::Path,
        geometry: QueueGeometry,
        layout: &PoolLayout,
        empties: &[BufferIndex],
    ) -> Result<Self, QueueError> {
        geometry.check(layout)?;
        let file =
            shm::create_private_file(path, geometry.bytes() as u64).map_err(QueueError::Create)?;
        let fd = OwnedFd::from(file);
        let map = Mapping::map(fd.as_fd(), geometry.bytes(), true).map_err(QueueError::Map)?;
        let limits = SlotLimits {
            buf_count: layout.buf_count,
            max_len: layout.max_packet(),
        };
        let area = Self::with_bells(fd, map, geometry, limits)?;
        let n = geometry.ring_size as usize;
        for q in 0..geometry.queue_count {
            let chunk = &empties[usize::from(q) * n..][..n];
            // SAFETY: ring_base(q) points at stride >= ring_bytes bytes inside
            // the mapping, page aligned, not yet shared with anyone.
            unsafe { ring::init_ring(area.ring_base(q), geometry.ring_size, chunk) };
        }
        let hdr = AreaHeader {
            magic: MAGIC,
            version: VERSION,
            queue_count: u32::from(geometry.queue_count),
            ring_size: geometry.ring_size,
            buf_count: limits.buf_count,
            max_len: limits.max_len,
            _pad: 0,
            ring_stride: geometry.stride() as u64,
        };
        // Last: only a complete area has a header.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: the fresh mapping holds the header page; nobody else has it yet.
        unsafe { std::ptr::write_volatile(area.map.as_ptr().cast::<AreaHeader>(), hdr) };
        Ok(area)
    }

    fn with_bells(
        fd: OwnedFd,
        map: Mapping,
        geometry: QueueGeometry,
        limits: SlotLimits,
    ) -> Result<Self, QueueError> {
        let bells = (0..geometry.queue_count)
            .map(|_| Ok([eventfd()?, eventfd()?]))
            .collect::<io::Result<Vec<_>>>()
            .map_err(QueueError::Create)?;
        Ok(QueueArea {
            fd,
            map,
            geometry,
            limits,
            bells,
        })
    }

    /// Takes over the area a daemon that died left at `path`, rings and
    /// packets as they are, if it has this `geometry` and fits `layout`;
    /// `None` if there is none or it does not fit (it is then created anew).
    pub fn adopt(
        path: &std::path::Path,
        geometry: QueueGeometry,
        layout: &PoolLayout,
    ) -> Option<Self> {
        let file = shm::open_private_file(path)?;
        let fd = OwnedFd::from(file);
        let area = Self::open(fd, layout).ok()?;
        if area.geometry != geometry {
            return None;
        }
        let QueueArea {
            fd,
            map,
            geometry,
            limits,
            ..
        } = area;
        Self::with_bells(fd, map, geometry, limits).ok()
    }

    /// Maps an area received from the daemon and checks its header against
    /// the pool it belongs to.
    pub fn open(fd: OwnedFd, layout: &PoolLayout) -> Result<Self, QueueError> {
        let size = shm::file_size(fd.as_fd()).map_err(QueueError::Map)? as usize;
        if size < HEADER_BYTES {
            return Err(QueueError::Invalid("smaller than its header"));
        }
        let map = Mapping::map(fd.as_fd(), size, false).map_err(QueueError::Map)?;
        // SAFETY: the mapping holds at least the header page.
        let h = unsafe { std::ptr::read_volatile(map.as_ptr().cast::<AreaHeader>()) };
        if h.magic != MAGIC || h.version != VERSION {
            return Err(QueueError::Invalid("bad magic or version"));
        }
        let geometry = QueueGeometry {
            queue_count: u16::try_from(h.queue_count)
                .map_err(|_| QueueError::Invalid("queue count"))?,
            ring_size: h.ring_size,
        };
        if !h.ring_size.is_power_of_two() || !(MIN_RING_SIZE..=MAX_RING_SIZE).contains(&h.ring_size)
        {
            return Err(QueueError::Invalid("ring size"));
        }
        if h.ring_stride != geometry.stride() as u64 || geometry.bytes() > size {
            return Err(QueueError::Invalid("rings do not fit"));
        }
        if h.buf_count != layout.buf_count || h.max_len != layout.max_packet() {
            return Err(QueueError::Invalid("buffer geometry differs from the pool"));
        }
        let limits = SlotLimits {
            buf_count: h.buf_count,
            max_len: h.max_len,
        };
        Ok(QueueArea {
            fd,
            map,
            geometry,
            limits,
            bells: Vec::new(),
        })
    }

    /// The bell that wakes `side` of queue `q` when it sleeps in a worker
    /// (daemon side only; `None` in an area a process opened).
    pub fn bell(&self, q: u16, side: Side) -> Option<BorrowedFd<'_>> {
        self.bells
            .get(usize::from(q))
            .map(|b| b[side as usize].as_fd())
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    pub fn geometry(&self) -> QueueGeometry {
        self.geometry
    }

    fn ring_base(&self, q: u16) -> *mut u8 {
        assert!(q < self.geometry.queue_count, "queue {q} out of range");
        // SAFETY: q < queue_count, so header + q * stride lies inside the mapping.
        unsafe {
            self.map
                .as_ptr()
                .add(HEADER_BYTES + usize::from(q) * self.geometry.stride())
        }
    }

    /// The producer end of queue `q`. The daemon guarantees one producer.
    /// The area must outlive the endpoint. In the daemon's area, the end
    /// rings the consumer's bell when the consumer sleeps in a worker.
    pub fn producer(&self, q: u16) -> Producer {
        // SAFETY: the ring lies inside our mapping; the daemon hands the role
        // to one attachment only; callers keep `self` alive (HostQueue owns both).
        let mut p =
            unsafe { Producer::attach(self.ring_base(q), self.geometry.ring_size, self.limits) };
        if let Some(b) = self.bell(q, Side::Consumer) {
            // SAFETY: the bell lives as long as `self`, which outlives the end.
            unsafe { p.set_peer_bell(b.as_raw_fd()) };
        }
        p
    }

    /// The consumer end of queue `q` (see [`QueueArea::producer`]).
    pub fn consumer(&self, q: u16) -> Consumer {
        // SAFETY: as for producer.
        let mut c =
            unsafe { Consumer::attach(self.ring_base(q), self.geometry.ring_size, self.limits) };
        if let Some(b) = self.bell(q, Side::Producer) {
            // SAFETY: as for producer.
            unsafe { c.set_peer_bell(b.as_raw_fd()) };
        }
        c
    }

    /// Buffers sitting in queue `q`'s ring. Only meaningful while no process
    /// writes the ring (the daemon calls it when nothing is attached).
    pub fn contents(&self, q: u16) -> Vec<Option<BufferIndex>> {
        // SAFETY: ring inside our mapping; callers ensure quiescence.
        unsafe { ring::ring_contents(self.ring_base(q), self.geometry.ring_size, self.limits) }
    }

    /// Puts `idx` into slot `i` of queue `q` (daemon repair while quiescent).
    pub fn repair_slot(&self, q: u16, i: u32, idx: BufferIndex) {
        // SAFETY: ring inside our mapping; callers ensure quiescence.
        unsafe { ring::set_slot(self.ring_base(q), self.geometry.ring_size, i, idx) }
    }

    /// (produced, consumed) counters of queue `q`, for statistics.
    pub fn indices(&self, q: u16) -> (u32, u32) {
        // SAFETY: ring inside our mapping; reads only atomics.
        unsafe { ring::ring_indices(self.ring_base(q), self.geometry.ring_size) }
    }
}
