//! The daemon's control loop: one thread polling the control socket, the
//! attached connections and a signalfd for Ctrl-C/SIGTERM (stop) and
//! SIGHUP (graceful restart).

use super::balancers::BalancePortError;
use super::lock::{ClusterLock, LockError};
use super::nics::NicPortError;
use super::policy::{Allow, AllowError, Policy};
use super::reflectors::ReflectPortError;
use super::registry::{ExportConfig, ExportError, Registry};
use super::vm::{VmError, Vms};
use super::worker_ports::WorkerPorts;
use crate::access::Access;
use crate::cluster::{Adopted, Cluster, ConnId, CreateError};
use crate::control::{self, BalanceRequest, NicRequest, ReflectRequest, Reply, Request, Role};
pub use crate::control::{cluster_run_dir, control_path};
use crate::cpu::{self, CoreError};
use crate::paths::{self, Owned, PathError};
use crate::peer::Peer;
use crate::pool::PoolOptions;
use crate::queues::{QueueGeometry, Side};
use crate::worker::{WorkerError, Workers};
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("-g: {0}")]
    Core(#[from] CoreError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot use run directory {path}: {source} (run as root, or pass --run-dir to a writable directory)")]
    RunDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Create(#[from] CreateError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    Workers(#[from] WorkerError),
    #[error(transparent)]
    Nic(#[from] NicPortError),
    #[error(transparent)]
    Reflect(#[from] ReflectPortError),
    #[error(transparent)]
    Balance(#[from] BalancePortError),
    #[error(transparent)]
    Allow(#[from] AllowError),
    #[error("--mode {mode:04o} gives the control socket's group no read and write, so members of {group} could not connect: give it both, e.g. --mode 0660")]
    GroupShut { mode: u32, group: String },
    #[error("signal set-up failed: {0}")]
    Signals(io::Error),
    #[error("poll failed: {0}")]
    Poll(io::Error),
    #[error("cannot write the handover for the new zc-hostd: {0}")]
    Handover(io::Error),
}

pub struct DaemonOptions {
    pub pool: PoolOptions,
    pub geometry: QueueGeometry,
    /// Holds `<run-dir>/<cluster>/ctl`. The cluster lock is not here but
    /// beside the fallback pool (`pool.fallback_dir`, see `lock`): it must
    /// be the same for every daemon of the cluster id.
    pub run_dir: PathBuf,
    /// Queues served to VMs over vhost-user.
    pub exports: Vec<ExportConfig>,
    /// Host interfaces served as ports (`--nic`).
    pub nics: Vec<crate::port::nic::NicSpec>,
    /// Reflectors (`--reflect`).
    pub reflectors: Vec<crate::port::reflect::ReflectSpec>,
    /// Balancers (`--balance`).
    pub balancers: Vec<crate::port::balancer::BalanceSpec>,
    /// `--stock` of exports attached to VMs at run time.
    pub stock: u32,
    /// Poll threads, and the cores they are pinned to.
    pub workers: usize,
    pub cores: Vec<usize>,
    /// How long a worker polls after its last packet before it sleeps.
    pub idle_spin: Duration,
    /// The group of the export sockets and the pool file, so that a QEMU
    /// running as another user (libvirt's) may open them (`--vm-group`).
    pub vm_group: Option<u32>,
    /// The control socket's group (`--group`; default the daemon's): its
    /// members may attach.
    pub control_group: Option<u32>,
    /// The control socket's file mode (`--mode`, default 0660).
    pub control_mode: u32,
    /// Queues reserved for a uid or group (`--allow`), each with its text.
    pub allow: Vec<(String, Allow)>,
}

/// Where libvirt finds the pool of `cluster`: its `<shmem name='zcpool<C>'>`
/// always maps `/dev/shm/<name>`, and the daemon makes that name a link
/// to the pool file (`dir` is /dev/shm but for tests).
pub fn pool_link_path(dir: &Path, cluster: u32) -> PathBuf {
    dir.join(crate::port::export::qemu_args::pool_object_id(cluster))
}

fn lock_cluster(c: &Mutex<Cluster>) -> MutexGuard<'_, Cluster> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a daemon holds outside its cluster: the cluster lock (first to
/// come, last to go), its run directory and the control socket in it.
struct Files {
    lock: ClusterLock,
    dir: PathBuf,
    ctl: Option<Owned>,
    /// `/dev/shm/zcpool<C>`, the pool's name for libvirt.
    pool_link: Option<Owned>,
}

impl Files {
    /// Removes the control socket and the pool link (if still ours), the
    /// run directory (if empty), then gives up the lock.
    fn remove(self) {
        if let Some(ctl) = &self.ctl {
            ctl.remove();
        }
        if let Some(link) = &self.pool_link {
            link.remove();
        }
        paths::remove_empty_dirs(&self.dir, 1);
        self.lock.release();
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
        libc::sigaddset(&mut set, libc::SIGHUP);
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

struct Conn {
    sock: UnixStream,
    pid: u32,
    peer: Peer,
    /// Why this peer may not use the socket (`Policy::admit`): its first
    /// request gets this line, then the connection closes.
    refused: Option<String>,
}

/// Why `Daemon::run` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// SIGINT or SIGTERM: the cluster's files are removed.
    Signal(i32),
    /// `restart` or SIGHUP: everything was handed over (the cluster's
    /// files and a handover beside them) and the lock given up; the caller
    /// execs the successor.
    Restart,
}

pub struct Daemon {
    /// What was taken over from a daemon of the cluster that died.
    adopted: Option<Adopted>,
    cluster: Arc<Mutex<Cluster>>,
    registry: Arc<Registry>,
    ports: Arc<WorkerPorts>,
    vms: Arc<Vms>,
    listener: UnixListener,
    signals: OwnedFd,
    files: Option<Files>,
    dir: PathBuf,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    /// Where the handover of a graceful restart goes (beside the lock).
    state_dir: PathBuf,
    /// A `restart` request was answered: hand over after this round.
    restart: bool,
    policy: Policy,
}

impl Daemon {
    /// Takes the cluster's lock, creates pool and queues, and listens.
    /// Nothing is created before the options are checked and the lock is
    /// held; on failure nothing created is left.
    pub fn start(opts: DaemonOptions) -> Result<Daemon, DaemonError> {
        let id = opts.pool.layout.cluster_id;
        cpu::check_cores(&opts.cores)?;
        // SAFETY: plain getters without preconditions.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let group = opts.control_group.unwrap_or(egid);
        if opts.control_mode & 0o060 != 0o060 && opts.control_group.is_some() {
            return Err(DaemonError::GroupShut {
                mode: opts.control_mode,
                group: crate::access::group_text(group),
            });
        }
        let policy = Policy::new(id, euid, group, opts.geometry.queue_count, &opts.allow)?;
        let control_access = Access {
            mode: opts.control_mode,
            group: opts.control_group,
        };
        let signals = signal_fd().map_err(DaemonError::Signals)?;
        let lock = ClusterLock::take(&opts.pool.fallback_dir, id, &opts.run_dir)?;
        let dir = match fs::create_dir_all(&opts.run_dir)
            .map_err(|source| DaemonError::RunDir {
                path: opts.run_dir.clone(),
                source,
            })
            .and_then(|()| {
                paths::make_dirs("run directory", &opts.run_dir, &[&id.to_string()])
                    .map_err(DaemonError::from)
            }) {
            Ok(d) => d,
            Err(e) => {
                lock.release();
                return Err(e);
            }
        };
        let mut files = Files {
            lock,
            dir: dir.clone(),
            ctl: None,
            pool_link: None,
        };
        let (cluster, adopted) = match Cluster::open(&opts.pool, opts.geometry) {
            Ok((c, a)) => (Arc::new(Mutex::new(c)), a),
            Err(e) => {
                files.remove();
                return Err(e.into());
            }
        };
        let undo = |files: Files| {
            // A cluster taken over stays for the next try: VMs map its pool.
            if adopted.is_none() {
                lock_cluster(&cluster).remove_files();
            }
            files.remove();
        };
        let vm_access = Access::group(opts.vm_group);
        let shared = {
            let c = lock_cluster(&cluster);
            let pool_path = c.pool().path().to_path_buf();
            vm_access
                .apply_group_fd(c.pool().file().as_fd())
                .map_err(|source| PathError::Io {
                    what: "pool file",
                    path: pool_path.clone(),
                    source,
                })
                .and_then(|()| {
                    let link = pool_link_path(&opts.pool.fallback_dir, id);
                    paths::make_symlink("pool link", &link, &pool_path, |old| {
                        !old.exists() || crate::pool::is_pool_of(old, id)
                    })
                })
        };
        match shared {
            Ok(link) => files.pool_link = Some(link),
            Err(e) => {
                undo(files);
                return Err(e.into());
            }
        }
        let workers = match Workers::start_spinning(opts.workers, &opts.cores, opts.idle_spin) {
            Ok(w) => Arc::new(w),
            Err(e) => {
                undo(files);
                return Err(e.into());
            }
        };
        let registry = Arc::new(Registry::new(
            cluster.clone(),
            workers,
            opts.stock,
            vm_access,
        ));
        let restored = lock_cluster(&cluster).handed_attachments();
        let again = match registry.start_all(&opts.exports, &restored) {
            Ok(a) => a,
            Err(e) => {
                // All or nothing: the ones started already go.
                registry.remove_all();
                undo(files);
                return Err(e.into());
            }
        };
        let ports = match WorkerPorts::start(&registry, &opts) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                registry.remove_all();
                undo(files);
                return Err(e);
            }
        };
        let path = control_path(&opts.run_dir, id);
        let listener =
            paths::bind_socket("control socket", &path, control_access).and_then(|(l, owned)| {
                files.ctl = Some(owned);
                l.set_nonblocking(true)
                    .map(|()| l)
                    .map_err(|source| PathError::Io {
                        what: "control socket",
                        path: path.clone(),
                        source,
                    })
            });
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                ports.remove_all();
                registry.remove_all();
                undo(files);
                return Err(e.into());
            }
        };
        let vms = Arc::new(Vms::new(registry.clone(), dir.clone()));
        vms.restore(again);
        Ok(Daemon {
            adopted,
            cluster,
            registry,
            ports,
            vms,
            listener,
            signals,
            files: Some(files),
            dir,
            conns: BTreeMap::new(),
            next_conn: 1,
            state_dir: crate::cluster::state_dir(&opts.pool),
            restart: false,
            policy,
        })
    }

    pub fn cluster(&self) -> MutexGuard<'_, Cluster> {
        lock_cluster(&self.cluster)
    }

    /// What this daemon took over from one that died (`None`: it made a
    /// new cluster).
    pub fn adopted(&self) -> Option<Adopted> {
        self.adopted
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The ports on the workers other than exports.
    pub fn ports(&self) -> &Arc<WorkerPorts> {
        &self.ports
    }

    pub fn control_path(&self) -> PathBuf {
        self.dir.join("ctl")
    }

    /// Serves until SIGINT or SIGTERM (stops and removes the cluster's
    /// files) or SIGHUP or a `restart` request (hands over).
    pub fn run(mut self) -> Result<Stopped, DaemonError> {
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
                if sig == libc::SIGHUP {
                    self.hand_over()?;
                    return Ok(Stopped::Restart);
                }
                self.shutdown();
                return Ok(Stopped::Signal(sig));
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
            if self.restart {
                self.hand_over()?;
                return Ok(Stopped::Restart);
            }
        }
    }

    /// A graceful restart, up to the exec: no new work is taken (the
    /// control socket is not served any more), every export port comes off
    /// its worker between two steps, and what it holds in its hands (the
    /// packets in them too) is written for the successor, with the exports
    /// `attach` added; interface ports stop and give their buffers back.
    /// Pool, queues, owner table, sockets and the export directory stay as
    /// they are; the lock is given up last.
    fn hand_over(&mut self) -> Result<(), DaemonError> {
        self.conns.clear();
        let mut attached = self.vms.handed();
        let exports = self
            .registry
            .hand_over()
            .into_iter()
            .map(|(shared, hands)| {
                let at = attached.iter().position(|(slot, _)| *slot == shared.slot);
                crate::handover::HandedExport {
                    slot: shared.slot,
                    path: shared.spec.path.clone(),
                    hands: hands.unwrap_or_default(),
                    attached: at.map(|i| attached.swap_remove(i).1),
                }
            })
            .collect::<Vec<_>>();
        // Balancers, reflectors and interface ports stop and give their
        // buffers back (the successor finds them spare); the ones of the
        // command line start again.
        self.ports.remove_all();
        let packets: usize = exports.iter().map(|e| e.hands.packets()).sum();
        let h = crate::handover::Handover { exports };
        h.write(&self.state_dir).map_err(DaemonError::Handover)?;
        log::info!(
            "handing over to a new zc-hostd: {} exports, {packets} packets in their hands",
            h.exports.len()
        );
        // Dropping the lock file's descriptor unlocks; the file stays.
        drop(self.files.take());
        Ok(())
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((sock, _)) => {
                    // A client that stalls mid-message must not freeze the daemon.
                    let _ = sock.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = sock.set_write_timeout(Some(Duration::from_secs(2)));
                    let peer = match Peer::of(&sock) {
                        Ok(p) => p,
                        Err(e) => {
                            log::warn!("control connection: cannot read its credentials: {e}");
                            continue;
                        }
                    };
                    let refused = self.policy.admit(&peer).err();
                    if let Some(line) = &refused {
                        log::warn!("pid {}: {line}", peer.pid);
                    }
                    let id = self.next_conn;
                    self.next_conn += 1;
                    self.conns.insert(
                        id,
                        Conn {
                            sock,
                            pid: peer.pid,
                            peer,
                            refused,
                        },
                    );
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
        if let Some(line) = self.refusal(&conn.peer, conn.refused.as_deref(), &req) {
            let reply = Reply::Error { message: line };
            if let Err(e) = control::send(&conn.sock, &reply, &[]) {
                log::warn!("reply to pid {pid} failed: {e}");
            }
            // A peer that may not attach at all is done; a refused
            // request leaves the connection as it was.
            return conn.refused.is_none();
        }
        // Lock order: the registry's export list before the cluster (an
        // attach holds the list while it starts an export).
        let stats = matches!(req, Request::Stats).then(|| self.registry.stats());
        let nics = matches!(req, Request::Stats).then(|| self.ports.nics.stats());
        let reflectors = matches!(req, Request::Stats).then(|| self.ports.reflectors.stats());
        let balancers = matches!(req, Request::Stats).then(|| self.ports.balancers.stats());
        let mut cluster = lock_cluster(&self.cluster);
        let (reply, fds): (Reply, Vec<i32>) = match req {
            Request::Info => (Reply::Info(cluster.info()), vec![]),
            Request::Stats => {
                let (exports, workers) = stats.unwrap_or_default();
                (
                    Reply::Stats {
                        info: cluster.info(),
                        exports,
                        attachments: self.vms.list(),
                        workers,
                        nics: nics.unwrap_or_default(),
                        reflectors: reflectors.unwrap_or_default(),
                        balancers: balancers.unwrap_or_default(),
                    },
                    vec![],
                )
            }
            Request::Nic(r) => {
                drop(cluster);
                let reply = self.serve_nic(r);
                return match control::send(&self.conns[&id].sock, &reply, &[]) {
                    Ok(()) => true,
                    Err(e) => {
                        log::warn!("reply to pid {pid} failed: {e}");
                        false
                    }
                };
            }
            Request::Balance(r) => {
                drop(cluster);
                let reply = self.serve_balance(r);
                return match control::send(&self.conns[&id].sock, &reply, &[]) {
                    Ok(()) => true,
                    Err(e) => {
                        log::warn!("reply to pid {pid} failed: {e}");
                        false
                    }
                };
            }
            Request::Reflect(r) => {
                drop(cluster);
                let reply = self.serve_reflect(r);
                return match control::send(&self.conns[&id].sock, &reply, &[]) {
                    Ok(()) => true,
                    Err(e) => {
                        log::warn!("reply to pid {pid} failed: {e}");
                        false
                    }
                };
            }
            Request::MovePort { port, worker } => {
                drop(cluster);
                let moved = match self.ports.id_of(&port) {
                    Some(nic) => self
                        .registry
                        .workers()
                        .move_port(nic, worker)
                        .map_err(|e| e.to_string()),
                    None => self
                        .registry
                        .move_port(&port, worker)
                        .map_err(|e| e.to_string()),
                };
                let reply = match moved {
                    Ok(from) => Reply::Moved {
                        port,
                        from,
                        to: worker,
                    },
                    Err(message) => Reply::Error { message },
                };
                return match control::send(&self.conns[&id].sock, &reply, &[]) {
                    Ok(()) => true,
                    Err(e) => {
                        log::warn!("reply to pid {pid} failed: {e}");
                        false
                    }
                };
            }
            Request::Attach { queue, role } => match cluster.attach(id, pid, queue, role) {
                Ok(()) => {
                    // The bell of the other side, rung when it sleeps in a worker.
                    let peer = match role {
                        Role::Producer => Side::Consumer,
                        Role::Consumer => Side::Producer,
                    };
                    let mut fds = vec![
                        cluster.pool().file().as_raw_fd(),
                        cluster.queues().fd().as_raw_fd(),
                    ];
                    fds.extend(cluster.queues().bell(queue, peer).map(|b| b.as_raw_fd()));
                    (Reply::Attached(cluster.info()), fds)
                }
                Err(e) => (
                    Reply::Error {
                        message: e.to_string(),
                    },
                    vec![],
                ),
            },
            Request::AttachVm { vm, rx, tx, mac } => {
                drop(cluster);
                return self.serve_vm(id, move |v| {
                    v.attach(&vm, rx, tx, mac).map(Reply::VmAttached)
                });
            }
            Request::DetachVm { vm, rx, tx } => {
                drop(cluster);
                return self.serve_vm(id, move |v| v.detach(&vm, rx, tx).map(Reply::VmDetached));
            }
            Request::Restart => {
                // Answered first: the connection closes with the exec.
                self.restart = true;
                (
                    Reply::Restarting {
                        pid: std::process::id(),
                    },
                    vec![],
                )
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

    /// Why `peer` may not have `req` served (`refused`: why it may not use
    /// the socket at all), or `None`.
    fn refusal(&self, peer: &Peer, refused: Option<&str>, req: &Request) -> Option<String> {
        if let Some(line) = refused {
            return Some(line.to_string());
        }
        let what = match req {
            Request::Attach { queue, .. } => return self.policy.may_take(peer, *queue).err(),
            Request::Alloc { .. } | Request::Info | Request::Stats => return None,
            Request::Nic(NicRequest::Queues { .. }) => return None,
            Request::Nic(NicRequest::Add { .. }) => "add interface ports",
            Request::Nic(NicRequest::Del { .. }) => "remove interface ports",
            Request::Reflect(ReflectRequest::Add { .. }) => "add reflectors",
            Request::Reflect(ReflectRequest::Del { .. }) => "remove reflectors",
            Request::Balance(BalanceRequest::Add { .. }) => "add balancers",
            Request::Balance(BalanceRequest::Del { .. }) => "remove balancers",
            Request::AttachVm { .. } => "attach exports to VMs",
            Request::DetachVm { .. } => "detach exports from VMs",
            Request::MovePort { .. } => "move ports",
            Request::Restart => "restart the daemon",
        };
        self.policy.may_administer(peer, what).err()
    }

    /// The interface port requests: answered without the cluster lock
    /// (the port list takes it itself, in the registry's order).
    fn serve_nic(&self, req: NicRequest) -> Reply {
        let error = |e: NicPortError| Reply::Error {
            message: e.to_string(),
        };
        match req {
            NicRequest::Add { spec } => match self.ports.nics.add(spec) {
                Ok(s) => {
                    log::info!("interface port {} added", s.name);
                    Reply::NicAdded(s)
                }
                Err(e) => error(e),
            },
            NicRequest::Del { ifname, queue } => match self.ports.nics.remove(&ifname, queue) {
                Ok((port, returned)) => {
                    log::info!("interface port {port} removed");
                    Reply::NicRemoved {
                        port,
                        returned: returned as u32,
                        spare: self.cluster().spare_count() as u32,
                    }
                }
                Err(e) => error(e),
            },
            NicRequest::Queues { ifname } => {
                Reply::NicQueues(self.ports.nics.of_interface(&ifname))
            }
        }
    }

    /// The balancer requests, answered without the cluster lock (as
    /// `serve_nic`).
    fn serve_balance(&self, req: BalanceRequest) -> Reply {
        let error = |e: BalancePortError| Reply::Error {
            message: e.to_string(),
        };
        match req {
            BalanceRequest::Add { spec } => match self.ports.balancers.add(spec) {
                Ok(s) => {
                    log::info!("balancer {} added", s.name);
                    Reply::BalanceAdded(s)
                }
                Err(e) => error(e),
            },
            BalanceRequest::Del { inputs } => match self.ports.balancers.remove(&inputs) {
                Ok((port, returned)) => {
                    log::info!("balancer {port} removed");
                    Reply::BalanceRemoved {
                        port,
                        returned: returned as u32,
                        spare: self.cluster().spare_count() as u32,
                    }
                }
                Err(e) => error(e),
            },
        }
    }

    /// The reflector requests, answered without the cluster lock (as
    /// `serve_nic`).
    fn serve_reflect(&self, req: ReflectRequest) -> Reply {
        let error = |e: ReflectPortError| Reply::Error {
            message: e.to_string(),
        };
        match req {
            ReflectRequest::Add { spec } => match self.ports.reflectors.add(spec) {
                Ok(s) => {
                    log::info!("reflector {} added", s.name);
                    Reply::ReflectAdded(s)
                }
                Err(e) => error(e),
            },
            ReflectRequest::Del { input } => match self.ports.reflectors.remove(input) {
                Ok((port, returned)) => {
                    log::info!("reflector {port} removed");
                    Reply::ReflectRemoved {
                        port,
                        returned: returned as u32,
                        spare: self.cluster().spare_count() as u32,
                    }
                }
                Err(e) => error(e),
            },
        }
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
        self.ports.remove_all();
        self.registry.remove_all();
        self.cluster().remove_files();
        if let Some(f) = self.files.take() {
            f.remove();
        }
    }
}
