//! Interface ports: a host network interface as a port of a cluster. What
//! arrives on one of its receive queues goes into the cluster queue
//! `ingress`; what a process sends into the cluster queue `egress` leaves
//! on the interface.
//!
//! Two ways in and out of the kernel, chosen by `mode`:
//! - `xdp`: AF_XDP with the pool's buffers registered as the UMEM,
//!   so a driver with AF_XDP zero-copy support writes received frames
//!   straight into pool buffers and sends from them. Drivers without it
//!   (veth) run AF_XDP in copy mode: the kernel copies, zc does not.
//! - `packet`: AF_PACKET, a TPACKET_V3 receive ring and a
//!   PACKET_TX_RING that bypasses the qdisc; every packet is copied
//!   between the kernel's ring and a pool buffer.
//!
//! The port owns every buffer it was given for as long as it lives, in one
//! of these places: its spare list, its hands, or lent to the kernel (the
//! XDP fill ring, the TX ring until completion). `stop` gives every one back.
//!
//! `auto` tries AF_XDP first and falls back to AF_PACKET where it cannot
//! attach, except for refusals that are the user's call: another XDP
//! program on the interface (`takeover` replaces one attached through
//! netlink), `zerocopy=on` on a driver without it, missing privileges.
//!
//! The redirect program is libxdp's `xsk_def_xdp_prog.o` (Debian's
//! libxdp1), loaded with aya rather than linked through libxdp: aya is
//! pure Rust and builds here without C headers, attaches through a bpf
//! link (the program goes when the port's file descriptors close, even if
//! the daemon is killed), and needs no /sys/fs/bpf mount, which libxdp's
//! dispatcher does.

mod link;
mod packet;
mod spec;
mod stats;
mod xdp;

pub use link::Link;
pub use spec::{NicSpec, NicSpecError, NicTarget};
pub use stats::{nic_line, NicCounters, NicPortStats, NicStats};

use crate::port::{Arm, Port};
use crate::queues::QueueArea;
use crate::ring::{Consumer, Producer};
use std::os::fd::RawFd;
use std::sync::Arc;
use thiserror::Error;
use zc_proto::{BufferIndex, PoolView};

/// Packets moved per step and direction.
pub const BURST: usize = 32;

/// How the port reaches the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// AF_XDP where it attaches, AF_PACKET where it does not.
    Auto,
    Xdp,
    Packet,
}

/// Whether AF_XDP may, must or must not bind in zero-copy mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZeroCopy {
    Auto,
    On,
    Off,
}

#[derive(Clone, Debug)]
pub struct NicConfig {
    pub ifname: String,
    /// The interface's hardware queue to serve.
    pub queue: u32,
    pub mode: Mode,
    pub zerocopy: ZeroCopy,
    /// Detach an XDP program someone else attached, instead of refusing.
    pub takeover: bool,
}

#[derive(Debug, Error)]
pub enum NicError {
    #[error("no interface {0} (ip link lists the interfaces)")]
    NoInterface(String),
    #[error("{ifname} has receive queues 0..{} ({count} of them): queue {queue} does not exist", count - 1)]
    NoQueue {
        ifname: String,
        queue: u32,
        count: u32,
    },
    #[error("{ifname}: {what} needs root (CAP_NET_ADMIN{})", if *.bpf { " and CAP_BPF" } else { "" })]
    NotRoot {
        ifname: String,
        what: &'static str,
        bpf: bool,
    },
    #[error("{ifname} already runs XDP program {id} ({name}); zc does not replace it unless told to (takeover), or use mode=packet beside it")]
    Busy {
        ifname: String,
        id: u32,
        name: String,
    },
    #[error("{ifname}: cannot take over XDP program {id}: {source} (a program held by a bpf link goes only when its owner closes it)")]
    Takeover {
        ifname: String,
        id: u32,
        source: std::io::Error,
    },
    #[error("{ifname}: driver {driver} has no AF_XDP zero-copy support (zerocopy=on); use zerocopy=auto or off")]
    NoZeroCopy { ifname: String, driver: String },
    #[error("{ifname}: pool buffers of {buf_size} bytes cannot be AF_XDP chunks ({source}); the kernel takes 2048 to 4096 bytes (powers of two), larger ones on hugepages: start the cluster with --buf-size 2048 or 4096, or use mode=packet")]
    Chunk {
        ifname: String,
        buf_size: u32,
        source: std::io::Error,
    },
    #[error("{ifname}: {what}: {source}")]
    Os {
        ifname: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{ifname}: the port needs at least {need} buffers to run, it was given {given}")]
    TooFewBuffers {
        ifname: String,
        need: usize,
        given: usize,
    },
    #[error("{ifname}: an interface port needs an ingress or an egress queue")]
    NoDirection { ifname: String },
}

/// What a port is made of, exactly like the other ports: the pool, its
/// queue ends, and the buffers it may use.
pub struct NicParts {
    pub pool: PoolView,
    /// Where received packets go.
    pub ingress: Option<Producer>,
    /// What to send.
    pub egress: Option<Consumer>,
    /// Keeps the ring memory of the ends (and their bells) alive.
    pub queues: Arc<QueueArea>,
    /// Descriptors the ends' peers ring when this port sleeps on them
    /// (the egress queue's consumer bell: a host process or an export
    /// that sends rings it).
    pub bells: Vec<RawFd>,
    pub buffers: Vec<BufferIndex>,
}

/// The two directions' cluster queue ends, and the bells their peers ring
/// while the worker sleeps. The ends ring their own peers' bells, as the
/// queue area set them up.
pub(crate) struct Ends {
    pub ingress: Option<Producer>,
    pub egress: Option<Consumer>,
    pub bells: Vec<RawFd>,
    _queues: Arc<QueueArea>,
}

enum Backend {
    Xdp(Box<xdp::XdpPort>),
    Packet(Box<packet::PacketPort>),
}

/// A host interface as a cluster port.
pub struct NicPort {
    name: String,
    backend: Backend,
    counters: Arc<NicCounters>,
}

impl NicPort {
    /// Binds to the interface. On failure every buffer comes back with the
    /// error, so the caller's accounting is unchanged.
    pub fn open(cfg: &NicConfig, parts: NicParts) -> Result<NicPort, (NicError, Vec<BufferIndex>)> {
        let NicParts {
            pool,
            ingress,
            egress,
            queues,
            bells,
            buffers,
        } = parts;
        let fail = |e, b| Err((e, b));
        if ingress.is_none() && egress.is_none() {
            return fail(
                NicError::NoDirection {
                    ifname: cfg.ifname.clone(),
                },
                buffers,
            );
        }
        let Some(link) = Link::find(&cfg.ifname) else {
            return fail(NicError::NoInterface(cfg.ifname.clone()), buffers);
        };
        let count = link.rx_queues();
        if cfg.queue >= count {
            return fail(
                NicError::NoQueue {
                    ifname: cfg.ifname.clone(),
                    queue: cfg.queue,
                    count,
                },
                buffers,
            );
        }
        let ends = Ends {
            ingress,
            egress,
            bells,
            _queues: queues,
        };
        let counters = Arc::new(NicCounters::default());
        let backend = match cfg.mode {
            Mode::Packet => {
                packet::PacketPort::open(&link, cfg, pool, ends, buffers, counters.clone())
                    .map(|p| Backend::Packet(Box::new(p)))?
            }
            Mode::Xdp => xdp::XdpPort::open(&link, cfg, pool, ends, buffers, counters.clone())
                .map(|p| Backend::Xdp(Box::new(p)))
                .map_err(|r| (r.error, r.buffers))?,
            Mode::Auto => {
                match xdp::XdpPort::open(&link, cfg, pool.clone(), ends, buffers, counters.clone())
                {
                    Ok(p) => Backend::Xdp(Box::new(p)),
                    Err(r) => {
                        let xdp::Refused {
                            error: e,
                            buffers,
                            ends,
                        } = *r;
                        // Refusals that are the user's to decide stay refusals.
                        if matches!(
                            e,
                            NicError::Busy { .. }
                                | NicError::NoZeroCopy { .. }
                                | NicError::NotRoot { .. }
                        ) {
                            return fail(e, buffers);
                        }
                        log::warn!(
                            "{}: AF_XDP does not attach ({e}); using AF_PACKET",
                            cfg.ifname
                        );
                        packet::PacketPort::open(&link, cfg, pool, ends, buffers, counters.clone())
                            .map(|p| Backend::Packet(Box::new(p)))?
                    }
                }
            }
        };
        Ok(NicPort {
            name: format!("nic:{}@{}", cfg.ifname, cfg.queue),
            backend,
            counters,
        })
    }

    /// Counters that any thread may read while the port runs.
    pub fn counters(&self) -> Arc<NicCounters> {
        self.counters.clone()
    }
}

impl Port for NicPort {
    fn name(&self) -> &str {
        &self.name
    }

    fn step(&mut self) -> usize {
        match &mut self.backend {
            Backend::Xdp(p) => p.step(),
            Backend::Packet(p) => p.step(),
        }
    }

    fn arm(&mut self) -> Arm {
        match &mut self.backend {
            Backend::Xdp(p) => p.arm(),
            Backend::Packet(p) => p.arm(),
        }
    }

    fn disarm(&mut self, _slept: bool) {
        match &mut self.backend {
            Backend::Xdp(p) => p.disarm(),
            Backend::Packet(p) => p.disarm(),
        }
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        match &self.backend {
            Backend::Xdp(p) => p.wake_fds(),
            Backend::Packet(p) => p.wake_fds(),
        }
    }

    fn held(&self) -> Vec<BufferIndex> {
        match &self.backend {
            Backend::Xdp(p) => p.held(),
            Backend::Packet(p) => p.held(),
        }
    }

    fn stop(self: Box<Self>) -> Vec<BufferIndex> {
        match self.backend {
            Backend::Xdp(p) => p.stop(),
            Backend::Packet(p) => p.stop(),
        }
    }
}
