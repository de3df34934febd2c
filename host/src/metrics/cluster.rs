//! The cluster's families: its buffers by holder, and per queue what was
//! produced and consumed and how full it is.

use super::{counters, gauges, Labels};
use crate::control::ClusterInfo;
use crate::stats::BufferUse;
use prometheus_client::encoding::DescriptorEncoder;
use std::sync::Mutex;

/// A queue's indices are 32-bit and wrap (in under a minute at full
/// rate); these extend them to 64-bit totals. Sampled at least once a
/// second (`zc-hostd --metrics` runs a sampler), so no wrap is missed.
#[derive(Default)]
pub struct QueueTotals {
    seen: Mutex<Vec<Totals>>,
}

#[derive(Clone, Copy, Default)]
struct Totals {
    last: (u32, u32),
    total: (u64, u64),
}

impl QueueTotals {
    /// Takes the queues' current (produced, consumed) indices; returns per
    /// queue (produced total, consumed total, depth).
    pub fn update(&self, now: &[(u32, u32)]) -> Vec<(u64, u64, u32)> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() != now.len() {
            // First sample: the rings start at index 0.
            seen.resize(now.len(), Totals::default());
        }
        seen.iter_mut()
            .zip(now)
            .map(|(t, &(p, c))| {
                t.total.0 += u64::from(p.wrapping_sub(t.last.0));
                t.total.1 += u64::from(c.wrapping_sub(t.last.1));
                t.last = (p, c);
                (t.total.0, t.total.1, p.wrapping_sub(c))
            })
            .collect()
    }
}

pub(super) fn encode(
    enc: &mut DescriptorEncoder,
    cluster: &str,
    info: &ClusterInfo,
    b: &BufferUse,
    queues: &[(u64, u64, u32)],
) -> std::fmt::Result {
    let l = || -> Labels { vec![("cluster", cluster.to_string())] };
    gauges(
        enc,
        "zc_cluster_buffers",
        "Buffers in the cluster's pool.",
        [(l(), u64::from(info.buf_count))],
    )?;
    gauges(
        enc,
        "zc_cluster_buffer_bytes",
        "Bytes per pool buffer, headroom included.",
        [(l(), u64::from(info.buf_size))],
    )?;
    gauges(
        enc,
        "zc_cluster_buffers_spare",
        "Pool buffers nobody holds.",
        [(l(), b.spare)],
    )?;
    let held = [
        ("queues", b.queues),
        ("processes", b.processes),
        ("ports", b.ports),
        ("stranded", b.stranded),
    ];
    gauges(
        enc,
        "zc_cluster_buffers_held",
        "Pool buffers held, by holder: the queue rings, attached processes, ports and their guests, and processes that exited while others stayed attached (back at the next reclaim).",
        held.into_iter().map(|(h, n)| {
            let mut labels = l();
            labels.push(("holder", h.to_string()));
            (labels, n)
        }),
    )?;
    let q =
        |i: usize| -> Labels { vec![("cluster", cluster.to_string()), ("queue", i.to_string())] };
    counters(
        enc,
        "zc_queue_produced",
        "Packets produced into the queue.",
        queues.iter().enumerate().map(|(i, v)| (q(i), v.0)),
    )?;
    counters(
        enc,
        "zc_queue_consumed",
        "Packets consumed from the queue.",
        queues.iter().enumerate().map(|(i, v)| (q(i), v.1)),
    )?;
    gauges(
        enc,
        "zc_queue_depth",
        "Packets in the queue, produced and not yet consumed.",
        queues
            .iter()
            .enumerate()
            .map(|(i, v)| (q(i), u64::from(v.2))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_totals_carry_over_a_wrap() {
        let t = QueueTotals::default();
        assert_eq!(t.update(&[(10, 4)]), [(10, 4, 6)]);
        assert_eq!(
            t.update(&[(u32::MAX, u32::MAX - 2)]),
            [(u64::from(u32::MAX), u64::from(u32::MAX) - 2, 2)]
        );
        // Both indices wrapped past zero.
        assert_eq!(t.update(&[(5, 1)]), [((1 << 32) + 5, (1 << 32) + 1, 4)]);
    }
}
