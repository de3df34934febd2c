//! zc-hostd: composes a cluster, its ports and the workers that step them,
//! and serves the control socket. Nothing outside depends on it.

pub mod balancers;
pub mod lock;
pub mod metrics;
pub mod nics;
pub mod policy;
pub mod port_set;
pub mod reflectors;
pub mod registry;
pub mod server;
pub mod vm;
pub mod worker_ports;
