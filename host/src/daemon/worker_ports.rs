//! The daemon's ports on the workers other than exports, kept together so
//! that every place that stops them (a failed start, a graceful restart,
//! shutdown) stops all of them: they start in one order and stop in the
//! reverse one.

use super::balancers::Balancers;
use super::nics::Nics;
use super::reflectors::Reflectors;
use super::registry::Registry;
use super::server::{DaemonError, DaemonOptions};
use crate::worker::PortId;
use std::sync::Arc;

pub struct WorkerPorts {
    pub nics: Nics,
    pub reflectors: Reflectors,
    pub balancers: Balancers,
}

impl WorkerPorts {
    /// Starts the ports of the command line; all or nothing.
    pub fn start(registry: &Arc<Registry>, opts: &DaemonOptions) -> Result<Self, DaemonError> {
        let ports = WorkerPorts {
            nics: Nics::new(registry.clone()),
            reflectors: Reflectors::new(registry.clone()),
            balancers: Balancers::new(registry.clone()),
        };
        let started = ports
            .nics
            .start_all(&opts.nics)
            .map_err(DaemonError::from)
            .and_then(|()| Ok(ports.reflectors.start_all(&opts.reflectors)?))
            .and_then(|()| Ok(ports.balancers.start_all(&opts.balancers)?));
        match started {
            Ok(()) => Ok(ports),
            Err(e) => {
                ports.remove_all();
                Err(e)
            }
        }
    }

    /// Stops every port; each gives its buffers back to the cluster.
    pub fn remove_all(&self) {
        self.balancers.remove_all();
        self.reflectors.remove_all();
        self.nics.remove_all();
    }

    /// The port named `name`, of whichever kind, for `move`.
    pub fn id_of(&self, name: &str) -> Option<PortId> {
        self.nics
            .id_of(name)
            .or_else(|| self.reflectors.id_of(name))
            .or_else(|| self.balancers.id_of(name))
    }
}
