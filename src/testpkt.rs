//! The packets zsend writes and zcount --verify checks.
//!
//! ```text
//! 0   Ethernet  dst ff:ff:ff:ff:ff:ff  src 02:7a:63:00:00:01  type IPv4
//! 14  IPv4      198.18.0.1 -> 198.18.0.2 (RFC 2544 benchmark range), UDP
//! 34  UDP       port 9 -> 9 (discard), checksum 0 (none, allowed for IPv4)
//! 42  seq       u64 little-endian, 0, 1, 2, ...
//! 50  csum      u32 little-endian: base(len) + low32(seq) + high32(seq)
//! 54  pattern   byte i of the packet = i * 31 + 7 (mod 256)
//! ```
//!
//! `base(len)` is a position-weighted sum over the pattern, so zsend updates
//! the checksum with two additions per packet and zcount detects changed,
//! moved or truncated bytes.

use zc_proto::{PacketMut, PacketRef};

pub const MIN_LEN: usize = 60;
pub const SEQ_OFFSET: usize = 42;
pub const CSUM_OFFSET: usize = 50;
pub const PATTERN_OFFSET: usize = 54;
/// Bytes compared to decide whether a buffer already holds the template.
const STAMP_CHECK: usize = 24;

#[inline(always)]
fn pattern_byte(i: usize) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(7)
}

fn weighted(bytes: impl Iterator<Item = (usize, u8)>) -> u32 {
    bytes.fold(0u32, |acc, (i, b)| {
        acc.wrapping_add(u32::from(b).wrapping_mul(i as u32 + 1))
    })
}

#[inline(always)]
fn seq_sum(base: u32, seq: u64) -> u32 {
    base.wrapping_add(seq as u32)
        .wrapping_add((seq >> 32) as u32)
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A packet of one length, built once; stamping it costs a seq write and a
/// checksum write when the buffer already holds the template.
pub struct Template {
    bytes: Vec<u8>,
    base: u32,
}

impl Template {
    /// `len` must be at least [`MIN_LEN`]; callers check the upper bound
    /// against the pool's buffer size.
    pub fn new(len: usize) -> Template {
        assert!(len >= MIN_LEN, "packet length {len} below {MIN_LEN}");
        let mut b = vec![0u8; len];
        b[0..6].copy_from_slice(&[0xff; 6]);
        b[6..12].copy_from_slice(&[0x02, 0x7a, 0x63, 0, 0, 1]);
        b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip_len = (len - 14) as u16;
        b[14] = 0x45;
        b[16..18].copy_from_slice(&ip_len.to_be_bytes());
        b[20..22].copy_from_slice(&0x4000u16.to_be_bytes());
        b[22] = 64;
        b[23] = 17;
        b[26..30].copy_from_slice(&[198, 18, 0, 1]);
        b[30..34].copy_from_slice(&[198, 18, 0, 2]);
        let csum = ipv4_checksum(&b[14..34]);
        b[24..26].copy_from_slice(&csum.to_be_bytes());
        b[34..36].copy_from_slice(&9u16.to_be_bytes());
        b[36..38].copy_from_slice(&9u16.to_be_bytes());
        b[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
        for (i, x) in b.iter_mut().enumerate().skip(PATTERN_OFFSET) {
            *x = pattern_byte(i);
        }
        let base = weighted((PATTERN_OFFSET..len).map(|i| (i, pattern_byte(i))));
        Template { bytes: b, base }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The full packet with sequence number `seq` (for tests and copies).
    pub fn packet(&self, seq: u64) -> Vec<u8> {
        let mut p = self.bytes.clone();
        p[SEQ_OFFSET..SEQ_OFFSET + 8].copy_from_slice(&seq.to_le_bytes());
        p[CSUM_OFFSET..CSUM_OFFSET + 4].copy_from_slice(&seq_sum(self.base, seq).to_le_bytes());
        p
    }

    /// Makes the buffer hold packet `seq`. A buffer that came back from a
    /// consumer usually still holds this template (consumers that only read
    /// leave it alone), so the body is rewritten only when its head differs.
    #[inline(always)]
    pub fn stamp(&self, p: &mut PacketMut<'_>, seq: u64) {
        let mut head = [0u8; STAMP_CHECK];
        for (i, chunk) in head.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&p.read_u64_le(i * 8).unwrap_or(0).to_le_bytes());
        }
        // Capacity was checked against the template length at start-up, so
        // these writes cannot fail; the results carry nothing to act on.
        if head != self.bytes[..STAMP_CHECK] {
            let _ = p.write_at(0, &self.bytes);
        }
        let _ = p.write_u64_le(SEQ_OFFSET, seq);
        let _ = p.write_u32_le(CSUM_OFFSET, seq_sum(self.base, seq));
        let _ = p.set_len(self.bytes.len());
    }
}

/// One flow of `zsend --flows`: two UDP endpoints in 10.0.0.0/8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowAddrs {
    pub a: [u8; 4],
    pub a_port: u16,
    pub b: [u8; 4],
    pub b_port: u16,
}

/// SplitMix64: a small, well-mixed generator, so `--seed` gives the same
/// flows on every machine and in every version.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The flows of `zsend --flows N --seed S`, and which one packet `seq`
/// belongs to: packets go in pairs, flow 0 forward then back, flow 1
/// forward then back, ..., then flow 0 again, so any 2N consecutive
/// packets carry both directions of every flow.
#[derive(Clone, Debug)]
pub struct Flows {
    list: Vec<FlowAddrs>,
}

impl Flows {
    /// `n` distinct flows (no two share both endpoints, in either order)
    /// from `seed`.
    pub fn new(n: usize, seed: u64) -> Flows {
        let mut state = seed;
        let mut seen = std::collections::HashSet::new();
        let mut list = Vec::with_capacity(n);
        while list.len() < n {
            let x = splitmix(&mut state);
            let y = splitmix(&mut state);
            let f = FlowAddrs {
                a: [10, (x >> 8) as u8, (x >> 16) as u8, (x >> 24) as u8],
                a_port: 1024 + ((x >> 32) as u16 % 64512),
                b: [10, (y >> 8) as u8, (y >> 16) as u8, (y >> 24) as u8],
                b_port: 1024 + ((y >> 32) as u16 % 64512),
            };
            let (fwd, back) = (
                (f.a, f.a_port, f.b, f.b_port),
                (f.b, f.b_port, f.a, f.a_port),
            );
            if (f.a, f.a_port) != (f.b, f.b_port) && !seen.contains(&back) && seen.insert(fwd) {
                list.push(f);
            }
        }
        Flows { list }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn get(&self, i: usize) -> FlowAddrs {
        self.list[i]
    }

    /// The flow of packet `seq` and whether it goes back (b to a).
    #[inline(always)]
    pub fn of(&self, seq: u64) -> (usize, bool) {
        let n = self.list.len() as u64;
        (((seq / 2) % n) as usize, seq % 2 == 1)
    }

    /// Source and destination (address, port) of packet `seq`.
    #[inline(always)]
    pub fn endpoints(&self, seq: u64) -> (([u8; 4], u16), ([u8; 4], u16)) {
        let (i, back) = self.of(seq);
        let f = &self.list[i];
        if back {
            ((f.b, f.b_port), (f.a, f.a_port))
        } else {
            ((f.a, f.a_port), (f.b, f.b_port))
        }
    }
}

impl Template {
    /// As [`Template::stamp`], then gives the packet the addresses and ports
    /// of packet `seq` of `flows` (and a matching IPv4 header checksum).
    #[inline(always)]
    pub fn stamp_flow(&self, p: &mut PacketMut<'_>, seq: u64, flows: &Flows) {
        self.stamp(p, seq);
        let ((src, sport), (dst, dport)) = flows.endpoints(seq);
        let mut h = [0u8; 20];
        h.copy_from_slice(&self.bytes[14..34]);
        h[10..12].copy_from_slice(&[0, 0]);
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        let csum = ipv4_checksum(&h);
        let mut w = [0u8; 16];
        w[0..2].copy_from_slice(&csum.to_be_bytes());
        w[2..6].copy_from_slice(&src);
        w[6..10].copy_from_slice(&dst);
        w[10..12].copy_from_slice(&sport.to_be_bytes());
        w[12..14].copy_from_slice(&dport.to_be_bytes());
        // Bytes 38..40 (UDP length) stay the template's.
        w[14..16].copy_from_slice(&self.bytes[38..40]);
        // Capacity was checked at start-up (as in `stamp`).
        let _ = p.write_at(24, &w);
    }
}

/// A flow as zcount tells flows apart: protocol and both endpoints
/// (address, port), in the direction of the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub proto: u8,
    pub src: ([u8; 16], u16),
    pub dst: ([u8; 16], u16),
}

impl FlowKey {
    /// The same key whichever way the packet went.
    pub fn both_ways(self) -> FlowKey {
        if self.src <= self.dst {
            self
        } else {
            FlowKey {
                proto: self.proto,
                src: self.dst,
                dst: self.src,
            }
        }
    }
}

/// The flow of an Ethernet frame carrying IPv4 or IPv6 (VLAN tags skipped;
/// ports for TCP, UDP, SCTP and UDP-Lite, 0 otherwise), or None.
pub fn flow_of(p: &PacketRef<'_>) -> Option<FlowKey> {
    let mut b = [0u8; 128];
    let n = p.read_at(0, &mut b);
    let b = &b[..n];
    let mut at = 12;
    let mut t = u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]);
    while matches!(t, 0x8100 | 0x88a8 | 0x9100) {
        at += 4;
        t = u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]);
    }
    let ip = b.get(at + 2..)?;
    let addr = |s: &[u8]| {
        let mut a = [0u8; 16];
        a[..s.len()].copy_from_slice(s);
        a
    };
    let (proto, src, dst, l4) = match t {
        0x0800 if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let later = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0;
            let l4 = if later { None } else { ip.get(ihl..) };
            (ip[9], addr(&ip[12..16]), addr(&ip[16..20]), l4)
        }
        0x86dd if ip.len() >= 40 => (ip[6], addr(&ip[8..24]), addr(&ip[24..40]), ip.get(40..)),
        _ => return None,
    };
    let ports = match (proto, l4) {
        (6 | 17 | 132 | 136, Some(l)) if l.len() >= 4 => (
            u16::from_be_bytes([l[0], l[1]]),
            u16::from_be_bytes([l[2], l[3]]),
        ),
        _ => (0, 0),
    };
    Some(FlowKey {
        proto,
        src: (src, ports.0),
        dst: (dst, ports.1),
    })
}

/// What `verify` found wrong with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Defect {
    TooShort,
    Checksum,
}

/// Checks a received packet; returns its sequence number.
pub fn verify(p: &PacketRef<'_>) -> Result<u64, Defect> {
    let len = p.len();
    if len < MIN_LEN {
        return Err(Defect::TooShort);
    }
    let seq = p.read_u64_le(SEQ_OFFSET).ok_or(Defect::TooShort)?;
    let csum = p.read_u32_le(CSUM_OFFSET).ok_or(Defect::TooShort)?;
    let mut body = [0u8; 2048];
    let mut sum = 0u32;
    let mut off = PATTERN_OFFSET;
    while off < len {
        let n = p.read_at(off, &mut body);
        sum = sum.wrapping_add(weighted(
            body[..n].iter().enumerate().map(|(i, &b)| (off + i, b)),
        ));
        off += n;
    }
    if seq_sum(sum, seq) != csum {
        return Err(Defect::Checksum);
    }
    Ok(seq)
}

/// Sequence checking as zcount does it: each packet should carry the number
/// after the previous one; a gap or repeat is one error and resynchronises.
#[derive(Debug, Default)]
pub struct SeqTracker {
    next: Option<u64>,
    pub errors: u64,
}

impl SeqTracker {
    #[inline]
    pub fn observe(&mut self, seq: u64) {
        if let Some(n) = self.next {
            if n != seq {
                self.errors += 1;
            }
        }
        self.next = Some(seq.wrapping_add(1));
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
    fn headers_are_valid_ethernet_ipv4_udp() {
        let p = Template::new(64).packet(0);
        assert_eq!(&p[12..14], &[0x08, 0x00]);
        assert_eq!(
            ipv4_checksum(&p[14..34]),
            0,
            "IPv4 header checksum verifies"
        );
        assert_eq!(u16::from_be_bytes([p[16], p[17]]), 50);
        assert_eq!(u16::from_be_bytes([p[38], p[39]]), 30);
        assert_eq!(p[23], 17);
    }

    #[test]
    fn stamped_packets_verify_and_corruption_is_caught() {
        let (_mem, pool) = pool();
        for len in [60, 64, 1500, 2048 - zc_proto::buffer::HEADROOM as usize] {
            let t = Template::new(len);
            // SAFETY: the only handle to buffer 1 of this test's pool.
            let mut h = unsafe { BufferHandle::from_raw(BufferIndex::new(1), 0) };
            for seq in [0u64, 1, u64::from(u32::MAX) + 5] {
                t.stamp(&mut pool.packet_mut(&mut h), seq);
                assert_eq!(h.len() as usize, len);
                assert_eq!(verify(&pool.packet(&h)), Ok(seq));
                assert_eq!(pool.packet(&h).to_vec(), t.packet(seq));
            }
            // Flip one payload byte: the checksum catches it.
            let last = len - 1;
            let old = pool.packet(&h).to_vec()[last];
            pool.packet_mut(&mut h)
                .write_at(last, &[old ^ 0x40])
                .unwrap();
            assert_eq!(verify(&pool.packet(&h)), Err(Defect::Checksum));
            // A buffer holding a different length's template is rewritten whole.
            let t2 = Template::new(if len == 60 { 100 } else { 60 });
            t2.stamp(&mut pool.packet_mut(&mut h), 9);
            assert_eq!(verify(&pool.packet(&h)), Ok(9));
        }
        // SAFETY: the only handle to buffer 2 of this test's pool.
        let mut h = unsafe { BufferHandle::from_raw(BufferIndex::new(2), 0) };
        pool.packet_mut(&mut h).fill(&[0u8; 59]).unwrap();
        assert_eq!(verify(&pool.packet(&h)), Err(Defect::TooShort));
    }

    #[test]
    fn flows_are_seeded_distinct_and_go_both_ways() {
        let f = Flows::new(1024, 7);
        assert_eq!(f.len(), 1024);
        let again = Flows::new(1024, 7);
        assert_eq!(
            (0..1024).map(|i| f.get(i)).collect::<Vec<_>>(),
            (0..1024).map(|i| again.get(i)).collect::<Vec<_>>(),
            "the same seed gives the same flows"
        );
        assert_ne!(Flows::new(4, 8).get(0), f.get(0));
        let (_mem, pool) = pool();
        let t = Template::new(64);
        // SAFETY: the only handle to buffer 1 of this test's pool.
        let mut h = unsafe { BufferHandle::from_raw(BufferIndex::new(1), 0) };
        let mut directed = std::collections::HashSet::new();
        let mut undirected = std::collections::HashSet::new();
        for seq in 0..2048u64 {
            t.stamp_flow(&mut pool.packet_mut(&mut h), seq, &f);
            let p = pool.packet(&h);
            assert_eq!(verify(&p), Ok(seq), "the payload still verifies");
            let bytes = p.to_vec();
            assert_eq!(ipv4_checksum(&bytes[14..34]), 0, "a valid IPv4 header");
            let k = flow_of(&p).unwrap();
            assert_eq!(k.proto, 17);
            let ((src, sp), (dst, dp)) = f.endpoints(seq);
            assert_eq!(&k.src.0[..4], &src);
            assert_eq!((k.src.1, k.dst.1), (sp, dp));
            assert_eq!(&k.dst.0[..4], &dst);
            directed.insert(k);
            undirected.insert(k.both_ways());
        }
        assert_eq!(undirected.len(), 1024);
        assert_eq!(directed.len(), 2048, "both directions of every flow");
    }

    #[test]
    fn sequence_gaps_and_repeats_count_once_each() {
        let mut s = SeqTracker::default();
        for seq in [5, 6, 7, 9, 10, 10, 11] {
            s.observe(seq);
        }
        assert_eq!(s.errors, 2);
    }
}
