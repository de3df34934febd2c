//! zping's probes: what a probe carries, the reflector's MAC swap, and the
//! bookkeeping of which probes came back.
//!
//! ```text
//! 0   Ethernet  dst 02:7a:70:00:00:02 (the far side)  src 02:7a:70:00:00:01  type IPv4
//! 14  IPv4      198.18.0.1 -> 198.18.0.2 (RFC 2544 benchmark range), UDP
//! 34  UDP       port 7 -> 7 (echo), checksum 0 (none, allowed for IPv4)
//! 42  seq       u64 little-endian, 0, 1, 2, ...
//! 50  sent      u64 little-endian: CLOCK_MONOTONIC nanoseconds when sent
//! 58  tag       u32 little-endian: this run's id mixed with seq and sent
//! 62  pattern   as zsend's (byte i = i * 31 + 7), not checked
//! ```
//!
//! A reply is the probe with its MAC addresses swapped. The tag tells this
//! run's probes from another run's (a reflector may still hold those) and
//! from altered ones.

use crate::testpkt::Template;
use std::collections::VecDeque;
use zc_proto::{BufferIndex, PacketMut, PacketRef};

pub const MIN_LEN: usize = 62;
const SEQ: usize = 42;
const SENT: usize = 50;
const TAG: usize = 58;
/// zping's own MAC, and the one it sends to.
pub const SRC_MAC: [u8; 6] = [0x02, 0x7a, 0x70, 0, 0, 1];
pub const DST_MAC: [u8; 6] = [0x02, 0x7a, 0x70, 0, 0, 2];
const ECHO_PORT: u16 = 7;
/// Bytes compared to decide whether a buffer already holds the probe head.
const HEAD: usize = 40;

/// CLOCK_MONOTONIC in nanoseconds (the vDSO: no system call).
#[inline(always)]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

#[inline(always)]
fn tag(run: u32, seq: u64, sent: u64) -> u32 {
    // A multiplicative mix: every bit of seq and sent moves the tag.
    let x = (seq ^ sent.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    run ^ (x >> 32) as u32
}

/// Probes of one length for one run.
pub struct Probe {
    bytes: Vec<u8>,
    run: u32,
}

/// What a received packet was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// This run's probe `seq`, sent at `sent` ns, reflected.
    Probe { seq: u64, sent: u64 },
    /// Not a reflected probe of this run.
    Bad,
}

impl Probe {
    /// `len` must be at least [`MIN_LEN`]; callers check the upper bound.
    pub fn new(len: usize, run: u32) -> Probe {
        assert!(len >= MIN_LEN, "probe length {len} below {MIN_LEN}");
        let mut bytes = Template::new(len).packet(0);
        bytes[0..6].copy_from_slice(&DST_MAC);
        bytes[6..12].copy_from_slice(&SRC_MAC);
        bytes[34..36].copy_from_slice(&ECHO_PORT.to_be_bytes());
        bytes[36..38].copy_from_slice(&ECHO_PORT.to_be_bytes());
        bytes[SEQ..TAG + 4].fill(0);
        Probe { bytes, run }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Makes the buffer hold probe `seq` sent at `sent`. The whole probe
    /// is written only when the buffer's head differs (a buffer that went
    /// out as a probe and came back keeps its body).
    #[inline(always)]
    pub fn stamp(&self, p: &mut PacketMut<'_>, seq: u64, sent: u64) {
        let mut head = [0u8; HEAD];
        for (i, chunk) in head.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&p.read_u64_le(i * 8).unwrap_or(0).to_le_bytes());
        }
        // Capacity was checked against the probe length at start-up, so
        // these writes cannot fail.
        if head != self.bytes[..HEAD] {
            let _ = p.write_at(0, &self.bytes);
        }
        let _ = p.write_u64_le(SEQ, seq);
        let _ = p.write_u64_le(SENT, sent);
        let _ = p.write_u32_le(TAG, tag(self.run, seq, sent));
        let _ = p.set_len(self.bytes.len());
    }

    /// Reads a reply: this run's probe, as long as sent, MACs swapped.
    #[inline(always)]
    pub fn parse(&self, p: &PacketRef<'_>) -> Reply {
        if p.len() != self.bytes.len() {
            return Reply::Bad;
        }
        let mut macs = [0u8; 12];
        p.read_at(0, &mut macs);
        if macs[..6] != SRC_MAC || macs[6..] != DST_MAC {
            return Reply::Bad;
        }
        match (p.read_u64_le(SEQ), p.read_u64_le(SENT), p.read_u32_le(TAG)) {
            (Some(seq), Some(sent), Some(t)) if t == tag(self.run, seq, sent) => {
                Reply::Probe { seq, sent }
            }
            _ => Reply::Bad,
        }
    }

    /// The probe as bytes (tests).
    pub fn packet(&self, seq: u64, sent: u64) -> Vec<u8> {
        let mut b = self.bytes.clone();
        b[SEQ..SEQ + 8].copy_from_slice(&seq.to_le_bytes());
        b[SENT..SENT + 8].copy_from_slice(&sent.to_le_bytes());
        b[TAG..TAG + 4].copy_from_slice(&tag(self.run, seq, sent).to_le_bytes());
        b
    }
}

/// Which probes are out, back, or given up on. A probe is lost when no
/// reply came within the timeout; a reply after that is late (and stays
/// lost). Probes are tracked in a window of sequence numbers; one older
/// than the window is given up on early.
pub struct Outstanding {
    /// Bit set: probe sent, not yet settled.
    bits: Vec<u64>,
    /// The buffer each probe left in.
    bufs: Vec<u32>,
    mask: u64,
    /// Next sequence number to send.
    sent: u64,
    /// Probes below this are settled (received or lost).
    settled: u64,
    /// (time, sent count then), at most one per millisecond: every probe
    /// below the count was sent at or before the time.
    marks: VecDeque<(u64, u64)>,
    pub received: u64,
    pub lost: u64,
    pub late: u64,
    pub duplicates: u64,
    /// Replies naming a probe never sent (only a corrupt tag could).
    pub bogus: u64,
}

/// Marks closer together than this are merged.
const MARK_NS: u64 = 1_000_000;

impl Outstanding {
    /// A window of at least `window` probes (a power of two at least 4096).
    pub fn new(window: u64) -> Self {
        let w = window.clamp(4096, 1 << 30).next_power_of_two();
        Outstanding {
            bits: vec![0; (w / 64) as usize],
            bufs: vec![0; w as usize],
            mask: w - 1,
            sent: 0,
            settled: 0,
            marks: VecDeque::new(),
            received: 0,
            lost: 0,
            late: 0,
            duplicates: 0,
            bogus: 0,
        }
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Probes neither received nor lost yet.
    pub fn in_flight(&self) -> u64 {
        self.sent - self.settled
    }

    #[inline(always)]
    fn slot(&self, seq: u64) -> (usize, u64) {
        let i = seq & self.mask;
        ((i / 64) as usize, 1 << (i % 64))
    }

    /// Settles `seq` (the oldest unsettled probe) as lost if still out.
    fn give_up_oldest(&mut self) {
        let (w, m) = self.slot(self.settled);
        if self.bits[w] & m != 0 {
            self.bits[w] &= !m;
            self.lost += 1;
        }
        self.settled += 1;
    }

    /// The next probes went out at `now`, in these buffers.
    #[inline]
    pub fn on_sent(&mut self, bufs: &[BufferIndex], now: u64) {
        for b in bufs {
            if self.sent - self.settled > self.mask {
                self.give_up_oldest();
            }
            let (w, m) = self.slot(self.sent);
            self.bits[w] |= m;
            self.bufs[(self.sent & self.mask) as usize] = b.get();
            self.sent += 1;
        }
        match self.marks.back_mut() {
            Some(last) if now.saturating_sub(last.0) < MARK_NS => last.1 = self.sent,
            _ => self.marks.push_back((now, self.sent)),
        }
    }

    /// A reply to probe `seq` arrived. If it counts as received: the
    /// buffer the probe left in.
    #[inline]
    pub fn on_reply(&mut self, seq: u64) -> Option<BufferIndex> {
        if seq >= self.sent {
            self.bogus += 1;
            return None;
        }
        if seq < self.settled {
            self.late += 1;
            return None;
        }
        let (w, m) = self.slot(seq);
        if self.bits[w] & m == 0 {
            self.duplicates += 1;
            return None;
        }
        self.bits[w] &= !m;
        self.received += 1;
        // Settle the prefix that is back, so the window stays short.
        while self.settled < self.sent {
            let (w, m) = self.slot(self.settled);
            if self.bits[w] & m != 0 {
                break;
            }
            self.settled += 1;
        }
        Some(BufferIndex::new(self.bufs[(seq & self.mask) as usize]))
    }

    /// Gives up on every probe sent at or before `before`.
    pub fn expire(&mut self, before: u64) {
        while let Some(&(t, upto)) = self.marks.front() {
            if t > before {
                break;
            }
            self.marks.pop_front();
            while self.settled < upto {
                self.give_up_oldest();
            }
        }
    }

    /// Gives up on everything still out.
    pub fn finish(&mut self) {
        self.marks.clear();
        while self.settled < self.sent {
            self.give_up_oldest();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zc_proto::{BufferHandle, BufferIndex, PoolLayout, PoolView};

    fn pool() -> (Vec<u8>, PoolView) {
        let layout = PoolLayout::new(1, 2048, 4).unwrap();
        let mut mem = vec![0u8; layout.pool_size as usize];
        // SAFETY: `mem` is returned alongside the view and outlives its uses.
        let view = unsafe { PoolView::new(mem.as_mut_ptr(), layout) };
        (mem, view)
    }

    #[test]
    fn a_reflected_probe_parses_and_anything_else_is_bad() {
        let (_mem, pool) = pool();
        let probe = Probe::new(64, 0xfeed);
        // SAFETY: the only handle to buffer 1 of this test's pool.
        let mut h = unsafe { BufferHandle::from_raw(BufferIndex::new(1), 0) };
        probe.stamp(&mut pool.packet_mut(&mut h), 7, 123_456_789);
        assert_eq!(pool.packet(&h).to_vec(), probe.packet(7, 123_456_789));
        // Unreflected, it is not a reply.
        assert_eq!(probe.parse(&pool.packet(&h)), Reply::Bad);
        assert!(pool.packet_mut(&mut h).swap_macs());
        let bytes = pool.packet(&h).to_vec();
        assert_eq!(&bytes[0..6], &SRC_MAC);
        assert_eq!(&bytes[6..12], &DST_MAC);
        assert_eq!(&bytes[12..], &probe.packet(7, 123_456_789)[12..]);
        assert_eq!(
            probe.parse(&pool.packet(&h)),
            Reply::Probe {
                seq: 7,
                sent: 123_456_789
            }
        );
        // Another run's probe, a changed timestamp, a different length.
        assert_eq!(Probe::new(64, 0xbeef).parse(&pool.packet(&h)), Reply::Bad);
        assert_eq!(Probe::new(65, 0xfeed).parse(&pool.packet(&h)), Reply::Bad);
        pool.packet_mut(&mut h)
            .write_u64_le(SENT, 123_456_788)
            .unwrap();
        assert_eq!(probe.parse(&pool.packet(&h)), Reply::Bad);
        // A buffer holding the reply is stamped back into a probe.
        probe.stamp(&mut pool.packet_mut(&mut h), 8, 5);
        assert_eq!(pool.packet(&h).to_vec(), probe.packet(8, 5));
    }

    #[test]
    fn swapping_leaves_runts_alone() {
        let (_mem, pool) = pool();
        // SAFETY: the only handle to buffer 2 of this test's pool.
        let mut h = unsafe { BufferHandle::from_raw(BufferIndex::new(2), 0) };
        pool.packet_mut(&mut h)
            .fill(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
            .unwrap();
        assert!(!pool.packet_mut(&mut h).swap_macs());
        assert_eq!(
            pool.packet(&h).to_vec(),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
        );
        let p: Vec<u8> = (1..=14).collect();
        pool.packet_mut(&mut h).fill(&p).unwrap();
        assert!(pool.packet_mut(&mut h).swap_macs());
        assert_eq!(
            pool.packet(&h).to_vec(),
            [7, 8, 9, 10, 11, 12, 1, 2, 3, 4, 5, 6, 13, 14]
        );
    }

    fn bufs(n: u32) -> Vec<BufferIndex> {
        (100..100 + n).map(BufferIndex::new).collect()
    }

    #[test]
    fn counts_received_lost_late_and_duplicates() {
        let mut o = Outstanding::new(0);
        o.on_sent(&bufs(3), 1_000);
        assert_eq!(o.on_reply(1), Some(BufferIndex::new(101)));
        assert_eq!(o.on_reply(1), None, "a duplicate");
        assert_eq!(o.on_reply(3), None, "never sent");
        assert_eq!(o.on_reply(0), Some(BufferIndex::new(100)));
        assert_eq!(o.in_flight(), 1);
        o.on_sent(&bufs(2), 5_000_000);
        // Everything sent by 2 ms is given up: probe 2.
        o.expire(2_000_000);
        assert_eq!(o.lost, 1);
        assert_eq!(o.on_reply(2), None, "late");
        assert_eq!(o.on_reply(4), Some(BufferIndex::new(101)));
        o.finish();
        assert_eq!(
            (o.received, o.lost, o.late, o.duplicates, o.bogus),
            (3, 2, 1, 1, 1)
        );
        assert_eq!(o.sent(), 5);
        assert_eq!(o.received + o.lost, o.sent());
    }

    #[test]
    fn a_full_window_gives_up_the_oldest_probe() {
        let mut o = Outstanding::new(4096);
        o.on_sent(&bufs(4096), 0);
        assert_eq!(o.lost, 0);
        o.on_sent(&[BufferIndex::new(7)], 0);
        assert_eq!(o.lost, 1);
        assert_eq!(o.on_reply(0), None, "given up: late");
        assert_eq!(
            o.on_reply(4096),
            Some(BufferIndex::new(7)),
            "the newest has its own slot"
        );
        assert_eq!(o.on_reply(1), Some(BufferIndex::new(101)));
    }
}
