//! zc-host: the host side of zc.
//!
//! Memory: the pool (`pool`, `shm`), the shared queues (`ring`, `queues`,
//! `futex`) and who holds which buffer (`owner`). A cluster's accounting
//! (`cluster`): roles, spare buffers, reclaim. Ports (`port`), everything
//! that moves packets between a cluster and the outside (the vhost-user
//! export first), and the workers that step them (`worker`). What both
//! report (`stats`), and the Prometheus exposition of it (`metrics`). The control protocol between zc-hostd and the
//! processes that attach (`control`) and the client end a host application
//! uses (`client`). Running VMs, over QEMU's QMP (`qmp`, `hotplug`) or
//! libvirt (`libvirt`), behind one interface (`vmlink`). The daemon (`daemon`)
//! composes all of these; nothing else depends on it.
//! `access` says who may open the sockets and the pool, `peer` who is on the
//! other end of a control connection; `paths` keeps the daemon from replacing or removing files that are not
//! its own; `cpu` checks and applies `-g`; `handover` is what a daemon
//! leaves its successor at a graceful restart.

pub mod access;
pub mod client;
pub mod cluster;
pub mod control;
pub mod cpu;
pub mod daemon;
pub mod futex;
pub mod handover;
pub mod hotplug;
pub mod journal;
pub mod libvirt;
pub mod metrics;
pub mod owner;
pub mod paths;
pub mod peer;
pub mod pool;
pub mod port;
pub mod qmp;
pub mod queues;
pub mod ring;
pub mod shm;
pub mod stats;
pub mod vmlink;
pub mod worker;
