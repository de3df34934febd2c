//! The daemon's interface ports (`--nic`, `nic add|del`) on its workers:
//! what each claims from the cluster (the ingress queue's producer role,
//! the egress queue's consumer role, buffers for the kernel's rings), the
//! port bound to the interface with that claim, and giving it all back.

use super::registry::Registry;
use crate::cluster::{AttachError, Cluster};
use crate::control::Role;
use crate::port::nic::{
    NicCounters, NicError, NicParts, NicPort, NicPortStats, NicSpec, NicSpecError,
};
use crate::queues::Side;
use crate::worker::{PortId, WorkerError};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;
use zc_proto::BufferIndex;

/// Buffers each interface port is given: the AF_XDP fill ring takes up to
/// 2048, a burst stays in hand for sending.
pub const PORT_BUFFERS: u32 = 2048 + crate::port::nic::BURST as u32;

#[derive(Debug, Error)]
pub enum NicPortError {
    #[error(transparent)]
    Spec(#[from] NicSpecError),
    #[error("--nic {spec}: {source}")]
    Claim { spec: String, source: AttachError },
    #[error("{0}")]
    Open(NicError),
    #[error("{port} runs already: one port per interface receive queue (nic del it first)")]
    Duplicate { port: String },
    #[error("no interface port {port}; the interface ports: {ports}")]
    NoPort { port: String, ports: String },
    #[error("{port}: its worker did not give it back in time; it keeps its buffers")]
    Stuck { port: String },
    #[error("{port}: {source}")]
    Worker { port: String, source: WorkerError },
}

struct Running {
    spec: NicSpec,
    name: String,
    id: PortId,
    counters: Arc<NicCounters>,
}

/// Lock order: the port list, then the cluster (as the registry's).
pub struct Nics {
    registry: Arc<Registry>,
    ports: Mutex<Vec<Running>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes the queue roles and buffers of `spec`'s port; all or nothing.
fn claim(c: &mut Cluster, spec: &NicSpec, name: &str) -> Result<Vec<BufferIndex>, AttachError> {
    let undo = |c: &mut Cluster| c.detach_nic(name, spec.ingress, spec.egress);
    let roles = [
        (spec.ingress, Role::Producer),
        (spec.egress, Role::Consumer),
    ];
    for (q, role) in roles {
        if let Some(q) = q {
            if let Err(e) = c.attach_nic(name, q, role) {
                undo(c);
                return Err(e);
            }
        }
    }
    c.take_spare(PORT_BUFFERS).inspect_err(|_| undo(c))
}

impl Nics {
    pub fn new(registry: Arc<Registry>) -> Nics {
        Nics {
            registry,
            ports: Mutex::new(Vec::new()),
        }
    }

    /// Starts the ports of the command line; on failure the ones started
    /// go again.
    pub fn start_all(&self, specs: &[NicSpec]) -> Result<(), NicPortError> {
        for spec in specs {
            if let Err(e) = self.add(spec.clone()) {
                self.remove_all();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Binds a port to the interface and runs it on the least loaded
    /// worker. On failure nothing of it is left: roles and every buffer
    /// are back in the cluster.
    pub fn add(&self, spec: NicSpec) -> Result<NicPortStats, NicPortError> {
        // A spec that came over the control socket obeys the command
        // line's rules too (one direction at least, distinct queues).
        let spec: NicSpec = spec.to_string().parse()?;
        let mut list = lock(&self.ports);
        let name = spec.port_name();
        if list.iter().any(|p| p.name == name) {
            return Err(NicPortError::Duplicate { port: name });
        }
        let cluster = self.registry.cluster();
        let mut c = lock(cluster);
        let buffers = claim(&mut c, &spec, &name).map_err(|source| NicPortError::Claim {
            spec: spec.to_string(),
            source,
        })?;
        let queues = c.queues().clone();
        let bells = spec
            .egress
            .and_then(|q| queues.bell(q, Side::Consumer))
            .map(|b| b.as_raw_fd())
            .into_iter()
            .collect();
        let parts = NicParts {
            pool: c.pool().view().clone(),
            ingress: spec.ingress.map(|q| queues.producer(q)),
            egress: spec.egress.map(|q| queues.consumer(q)),
            queues: queues.clone(),
            bells,
            buffers,
        };
        let port = match NicPort::open(&spec.config(), parts) {
            Ok(p) => p,
            Err((e, back)) => {
                c.give_spare(back);
                c.detach_nic(&name, spec.ingress, spec.egress);
                return Err(NicPortError::Open(e));
            }
        };
        drop(c);
        let counters = port.counters();
        let id = self.registry.port_id();
        if let Err(e) = self.registry.workers().add(id, Box::new(port), None) {
            let mut c = lock(cluster);
            match e.port {
                Some(p) => {
                    c.give_spare(p.stop());
                    c.detach_nic(&name, spec.ingress, spec.egress);
                }
                // The worker kept it (and its buffers): the roles stay
                // taken too, so nothing else uses what it may still touch.
                None => log::error!("{name}: {:?}", e.error),
            }
            return Err(NicPortError::Worker {
                port: name,
                source: e.error,
            });
        }
        let running = Running {
            spec,
            name,
            id,
            counters,
        };
        let stats = self.stats_of(&running);
        list.push(running);
        Ok(stats)
    }

    /// Stops the port of `ifname`'s receive queue `queue`; returns its
    /// name and how many buffers came back to the cluster.
    pub fn remove(&self, ifname: &str, queue: u32) -> Result<(String, usize), NicPortError> {
        let mut list = lock(&self.ports);
        let Some(i) = list
            .iter()
            .position(|p| p.spec.ifname == ifname && p.spec.queue == queue)
        else {
            return Err(NicPortError::NoPort {
                port: format!("nic:{ifname}@{queue}"),
                ports: Self::names(&list),
            });
        };
        let p = list.swap_remove(i);
        let n = self.stop(&p)?;
        Ok((p.name, n))
    }

    fn names(list: &[Running]) -> String {
        if list.is_empty() {
            return "none".into();
        }
        list.iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn stop(&self, p: &Running) -> Result<usize, NicPortError> {
        // The cluster stays locked from the take to the return, so that no
        // reclaim counts the port's buffers as lost in between.
        let mut c = lock(self.registry.cluster());
        let port = self
            .registry
            .workers()
            .take(p.id)
            .map_err(|_| NicPortError::Stuck {
                port: p.name.clone(),
            })?;
        let back = port.stop();
        let n = back.len();
        c.give_spare(back);
        c.detach_nic(&p.name, p.spec.ingress, p.spec.egress);
        Ok(n)
    }

    /// Stops every port (at shutdown, or when a start fails).
    pub fn remove_all(&self) {
        let mut list = lock(&self.ports);
        for p in list.drain(..) {
            if let Err(e) = self.stop(&p) {
                log::warn!("{e}");
            }
        }
    }

    fn stats_of(&self, p: &Running) -> NicPortStats {
        NicPortStats {
            name: p.name.clone(),
            ifname: p.spec.ifname.clone(),
            queue: p.spec.queue,
            ingress: p.spec.ingress,
            egress: p.spec.egress,
            worker: self.registry.workers().placement_of(p.id),
            counters: p.counters.snapshot(),
        }
    }

    /// Every port's counters, in the order they were added.
    pub fn stats(&self) -> Vec<NicPortStats> {
        let list = lock(&self.ports);
        list.iter().map(|p| self.stats_of(p)).collect()
    }

    /// The ports of interface `ifname` (what `zc:IFNAME` resolves to).
    pub fn of_interface(&self, ifname: &str) -> Vec<NicPortStats> {
        let list = lock(&self.ports);
        list.iter()
            .filter(|p| p.spec.ifname == ifname)
            .map(|p| self.stats_of(p))
            .collect()
    }

    /// The port named `name` (`nic:<ifname>@<queue>`), for `move`.
    pub fn id_of(&self, name: &str) -> Option<PortId> {
        lock(&self.ports)
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.id)
    }
}
