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
use crate::ring::{Consumer, Producer};
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
    #[error(transparent)]
    Socket(#[from] crate::paths::PathError),
    #[error("export {export}: its poll thread did not stop in time; it keeps its buffers")]
    Stuck { export: String },
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
    poll: Option<std::thread::JoinHandle<()>>,
    closer: backend::Closer,
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
        match start_one(cluster, slot, cfg) {
            Ok(e) => out.push(e),
            Err(e) => {
                // All or nothing: the ones started already go.
                for started in out {
                    if let Err(stop) = started.stop(cluster) {
                        log::error!("{stop}");
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// What an export took from the cluster when it started.
struct Claim {
    shared: Arc<ExportShared>,
    rx_hand: Vec<BufferIndex>,
    tx_hand: Vec<BufferIndex>,
    stock: Vec<BufferIndex>,
    rx_end: Option<Consumer>,
    tx_end: Option<Producer>,
}

impl Claim {
    fn all(&self) -> Vec<BufferIndex> {
        [&self.rx_hand, &self.tx_hand, &self.stock]
            .into_iter()
            .flatten()
            .copied()
            .collect()
    }
}

/// Takes queue roles, hands and stock for an export in `slot`, and writes
/// its directory entry; all or nothing.
fn claim(
    c: &mut Cluster,
    slot: usize,
    cfg: &ExportConfig,
    name: &str,
) -> Result<Claim, AttachError> {
    let spec = &cfg.spec;
    let mac = spec.mac_for(c.id());
    if let Some(q) = spec.rx {
        c.attach_export(name, q, Role::Consumer)?;
    }
    // Every export has a tx hand: without a tx queue, it holds the empties
    // the export hands back for the pool buffers its guest sends.
    let hands = if spec.rx.is_some() { BURST as u32 } else { 0 } + BURST as u32;
    let stock_n = cfg.stock.min(directory::MAX_STOCK as u32);
    let taken = spec
        .tx
        .map_or(Ok(()), |q| c.attach_export(name, q, Role::Producer))
        .and_then(|()| c.take_spare(stock_n + hands));
    let mut stock = match taken {
        Ok(b) => b,
        Err(e) => {
            c.detach_export(None, name, spec.rx, spec.tx);
            return Err(e);
        }
    };
    let rx_hand: Vec<BufferIndex> = if spec.rx.is_some() {
        stock.drain(..BURST).collect()
    } else {
        Vec::new()
    };
    let tx_hand: Vec<BufferIndex> = stock.drain(..BURST).collect();
    for b in &stock {
        c.owners().give_to_guest(*b, slot);
    }
    let view = c.pool().view();
    directory::write_stock(&view, slot, &stock);
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
    let shared = Arc::new(ExportShared::new(spec.clone(), slot, mac));
    c.add_buffer_holder(shared.clone());
    Ok(Claim {
        shared,
        rx_hand,
        tx_hand,
        stock,
        rx_end: spec.rx.map(|q| c.queues().consumer(q)),
        tx_end: spec.tx.map(|q| c.queues().producer(q)),
    })
}

/// Undoes `claim` (or ends an export): directory slot, roles, holder and
/// buffers back to the cluster.
fn release(c: &mut Cluster, shared: &Arc<ExportShared>, bufs: Vec<BufferIndex>) {
    let view = c.pool().view();
    directory::write_stock(&view, shared.slot, &[]);
    directory::write_entry(&view, shared.slot, None);
    for b in &bufs {
        c.owners().take_from_guest(*b);
    }
    let holder: Arc<dyn BufferHolder> = shared.clone();
    let name = shared.spec.path.display().to_string();
    c.detach_export(Some(&holder), &name, shared.spec.rx, shared.spec.tx);
    c.give_spare(bufs);
}

/// Starts one export in directory slot `slot` (free, below MAX_EXPORTS);
/// on failure nothing of it is left.
pub fn start_one(
    cluster: &Arc<Mutex<Cluster>>,
    slot: usize,
    cfg: &ExportConfig,
) -> Result<Export, ExportError> {
    let spec = &cfg.spec;
    let name = spec.path.display().to_string();
    let thread = |source| ExportError::Thread {
        export: name.clone(),
        source,
    };
    let (listener, closer) = backend::listen(&spec.path)?;
    let claimed = {
        let mut c = cluster.lock().unwrap_or_else(|e| e.into_inner());
        claim(&mut c, slot, cfg, &name)
    };
    let claimed = match claimed {
        Ok(cl) => cl,
        Err(source) => {
            closer.remove_socket();
            return Err(ExportError::Attach {
                export: name,
                source,
            });
        }
    };
    let all = claimed.all();
    let shared = claimed.shared.clone();
    let undo = |e: std::io::Error| {
        closer.remove_socket();
        let mut c = cluster.lock().unwrap_or_else(|e| e.into_inner());
        release(&mut c, &shared, all.clone());
        thread(e)
    };
    let worker = Worker::new(WorkerParts {
        shared: shared.clone(),
        cluster: cluster.clone(),
        rx_end: claimed.rx_end,
        tx_end: claimed.tx_end,
        rx_hand: claimed.rx_hand,
        tx_hand: claimed.tx_hand,
    })
    .map_err(undo)?;
    let core = cfg.core;
    let wname = shared.name.clone();
    let poll = std::thread::Builder::new()
        .name(format!("zc-poll-{slot}"))
        .spawn(move || {
            if let Some(core) = core {
                if let Err(e) = crate::cpu::pin_to(core) {
                    log::warn!("export {wname}: the poll thread stays unpinned: {e}");
                }
            }
            worker.run()
        })
        .map_err(undo)?;
    let s2 = shared.clone();
    let export = Export {
        shared,
        poll: Some(poll),
        closer,
    };
    if let Err(e) = std::thread::Builder::new()
        .name(format!("zc-vhost-{slot}"))
        .spawn(move || backend::serve(s2, listener))
    {
        // The poll thread runs: end it the normal way.
        let _ = export.stop(cluster);
        return Err(thread(e));
    }
    Ok(export)
}

impl Export {
    /// Removes the socket file, if it is still ours (the daemon is stopping).
    pub fn remove_socket(&self) {
        self.closer.remove_socket();
    }

    /// Removes the export: ends its threads, clears its directory slot,
    /// gives back its queue roles and returns every buffer it or its guest
    /// held to the spare list. The frontend should be gone (the VM's device
    /// removed); a guest still running on it loses the device. Returns the
    /// number of buffers returned.
    pub fn stop(mut self, cluster: &Arc<Mutex<Cluster>>) -> Result<usize, ExportError> {
        let name = self.shared.spec.path.display().to_string();
        self.closer.close(&self.shared);
        // The cluster stays locked throughout, so that no reclaim runs
        // between the export leaving the holders and its buffers coming back.
        let mut c = cluster.lock().unwrap_or_else(|e| e.into_inner());
        let held = self
            .shared
            .quit()
            .ok_or(ExportError::Stuck { export: name })?;
        if let Some(t) = self.poll.take() {
            let _ = t.join();
        }
        let n = held.len();
        release(&mut c, &self.shared, held);
        Ok(n)
    }
}
