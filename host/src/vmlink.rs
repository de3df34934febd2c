//! What `attach` and `detach` need from whatever manages a running VM:
//! add and remove the pool and an export's vhost-user device. QEMU's own
//! QMP socket (`hotplug`) and libvirt (`libvirt`) do it their ways; the
//! bookkeeping around them (`daemon::vm`) is one for both.

use crate::control::VmRef;
use crate::hotplug::{NetPlug, PoolPlug};
use crate::libvirt::{Domain, LibvirtError};
use crate::qmp::{Qmp, QmpError};
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LinkError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
}

impl LinkError {
    /// Why the VM counts as gone (its QMP socket does not answer; libvirt
    /// has no running domain of that name), if it does: detach then
    /// removes the host side only.
    pub fn gone(&self) -> Option<String> {
        match self {
            LinkError::Qmp(QmpError::Connect { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Some(format!("its QMP socket does not answer ({source})"))
            }
            LinkError::Libvirt(e) => e.gone(),
            _ => None,
        }
    }
}

/// A connection to one VM's manager for the steps of one attach or detach.
pub trait VmLink {
    /// Refuses a VM the export cannot work in, before anything is added.
    fn check(&mut self) -> Result<(), LinkError> {
        Ok(())
    }
    /// Adds the pool unless the VM has it already; true when added here.
    fn add_pool(&mut self, pool: &PoolPlug) -> Result<bool, LinkError>;
    /// Removes a pool that `add_pool` added.
    fn remove_pool(&mut self, pool: &PoolPlug, timeout: Duration) -> Result<(), LinkError>;
    /// Adds the export's device; a step that fails undoes the ones before.
    fn add_net(&mut self, net: &NetPlug) -> Result<(), LinkError>;
    /// Unplugs the export's device, waiting for the guest to release it.
    fn remove_net(&mut self, net: &NetPlug, timeout: Duration) -> Result<(), LinkError>;
}

impl VmLink for Qmp {
    fn add_pool(&mut self, pool: &PoolPlug) -> Result<bool, LinkError> {
        Ok(pool.add(self)?)
    }

    fn remove_pool(&mut self, pool: &PoolPlug, timeout: Duration) -> Result<(), LinkError> {
        Ok(PoolPlug::remove(self, pool.cluster, timeout)?)
    }

    fn add_net(&mut self, net: &NetPlug) -> Result<(), LinkError> {
        Ok(net.add(self)?)
    }

    fn remove_net(&mut self, net: &NetPlug, timeout: Duration) -> Result<(), LinkError> {
        Ok(net.remove(self, timeout)?)
    }
}

impl VmLink for Domain {
    fn check(&mut self) -> Result<(), LinkError> {
        Ok(self.check_shared_memory()?)
    }

    fn add_pool(&mut self, pool: &PoolPlug) -> Result<bool, LinkError> {
        Ok(Domain::add_pool(self, pool)?)
    }

    fn remove_pool(&mut self, pool: &PoolPlug, timeout: Duration) -> Result<(), LinkError> {
        Ok(Domain::remove_pool(self, pool, timeout)?)
    }

    fn add_net(&mut self, net: &NetPlug) -> Result<(), LinkError> {
        Ok(Domain::add_net(self, net)?)
    }

    fn remove_net(&mut self, net: &NetPlug, timeout: Duration) -> Result<(), LinkError> {
        Ok(Domain::remove_net(self, net, timeout)?)
    }
}

/// Connects to the manager of `vm`.
pub fn open(vm: &VmRef) -> Result<Box<dyn VmLink>, LinkError> {
    Ok(match vm {
        VmRef::Qmp(path) => Box::new(Qmp::connect(Path::new(path))?),
        VmRef::Libvirt { uri, domain } => Box::new(Domain::connect(uri, domain)?),
    })
}
