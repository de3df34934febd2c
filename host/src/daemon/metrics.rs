//! What a scrape of `--metrics` reads from the daemon: the registry's
//! export and worker stats, the cluster's info and buffer use (a short
//! hold of the cluster lock, which the workers never take), and the
//! queues' indices, extended to 64 bits by a sampler once a second.

use super::registry::Registry;
use super::worker_ports::WorkerPorts;
use crate::metrics::{QueueTotals, Snapshot, Source};
use crate::queues::QueueArea;
use std::sync::{Arc, Weak};
use std::time::Duration;

pub struct DaemonSource {
    registry: Arc<Registry>,
    ports: Arc<WorkerPorts>,
    queues: Arc<QueueArea>,
    totals: QueueTotals,
}

impl DaemonSource {
    /// The source, with its sampler thread (which ends with the source).
    pub fn start(registry: Arc<Registry>, ports: Arc<WorkerPorts>) -> Arc<DaemonSource> {
        let queues = registry
            .cluster()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queues()
            .clone();
        let source = Arc::new(DaemonSource {
            registry,
            ports,
            queues,
            totals: QueueTotals::default(),
        });
        let weak: Weak<DaemonSource> = Arc::downgrade(&source);
        let _ = std::thread::Builder::new()
            .name("zc-metrics-sampler".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                match weak.upgrade() {
                    Some(s) => drop(s.queue_counts()),
                    None => return,
                }
            });
        source
    }

    fn queue_counts(&self) -> Vec<(u64, u64, u32)> {
        let n = self.queues.geometry().queue_count;
        let now: Vec<(u32, u32)> = (0..n).map(|q| self.queues.indices(q)).collect();
        self.totals.update(&now)
    }
}

impl Source for DaemonSource {
    fn snapshot(&self) -> Snapshot {
        let (exports, workers) = self.registry.stats();
        let (info, buffers) = {
            let c = self
                .registry
                .cluster()
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            (c.info(), c.buffer_use())
        };
        Snapshot {
            info: Some(info),
            buffers,
            queues: self.queue_counts(),
            exports,
            workers,
            nics: self.ports.nics.stats(),
            reflectors: self.ports.reflectors.stats(),
            balancers: self.ports.balancers.stats(),
        }
    }
}
