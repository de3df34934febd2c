//! Which queue of a group a packet goes to: a symmetric flow hash.
//!
//! Both directions of a flow must land in the same queue (an IDS, a flow
//! meter want the whole conversation), so the two endpoints are put in a
//! fixed order before hashing: the lower one first, comparing the address
//! bytes and then the port. The rules, as `zc-hostd --help` states them:
//!
//! - VLAN and QinQ tags (0x8100, 0x88a8, 0x9100) are skipped.
//! - `ip`: the source and destination IPv4 or IPv6 addresses.
//! - `5tuple`: the endpoints (address and port) of TCP, UDP, SCTP and
//!   UDP-Lite, then the protocol; other protocols: the addresses and the
//!   protocol. IPv6 extension headers (hop-by-hop, routing, destination
//!   options, fragment, AH) are walked to find the protocol.
//! - What a packet lacks is left out: fragments after the first (no ports)
//!   go by their addresses alone, as `ip`; non-IP frames, and IP headers
//!   cut short, by their two Ethernet addresses (in the same fixed order).
//!
//! The hash is 32-bit FNV-1a over those bytes, in that order (lower
//! endpoint's address, its port big-endian, higher endpoint's address and
//! port, protocol), and the queue is the hash modulo the group's size: a
//! definition anyone can recompute (the tests do, on their own).

/// How a balancer picks the queue within a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hash {
    /// Round-robin within each group.
    Rr,
    /// Symmetric hash of the IP addresses.
    Ip,
    /// Symmetric hash of addresses, ports and protocol.
    #[serde(rename = "5tuple")]
    FiveTuple,
    /// Every queue of every group gets every packet.
    Fanout,
}

impl Hash {
    pub fn as_str(self) -> &'static str {
        match self {
            Hash::Rr => "rr",
            Hash::Ip => "ip",
            Hash::FiveTuple => "5tuple",
            Hash::Fanout => "fanout",
        }
    }
}

/// Bytes of a packet the hash looks at: enough for two VLAN tags, an IPv6
/// header with a few extension headers and the ports.
pub const HEADER_BYTES: usize = 128;

const FNV_OFFSET: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

#[inline(always)]
fn fnv(mut h: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// Protocols whose first four bytes are the source and destination ports.
fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132 | 136)
}

/// Where the network header starts and its EtherType, past VLAN tags.
fn network(frame: &[u8]) -> Option<(usize, u16)> {
    let mut at = 12;
    for _ in 0..=8 {
        let t = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
        if matches!(t, 0x8100 | 0x88a8 | 0x9100) {
            at += 4;
            continue;
        }
        return Some((at + 2, t));
    }
    None
}

/// The endpoints and protocol of an IP packet, as far as it has them.
struct Flow<'a> {
    src: &'a [u8],
    dst: &'a [u8],
    /// None: a fragment after the first (the protocol header is elsewhere).
    proto: Option<u8>,
    /// The four port bytes, when the protocol has them and they are here.
    ports: Option<&'a [u8]>,
}

fn ipv4(p: &[u8]) -> Option<Flow<'_>> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let later = u16::from_be_bytes([p[6], p[7]]) & 0x1fff != 0;
    let proto = p[9];
    let (src, dst) = (&p[12..16], &p[16..20]);
    if later {
        return Some(Flow {
            src,
            dst,
            proto: None,
            ports: None,
        });
    }
    let ports = (ihl >= 20 && has_ports(proto))
        .then(|| p.get(ihl..ihl.checked_add(4)?))
        .flatten();
    Some(Flow {
        src,
        dst,
        proto: Some(proto),
        ports,
    })
}

fn ipv6(p: &[u8]) -> Option<Flow<'_>> {
    if p.len() < 40 || p[0] >> 4 != 6 {
        return None;
    }
    let (src, dst) = (&p[8..24], &p[24..40]);
    let mut next = p[6];
    let mut at = 40usize;
    // A bounded walk: the header bytes copied are few anyway.
    for _ in 0..8 {
        let len = match next {
            0 | 43 | 60 => usize::from(*p.get(at + 1)?) * 8 + 8,
            44 => {
                let off = u16::from_be_bytes([*p.get(at + 2)?, *p.get(at + 3)?]) >> 3;
                if off != 0 {
                    return Some(Flow {
                        src,
                        dst,
                        proto: None,
                        ports: None,
                    });
                }
                8
            }
            51 => (usize::from(*p.get(at + 1)?) + 2) * 4,
            _ => break,
        };
        match p.get(at) {
            Some(&n) => next = n,
            None => break,
        }
        at += len;
    }
    let ports = has_ports(next)
        .then(|| p.get(at..at.checked_add(4)?))
        .flatten();
    Some(Flow {
        src,
        dst,
        proto: Some(next),
        ports,
    })
}

/// The symmetric hash of `frame` (its first bytes suffice: see
/// [`HEADER_BYTES`]) under `hash` (`Ip` or `FiveTuple`; the others do not
/// look at packets and hash as `Ip`).
pub fn flow_hash(frame: &[u8], hash: Hash) -> u32 {
    let flow = network(frame).and_then(|(at, t)| {
        let p = &frame[at.min(frame.len())..];
        match t {
            0x0800 => ipv4(p),
            0x86dd => ipv6(p),
            _ => None,
        }
    });
    let Some(f) = flow else {
        // Not IP, or cut short: the Ethernet addresses.
        if frame.len() < 12 {
            return fnv(FNV_OFFSET, frame);
        }
        let (a, b) = (&frame[6..12], &frame[0..6]);
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        return fnv(fnv(FNV_OFFSET, lo), hi);
    };
    let empty: &[u8] = &[];
    let (sp, dp) = match (hash, f.ports) {
        (Hash::FiveTuple, Some(p)) => (&p[0..2], &p[2..4]),
        _ => (empty, empty),
    };
    let (lo, hi) = if (f.src, sp) <= (f.dst, dp) {
        ((f.src, sp), (f.dst, dp))
    } else {
        ((f.dst, dp), (f.src, sp))
    };
    let mut h = fnv(fnv(FNV_OFFSET, lo.0), lo.1);
    h = fnv(fnv(h, hi.0), hi.1);
    match (hash, f.proto) {
        (Hash::FiveTuple, Some(proto)) => fnv(h, &[proto]),
        _ => h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(t: u16, vlans: &[u16]) -> Vec<u8> {
        let mut f = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1];
        for &v in vlans {
            f.extend_from_slice(&v.to_be_bytes());
            f.extend_from_slice(&[0, 7]);
        }
        f.extend_from_slice(&t.to_be_bytes());
        f
    }

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, sp: u16, dp: u16, frag: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 1];
        p.extend_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&[64, proto, 0, 0]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&sp.to_be_bytes());
        p.extend_from_slice(&dp.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    fn v6(src: [u8; 16], dst: [u8; 16], ext: &[u8], proto: u8, sp: u16, dp: u16) -> Vec<u8> {
        let first = if ext.is_empty() { proto } else { ext[0] };
        let mut p = vec![0x60, 0, 0, 0, 0, 20, first, 64];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        // `ext`: [first header type, then each header's bytes], built by callers.
        p.extend_from_slice(ext.get(1..).unwrap_or(&[]));
        p.extend_from_slice(&sp.to_be_bytes());
        p.extend_from_slice(&dp.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        p
    }

    fn frame(head: Vec<u8>, body: Vec<u8>) -> Vec<u8> {
        [head, body].concat()
    }

    /// FNV-1a as written in the module's documentation, over explicit bytes.
    fn fnv_of(parts: &[&[u8]]) -> u32 {
        parts.iter().fold(FNV_OFFSET, |h, p| fnv(h, p))
    }

    #[test]
    fn both_directions_hash_alike_and_the_bytes_are_the_documented_ones() {
        let (a, b) = ([10, 0, 0, 9], [10, 0, 0, 2]);
        let fwd = frame(eth(0x0800, &[]), v4(a, b, 17, 5000, 53, 0x4000));
        let back = frame(eth(0x0800, &[]), v4(b, a, 17, 53, 5000, 0));
        for h in [Hash::Ip, Hash::FiveTuple] {
            assert_eq!(flow_hash(&fwd, h), flow_hash(&back, h), "{h:?}");
        }
        // Lower endpoint (10.0.0.2:53) first, then 10.0.0.9:5000, then UDP.
        assert_eq!(
            flow_hash(&fwd, Hash::FiveTuple),
            fnv_of(&[&b, &53u16.to_be_bytes(), &a, &5000u16.to_be_bytes(), &[17]])
        );
        assert_eq!(flow_hash(&fwd, Hash::Ip), fnv_of(&[&b, &a]));
        // Ports matter to 5tuple only.
        let other = frame(eth(0x0800, &[]), v4(a, b, 17, 5001, 53, 0));
        assert_eq!(flow_hash(&fwd, Hash::Ip), flow_hash(&other, Hash::Ip));
        assert_ne!(
            flow_hash(&fwd, Hash::FiveTuple),
            flow_hash(&other, Hash::FiveTuple)
        );
        // The same address with two ports orders by port.
        let same = frame(eth(0x0800, &[]), v4(a, a, 6, 80, 79, 0));
        assert_eq!(
            flow_hash(&same, Hash::FiveTuple),
            fnv_of(&[&a, &79u16.to_be_bytes(), &a, &80u16.to_be_bytes(), &[6]])
        );
    }

    #[test]
    fn vlan_and_qinq_tags_are_skipped() {
        let body = v4([1, 2, 3, 4], [5, 6, 7, 8], 6, 1, 2, 0);
        let plain = flow_hash(&frame(eth(0x0800, &[]), body.clone()), Hash::FiveTuple);
        let vlan = flow_hash(
            &frame(eth(0x0800, &[0x8100]), body.clone()),
            Hash::FiveTuple,
        );
        let qinq = flow_hash(
            &frame(eth(0x0800, &[0x88a8, 0x8100]), body),
            Hash::FiveTuple,
        );
        assert_eq!(plain, vlan);
        assert_eq!(plain, qinq);
    }

    #[test]
    fn later_fragments_go_by_addresses_and_other_protocols_by_addresses_and_protocol() {
        let (a, b) = ([192, 0, 2, 1], [192, 0, 2, 200]);
        // Offset 185 (x 8 bytes): a later fragment, whatever its bytes say.
        let later = frame(eth(0x0800, &[]), v4(a, b, 17, 1234, 80, 0x2000 | 185));
        assert_eq!(flow_hash(&later, Hash::FiveTuple), fnv_of(&[&a, &b]));
        // ICMP: no ports, but the protocol.
        let icmp = frame(eth(0x0800, &[]), v4(b, a, 1, 0x0800, 0, 0));
        assert_eq!(flow_hash(&icmp, Hash::FiveTuple), fnv_of(&[&a, &b, &[1]]));
        // A first fragment (MF set, offset 0) has its ports.
        let first = frame(eth(0x0800, &[]), v4(a, b, 17, 1234, 80, 0x2000));
        assert_eq!(
            flow_hash(&first, Hash::FiveTuple),
            fnv_of(&[&a, &1234u16.to_be_bytes(), &b, &80u16.to_be_bytes(), &[17]])
        );
    }

    #[test]
    fn ipv6_walks_extension_headers_and_hashes_symmetrically() {
        let mut a = [0u8; 16];
        a[0] = 0x20;
        a[15] = 1;
        let mut b = a;
        b[15] = 2;
        let fwd = frame(eth(0x86dd, &[]), v6(a, b, &[], 17, 4000, 443));
        let back = frame(eth(0x86dd, &[0x8100]), v6(b, a, &[], 17, 443, 4000));
        assert_eq!(
            flow_hash(&fwd, Hash::FiveTuple),
            flow_hash(&back, Hash::FiveTuple)
        );
        assert_eq!(
            flow_hash(&fwd, Hash::FiveTuple),
            fnv_of(&[&a, &4000u16.to_be_bytes(), &b, &443u16.to_be_bytes(), &[17]])
        );
        // Hop-by-hop (8 bytes, next: fragment), fragment offset 0 (next: UDP).
        let ext = [0u8, 44, 0, 0, 0, 0, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0, 0];
        let with_ext = frame(eth(0x86dd, &[]), v6(a, b, &ext, 17, 4000, 443));
        assert_eq!(
            flow_hash(&with_ext, Hash::FiveTuple),
            flow_hash(&fwd, Hash::FiveTuple)
        );
        // A later fragment: the addresses only.
        let ext = [44u8, 17, 0, 0x05, 0x39, 0, 0, 0, 1];
        let later = frame(eth(0x86dd, &[]), v6(a, b, &ext, 17, 9, 9));
        assert_eq!(flow_hash(&later, Hash::FiveTuple), fnv_of(&[&a, &b]));
        assert_eq!(flow_hash(&later, Hash::Ip), fnv_of(&[&a, &b]));
    }

    #[test]
    fn non_ip_and_cut_frames_go_by_their_ethernet_addresses() {
        let arp = [eth(0x0806, &[]), vec![0; 28]].concat();
        let mut reply = arp.clone();
        reply[0..6].copy_from_slice(&arp[6..12]);
        reply[6..12].copy_from_slice(&arp[0..6]);
        assert_eq!(flow_hash(&arp, Hash::Ip), flow_hash(&reply, Hash::Ip));
        assert_eq!(
            flow_hash(&arp, Hash::FiveTuple),
            fnv_of(&[&arp[6..12], &arp[0..6]])
        );
        // An IPv4 header cut short is not trusted for addresses.
        let cut = [eth(0x0800, &[]), vec![0x45, 0, 0]].concat();
        assert_eq!(
            flow_hash(&cut, Hash::FiveTuple),
            fnv_of(&[&cut[6..12], &cut[0..6]])
        );
        // Runts and garbage never panic.
        for n in 0..40 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37) as u8).collect();
            flow_hash(&junk, Hash::FiveTuple);
            let mut v = eth(0x86dd, &[0x8100, 0x8100, 0x8100]);
            v.extend_from_slice(&junk);
            flow_hash(&v, Hash::FiveTuple);
        }
    }
}
