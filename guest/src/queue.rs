//! The zc API (`Receiver`, `Sender`) over the driver core, whatever the
//! transport.

use crate::core::{CoreStats, RxCore, TxCore};
use crate::error::{Direction, GuestError, Result, Violation};
use crate::pool::PoolMap;
use crate::transport::{bring_up, Cores, Ends};
use crate::vhost_user::VhostUser;
use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zc_proto::layout::ExportEntry;
use zc_proto::{BufferHandle, PoolView, QueueEnd, Receiver, Sender};

/// The device a queue runs on; dropping it stops the device.
pub enum Device {
    VhostUser(VhostUser),
    Pci(crate::pci::PciDevice),
}

impl Device {
    /// Stops the device: afterwards it touches neither rings nor buffers.
    fn stop(&mut self) {
        match self {
            Device::VhostUser(v) => v.stop(),
            Device::Pci(p) => p.stop(),
        }
    }
}

/// The device and the pool mapping behind the ends one process opened on
/// it (one, or RX and TX of the same device). The last end dropped stops the
/// device while the pool is still mapped; the host then lists every buffer
/// this guest held as the stock the next driver starts with (its owner
/// table is the truth).
struct Attachment {
    dev: Device,
    /// Keeps the pool mapped until the device has stopped (the views, the
    /// core's and any clone a user made, keep it mapped too).
    _pool: Arc<PoolMap>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.dev.stop();
    }
}

/// One opened queue end. Field order matters: the core (pointers into the
/// pool, nothing to do on drop) goes first, then the attachment.
struct Opened<C> {
    core: C,
    view: PoolView,
    /// Never locked: the mutex only lets the two ends of a device, which
    /// may live on two threads, share the attachment.
    _attachment: Arc<Mutex<Attachment>>,
}

/// The receiving end of a zc queue served by a virtio-net export.
pub struct GuestRx(Opened<RxCore>);
/// The sending end of a zc queue served by a virtio-net export.
pub struct GuestTx(Opened<TxCore>);

/// The ends `bring_up` made, each holding the attachment.
fn split(cores: Cores, dev: Device, pool: Arc<PoolMap>) -> (Option<GuestRx>, Option<GuestTx>) {
    let view = pool.view();
    let att = Arc::new(Mutex::new(Attachment { dev, _pool: pool }));
    let rx = cores.rx.map(|core| {
        GuestRx(Opened {
            core,
            view: view.clone(),
            _attachment: att.clone(),
        })
    });
    let tx = cores.tx.map(|core| {
        GuestTx(Opened {
            core,
            view,
            _attachment: att,
        })
    });
    (rx, tx)
}

fn rx_end(cores: Cores, dev: Device, pool: Arc<PoolMap>) -> GuestRx {
    split(cores, dev, pool)
        .0
        .expect("bring_up made the RX core asked for")
}

fn tx_end(cores: Cores, dev: Device, pool: Arc<PoolMap>) -> GuestTx {
    split(cores, dev, pool)
        .1
        .expect("bring_up made the TX core asked for")
}

fn both_ends(cores: Cores, dev: Device, pool: Arc<PoolMap>) -> (GuestRx, GuestTx) {
    match split(cores, dev, pool) {
        (Some(rx), Some(tx)) => (rx, tx),
        _ => unreachable!("bring_up made both cores asked for"),
    }
}

/// Maps the pool file for the vhost-user transport.
fn map_pool_file(pool_path: &Path) -> Result<(std::fs::File, Arc<PoolMap>)> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(pool_path)
        .map_err(|e| {
            GuestError::Pool(format!(
                "cannot open the pool file {}: {e}",
                pool_path.display()
            ))
        })?;
    let size = file
        .metadata()
        .map_err(|e| GuestError::io(pool_path, e))?
        .len();
    let pool = PoolMap::map(&file, size, pool_path)?;
    Ok((file, Arc::new(pool)))
}

/// Opens, through the vhost-user export at `socket` and sharing the pool
/// file at `pool_path`, the export whose `by` queue is `queue`, with the
/// cores `ends` asks for.
///
/// Sending alone when no export sends into `queue`: the socket may serve a
/// sink, an export without a tx queue that consumes (exchanges and drops)
/// what its guest sends. Each sink of the directory is tried in turn; the
/// MAC in the device config (zc-hostd reports it) tells whether the socket
/// serves it, and a backend that reports none is taken for no sink.
fn open_vhost_user(
    socket: &Path,
    pool_path: &Path,
    queue: u16,
    by: Direction,
    ends: Ends,
) -> Result<(Cores, Device, Arc<PoolMap>)> {
    let (file, pool) = map_pool_file(pool_path)?;
    let open = |slot: usize, entry: &ExportEntry, require_mac: bool| -> Result<(Cores, Device)> {
        let f = file.try_clone().map_err(|e| GuestError::io(pool_path, e))?;
        let mut vu = VhostUser::connect(socket, f, pool.base(), pool.layout().pool_size)?;
        vu.expect_mac = Some(entry.mac);
        vu.require_mac = require_mac;
        let cores = bring_up(&mut vu, &pool, slot, entry, ends)?;
        Ok((cores, Device::VhostUser(vu)))
    };
    let missing = match pool.export_for_queue(queue, by) {
        Ok((slot, entry)) => {
            let (cores, dev) = open(slot, &entry, false)?;
            return Ok((cores, dev, pool));
        }
        Err(e) if ends == Ends::Tx => e,
        Err(e) => return Err(e),
    };
    // Otherwise the error is the missing export of `queue`.
    for (slot, entry) in &pool.sinks() {
        match open(*slot, entry, true) {
            Ok((cores, dev)) => {
                log::info!(
                    "zc-guest: no export sends into queue {queue}; {} is a sink: what is sent there is consumed and dropped",
                    socket.display()
                );
                return Ok((cores, dev, pool));
            }
            Err(e) => log::debug!("zc-guest: {}: not sink {slot}: {e}", socket.display()),
        }
    }
    Err(missing)
}

/// Both ends of the device of the export whose `by` queue is `queue`
/// inside a VM (PCI transport): one process receives and sends on it (a
/// ping, a reflector). A buffer received may be sent, and the other way.
pub fn open_duplex_pci(cluster: u32, queue: u16, by: Direction) -> Result<(GuestRx, GuestTx)> {
    let (cores, dev, pool) = crate::pci::open_queue(cluster, queue, by, Ends::Both)?;
    Ok(both_ends(cores, Device::Pci(dev), pool))
}

/// Both ends of the virtio-net device behind interface `ifname`.
pub fn open_duplex_interface(ifname: &str) -> Result<(GuestRx, GuestTx)> {
    let (cores, dev, pool) = crate::pci::open_interface(ifname, Ends::Both)?;
    Ok(both_ends(cores, Device::Pci(dev), pool))
}

/// Both ends of the export whose `by` queue is `queue`, as the vhost-user
/// frontend of the export at `socket` (no VM).
pub fn open_duplex_vhost_user(
    socket: &Path,
    pool_path: &Path,
    queue: u16,
    by: Direction,
) -> Result<(GuestRx, GuestTx)> {
    let (cores, dev, pool) = open_vhost_user(socket, pool_path, queue, by, Ends::Both)?;
    Ok(both_ends(cores, dev, pool))
}

impl GuestRx {
    /// Receives cluster queue `queue` inside a VM, on the virtio-net device
    /// that exports it (PCI transport).
    pub fn open_pci(cluster: u32, queue: u16) -> Result<Self> {
        let (cores, dev, pool) = crate::pci::open_queue(cluster, queue, Direction::Rx, Ends::Rx)?;
        Ok(rx_end(cores, Device::Pci(dev), pool))
    }

    /// Receives on the virtio-net device behind interface `ifname` (zc:eth1).
    pub fn open_interface(ifname: &str) -> Result<Self> {
        let (cores, dev, pool) = crate::pci::open_interface(ifname, Ends::Rx)?;
        Ok(rx_end(cores, Device::Pci(dev), pool))
    }

    /// Receives cluster queue `queue` as the vhost-user frontend of the
    /// export at `socket` (no VM), sharing the pool file `pool_path`.
    pub fn open_vhost_user(socket: &Path, pool_path: &Path, queue: u16) -> Result<Self> {
        let (cores, dev, pool) =
            open_vhost_user(socket, pool_path, queue, Direction::Rx, Ends::Rx)?;
        Ok(rx_end(cores, dev, pool))
    }

    /// Why the queue stopped, if the device broke the contract.
    pub fn failure(&self) -> Option<Violation> {
        self.0.core.failure()
    }

    pub fn stats(&self) -> CoreStats {
        self.0.core.stats()
    }
}

impl GuestTx {
    /// Sends into cluster queue `queue` inside a VM, on the virtio-net
    /// device that exports it (PCI transport).
    pub fn open_pci(cluster: u32, queue: u16) -> Result<Self> {
        let (cores, dev, pool) = crate::pci::open_queue(cluster, queue, Direction::Tx, Ends::Tx)?;
        Ok(tx_end(cores, Device::Pci(dev), pool))
    }

    /// Sends on the virtio-net device behind interface `ifname` (zc:eth1).
    pub fn open_interface(ifname: &str) -> Result<Self> {
        let (cores, dev, pool) = crate::pci::open_interface(ifname, Ends::Tx)?;
        Ok(tx_end(cores, Device::Pci(dev), pool))
    }

    /// Sends into cluster queue `queue` as the vhost-user frontend of the
    /// export at `socket` (no VM), sharing the pool file `pool_path`.
    pub fn open_vhost_user(socket: &Path, pool_path: &Path, queue: u16) -> Result<Self> {
        let (cores, dev, pool) =
            open_vhost_user(socket, pool_path, queue, Direction::Tx, Ends::Tx)?;
        Ok(tx_end(cores, dev, pool))
    }

    pub fn failure(&self) -> Option<Violation> {
        self.0.core.failure()
    }

    pub fn stats(&self) -> CoreStats {
        self.0.core.stats()
    }

    /// Descriptors the device has not completed yet.
    pub fn in_flight(&self) -> usize {
        self.0.core.in_flight()
    }

    /// Waits up to `timeout` for the device to complete everything sent
    /// (zsend's last burst before it exits).
    pub fn flush(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.0.core.in_flight() > 0 && self.0.core.failure().is_none() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            self.0.core.wait(Duration::from_millis(1));
        }
        self.0.core.failure().is_none()
    }
}

impl QueueEnd for GuestRx {
    fn take_buffers(&mut self, n: usize) -> io::Result<Vec<BufferHandle>> {
        self.0.core.take_buffers(n)
    }

    fn pool(&self) -> &PoolView {
        &self.0.view
    }
}

impl Receiver for GuestRx {
    #[inline]
    fn recv_burst(&mut self, bufs: &mut [BufferHandle]) -> usize {
        self.0.core.recv_burst(bufs)
    }

    fn wait_recv(&mut self, timeout: Duration) {
        self.0.core.wait(timeout)
    }
}

impl QueueEnd for GuestTx {
    fn take_buffers(&mut self, n: usize) -> io::Result<Vec<BufferHandle>> {
        self.0.core.take_buffers(n)
    }

    fn pool(&self) -> &PoolView {
        &self.0.view
    }
}

impl Sender for GuestTx {
    #[inline]
    fn send_burst(&mut self, bufs: &mut [BufferHandle]) -> usize {
        self.0.core.send_burst(bufs)
    }

    fn wait_send(&mut self, timeout: Duration) {
        self.0.core.wait(timeout)
    }
}
