//! Buffers: fixed-size slots in the pool, named by index, owned through handles.
//!
//! # Where packet data sits, and AF_XDP (decision for issue 11)
//!
//! Every transport finds a packet at the same place: [`HEADROOM`] bytes
//! into its buffer, with the 12-byte virtio-net header right in front of
//! it (the zero-copy contract: a pool descriptor starts at packet data
//! minus 12). Host interfaces bring a third party that writes into
//! buffers: with the pool registered as an AF_XDP UMEM (one chunk per
//! buffer), the kernel or a zero-copy NIC writes a received frame at
//! `chunk + UMEM headroom + XDP_PACKET_HEADROOM (256)`; it never writes in
//! front of that, and TX descriptors carry any offset.
//!
//! **Decision: one layout constant, `HEADROOM = 256`, and no per-packet
//! data offset in handles.** Registered with UMEM headroom
//! `HEADROOM - 256 = 0`, AF_XDP puts received data exactly where the rings,
//! exports, the guest driver and the tools already look, and the virtio-net
//! header still fits in front (bytes 244..256), so the zero-copy contract
//! and every address computation stay as they are; only the constant moves.
//! Costs, transport by transport:
//! - host rings: none (they carry index and length).
//! - exports: none in code (`packet_offset`/`buffer_at_packet_offset`
//!   follow the constant); a guest packet longer than `buf_size - 256` is
//!   dropped and counted as any oversized packet is.
//! - guest driver: none in code; it checks the header's `buf_headroom`
//!   against its own constant, so an image built before the switch refuses
//!   a new pool with "fixed offsets differ" instead of misplacing data
//!   (bump `POOL_VERSION` with the switch for a plainer message).
//! - tools and users: 192 fewer bytes per buffer. With the default 2048-byte
//!   buffers the largest packet goes from 1984 to 1792 bytes: every
//!   1500-MTU frame (1514, 1518 with a VLAN tag, 1522 with two) still fits;
//!   jumbo frames need `--buf-size 4096` or more, as they do today.
//!   `MIN_BUF_SIZE` must grow past the headroom (320 holds a 64-byte frame).
//! - cache: packet data stays 64-byte aligned and the header stays on the
//!   line just before it, as now; the buffer size (and so the L1-set
//!   pattern of 2 KiB buffers) is unchanged.
//!
//! A per-packet offset (DPDK's `data_off`) was weighed and not taken: it
//! needs bits in every ring slot (index and length fill the 64 bits today),
//! a field in every handle and every swap, an offset check on every
//! hostile descriptor the exports and the guest read, and a looser
//! zero-copy contract ("any offset in the buffer" instead of one exact
//! address), all to save 192 bytes of buffers that are mostly larger than
//! their packets. Putting data at 64 with AF_XDP's unaligned-chunk mode
//! (fill address = buffer - 192) was ruled out too: the kernel may write
//! the whole 256-byte headroom in front of the data (XDP metadata), which
//! would be the previous buffer's tail, and such chunks cross pages, which
//! the kernel refuses on pools that are not on hugepages.
//!
//! The interface port registers UMEM headroom `HEADROOM - 256` (0): AF_XDP
//! data lands at the packet offset, and a frame is only moved inside its
//! buffer (counted as `realigned`) if it ever lands elsewhere.

use std::fmt;

/// Bytes of the virtio-net header (`struct virtio_net_hdr_mrg_rxbuf`, VERSION_1)
/// that sits immediately in front of the packet data of every buffer, so a
/// virtio descriptor can cover header and packet without a second segment.
pub const VIRTIO_NET_HDR_LEN: u32 = 12;

/// Offset of the packet data inside a buffer: where AF_XDP writes received
/// data (XDP_PACKET_HEADROOM), on a cache line boundary, with the 12 header
/// bytes just in front of it (see the module docs).
pub const HEADROOM: u32 = 256;

/// Smallest buffer size a pool may use (headroom plus a minimal frame).
pub const MIN_BUF_SIZE: u32 = HEADROOM + 64;

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
/// copying bytes. Only transports make handles (from buffers they validated
/// and own), so safe code cannot make a second handle to a buffer:
///
/// ```compile_fail,E0133
/// use zc_proto::{BufferHandle, BufferIndex};
/// let a = BufferHandle::from_raw(BufferIndex::new(7), 0); // error: unsafe
/// ```
///
/// ```compile_fail,E0133
/// use zc_proto::BufferHandle;
/// fn alias(a: &BufferHandle, b: &mut BufferHandle) {
///     b.replace(a.index(), 0); // error: unsafe
/// }
/// ```
#[derive(Debug, PartialEq, Eq)]
pub struct BufferHandle {
    index: BufferIndex,
    len: u32,
}

impl BufferHandle {
    /// For transports: a handle for a buffer they validated and own.
    ///
    /// # Safety
    /// `index` must be a buffer of the pool the handle will be used with,
    /// owned by the caller (taken from its queue or its daemon), and no
    /// other live handle may name it: two handles would let two owners
    /// write one buffer at once, or give it away twice.
    #[doc(hidden)]
    pub const unsafe fn from_raw(index: BufferIndex, len: u32) -> Self {
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
    ///
    /// # Safety
    /// As for [`BufferHandle::from_raw`], for `index` (unless it is the
    /// buffer this handle names already); and the caller takes over the
    /// buffer returned (it gave it to its queue, or holds it otherwise).
    #[doc(hidden)]
    #[inline(always)]
    pub unsafe fn replace(&mut self, index: BufferIndex, len: u32) -> (BufferIndex, u32) {
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
