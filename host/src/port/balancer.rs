//! The balancer port: reads one or more cluster queues and distributes
//! their packets to groups of output queues, the way PF_RING ZC's
//! zbalance_ipc does. Every group gets every packet; within a group a
//! packet goes to one queue, picked by a symmetric flow hash or in turn
//! (`hash`), or to all of them (`fanout`).

pub mod hash;
pub mod spec;

pub use hash::Hash;
pub use spec::{BalanceError, BalanceSpec, Full};
