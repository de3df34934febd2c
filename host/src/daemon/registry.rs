//! The daemon's running exports, from the command line and attached to VMs
//! at run time, and the directory slots they occupy.

use super::cluster::Cluster;
use crate::export::shared::ExportShared;
use crate::export::{self, Export, ExportConfig, ExportError, ExportSpec};
use std::sync::{Arc, Mutex, MutexGuard};
use zc_proto::layout::MAX_EXPORTS;

/// What a run-time export gets unless it says otherwise (the daemon's
/// `--stock` and `-g`).
#[derive(Clone, Debug, Default)]
pub struct ExportDefaults {
    pub stock: u32,
    pub cores: Vec<usize>,
}

/// Lock order: `exports` before the cluster.
pub struct Registry {
    cluster: Arc<Mutex<Cluster>>,
    exports: Mutex<Vec<Export>>,
    defaults: ExportDefaults,
}

impl Registry {
    pub fn new(
        cluster: Arc<Mutex<Cluster>>,
        exports: Vec<Export>,
        defaults: ExportDefaults,
    ) -> Self {
        Registry {
            cluster,
            exports: Mutex::new(exports),
            defaults,
        }
    }

    pub fn cluster(&self) -> &Arc<Mutex<Cluster>> {
        &self.cluster
    }

    fn list(&self) -> MutexGuard<'_, Vec<Export>> {
        self.exports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The running exports' shared state, in slot order.
    pub fn shared(&self) -> Vec<Arc<ExportShared>> {
        let mut v: Vec<_> = self.list().iter().map(|e| e.shared.clone()).collect();
        v.sort_by_key(|s| s.slot);
        v
    }

    /// Starts an export in the lowest free directory slot.
    pub fn add(&self, spec: ExportSpec) -> Result<Arc<ExportShared>, ExportError> {
        let mut list = self.list();
        let slot = (0..MAX_EXPORTS)
            .find(|s| list.iter().all(|e| e.shared.slot != *s))
            .ok_or(ExportError::TooMany)?;
        let d = &self.defaults;
        let cfg = ExportConfig {
            spec,
            stock: d.stock,
            core: (!d.cores.is_empty()).then(|| d.cores[slot % d.cores.len()]),
        };
        let e = export::start_one(&self.cluster, slot, &cfg)?;
        let shared = e.shared.clone();
        list.push(e);
        Ok(shared)
    }

    /// Stops the export `shared` and returns its buffers to the pool;
    /// returns how many it held.
    pub fn remove(&self, shared: &Arc<ExportShared>) -> Result<usize, ExportError> {
        let mut list = self.list();
        let Some(i) = list.iter().position(|e| Arc::ptr_eq(&e.shared, shared)) else {
            return Ok(0);
        };
        let e = list.swap_remove(i);
        e.stop(&self.cluster)
    }

    /// At shutdown: removes the exports' socket files that are still ours.
    pub fn remove_sockets(&self) {
        for e in self.list().iter() {
            e.remove_socket();
        }
    }
}
