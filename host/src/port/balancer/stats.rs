//! A balancer's counters: written by its worker with plain relaxed stores
//! of its own totals, read by anyone (`stats`, metrics, tests).

use super::BalanceSpec;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// One output queue of a balancer, as `zc-hostd stats` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputStats {
    pub queue: u16,
    /// The group it belongs to (0 is the first of `out=`).
    pub group: usize,
    /// Packets put into the queue, and their bytes.
    pub forwarded: u64,
    pub bytes: u64,
    /// Packets for this queue dropped because it had no room (`full=drop`).
    pub dropped: u64,
    /// Packets this queue got as a copy (fan-out to several queues), and
    /// the bytes copied for them.
    pub copied: u64,
    pub bytes_copied: u64,
}

/// The worker's own totals.
pub(super) struct Local {
    pub packets_in: u64,
    pub bad_slots: u64,
    pub outputs: Vec<OutputStats>,
}

impl Local {
    pub fn new(outputs: usize) -> Local {
        Local {
            packets_in: 0,
            bad_slots: 0,
            outputs: vec![OutputStats::default(); outputs],
        }
    }
}

#[derive(Default)]
struct OutputCounters {
    forwarded: AtomicU64,
    bytes: AtomicU64,
    dropped: AtomicU64,
    copied: AtomicU64,
    bytes_copied: AtomicU64,
}

pub struct BalanceCounters {
    packets_in: AtomicU64,
    bad_slots: AtomicU64,
    /// (queue, group) of each output, in the spec's order.
    places: Vec<(u16, usize)>,
    outputs: Vec<OutputCounters>,
}

/// What a balancer did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceStats {
    /// Packets read from the `in` queues.
    pub packets_in: u64,
    /// Ring slots of its queues that held no valid buffer (skipped).
    pub bad_slots: u64,
    /// Bytes written into copies (fan-out); 0 when nothing was copied.
    pub bytes_copied: u64,
    pub outputs: Vec<OutputStats>,
}

impl BalanceCounters {
    pub fn new(spec: &BalanceSpec) -> BalanceCounters {
        let places: Vec<(u16, usize)> = spec
            .groups()
            .iter()
            .enumerate()
            .flat_map(|(g, qs)| qs.iter().map(move |&q| (q, g)))
            .collect();
        BalanceCounters {
            packets_in: AtomicU64::new(0),
            bad_slots: AtomicU64::new(0),
            outputs: places.iter().map(|_| OutputCounters::default()).collect(),
            places,
        }
    }

    /// Publishes the port's totals (only its worker calls this).
    pub(super) fn publish(&self, s: &Local) {
        let w = |c: &AtomicU64, v: u64| c.store(v, Ordering::Relaxed);
        w(&self.packets_in, s.packets_in);
        w(&self.bad_slots, s.bad_slots);
        for (c, o) in self.outputs.iter().zip(&s.outputs) {
            w(&c.forwarded, o.forwarded);
            w(&c.bytes, o.bytes);
            w(&c.dropped, o.dropped);
            w(&c.copied, o.copied);
            w(&c.bytes_copied, o.bytes_copied);
        }
    }

    pub fn snapshot(&self) -> BalanceStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let outputs: Vec<OutputStats> = self
            .outputs
            .iter()
            .zip(&self.places)
            .map(|(c, &(queue, group))| OutputStats {
                queue,
                group,
                forwarded: r(&c.forwarded),
                bytes: r(&c.bytes),
                dropped: r(&c.dropped),
                copied: r(&c.copied),
                bytes_copied: r(&c.bytes_copied),
            })
            .collect();
        let bytes_copied = outputs.iter().map(|o| o.bytes_copied).sum();
        BalanceStats {
            packets_in: r(&self.packets_in),
            bad_slots: r(&self.bad_slots),
            bytes_copied,
            outputs,
        }
    }
}

/// One group's totals: every group sees every packet, so each should
/// account for `packets_in` (forwarded + dropped), times its queues for
/// `fanout`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStats {
    pub queues: Vec<u16>,
    pub forwarded: u64,
    pub dropped: u64,
}

/// One running balancer in `zc-hostd stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalancePortStats {
    /// `balance:in=..,out=..`, as `balance del` and `move` name it.
    pub name: String,
    /// The whole spec, as `--balance` takes it.
    pub spec: String,
    /// The worker running it.
    pub worker: Option<usize>,
    pub groups: Vec<GroupStats>,
    #[serde(flatten)]
    pub counters: BalanceStats,
}

impl BalancePortStats {
    pub fn new(name: String, spec: String, worker: Option<usize>, c: BalanceStats) -> Self {
        let n = c.outputs.iter().map(|o| o.group + 1).max().unwrap_or(0);
        let mut groups = vec![GroupStats::default(); n];
        for o in &c.outputs {
            let g = &mut groups[o.group];
            g.queues.push(o.queue);
            g.forwarded += o.forwarded;
            g.dropped += o.dropped;
        }
        BalancePortStats {
            name,
            spec,
            worker,
            groups,
            counters: c,
        }
    }
}

/// The `stats` lines of a balancer: one for it, one per output queue.
pub fn balance_lines(cluster: u32, s: &BalancePortStats) -> Vec<String> {
    let c = &s.counters;
    let mut lines = vec![format!(
        "{}: {} | in {} pkts | {} B copied | {} bad slots | worker {}",
        s.name,
        s.spec,
        c.packets_in,
        c.bytes_copied,
        c.bad_slots,
        s.worker.map_or("-".to_string(), |w| w.to_string()),
    )];
    for o in &c.outputs {
        lines.push(format!(
            "  group {} zc:{cluster}@{}: forwarded {} pkts {} B | dropped {} (queue full) | copied {}",
            o.group, o.queue, o.forwarded, o.bytes, o.dropped, o.copied
        ));
    }
    lines
}
