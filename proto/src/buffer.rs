//! Buffers: fixed-size slots in the pool, named by index, owned through handles.

use std::fmt;

/// Bytes of the virtio-net header (`struct virtio_net_hdr_mrg_rxbuf`, VERSION_1)
/// that sits immediately in front of the packet data of every buffer, so a
/// virtio descriptor can cover header and packet without a second segment.
pub const VIRTIO_NET_HDR_LEN: u32 = 12;

/// Offset of the packet data inside a buffer. 64 keeps packet data on a
/// cache line boundary and leaves the 12 header bytes just in front of it.
pub const HEADROOM: u32 = 64;

/// Smallest buffer size a pool may use (headroom plus a minimal frame).
pub const MIN_BUF_SIZE: u32 = 256;

/// Largest buffer size a pool may use (one 64 KiB jumbo frame plus headroom).
pub const MAX_BUF_SIZE: u32 = 65536 + HEADROOM;

const _: () = assert!(HEADROOM >= VIRTIO_NET_HDR_LEN);
const _: () = assert!(HEADROOM.is_multiple_of(64));

/// The index of a buffer in its pool. Only meaningful together with the pool
/// it came from; transports check it against the pool's buffer count before
/// computing an address from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferIndex(u32);

impl BufferIndex {
    pub const fn new(raw: u32) -> Self {
        BufferIndex(raw)
    }
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for BufferIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Ownership of one pool buffer plus the length of the packet in it.
///
/// Deliberately neither `Clone` nor `Copy`: holding a handle means owning the
/// buffer, and receiving or sending swaps the buffer a handle names instead of
/// copying bytes. A handle is only created by a transport (which validated the
/// index) or by [`BufferHandle::from_raw`] inside transports.
#[derive(Debug, PartialEq, Eq)]
pub struct BufferHandle {
    index: BufferIndex,
    len: u32,
}

impl BufferHandle {
    /// For transports: a handle for a buffer they validated and own.
    #[doc(hidden)]
    pub const fn from_raw(index: BufferIndex, len: u32) -> Self {
        BufferHandle { index, len }
    }

    pub const fn index(&self) -> BufferIndex {
        self.index
    }

    /// Length of the packet in the buffer (0 for an empty buffer).
    pub const fn len(&self) -> u32 {
        self.len
    }

    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// For transports: exchange what this handle names with another buffer.
    #[doc(hidden)]
    #[inline(always)]
    pub fn replace(&mut self, index: BufferIndex, len: u32) -> (BufferIndex, u32) {
        let old = (self.index, self.len);
        self.index = index;
        self.len = len;
        old
    }

    /// Set by [`crate::PacketMut::set_len`], which checked the capacity.
    #[inline(always)]
    pub(crate) fn set_len_checked(&mut self, len: u32) {
        self.len = len;
    }
}
