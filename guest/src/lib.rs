//! zc-guest: the userspace virtio-net driver that swaps pool buffers with
//! the host.
//!
//! One driver core ([`core`]) over a split virtqueue ([`virtq`]) placed in
//! the export's ring area of the pool ([`pool`]), under two transports: the
//! virtio-pci device of a VM ([`pci`]) and a vhost-user socket without a VM
//! ([`vhost_user`]). [`queue`] puts the zc API on top.

pub mod cleanup;
pub mod core;
pub mod error;
pub mod held;
pub mod init;
pub mod pci;
pub mod pool;
pub mod queue;
pub mod transport;
pub mod vhost_user;
pub mod virtq;

#[cfg(test)]
mod testdev;

pub use error::{Direction, GuestError, Violation};
pub use queue::{open_duplex_interface, open_duplex_pci, open_duplex_vhost_user, GuestRx, GuestTx};

/// Whether this machine (a VM) has an ivshmem device holding the pool of
/// `cluster`: then `zc:<cluster>@<queue>` opens the PCI transport.
pub fn has_pci_pool(cluster: u32) -> bool {
    pci::has_pool(&pci::sysfs::sys_root(), Some(cluster))
}

/// Whether any ivshmem device on the bus holds a zc pool (this is a VM
/// attached to a zc cluster).
pub fn has_any_pci_pool() -> bool {
    pci::has_pool(&pci::sysfs::sys_root(), None)
}
