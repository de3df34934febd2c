//! AF_XDP with the pool as UMEM.
//!
//! The pool's buffer area is registered as the UMEM, one chunk per buffer
//! (chunk i is buffer i), so the kernel or a zero-copy driver writes
//! received frames into pool buffers and sends from them. Ownership follows
//! AF_XDP's rules and is tracked per buffer: a buffer on the fill ring or
//! the TX ring belongs to the kernel until it comes back on the RX ring or
//! the completion ring; only buffers the RX ring returns become handles,
//! and a descriptor naming a buffer the kernel was not lent is counted and
//! ignored. The redirect program is libxdp's default one (Debian's libxdp1
//! ships it), loaded with aya; it is attached through a bpf link, so it
//! goes when the port stops or the daemon dies.

use super::link::{self, Link};
use super::stats::{bump, NicCounters, MODE_XDP};
use super::{Ends, NicConfig, NicError, ZeroCopy, BURST};
use crate::port::Arm;
use aya::maps::XskMap;
use aya::programs::{Xdp, XdpFlags};
use aya::Ebpf;
use std::ffi::CString;
use std::io;
use std::num::NonZeroU32;
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;
use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User};
use zc_proto::buffer::HEADROOM;
use zc_proto::layout::BUFFERS_OFFSET;
use zc_proto::{BufferHandle, BufferIndex, PoolLayout, PoolView};

/// Where Debian's libxdp1 puts its default AF_XDP redirect program.
pub const DEFAULT_PROG: &str = "/usr/lib/x86_64-linux-gnu/bpf/xsk_def_xdp_prog.o";
/// The kernel's headroom in front of received XDP data.
const XDP_PACKET_HEADROOM: u32 = 256;
/// Bits of an unaligned-mode address that carry the offset (if_xdp.h).
const UNALIGNED_OFFSET_SHIFT: u32 = 48;
const XDP_UMEM_UNALIGNED_CHUNK_FLAG: u32 = 1;
const XDP_COPY: u16 = 2;
const XDP_ZEROCOPY: u16 = 4;
const XDP_USE_NEED_WAKEUP: u16 = 8;
/// Ring sizes: the fill ring takes every buffer the port lends for
/// receiving; TX in flight is bounded by the TX ring.
const FILL_RING: u32 = 2048;
const TX_RING: u32 = 512;
/// Buffer states in `state`.
const OURS: u8 = 0;
const ON_FILL: u8 = 1;
const ON_TX: u8 = 2;

pub struct XdpPort {
    // Drop order matters: rings and sockets before the UMEM they map, the
    // program (with its link) first of all.
    prog: Option<(Ebpf, aya::programs::xdp::XdpLinkId)>,
    rx: Option<RingRx>,
    tx: Option<RingTx>,
    user: User,
    fq: DeviceQueue,
    _sock: Socket,
    _umem: Umem,
    ends: Ends,
    pool: PoolView,
    layout: PoolLayout,
    /// Per pool buffer: who has it (OURS covers buffers not ours at all;
    /// only ON_* entries are trusted when the kernel returns a buffer).
    state: Vec<u8>,
    spare: Vec<BufferIndex>,
    /// Empties the egress queue swaps for full buffers.
    tx_hand: Vec<BufferHandle>,
    rx_batch: Vec<BufferHandle>,
    on_fill: usize,
    on_tx: usize,
    copy_mode: bool,
    counters: Arc<NicCounters>,
    steps: u32,
    fd: RawFd,
}

fn os<'a>(ifname: &'a str, what: &'static str) -> impl Fn(io::Error) -> NicError + 'a {
    move |source| NicError::Os {
        ifname: ifname.into(),
        what,
        source,
    }
}

// SAFETY: xdpilone's rings and UMEM are raw pointers into mappings this
// port owns; every clone of their shared socket lives inside this value, and
// a port is used by one thread at a time (Port: Send, not Sync), so moving
// it to another worker moves all of them together.
unsafe impl Send for XdpPort {}

fn errno(e: xdpilone::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.get_raw().abs())
}

fn not_root(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EPERM)
}

/// Decodes a kernel address into (buffer, offset in it); `None` if it
/// names nothing in the pool's buffers.
#[inline]
fn locate(layout: &PoolLayout, addr: u64) -> Option<(BufferIndex, u32)> {
    let real =
        (addr & ((1 << UNALIGNED_OFFSET_SHIFT) - 1)).checked_add(addr >> UNALIGNED_OFFSET_SHIFT)?;
    let size = u64::from(layout.buf_size);
    let idx = real / size;
    (idx < u64::from(layout.buf_count))
        .then(|| (BufferIndex::new(idx as u32), (real % size) as u32))
}

impl XdpPort {
    /// On failure the buffers and the queue ends come back.
    pub fn open(
        link: &Link,
        cfg: &NicConfig,
        pool: PoolView,
        ends: Ends,
        buffers: Vec<BufferIndex>,
        counters: Arc<NicCounters>,
    ) -> Result<XdpPort, Box<Refused>> {
        let need = 4 * BURST;
        if buffers.len() < need {
            let e = NicError::TooFewBuffers {
                ifname: cfg.ifname.clone(),
                need,
                given: buffers.len(),
            };
            return Err(Box::new(Refused {
                error: e,
                buffers,
                ends,
            }));
        }
        match Self::bind(
            link,
            cfg,
            &pool,
            ends.ingress.is_some(),
            ends.egress.is_some(),
        ) {
            Ok(b) => Ok(Self::start(b, pool, ends, buffers, counters)),
            Err(error) => Err(Box::new(Refused {
                error,
                buffers,
                ends,
            })),
        }
    }

    fn bind(
        link: &Link,
        cfg: &NicConfig,
        pool: &PoolView,
        rx: bool,
        tx: bool,
    ) -> Result<Bound, NicError> {
        let ifname = cfg.ifname.as_str();
        let layout = *pool.layout();
        // Someone else's program first: that is the user's decision.
        let existing = if rx {
            link::xdp_program(link.index).map_err(os(ifname, "reading its XDP state"))?
        } else {
            None
        };
        if let Some(id) = existing {
            if !cfg.takeover {
                return Err(NicError::Busy {
                    ifname: ifname.into(),
                    id,
                    name: program_name(id),
                });
            }
        }
        let len = (u64::from(layout.buf_count) * u64::from(layout.buf_size)).next_multiple_of(4096);
        // SAFETY: BUFFERS_OFFSET + len lies inside the pool mapping (the
        // pool is a power of two at least that large, its size a multiple
        // of 2 MiB), page aligned, and the mapping outlives the port (the
        // PoolView contract).
        let area = unsafe {
            NonNull::new_unchecked(std::ptr::slice_from_raw_parts_mut(
                pool.base().add(BUFFERS_OFFSET as usize),
                len as usize,
            ))
        };
        let flags = if layout.buf_size.is_power_of_two() {
            0
        } else {
            XDP_UMEM_UNALIGNED_CHUNK_FLAG
        };
        let config = UmemConfig {
            fill_size: FILL_RING,
            complete_size: TX_RING,
            frame_size: layout.buf_size,
            // Received data then lands at the pool's packet offset once
            // HEADROOM is at least 256 (proto/src/buffer.rs).
            headroom: HEADROOM.saturating_sub(XDP_PACKET_HEADROOM),
            flags,
        };
        // SAFETY: the area is valid for as long as the Umem (see above).
        let umem = match unsafe { Umem::new(config, area) } {
            Ok(u) => u,
            Err(e) => {
                let e = errno(e);
                return Err(if not_root(&e) {
                    NicError::NotRoot {
                        ifname: ifname.into(),
                        what: "AF_XDP",
                        bpf: true,
                    }
                } else if e.raw_os_error() == Some(libc::EINVAL) {
                    NicError::Chunk {
                        ifname: ifname.into(),
                        buf_size: layout.buf_size,
                        source: e,
                    }
                } else if e.raw_os_error() == Some(libc::EFAULT) {
                    os(
                        ifname,
                        "registering the pool as AF_XDP UMEM (the kernel pins only hugetlbfs and shmem pages: keep the pool on hugepages or /dev/shm)",
                    )(e)
                } else {
                    os(ifname, "registering the pool as AF_XDP UMEM")(e)
                });
            }
        };
        let mut info = IfInfo::invalid();
        let cname = CString::new(ifname).map_err(|_| NicError::NoInterface(ifname.into()))?;
        info.from_name(&cname)
            .map_err(|e| os(ifname, "looking it up")(errno(e)))?;
        info.set_queue(cfg.queue);
        let sock = Socket::with_shared(&info, &umem)
            .map_err(|e| os(ifname, "creating the AF_XDP socket")(errno(e)))?;
        let fq = umem
            .fq_cq(&sock)
            .map_err(|e| os(ifname, "creating the fill and completion rings")(errno(e)))?;
        let ring = |on: bool, n| if on { NonZeroU32::new(n) } else { None };
        let mut sc = SocketConfig {
            rx_size: ring(rx, FILL_RING),
            tx_size: ring(tx, TX_RING),
            bind_flags: XDP_USE_NEED_WAKEUP,
        };
        sc.bind_flags |= match cfg.zerocopy {
            ZeroCopy::Off => XDP_COPY,
            ZeroCopy::On | ZeroCopy::Auto => XDP_ZEROCOPY,
        };
        let user = umem
            .rx_tx(&sock, &sc)
            .map_err(|e| os(ifname, "creating the RX and TX rings")(errno(e)))?;
        let rx_ring = if rx {
            Some(
                user.map_rx()
                    .map_err(|e| os(ifname, "mapping the RX ring")(errno(e)))?,
            )
        } else {
            None
        };
        let tx_ring = if tx {
            Some(
                user.map_tx()
                    .map_err(|e| os(ifname, "mapping the TX ring")(errno(e)))?,
            )
        } else {
            None
        };
        let mut zero_copy = cfg.zerocopy != ZeroCopy::Off;
        let fd = user.as_raw_fd();
        if let Err(e) = bind_socket(fd, link.index, cfg.queue, sc.bind_flags) {
            let unsupported = e.raw_os_error() == Some(libc::EOPNOTSUPP);
            match (cfg.zerocopy, unsupported) {
                (ZeroCopy::On, true) => {
                    return Err(NicError::NoZeroCopy {
                        ifname: ifname.into(),
                        driver: link.driver(),
                    })
                }
                (ZeroCopy::Auto, true) => {
                    // A failed bind leaves the socket unbound: bind again, copying.
                    zero_copy = false;
                    bind_socket(fd, link.index, cfg.queue, XDP_USE_NEED_WAKEUP | XDP_COPY)
                        .map_err(os(ifname, "binding the AF_XDP socket"))?;
                }
                _ => return Err(os(ifname, "binding the AF_XDP socket")(e)),
            }
        }
        let prog = if rx {
            Some(attach(link, cfg, existing, user.as_raw_fd(), zero_copy)?)
        } else {
            None
        };
        Ok(Bound {
            prog,
            rx: rx_ring,
            tx: tx_ring,
            user,
            fq,
            sock,
            umem,
            zero_copy,
            layout,
        })
    }

    fn start(
        b: Bound,
        pool: PoolView,
        ends: Ends,
        buffers: Vec<BufferIndex>,
        counters: Arc<NicCounters>,
    ) -> XdpPort {
        counters.set_mode(MODE_XDP, b.zero_copy);
        let fd = b.user.as_raw_fd();
        let mut port = XdpPort {
            prog: b.prog,
            rx: b.rx,
            tx: b.tx,
            user: b.user,
            fq: b.fq,
            _sock: b.sock,
            _umem: b.umem,
            pool,
            layout: b.layout,
            state: vec![OURS; b.layout.buf_count as usize],
            spare: buffers,
            tx_hand: Vec::with_capacity(BURST),
            rx_batch: Vec::with_capacity(BURST),
            on_fill: 0,
            on_tx: 0,
            copy_mode: !b.zero_copy,
            counters,
            steps: 0,
            fd,
            ends,
        };
        if port.ends.egress.is_some() {
            port.refill_tx_hand();
        }
        port.refill();
        port
    }

    /// Keeps the egress hand at a full burst of empties.
    fn refill_tx_hand(&mut self) {
        while self.tx_hand.len() < BURST {
            match self.spare.pop() {
                // SAFETY: popped off the port's spares: ours, named by no
                // handle.
                Some(b) => self.tx_hand.push(unsafe { BufferHandle::from_raw(b, 0) }),
                None => break,
            }
        }
    }

    /// Lends spare buffers to the kernel's fill ring (keeping a burst back
    /// for the egress hand), and wakes the driver if it asked to be.
    fn refill(&mut self) {
        if self.rx.is_none() {
            return;
        }
        let keep = if self.ends.egress.is_some() { BURST } else { 0 };
        let n = self.spare.len().saturating_sub(keep);
        if n == 0 {
            return;
        }
        let size = u64::from(self.layout.buf_size);
        let mut w = self.fq.fill(n as u32);
        let room = w.capacity() as usize;
        let from = self.spare.len() - room.min(n);
        let lend = &self.spare[from..];
        let put = w.insert(lend.iter().map(|b| u64::from(b.get()) * size)) as usize;
        w.commit();
        drop(w);
        for b in self.spare.drain(from..from + put) {
            self.state[b.get() as usize] = ON_FILL;
        }
        self.on_fill += put;
        if put > 0 && self.fq.needs_wakeup() {
            self.fq.wake();
        }
    }

    /// Buffers the kernel finished sending come back as spares.
    fn complete(&mut self) {
        if self.on_tx == 0 {
            return;
        }
        let mut c = self.fq.complete(TX_RING);
        while let Some(addr) = c.read() {
            match locate(&self.layout, addr) {
                Some((b, _)) if self.state[b.get() as usize] == ON_TX => {
                    self.state[b.get() as usize] = OURS;
                    self.spare.push(b);
                    self.on_tx -= 1;
                }
                _ => bump(&self.counters.bad_descs, 1),
            }
        }
        c.release();
    }

    fn receive(&mut self) -> usize {
        let Some(rx) = self.rx.as_mut() else { return 0 };
        let mut r = rx.receive(BURST as u32);
        let mut bytes = 0u64;
        let (mut realigned, mut too_long, mut bad) = (0u64, 0u64, 0u64);
        let max = self.layout.max_packet();
        let buf_size = self.layout.buf_size;
        while let Some(XdpDesc { addr, len, .. }) = r.read() {
            let Some((b, off)) = locate(&self.layout, addr) else {
                bad += 1;
                continue;
            };
            let st = &mut self.state[b.get() as usize];
            if *st != ON_FILL {
                bad += 1;
                continue;
            }
            *st = OURS;
            self.on_fill -= 1;
            let fits = off.checked_add(len).is_some_and(|end| end <= buf_size);
            if len == 0 || !fits || len > max {
                too_long += u64::from(len > max);
                bad += u64::from(len == 0 || !fits);
                self.spare.push(b);
                continue;
            }
            if off != HEADROOM {
                let base = self.layout.buffer_offset(b).unwrap_or(0) as usize;
                // SAFETY: both ranges lie inside buffer b (off + len and
                // HEADROOM + len are at most buf_size, checked above), which
                // the kernel handed back and only this port owns now;
                // `copy` allows the overlap.
                unsafe {
                    let p = self.pool.base().add(base);
                    std::ptr::copy(p.add(off as usize), p.add(HEADROOM as usize), len as usize);
                }
                realigned += 1;
            }
            bytes += u64::from(len);
            // SAFETY: the kernel gave b back (it was ON_FILL, now OURS):
            // only this port holds it, and no handle names it.
            self.rx_batch
                .push(unsafe { BufferHandle::from_raw(b, len) });
        }
        r.release();
        drop(r);
        let c = &self.counters;
        bump(&c.rx_realigned, realigned);
        bump(&c.drop_too_long, too_long);
        bump(&c.bad_descs, bad);
        let n = self.rx_batch.len();
        if n == 0 {
            return 0;
        }
        let sent = match self.ends.ingress.as_mut() {
            Some(p) => p.send_burst(&mut self.rx_batch),
            None => 0,
        };
        // The first `sent` handles now name the queue's empties; the rest
        // are packets the full queue did not take.
        let mut sent_bytes = bytes;
        for h in &self.rx_batch[sent..] {
            sent_bytes -= u64::from(h.len());
        }
        bump(&c.drop_queue_full, (n - sent) as u64);
        bump(&c.rx_packets, sent as u64);
        bump(&c.rx_bytes, sent_bytes);
        let copied = if self.copy_mode {
            sent as u64
        } else {
            realigned.min(sent as u64)
        };
        bump(&c.rx_copied, copied);
        self.spare
            .extend(self.rx_batch.drain(..).map(|h| h.index()));
        n
    }

    fn transmit(&mut self) -> usize {
        let (Some(tx), Some(egress)) = (self.tx.as_mut(), self.ends.egress.as_mut()) else {
            return 0;
        };
        let mut moved = 0;
        let room = {
            let w = tx.transmit(BURST as u32);
            w.capacity() as usize
        };
        let want = room.min(self.tx_hand.len());
        if want > 0 {
            let n = egress.recv_burst(&mut self.tx_hand[..want]);
            if n > 0 {
                let size = u64::from(self.layout.buf_size);
                let mut w = tx.transmit(n as u32);
                let descs = self.tx_hand[..n].iter().map(|h| XdpDesc {
                    addr: u64::from(h.index().get()) * size + u64::from(HEADROOM),
                    len: h.len(),
                    options: 0,
                });
                let put = w.insert(descs) as usize;
                w.commit();
                drop(w);
                debug_assert_eq!(put, n);
                let mut bytes = 0u64;
                for h in self.tx_hand.drain(..put) {
                    bytes += u64::from(h.len());
                    self.state[h.index().get() as usize] = ON_TX;
                }
                self.on_tx += put;
                let c = &self.counters;
                bump(&c.tx_packets, put as u64);
                bump(&c.tx_bytes, bytes);
                if self.copy_mode {
                    bump(&c.tx_copied, put as u64);
                }
                moved = put;
            }
        }
        // Copy mode sends only inside the kick; a zero-copy driver asks.
        if self.on_tx > 0 && tx.needs_wakeup() {
            tx.wake();
        }
        self.refill_tx_hand();
        moved
    }

    /// The kernel's own drop counters.
    fn read_kernel_stats(&mut self) {
        if let Ok(s) = self.user.statistics_v2() {
            let c = &self.counters;
            use std::sync::atomic::Ordering::Relaxed;
            // rx_dropped counts frames without a fill buffer and frames
            // longer than a chunk; the first are also in the fill count.
            c.drop_kernel_ring_full.store(s.rx_ring_full, Relaxed);
            c.drop_fill_ring_empty
                .store(s.rx_fill_ring_empty_descs, Relaxed);
            c.kernel_too_long.store(
                s.rx_dropped.saturating_sub(s.rx_fill_ring_empty_descs),
                Relaxed,
            );
        }
    }

    pub fn step(&mut self) -> usize {
        self.complete();
        let n = self.receive() + self.transmit();
        self.refill();
        self.steps = self.steps.wrapping_add(1);
        if self.steps.is_multiple_of(4096) {
            self.read_kernel_stats();
        }
        n
    }

    pub fn arm(&mut self) -> Arm {
        self.read_kernel_stats();
        let waiting = self.ends.egress.as_mut().is_some_and(|c| c.arm());
        let rx_ready = self.rx.as_ref().is_some_and(|r| r.available() > 0);
        if waiting || rx_ready {
            return Arm::Busy;
        }
        if self.on_tx > 0 {
            // Completions do not wake the socket: look again soon.
            return Arm::SleepAtMost(Duration::from_millis(1));
        }
        Arm::Sleep
    }

    pub fn disarm(&mut self) {
        if let Some(c) = self.ends.egress.as_mut() {
            c.disarm();
        }
    }

    pub fn wake_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.fd];
        v.extend(&self.ends.bells);
        v
    }

    pub fn held(&self) -> Vec<BufferIndex> {
        let mut v: Vec<BufferIndex> = self.spare.clone();
        v.extend(self.tx_hand.iter().map(|h| h.index()));
        v.extend(self.lent());
        v
    }

    fn lent(&self) -> impl Iterator<Item = BufferIndex> + '_ {
        self.state
            .iter()
            .enumerate()
            .filter(|(_, &s)| s != OURS)
            .map(|(i, _)| BufferIndex::new(i as u32))
    }

    pub fn stop(mut self: Box<Self>) -> Vec<BufferIndex> {
        if let Some((mut ebpf, link)) = self.prog.take() {
            if let Some(p) = ebpf.program_mut("xsk_def_prog") {
                if let Ok(p) = <&mut Xdp>::try_from(p) {
                    let _ = p.detach(link);
                }
            }
        }
        let mut bufs = std::mem::take(&mut self.spare);
        bufs.extend(self.tx_hand.drain(..).map(|h| h.index()));
        let lent: Vec<BufferIndex> = self.lent().collect();
        // Closing the socket (dropping every ring and the UMEM) ends the
        // kernel's use of the lent buffers: they are ours again after this.
        drop(self);
        bufs.extend(lent);
        bufs
    }
}

/// A port that did not open, and what it was given.
pub struct Refused {
    pub error: NicError,
    pub buffers: Vec<BufferIndex>,
    pub ends: Ends,
}

/// What binding produced, before the port starts.
struct Bound {
    prog: Option<(Ebpf, aya::programs::xdp::XdpLinkId)>,
    rx: Option<RingRx>,
    tx: Option<RingTx>,
    user: User,
    fq: DeviceQueue,
    sock: Socket,
    umem: Umem,
    zero_copy: bool,
    layout: PoolLayout,
}

/// `struct sockaddr_xdp` (linux/if_xdp.h).
#[repr(C)]
struct SockaddrXdp {
    family: u16,
    flags: u16,
    ifindex: u32,
    queue_id: u32,
    shared_umem_fd: u32,
}
const _: () = assert!(std::mem::size_of::<SockaddrXdp>() == 16);

/// Binds the socket that owns the UMEM and its fill/completion rings to
/// one queue of the interface (bound here rather than through xdpilone so
/// that a refused zero-copy bind can be retried with other flags).
fn bind_socket(fd: RawFd, ifindex: u32, queue: u32, flags: u16) -> io::Result<()> {
    let sa = SockaddrXdp {
        family: libc::AF_XDP as u16,
        flags,
        ifindex,
        queue_id: queue,
        shared_umem_fd: 0,
    };
    // SAFETY: bind reads the local address struct of the size given.
    let r = unsafe {
        libc::bind(
            fd,
            (&sa as *const SockaddrXdp).cast(),
            std::mem::size_of::<SockaddrXdp>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn program_name(id: u32) -> String {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_string))
        .unwrap_or_else(|| "unnamed".into())
}

/// Loads the redirect program, points its map slot for our queue at the
/// socket, and attaches it (taking over another program if told to).
fn attach(
    link: &Link,
    cfg: &NicConfig,
    existing: Option<u32>,
    sock_fd: RawFd,
    zero_copy: bool,
) -> Result<(Ebpf, aya::programs::xdp::XdpLinkId), NicError> {
    let ifname = cfg.ifname.as_str();
    let load_err = |what: &'static str, e: String| NicError::Os {
        ifname: ifname.into(),
        what,
        source: io::Error::other(e),
    };
    // Privileges were checked when the AF_XDP socket was made.
    let mut ebpf = Ebpf::load_file(DEFAULT_PROG).map_err(|e| {
        load_err(
            "loading libxdp's redirect program (apt-get install libxdp1)",
            format!("{DEFAULT_PROG}: {e}"),
        )
    })?;
    {
        let map = ebpf
            .map_mut("xsks_map")
            .ok_or_else(|| load_err("the redirect program", "it has no xsks_map".into()))?;
        let mut xsks = XskMap::try_from(map)
            .map_err(|e| load_err("the redirect program's map", e.to_string()))?;
        // SAFETY of the borrow: the socket outlives the map entry (the
        // program and its map go first when the port stops).
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock_fd) };
        xsks.set(cfg.queue, fd, 0)
            .map_err(|e| load_err("pointing the redirect map at the socket", e.to_string()))?;
    }
    if let Some(id) = existing {
        link::detach_xdp(link.index).map_err(|source| NicError::Takeover {
            ifname: ifname.into(),
            id,
            source,
        })?;
        log::warn!("{ifname}: took over from XDP program {id}");
    }
    let prog: &mut Xdp = ebpf
        .program_mut("xsk_def_prog")
        .ok_or_else(|| load_err("the redirect program", "no xsk_def_prog in it".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| {
            load_err("the redirect program", e.to_string())
        })?;
    prog.load()
        .map_err(|e| load_err("loading the redirect program", e.to_string()))?;
    // Driver mode where the driver has XDP (zero-copy needs it); generic
    // mode elsewhere.
    let id = match prog.attach(ifname, XdpFlags::DRV_MODE) {
        Ok(id) => id,
        Err(_) if !zero_copy => prog
            .attach(ifname, XdpFlags::SKB_MODE)
            .map_err(|e| attach_err(link, e))?,
        Err(e) => return Err(attach_err(link, e)),
    };
    Ok((ebpf, id))
}

fn attach_err(link: &Link, e: aya::programs::ProgramError) -> NicError {
    // Somebody attached a program between our look and our attach.
    if let Ok(Some(id)) = link::xdp_program(link.index) {
        return NicError::Busy {
            ifname: link.name.clone(),
            id,
            name: program_name(id),
        };
    }
    NicError::Os {
        ifname: link.name.clone(),
        what: "attaching the XDP program",
        source: io::Error::other(e.to_string()),
    }
}
