//! zc-hostd: owns a cluster and serves its control socket.

pub mod cluster;
pub mod lock;
pub mod registry;
pub mod server;
pub mod vm;
