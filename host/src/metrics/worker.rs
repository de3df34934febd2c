//! The worker families: each poll thread's load and sleeps, and each
//! port's share of its worker.

use super::{counters, gauges, Labels};
use crate::stats::WorkerStats;
use prometheus_client::encoding::DescriptorEncoder;

pub(super) fn encode(
    enc: &mut DescriptorEncoder,
    cluster: &str,
    workers: &[WorkerStats],
) -> std::fmt::Result {
    let l = |w: &WorkerStats| -> Labels {
        vec![
            ("cluster", cluster.to_string()),
            ("worker", w.worker.to_string()),
        ]
    };
    gauges(
        enc,
        "zc_worker_busy_ratio",
        "Share of the last second the worker spent in steps that moved packets (0 to 1).",
        workers.iter().map(|w| (l(w), w.busy_pct / 100.0)),
    )?;
    counters(
        enc,
        "zc_worker_sleeps",
        "Times the worker went to sleep with all its ports idle.",
        workers.iter().map(|w| (l(w), w.sleeps)),
    )?;
    gauges(
        enc,
        "zc_worker_ports",
        "Ports the worker steps.",
        workers.iter().map(|w| (l(w), w.ports.len() as u64)),
    )?;
    gauges(
        enc,
        "zc_port_busy_ratio",
        "Share of its worker's last second spent moving this port's packets (0 to 1).",
        workers.iter().flat_map(|w| {
            w.ports.iter().map(move |p| {
                let mut labels = l(w);
                labels.push(("port", p.name.clone()));
                (labels, p.busy_pct / 100.0)
            })
        }),
    )
}
