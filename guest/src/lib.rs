//! zc-guest: the userspace virtio-net driver that swaps pool buffers with
//! the host.
//!
//! One driver core ([`core`]) over a split virtqueue ([`virtq`]) placed in
//! the export's ring area of the pool ([`pool`]), under two transports: the
//! virtio-pci device of a VM ([`pci`]) and a vhost-user socket without a VM
//! ([`vhost_user`]). [`queue`] puts the zc API on top.

pub mod core;
pub mod error;
pub mod init;
pub mod pool;
pub mod queue;
pub mod transport;
pub mod vhost_user;
pub mod virtq;

#[cfg(test)]
mod testdev;

pub use error::{Direction, GuestError, Violation};
pub use queue::{GuestRx, GuestTx};
