//! The daemon's reflector ports (`--reflect`, `reflect add|del`) on its
//! workers: what each claims from the cluster (the consumer role of its
//! `in` queue, the producer role of its `out` queue, a burst of buffers)
//! and the port made with that claim.

use super::port_set::{Claim, PlaceError, Placed, PortSet};
use super::registry::Registry;
use crate::cluster::{AttachError, PortKind};
use crate::control::Role;
use crate::port::reflect::{
    ReflectCounters, ReflectParts, ReflectPort, ReflectPortStats, ReflectSpec, ReflectSpecError,
    BURST,
};
use crate::queues::Side;
use crate::worker::PortId;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ReflectPortError {
    #[error(transparent)]
    Spec(#[from] ReflectSpecError),
    #[error("--reflect {spec}: {source}")]
    Claim { spec: String, source: AttachError },
    #[error("no reflector consumes queue {input}; the reflectors: {ports}")]
    NoPort { input: u16, ports: String },
    #[error(transparent)]
    Place(#[from] PlaceError),
}

type Running = Placed<ReflectSpec, Arc<ReflectCounters>>;

pub struct Reflectors {
    set: PortSet<ReflectSpec, Arc<ReflectCounters>, ReflectPortStats>,
}

fn stats_of(p: &Running, worker: Option<usize>) -> ReflectPortStats {
    ReflectPortStats {
        name: p.name.clone(),
        input: p.spec.input,
        output: p.spec.output,
        worker,
        counters: p.counters.snapshot(),
    }
}

impl Reflectors {
    pub fn new(registry: Arc<Registry>) -> Reflectors {
        Reflectors {
            set: PortSet::new(registry, stats_of),
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
        let name = spec.port_name();
        let claim = Claim {
            kind: PortKind::Other,
            name: name.clone(),
            roles: vec![(spec.input, Role::Consumer), (spec.output, Role::Producer)],
            buffers: BURST as u32,
        };
        let claim_error = |source| ReflectPortError::Claim {
            spec: spec.to_string(),
            source,
        };
        self.set.add(spec, claim, claim_error, |spec, c, buffers| {
            let queues = c.queues().clone();
            let bell = queues
                .bell(spec.input, Side::Consumer)
                .expect("the daemon's queue area has every bell")
                .as_raw_fd();
            let port = ReflectPort::new(ReflectParts {
                name,
                pool: c.pool().view().clone(),
                input: queues.consumer(spec.input),
                output: queues.producer(spec.output),
                queues: queues.clone(),
                bell,
                buffers,
            });
            let counters = port.counters();
            Ok((Box::new(port), counters))
        })
    }

    /// Stops the reflector consuming queue `input`; returns its name and
    /// how many buffers came back to the cluster.
    pub fn remove(&self, input: u16) -> Result<(String, usize), ReflectPortError> {
        self.set.remove(
            |s| s.input == input,
            |p| format!("{} ({})", p.name, p.spec),
            |ports| ReflectPortError::NoPort { input, ports },
        )
    }

    /// Stops every reflector (at shutdown, or when a start fails).
    pub fn remove_all(&self) {
        self.set.remove_all()
    }

    /// Every reflector's counters, in the order they were added.
    pub fn stats(&self) -> Vec<ReflectPortStats> {
        self.set.stats()
    }

    /// The reflector named `name` (`reflect:<in>`), for `move`.
    pub fn id_of(&self, name: &str) -> Option<PortId> {
        self.set.id_of(name)
    }
}
