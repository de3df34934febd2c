//! The daemon's running exports (from the command line, and attached to
//! VMs at run time) on its workers: what each claims from the cluster
//! (queue roles, buffers, a directory slot), the port built from that
//! claim, and giving it all back when the export goes.

use crate::access::Access;
use crate::cluster::{AttachError, BufferHolder, Cluster, Held};
use crate::control::Role;
use crate::handover::{HandedExport, PortHands};
use crate::port::export::shared::ExportShared;
use crate::port::export::{backend, directory, ExportParts, ExportPort, ExportSpec, BURST};
use crate::queues::Side;
use crate::ring::{Consumer, Producer};
use crate::stats::{ExportStats, WorkerStats};
use crate::worker::{PortId, WorkerError, Workers};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;
use zc_proto::layout::{ExportEntry, EXPORT_ACTIVE, MAX_EXPORTS, NO_QUEUE};
use zc_proto::BufferIndex;

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("at most {MAX_EXPORTS} exports per cluster")]
    TooMany,
    #[error("directory slot {0} is taken by another export")]
    SlotTaken(usize),
    #[error("export {export}: {source}")]
    Attach { export: String, source: AttachError },
    #[error(transparent)]
    Socket(#[from] crate::paths::PathError),
    #[error("export {export}: its worker did not give it back in time; it keeps its buffers")]
    Stuck { export: String },
    #[error("export {export}: {source}")]
    Io {
        export: String,
        source: std::io::Error,
    },
    #[error("export {export}: {source}")]
    Worker { export: String, source: WorkerError },
}

/// What one export serves and how many buffers its guest may hold.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    pub spec: ExportSpec,
    /// Buffers the guest starts with (zero-copy stock); at most directory::MAX_STOCK.
    pub stock: u32,
}

/// A running export: its state shared with the vhost-user threads, and
/// the port the workers step.
struct Running {
    shared: Arc<ExportShared>,
    id: PortId,
    closer: backend::Closer,
}

/// The workers hold buffers for the cluster's accounting: pausing them
/// holds every port still.
struct WorkerHolder(Arc<Workers>);

impl BufferHolder for WorkerHolder {
    fn pause(&self) -> Option<Held> {
        self.0.pause().map(|(buffers, paused)| Held {
            buffers,
            resume: Box::new(paused),
        })
    }

    fn name(&self) -> String {
        "the workers".into()
    }
}

/// Lock order: `exports` before the cluster.
pub struct Registry {
    cluster: Arc<Mutex<Cluster>>,
    workers: Arc<Workers>,
    exports: Mutex<Vec<Running>>,
    /// `--stock` for exports attached at run time.
    stock: u32,
    /// Mode and group of the export sockets (`--vm-group`).
    access: Access,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What an export took from the cluster when it started.
struct Claim {
    shared: Arc<ExportShared>,
    rx_hand: Vec<BufferIndex>,
    tx_hand: Vec<BufferIndex>,
    stock: Vec<BufferIndex>,
    /// Packets a predecessor's port held (a graceful restart).
    rx_packets: Vec<(BufferIndex, u32)>,
    tx_pending: Vec<(BufferIndex, u32)>,
    rx_end: Option<Consumer>,
    tx_end: Option<Producer>,
}

impl Claim {
    fn all(&self) -> Vec<BufferIndex> {
        [&self.rx_hand, &self.tx_hand, &self.stock]
            .into_iter()
            .flatten()
            .copied()
            .chain(self.rx_packets.iter().chain(&self.tx_pending).map(|p| p.0))
            .collect()
    }
}

/// Hands handed over for an export of `spec`, if they have its shape (a
/// burst each way, none towards the guest without an rx queue).
fn fitting_hands(c: &mut Cluster, slot: usize, spec: &ExportSpec) -> Option<PortHands> {
    let h = c.take_handed(slot, &spec.path)?;
    let rx = h.rx_packets.len() + h.rx_empty.len();
    let tx = h.tx_pending.len() + h.tx_empty.len();
    let want_rx = if spec.rx.is_some() { BURST } else { 0 };
    if rx == want_rx && tx == BURST && (spec.tx.is_some() || h.tx_pending.is_empty()) {
        return Some(h);
    }
    log::warn!(
        "export {}: the hands handed over do not fit it; {} packets in them are lost",
        spec.path.display(),
        h.packets()
    );
    c.give_spare(h.buffers().map(BufferIndex::new).collect());
    None
}

/// Takes queue roles, hands and stock for an export in `slot`, and writes
/// its directory entry; all or nothing.
fn claim(
    c: &mut Cluster,
    slot: usize,
    cfg: &ExportConfig,
    name: &str,
) -> Result<Claim, ExportError> {
    let spec = &cfg.spec;
    let attach = |source| ExportError::Attach {
        export: name.to_string(),
        source,
    };
    let mac = spec.mac_for(c.id());
    if let Some(q) = spec.rx {
        c.attach_export(name, q, Role::Consumer).map_err(attach)?;
    }
    // Every export has a tx hand: without a tx queue, it holds the empties
    // the export hands back for the pool buffers its guest sends.
    let hands = if spec.rx.is_some() { BURST as u32 } else { 0 } + BURST as u32;
    let stock_n = cfg.stock.min(directory::MAX_STOCK as u32);
    // What the slot's guest still holds from a daemon that died (the
    // cluster was adopted) stays its stock; only the rest is new.
    let kept = c.owners().guest_buffers(slot);
    let new_stock = stock_n.saturating_sub(kept.len() as u32);
    // After a graceful restart the hands are the predecessor's, packets
    // and all.
    let handed = fitting_hands(c, slot, spec);
    let hands = if handed.is_some() { 0 } else { hands };
    let taken = spec
        .tx
        .map_or(Ok(()), |q| c.attach_export(name, q, Role::Producer))
        .and_then(|()| c.take_spare(new_stock + hands));
    let give_back = |c: &mut Cluster, h: Option<PortHands>| {
        if let Some(h) = h {
            c.give_spare(h.buffers().map(BufferIndex::new).collect());
        }
    };
    let mut stock = match taken {
        Ok(b) => b,
        Err(e) => {
            c.detach_export(name, spec.rx, spec.tx);
            give_back(c, handed);
            return Err(attach(e));
        }
    };
    let shared = match ExportShared::new(spec.clone(), slot, mac) {
        Ok(s) => Arc::new(s),
        Err(source) => {
            c.detach_export(name, spec.rx, spec.tx);
            c.give_spare(stock);
            give_back(c, handed);
            return Err(ExportError::Io {
                export: name.to_string(),
                source,
            });
        }
    };
    let index = |v: Vec<u32>| v.into_iter().map(BufferIndex::new).collect::<Vec<_>>();
    let packets = |v: Vec<(u32, u32)>| {
        v.into_iter()
            .map(|(b, len)| (BufferIndex::new(b), len))
            .collect::<Vec<_>>()
    };
    let (rx_hand, tx_hand, rx_packets, tx_pending) = match handed {
        Some(h) => (
            index(h.rx_empty),
            index(h.tx_empty),
            packets(h.rx_packets),
            packets(h.tx_pending),
        ),
        None => (
            if spec.rx.is_some() {
                stock.drain(..BURST).collect()
            } else {
                Vec::new()
            },
            stock.drain(..BURST).collect(),
            Vec::new(),
            Vec::new(),
        ),
    };
    for b in &stock {
        c.owners().give_to_guest(*b, slot);
    }
    stock.extend(kept);
    let view = c.pool().view();
    directory::write_stock(view, slot, &stock);
    directory::write_entry(
        view,
        slot,
        Some(ExportEntry {
            state: EXPORT_ACTIVE,
            mac,
            rx_queue: spec.rx.unwrap_or(NO_QUEUE),
            tx_queue: spec.tx.unwrap_or(NO_QUEUE),
            ..Default::default()
        }),
    );
    Ok(Claim {
        shared,
        rx_hand,
        tx_hand,
        stock,
        rx_packets,
        tx_pending,
        rx_end: spec.rx.map(|q| c.queues().consumer(q)),
        tx_end: spec.tx.map(|q| c.queues().producer(q)),
    })
}

/// Undoes `claim` (or ends an export): directory slot, roles and buffers
/// back to the cluster.
fn release(c: &mut Cluster, shared: &ExportShared, bufs: Vec<BufferIndex>) {
    let view = c.pool().view();
    directory::write_stock(view, shared.slot, &[]);
    directory::write_entry(view, shared.slot, None);
    for b in &bufs {
        c.owners().take_from_guest(*b);
    }
    let name = shared.spec.path.display().to_string();
    c.detach_export(&name, shared.spec.rx, shared.spec.tx);
    c.give_spare(bufs);
}

impl Registry {
    /// The registry of a cluster whose ports run on `workers`; export
    /// sockets get `access`.
    pub fn new(
        cluster: Arc<Mutex<Cluster>>,
        workers: Arc<Workers>,
        stock: u32,
        access: Access,
    ) -> Self {
        lock(&cluster).add_buffer_holder(Arc::new(WorkerHolder(workers.clone())));
        Registry {
            cluster,
            workers,
            exports: Mutex::new(Vec::new()),
            stock,
            access,
            next_id: AtomicU64::new(1),
        }
    }

    pub fn cluster(&self) -> &Arc<Mutex<Cluster>> {
        &self.cluster
    }

    pub fn workers(&self) -> &Arc<Workers> {
        &self.workers
    }

    /// A port id no other port of this daemon has (exports and interface
    /// ports share the workers).
    pub fn port_id(&self) -> PortId {
        PortId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// The running exports' shared state, in slot order.
    pub fn shared(&self) -> Vec<Arc<ExportShared>> {
        let mut v: Vec<_> = lock(&self.exports)
            .iter()
            .map(|e| e.shared.clone())
            .collect();
        v.sort_by_key(|s| s.slot);
        v
    }

    /// Every export's counters (with the worker it runs on) and every
    /// worker's load.
    pub fn stats(&self) -> (Vec<ExportStats>, Vec<WorkerStats>) {
        let exports = self
            .shared()
            .iter()
            .map(|s| ExportStats {
                worker: self.id_of(s).and_then(|id| self.workers.placement_of(id)),
                ..s.stats()
            })
            .collect();
        (exports, self.workers.stats())
    }

    /// Starts the exports of the command line, in slots 0, 1, ..., then
    /// those `attach` had added before a graceful restart, in their old
    /// slots; returns the latter that started again (one that does not is
    /// logged, not fatal: its VM loses that device, the daemon goes on).
    pub fn start_all(
        &self,
        configs: &[ExportConfig],
        restored: &[HandedExport],
    ) -> Result<Vec<(HandedExport, Arc<ExportShared>)>, ExportError> {
        if configs.len() > MAX_EXPORTS {
            return Err(ExportError::TooMany);
        }
        for cfg in configs {
            self.start(cfg.clone(), None)?;
        }
        let mut again = Vec::new();
        for h in restored {
            let Some(a) = &h.attached else { continue };
            let spec = ExportSpec {
                path: h.path.clone(),
                rx: a.info.rx_queue,
                tx: a.info.tx_queue,
                mac: a.mac,
            };
            let cfg = ExportConfig {
                spec,
                stock: self.stock,
            };
            match self.start(cfg, Some(h.slot)) {
                Ok(shared) => again.push((h.clone(), shared)),
                Err(e) => log::warn!(
                    "the export attach had added to VM {} does not start again: {e}",
                    a.info.vm
                ),
            }
        }
        // Guests of slots that did not start again (after an adoption)
        // hold nothing any more, nor do hands nobody took over.
        let slots: Vec<usize> = self.shared().iter().map(|s| s.slot).collect();
        let mut c = lock(&self.cluster);
        let n = c.release_guests_except(&slots);
        if n > 0 {
            log::warn!(
                "{n} buffers held by guests of exports that were not started again are back in the pool"
            );
        }
        let (n, lost) = c.release_handed();
        if n > 0 {
            log::warn!(
                "{n} buffers in the hands of exports that were not started again are back in the pool; {lost} packets in them are lost"
            );
        }
        Ok(again)
    }

    /// A graceful restart: takes every export port off its worker and
    /// returns what each holds in its hands, leaving the directory, the
    /// owner table and the sockets as they are for the successor. The
    /// exports are not usable afterwards (the process is about to exec).
    pub fn hand_over(&self) -> Vec<(Arc<ExportShared>, Option<PortHands>)> {
        let list = lock(&self.exports);
        list.iter()
            .map(|e| {
                let hands = match self.workers.take(e.id) {
                    Ok(port) => port.hands(),
                    Err(err) => {
                        log::warn!(
                            "export {}: its worker did not give it up ({err}); its hands are found by elimination",
                            e.shared.name
                        );
                        None
                    }
                };
                (e.shared.clone(), hands)
            })
            .collect()
    }

    /// Starts an export of `spec` at run time, with the daemon's `--stock`.
    pub fn add(&self, spec: ExportSpec) -> Result<Arc<ExportShared>, ExportError> {
        self.start(
            ExportConfig {
                spec,
                stock: self.stock,
            },
            None,
        )
    }

    /// Starts one export in directory slot `at`, or the lowest free one:
    /// claim, socket, port on a worker, vhost-user thread. On failure
    /// nothing of it is left.
    fn start(
        &self,
        cfg: ExportConfig,
        at: Option<usize>,
    ) -> Result<Arc<ExportShared>, ExportError> {
        let mut list = lock(&self.exports);
        let free = |s: &usize| list.iter().all(|e| e.shared.slot != *s);
        let slot = match at {
            Some(s) if s < MAX_EXPORTS && free(&s) => s,
            Some(s) => return Err(ExportError::SlotTaken(s)),
            None => (0..MAX_EXPORTS).find(free).ok_or(ExportError::TooMany)?,
        };
        let spec = &cfg.spec;
        let name = spec.path.display().to_string();
        let io = |source| ExportError::Io {
            export: name.clone(),
            source,
        };
        let (sockets, closer) = backend::listen(&spec.path, self.access)?;
        let mut c = lock(&self.cluster);
        let claimed = match claim(&mut c, slot, &cfg, &name) {
            Ok(cl) => cl,
            Err(e) => {
                closer.remove_socket();
                return Err(e);
            }
        };
        let all = claimed.all();
        let shared = claimed.shared.clone();
        let mut bells = Vec::new();
        if let Some(q) = spec.rx {
            bells.extend(c.queues().bell(q, Side::Consumer).map(|b| b.as_raw_fd()));
        }
        if let Some(q) = spec.tx {
            bells.extend(c.queues().bell(q, Side::Producer).map(|b| b.as_raw_fd()));
        }
        let port = ExportPort::new(ExportParts {
            shared: shared.clone(),
            pool: c.pool().clone(),
            owners: c.owners().clone(),
            queues: c.queues().clone(),
            rx_end: claimed.rx_end,
            tx_end: claimed.tx_end,
            bells,
            rx_hand: claimed.rx_hand,
            tx_hand: claimed.tx_hand,
            rx_packets: claimed.rx_packets,
            tx_pending: claimed.tx_pending,
        });
        let undo = |c: &mut Cluster| {
            closer.remove_socket();
            release(c, &shared, all.clone());
        };
        let port = match port {
            Ok(p) => p,
            Err(e) => {
                undo(&mut c);
                return Err(io(e));
            }
        };
        drop(c);
        let id = self.port_id();
        if let Err(e) = self.workers.add(id, Box::new(port), None) {
            if e.port.is_none() {
                // The worker kept it: its buffers stay with it.
                log::error!("export {name}: {:?}", e.error);
                closer.remove_socket();
            } else {
                undo(&mut lock(&self.cluster));
            }
            return Err(ExportError::Worker {
                export: name,
                source: e.error,
            });
        }
        let s2 = shared.clone();
        if let Err(e) = std::thread::Builder::new()
            .name(format!("zc-vhost-{slot}"))
            .spawn(move || backend::serve(s2, sockets))
        {
            let running = Running {
                shared: shared.clone(),
                id,
                closer,
            };
            let _ = self.stop(running);
            return Err(io(e));
        }
        list.push(Running {
            shared: shared.clone(),
            id,
            closer,
        });
        Ok(shared)
    }

    /// Ends an export: its socket, its port, its directory slot and queue
    /// roles; returns the number of buffers that went back to the pool.
    fn stop(&self, e: Running) -> Result<usize, ExportError> {
        let shared = &e.shared;
        let name = shared.spec.path.display().to_string();
        e.closer.close(shared);
        // The cluster stays locked throughout, so that no reclaim runs
        // between the port leaving its worker and its buffers coming back.
        let mut c = lock(&self.cluster);
        let port = self
            .workers
            .take(e.id)
            .map_err(|_| ExportError::Stuck { export: name })?;
        let held = port.stop();
        let n = held.len();
        release(&mut c, shared, held);
        Ok(n)
    }

    /// Stops the export `shared` and returns its buffers to the pool;
    /// returns how many it held. The frontend should be gone (the VM's
    /// device removed); a guest still running on it loses the device.
    pub fn remove(&self, shared: &Arc<ExportShared>) -> Result<usize, ExportError> {
        let mut list = lock(&self.exports);
        let Some(i) = list.iter().position(|e| Arc::ptr_eq(&e.shared, shared)) else {
            return Ok(0);
        };
        let e = list.swap_remove(i);
        self.stop(e)
    }

    /// Stops every export (at shutdown).
    pub fn remove_all(&self) {
        let mut list = lock(&self.exports);
        for e in list.drain(..) {
            if let Err(err) = self.stop(e) {
                log::warn!("{err}");
            }
        }
    }

    fn id_of(&self, shared: &Arc<ExportShared>) -> Option<PortId> {
        lock(&self.exports)
            .iter()
            .find(|e| Arc::ptr_eq(&e.shared, shared))
            .map(|e| e.id)
    }

    /// Moves the export named `name` (its socket's file name, or its path)
    /// to worker `to`; returns the worker it ran on.
    pub fn move_port(&self, name: &str, to: usize) -> Result<usize, MoveError> {
        let ids: Vec<PortId> = lock(&self.exports)
            .iter()
            .filter(|e| e.shared.name == name || e.shared.spec.path.as_os_str() == name)
            .map(|e| e.id)
            .collect();
        match ids[..] {
            [id] => Ok(self.workers.move_port(id, to)?),
            [] => Err(MoveError::NoPort {
                name: name.to_string(),
                ports: self
                    .shared()
                    .iter()
                    .map(|s| s.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
            _ => Err(MoveError::Ambiguous(name.to_string())),
        }
    }
}

#[derive(Debug, Error)]
pub enum MoveError {
    #[error("no port is named {name}; the ports: {ports}")]
    NoPort { name: String, ports: String },
    #[error("several exports have sockets named {0}: give the socket's whole path")]
    Ambiguous(String),
    #[error(transparent)]
    Worker(#[from] WorkerError),
}
