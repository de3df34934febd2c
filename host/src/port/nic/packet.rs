//! AF_PACKET: the fallback where AF_XDP does not attach. A TPACKET_V3
//! receive ring (blocks the kernel fills and hands over whole) and a
//! TPACKET_V2 PACKET_TX_RING that bypasses the qdisc. Every packet is
//! copied once between a ring frame and a pool buffer, and counted as
//! copied. The rings are shared with the kernel: their status words are
//! read and written atomically, and packet bytes are only touched while the
//! status word says the frame is ours.

use super::link::Link;
use super::stats::{bump, NicCounters, MODE_PACKET};
use super::{Ends, NicConfig, NicError, BURST};
use crate::port::Arm;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use zc_proto::{BufferHandle, BufferIndex, PoolView};

const SOL_PACKET: i32 = 263;
const PACKET_RX_RING: i32 = 5;
const PACKET_STATISTICS: i32 = 6;
const PACKET_VERSION: i32 = 10;
const PACKET_TX_RING: i32 = 13;
const PACKET_QDISC_BYPASS: i32 = 20;
const PACKET_IGNORE_OUTGOING: i32 = 23;
const TPACKET_V2: i32 = 1;
const TPACKET_V3: i32 = 2;
const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_AVAILABLE: u32 = 0;
const TP_STATUS_SEND_REQUEST: u32 = 1;
const TP_STATUS_WRONG_FORMAT: u32 = 4;
const ETH_P_ALL: u16 = 0x0003;

/// Receive ring: 16 blocks of 256 KiB, handed over when full or after 1 ms.
const RX_BLOCK: u32 = 1 << 18;
const RX_BLOCKS: u32 = 16;
const RX_RETIRE_MS: u32 = 1;
/// Transmit ring frames.
const TX_FRAMES: u32 = 256;
/// Where packet data starts in a TPACKET_V2 TX frame:
/// TPACKET2_HDRLEN - sizeof(struct sockaddr_ll).
const TX_DATA: usize = 32;

// struct tpacket_block_desc / tpacket_hdr_v1 offsets.
const BLK_STATUS: usize = 8;
const BLK_NUM_PKTS: usize = 12;
const BLK_FIRST: usize = 16;
// struct tpacket3_hdr offsets.
const P3_NEXT: usize = 0;
const P3_SNAPLEN: usize = 12;
const P3_MAC: usize = 24;
/// Smallest tpacket3_hdr the kernel writes (up to tp_mac and tp_net).
const P3_MIN: usize = 28;
// struct tpacket2_hdr offsets.
const P2_STATUS: usize = 0;
const P2_LEN: usize = 4;

#[repr(C)]
struct TpacketReq3 {
    block_size: u32,
    block_nr: u32,
    frame_size: u32,
    frame_nr: u32,
    retire_blk_tov: u32,
    sizeof_priv: u32,
    feature_req_word: u32,
}

#[repr(C)]
struct TpacketReq {
    block_size: u32,
    block_nr: u32,
    frame_size: u32,
    frame_nr: u32,
}

/// A ring the kernel maps for one socket.
struct RingMap {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value and used by one thread at a time.
unsafe impl Send for RingMap {}

impl RingMap {
    fn map(fd: RawFd, len: usize) -> io::Result<RingMap> {
        // SAFETY: maps the packet ring of our own socket; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(RingMap {
            base: p.cast(),
            len,
        })
    }

    /// The status-like u32 at `off`, shared with the kernel.
    #[inline]
    fn word(&self, off: usize) -> &AtomicU32 {
        assert!(off + 4 <= self.len && off.is_multiple_of(4));
        // SAFETY: inside the mapping and aligned (checked); an atomic
        // tolerates the kernel's concurrent writes.
        unsafe { &*self.base.add(off).cast::<AtomicU32>() }
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn setopt<T>(fd: RawFd, opt: i32, v: &T) -> io::Result<()> {
    // SAFETY: passes a pointer to a local of its own size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            SOL_PACKET,
            opt,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn packet_socket(protocol: u16) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2), checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            i32::from(protocol.to_be()),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: RawFd, link: &Link, protocol: u16) -> io::Result<()> {
    // SAFETY: zero is valid for every field of sockaddr_ll.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = protocol.to_be();
    sa.sll_ifindex = link.index as i32;
    // SAFETY: bind reads the local address of the given size.
    let r = unsafe {
        libc::bind(
            fd,
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct RxRing {
    // The map before the socket: unmapped, then closed.
    map: RingMap,
    sock: OwnedFd,
    block: u32,
    /// Within the current block: packets done and the next one's offset.
    done: u32,
    next: usize,
}

struct TxRing {
    map: RingMap,
    sock: OwnedFd,
    frame_size: usize,
    cursor: u32,
}

pub struct PacketPort {
    rx: Option<RxRing>,
    tx: Option<TxRing>,
    ends: Ends,
    pool: PoolView,
    spare: Vec<BufferIndex>,
    rx_batch: Vec<BufferHandle>,
    tx_hand: Vec<BufferHandle>,
    counters: Arc<NicCounters>,
    steps: u32,
}

impl PacketPort {
    /// On failure the buffers come back.
    pub fn open(
        link: &Link,
        cfg: &NicConfig,
        pool: PoolView,
        ends: Ends,
        buffers: Vec<BufferIndex>,
        counters: Arc<NicCounters>,
    ) -> Result<PacketPort, (NicError, Vec<BufferIndex>)> {
        let ifname = cfg.ifname.as_str();
        if cfg.queue != 0 {
            return Err((
                NicError::Os {
                    ifname: ifname.into(),
                    what: "mode=packet",
                    source: io::Error::other(format!(
                        "AF_PACKET sees the whole interface, not queue {}: queue= applies to mode=xdp",
                        cfg.queue
                    )),
                },
                buffers,
            ));
        }
        let need = 2 * BURST;
        if buffers.len() < need {
            return Err((
                NicError::TooFewBuffers {
                    ifname: ifname.into(),
                    need,
                    given: buffers.len(),
                },
                buffers,
            ));
        }
        let max = pool.layout().max_packet() as usize;
        let err = |what: &'static str| {
            move |source: io::Error| {
                if source.raw_os_error() == Some(libc::EPERM) {
                    NicError::NotRoot {
                        ifname: ifname.into(),
                        what: "AF_PACKET",
                        bpf: false,
                    }
                } else {
                    NicError::Os {
                        ifname: ifname.into(),
                        what,
                        source,
                    }
                }
            }
        };
        let rx = if ends.ingress.is_some() {
            match open_rx(link).map_err(err("opening the AF_PACKET receive ring")) {
                Ok(r) => Some(r),
                Err(e) => return Err((e, buffers)),
            }
        } else {
            None
        };
        let tx = if ends.egress.is_some() {
            match open_tx(link, max).map_err(err("opening the AF_PACKET transmit ring")) {
                Ok(t) => Some(t),
                Err(e) => return Err((e, buffers)),
            }
        } else {
            None
        };
        counters.set_mode(MODE_PACKET, false);
        let mut spare = buffers;
        let tx_hand = if tx.is_some() {
            spare
                .drain(spare.len() - BURST..)
                // SAFETY: the port's own buffers, each handed out once.
                .map(|b| unsafe { BufferHandle::from_raw(b, 0) })
                .collect()
        } else {
            Vec::new()
        };
        Ok(PacketPort {
            rx,
            tx,
            ends,
            pool,
            spare,
            rx_batch: Vec::with_capacity(BURST),
            tx_hand,
            counters,
            steps: 0,
        })
    }

    fn receive(&mut self) -> usize {
        let Some(rx) = self.rx.as_mut() else { return 0 };
        let max = self.pool.layout().max_packet() as usize;
        let (mut too_long, mut bad) = (0u64, 0u64);
        let mut bytes = 0u64;
        // Stop before taking a packet off the ring when there is no buffer
        // to copy it into: it stays in the kernel's block until one is back
        // (taking it first lost it without a count).
        while self.rx_batch.len() < BURST && !self.spare.is_empty() {
            let blk = rx.block as usize * RX_BLOCK as usize;
            let status = rx.map.word(blk + BLK_STATUS);
            if status.load(Ordering::Acquire) & TP_STATUS_USER == 0 {
                break;
            }
            let num = rx.map.word(blk + BLK_NUM_PKTS).load(Ordering::Relaxed);
            if rx.done == 0 {
                rx.next = rx.map.word(blk + BLK_FIRST).load(Ordering::Relaxed) as usize;
            }
            if rx.done >= num {
                // Block finished: back to the kernel, on to the next one.
                status.store(TP_STATUS_KERNEL, Ordering::Release);
                rx.block = (rx.block + 1) % RX_BLOCKS;
                rx.done = 0;
                continue;
            }
            let off = rx.next;
            let limit = RX_BLOCK as usize;
            if off < BLK_FIRST || off + P3_MIN > limit || !off.is_multiple_of(4) {
                // A broken block: give it back whole.
                bad += 1;
                rx.done = num;
                continue;
            }
            let hdr = blk + off;
            let next = rx.map.word(hdr + P3_NEXT).load(Ordering::Relaxed) as usize;
            let snaplen = rx.map.word(hdr + P3_SNAPLEN).load(Ordering::Relaxed) as usize;
            let mac = (rx.map.word(hdr + P3_MAC).load(Ordering::Relaxed) & 0xffff) as usize;
            rx.done += 1;
            rx.next = off + next;
            if next == 0 {
                rx.done = num;
            }
            if off + mac + snaplen > limit || snaplen == 0 {
                bad += 1;
                continue;
            }
            if snaplen > max {
                too_long += 1;
                continue;
            }
            // Never empty here: the loop runs only while a spare is left.
            let Some(b) = self.spare.pop() else { break };
            // SAFETY: popped off the port's spares: ours, named by no handle.
            let mut h = unsafe { BufferHandle::from_raw(b, 0) };
            // SAFETY: the block is ours (status USER) until we store KERNEL;
            // the range was checked to lie inside it.
            let data = unsafe {
                std::slice::from_raw_parts(rx.map.base.add(hdr + mac).cast_const(), snaplen)
            };
            // The packet fits (snaplen <= max_packet), so fill cannot fail.
            let _ = self.pool.packet_mut(&mut h).fill(data);
            bytes += snaplen as u64;
            self.rx_batch.push(h);
        }
        let c = &self.counters;
        bump(&c.drop_too_long, too_long);
        bump(&c.bad_descs, bad);
        let n = self.rx_batch.len();
        if n == 0 {
            return 0;
        }
        let sent = self
            .ends
            .ingress
            .as_mut()
            .map_or(0, |p| p.send_burst(&mut self.rx_batch));
        let mut sent_bytes = bytes;
        for h in &self.rx_batch[sent..] {
            sent_bytes -= u64::from(h.len());
        }
        bump(&c.drop_queue_full, (n - sent) as u64);
        bump(&c.rx_packets, sent as u64);
        bump(&c.rx_bytes, sent_bytes);
        bump(&c.rx_copied, sent as u64);
        self.spare
            .extend(self.rx_batch.drain(..).map(|h| h.index()));
        n
    }

    /// Frames free for sending from the cursor on (at most `want`).
    fn free_frames(tx: &TxRing, want: usize, errors: &mut u64) -> usize {
        let mut n = 0;
        while n < want && n < TX_FRAMES as usize {
            let f = ((tx.cursor as usize + n) % TX_FRAMES as usize) * tx.frame_size;
            let st = tx.map.word(f + P2_STATUS);
            match st.load(Ordering::Acquire) {
                TP_STATUS_AVAILABLE => n += 1,
                TP_STATUS_WRONG_FORMAT => {
                    *errors += 1;
                    st.store(TP_STATUS_AVAILABLE, Ordering::Release);
                    n += 1;
                }
                _ => break,
            }
        }
        n
    }

    fn transmit(&mut self) -> usize {
        let (Some(tx), Some(egress)) = (self.tx.as_mut(), self.ends.egress.as_mut()) else {
            return 0;
        };
        let mut errors = 0;
        let free = Self::free_frames(tx, BURST, &mut errors);
        let mut n = 0;
        if free > 0 {
            n = egress.recv_burst(&mut self.tx_hand[..free]);
        }
        let mut bytes = 0u64;
        let cap = tx.frame_size - TX_DATA;
        for h in &mut self.tx_hand[..n] {
            let f = (tx.cursor % TX_FRAMES) as usize * tx.frame_size;
            let p = self.pool.packet(h);
            let len = p.len().min(cap);
            // SAFETY: the frame is AVAILABLE, so the kernel does not read or
            // write its data until we set SEND_REQUEST below; the range lies
            // inside the frame.
            let out = unsafe { std::slice::from_raw_parts_mut(tx.map.base.add(f + TX_DATA), len) };
            p.read_at(0, out);
            tx.map.word(f + P2_LEN).store(len as u32, Ordering::Relaxed);
            tx.map
                .word(f + P2_STATUS)
                .store(TP_STATUS_SEND_REQUEST, Ordering::Release);
            bytes += len as u64;
            tx.cursor = tx.cursor.wrapping_add(1);
            // Copied out: the buffer is an empty of ours again.
            let idx = h.index();
            // SAFETY: the handle keeps its own buffer.
            unsafe { h.replace(idx, 0) };
        }
        if n > 0 {
            // SAFETY: a send of no bytes on our socket: it sends the frames
            // marked SEND_REQUEST, without waiting for them.
            let r = unsafe {
                libc::sendto(
                    tx.sock.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if r < 0 {
                errors += 1;
            }
        }
        let c = &self.counters;
        bump(&c.tx_packets, n as u64);
        bump(&c.tx_bytes, bytes);
        bump(&c.tx_copied, n as u64);
        bump(&c.tx_errors, errors);
        n
    }

    /// The kernel's drop count (reading it resets it: accumulate).
    fn read_kernel_stats(&mut self) {
        let Some(rx) = self.rx.as_ref() else { return };
        let mut st = [0u32; 3];
        let mut len = std::mem::size_of_val(&st) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into our array.
        let r = unsafe {
            libc::getsockopt(
                rx.sock.as_raw_fd(),
                SOL_PACKET,
                PACKET_STATISTICS,
                st.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r == 0 {
            bump(&self.counters.drop_kernel_ring_full, u64::from(st[1]));
        }
    }

    pub fn step(&mut self) -> usize {
        let n = self.receive() + self.transmit();
        self.steps = self.steps.wrapping_add(1);
        if self.steps.is_multiple_of(4096) {
            self.read_kernel_stats();
        }
        n
    }

    pub fn arm(&mut self) -> Arm {
        self.read_kernel_stats();
        if let Some(rx) = self.rx.as_ref() {
            let blk = rx.block as usize * RX_BLOCK as usize;
            if rx.map.word(blk + BLK_STATUS).load(Ordering::Acquire) & TP_STATUS_USER != 0 {
                return Arm::Busy;
            }
        }
        if self.ends.egress.as_mut().is_some_and(|c| c.arm()) {
            let mut e = 0;
            let free = self
                .tx
                .as_ref()
                .map_or(0, |t| Self::free_frames(t, 1, &mut e));
            // No free frame: they free as the kernel sends; look again soon.
            return if free > 0 {
                Arm::Busy
            } else {
                Arm::SleepAtMost(Duration::from_millis(1))
            };
        }
        Arm::Sleep
    }

    pub fn disarm(&mut self) {
        if let Some(c) = self.ends.egress.as_mut() {
            c.disarm();
        }
    }

    pub fn wake_fds(&self) -> Vec<RawFd> {
        let mut v = self.ends.bells.clone();
        if let Some(rx) = &self.rx {
            v.push(rx.sock.as_raw_fd());
        }
        v
    }

    pub fn held(&self) -> Vec<BufferIndex> {
        let mut v = self.spare.clone();
        v.extend(self.tx_hand.iter().map(|h| h.index()));
        v
    }

    pub fn stop(self: Box<Self>) -> Vec<BufferIndex> {
        // The rings hold copies only: every buffer is in our hands.
        let v = self.held();
        drop(self);
        v
    }
}

fn open_rx(link: &Link) -> io::Result<RxRing> {
    let sock = packet_socket(ETH_P_ALL)?;
    let fd = sock.as_raw_fd();
    setopt(fd, PACKET_VERSION, &TPACKET_V3)?;
    // Our own transmissions (and the host's) are not what arrived.
    setopt(fd, PACKET_IGNORE_OUTGOING, &1i32)?;
    let req = TpacketReq3 {
        block_size: RX_BLOCK,
        block_nr: RX_BLOCKS,
        frame_size: 2048,
        frame_nr: RX_BLOCK / 2048 * RX_BLOCKS,
        retire_blk_tov: RX_RETIRE_MS,
        sizeof_priv: 0,
        feature_req_word: 0,
    };
    setopt(fd, PACKET_RX_RING, &req)?;
    let map = RingMap::map(fd, (RX_BLOCK * RX_BLOCKS) as usize)?;
    bind(fd, link, ETH_P_ALL)?;
    Ok(RxRing {
        map,
        sock,
        block: 0,
        done: 0,
        next: 0,
    })
}

fn open_tx(link: &Link, max_packet: usize) -> io::Result<TxRing> {
    // Protocol 0: this socket receives nothing.
    let sock = packet_socket(0)?;
    let fd = sock.as_raw_fd();
    setopt(fd, PACKET_VERSION, &TPACKET_V2)?;
    setopt(fd, PACKET_QDISC_BYPASS, &1i32)?;
    let frame_size = (TX_DATA + max_packet).next_power_of_two().max(2048);
    let block_size = frame_size.max(4096);
    let per_block = block_size / frame_size;
    let req = TpacketReq {
        block_size: block_size as u32,
        block_nr: TX_FRAMES / per_block as u32,
        frame_size: frame_size as u32,
        frame_nr: TX_FRAMES,
    };
    setopt(fd, PACKET_TX_RING, &req)?;
    let map = RingMap::map(fd, frame_size * TX_FRAMES as usize)?;
    bind(fd, link, 0)?;
    Ok(TxRing {
        map,
        sock,
        frame_size,
        cursor: 0,
    })
}
