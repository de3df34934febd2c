//! zc-host: the host side of zc.
//!
//! The pool (`pool`), the shared queues (`ring`, `queues`), the control
//! protocol between zc-hostd and the processes that attach (`control`), the
//! daemon itself (`daemon`), its vhost-user exports (`export`) and their
//! hot-plug into running VMs (`qmp`, `hotplug`), and the client end a host
//! application uses (`client`). `paths` keeps the daemon from replacing or
//! removing files that are not its own; `cpu` checks and applies `-g`.

pub mod client;
pub mod control;
pub mod cpu;
pub mod daemon;
pub mod export;
pub mod futex;
pub mod hotplug;
pub mod paths;
pub mod pool;
pub mod port;
pub mod qmp;
pub mod queues;
pub mod ring;
pub mod shm;
pub mod worker;
