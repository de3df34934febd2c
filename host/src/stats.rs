//! What `zc-hostd stats` reports: per-export counters (written by the
//! export's port, single writer, relaxed stores; read by anyone at any
//! time) and per-worker load. Plain data shared by the ports, the workers
//! and the control protocol; none of them owns it.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($(#[$m:meta])* $name:ident, $snap:ident { $($(#[$fm:meta])* $f:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Default, Debug)]
        pub struct $name { $(pub $f: AtomicU64),* }

        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $snap { $($(#[$fm])* pub $f: u64),* }

        impl $name {
            pub fn snapshot(&self) -> $snap {
                $snap { $($f: self.$f.load(Ordering::Relaxed)),* }
            }
            /// Publishes the poll thread's local counts.
            pub fn publish(&self, s: &$snap) {
                $(self.$f.store(s.$f, Ordering::Relaxed);)*
            }
        }
    };
}

counters!(
    /// Host to guest: cluster queue `rx` into the guest's RX virtqueue.
    RxCounters, RxStats {
        /// Packets delivered to the guest.
        packets,
        bytes,
        /// Delivered by copying into guest memory.
        copied,
        /// Delivered by exchanging a pool buffer (zero-copy).
        exchanged,
        /// Dropped: larger than the guest's buffer chain (without MRG_RXBUF).
        drop_too_big,
        /// Dropped: with MRG_RXBUF, more than the guest's buffers can hold at
        /// once (its whole ring posted and still short), or more than 64
        /// buffers' worth.
        drop_no_room,
        /// Guest descriptors dropped because they failed validation.
        invalid_desc,
        /// Interrupts (call eventfd writes) sent to the guest.
        interrupts,
    }
);

counters!(
    /// Guest to host: the guest's TX virtqueue into cluster queue `tx`.
    TxCounters, TxStats {
        packets,
        bytes,
        copied,
        /// Pool buffers exchanged for empty ones (zero-copy); without a `tx`
        /// queue too, where each is also counted in `drop_no_queue`.
        exchanged,
        /// Counted and dropped: the export has no `tx` queue (a sink; its
        /// pool buffers are still exchanged).
        drop_no_queue,
        /// Dropped: empty, shorter than the virtio-net header, or larger than a buffer.
        drop_bad_len,
        invalid_desc,
        /// Interrupts sent to the guest for TX completions.
        interrupts,
    }
);

counters!(
    /// Device-wide events.
    DevCounters, DevStats {
        /// Frontends that connected to the socket so far.
        connections,
        /// 1 while a frontend is connected.
        connected,
        /// 1 while the device is marked NEEDS_RESET (a structurally broken ring).
        needs_reset,
        /// Rings found structurally broken so far.
        broken_rings,
        /// Memory tables refused because a region does not fit its file
        /// (that frontend was disconnected).
        bad_mem_tables,
        /// Guest memory that vanished under the export (its file shrank):
        /// the fault was contained and the device marked NEEDS_RESET.
        mem_faults,
        /// Kicks (guest notifications) received.
        kicks,
        /// Times the export's worker went to sleep with this export idle.
        sleeps,
    }
);

/// Everything `zc-hostd stats` shows about one export.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportStats {
    pub name: String,
    pub path: String,
    pub mac: String,
    pub rx_queue: Option<u16>,
    pub tx_queue: Option<u16>,
    pub rx: RxStats,
    pub tx: TxStats,
    pub dev: DevStats,
    /// The worker that steps the export.
    #[serde(default)]
    pub worker: Option<usize>,
}

/// One worker as `zc-hostd stats` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerStats {
    pub worker: usize,
    /// The core it is pinned to, if any.
    pub core: Option<usize>,
    /// Share of the last second spent in steps that moved packets (0..100).
    pub busy_pct: f64,
    /// Times it went to sleep.
    pub sleeps: u64,
    pub ports: Vec<PortLoad>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PortLoad {
    pub name: String,
    /// Share of the worker's last second spent moving this port's packets.
    pub busy_pct: f64,
}

/// One line per worker for `zc-hostd stats`: its core, load and ports.
pub fn worker_line(w: &WorkerStats) -> String {
    let ports: Vec<String> = w
        .ports
        .iter()
        .map(|p| format!("{} {:.1}%", p.name, p.busy_pct))
        .collect();
    format!(
        "worker {}{}: {:.1}% busy, {} sleeps, ports: {}",
        w.worker,
        w.core.map_or(String::new(), |c| format!(" (core {c})")),
        w.busy_pct,
        w.sleeps,
        if ports.is_empty() {
            "none".into()
        } else {
            ports.join(", ")
        }
    )
}

#[derive(Default, Debug)]
pub struct ExportCounters {
    pub rx: RxCounters,
    pub tx: TxCounters,
    pub dev: DevCounters,
}

/// One line per export for `-v` and `zc-hostd stats`: absolute counts plus,
/// given the previous snapshot and the seconds between, rates.
pub fn format_line(s: &ExportStats, prev: Option<(&ExportStats, f64)>) -> String {
    let rate =
        |now: u64, before: u64, secs: f64| (now.saturating_sub(before)) as f64 / secs.max(1e-9);
    let mut line = format!(
        "export {}: {} | rx {} pkts {} B ({} copied, {} exchanged, {} too big, {} no room, {} bad desc) | \
         tx {} pkts {} B ({} copied, {} exchanged, {} no queue, {} bad len, {} bad desc) | \
         dev {} broken rings, {} bad mem tables, {} mem faults",
        s.name,
        if s.dev.needs_reset != 0 {
            "NEEDS_RESET"
        } else if s.dev.connected != 0 {
            "connected"
        } else {
            "waiting"
        },
        s.rx.packets,
        s.rx.bytes,
        s.rx.copied,
        s.rx.exchanged,
        s.rx.drop_too_big,
        s.rx.drop_no_room,
        s.rx.invalid_desc,
        s.tx.packets,
        s.tx.bytes,
        s.tx.copied,
        s.tx.exchanged,
        s.tx.drop_no_queue,
        s.tx.drop_bad_len,
        s.tx.invalid_desc,
        s.dev.broken_rings,
        s.dev.bad_mem_tables,
        s.dev.mem_faults,
    );
    if let Some((p, secs)) = prev {
        line.push_str(&format!(
            " | rx {:.0} pps tx {:.0} pps",
            rate(s.rx.packets, p.rx.packets, secs),
            rate(s.tx.packets, p.tx.packets, secs)
        ));
    }
    line
}
