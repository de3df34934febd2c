//! Ports: everything that moves packets between a cluster and the world
//! outside it — a VM's virtio-net device over vhost-user (`export`), a
//! host interface (`nic`), a reflector that sends every packet back with
//! its MACs swapped (`reflect`), and the kinds the other issues add (a
//! balancer stage, a bridge into another cluster).
//!
//! A port is handed what it needs when it is made (the pool, the queue ends
//! it serves, the buffers it starts with) and knows nothing of the daemon
//! or of the worker that drives it. A worker (`crate::worker`) calls
//! [`Port::step`] on each of its ports while any of them has traffic, and
//! sleeps when none has, until one of the ports' wake-up descriptors fires.

pub mod balancer;
pub mod export;
pub mod nic;
pub mod reflect;

use std::os::fd::RawFd;
use std::time::Duration;
use zc_proto::BufferIndex;

/// What a port says when its worker is about to sleep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arm {
    /// Nothing to do until one of the port's wake-up descriptors fires.
    Sleep,
    /// As `Sleep`, but look again after this long even without a wake-up
    /// (something the port waits for does not wake it, e.g. room in a
    /// queue whose consumer does not signal).
    SleepAtMost(Duration),
    /// Work is already pending: do not sleep.
    Busy,
}

impl Arm {
    /// The worker's decision over all its ports: busy wins, else the
    /// shortest bound.
    pub fn combine(self, other: Arm) -> Arm {
        match (self, other) {
            (Arm::Busy, _) | (_, Arm::Busy) => Arm::Busy,
            (Arm::SleepAtMost(a), Arm::SleepAtMost(b)) => Arm::SleepAtMost(a.min(b)),
            (Arm::SleepAtMost(a), Arm::Sleep) | (Arm::Sleep, Arm::SleepAtMost(a)) => {
                Arm::SleepAtMost(a)
            }
            (Arm::Sleep, Arm::Sleep) => Arm::Sleep,
        }
    }
}

/// One stage that moves packets. Owned by one worker thread at a time
/// (`Send`, not `Sync`); moving it to another worker moves the value, with
/// every buffer it holds, so nothing is lost in transit.
pub trait Port: Send {
    /// Unique among the daemon's ports: how `stats` and `move` name it.
    fn name(&self) -> &str;

    /// Moves up to a burst each way; returns the packets moved (0: idle).
    /// Handles control requests addressed to the port first.
    fn step(&mut self) -> usize;

    /// The worker found every port idle and wants to sleep: ask whoever
    /// brings work (a guest's kicks, a queue's producer, an interface) to
    /// signal one of [`Port::wake_fds`] from now on, and say whether work
    /// arrived meanwhile.
    fn arm(&mut self) -> Arm;

    /// The worker is awake again (`slept`: it did sleep, rather than find
    /// work while arming): wakers may stop signalling.
    fn disarm(&mut self, slept: bool);

    /// Descriptors that become readable when the port may have work
    /// (eventfds, sockets); the worker waits on them edge-triggered and
    /// never reads them. They stay open for as long as the port lives.
    fn wake_fds(&self) -> Vec<RawFd>;

    /// Every pool buffer the port holds outside the cluster's rings right
    /// now (its hands, and buffers lent to whatever it serves). Called
    /// while the worker is parked, for the cluster's accounting.
    fn held(&self) -> Vec<BufferIndex>;

    /// Ends the port for good and returns every buffer it held.
    fn stop(self: Box<Self>) -> Vec<BufferIndex>;

    /// What the port holds in its hands, for a successor daemon to take
    /// over at a graceful restart (called with the port off its worker).
    /// `None`: the port hands nothing over (its buffers are found by
    /// elimination, as after a crash).
    fn hands(&self) -> Option<crate::handover::PortHands> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::Arm;
    use std::time::Duration;

    #[test]
    fn busy_wins_and_the_shortest_bound_is_kept() {
        let ms = Duration::from_millis;
        assert_eq!(Arm::Sleep.combine(Arm::Sleep), Arm::Sleep);
        assert_eq!(Arm::Sleep.combine(Arm::Busy), Arm::Busy);
        assert_eq!(Arm::SleepAtMost(ms(5)).combine(Arm::Busy), Arm::Busy);
        assert_eq!(
            Arm::SleepAtMost(ms(5)).combine(Arm::SleepAtMost(ms(2))),
            Arm::SleepAtMost(ms(2))
        );
        assert_eq!(
            Arm::Sleep.combine(Arm::SleepAtMost(ms(7))),
            Arm::SleepAtMost(ms(7))
        );
    }
}
