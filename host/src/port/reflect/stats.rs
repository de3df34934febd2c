//! A reflector port's counters: written by its worker with plain relaxed
//! stores of its own totals, read by anyone (`stats`, metrics, tests).

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a reflector did, as `zc-hostd stats` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReflectStats {
    /// Packets sent back into the out queue, and their bytes.
    pub reflected: u64,
    pub bytes: u64,
    /// Dropped: the out queue had no room (its consumer is slow or gone).
    pub drop_queue_full: u64,
    /// Dropped: shorter than two MAC addresses (12 bytes).
    pub drop_runt: u64,
    /// Ring slots of either queue that held no valid buffer (skipped).
    pub bad_slots: u64,
}

#[derive(Default)]
pub struct ReflectCounters {
    reflected: AtomicU64,
    bytes: AtomicU64,
    drop_queue_full: AtomicU64,
    drop_runt: AtomicU64,
    bad_slots: AtomicU64,
}

impl ReflectCounters {
    /// Publishes the port's totals (only its worker calls this).
    pub(super) fn publish(&self, s: &ReflectStats) {
        let w = |c: &AtomicU64, v: u64| c.store(v, Ordering::Relaxed);
        w(&self.reflected, s.reflected);
        w(&self.bytes, s.bytes);
        w(&self.drop_queue_full, s.drop_queue_full);
        w(&self.drop_runt, s.drop_runt);
        w(&self.bad_slots, s.bad_slots);
    }

    pub fn snapshot(&self) -> ReflectStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ReflectStats {
            reflected: r(&self.reflected),
            bytes: r(&self.bytes),
            drop_queue_full: r(&self.drop_queue_full),
            drop_runt: r(&self.drop_runt),
            bad_slots: r(&self.bad_slots),
        }
    }
}

/// One running reflector in `zc-hostd stats`: its queues, where it runs,
/// and its counters (flattened into the same JSON object).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReflectPortStats {
    /// `reflect:<in>`, as `move` names it.
    pub name: String,
    #[serde(rename = "in")]
    pub input: u16,
    #[serde(rename = "out")]
    pub output: u16,
    /// The worker running it.
    pub worker: Option<usize>,
    #[serde(flatten)]
    pub counters: ReflectStats,
}

/// The `stats` line of a reflector.
pub fn reflect_line(cluster: u32, s: &ReflectPortStats) -> String {
    let c = &s.counters;
    format!(
        "reflect {}: in zc:{cluster}@{} out zc:{cluster}@{} | reflected {} pkts {} B | \
         drops: {} out queue full, {} runts | {} bad slots | worker {}",
        s.name,
        s.input,
        s.output,
        c.reflected,
        c.bytes,
        c.drop_queue_full,
        c.drop_runt,
        c.bad_slots,
        s.worker.map_or("-".to_string(), |w| w.to_string()),
    )
}
