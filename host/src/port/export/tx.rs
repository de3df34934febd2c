//! Guest to host: what the guest transmits, into cluster queue `tx`, by
//! exchanging pool buffers or by copying the chain into an empty pool
//! buffer. An export without `tx` is a sink: it counts and drops every
//! packet, and still exchanges a pool buffer for an empty one from its hand
//! (the guest's full buffer becomes an empty of the hand: consumed).

use super::virtq::PoolCtx;
use super::virtq::RingError;
use super::{ExportPort, BURST, TXQ};
use std::ptr;
use zc_proto::buffer::VIRTIO_NET_HDR_LEN;
use zc_proto::BufferHandle;

const HDR: u64 = VIRTIO_NET_HDR_LEN as u64;

impl ExportPort {
    /// Sends what waits in tx_pending; true when nothing is left.
    pub(super) fn flush_tx(&mut self) -> bool {
        if let Some(p) = self.tx_end.as_mut() {
            if !self.tx_pending.is_empty() {
                let n = p.send_burst(&mut self.tx_pending);
                self.tx_empties.extend(self.tx_pending.drain(..n));
            }
        }
        self.tx_pending.is_empty()
    }

    pub fn tx_step(&mut self) -> Result<usize, RingError> {
        // Back-pressure: while the cluster queue is full, leave the guest's
        // packets in its ring. What was taken already goes out even when the
        // ring has stopped since (the guest completed and left).
        if !self.flush_tx() {
            return Ok(0);
        }
        if self.dev.as_ref().is_none_or(|d| d.queues[TXQ].is_none()) {
            return Ok(0);
        }
        let pool = PoolCtx {
            layout: self.layout,
            base: self.pool_base,
            owners: &self.owners,
            slot: self.shared.slot,
        };
        let max = u64::from(self.layout.max_packet());
        let dev = self.dev.as_ref().expect("checked");
        let q = dev.queues[TXQ].as_ref().expect("checked");
        let avail = q.pending()?.min(BURST as u16);
        if avail == 0 {
            return Ok(0);
        }
        q.prefetch_pending(avail);
        let has_queue = self.tx_end.is_some();
        for k in 0..avail {
            let head = q.head(k)?;
            q.put_used(k, head, 0);
            if q.walk(head, false, &dev.map, &pool, &mut self.chain)
                .is_err()
            {
                self.tx_stats.invalid_desc += 1;
                continue;
            }
            let total = self.chain.total;
            if total <= HDR || total - HDR > max {
                self.tx_stats.drop_bad_len += 1;
                continue;
            }
            let len = total - HDR;
            self.tx_stats.packets += 1;
            self.tx_stats.bytes += len;
            if !has_queue {
                // No cluster queue to pass the packet to: the export itself
                // is the consumer. It takes a pool buffer as the contract
                // says (the guest gets an empty one back) and drops the
                // packet; anything else is only counted and dropped. The
                // hand turns as a ring, so a buffer goes back to the guest
                // only after BURST others.
                self.tx_stats.drop_no_queue += 1;
                let n = self.tx_empties.len();
                let Some(full) = self.chain.pool_buffer().filter(|_| n > 0) else {
                    continue;
                };
                let turn = if self.tx_turn < n { self.tx_turn } else { 0 };
                let empty = self.tx_empties[turn].index();
                if !pool.exchange(q, &dev.map, head, full, empty) {
                    continue;
                }
                // SAFETY: the exchange passed `full` from the guest to this
                // export, and the empty this slot named to the guest.
                self.tx_empties[turn] = unsafe { BufferHandle::from_raw(full, 0) };
                self.tx_turn = turn + 1;
                self.tx_stats.exchanged += 1;
                continue;
            }
            let Some(mut empty) = self.tx_empties.pop() else {
                // Cannot happen: BURST empties while nothing is pending.
                self.tx_stats.drop_no_queue += 1;
                continue;
            };
            let empty_off = self
                .layout
                .packet_offset(empty.index())
                .expect("hand buffers are valid");
            // Zero-copy: take the guest's buffer, give it an empty one.
            if let Some(full) = self.chain.pool_buffer() {
                if pool.exchange(q, &dev.map, head, full, empty.index()) {
                    // SAFETY: the exchange passed `full` from the guest to
                    // this export; the empty went to the guest (and is
                    // dropped from the hand here).
                    self.tx_pending
                        .push(unsafe { BufferHandle::from_raw(full, len as u32) });
                    self.tx_stats.exchanged += 1;
                    continue;
                }
            }
            // Copy path: skip the 12-byte header, gather the rest.
            let dst = pool.host(empty_off);
            let mut skip = HDR;
            let mut at = 0usize;
            for s in &self.chain.segs[..self.chain.n] {
                let l = u64::from(s.len);
                if skip >= l {
                    skip -= l;
                    continue;
                }
                let n = (l - skip) as usize;
                // SAFETY: source: [skip, l) of a checked segment; destination:
                // at + n <= len <= max_packet bytes of an empty buffer we hold.
                unsafe { ptr::copy_nonoverlapping(s.host.add(skip as usize), dst.add(at), n) };
                at += n;
                skip = 0;
            }
            // SAFETY: the handle keeps its buffer, now holding the packet.
            unsafe { empty.replace(empty.index(), len as u32) };
            self.tx_pending.push(empty);
            self.tx_stats.copied += 1;
        }
        // Counters first, so that whoever sees the packets sees them counted.
        self.publish();
        let q = self
            .dev
            .as_mut()
            .and_then(|d| d.queues[TXQ].as_mut())
            .expect("checked");
        q.complete(avail, avail);
        if self.wants_interrupt(TXQ) {
            self.tx_stats.interrupts += 1;
            self.publish();
            self.signal(TXQ);
        }
        self.flush_tx();
        Ok(usize::from(avail))
    }
}
