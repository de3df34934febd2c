//! An interface port's counters: written by the port's worker with plain
//! relaxed stores of its own totals, read by anyone (`stats`, tests).

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// One interface port as `zc-hostd stats` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicStats {
    /// `xdp` or `packet`.
    pub mode: String,
    /// AF_XDP bound in zero-copy mode (the driver DMAs into pool buffers).
    pub zero_copy: bool,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Packets that crossed without any copy, and those copied (by the
    /// kernel in AF_XDP copy mode, by zc in AF_PACKET mode or to move data
    /// to the pool's packet offset).
    pub rx_zero_copy: u64,
    pub rx_copied: u64,
    pub tx_zero_copy: u64,
    pub tx_copied: u64,
    /// Received frames moved inside their buffer to the packet offset.
    pub rx_realigned: u64,
    /// Dropped by the kernel: its ring towards zc was full.
    pub drop_kernel_ring_full: u64,
    /// Dropped by the kernel: no empty buffer on the fill ring.
    pub drop_fill_ring_empty: u64,
    /// Dropped by zc: the ingress cluster queue was full.
    pub drop_queue_full: u64,
    /// Dropped by zc: longer than a pool buffer holds.
    pub drop_too_long: u64,
    /// Descriptors from the kernel that named no buffer the port lent it
    /// (never expected; counted, the buffer is not trusted).
    pub bad_descs: u64,
    /// Sends the kernel refused.
    pub tx_errors: u64,
}

#[derive(Default)]
pub struct NicCounters {
    mode: AtomicU8,
    zero_copy: AtomicU8,
    pub(super) rx_packets: AtomicU64,
    pub(super) rx_bytes: AtomicU64,
    pub(super) tx_packets: AtomicU64,
    pub(super) tx_bytes: AtomicU64,
    pub(super) rx_copied: AtomicU64,
    pub(super) tx_copied: AtomicU64,
    pub(super) rx_realigned: AtomicU64,
    pub(super) drop_kernel_ring_full: AtomicU64,
    pub(super) drop_fill_ring_empty: AtomicU64,
    pub(super) drop_queue_full: AtomicU64,
    pub(super) drop_too_long: AtomicU64,
    /// The kernel's count of frames longer than a chunk (AF_XDP), kept
    /// apart because the kernel's totals are stored, not added.
    pub(super) kernel_too_long: AtomicU64,
    pub(super) bad_descs: AtomicU64,
    pub(super) tx_errors: AtomicU64,
}

pub(super) const MODE_XDP: u8 = 1;
pub(super) const MODE_PACKET: u8 = 2;

/// Adds to a counter only its owner writes: a load and a store, no locked
/// read-modify-write on the data path.
#[inline(always)]
pub(super) fn bump(c: &AtomicU64, n: u64) {
    if n != 0 {
        c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }
}

impl NicCounters {
    pub(super) fn set_mode(&self, mode: u8, zero_copy: bool) {
        self.mode.store(mode, Ordering::Relaxed);
        self.zero_copy.store(u8::from(zero_copy), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> NicStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let rx_packets = r(&self.rx_packets);
        let tx_packets = r(&self.tx_packets);
        let rx_copied = r(&self.rx_copied).min(rx_packets);
        let tx_copied = r(&self.tx_copied).min(tx_packets);
        NicStats {
            mode: match self.mode.load(Ordering::Relaxed) {
                MODE_XDP => "xdp",
                MODE_PACKET => "packet",
                _ => "none",
            }
            .into(),
            zero_copy: self.zero_copy.load(Ordering::Relaxed) != 0,
            rx_packets,
            rx_bytes: r(&self.rx_bytes),
            tx_packets,
            tx_bytes: r(&self.tx_bytes),
            rx_zero_copy: rx_packets - rx_copied,
            rx_copied,
            tx_zero_copy: tx_packets - tx_copied,
            tx_copied,
            rx_realigned: r(&self.rx_realigned),
            drop_kernel_ring_full: r(&self.drop_kernel_ring_full),
            drop_fill_ring_empty: r(&self.drop_fill_ring_empty),
            drop_queue_full: r(&self.drop_queue_full),
            drop_too_long: r(&self.drop_too_long) + r(&self.kernel_too_long),
            bad_descs: r(&self.bad_descs),
            tx_errors: r(&self.tx_errors),
        }
    }
}

/// One running interface port in `zc-hostd stats`: what it serves, where
/// it runs, and its counters (flattened into the same JSON object).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicPortStats {
    /// `nic:<ifname>@<queue>`, as `move` and `nic del` name it.
    pub name: String,
    pub ifname: String,
    /// The interface's hardware receive queue.
    pub queue: u32,
    /// Cluster queue of what arrives (`zcount -i zc:IFNAME` consumes it).
    pub ingress: Option<u16>,
    /// Cluster queue of what leaves (`zsend -i zc:IFNAME` produces into it).
    pub egress: Option<u16>,
    /// The worker running it.
    pub worker: Option<usize>,
    #[serde(flatten)]
    pub counters: NicStats,
}

/// The `stats` line of an interface port.
pub fn nic_line(cluster: u32, s: &NicPortStats) -> String {
    let q = |q: Option<u16>| q.map_or("-".to_string(), |q| format!("zc:{cluster}@{q}"));
    let c = &s.counters;
    format!(
        "nic {}: ingress {} egress {} | {} ({}) | rx {} pkts {} B ({} zero-copy, {} copied) | \
         tx {} pkts {} B ({} zero-copy, {} copied, {} errors) | drops: {} kernel ring full, \
         {} fill ring empty, {} cluster queue full, {} too long | worker {}",
        s.name,
        q(s.ingress),
        q(s.egress),
        c.mode,
        if c.zero_copy { "zero-copy" } else { "copy" },
        c.rx_packets,
        c.rx_bytes,
        c.rx_zero_copy,
        c.rx_copied,
        c.tx_packets,
        c.tx_bytes,
        c.tx_zero_copy,
        c.tx_copied,
        c.tx_errors,
        c.drop_kernel_ring_full,
        c.drop_fill_ring_empty,
        c.drop_queue_full,
        c.drop_too_long,
        s.worker.map_or("-".to_string(), |w| w.to_string()),
    )
}
