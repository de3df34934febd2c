//! Host to guest: packets from cluster queue `rx` into the guest's RX
//! virtqueue, by exchanging pool buffers (pool descriptors) or by copying
//! (everything else, with mergeable RX buffers).

use super::virtq::PoolCtx;
use super::virtq::{RingError, MAX_CHAIN};
use super::{ExportPort, RXQ};
use std::ptr;
use zc_proto::buffer::VIRTIO_NET_HDR_LEN;

const HDR: usize = VIRTIO_NET_HDR_LEN as usize;
/// Offset of num_buffers in struct virtio_net_hdr_mrg_rxbuf.
const NUM_BUFFERS: usize = 10;

/// Outcome of trying to place one packet.
enum Placed {
    /// Delivered using this many avail entries.
    Done { heads: u16 },
    /// The guest has not made enough buffers available yet, but it still
    /// can (it has descriptors that are not posted).
    Wait,
    /// Too big for one chain without MRG_RXBUF: dropped, no entry consumed.
    TooBig,
    /// With MRG_RXBUF, more than the guest's buffers can ever hold at once
    /// (every descriptor of its ring posted and still short), or more than
    /// MAX_CHAIN buffers: dropped, no entry consumed.
    NoRoom,
    /// A chain was invalid: `heads` entries returned empty; the packet
    /// waits for the next ones.
    Skipped { heads: u16 },
}

impl ExportPort {
    pub fn rx_step(&mut self) -> Result<usize, RingError> {
        let Some(end) = self.rx_end.as_mut() else {
            return Ok(0);
        };
        if self.dev.as_ref().is_none_or(|d| d.queues[RXQ].is_none()) {
            return Ok(0);
        }
        if self.rx_pos == self.rx_have {
            let n = end.recv_burst(&mut self.rx_hand);
            self.rx_pos = 0;
            self.rx_have = n;
            if n == 0 {
                return Ok(0);
            }
        }
        let q = self
            .dev
            .as_ref()
            .and_then(|d| d.queues[RXQ].as_ref())
            .expect("checked");
        let avail = q.pending()?;
        // The avail index this step saw: a packet that waits needs the guest
        // to post beyond it, and only a kick saying so is worth waking for.
        let seen = q.next_avail.wrapping_add(avail);
        self.rx_wait = None;
        let mut taken: u16 = 0;
        let mut moved = 0;
        while self.rx_pos < self.rx_have && taken < avail {
            let len = self.rx_hand[self.rx_pos].len();
            let placed = self.place(taken, avail)?;
            // Whatever happened but a skip or a wait, the hand's buffer at
            // rx_pos is now empty (delivered, exchanged for the guest's, or
            // dropped).
            match placed {
                Placed::Skipped { heads } => {
                    taken += heads;
                    moved += 1;
                    self.rx_stats.invalid_desc += 1;
                    continue;
                }
                Placed::Wait => {
                    self.rx_wait = Some(seen);
                    break;
                }
                Placed::Done { heads } => {
                    taken += heads;
                    self.rx_stats.packets += 1;
                    self.rx_stats.bytes += u64::from(len);
                }
                Placed::TooBig => self.rx_stats.drop_too_big += 1,
                Placed::NoRoom => self.rx_stats.drop_no_room += 1,
            }
            let i = self.rx_hand[self.rx_pos].index();
            // SAFETY: the handle keeps its buffer (now empty).
            unsafe { self.rx_hand[self.rx_pos].replace(i, 0) };
            self.rx_pos += 1;
            moved += 1;
        }
        // Counters first, so that whoever sees the packets sees them counted.
        self.publish();
        let q = self
            .dev
            .as_mut()
            .and_then(|d| d.queues[RXQ].as_mut())
            .expect("checked");
        q.complete(taken, taken);
        if taken > 0 && self.wants_interrupt(RXQ) {
            self.rx_stats.interrupts += 1;
            self.publish();
            self.signal(RXQ);
        }
        Ok(moved)
    }

    /// Places packet `rx_hand[rx_pos]` into the avail entries from `first`.
    fn place(&mut self, first: u16, avail: u16) -> Result<Placed, RingError> {
        let pkt_len = self.rx_hand[self.rx_pos].len() as usize;
        let need = HDR + pkt_len;
        let pkt_idx = self.rx_hand[self.rx_pos].index();
        let pkt_off = self
            .layout
            .packet_offset(pkt_idx)
            .expect("handles from the rings are checked");
        let pool = PoolCtx {
            layout: self.layout,
            base: self.pool_base,
            owners: &self.owners,
            slot: self.shared.slot,
        };
        let dev = self.dev.as_ref().expect("checked");
        let q = dev.queues[RXQ].as_ref().expect("checked");
        let head = q.head(first)?;
        let walked = q.walk(head, true, &dev.map, &pool, &mut self.chain);
        if walked.is_err() {
            q.put_used(first, head, 0);
            return Ok(Placed::Skipped { heads: 1 });
        }
        // Zero-copy: the guest offers one of its pool buffers; give it the
        // buffer holding the packet instead.
        if let Some(empty) = self.chain.pool_buffer() {
            if (need as u64) <= self.chain.total && pool.exchange(q, &dev.map, head, empty, pkt_idx)
            {
                let mut hdr = [0u8; HDR];
                hdr[NUM_BUFFERS] = 1;
                // SAFETY: the 12 header bytes sit in the packet buffer's
                // headroom (HEADROOM >= 12), inside the pool mapping. The
                // guest reads them only after the used entry is published.
                unsafe {
                    ptr::copy_nonoverlapping(hdr.as_ptr(), pool.host(pkt_off - HDR as u64), HDR)
                };
                q.put_used(first, head, need as u32);
                // SAFETY: the exchange passed `empty` from the guest to this
                // export (owner table) and the packet's buffer to the guest.
                unsafe { self.rx_hand[self.rx_pos].replace(empty, 0) };
                self.rx_stats.exchanged += 1;
                return Ok(Placed::Done { heads: 1 });
            }
        }
        // Copy path: the header, then the packet, across as many chains as
        // it takes (more than one only with MRG_RXBUF).
        let mrg = dev.mrg_rxbuf;
        if !mrg && self.chain.total < need as u64 {
            return Ok(Placed::TooBig);
        }
        let mut hdr = [0u8; HDR];
        hdr[NUM_BUFFERS] = 1;
        let src = pool.host(pkt_off);
        let mut num_ptrs: [*mut u8; 2] = [ptr::null_mut(); 2];
        let mut done = 0usize; // bytes of header + packet written
        let mut heads: u16 = 0;
        let mut lens = [0u32; MAX_CHAIN];
        // Descriptors in the chains walked for this packet.
        let mut descs = self.chain.n;
        loop {
            // Write into the chain now in self.chain.
            let mut written = 0u32;
            for s in &self.chain.segs[..self.chain.n] {
                let mut at = 0usize;
                let seg_len = s.len as usize;
                while at < seg_len && done < need {
                    let n = if done < HDR {
                        let n = (HDR - done).min(seg_len - at);
                        for k in 0..n {
                            let pos = done + k;
                            // SAFETY: at + k < seg_len: inside the checked segment.
                            let dst = unsafe { s.host.add(at + k) };
                            if pos == NUM_BUFFERS || pos == NUM_BUFFERS + 1 {
                                num_ptrs[pos - NUM_BUFFERS] = dst;
                            }
                            // SAFETY: as above.
                            unsafe { ptr::write_volatile(dst, hdr[pos]) };
                        }
                        n
                    } else {
                        let n = (need - done).min(seg_len - at);
                        // SAFETY: source: done - HDR + n <= pkt_len bytes of the
                        // packet buffer; destination: at + n <= seg_len inside
                        // the checked segment; guest memory and pool buffer
                        // do not overlap (a pool segment is a different,
                        // guest-held buffer).
                        unsafe { ptr::copy_nonoverlapping(src.add(done - HDR), s.host.add(at), n) };
                        n
                    };
                    at += n;
                    done += n;
                    written += n as u32;
                }
                if done == need {
                    break;
                }
            }
            lens[usize::from(heads)] = written;
            heads += 1;
            if done == need {
                break;
            }
            // Needs another chain.
            let next = first + heads;
            if !mrg || usize::from(heads) == MAX_CHAIN {
                // Nothing is consumed: the chains written so far stay the
                // guest's, for the packets behind this one.
                return Ok(Placed::NoRoom);
            }
            if next >= avail {
                // Every chain the guest posted is taken. If they hold every
                // descriptor of its ring, it cannot post more until some come
                // back, and none will while this packet blocks the ring.
                if first == 0 && descs >= usize::from(q.size()) {
                    return Ok(Placed::NoRoom);
                }
                return Ok(Placed::Wait);
            }
            let h = q.head(next)?;
            if q.walk(h, true, &dev.map, &pool, &mut self.chain).is_err() {
                for k in 0..=heads {
                    let h = q.head(first + k)?;
                    q.put_used(first + k, h, 0);
                }
                return Ok(Placed::Skipped { heads: heads + 1 });
            }
            descs += self.chain.n;
        }
        if heads > 1 {
            let nb = heads.to_le_bytes();
            for (p, b) in num_ptrs.iter().zip(nb) {
                if !p.is_null() {
                    // SAFETY: recorded above from inside a checked segment.
                    unsafe { ptr::write_volatile(*p, b) };
                }
            }
        }
        for k in 0..heads {
            let h = q.head(first + k)?;
            q.put_used(first + k, h, lens[usize::from(k)]);
        }
        self.rx_stats.copied += 1;
        Ok(Placed::Done { heads })
    }
}
