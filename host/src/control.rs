//! The control protocol between zc-hostd and the processes that attach.
//!
//! A Unix stream socket carrying length-prefixed JSON messages; the reply to
//! `Attach` carries the pool and queue memory as file descriptors
//! (SCM_RIGHTS). One connection is one attachment: when it closes, whatever
//! role it held is released.

use crate::port::balancer::{BalancePortStats, BalanceSpec};
use crate::port::nic::{NicPortStats, NicSpec};
use crate::port::reflect::{ReflectPortStats, ReflectSpec};
use crate::stats::{ExportStats, WorkerStats};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Where a cluster's control files live: `<run-dir>/<cluster>`.
pub fn cluster_run_dir(run_dir: &Path, cluster: u32) -> PathBuf {
    run_dir.join(cluster.to_string())
}

/// The control socket of `cluster`: `<run-dir>/<cluster>/ctl`.
pub fn control_path(run_dir: &Path, cluster: u32) -> PathBuf {
    cluster_run_dir(run_dir, cluster).join("ctl")
}

/// Messages larger than this are a protocol error (a buffer list for the
/// largest allowed allocation fits comfortably).
pub const MAX_MESSAGE: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Producer,
    Consumer,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Producer => "producer",
            Role::Consumer => "consumer",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Become the producer or consumer of a queue.
    Attach { queue: u16, role: Role },
    /// Empty buffers for this connection to circulate (start-up only).
    Alloc { count: u32 },
    /// Describe the cluster.
    Info,
    /// Cluster and per-export statistics.
    Stats,
    /// Hot-plug an export of `rx`/`tx` into the running VM `vm`.
    AttachVm {
        vm: VmRef,
        rx: Option<u16>,
        tx: Option<u16>,
        mac: Option<[u8; 6]>,
    },
    /// Remove that export from the VM again.
    DetachVm {
        vm: VmRef,
        rx: Option<u16>,
        tx: Option<u16>,
    },
    /// Run the port named `port` on worker `worker` from now on.
    MovePort { port: String, worker: usize },
    /// About interface ports.
    Nic(NicRequest),
    /// Hand the cluster over to a new zc-hostd (the binary at the same
    /// path, with the same arguments) without losing a packet.
    Restart,
    /// About reflector ports.
    Reflect(ReflectRequest),
    /// About balancers.
    Balance(BalanceRequest),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceRequest {
    /// Start a balancer on the running daemon.
    Add { spec: BalanceSpec },
    /// Stop the balancer reading exactly the queues `inputs`.
    Del { inputs: Vec<u16> },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReflectRequest {
    /// Start a reflector on the running daemon.
    Add { spec: ReflectSpec },
    /// Stop the reflector consuming queue `input`.
    Del { input: u16 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NicRequest {
    /// Start an interface port on the running daemon.
    Add { spec: NicSpec },
    /// Stop the interface port of `ifname`'s receive queue `queue`.
    Del { ifname: String, queue: u32 },
    /// Which cluster queues the interface ports of `ifname` serve (what
    /// `zc:IFNAME` opens on the host).
    Queues { ifname: String },
}

/// A running VM that `attach` reaches, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmRef {
    /// QEMU's QMP socket (an absolute path).
    Qmp(String),
    /// A libvirt domain, by name, on the connection `uri`.
    Libvirt { uri: String, domain: String },
}

impl std::fmt::Display for VmRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmRef::Qmp(path) => f.write_str(path),
            VmRef::Libvirt { uri, domain } => write!(f, "{domain} on {uri}"),
        }
    }
}

/// One export attached to one VM, as `zc-hostd stats` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentInfo {
    /// The VM: its QMP socket, or `<domain> on <libvirt URI>`.
    pub vm: String,
    /// The QEMU id of the virtio-net device (libvirt: its alias `ua-<id>`).
    pub device: String,
    /// The export's vhost-user socket.
    pub socket: String,
    pub rx_queue: Option<u16>,
    pub tx_queue: Option<u16>,
    pub mac: String,
}

/// What a detach did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detached {
    pub attachment: AttachmentInfo,
    /// Buffers the export and its guest held, now back in the pool.
    pub returned: u32,
    /// Spare buffers in the pool afterwards.
    pub spare: u32,
    /// Why QEMU was not asked to remove the devices (the VM is gone).
    pub vm_gone: Option<String>,
}

/// What an attached process needs to map the cluster's memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster: u32,
    pub queues: u16,
    pub ring_size: u32,
    pub buf_size: u32,
    pub buf_count: u32,
    pub pool_size: u64,
    pub pool_path: String,
    pub hugepages: bool,
    pub daemon_pid: u32,
    pub spare_buffers: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Attach succeeded; fds: [pool, queue memory].
    Attached(ClusterInfo),
    Buffers {
        indices: Vec<u32>,
    },
    Info(ClusterInfo),
    Stats {
        info: ClusterInfo,
        exports: Vec<ExportStats>,
        #[serde(default)]
        attachments: Vec<AttachmentInfo>,
        #[serde(default)]
        workers: Vec<WorkerStats>,
        #[serde(default)]
        nics: Vec<NicPortStats>,
        #[serde(default)]
        reflectors: Vec<ReflectPortStats>,
        #[serde(default)]
        balancers: Vec<BalancePortStats>,
    },
    /// An interface port started (`NicAdd`).
    NicAdded(NicPortStats),
    /// An interface port stopped: every buffer it held is back.
    NicRemoved {
        port: String,
        returned: u32,
        spare: u32,
    },
    /// The interface ports of an interface (`NicQueues`); empty when none.
    NicQueues(Vec<NicPortStats>),
    /// A reflector started.
    ReflectAdded(ReflectPortStats),
    /// A reflector stopped: every buffer it held is back.
    ReflectRemoved {
        port: String,
        returned: u32,
        spare: u32,
    },
    /// A balancer started.
    BalanceAdded(BalancePortStats),
    /// A balancer stopped: every buffer it held is back.
    BalanceRemoved {
        port: String,
        returned: u32,
        spare: u32,
    },
    VmAttached(AttachmentInfo),
    VmDetached(Detached),
    /// The port moved from worker `from` to worker `to`.
    Moved {
        port: String,
        from: usize,
        to: usize,
    },
    /// A graceful restart begins: the daemon `pid` execs its successor.
    Restarting {
        pid: u32,
    },
    Error {
        message: String,
    },
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Sends one message, with `fds` attached to its first byte.
pub fn send<T: Serialize>(sock: &UnixStream, msg: &T, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(|e| protocol(e.to_string()))?;
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let n = sock
        .send_with_fds(&[&frame[..]], fds)
        .map_err(io::Error::from)?;
    // A stream socket may take a large frame in pieces; the fds went with the first.
    (&*sock).write_all(&frame[n..])
}

/// Receives one message and the fds that came with it. `Ok(None)` when the
/// peer closed the connection cleanly between messages.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut head = [0u8; 4];
    let mut raw_fds = [-1 as RawFd; 4];
    let mut iov = [libc::iovec {
        iov_base: head.as_mut_ptr().cast(),
        iov_len: head.len(),
    }];
    // SAFETY: the iovec points at `head`, which we own and may be overwritten.
    let (n, nfds) =
        unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }.map_err(io::Error::from)?;
    // SAFETY: recv_with_fds returned `nfds` fresh descriptors that we now own.
    let fds: Vec<OwnedFd> = raw_fds[..nfds]
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    (&*sock).read_exact(&mut head[n..])?;
    let len = u32::from_le_bytes(head) as usize;
    if len > MAX_MESSAGE {
        return Err(protocol(format!(
            "control message of {len} bytes is too large"
        )));
    }
    let mut body = vec![0u8; len];
    (&*sock).read_exact(&mut body)?;
    let msg =
        serde_json::from_slice(&body).map_err(|e| protocol(format!("bad control message: {e}")))?;
    Ok(Some((msg, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    #[test]
    fn messages_and_fds_cross_the_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"pool").unwrap();
        let req = Request::Attach {
            queue: 3,
            role: Role::Consumer,
        };
        send(&a, &req, &[std::os::fd::AsRawFd::as_raw_fd(&f)]).unwrap();
        let (got, fds): (Request, _) = recv(&b).unwrap().unwrap();
        assert_eq!(got, req);
        assert_eq!(fds.len(), 1);
        let mut g = std::fs::File::from(fds.into_iter().next().unwrap());
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "pool");
        let big = Reply::Buffers {
            indices: (0..60_000).collect(),
        };
        let t = std::thread::spawn(move || send(&a, &big, &[]).unwrap());
        let (got, fds): (Reply, _) = recv(&b).unwrap().unwrap();
        t.join().unwrap();
        assert!(fds.is_empty());
        assert!(matches!(got, Reply::Buffers { indices } if indices.len() == 60_000));
        assert!(recv::<Reply>(&b).unwrap().is_none());
    }

    #[test]
    fn oversized_and_garbled_frames_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&(MAX_MESSAGE as u32 + 1).to_le_bytes())
            .unwrap();
        assert!(recv::<Request>(&b).is_err());
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&5u32.to_le_bytes()).unwrap();
        (&a).write_all(b"nope!").unwrap();
        let e = recv::<Request>(&b).unwrap_err();
        assert!(e.to_string().contains("bad control message"), "{e}");
    }
}
