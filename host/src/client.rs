//! The host application's end of a cluster queue: connect to zc-hostd, take
//! a role, map pool and queues, then move packets without the daemon.

use crate::control::{self, control_path, ClusterInfo, Reply, Request, Role};
use crate::queues::{QueueArea, QueueError};
use crate::ring::{Consumer, Producer};
use crate::shm::{self, Mapping};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use zc_proto::{BufferHandle, BufferIndex, PoolLayout, PoolView, QueueEnd, Receiver, Sender};

/// Default directory of the control sockets (`<run-dir>/<cluster>/ctl`).
pub const DEFAULT_RUN_DIR: &str = "/run/zc";

/// The run directory: `$ZC_RUN_DIR` if set, else /run/zc.
pub fn run_dir_from_env() -> PathBuf {
    std::env::var_os("ZC_RUN_DIR").map_or_else(|| PathBuf::from(DEFAULT_RUN_DIR), PathBuf::from)
}

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cluster {cluster} is not running: no zc-hostd control socket at {} (start it with: zc-hostd -c {cluster})", path.display())]
    NotRunning { cluster: u32, path: PathBuf },
    #[error("cluster {cluster} is not running: {} is left over from a zc-hostd that exited (start it again with: zc-hostd -c {cluster})", path.display())]
    Stale { cluster: u32, path: PathBuf },
    /// The socket's file mode kept this process out: the same line the
    /// daemon gives a peer it refuses (`access::refusal_line`).
    #[error("{0}")]
    Permission(String),
    #[error("cannot reach zc-hostd at {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Refused(String),
    #[error("zc-hostd control connection failed: {0}")]
    Protocol(io::Error),
    #[error("the pool from zc-hostd is unusable: {0}")]
    Pool(String),
    #[error(transparent)]
    Queues(#[from] QueueError),
}

/// Connects to the control socket of `cluster`.
pub fn connect(run_dir: &Path, cluster: u32) -> Result<UnixStream, ClientError> {
    let path = control_path(run_dir, cluster);
    UnixStream::connect(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ClientError::NotRunning { cluster, path },
        io::ErrorKind::ConnectionRefused => ClientError::Stale { cluster, path },
        io::ErrorKind::PermissionDenied => ClientError::Permission(permission_line(cluster, &path)),
        _ => ClientError::Connect { path, source },
    })
}

/// Why connecting to `path` was denied, as the daemon would say it: the
/// group is the socket's (or, when even that cannot be read, its
/// directory's: a directory closed to us).
fn permission_line(cluster: u32, path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let meta =
        std::fs::metadata(path).or_else(|_| std::fs::metadata(path.parent().unwrap_or(path)));
    match meta {
        Ok(m) => crate::access::refusal_line(cluster, uid, m.gid()),
        Err(e) => format!(
            "cluster {cluster}: uid {uid} may not attach: permission denied on {}: {e}; run as root or as a member of the socket's group",
            path.display()
        ),
    }
}

/// One request, one reply.
pub fn call(sock: &UnixStream, req: &Request) -> Result<(Reply, Vec<OwnedFd>), ClientError> {
    control::send(sock, req, &[]).map_err(ClientError::Protocol)?;
    match control::recv::<Reply>(sock).map_err(ClientError::Protocol)? {
        Some((Reply::Error { message }, _)) => Err(ClientError::Refused(message)),
        Some(r) => Ok(r),
        None => Err(ClientError::Protocol(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "zc-hostd closed the connection",
        ))),
    }
}

/// The export of `cluster` whose vhost-user socket is the file at
/// `socket` (the same file, however either path names it), as its daemon
/// reports it; `None` when the socket is none of its exports.
pub fn export_at(
    run_dir: &Path,
    cluster: u32,
    socket: &Path,
) -> Result<Option<crate::stats::ExportStats>, ClientError> {
    use std::os::unix::fs::MetadataExt;
    let sock = connect(run_dir, cluster)?;
    let exports = match call(&sock, &Request::Stats)? {
        (Reply::Stats { exports, .. }, _) => exports,
        _ => {
            return Err(ClientError::Protocol(io::Error::other(
                "unexpected reply to stats",
            )))
        }
    };
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let Some(want) = id(socket) else {
        return Ok(None);
    };
    Ok(exports
        .into_iter()
        .find(|e| id(Path::new(&e.path)) == Some(want)))
}

/// The interface ports serving `ifname`, over every cluster whose daemon
/// runs under `run_dir`, as (cluster, port). Daemons that do not answer
/// (stale sockets, other users') are passed over: they serve nothing.
pub fn nic_ports(run_dir: &Path, ifname: &str) -> Vec<(u32, crate::port::nic::NicPortStats)> {
    let Ok(dir) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut clusters: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    clusters.sort_unstable();
    let req = Request::Nic(control::NicRequest::Queues {
        ifname: ifname.into(),
    });
    let mut out = Vec::new();
    for c in clusters {
        let Ok(sock) = connect(run_dir, c) else {
            continue;
        };
        if let Ok((Reply::NicQueues(ports), _)) = call(&sock, &req) {
            out.extend(ports.into_iter().map(|p| (c, p)));
        }
    }
    out
}

/// Asks the daemon of `cluster` to describe it.
pub fn cluster_info(run_dir: &Path, cluster: u32) -> Result<ClusterInfo, ClientError> {
    let sock = connect(run_dir, cluster)?;
    match call(&sock, &Request::Info)? {
        (Reply::Info(info), _) => Ok(info),
        _ => Err(ClientError::Protocol(io::Error::other(
            "unexpected reply to info",
        ))),
    }
}

/// An attached queue end: owns the connection (closing it releases the
/// role), the mappings, and the ring end.
pub struct HostQueue<E> {
    conn: UnixStream,
    // Field order matters: the ring end points into `queues` and rings
    // `bell`, both dropped after `end`. The view owns the pool mapping (and
    // so do its clones).
    end: E,
    queues: QueueArea,
    /// The other side's bell, for when it sleeps in one of zc-hostd's workers.
    _bell: Option<OwnedFd>,
    view: PoolView,
    info: ClusterInfo,
    queue: u16,
}

pub type HostRx = HostQueue<Consumer>;
pub type HostTx = HostQueue<Producer>;

/// Attaches to `queue` in `role`, maps pool and queues, and builds the ring
/// end with `end`.
fn attach<E: PeerBell>(
    run_dir: &Path,
    cluster: u32,
    queue: u16,
    role: Role,
    end: impl FnOnce(&QueueArea, u16) -> E,
) -> Result<HostQueue<E>, ClientError> {
    let conn = connect(run_dir, cluster)?;
    let (reply, fds) = call(&conn, &Request::Attach { queue, role })?;
    let Reply::Attached(info) = reply else {
        return Err(ClientError::Protocol(io::Error::other(
            "unexpected reply to attach",
        )));
    };
    let mut fds = fds.into_iter();
    let (Some(pool_fd), Some(queue_fd), bell) = (fds.next(), fds.next(), fds.next()) else {
        return Err(ClientError::Pool("expected two descriptors".into()));
    };
    let size = shm::file_size(pool_fd.as_fd()).map_err(|e| ClientError::Pool(e.to_string()))?;
    if size < zc_proto::layout::HEADER_SIZE {
        return Err(ClientError::Pool("smaller than its header".into()));
    }
    // The geometry comes from the daemon, not from the pool's header: every
    // guest of the cluster may write the header, and a scribbled one must
    // not stop host processes from attaching.
    let layout = PoolLayout::new(info.cluster, info.buf_size, info.buf_count)
        .map_err(|e| ClientError::Pool(e.to_string()))?;
    if layout.pool_size != info.pool_size || layout.pool_size > size {
        return Err(ClientError::Pool(format!(
            "zc-hostd says {} bytes, its geometry makes {}, the file has {size}",
            info.pool_size, layout.pool_size
        )));
    }
    let pool_map = Mapping::map(pool_fd.as_fd(), size as usize, true)
        .map_err(|e| ClientError::Pool(e.to_string()))?;
    let view = PoolView::owning(std::sync::Arc::new(pool_map), layout)
        .ok_or_else(|| ClientError::Pool("smaller than its layout".into()))?;
    let queues = QueueArea::open(queue_fd, &layout)?;
    let mut end = end(&queues, queue);
    if let Some(b) = &bell {
        // SAFETY: the HostQueue owns the bell and drops it after the end.
        unsafe { end.set_peer_bell(b.as_raw_fd()) };
    }
    Ok(HostQueue {
        conn,
        end,
        queues,
        _bell: bell,
        view,
        info,
        queue,
    })
}

/// Ring ends that can ring the other side's bell.
trait PeerBell {
    /// # Safety
    /// `fd` must stay open while the end is used.
    unsafe fn set_peer_bell(&mut self, fd: std::os::fd::RawFd);
}

impl PeerBell for Consumer {
    unsafe fn set_peer_bell(&mut self, fd: std::os::fd::RawFd) {
        // SAFETY: forwarded contract.
        unsafe { Consumer::set_peer_bell(self, fd) }
    }
}

impl PeerBell for Producer {
    unsafe fn set_peer_bell(&mut self, fd: std::os::fd::RawFd) {
        // SAFETY: forwarded contract.
        unsafe { Producer::set_peer_bell(self, fd) }
    }
}

impl HostRx {
    /// Attaches as the consumer of `queue` of `cluster`.
    pub fn open(run_dir: &Path, cluster: u32, queue: u16) -> Result<Self, ClientError> {
        attach(run_dir, cluster, queue, Role::Consumer, QueueArea::consumer)
    }
}

impl HostTx {
    /// Attaches as the producer of `queue` of `cluster`.
    pub fn open(run_dir: &Path, cluster: u32, queue: u16) -> Result<Self, ClientError> {
        attach(run_dir, cluster, queue, Role::Producer, QueueArea::producer)
    }
}

impl<E> HostQueue<E> {
    pub fn info(&self) -> &ClusterInfo {
        &self.info
    }

    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// (produced, consumed) counters of this queue's ring.
    pub fn ring_indices(&self) -> (u32, u32) {
        self.queues.indices(self.queue)
    }
}

impl<E> QueueEnd for HostQueue<E> {
    fn take_buffers(&mut self, n: usize) -> io::Result<Vec<BufferHandle>> {
        let count = u32::try_from(n).map_err(|_| io::Error::other("too many buffers"))?;
        let (reply, _) = call(&self.conn, &Request::Alloc { count }).map_err(io::Error::other)?;
        let Reply::Buffers { indices } = reply else {
            return Err(io::Error::other("unexpected reply to alloc"));
        };
        let limit = self.view.layout().buf_count;
        if indices.len() != n || indices.iter().any(|&i| i >= limit) {
            return Err(io::Error::other("zc-hostd returned invalid buffers"));
        }
        Ok(indices
            .into_iter()
            // SAFETY: the daemon allocated these to this process alone, and
            // they were checked to lie in the pool.
            .map(|i| unsafe { BufferHandle::from_raw(BufferIndex::new(i), 0) })
            .collect())
    }

    fn pool(&self) -> &PoolView {
        &self.view
    }
}

impl Receiver for HostRx {
    #[inline]
    fn recv_burst(&mut self, bufs: &mut [BufferHandle]) -> usize {
        self.end.recv_burst(bufs)
    }

    fn wait_recv(&mut self, timeout: Duration) {
        self.end.wait(timeout)
    }
}

impl Sender for HostTx {
    #[inline]
    fn send_burst(&mut self, bufs: &mut [BufferHandle]) -> usize {
        self.end.send_burst(bufs)
    }

    fn wait_send(&mut self, timeout: Duration) {
        self.end.wait(timeout)
    }
}
