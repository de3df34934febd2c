//! The daemon's interface ports (`--nic`, `nic add|del`) on its workers:
//! what each claims from the cluster (the ingress queue's producer role,
//! the egress queue's consumer role, buffers for the kernel's rings) and
//! the port bound to the interface with that claim.

use super::port_set::{Claim, PlaceError, Placed, PortSet};
use super::registry::Registry;
use crate::cluster::{AttachError, PortKind};
use crate::control::Role;
use crate::port::nic::{
    NicCounters, NicError, NicParts, NicPort, NicPortStats, NicSpec, NicSpecError,
};
use crate::queues::Side;
use crate::worker::PortId;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use thiserror::Error;

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
    #[error(transparent)]
    Place(#[from] PlaceError),
}

type Running = Placed<NicSpec, Arc<NicCounters>>;

pub struct Nics {
    set: PortSet<NicSpec, Arc<NicCounters>, NicPortStats>,
}

fn stats_of(p: &Running, worker: Option<usize>) -> NicPortStats {
    NicPortStats {
        name: p.name.clone(),
        ifname: p.spec.ifname.clone(),
        queue: p.spec.queue,
        ingress: p.spec.ingress,
        egress: p.spec.egress,
        worker,
        counters: p.counters.snapshot(),
    }
}

impl Nics {
    pub fn new(registry: Arc<Registry>) -> Nics {
        Nics {
            set: PortSet::new(registry, stats_of),
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
        let name = spec.port_name();
        // Control requests are served one at a time, so nothing can add
        // the same port between this look and the add.
        if self.set.contains(&name) {
            return Err(NicPortError::Duplicate { port: name });
        }
        let roles = [
            (spec.ingress, Role::Producer),
            (spec.egress, Role::Consumer),
        ]
        .into_iter()
        .filter_map(|(q, role)| q.map(|q| (q, role)))
        .collect();
        let claim = Claim {
            kind: PortKind::Interface,
            name,
            roles,
            buffers: PORT_BUFFERS,
        };
        let text = spec.to_string();
        let claim_error = |source| NicPortError::Claim { spec: text, source };
        self.set.add(spec, claim, claim_error, |spec, c, buffers| {
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
            let port = NicPort::open(&spec.config(), parts)
                .map_err(|(e, back)| (NicPortError::Open(e), back))?;
            let counters = port.counters();
            Ok((Box::new(port), counters))
        })
    }

    /// Stops the port of `ifname`'s receive queue `queue`; returns its
    /// name and how many buffers came back to the cluster.
    pub fn remove(&self, ifname: &str, queue: u32) -> Result<(String, usize), NicPortError> {
        self.set.remove(
            |s| s.ifname == ifname && s.queue == queue,
            |p| p.name.clone(),
            |ports| NicPortError::NoPort {
                port: format!("nic:{ifname}@{queue}"),
                ports,
            },
        )
    }

    /// Stops every port (at shutdown, or when a start fails).
    pub fn remove_all(&self) {
        self.set.remove_all()
    }

    /// Every port's counters, in the order they were added.
    pub fn stats(&self) -> Vec<NicPortStats> {
        self.set.stats()
    }

    /// The ports of interface `ifname` (what `zc:IFNAME` resolves to).
    pub fn of_interface(&self, ifname: &str) -> Vec<NicPortStats> {
        self.set.stats_where(|s| s.ifname == ifname)
    }

    /// The port named `name` (`nic:<ifname>@<queue>`), for `move`.
    pub fn id_of(&self, name: &str) -> Option<PortId> {
        self.set.id_of(name)
    }
}
