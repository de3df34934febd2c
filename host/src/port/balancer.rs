//! The balancer port (`--balance in=Q[+Q...],out=G[/G...]`): reads one or
//! more cluster queues and distributes their packets to groups of output
//! queues, the way PF_RING ZC's zbalance_ipc does. Every group gets every
//! packet; within a group a packet goes to one queue, picked by a
//! symmetric flow hash or in turn (`hash`), or to all of them (`fanout`).
//!
//! It runs on the daemon's workers beside the exports and interface ports.
//! The buffer that arrived is the buffer that leaves for the packet's last
//! destination; every other destination gets a copy in a buffer of the
//! port's own (counted as `copied`), so no two consumers ever share a
//! buffer and none can change what another reads.
//!
//! Each output queue has a batch of [`BURST`] buffers of the port's: a
//! step fills the batches, sends each into its queue (the queue's empties
//! come back in their places) and, with `full=drop`, makes what did not
//! fit empty again and counts it as dropped for that queue only: a slow
//! or absent consumer never stalls the other queues. With `full=wait` (one
//! group) what did not fit stays in the batch and the inputs are not read
//! until it has gone.

pub mod hash;
pub mod spec;
mod stats;

pub use hash::{flow_hash, Hash, HEADER_BYTES};
pub use spec::{BalanceError, BalanceSpec, Full};
pub use stats::{
    balance_lines, BalanceCounters, BalancePortStats, BalanceStats, GroupStats, OutputStats,
};

use crate::port::{Arm, Port};
use crate::queues::QueueArea;
use crate::ring::{Consumer, Producer};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;
use zc_proto::{BufferHandle, BufferIndex, PoolView};

/// Packets read from an input per step.
pub const BURST: usize = 32;

/// How often a balancer waiting for room (`full=wait`) looks again: the
/// consumers of its queues do not ring it.
const WAIT_POLL: Duration = Duration::from_micros(200);

/// Buffers a balancer of `spec` holds: its hand, and a batch per output.
pub fn buffers_needed(spec: &BalanceSpec) -> u32 {
    (BURST * (1 + spec.outputs().count())) as u32
}

/// What a balancer is made of.
pub struct BalanceParts {
    pub name: String,
    pub spec: BalanceSpec,
    pub pool: PoolView,
    /// The consumer ends of `spec.inputs()`, in that order.
    pub inputs: Vec<Consumer>,
    /// The producer ends of `spec.outputs()`, in that order.
    pub outputs: Vec<Producer>,
    /// Keeps the ring memory of the ends (and their bells) alive.
    pub queues: Arc<QueueArea>,
    /// The inputs' consumer bells: their producers ring them while the
    /// worker sleeps.
    pub bells: Vec<RawFd>,
    /// Exactly [`buffers_needed`] empty buffers, the port's alone.
    pub buffers: Vec<BufferIndex>,
}

/// One output queue: its ring end and a batch of the port's buffers, the
/// first `pending` of them packets waiting to go.
struct Output {
    ring: Producer,
    batch: Vec<BufferHandle>,
    pending: usize,
}

/// One group: its outputs are `first..first + len` of the port's.
struct Group {
    first: usize,
    len: usize,
    /// `rr`: the next queue's place in the group.
    next: usize,
}

pub struct BalancePort {
    name: String,
    hash: Hash,
    full: Full,
    pool: PoolView,
    inputs: Vec<Consumer>,
    /// Which input is read first next step (each gets a turn at the front).
    first_input: usize,
    outputs: Vec<Output>,
    groups: Vec<Group>,
    _queues: Arc<QueueArea>,
    bells: Vec<RawFd>,
    hand: Vec<BufferHandle>,
    /// Scratch: the outputs of the packet being distributed.
    targets: Vec<usize>,
    stats: stats::Local,
    counters: Arc<BalanceCounters>,
}

/// Makes `h` an empty buffer again (a packet dropped, its buffer kept).
fn empty(h: &mut BufferHandle) {
    let i = h.index();
    // SAFETY: the handle keeps the buffer it names.
    unsafe { h.replace(i, 0) };
}

impl BalancePort {
    pub fn new(p: BalanceParts) -> BalancePort {
        let mut bufs = p
            .buffers
            .into_iter()
            // SAFETY: the cluster gave these buffers to this port alone.
            .map(|b| unsafe { BufferHandle::from_raw(b, 0) });
        let hand = bufs.by_ref().take(BURST).collect();
        let outputs: Vec<Output> = p
            .outputs
            .into_iter()
            .map(|ring| Output {
                ring,
                batch: bufs.by_ref().take(BURST).collect(),
                pending: 0,
            })
            .collect();
        let mut first = 0;
        let groups = p
            .spec
            .groups()
            .iter()
            .map(|g| {
                let group = Group {
                    first,
                    len: g.len(),
                    next: 0,
                };
                first += g.len();
                group
            })
            .collect();
        let counters = Arc::new(BalanceCounters::new(&p.spec));
        BalancePort {
            name: p.name,
            hash: p.spec.hash(),
            full: p.spec.full(),
            pool: p.pool,
            inputs: p.inputs,
            first_input: 0,
            stats: stats::Local::new(outputs.len()),
            outputs,
            groups,
            _queues: p.queues,
            bells: p.bells,
            hand,
            targets: Vec::new(),
            counters,
        }
    }

    /// Counters that any thread may read while the port runs.
    pub fn counters(&self) -> Arc<BalanceCounters> {
        self.counters.clone()
    }

    fn indices(&self) -> Vec<BufferIndex> {
        self.hand
            .iter()
            .chain(self.outputs.iter().flat_map(|o| &o.batch))
            .map(|h| h.index())
            .collect()
    }

    fn pending(&self) -> bool {
        self.outputs.iter().any(|o| o.pending > 0)
    }

    /// The outputs packet `i` of the hand goes to, into `self.targets`.
    fn pick(&mut self, i: usize) {
        self.targets.clear();
        let h = match self.hash {
            Hash::Ip | Hash::FiveTuple => {
                let mut head = [0u8; HEADER_BYTES];
                let n = self.pool.packet(&self.hand[i]).read_at(0, &mut head);
                flow_hash(&head[..n], self.hash)
            }
            Hash::Rr | Hash::Fanout => 0,
        };
        for g in &mut self.groups {
            match self.hash {
                Hash::Fanout => self.targets.extend(g.first..g.first + g.len),
                Hash::Rr => {
                    self.targets.push(g.first + g.next);
                    g.next = (g.next + 1) % g.len;
                }
                Hash::Ip | Hash::FiveTuple => {
                    self.targets.push(g.first + (h as usize % g.len));
                }
            }
        }
    }

    /// Puts the `n` packets of the hand into the outputs' batches: copies
    /// for all destinations but the last, which gets the buffer itself
    /// (the hand gets that batch's empty in exchange).
    fn distribute(&mut self, n: usize) {
        for i in 0..n {
            self.pick(i);
            let last = self.targets.len() - 1;
            for t in 0..=last {
                let o = self.targets[t];
                let out = &mut self.outputs[o];
                let k = out.pending;
                if t == last {
                    std::mem::swap(&mut self.hand[i], &mut out.batch[k]);
                } else {
                    let src = self.pool.packet(&self.hand[i]);
                    // A buffer holds what a buffer held: cannot fail.
                    let _ = self.pool.packet_mut(&mut out.batch[k]).copy_from(&src);
                    let s = &mut self.stats.outputs[o];
                    s.copied += 1;
                    s.bytes_copied += src.len() as u64;
                }
                out.pending += 1;
            }
        }
    }

    /// Sends every batch; returns the packets that went.
    fn send(&mut self) -> usize {
        let mut moved = 0;
        for (o, out) in self.outputs.iter_mut().enumerate() {
            if out.pending == 0 {
                continue;
            }
            let k = out.pending;
            let mut bytes: u64 = out.batch[..k].iter().map(|h| u64::from(h.len())).sum();
            let sent = out.ring.send_burst(&mut out.batch[..k]);
            let s = &mut self.stats.outputs[o];
            match self.full {
                Full::Drop => {
                    for h in &mut out.batch[sent..k] {
                        bytes -= u64::from(h.len());
                        empty(h);
                    }
                    s.dropped += (k - sent) as u64;
                    out.pending = 0;
                }
                Full::Wait => {
                    bytes = bytes.saturating_sub(
                        out.batch[sent..k].iter().map(|h| u64::from(h.len())).sum(),
                    );
                    // The empties that came back go behind what still waits.
                    out.batch[..k].rotate_left(sent);
                    out.pending = k - sent;
                }
            }
            s.forwarded += sent as u64;
            s.bytes += bytes;
            moved += sent;
        }
        moved
    }

    fn publish(&mut self) {
        self.stats.bad_slots = self.inputs.iter().map(|c| c.bad_slots()).sum::<u64>()
            + self.outputs.iter().map(|o| o.ring.bad_slots()).sum::<u64>();
        self.counters.publish(&self.stats);
    }
}

impl Port for BalancePort {
    fn name(&self) -> &str {
        &self.name
    }

    fn step(&mut self) -> usize {
        let mut moved = 0;
        if self.pending() {
            moved += self.send();
            if self.pending() {
                self.publish();
                return moved;
            }
        }
        let count = self.inputs.len();
        for j in 0..count {
            let i = (self.first_input + j) % count;
            let n = self.inputs[i].recv_burst(&mut self.hand);
            if n == 0 {
                continue;
            }
            self.stats.packets_in += n as u64;
            self.distribute(n);
            moved += n + self.send();
            if self.pending() {
                break;
            }
        }
        self.first_input = (self.first_input + 1) % count;
        self.publish();
        moved
    }

    fn arm(&mut self) -> Arm {
        if self.pending() {
            return Arm::SleepAtMost(WAIT_POLL);
        }
        let mut ready = false;
        for c in &mut self.inputs {
            ready |= c.arm();
        }
        if ready {
            Arm::Busy
        } else {
            Arm::Sleep
        }
    }

    fn disarm(&mut self, _slept: bool) {
        for c in &mut self.inputs {
            c.disarm();
        }
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        self.bells.clone()
    }

    fn held(&self) -> Vec<BufferIndex> {
        self.indices()
    }

    fn stop(self: Box<Self>) -> Vec<BufferIndex> {
        self.indices()
    }
}
