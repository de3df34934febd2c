//! The vhost-user side of an export: a `VhostUserBackend` that hands ring
//! and memory changes to the poll thread, and the accept loop that serves
//! one frontend after another on the same socket.

use super::shared::ExportShared;
use crate::access::Access;
use crate::paths::{self, Owned, PathError};
use std::io;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// The virtio-net features an export offers: no offloads yet.
/// IN_ORDER: the export always uses buffers in the order they were made
/// available (both paths), which lets DPDK's virtio-user use its cheaper
/// in-order paths; drivers that do not know it (Linux) simply do not ack it.
///
/// VHOST_USER_F_PROTOCOL_FEATURES: QEMU's vhost-user-net does not start
/// without it (see `shim` for the one message that needs help).
pub const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_F_IN_ORDER)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_STATUS)
    | PROTOCOL_FEATURES;

/// VHOST_USER_F_PROTOCOL_FEATURES.
const PROTOCOL_FEATURES: u64 = 1 << 30;

#[derive(Clone)]
pub struct Backend(pub Arc<ExportShared>);

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        usize::from(super::virtq::MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn acked_features(&self, features: u64) {
        self.0.request(|c| c.acked_features = features, false);
    }

    /// None beyond what vhost-user-backend adds itself (REPLY_ACK, ...).
    /// Not CONFIG: QEMU's vhost-user-net does not take it and warns at
    /// every VM start when a backend offers it ("backend supports
    /// VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not"); it serves the MAC
    /// from the device's mac= property. The zc guest driver learns which
    /// export a socket is from the daemon instead (`client::export_at`).
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::empty()
    }

    fn reset_device(&self) {
        self.0.request(|c| c.drop_device = true, true);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Read from the acked features when the rings start.
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // Waits for the poll thread to map the new table, so that anything
        // the frontend does after its next message already sees it (a pool
        // region added by hot-plug, say).
        if !self.0.request(
            |c| {
                c.mem = Some(mem);
                c.mem_gen += 1;
            },
            true,
        ) {
            log::warn!(
                "export {}: poll thread did not take the new memory table in time",
                self.0.name
            );
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![0b11]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        let keep = n.try_clone().ok()?;
        *self.0.exit.lock().unwrap_or_else(|e| e.into_inner()) = Some(keep);
        Some((c, n))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let i = queue_index as usize;
        if i < 2 && !self.0.request(|c| c.stop[i] = true, true) {
            log::warn!(
                "export {}: poll thread did not stop ring {i} in time",
                self.0.name
            );
        }
        Ok(())
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if !self.0.have_vrings.load(Ordering::Acquire) {
            self.0.lock().vrings = Some(vrings.to_vec());
            self.0.have_vrings.store(true, Ordering::Release);
        }
        self.0.counters.dev.kicks.fetch_add(1, Ordering::Relaxed);
        self.0.kicked.store(true, Ordering::Release);
        self.0.ring();
        Ok(())
    }
}

/// The export's sockets: the public one frontends connect to (mode 0660,
/// the daemon's `--vm-group`),
/// and a private abstract one that vhost-user-backend listens on behind the
/// relay (`shim`).
pub struct Sockets {
    public: UnixListener,
    internal: Listener,
    internal_addr: SocketAddr,
}

/// What ends an export's accept loop and removes its socket file; the
/// export keeps it.
pub struct Closer {
    /// A second descriptor of the public listener.
    wake: UnixListener,
    socket: Owned,
}

impl Closer {
    /// Ends `serve`: sets `closing` and shuts the listening socket down,
    /// which wakes the blocked accept (with EINVAL). Not by connecting to
    /// the path: if the file there is no longer ours, that would reach
    /// whoever put it there. Then removes the socket file, if still ours.
    pub fn close(&self, shared: &ExportShared) {
        shared.closing.store(true, Ordering::Release);
        // SAFETY: shutdown on a descriptor we own.
        unsafe { libc::shutdown(self.wake.as_raw_fd(), libc::SHUT_RDWR) };
        self.socket.remove();
    }

    /// Removes the socket file if it is still ours (the daemon is stopping).
    pub fn remove_socket(&self) {
        self.socket.remove();
    }
}

/// Creates the sockets of the export at `path`: only over nothing or a
/// stale socket (see `paths::bind_socket`).
pub fn listen(path: &std::path::Path, access: Access) -> Result<(Sockets, Closer), PathError> {
    const WHAT: &str = "export socket";
    let (public, socket) = paths::bind_socket(WHAT, path, access)?;
    let io = |source| PathError::Io {
        what: WHAT,
        path: path.into(),
        source,
    };
    let name = format!("zc-export-{}-{}", std::process::id(), path.display());
    let internal = SocketAddr::from_abstract_name(name.as_bytes())
        .and_then(|a| Ok((UnixListener::bind_addr(&a)?, a)))
        .and_then(|(l, a)| Ok((l, a, public.try_clone()?)));
    let (internal, internal_addr, wake) = match internal {
        Ok(x) => x,
        Err(e) => {
            socket.remove();
            return Err(io(e));
        }
    };
    Ok((
        Sockets {
            public,
            internal: Listener::from(internal),
            internal_addr,
        },
        Closer { wake, socket },
    ))
}

/// Serves frontends on the export's socket, one after another, until the
/// export is removed (`Closer::close`).
pub fn serve(shared: Arc<ExportShared>, sockets: Sockets) {
    let Sockets {
        public,
        mut internal,
        internal_addr,
    } = sockets;
    let name = shared.name.clone();
    loop {
        let accepted = public.accept();
        if shared.closing.load(Ordering::Acquire) {
            return;
        }
        let front = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("export {name}: accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Backend(shared.clone());
        let mut daemon = match VhostUserDaemon::new(format!("zc-{name}"), backend, mem) {
            Ok(d) => d,
            Err(e) => {
                log::error!("export {name}: {e}");
                continue;
            }
        };
        let back = match UnixStream::connect_addr(&internal_addr) {
            Ok(b) => b,
            Err(e) => {
                log::error!("export {name}: internal socket: {e}");
                continue;
            }
        };
        if let Err(e) = daemon.start(&mut internal) {
            log::error!("export {name}: starting the vhost-user handler failed: {e}");
            continue;
        }
        let dev = &shared.counters.dev;
        dev.connections.fetch_add(1, Ordering::Relaxed);
        dev.connected.store(1, Ordering::Relaxed);
        log::info!("export {name}: frontend connected");
        let relay = super::shim::relay(front, back);
        let r = daemon.wait();
        shared.request(
            |c| {
                c.drop_device = true;
                c.vrings = None;
                c.mem = None;
                c.mem_gen += 1;
            },
            true,
        );
        shared.have_vrings.store(false, Ordering::Release);
        // Only now: whoever sees the frontend gone sees its device dropped
        // and the stock republished.
        dev.connected.store(0, Ordering::Relaxed);
        if let Some(n) = shared.exit.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = n.notify();
        }
        match (relay, r) {
            (Err(e @ super::shim::RelayError::Table(_)), _) => {
                dev.bad_mem_tables.fetch_add(1, Ordering::Relaxed);
                log::error!("export {name}: {e}; the frontend is disconnected");
            }
            (Err(e), _) => log::info!("export {name}: frontend disconnected ({e})"),
            (_, Err(e)) => log::info!("export {name}: frontend disconnected ({e})"),
            _ => log::info!("export {name}: frontend disconnected"),
        }
    }
}
