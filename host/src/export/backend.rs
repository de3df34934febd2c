//! The vhost-user side of an export: a `VhostUserBackend` that hands ring
//! and memory changes to the poll thread, and the accept loop that serves
//! one frontend after another on the same socket.

use super::shared::ExportShared;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use virtio_bindings::virtio_config::{VIRTIO_F_IN_ORDER, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// VHOST_USER_F_PROTOCOL_FEATURES.
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// The virtio-net features an export offers: no offloads yet.
/// IN_ORDER: the export always uses buffers in the order they were made
/// available (both paths), which lets DPDK's virtio-user use its cheaper
/// in-order paths; drivers that do not know it (Linux) simply do not ack it.
pub const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_F_IN_ORDER)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_STATUS)
    | PROTOCOL_FEATURES;

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

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.0.request(|c| c.drop_device = true, true);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Read from the acked features when the rings start.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_net_config: mac, status, max_virtqueue_pairs, mtu.
        let mut cfg = Vec::with_capacity(12);
        cfg.extend_from_slice(&self.0.mac);
        cfg.extend_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        cfg.extend_from_slice(&1u16.to_le_bytes());
        cfg.extend_from_slice(&0u16.to_le_bytes());
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        let mut out = cfg[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.0.request(
            |c| {
                c.mem = Some(mem);
                c.mem_gen += 1;
            },
            false,
        );
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

/// Serves frontends on `shared.spec.path`, one after another, forever.
pub fn serve(shared: Arc<ExportShared>, listener: Listener) {
    let mut listener = listener;
    let name = shared.name.clone();
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Backend(shared.clone());
        let mut daemon = match VhostUserDaemon::new(format!("zc-{name}"), backend, mem) {
            Ok(d) => d,
            Err(e) => {
                log::error!("export {name}: {e}; retrying in 1 s");
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
        };
        if let Err(e) = daemon.start(&mut listener) {
            log::error!("export {name}: accepting a frontend failed: {e}");
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        let dev = &shared.counters.dev;
        dev.connections.fetch_add(1, Ordering::Relaxed);
        dev.connected.store(1, Ordering::Relaxed);
        log::info!("export {name}: frontend connected");
        let r = daemon.wait();
        dev.connected.store(0, Ordering::Relaxed);
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
        if let Some(n) = shared.exit.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = n.notify();
        }
        match r {
            Ok(()) => log::info!("export {name}: frontend disconnected"),
            Err(e) => log::info!("export {name}: frontend disconnected ({e})"),
        }
    }
}

/// Creates the socket (mode 0660).
pub fn listen(path: &std::path::Path) -> io::Result<Listener> {
    let l = Listener::new(path, true).map_err(|e| io::Error::other(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}
