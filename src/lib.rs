//! zc: zero-copy packet queues between a Linux host and its KVM guests.
//!
//! ```no_run
//! use zc::{Receiver, QueueEnd};
//! let mut rx = zc::open_rx("zc:99@0")?;
//! let mut burst = rx.take_buffers(32)?;
//! loop {
//!     let n = rx.recv_burst(&mut burst);
//!     for h in &burst[..n] {
//!         let pkt = rx.pool().packet(h);
//!         println!("{} bytes", pkt.len());
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The same names work everywhere: `zc:<cluster>@<queue>` opens a queue of a
//! cluster served by `zc-hostd` on this host.

pub mod capture;
pub mod latency;
mod open;
pub mod probe;
pub mod testpkt;
pub mod tool;

pub use open::{
    open_duplex_with, open_rx, open_rx_with, open_tx, open_tx_with, Direction, Error, Options, Rx,
    Tx,
};
pub use zc_proto::{
    BufferHandle, BufferIndex, Name, PacketMut, PacketRef, PoolView, QueueEnd, Receiver, Sender,
};
