//! Exports: cluster queues served to virtual machines as vhost-user
//! virtio-net devices.
//!
//! Each export has a vhost-user socket (accept loop in `backend`), a poll
//! thread (`poll`, with the two directions in `rx` and `tx`), a slot in the
//! pool's export directory (`directory`), and a stock of pool buffers its
//! guest may hold (`owner`). Guest rings are reached through `virtq` and
//! `guest_mem`, which check everything the guest controls.

pub mod backend;
pub mod directory;
pub mod guest_mem;
pub mod owner;
pub mod poll;
pub mod qemu_args;
pub mod rx;
pub mod shared;
pub mod shim;
pub mod spec;
pub mod stats;
pub mod tx;
pub mod virtq;

use crate::control::Role;
use crate::daemon::cluster::{AttachError, BufferHolder, Cluster};
use poll::{Worker, WorkerParts, BURST};
use shared::ExportShared;
pub use spec::ExportSpec;
use std::sync::{Arc, Mutex};
use thiserror::Error;
use zc_proto::layout::{ExportEntry, EXPORT_ACTIVE, MAX_EXPORTS, NO_QUEUE};
use zc_proto::BufferIndex;

/// Buffers a guest may hold by default (the bound on buffers in flight
/// towards one export's guest on the zero-copy path).
pub const DEFAULT_STOCK: u32 = 1024;

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("at most {MAX_EXPORTS} exports per cluster")]
    TooMany,
    #[error("export {export}: {source}")]
    Attach { export: String, source: AttachError },
    #[error("export {export}: cannot listen on {path}: {source}")]
    Listen {
        export: String,
        path: String,
        source: std::io::Error,
    },
    #[error("export {export}: {source}")]
    Thread {
        export: String,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug)]
pub struct ExportConfig {
    pub spec: ExportSpec,
    /// Buffers the guest starts with (zero-copy stock); at most directory::MAX_STOCK.
    pub stock: u32,
    /// Core to pin the poll thread to.
    pub core: Option<usize>,
}

/// A running export.
pub struct Export {
    pub shared: Arc<ExportShared>,
}

impl BufferHolder for ExportShared {
    fn pause(&self) -> Option<Vec<BufferIndex>> {
        self.request(|c| c.pause = true, false);
        let r = self.wait_parked();
        if r.is_none() {
            self.resume();
        }
        r
    }

    fn resume(&self) {
        self.lock().pause = false;
        self.notify_all();
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

/// Sets up and starts every export: roles and buffers from the cluster,
/// directory entries, sockets and threads.
pub fn start(
    cluster: &Arc<Mutex<Cluster>>,
    configs: &[ExportConfig],
) -> Result<Vec<Export>, ExportError> {
    if configs.len() > MAX_EXPORTS {
        return Err(ExportError::TooMany);
    }
    let mut out = Vec::new();
    for (slot, cfg) in configs.iter().enumerate() {
        out.push(start_one(cluster, slot, cfg)?);
    }
    Ok(out)
}

fn start_one(
    cluster: &Arc<Mutex<Cluster>>,
    slot: usize,
    cfg: &ExportConfig,
) -> Result<Export, ExportError> {
    let spec = &cfg.spec;
    let name = spec.path.display().to_string();
    let attach = |source| ExportError::Attach {
        export: name.clone(),
        source,
    };
    let mut c = cluster.lock().unwrap_or_else(|e| e.into_inner());
    let mac = spec.mac_for(c.id());
    if let Some(q) = spec.rx {
        c.attach_export(&name, q, Role::Consumer).map_err(attach)?;
    }
    if let Some(q) = spec.tx {
        c.attach_export(&name, q, Role::Producer).map_err(attach)?;
    }
    let stock_n = cfg.stock.min(directory::MAX_STOCK as u32);
    // Every export has a tx hand: without a tx queue, it holds the empties
    // the export hands back for the pool buffers its guest sends.
    let hands = if spec.rx.is_some() { BURST as u32 } else { 0 } + BURST as u32;
    let mut bufs = c.take_spare(stock_n + hands).map_err(attach)?;
    let rx_hand: Vec<BufferIndex> = if spec.rx.is_some() {
        bufs.drain(..BURST).collect()
    } else {
        Vec::new()
    };
    let tx_hand: Vec<BufferIndex> = bufs.drain(..BURST).collect();
    for b in &bufs {
        c.owners().give_to_guest(*b, slot);
    }
    let view = c.pool().view();
    directory::write_stock(&view, slot, &bufs);
    directory::write_entry(
        &view,
        slot,
        Some(ExportEntry {
            state: EXPORT_ACTIVE,
            mac,
            rx_queue: spec.rx.unwrap_or(NO_QUEUE),
            tx_queue: spec.tx.unwrap_or(NO_QUEUE),
            ..Default::default()
        }),
    );
    let rx_end = spec.rx.map(|q| c.queues().consumer(q));
    let tx_end = spec.tx.map(|q| c.queues().producer(q));
    let shared = Arc::new(ExportShared::new(spec.clone(), slot, mac));
    c.add_buffer_holder(shared.clone());
    drop(c);
    let thread = |source| ExportError::Thread {
        export: name.clone(),
        source,
    };
    let worker = Worker::new(WorkerParts {
        shared: shared.clone(),
        cluster: cluster.clone(),
        rx_end,
        tx_end,
        rx_hand,
        tx_hand,
    })
    .map_err(thread)?;
    let listener = backend::listen(&spec.path).map_err(|source| ExportError::Listen {
        export: name.clone(),
        path: spec.path.display().to_string(),
        source,
    })?;
    let core = cfg.core;
    let wname = shared.name.clone();
    std::thread::Builder::new()
        .name(format!("zc-poll-{slot}"))
        .spawn(move || {
            if let Some(core) = core {
                if let Err(e) = poll::pin_to(core) {
                    log::warn!("export {wname}: cannot pin the poll thread to core {core}: {e}");
                }
            }
            worker.run()
        })
        .map_err(thread)?;
    let s2 = shared.clone();
    std::thread::Builder::new()
        .name(format!("zc-vhost-{slot}"))
        .spawn(move || backend::serve(s2, listener))
        .map_err(thread)?;
    Ok(Export { shared })
}
