//! The daemon's reflector ports (`--reflect`, `reflect add|del`) on its
//! workers: what each claims from the cluster (the consumer role of its
//! `in` queue, the producer role of its `out` queue, a burst of buffers),
//! the port made with that claim, and giving it all back.

use super::registry::Registry;
use crate::cluster::{AttachError, Cluster};
use crate::control::Role;
use crate::port::reflect::{
    ReflectCounters, ReflectParts, ReflectPort, ReflectPortStats, ReflectSpec, ReflectSpecError,
    BURST,
};
use crate::queues::Side;
use crate::worker::{PortId, WorkerError};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use thiserror::Error;
use zc_proto::BufferIndex;

#[derive(Debug, Error)]
pub enum ReflectPortError {
    #[error(transparent)]
    Spec(#[from] ReflectSpecError),
    #[error("--reflect {spec}: {source}")]
    Claim { spec: String, source: AttachError },
    #[error("no reflector consumes queue {input}; the reflectors: {ports}")]
    NoPort { input: u16, ports: String },
    #[error("{port}: its worker did not give it back in time; it keeps its buffers")]
    Stuck { port: String },
    #[error("{port}: {source}")]
    Worker { port: String, source: WorkerError },
}

struct Running {
    spec: ReflectSpec,
    name: String,
    id: PortId,
    counters: Arc<ReflectCounters>,
}

impl Running {
    fn roles(&self) -> [(u16, Role); 2] {
        roles(&self.spec)
    }
}

fn roles(spec: &ReflectSpec) -> [(u16, Role); 2] {
    [(spec.input, Role::Consumer), (spec.output, Role::Producer)]
}

/// Lock order: the port list, then the cluster (as the registry's).
pub struct Reflectors {
    registry: Arc<Registry>,
    ports: Mutex<Vec<Running>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes the queue roles and buffers of `spec`'s port; all or nothing.
fn claim(c: &mut Cluster, spec: &ReflectSpec, name: &str) -> Result<Vec<BufferIndex>, AttachError> {
    let all = roles(spec);
    for (i, &(q, role)) in all.iter().enumerate() {
        if let Err(e) = c.attach_port(name, q, role) {
            c.detach_port(name, &all[..i]);
            return Err(e);
        }
    }
    c.take_spare(BURST as u32)
        .inspect_err(|_| c.detach_port(name, &all))
}

impl Reflectors {
    pub fn new(registry: Arc<Registry>) -> Reflectors {
        Reflectors {
            registry,
            ports: Mutex::new(Vec::new()),
        }
    }

    /// Starts the reflectors of the command line; on failure the ones
    /// started go again.
    pub fn start_all(&self, specs: &[ReflectSpec]) -> Result<(), ReflectPortError> {
        for spec in specs {
            if let Err(e) = self.add(*spec) {
                self.remove_all();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Runs a reflector on the least loaded worker. On failure nothing of
    /// it is left: roles and every buffer are back in the cluster.
    pub fn add(&self, spec: ReflectSpec) -> Result<ReflectPortStats, ReflectPortError> {
        // A spec that came over the control socket obeys the command
        // line's rules too (two distinct queues).
        let spec: ReflectSpec = spec.to_string().parse()?;
        let mut list = lock(&self.ports);
        let name = spec.port_name();
        let cluster = self.registry.cluster();
        let mut c = lock(cluster);
        let buffers = claim(&mut c, &spec, &name).map_err(|source| ReflectPortError::Claim {
            spec: spec.to_string(),
            source,
        })?;
        let queues = c.queues().clone();
        let bell = queues
            .bell(spec.input, Side::Consumer)
            .expect("the daemon's queue area has every bell")
            .as_raw_fd();
        let port = ReflectPort::new(ReflectParts {
            name: name.clone(),
            pool: c.pool().view().clone(),
            input: queues.consumer(spec.input),
            output: queues.producer(spec.output),
            queues: queues.clone(),
            bell,
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
            return Err(ReflectPortError::Worker {
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

    /// Stops the reflector consuming queue `input`; returns its name and
    /// how many buffers came back to the cluster.
    pub fn remove(&self, input: u16) -> Result<(String, usize), ReflectPortError> {
        let mut list = lock(&self.ports);
        let Some(i) = list.iter().position(|p| p.spec.input == input) else {
            return Err(ReflectPortError::NoPort {
                input,
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
            .map(|p| format!("{} ({})", p.name, p.spec))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn stop(&self, p: &Running) -> Result<usize, ReflectPortError> {
        // The cluster stays locked from the take to the return, so that no
        // reclaim counts the port's buffers as lost in between.
        let mut c = lock(self.registry.cluster());
        let port = self
            .registry
            .workers()
            .take(p.id)
            .map_err(|_| ReflectPortError::Stuck {
                port: p.name.clone(),
            })?;
        let back = port.stop();
        let n = back.len();
        c.give_spare(back);
        c.detach_port(&p.name, &p.roles());
        Ok(n)
    }

    /// Stops every reflector (at shutdown, or when a start fails).
    pub fn remove_all(&self) {
        let mut list = lock(&self.ports);
        for p in list.drain(..) {
            if let Err(e) = self.stop(&p) {
                log::warn!("{e}");
            }
        }
    }

    fn stats_of(&self, p: &Running) -> ReflectPortStats {
        ReflectPortStats {
            name: p.name.clone(),
            input: p.spec.input,
            output: p.spec.output,
            worker: self.registry.workers().placement_of(p.id),
            counters: p.counters.snapshot(),
        }
    }

    /// Every reflector's counters, in the order they were added.
    pub fn stats(&self) -> Vec<ReflectPortStats> {
        let list = lock(&self.ports);
        list.iter().map(|p| self.stats_of(p)).collect()
    }

    /// The reflector named `name` (`reflect:<in>`), for `move`.
    pub fn id_of(&self, name: &str) -> Option<PortId> {
        lock(&self.ports)
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.id)
    }
}
