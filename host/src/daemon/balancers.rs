//! The daemon's balancers (`--balance`, `balance add|del`) on its
//! workers: what each claims from the cluster (the consumer role of every
//! `in` queue, the producer role of every `out` queue, its buffers) and
//! the port made with that claim.

use super::port_set::{lock, Claim, PlaceError, Placed, PortSet};
use super::registry::Registry;
use crate::cluster::{AttachError, PortKind};
use crate::control::Role;
use crate::port::balancer::{
    buffers_needed, BalanceCounters, BalanceError, BalanceParts, BalancePort, BalancePortStats,
    BalanceSpec,
};
use crate::queues::Side;
use crate::worker::PortId;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum BalancePortError {
    #[error(transparent)]
    Spec(#[from] BalanceError),
    #[error("--balance {spec}: {source}")]
    Claim { spec: String, source: AttachError },
    #[error("no balancer reads in={inputs}; the balancers: {ports}")]
    NoPort { inputs: String, ports: String },
    #[error(transparent)]
    Place(#[from] PlaceError),
}

type Running = Placed<BalanceSpec, Arc<BalanceCounters>>;

pub struct Balancers {
    set: PortSet<BalanceSpec, Arc<BalanceCounters>, BalancePortStats>,
}

fn stats_of(p: &Running, worker: Option<usize>) -> BalancePortStats {
    BalancePortStats::new(
        p.name.clone(),
        p.spec.to_string(),
        worker,
        p.counters.snapshot(),
    )
}

impl Balancers {
    pub fn new(registry: Arc<Registry>) -> Balancers {
        Balancers {
            set: PortSet::new(registry, stats_of),
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
        {
            let c = lock(self.set.registry().cluster());
            spec.check_queues(c.id(), c.queues().geometry().queue_count)?;
        }
        let name = spec.name();
        let roles = spec
            .inputs()
            .iter()
            .map(|&q| (q, Role::Consumer))
            .chain(spec.outputs().map(|q| (q, Role::Producer)))
            .collect();
        let claim = Claim {
            kind: PortKind::Other,
            name: name.clone(),
            roles,
            buffers: buffers_needed(&spec),
        };
        let text = spec.to_string();
        let claim_error = |source| BalancePortError::Claim { spec: text, source };
        self.set.add(spec, claim, claim_error, |spec, c, buffers| {
            let queues = c.queues().clone();
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
                name,
                pool: c.pool().view().clone(),
                inputs: spec.inputs().iter().map(|&q| queues.consumer(q)).collect(),
                outputs: spec.outputs().map(|q| queues.producer(q)).collect(),
                queues: queues.clone(),
                bells,
                buffers,
                spec: spec.clone(),
            });
            let counters = port.counters();
            Ok((Box::new(port), counters))
        })
    }

    /// Stops the balancer reading exactly the queues `inputs`; returns its
    /// name and how many buffers came back to the cluster.
    pub fn remove(&self, inputs: &[u16]) -> Result<(String, usize), BalancePortError> {
        self.set.remove(
            |s| s.inputs() == inputs,
            |p| p.spec.to_string(),
            |ports| BalancePortError::NoPort {
                inputs: inputs
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join("+"),
                ports,
            },
        )
    }

    /// Stops every balancer (at shutdown, or when a start fails).
    pub fn remove_all(&self) {
        self.set.remove_all()
    }

    /// Every balancer's counters, in the order they were added.
    pub fn stats(&self) -> Vec<BalancePortStats> {
        self.set.stats()
    }

    /// The balancer named `name` (`balance:in=..,out=..`), for `move`.
    pub fn id_of(&self, name: &str) -> Option<PortId> {
        self.set.id_of(name)
    }
}
