//! The API every transport provides: host clusters, the guest PCI driver and
//! the vhost-user frontend all move packets through these calls.
//!
//! Receiving and sending *swap* buffers: after `recv_burst` returns `n`, the
//! first `n` handles name received packets and the buffers they named before
//! went back to the queue; after `send_burst` returns `n`, the first `n`
//! handles name fresh empty buffers. No call allocates, locks or enters the
//! kernel while packets flow.

use crate::buffer::BufferHandle;
use crate::packet::PoolView;
use std::time::Duration;

/// What both ends of a queue have.
pub trait QueueEnd {
    /// Empty buffers for the caller to fill and send, or to receive into.
    /// Called at start-up (it may talk to the daemon); the handles then
    /// circulate through the swaps.
    fn take_buffers(&mut self, n: usize) -> std::io::Result<Vec<BufferHandle>>;

    /// The pool the handles point into.
    fn pool(&self) -> &PoolView;
}

/// The receiving end of a queue.
pub trait Receiver: QueueEnd {
    /// Receives up to `bufs.len()` packets into `bufs[..n]`; returns `n`.
    fn recv_burst(&mut self, bufs: &mut [BufferHandle]) -> usize;

    /// Blocks until packets may be ready or `timeout` passes. Busy loops call
    /// this after an idle spell so that an idle tool sleeps.
    fn wait_recv(&mut self, timeout: Duration);
}

/// The sending end of a queue.
pub trait Sender: QueueEnd {
    /// Sends `bufs[..n]` for the returned `n` (as many as fit, in order).
    fn send_burst(&mut self, bufs: &mut [BufferHandle]) -> usize;

    /// Blocks until there may be room to send or `timeout` passes.
    fn wait_send(&mut self, timeout: Duration);
}
