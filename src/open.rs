//! `zc::open_*`: from a name to a transport.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
pub use zc_guest::Direction;
use zc_guest::{GuestError, GuestRx, GuestTx};
use zc_host::client::{self, ClientError, HostRx, HostTx};
use zc_proto::{BufferHandle, Name, NameError, PoolView, QueueEnd, Receiver, Sender};

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{name}: {source}")]
    Host { name: String, source: ClientError },
    #[error("{0}: no zc-hostd here serves interface {1} (start one with --nic {1},ingress=Q,egress=Q, or on a running one: zc-hostd -c ID nic add {1},ingress=Q,egress=Q), and this is no VM attached to a zc cluster (no ivshmem zc pool on the PCI bus)")]
    InterfaceOnHost(String, String),
    #[error("{name}: the interface port {port} of cluster {cluster} has no {side} queue, so it {what}; start it with {side}=Q (zc-hostd -c {cluster} nic del {ifname}, then nic add {ifname},ingress=Q,egress=Q)")]
    NicSide {
        name: String,
        port: String,
        cluster: u32,
        ifname: String,
        side: &'static str,
        what: &'static str,
    },
    #[error("{name}: several interface ports serve {ifname}: {ports}; open one of their queues by number")]
    NicAmbiguous {
        name: String,
        ifname: String,
        ports: String,
    },
    #[error("{name}: {source}")]
    Guest { name: String, source: GuestError },
    #[error("{name}: {host}; nor is this a VM with a zc pool: no ivshmem-plain device (PCI 1af4:1110) holds the pool of cluster {cluster}")]
    NoCluster {
        name: String,
        cluster: u32,
        host: ClientError,
    },
    #[error("{0}: a cluster queue on the host carries packets one way only, so it cannot be opened for both receiving and sending; open the queue of the other direction as well")]
    OneWay(String),
    #[error("{source} (waited {secs} s for it to appear)")]
    Waited { secs: f64, source: Box<Error> },
    #[error("{name}: no pool file for cluster {cluster}: zc-hostd -c {cluster} is not running here (no {}) and neither {} nor {} exists; give the pool file with --pool PATH", ctl.display(), huge.display(), shm.display())]
    NoPoolFile {
        name: String,
        cluster: u32,
        ctl: PathBuf,
        huge: PathBuf,
        shm: PathBuf,
    },
}

/// Where to look for clusters, and which transport to force.
#[derive(Clone, Debug)]
pub struct Options {
    /// Directory of cluster control sockets (default `$ZC_RUN_DIR` or /run/zc).
    pub run_dir: PathBuf,
    /// Run the guest driver as the vhost-user frontend of the export at this
    /// socket instead of opening the queue directly (containers, tests).
    pub vhost_user: Option<PathBuf>,
    /// The pool file to share with a vhost-user export (default: from the
    /// cluster's control socket, else /dev/hugepages/zc/<cluster>/pool or
    /// /dev/shm/zc/<cluster>/pool).
    pub pool: Option<PathBuf>,
    /// Retry this long while the name leads nowhere yet (devices being
    /// hot-plugged, a daemon starting).
    pub wait: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            run_dir: client::run_dir_from_env(),
            vhost_user: None,
            pool: None,
            wait: None,
        }
    }
}

/// The receiving end of a queue, whatever the transport.
pub enum Rx {
    Host(Box<HostRx>),
    /// The zc guest driver (in a VM over PCI, or over a vhost-user socket).
    /// Both kinds are boxed: they are large, and one pointer per burst
    /// costs nothing.
    Guest(Box<GuestRx>),
}

/// The sending end of a queue, whatever the transport.
pub enum Tx {
    Host(Box<HostTx>),
    Guest(Box<GuestTx>),
}

/// Where a name leads.
enum Route {
    Host {
        cluster: u32,
        queue: u16,
    },
    Pci {
        cluster: u32,
        queue: u16,
    },
    Interface(String),
    VhostUser {
        socket: PathBuf,
        pool: PathBuf,
        queue: u16,
        /// The MAC of the export `socket` is, as its daemon says.
        served: Option<[u8; 6]>,
    },
}

/// The pool file of `cluster` for the vhost-user transport.
fn pool_file(name: &str, opts: &Options, cluster: u32) -> Result<PathBuf, Error> {
    if let Some(p) = &opts.pool {
        return Ok(p.clone());
    }
    if let Ok(info) = client::cluster_info(&opts.run_dir, cluster) {
        return Ok(PathBuf::from(info.pool_path));
    }
    let huge = Path::new("/dev/hugepages/zc")
        .join(cluster.to_string())
        .join("pool");
    let shm = Path::new("/dev/shm/zc")
        .join(cluster.to_string())
        .join("pool");
    for p in [&huge, &shm] {
        if p.exists() {
            return Ok(p.clone());
        }
    }
    Err(Error::NoPoolFile {
        name: name.to_string(),
        cluster,
        ctl: zc_host::control::control_path(&opts.run_dir, cluster),
        huge,
        shm,
    })
}

/// `zc:IFNAME` on the host: the queue of a daemon's interface port,
/// ingress for receiving, egress for sending. `None` when no daemon under
/// the run directory serves the interface.
fn host_interface(
    name: &str,
    ifname: &str,
    opts: &Options,
    by: Direction,
) -> Option<Result<Route, Error>> {
    let ports = client::nic_ports(&opts.run_dir, ifname);
    if ports.is_empty() {
        return None;
    }
    let side = |p: &zc_host::port::nic::NicPortStats| match by {
        Direction::Rx => p.ingress,
        Direction::Tx => p.egress,
    };
    let usable: Vec<(u32, u16, String)> = ports
        .iter()
        .filter_map(|(c, p)| side(p).map(|q| (*c, q, p.name.clone())))
        .collect();
    Some(match &usable[..] {
        [(cluster, queue, _)] => Ok(Route::Host {
            cluster: *cluster,
            queue: *queue,
        }),
        [] => {
            let (cluster, p) = &ports[0];
            let (side, what) = match by {
                Direction::Rx => ("ingress", "hands nothing it receives to the cluster"),
                Direction::Tx => ("egress", "sends nothing out"),
            };
            Err(Error::NicSide {
                name: name.into(),
                port: p.name.clone(),
                cluster: *cluster,
                ifname: ifname.into(),
                side,
                what,
            })
        }
        many => Err(Error::NicAmbiguous {
            name: name.into(),
            ifname: ifname.into(),
            ports: many
                .iter()
                .map(|(c, q, port)| format!("zc:{c}@{q} ({port})"))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    })
}

fn resolve(name: &str, opts: &Options, by: Direction) -> Result<Route, Error> {
    match name.parse::<Name>()? {
        Name::Queue { cluster, queue } => match &opts.vhost_user {
            Some(socket) => Ok(Route::VhostUser {
                socket: socket.clone(),
                pool: pool_file(name, opts, cluster.0)?,
                queue: queue.0,
                served: client::export_at(&opts.run_dir, cluster.0, socket)
                    .ok()
                    .flatten()
                    .and_then(|e| zc_host::port::export::spec::parse_mac(&e.mac)),
            }),
            // A cluster of this host wins; else, in a VM, its PCI pool.
            None if !zc_host::control::control_path(&opts.run_dir, cluster.0).exists()
                && zc_guest::has_pci_pool(cluster.0) =>
            {
                Ok(Route::Pci {
                    cluster: cluster.0,
                    queue: queue.0,
                })
            }
            None => Ok(Route::Host {
                cluster: cluster.0,
                queue: queue.0,
            }),
        },
        Name::Interface(ifname) => match host_interface(name, &ifname, opts, by) {
            Some(route) => route,
            None if zc_guest::has_any_pci_pool() => Ok(Route::Interface(ifname)),
            None => Err(Error::InterfaceOnHost(name.to_string(), ifname)),
        },
    }
}

/// The host transport's error, with the guest side's view when the cluster
/// is simply not there.
fn host_err(name: &str, cluster: u32) -> impl FnOnce(ClientError) -> Error + '_ {
    move |source| match source {
        ClientError::NotRunning { .. } => Error::NoCluster {
            name: name.to_string(),
            cluster,
            host: source,
        },
        source => Error::Host {
            name: name.to_string(),
            source,
        },
    }
}

fn guest_err(name: &str) -> impl FnOnce(GuestError) -> Error + '_ {
    move |source| Error::Guest {
        name: name.to_string(),
        source,
    }
}

impl Error {
    /// The name leads nowhere yet, but may once a daemon starts or devices
    /// are hot-plugged.
    fn is_absent(&self) -> bool {
        match self {
            Error::NoCluster { .. } | Error::InterfaceOnHost(..) | Error::NoPoolFile { .. } => true,
            Error::Host { source, .. } => matches!(
                source,
                ClientError::NotRunning { .. } | ClientError::Stale { .. }
            ),
            Error::Guest { source, .. } => matches!(
                source,
                GuestError::NoPool { .. }
                    | GuestError::NoExport { .. }
                    | GuestError::NoDevice { .. }
                    | GuestError::NoInterface(_)
                    | GuestError::NotAnExport { .. }
            ),
            _ => false,
        }
    }
}

/// Runs `open` until it succeeds, fails for a reason waiting cannot fix,
/// or `opts.wait` has passed.
fn retry<T>(opts: &Options, mut open: impl FnMut() -> Result<T, Error>) -> Result<T, Error> {
    let Some(wait) = opts.wait else {
        return open();
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        match open() {
            Err(e) if e.is_absent() => {
                if std::time::Instant::now() >= deadline {
                    return Err(Error::Waited {
                        secs: wait.as_secs_f64(),
                        source: Box::new(e),
                    });
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            r => return r,
        }
    }
}

/// Opens `name` (e.g. `zc:99@0`) for receiving.
pub fn open_rx(name: &str) -> Result<Rx, Error> {
    open_rx_with(name, &Options::default())
}

pub fn open_rx_with(name: &str, opts: &Options) -> Result<Rx, Error> {
    retry(opts, || open_rx_once(name, opts))
}

fn open_rx_once(name: &str, opts: &Options) -> Result<Rx, Error> {
    match resolve(name, opts, Direction::Rx)? {
        Route::Host { cluster, queue } => HostRx::open(&opts.run_dir, cluster, queue)
            .map(|q| Rx::Host(Box::new(q)))
            .map_err(host_err(name, cluster)),
        Route::Pci { cluster, queue } => GuestRx::open_pci(cluster, queue)
            .map(|q| Rx::Guest(Box::new(q)))
            .map_err(guest_err(name)),
        Route::Interface(ifname) => GuestRx::open_interface(&ifname)
            .map(|q| Rx::Guest(Box::new(q)))
            .map_err(guest_err(name)),
        Route::VhostUser {
            socket,
            pool,
            queue,
            served,
        } => GuestRx::open_vhost_user(&socket, &pool, queue, served)
            .map(|q| Rx::Guest(Box::new(q)))
            .map_err(guest_err(name)),
    }
}

/// Opens `name` (e.g. `zc:99@0`) for sending.
pub fn open_tx(name: &str) -> Result<Tx, Error> {
    open_tx_with(name, &Options::default())
}

pub fn open_tx_with(name: &str, opts: &Options) -> Result<Tx, Error> {
    retry(opts, || open_tx_once(name, opts))
}

fn open_tx_once(name: &str, opts: &Options) -> Result<Tx, Error> {
    match resolve(name, opts, Direction::Tx)? {
        Route::Host { cluster, queue } => HostTx::open(&opts.run_dir, cluster, queue)
            .map(|q| Tx::Host(Box::new(q)))
            .map_err(host_err(name, cluster)),
        Route::Pci { cluster, queue } => GuestTx::open_pci(cluster, queue)
            .map(|q| Tx::Guest(Box::new(q)))
            .map_err(guest_err(name)),
        Route::Interface(ifname) => GuestTx::open_interface(&ifname)
            .map(|q| Tx::Guest(Box::new(q)))
            .map_err(guest_err(name)),
        Route::VhostUser {
            socket,
            pool,
            queue,
            served,
        } => GuestTx::open_vhost_user(&socket, &pool, queue, served)
            .map(|q| Tx::Guest(Box::new(q)))
            .map_err(guest_err(name)),
    }
}

/// Opens both directions of the device `name` leads to, for a process
/// that receives and sends on it (a ping, a reflector): a virtio-net device
/// in a VM, or an export over `--vhost-user`. A queue name is looked up in
/// direction `by` (`zc:99@1` by Tx is the device whose export takes what
/// the guest sends into queue 1; its receive side is whatever queue that
/// export delivers). A buffer received on the Rx may be sent on the Tx as
/// is. Host cluster queues carry one direction: [`Error::OneWay`].
pub fn open_duplex_with(name: &str, by: Direction, opts: &Options) -> Result<(Rx, Tx), Error> {
    retry(opts, || open_duplex_once(name, by, opts))
}

fn open_duplex_once(name: &str, by: Direction, opts: &Options) -> Result<(Rx, Tx), Error> {
    let (rx, tx) = match resolve(name, opts, by)? {
        Route::Host { .. } => return Err(Error::OneWay(name.to_string())),
        Route::Pci { cluster, queue } => zc_guest::open_duplex_pci(cluster, queue, by),
        Route::Interface(ifname) => zc_guest::open_duplex_interface(&ifname),
        Route::VhostUser {
            socket,
            pool,
            queue,
            served,
        } => zc_guest::open_duplex_vhost_user(&socket, &pool, queue, by, served),
    }
    .map_err(guest_err(name))?;
    Ok((Rx::Guest(Box::new(rx)), Tx::Guest(Box::new(tx))))
}

impl Rx {
    /// Why the queue stopped working, if it did (a guest device that broke
    /// the zc contract). Tools check this when idle.
    pub fn failure(&self) -> Option<String> {
        match self {
            Rx::Host(_) => None,
            Rx::Guest(q) => q
                .failure()
                .map(|v| format!("the device broke the zc contract: {v}")),
        }
    }
}

impl Tx {
    pub fn failure(&self) -> Option<String> {
        match self {
            Tx::Host(_) => None,
            Tx::Guest(q) => q
                .failure()
                .map(|v| format!("the device broke the zc contract: {v}")),
        }
    }

    /// Waits until everything sent has left this process's hands: a no-op
    /// for host queues (packets wait in the queue), for a guest device until
    /// it completed every descriptor (closing stops the device).
    pub fn flush(&mut self, timeout: Duration) -> bool {
        match self {
            Tx::Host(_) => true,
            Tx::Guest(q) => q.flush(timeout),
        }
    }
}

impl QueueEnd for Rx {
    fn take_buffers(&mut self, n: usize) -> io::Result<Vec<BufferHandle>> {
        match self {
            Rx::Host(q) => q.take_buffers(n),
            Rx::Guest(q) => q.take_buffers(n),
        }
    }

    fn pool(&self) -> &PoolView {
        match self {
            Rx::Host(q) => q.pool(),
            Rx::Guest(q) => q.pool(),
        }
    }
}

impl Receiver for Rx {
    #[inline]
    fn recv_burst(&mut self, bufs: &mut [BufferHandle]) -> usize {
        match self {
            Rx::Host(q) => q.recv_burst(bufs),
            Rx::Guest(q) => q.recv_burst(bufs),
        }
    }

    fn wait_recv(&mut self, timeout: Duration) {
        match self {
            Rx::Host(q) => q.wait_recv(timeout),
            Rx::Guest(q) => q.wait_recv(timeout),
        }
    }
}

impl QueueEnd for Tx {
    fn take_buffers(&mut self, n: usize) -> io::Result<Vec<BufferHandle>> {
        match self {
            Tx::Host(q) => q.take_buffers(n),
            Tx::Guest(q) => q.take_buffers(n),
        }
    }

    fn pool(&self) -> &PoolView {
        match self {
            Tx::Host(q) => q.pool(),
            Tx::Guest(q) => q.pool(),
        }
    }
}

impl Sender for Tx {
    #[inline]
    fn send_burst(&mut self, bufs: &mut [BufferHandle]) -> usize {
        match self {
            Tx::Host(q) => q.send_burst(bufs),
            Tx::Guest(q) => q.send_burst(bufs),
        }
    }

    fn wait_send(&mut self, timeout: Duration) {
        match self {
            Tx::Host(q) => q.wait_send(timeout),
            Tx::Guest(q) => q.wait_send(timeout),
        }
    }
}
