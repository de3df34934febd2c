//! The daemon's control loop: one thread polling the control socket, the
//! attached connections and a signalfd for Ctrl-C/SIGTERM.

use super::cluster::{Cluster, ConnId, CreateError};
use super::registry::{ExportDefaults, Registry};
use super::vm::{VmError, Vms};
use crate::control::{self, Reply, Request};
use crate::export::{self, ExportConfig, ExportError};
use crate::pool::PoolOptions;
use crate::queues::QueueGeometry;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("cluster {cluster} is already served by zc-hostd (pid {pid}); stop it first or pick another cluster id")]
    AlreadyRunning { cluster: u32, pid: String },
    #[error("cannot use run directory {path}: {source} (run as root, or pass --run-dir to a writable directory)")]
    RunDir { path: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Create(#[from] CreateError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("signal set-up failed: {0}")]
    Signals(io::Error),
    #[error("poll failed: {0}")]
    Poll(io::Error),
}

pub struct DaemonOptions {
    pub pool: PoolOptions,
    pub geometry: QueueGeometry,
    pub run_dir: PathBuf,
    /// Queues served to VMs over vhost-user.
    pub exports: Vec<ExportConfig>,
    /// For exports attached to VMs at run time.
    pub defaults: ExportDefaults,
}

fn lock_cluster(c: &Mutex<Cluster>) -> MutexGuard<'_, Cluster> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a cluster's control files live.
pub fn cluster_run_dir(run_dir: &Path, cluster: u32) -> PathBuf {
    run_dir.join(cluster.to_string())
}

pub fn control_path(run_dir: &Path, cluster: u32) -> PathBuf {
    cluster_run_dir(run_dir, cluster).join("ctl")
}

/// Holds the cluster's lock file: a second daemon for the same cluster fails
/// here, and a daemon killed with -9 leaves a lock nobody holds, so the next
/// one takes over its stale files.
struct RunLock {
    _file: File,
    dir: PathBuf,
}

impl RunLock {
    fn take(run_dir: &Path, cluster: u32) -> Result<Self, DaemonError> {
        let dir = cluster_run_dir(run_dir, cluster);
        let rd = |source| DaemonError::RunDir {
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(rd)?;
        let path = dir.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(rd)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim().to_string();
            return Err(DaemonError::AlreadyRunning {
                cluster,
                pid: if pid.is_empty() {
                    "unknown".into()
                } else {
                    pid
                },
            });
        }
        file.set_len(0).map_err(rd)?;
        write!(file, "{}", std::process::id()).map_err(rd)?;
        Ok(RunLock { _file: file, dir })
    }

    fn remove(&self) {
        let _ = fs::remove_file(self.dir.join("ctl"));
        let _ = fs::remove_file(self.dir.join("lock"));
        let _ = fs::remove_dir(&self.dir);
    }
}

/// SIGINT and SIGTERM arrive on a descriptor the loop polls, so shutdown
/// runs in normal code (removing files) instead of in a signal handler.
fn signal_fd() -> io::Result<OwnedFd> {
    // SAFETY: plain libc calls on a sigset we own; results are checked.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn read_signal(fd: &OwnedFd) -> i32 {
    // SAFETY: signalfd_siginfo is plain data; read fills at most its size.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    // SAFETY: reading into the struct we own, with its exact size.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            std::mem::size_of_val(&info),
        )
    };
    if n > 0 {
        info.ssi_signo as i32
    } else {
        0
    }
}

fn peer_pid(sock: &UnixStream) -> u32 {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        cred.pid as u32
    } else {
        0
    }
}

struct Conn {
    sock: UnixStream,
    pid: u32,
}

pub struct Daemon {
    cluster: Arc<Mutex<Cluster>>,
    registry: Arc<Registry>,
    vms: Arc<Vms>,
    listener: UnixListener,
    signals: OwnedFd,
    lock: RunLock,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
}

impl Daemon {
    /// Takes the cluster's lock, creates pool and queues, and listens.
    pub fn start(opts: DaemonOptions) -> Result<Daemon, DaemonError> {
        let id = opts.pool.layout.cluster_id;
        let signals = signal_fd().map_err(DaemonError::Signals)?;
        let lock = RunLock::take(&opts.run_dir, id)?;
        let cluster = match Cluster::create(&opts.pool, opts.geometry) {
            Ok(c) => c,
            Err(e) => {
                lock.remove();
                return Err(e.into());
            }
        };
        let cluster = Arc::new(Mutex::new(cluster));
        let exports = match export::start(&cluster, &opts.exports) {
            Ok(e) => e,
            Err(e) => {
                lock_cluster(&cluster).remove_files();
                for x in &opts.exports {
                    let _ = fs::remove_file(&x.spec.path);
                }
                lock.remove();
                return Err(e.into());
            }
        };
        let path = control_path(&opts.run_dir, id);
        let listen = |source| DaemonError::Listen {
            path: path.clone(),
            source,
        };
        let _ = fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .and_then(|l| fs::set_permissions(&path, fs::Permissions::from_mode(0o660)).map(|_| l))
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .map_err(|e| {
                lock_cluster(&cluster).remove_files();
                lock.remove();
                listen(e)
            })?;
        let registry = Arc::new(Registry::new(cluster.clone(), exports, opts.defaults));
        let vms = Arc::new(Vms::new(registry.clone(), lock.dir.clone()));
        Ok(Daemon {
            cluster,
            registry,
            vms,
            listener,
            signals,
            lock,
            conns: BTreeMap::new(),
            next_conn: 1,
        })
    }

    pub fn cluster(&self) -> MutexGuard<'_, Cluster> {
        lock_cluster(&self.cluster)
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn control_path(&self) -> PathBuf {
        self.lock.dir.join("ctl")
    }

    /// Serves until SIGINT or SIGTERM; returns the signal number.
    pub fn run(mut self) -> Result<i32, DaemonError> {
        loop {
            let ids: Vec<ConnId> = self.conns.keys().copied().collect();
            let mut fds = vec![
                libc::pollfd {
                    fd: self.signals.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            fds.extend(ids.iter().map(|id| libc::pollfd {
                fd: self.conns[id].sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }));
            // SAFETY: `fds` is a live, correctly sized array of pollfd.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DaemonError::Poll(e));
            }
            if fds[0].revents != 0 {
                let sig = read_signal(&self.signals);
                self.shutdown();
                return Ok(sig);
            }
            if fds[1].revents != 0 {
                self.accept();
            }
            for (pfd, id) in fds[2..].iter().zip(ids) {
                if pfd.revents != 0 && !self.serve(id) {
                    self.conns.remove(&id);
                    self.cluster().release(id);
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((sock, _)) => {
                    // A client that stalls mid-message must not freeze the daemon.
                    let _ = sock.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = sock.set_write_timeout(Some(Duration::from_secs(2)));
                    let pid = peer_pid(&sock);
                    let id = self.next_conn;
                    self.next_conn += 1;
                    self.conns.insert(id, Conn { sock, pid });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::warn!("accept on the control socket failed: {e}");
                    return;
                }
            }
        }
    }

    /// Handles one request; false when the connection is finished.
    fn serve(&mut self, id: ConnId) -> bool {
        let conn = &self.conns[&id];
        let req = match control::recv::<Request>(&conn.sock) {
            Ok(Some((req, _))) => req,
            Ok(None) => return false,
            Err(e) => {
                log::warn!("control connection of pid {}: {e}", conn.pid);
                return false;
            }
        };
        let pid = conn.pid;
        // Lock order: the registry's export list before the cluster (an
        // attach holds the list while it starts an export).
        let exports = matches!(req, Request::Stats).then(|| self.registry.shared());
        let mut cluster = lock_cluster(&self.cluster);
        let (reply, fds): (Reply, Vec<i32>) = match req {
            Request::Info => (Reply::Info(cluster.info()), vec![]),
            Request::Stats => (
                Reply::Stats {
                    info: cluster.info(),
                    exports: exports
                        .unwrap_or_default()
                        .iter()
                        .map(|e| e.stats())
                        .collect(),
                    attachments: self.vms.list(),
                },
                vec![],
            ),
            Request::Attach { queue, role } => match cluster.attach(id, pid, queue, role) {
                Ok(()) => (
                    Reply::Attached(cluster.info()),
                    vec![
                        cluster.pool().file().as_raw_fd(),
                        cluster.queues().fd().as_raw_fd(),
                    ],
                ),
                Err(e) => (
                    Reply::Error {
                        message: e.to_string(),
                    },
                    vec![],
                ),
            },
            Request::AttachVm { qmp, rx, tx, mac } => {
                drop(cluster);
                return self.serve_vm(id, move |v| {
                    v.attach(Path::new(&qmp), rx, tx, mac)
                        .map(Reply::VmAttached)
                });
            }
            Request::DetachVm { qmp, rx, tx } => {
                drop(cluster);
                return self.serve_vm(id, move |v| {
                    v.detach(Path::new(&qmp), rx, tx).map(Reply::VmDetached)
                });
            }
            Request::Alloc { count } => match cluster.alloc(id, count) {
                Ok(indices) => (Reply::Buffers { indices }, vec![]),
                Err(e) => (
                    Reply::Error {
                        message: e.to_string(),
                    },
                    vec![],
                ),
            },
        };
        let sent = control::send(&self.conns[&id].sock, &reply, &fds);
        drop(cluster);
        if let Err(e) = sent {
            log::warn!("reply to pid {pid} failed: {e}");
            return false;
        }
        true
    }

    /// Attach and detach run QMP sequences that wait for the guest
    /// (seconds under TCG): on a thread of their own, so the control loop
    /// keeps serving; the reply goes out on a clone of the connection.
    fn serve_vm(
        &mut self,
        id: ConnId,
        op: impl FnOnce(&Vms) -> Result<Reply, VmError> + Send + 'static,
    ) -> bool {
        let sock = match self.conns[&id].sock.try_clone() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("control connection: {e}");
                return false;
            }
        };
        // The client waits for as long as the guest takes.
        let _ = sock.set_write_timeout(None);
        let vms = self.vms.clone();
        let spawned = std::thread::Builder::new()
            .name("zc-attach".into())
            .spawn(move || {
                let reply = op(&vms).unwrap_or_else(|e| Reply::Error {
                    message: e.to_string(),
                });
                if let Err(e) = control::send(&sock, &reply, &[]) {
                    log::warn!("attach/detach reply failed: {e}");
                }
            });
        spawned.is_ok()
    }

    fn shutdown(&mut self) {
        self.conns.clear();
        // VMs must not keep devices of a cluster that is going away (a
        // later attach would find a stale pool in them).
        self.vms.detach_all(Duration::from_secs(10));
        for p in self.registry.socket_paths() {
            let _ = fs::remove_file(p);
        }
        self.cluster().remove_files();
        self.lock.remove();
    }
}
