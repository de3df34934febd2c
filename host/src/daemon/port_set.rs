//! What the daemon does alike for every kind of port it runs on its
//! workers besides exports (interface ports, reflectors, balancers): claim
//! queue roles and buffers from the cluster all or nothing, place the port
//! on the least loaded worker, undo both when that fails, and at removal
//! take the port back from its worker and return everything it held.
//! Each kind adds only what is its own: its spec, how its port is built,
//! and what its stats show.

use super::registry::Registry;
use crate::cluster::{AttachError, Cluster, PortKind};
use crate::control::Role;
use crate::port::Port;
use crate::worker::{PortId, WorkerError};
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;
use zc_proto::BufferIndex;

/// Errors of placing and removing a port, the same for every kind.
#[derive(Debug, Error)]
pub enum PlaceError {
    #[error("{port}: its worker did not give it back in time; it keeps its buffers")]
    Stuck { port: String },
    #[error("{port}: {source}")]
    Worker { port: String, source: WorkerError },
}

/// What a port takes from the cluster while it runs.
pub struct Claim {
    pub kind: PortKind,
    pub name: String,
    pub roles: Vec<(u16, Role)>,
    pub buffers: u32,
}

/// A running port: its spec, its claim and its counters (`C`).
pub struct Placed<S, C> {
    pub spec: S,
    pub name: String,
    pub id: PortId,
    roles: Vec<(u16, Role)>,
    pub counters: C,
}

/// The stats of one running port, from the port and the worker it is on.
type View<S, C, V> = fn(&Placed<S, C>, Option<usize>) -> V;

/// The running ports of one kind. Lock order: the list, then the cluster.
pub struct PortSet<S, C, V> {
    registry: Arc<Registry>,
    ports: Mutex<Vec<Placed<S, C>>>,
    view: View<S, C, V>,
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S, C, V> PortSet<S, C, V> {
    pub fn new(registry: Arc<Registry>, view: View<S, C, V>) -> Self {
        PortSet {
            registry,
            ports: Mutex::new(Vec::new()),
            view,
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Claims what `claim` says, builds the port from the spec, the locked
    /// cluster and the claimed buffers (`build` gives the buffers back when it
    /// fails), and runs it on the least loaded worker. On failure nothing
    /// of it is left: roles and every buffer are back in the cluster.
    pub fn add<E: From<PlaceError>>(
        &self,
        spec: S,
        claim: Claim,
        claim_error: impl FnOnce(AttachError) -> E,
        build: impl FnOnce(
            &S,
            &mut Cluster,
            Vec<BufferIndex>,
        ) -> Result<(Box<dyn Port>, C), (E, Vec<BufferIndex>)>,
    ) -> Result<V, E> {
        let mut list = lock(&self.ports);
        let cluster = self.registry.cluster();
        let mut c = lock(cluster);
        let buffers = c
            .claim_port(claim.kind, &claim.name, &claim.roles, claim.buffers)
            .map_err(claim_error)?;
        let (port, counters) = match build(&spec, &mut c, buffers) {
            Ok(p) => p,
            Err((e, back)) => {
                c.give_spare(back);
                c.detach_port(&claim.name, &claim.roles);
                return Err(e);
            }
        };
        drop(c);
        let id = self.registry.port_id();
        if let Err(e) = self.registry.workers().add(id, port, None) {
            let mut c = lock(cluster);
            match e.port {
                Some(p) => {
                    c.give_spare(p.stop());
                    c.detach_port(&claim.name, &claim.roles);
                }
                // The worker kept it (and its buffers): the roles stay
                // taken too, so nothing else uses what it may still touch.
                None => log::error!("{}: {:?}", claim.name, e.error),
            }
            return Err(PlaceError::Worker {
                port: claim.name,
                source: e.error,
            }
            .into());
        }
        let placed = Placed {
            spec,
            name: claim.name,
            id,
            roles: claim.roles,
            counters,
        };
        let v = self.view_of(&placed);
        list.push(placed);
        Ok(v)
    }

    /// Whether a port named `name` runs.
    pub fn contains(&self, name: &str) -> bool {
        lock(&self.ports).iter().any(|p| p.name == name)
    }

    /// Stops the first port `which` picks; returns its name and how many
    /// buffers came back to the cluster. When there is none, the error is
    /// `not_found` of the ports there are (each as `describe` writes it,
    /// or "none").
    pub fn remove<E: From<PlaceError>>(
        &self,
        which: impl Fn(&S) -> bool,
        describe: impl Fn(&Placed<S, C>) -> String,
        not_found: impl FnOnce(String) -> E,
    ) -> Result<(String, usize), E> {
        let mut list = lock(&self.ports);
        let Some(i) = list.iter().position(|p| which(&p.spec)) else {
            let ports = if list.is_empty() {
                "none".into()
            } else {
                list.iter().map(describe).collect::<Vec<_>>().join(", ")
            };
            return Err(not_found(ports));
        };
        let p = list.swap_remove(i);
        let n = self.stop(&p)?;
        Ok((p.name, n))
    }

    fn stop(&self, p: &Placed<S, C>) -> Result<usize, PlaceError> {
        // The cluster stays locked from the take to the return, so that no
        // reclaim counts the port's buffers as lost in between.
        let mut c = lock(self.registry.cluster());
        let port = self
            .registry
            .workers()
            .take(p.id)
            .map_err(|_| PlaceError::Stuck {
                port: p.name.clone(),
            })?;
        let back = port.stop();
        let n = back.len();
        c.give_spare(back);
        c.detach_port(&p.name, &p.roles);
        Ok(n)
    }

    /// Stops every port (at shutdown, a graceful restart, or when a start
    /// fails).
    pub fn remove_all(&self) {
        let mut list = lock(&self.ports);
        for p in list.drain(..) {
            if let Err(e) = self.stop(&p) {
                log::warn!("{e}");
            }
        }
    }

    fn view_of(&self, p: &Placed<S, C>) -> V {
        (self.view)(p, self.registry.workers().placement_of(p.id))
    }

    /// The stats of the ports `which` picks, in the order they were added.
    pub fn stats_where(&self, which: impl Fn(&S) -> bool) -> Vec<V> {
        let list = lock(&self.ports);
        list.iter()
            .filter(|p| which(&p.spec))
            .map(|p| self.view_of(p))
            .collect()
    }

    /// Every port's stats, in the order they were added.
    pub fn stats(&self) -> Vec<V> {
        self.stats_where(|_| true)
    }

    /// The port named `name`, for `move`.
    pub fn id_of(&self, name: &str) -> Option<PortId> {
        lock(&self.ports)
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.id)
    }
}
