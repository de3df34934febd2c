//! The daemon's balancers (`--balance`, `balance add|del`) on its
//! workers: what each claims from the cluster (the consumer role of every
//! `in` queue, the producer role of every `out` queue, its buffers), the
//! port made with that claim, and giving it all back.

use super::registry::Registry;
use crate::cluster::{AttachError, Cluster};
use crate::control::Role;
use crate::port::balancer::{
    buffers_needed, BalanceCounters, BalanceError, BalanceParts, BalancePort, BalancePortStats,
    BalanceSpec,
};
use crate::queues::Side;
use crate::worker::{PortId, WorkerError};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;
use zc_proto::BufferIndex;

#[derive(Debug, Error)]
pub enum BalancePortError {
    #[error(transparent)]
    Spec(#[from] BalanceError),
    #[error("--balance {spec}: {source}")]
    Claim { spec: String, source: AttachError },
    #[error("no balancer reads in={inputs}; the balancers: {ports}")]
    NoPort { inputs: String, ports: String },
    #[error("{port}: its worker did not give it back in time; it keeps its buffers")]
    Stuck { port: String },
    #[error("{port}: {source}")]
    Worker { port: String, source: WorkerError },
}

struct Running {
    spec: BalanceSpec,
    name: String,
    id: PortId,
    counters: Arc<BalanceCounters>,
}

fn roles(spec: &BalanceSpec) -> Vec<(u16, Role)> {
    spec.inputs()
        .iter()
        .map(|&q| (q, Role::Consumer))
        .chain(spec.outputs().map(|q| (q, Role::Producer)))
        .collect()
}

/// Lock order: the port list, then the cluster (as the registry's).
pub struct Balancers {
    registry: Arc<Registry>,
    ports: Mutex<Vec<Running>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes the queue roles and buffers of `spec`'s port; all or nothing.
fn claim(c: &mut Cluster, spec: &BalanceSpec, name: &str) -> Result<Vec<BufferIndex>, AttachError> {
    let all = roles(spec);
    for (i, &(q, role)) in all.iter().enumerate() {
        if let Err(e) = c.attach_port(name, q, role) {
            c.detach_port(name, &all[..i]);
            return Err(e);
        }
    }
    c.take_spare(buffers_needed(spec))
        .inspect_err(|_| c.detach_port(name, &all))
}

impl Balancers {
    pub fn new(registry: Arc<Registry>) -> Balancers {
        Balancers {
            registry,
            ports: Mutex::new(Vec::new()),
        }
    }

    /// Starts the balancers of the command line; on failure the ones
    /// started go again.
    pub fn start_all(&self, specs: &[BalanceSpec]) -> Result<(), BalancePortError> {
        for spec in specs {
            if let Err(e) = self.add(spec.clone()) {
                self.remove_all();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Runs a balancer on the least loaded worker. On failure nothing of
    /// it is left: roles and every buffer are back in the cluster.
    pub fn add(&self, spec: BalanceSpec) -> Result<BalancePortStats, BalancePortError> {
        // A spec that came over the control socket obeys the command
        // line's rules too.
        let spec: BalanceSpec = spec.to_string().parse()?;
        let mut list = lock(&self.ports);
        let name = spec.name();
        let cluster = self.registry.cluster();
        let mut c = lock(cluster);
        let queues = c.queues().clone();
        spec.check_queues(c.id(), queues.geometry().queue_count)?;
        let buffers = claim(&mut c, &spec, &name).map_err(|source| BalancePortError::Claim {
            spec: spec.to_string(),
            source,
        })?;
        let bells = spec
            .inputs()
            .iter()
            .map(|&q| {
                queues
                    .bell(q, Side::Consumer)
                    .expect("the daemon's queue area has every bell")
                    .as_raw_fd()
            })
            .collect();
        let port = BalancePort::new(BalanceParts {
            name: name.clone(),
            spec: spec.clone(),
            pool: c.pool().view().clone(),
            inputs: spec.inputs().iter().map(|&q| queues.consumer(q)).collect(),
            outputs: spec.outputs().map(|q| queues.producer(q)).collect(),
            queues: queues.clone(),
            bells,
            buffers,
        });
        drop(c);
        let counters = port.counters();
        let id = self.registry.port_id();
        if let Err(e) = self.registry.workers().add(id, Box::new(port), None) {
            let mut c = lock(cluster);
            match e.port {
                Some(p) => {
                    c.give_spare(p.stop());
                    c.detach_port(&name, &roles(&spec));
                }
                // The worker kept it (and its buffers): the roles stay
                // taken too, so nothing else uses what it may still touch.
                None => log::error!("{name}: {:?}", e.error),
            }
            return Err(BalancePortError::Worker {
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

    /// Stops the balancer reading exactly the queues `inputs`; returns its
    /// name and how many buffers came back to the cluster.
    pub fn remove(&self, inputs: &[u16]) -> Result<(String, usize), BalancePortError> {
        let mut list = lock(&self.ports);
        let Some(i) = list.iter().position(|p| p.spec.inputs() == inputs) else {
            return Err(BalancePortError::NoPort {
                inputs: inputs
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join("+"),
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
            .map(|p| p.spec.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn stop(&self, p: &Running) -> Result<usize, BalancePortError> {
        // The cluster stays locked from the take to the return, so that no
        // reclaim counts the port's buffers as lost in between.
        let mut c = lock(self.registry.cluster());
        let port = self
            .registry
            .workers()
            .take(p.id)
            .map_err(|_| BalancePortError::Stuck {
                port: p.name.clone(),
            })?;
        let back = port.stop();
        let n = back.len();
        c.give_spare(back);
        c.detach_port(&p.name, &roles(&p.spec));
        Ok(n)
    }

    /// Stops every balancer (at shutdown, or when a start fails).
    pub fn remove_all(&self) {
        let mut list = lock(&self.ports);
        for p in list.drain(..) {
            if let Err(e) = self.stop(&p) {
                log::warn!("{e}");
            }
        }
    }

    fn stats_of(&self, p: &Running) -> BalancePortStats {
        BalancePortStats::new(
            p.name.clone(),
            p.spec.to_string(),
            self.registry.workers().placement_of(p.id),
            p.counters.snapshot(),
        )
    }

    /// Every balancer's counters, in the order they were added.
    pub fn stats(&self) -> Vec<BalancePortStats> {
        let list = lock(&self.ports);
        list.iter().map(|p| self.stats_of(p)).collect()
    }

    /// The balancer named `name` (`balance:in=..,out=..`), for `move`.
    pub fn id_of(&self, name: &str) -> Option<PortId> {
        lock(&self.ports)
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.id)
    }
}
