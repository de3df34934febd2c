//! zc-hostd: creates a zc cluster (hugepage buffer pool + packet queues) and
//! serves it to host processes and, as vhost-user virtio-net devices, to
//! virtual machines.

use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use zc_host::client;
use zc_host::control::{
    AttachmentInfo, BalanceRequest, ClusterInfo, NicRequest, ReflectRequest, Reply, Request, VmRef,
};
use zc_host::daemon::policy::Allow;
use zc_host::daemon::registry::ExportConfig;
use zc_host::daemon::server::{Daemon, DaemonOptions, Stopped};
use zc_host::daemon::vm::queues_text;
use zc_host::pool::PoolOptions;
use zc_host::port::balancer::{balance_lines, BalancePortStats, BalanceSpec};
use zc_host::port::export::qemu_args::QemuArgs;
use zc_host::port::export::spec::{parse_mac, MacDisplay, QueueSpec};
use zc_host::port::export::{ExportSpec, DEFAULT_STOCK};
use zc_host::port::nic::{nic_line, NicPortStats, NicSpec, NicTarget};
use zc_host::port::reflect::{reflect_line, ReflectPortStats, ReflectSpec, ReflectTarget};
use zc_host::queues::QueueGeometry;
use zc_host::stats::{format_line, worker_line, ExportStats, WorkerStats};
use zc_proto::PoolLayout;

/// A line on stderr at a log level: `<N>`-prefixed when stderr is the
/// journal (see `zc_host::journal`).
macro_rules! say {
    ($level:ident, $($arg:tt)*) => {
        eprintln!("{}", zc_host::journal::line(log::Level::$level, &format!($($arg)*)))
    };
}

#[derive(Parser, Debug)]
#[command(
    name = "zc-hostd",
    version,
    // A later option wins over an earlier one (scripts add to a base line).
    args_override_self = true,
    about = "Create a zc cluster (buffer pool + packet queues) and serve it",
    long_about = "Create a zc cluster: a buffer pool on 2 MiB hugepages and a set of \
single-producer single-consumer packet queues. Applications open the queues by name, \
zc:<cluster>@<queue> (e.g. zc:99@0), through the control socket <run-dir>/<cluster>/ctl; \
one process may produce into a queue and one may consume from it at a time. Packets move \
by swapping buffer handles: nothing is copied.\n\n\
With --export, queues are also served to virtual machines as vhost-user virtio-net \
devices: what a host process sends on queue rx=Q reaches the guest, what the guest sends \
arrives on queue tx=Q. `zc-hostd -c ID --qemu-args SOCKET` prints the QEMU options that \
attach a VM at its start; `zc-hostd -c ID attach --qmp QMP --export rx=Q,tx=Q` hot-plugs an \
export (and the pool) into a VM that is already running, `detach` removes it again; \
`zc-hostd -c ID stats` shows per-export counters and the attachments.\n\n\
The ports' packets (exports, --nic interfaces, --reflect reflectors, --balance balancers) are moved by --workers N \
poll threads (default 1), each serving many ports: busy while any has traffic, asleep in epoll when all are idle (an idle daemon uses no \
CPU). -g pins them; `zc-hostd -c ID move PORT WORKER` moves an export to another worker without \
losing a packet; `stats` shows each worker's load and ports.\n\n\
A cluster is a trust domain: every process and VM attached to it can read and modify \
every buffer of its pool (a VM maps the whole pool as its ivshmem BAR), and nothing outside \
it: not another cluster's pool, not another VM's RAM, not the cluster's queue rings or \
buffer owner table, which stay host-private. Give tenants that must not see each other's \
packets a cluster each, served by one zc-hostd each (systemd instance zc-hostd@<cluster>): \
separate processes with their own options and lock, so a crash or restart of one does not \
touch another, and a bug in one cluster's exports cannot reach another cluster's memory. \
`zbridge -i zc:99@3 -o zc:100@0` moves packets across, with exactly one copy. \
Who may attach: root, zc-hostd's own user and the members of the control socket's group \
(--group, checked on each peer's credentials); --allow reserves a queue for a user or group; \
attach, detach, nic and move are for root and zc-hostd's user only.\n\n\
Stop the daemon with Ctrl-C or SIGTERM: it removes the cluster's files. `zc-hostd -c ID \
restart` or SIGHUP restarts it without losing a packet (the binary at the same path: an \
upgrade). A daemon that \
was killed (or crashed) is replaced by starting zc-hostd again with the same options: it takes \
the cluster over (same pool file, queues with the packets in them, exports on the same sockets), \
and VMs started with the --qemu-args options reconnect within a second; restart host processes \
attached to the cluster. Other options make a new cluster.",
    after_help = "Example:\n  zc-hostd -c 99 -q 4 &\n  zcount -i zc:99@0 &\n  zsend -i zc:99@0 -n 1000000 -l 64\n\n\
Serving queues 0 and 1 to a VM:\n  zc-hostd -c 99 --export /tmp/vm1.sock,rx=0,tx=1 &\n  \
qemu-system-x86_64 ... $(zc-hostd -c 99 --qemu-args /tmp/vm1.sock)\n  \
zsend -i zc:99@0 -n 1000     # the guest receives these\n  zcount -i zc:99@1        # counts what the guest sends\n\n\
Hot-plugging into a running VM (started with shared RAM and -qmp unix:/tmp/vm1.qmp,server=on,wait=off):\n  \
zc-hostd -c 99 attach --qmp /tmp/vm1.qmp --export rx=2\n  \
zc-hostd -c 99 detach --qmp /tmp/vm1.qmp --export rx=2"
)]
struct Args {
    #[command(subcommand)]
    cmd: Option<Cmd>,

    /// Cluster id: the <cluster> in zc:<cluster>@<queue>.
    #[arg(short = 'c', long = "cluster", value_name = "ID", global = true)]
    cluster: Option<u32>,

    /// Serve queues to a VM as a vhost-user virtio-net device on socket PATH
    /// (repeatable): rx=Q is delivered to the guest, what the guest sends goes
    /// to tx=Q; either may be left out (no tx: guest packets are counted and
    /// dropped). Without mac= the MAC is 02:7a:<cluster>:<queue>.
    #[arg(long = "export", value_name = "PATH,rx=Q,tx=Q[,mac=MAC]")]
    exports: Vec<ExportSpec>,

    /// Serve a host interface as a port (repeatable): what arrives on its
    /// receive queue N (default 0) goes into cluster queue ingress=Q, what is
    /// sent into queue egress=Q leaves on it; either may be left out. On the
    /// host `zcount -i zc:IFNAME` consumes the ingress queue, `zsend -i
    /// zc:IFNAME` produces into the egress queue. mode=auto uses AF_XDP with
    /// the pool as UMEM where it attaches, else AF_PACKET (mode=xdp|packet
    /// forces one); zerocopy=on insists on a driver that DMAs into pool
    /// buffers; takeover replaces another XDP program on the interface.
    /// Needs root.
    #[arg(
        long = "nic",
        value_name = "IFNAME,ingress=Q[,egress=Q][,queue=N][,mode=auto|xdp|packet][,zerocopy=auto|on|off][,takeover]"
    )]
    // Parsed in `run`, not by clap: a bad one is one line, not clap's three.
    nics: Vec<String>,

    /// Run a reflector on the workers (repeatable): every packet consumed
    /// from queue in=Q goes into queue out=Q with its destination and source
    /// MACs swapped, in the buffer it arrived in (testpmd's macswap). With an
    /// export of rx=OUT,tx=IN a VM's probes come back without leaving the
    /// worker (`zping` from the guest measures the round trip); what does not
    /// fit into the out queue is dropped and counted.
    #[arg(long = "reflect", value_name = "in=Q,out=Q")]
    // Parsed in `run`, as --nic.
    reflectors: Vec<String>,

    /// Run a balancer on the workers (repeatable), as zbalance_ipc does:
    /// it reads the in queues (Q+Q merges them) and gives every packet to
    /// every group of out (groups separated by /, a group is Q+Q+..., the
    /// queues of one application); within a group the packet goes to one
    /// queue. hash=5tuple (default) or ip: a symmetric hash, so both
    /// directions of a flow reach the same queue: FNV-1a over the lower
    /// endpoint (IPv4/IPv6 address, then for TCP/UDP/SCTP/UDP-Lite with
    /// 5tuple its port), the higher one, then (5tuple) the protocol, modulo
    /// the group's size. VLAN and QinQ tags (0x8100, 0x88a8, 0x9100) are
    /// skipped; IPv6 extension headers are walked; fragments after the first
    /// go by their addresses alone; non-IP frames by their two MAC addresses.
    /// hash=rr: in turn within each group; hash=fanout: every queue of every
    /// group. full=drop (default): a full out queue drops for that queue
    /// only, counted in stats; full=wait (one group only): hold the inputs
    /// back until it has room. A packet's last destination gets its buffer;
    /// the others get copies (counted as copied in stats).
    #[arg(
        long = "balance",
        value_name = "in=Q[+Q...],out=G[/G...][,hash=rr|ip|5tuple|fanout][,full=drop|wait]"
    )]
    // Parsed in `run`, as --nic.
    balancers: Vec<String>,

    /// Pool buffers each export's guest may hold (zero-copy; bounds buffers in flight).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_STOCK)]
    stock: u32,

    /// Poll threads that move the packets of every export: each serves
    /// many exports, busy while any has traffic, asleep when all are idle.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,

    /// Microseconds a worker keeps polling after its last packet before it
    /// sleeps in epoll. Longer keeps it busy-polling through the gaps
    /// between packets at low rates (lower latency: no wake-up on the path,
    /// at the price of a busy core); 0 sleeps as soon as it is idle.
    #[arg(long = "idle-spin", value_name = "USEC",
          default_value_t = zc_host::worker::DEFAULT_IDLE_SPIN.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=60_000_000))]
    idle_spin: u64,

    /// Pin the workers to these cores (worker i gets the i-th, cycling).
    #[arg(
        short = 'g',
        long = "core",
        value_name = "CORE[,CORE...]",
        value_delimiter = ','
    )]
    cores: Vec<usize>,

    /// Do not serve: print the QEMU options that attach a VM to the running
    /// daemon's export on SOCKET, and exit.
    #[arg(long = "qemu-args", value_name = "SOCKET")]
    qemu_args: Option<PathBuf>,

    /// Do not serve: print the libvirt domain XML (shared memory, the
    /// vhost-user interface, the pool as shmem) for the running daemon's
    /// export on SOCKET, and exit.
    #[arg(
        long = "libvirt-xml",
        value_name = "SOCKET",
        conflicts_with = "qemu_args"
    )]
    libvirt_xml: Option<PathBuf>,

    /// Guest RAM size used in the --qemu-args output.
    #[arg(long = "vm-mem", value_name = "SIZE", default_value = "1G")]
    vm_mem: String,

    /// Number of queues (zc:<cluster>@0 .. @N-1).
    #[arg(short = 'q', long = "queues", value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    queues: u16,

    /// Buffers in the pool.
    #[arg(long, value_name = "N", default_value_t = 65536)]
    buffers: u32,

    /// Bytes per buffer, including the 256-byte headroom (largest packet = B - 256;
    /// 2048 holds a 1500-byte MTU frame with two VLAN tags, jumbo frames want 4096 or more).
    #[arg(long = "buf-size", value_name = "B", default_value_t = 2048)]
    buf_size: u32,

    /// Slots per queue (a power of two); each queue holds this many buffers.
    /// Short queues stay in cache and are faster; long ones absorb bursts.
    #[arg(long = "queue-len", value_name = "N", default_value_t = 1024)]
    queue_len: u32,

    /// hugetlbfs mount for the pool (file <DIR>/zc/<cluster>/pool).
    #[arg(long, value_name = "DIR", default_value = "/dev/hugepages")]
    hugepages: PathBuf,

    /// Put the pool in /dev/shm even if hugepages are available.
    #[arg(long)]
    no_hugepages: bool,

    /// Directory for the control socket (<DIR>/<cluster>/ctl); also $ZC_RUN_DIR.
    #[arg(
        long = "run-dir",
        value_name = "DIR",
        env = "ZC_RUN_DIR",
        default_value = "/run/zc"
    )]
    run_dir: PathBuf,

    /// Give the export sockets and the pool file this group (name or id;
    /// mode stays 0660), so that a QEMU running as another user may open
    /// them: libvirt starts QEMU as libvirt-qemu (group libvirt-qemu on
    /// Debian), so `--vm-group libvirt-qemu`.
    #[arg(long = "vm-group", value_name = "GROUP")]
    vm_group: Option<String>,

    /// Give the control socket this group (name or id): its members may
    /// attach to the cluster's queues. Everyone else is refused with a
    /// line naming the cluster and this group, by the socket's file mode or,
    /// when that lets them connect, by the daemon, which checks every
    /// peer's credentials (SO_PEERCRED). Root and zc-hostd's own user may
    /// always attach. Default: zc-hostd's group (root).
    #[arg(long = "group", value_name = "GROUP")]
    group: Option<String>,

    /// The control socket's file mode, octal. 0666 lets anyone connect,
    /// to be refused unless in --group (a clearer error than EACCES).
    #[arg(long = "mode", value_name = "MODE", default_value = "0660")]
    mode: String,

    /// Reserve both roles of queue Q for user USER or the members of group
    /// GROUP (names or ids; repeatable, several for one queue admit any of
    /// them): another tenant's process, though let in by --group, cannot
    /// take it. Root may always take it. Exports and interface ports of the
    /// daemon's own command line are not checked.
    #[arg(long = "allow", value_name = "Q=USER|Q=@GROUP")]
    // Parsed in `run`: a bad one is one line.
    allow: Vec<String>,

    /// Serve Prometheus metrics (text exposition) on http://ADDR:PORT/metrics:
    /// buffers, queues, exports, interface ports, reflectors and workers (port 0: any free port; the
    /// address is logged at start).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,

    /// Log attachments and detachments, and print a statistics line per
    /// export every second.
    #[arg(short = 'v', long, global = true)]
    verbose: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the running daemon's per-export statistics and attachments.
    Stats {
        /// As JSON (one object: cluster info, exports, attachments).
        #[arg(long)]
        json: bool,
    },
    /// Hot-plug an export into a running VM (its QMP socket, or a libvirt domain).
    #[command(
        long_about = "Hot-plug an export into a running VM through its QMP socket (--qmp) or, for a \
VM libvirt manages, through libvirt (--libvirt DOMAIN [--connect URI], with virsh attach-device; \
the domain needs shared memory, and its QEMU must be able to open the export socket and the pool: \
zc-hostd --vm-group libvirt-qemu). \
The running zc-hostd starts a vhost-user export of the queues and adds to the VM, over QMP: \
the pool (memory-backend-file + ivshmem-plain, once per VM and cluster), a vhost-user chardev \
and netdev, and a virtio-net-pci device. The guest's kernel sees the devices through ACPI PCI \
hot-plug; inside it, `zcount -i zc:<cluster>@<rx> --wait 60` opens the new queue. The VM needs \
shared RAM (-object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem) and \
-qmp unix:PATH,server=on,wait=off. If a step fails, the steps before it are undone."
    )]
    Attach(VmArgs),
    /// Run a port (an export: its socket's file name or path; nic:IFNAME@N;
    /// reflect:Q) on another worker.
    #[command(
        long_about = "Run a port on another worker, e.g. `zc-hostd -c 99 move vm1.sock 1`. \
The port is taken off its worker between two of its steps, with every buffer it holds, and \
handed to the other: no packet is lost or reordered. `zc-hostd -c 99 stats` shows which worker \
runs which port and how busy each is."
    )]
    Move {
        /// The port as `stats` names it: an export's socket file name (or
        /// its path), nic:IFNAME@N, reflect:Q.
        port: String,
        /// The worker to run it on (0 .. --workers - 1).
        worker: usize,
    },
    /// Add or remove an interface port on the running daemon.
    #[command(
        subcommand,
        long_about = "Add or remove an interface port on the running daemon: \
`zc-hostd -c 99 nic add eth1,ingress=0,egress=1` starts one as --nic does, \
`zc-hostd -c 99 nic del eth1` (or eth1,queue=N, or the text given to add) stops it; \
every buffer it or the kernel held comes back to the pool."
    )]
    Nic(NicCmd),
    /// Restart the running daemon without losing a packet: it hands the
    /// cluster over to the binary at its path (an upgrade: install the new
    /// one first), with the same arguments; SIGHUP does the same.
    #[command(
        long_about = "Restart the running daemon gracefully, e.g. to upgrade it: `install` the new \
zc-hostd over the old one, then `zc-hostd -c 99 restart` (or send it SIGHUP). The daemon stops \
taking work, takes every export off its worker between two steps, writes what the exports hold \
in their hands (with the packets in them) and the exports `attach` added beside the cluster's \
files, gives up the cluster lock and execs the binary at its path with the same arguments, in \
the same process. The new daemon takes the cluster over: the same pool, queues with their \
packets, exports on the same sockets, the handed-over packets delivered; VMs reconnect within a \
second (their link goes down and up once). Host processes attached to the cluster must be \
stopped before and started again after. This command waits until the new daemon serves."
    )]
    Restart,
    /// Add or remove a reflector on the running daemon.
    #[command(
        subcommand,
        long_about = "Add or remove a reflector on the running daemon: \
`zc-hostd -c 99 reflect add in=1,out=0` starts one as --reflect does, \
`zc-hostd -c 99 reflect del in=1` (or the text given to add) stops it; \
its buffers come back to the pool."
    )]
    Reflect(ReflectCmd),
    /// Add or remove a balancer on the running daemon.
    #[command(
        subcommand,
        long_about = "Add or remove a balancer on the running daemon: \
`zc-hostd -c 99 balance add in=0,out=1+2+3/4,hash=5tuple` starts one as --balance does, \
`zc-hostd -c 99 balance del in=0` (or the text given to add) stops the one reading those \
queues; its buffers come back to the pool."
    )]
    Balance(BalanceCmd),
    /// Remove an export from a running VM and return its buffers to the pool.
    #[command(
        long_about = "Remove an export that `attach` added: device_del (waiting for the \
guest to release the device), netdev_del, chardev-remove, and the pool device when it was the \
VM's last export; then the export stops and every buffer it or its guest held returns to the \
pool. If the VM is gone, only the host side is removed."
    )]
    Detach(VmArgs),
}

#[derive(Subcommand, Debug)]
enum NicCmd {
    /// Start an interface port (the same text as --nic).
    Add {
        #[arg(
            value_name = "IFNAME,ingress=Q[,egress=Q][,queue=N][,mode=..][,zerocopy=..][,takeover]"
        )]
        spec: String,
    },
    /// Stop the interface port of IFNAME's receive queue N (default 0).
    Del {
        #[arg(value_name = "IFNAME[,queue=N]")]
        target: String,
    },
}

#[derive(Subcommand, Debug)]
enum ReflectCmd {
    /// Start a reflector (the same text as --reflect).
    Add {
        #[arg(value_name = "in=Q,out=Q")]
        spec: String,
    },
    /// Stop the reflector consuming queue Q.
    Del {
        #[arg(value_name = "in=Q")]
        target: String,
    },
}

#[derive(Subcommand, Debug)]
enum BalanceCmd {
    /// Start a balancer (the same text as --balance).
    Add {
        #[arg(value_name = "in=Q[+Q...],out=G[/G...][,hash=..][,full=..]")]
        spec: String,
    },
    /// Stop the balancer reading the queues in=Q[+Q...].
    Del {
        #[arg(value_name = "in=Q[+Q...]")]
        target: String,
    },
}

#[derive(clap::Args, Debug)]
struct VmArgs {
    /// The VM's QMP socket (QEMU started with -qmp unix:PATH,server=on,wait=off).
    #[arg(long, value_name = "PATH", conflicts_with = "libvirt")]
    qmp: Option<PathBuf>,
    /// The running libvirt domain (name), reached with virsh: libvirt owns
    /// its QMP monitor. Its memory must be shared (--libvirt-xml shows how).
    #[arg(long, value_name = "DOMAIN")]
    libvirt: Option<String>,
    /// The libvirt connection URI for --libvirt (default qemu:///system).
    #[arg(long = "connect", value_name = "URI", conflicts_with = "qmp")]
    connect: Option<String>,
    /// The queues: rx=Q is delivered to the guest, tx=Q receives what it
    /// sends; mac=MAC overrides 02:7a:<cluster>:<queue> (attach only).
    #[arg(long = "export", value_name = "rx=Q,tx=Q[,mac=MAC]")]
    export: QueueSpec,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let level = if args.verbose { "info" } else { "warn" };
    zc_host::journal::init("zc-hostd", level);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!(Error, "zc-hostd: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What `stats` shows.
struct Stats {
    info: ClusterInfo,
    exports: Vec<ExportStats>,
    attachments: Vec<AttachmentInfo>,
    workers: Vec<WorkerStats>,
    nics: Vec<NicPortStats>,
    reflectors: Vec<ReflectPortStats>,
    balancers: Vec<BalancePortStats>,
}

fn stats(run_dir: &Path, cluster: u32) -> Result<Stats, Box<dyn std::error::Error>> {
    let sock = client::connect(run_dir, cluster)?;
    match client::call(&sock, &Request::Stats)? {
        (
            Reply::Stats {
                info,
                exports,
                attachments,
                workers,
                nics,
                reflectors,
                balancers,
            },
            _,
        ) => Ok(Stats {
            info,
            exports,
            attachments,
            workers,
            nics,
            reflectors,
            balancers,
        }),
        _ => Err("unexpected reply from zc-hostd".into()),
    }
}

/// `nic add` and `nic del`.
fn nic_command(args: &Args, cluster: u32, cmd: &NicCmd) -> Result<(), Box<dyn std::error::Error>> {
    let req = match cmd {
        NicCmd::Add { spec } => NicRequest::Add {
            spec: spec.parse::<NicSpec>()?,
        },
        NicCmd::Del { target } => {
            let t: NicTarget = target.parse()?;
            NicRequest::Del {
                ifname: t.ifname,
                queue: t.queue,
            }
        }
    };
    let sock = client::connect(&args.run_dir, cluster)?;
    match client::call(&sock, &Request::Nic(req))?.0 {
        Reply::NicAdded(s) => {
            println!("added: {}", nic_line(cluster, &s));
            if s.ingress.is_some() {
                println!("receive: zcount -i zc:{}", s.ifname);
            }
            if s.egress.is_some() {
                println!("send: zsend -i zc:{}", s.ifname);
            }
        }
        Reply::NicRemoved {
            port,
            returned,
            spare,
        } => println!("removed {port}; {returned} buffers back in the pool ({spare} spare)"),
        _ => return Err("unexpected reply from zc-hostd".into()),
    }
    Ok(())
}

/// `reflect add` and `reflect del`.
fn reflect_command(
    args: &Args,
    cluster: u32,
    cmd: &ReflectCmd,
) -> Result<(), Box<dyn std::error::Error>> {
    let req = match cmd {
        ReflectCmd::Add { spec } => ReflectRequest::Add {
            spec: spec.parse::<ReflectSpec>()?,
        },
        ReflectCmd::Del { target } => ReflectRequest::Del {
            input: target.parse::<ReflectTarget>()?.input,
        },
    };
    let sock = client::connect(&args.run_dir, cluster)?;
    match client::call(&sock, &Request::Reflect(req))?.0 {
        Reply::ReflectAdded(s) => println!("added: {}", reflect_line(cluster, &s)),
        Reply::ReflectRemoved {
            port,
            returned,
            spare,
        } => println!("removed {port}; {returned} buffers back in the pool ({spare} spare)"),
        _ => return Err("unexpected reply from zc-hostd".into()),
    }
    Ok(())
}

/// The `in=` queues of `balance del`'s target: `in=Q[+Q...]`, or the
/// whole text given to add.
fn balance_target(t: &str) -> Result<Vec<u16>, String> {
    let bad = || {
        format!("balance del {t}: give the queues the balancer reads, in=Q[+Q...] (as stats shows them)")
    };
    let t = t.strip_prefix("balance:").unwrap_or(t);
    let v = t
        .split(',')
        .find_map(|o| o.strip_prefix("in="))
        .ok_or_else(bad)?;
    v.split('+')
        .map(|q| q.parse::<u16>().map_err(|_| bad()))
        .collect()
}

/// `balance add` and `balance del`.
fn balance_command(
    args: &Args,
    cluster: u32,
    cmd: &BalanceCmd,
) -> Result<(), Box<dyn std::error::Error>> {
    let req = match cmd {
        BalanceCmd::Add { spec } => BalanceRequest::Add {
            spec: spec.parse::<BalanceSpec>()?,
        },
        BalanceCmd::Del { target } => BalanceRequest::Del {
            inputs: balance_target(target)?,
        },
    };
    let sock = client::connect(&args.run_dir, cluster)?;
    match client::call(&sock, &Request::Balance(req))?.0 {
        Reply::BalanceAdded(s) => {
            for l in balance_lines(cluster, &s) {
                println!("added: {l}");
            }
        }
        Reply::BalanceRemoved {
            port,
            returned,
            spare,
        } => println!("removed {port}; {returned} buffers back in the pool ({spare} spare)"),
        _ => return Err("unexpected reply from zc-hostd".into()),
    }
    Ok(())
}

fn attachment_line(a: &AttachmentInfo) -> String {
    format!(
        "VM {}: device {} = export {} ({}, mac {})",
        a.vm,
        a.device,
        queues_text(a.rx_queue, a.tx_queue),
        a.socket,
        a.mac
    )
}

/// `attach` and `detach`: one request to the running daemon, which does the QMP work.
fn vm_command(
    args: &Args,
    cluster: u32,
    attach: bool,
    v: &VmArgs,
) -> Result<(), Box<dyn std::error::Error>> {
    let vm = match (&v.qmp, &v.libvirt) {
        (Some(qmp), _) => VmRef::Qmp(std::path::absolute(qmp)?.display().to_string()),
        (None, Some(domain)) => VmRef::Libvirt {
            uri: v
                .connect
                .clone()
                .unwrap_or_else(|| zc_host::libvirt::DEFAULT_URI.into()),
            domain: domain.clone(),
        },
        (None, None) => return Err("give the VM: --qmp PATH or --libvirt DOMAIN".into()),
    };
    let q = v.export;
    let req = if attach {
        Request::AttachVm {
            vm,
            rx: q.rx,
            tx: q.tx,
            mac: q.mac,
        }
    } else {
        if q.mac.is_some() {
            return Err("detach finds the export by its queues: leave out mac=".into());
        }
        Request::DetachVm {
            vm,
            rx: q.rx,
            tx: q.tx,
        }
    };
    let sock = client::connect(&args.run_dir, cluster)?;
    match client::call(&sock, &req)?.0 {
        Reply::VmAttached(a) => {
            println!("attached: {}", attachment_line(&a));
            if let Some(q) = a.rx_queue {
                println!("in the guest: zcount -i zc:{cluster}@{q} --wait 60");
            }
            if let Some(q) = a.tx_queue {
                println!("in the guest: zsend -i zc:{cluster}@{q} --wait 60");
            }
        }
        Reply::VmDetached(d) => {
            if let Some(why) = &d.vm_gone {
                eprintln!(
                    "zc-hostd: warning: VM {} is gone: {why}; removed the host side only",
                    d.attachment.vm
                );
            }
            println!(
                "detached: {}; {} buffers back in the pool ({} spare)",
                attachment_line(&d.attachment),
                d.returned,
                d.spare
            );
        }
        _ => return Err("unexpected reply from zc-hostd".into()),
    }
    Ok(())
}

/// The daemon's export on `socket`: the cluster, the export's directory
/// index and its stats.
fn export_on(
    args: &Args,
    cluster: u32,
    socket: &Path,
) -> Result<(ClusterInfo, usize, ExportStats), Box<dyn std::error::Error>> {
    let Stats { info, exports, .. } = stats(&args.run_dir, cluster)?;
    let want = std::fs::canonicalize(socket).unwrap_or_else(|_| socket.to_path_buf());
    let found = exports.iter().position(|e| {
        let p = PathBuf::from(&e.path);
        std::fs::canonicalize(&p).unwrap_or(p) == want
    });
    let Some(index) = found else {
        return Err(format!(
            "cluster {cluster} has no export on {}; its exports: {}",
            socket.display(),
            exports
                .iter()
                .map(|e| e.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
        .into());
    };
    let e = exports[index].clone();
    Ok((info, index, e))
}

fn print_qemu_args(
    args: &Args,
    cluster: u32,
    socket: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let (info, index, e) = export_on(args, cluster, socket)?;
    let mac = parse_mac(&e.mac).ok_or("bad MAC from zc-hostd")?;
    let q = QemuArgs {
        cluster,
        pool_path: &info.pool_path,
        pool_size: info.pool_size,
        socket: &e.path,
        mac,
        mem: &args.vm_mem,
        index,
    };
    println!("{}", q.lines().join(" "));
    Ok(())
}

/// The domain XML for the export on `socket`, in the pieces `virsh edit`
/// takes: one for `<domain>`, the devices for `<devices>`.
fn print_libvirt_xml(
    args: &Args,
    cluster: u32,
    socket: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    use zc_host::libvirt;
    let (info, _, e) = export_on(args, cluster, socket)?;
    let mac = parse_mac(&e.mac).ok_or("bad MAC from zc-hostd")?;
    // No path in the comment: XML comments may not contain "--".
    println!(
        "<!-- zc-hostd -c {cluster}, export {}: for a libvirt domain, which also needs\n     \
         <features><acpi/></features>, and a QEMU that may open the socket and the pool\n     \
         (start zc-hostd with the vm-group option: libvirt-qemu). In <domain>: -->",
        queues_text(e.rx_queue, e.tx_queue),
    );
    println!("{}", libvirt::memory_backing());
    println!("<!-- In <devices>: -->");
    println!("{}", libvirt::interface(&e.path, mac, None));
    println!("{}", libvirt::shmem(cluster, info.pool_size, None));
    Ok(())
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Where this binary is, before anyone replaces it: a graceful restart
    // runs whatever is at that path then.
    let exe = std::env::current_exe();
    let cluster = args
        .cluster
        .ok_or("the cluster id is required: -c ID (e.g. -c 99)")?;
    match &args.cmd {
        Some(Cmd::Stats { json }) => {
            let Stats {
                info,
                exports,
                attachments,
                workers,
                nics,
                reflectors,
                balancers,
            } = stats(&args.run_dir, cluster)?;
            if *json {
                println!(
                    "{}",
                    serde_json::json!({
                        "cluster": info,
                        "exports": exports,
                        "attachments": attachments,
                        "workers": workers,
                        "nics": nics,
                        "reflectors": reflectors,
                        "balancers": balancers,
                    })
                );
            } else {
                println!(
                    "cluster {}: {} queues, {} buffers ({} spare), pool {}",
                    info.cluster, info.queues, info.buf_count, info.spare_buffers, info.pool_path
                );
                for e in &exports {
                    println!("{}", format_line(e, None));
                }
                for a in &attachments {
                    println!("{}", attachment_line(a));
                }
                for n in &nics {
                    println!("{}", nic_line(info.cluster, n));
                }
                for r in &reflectors {
                    println!("{}", reflect_line(info.cluster, r));
                }
                for b in &balancers {
                    for l in balance_lines(info.cluster, b) {
                        println!("{l}");
                    }
                }
                for w in &workers {
                    println!("{}", worker_line(w));
                }
            }
            return Ok(());
        }
        Some(Cmd::Move { port, worker }) => {
            let sock = client::connect(&args.run_dir, cluster)?;
            let req = Request::MovePort {
                port: port.clone(),
                worker: *worker,
            };
            match client::call(&sock, &req)?.0 {
                Reply::Moved { port, from, to } => {
                    println!("port {port}: moved from worker {from} to worker {to}")
                }
                _ => return Err("unexpected reply from zc-hostd".into()),
            }
            return Ok(());
        }
        Some(Cmd::Nic(n)) => return nic_command(&args, cluster, n),
        Some(Cmd::Restart) => return restart(&args, cluster),
        Some(Cmd::Reflect(r)) => return reflect_command(&args, cluster, r),
        Some(Cmd::Balance(b)) => return balance_command(&args, cluster, b),
        Some(Cmd::Attach(v)) => return vm_command(&args, cluster, true, v),
        Some(Cmd::Detach(v)) => return vm_command(&args, cluster, false, v),
        None => {}
    }
    if let Some(socket) = &args.qemu_args {
        return print_qemu_args(&args, cluster, socket);
    }
    if let Some(socket) = &args.libvirt_xml {
        return print_libvirt_xml(&args, cluster, socket);
    }
    let exports: Vec<ExportConfig> = args
        .exports
        .iter()
        .map(|spec| ExportConfig {
            spec: spec.clone(),
            stock: args.stock,
        })
        .collect();
    let nics = args
        .nics
        .iter()
        .map(|s| s.parse::<NicSpec>())
        .collect::<Result<Vec<_>, _>>()?;
    let reflectors = args
        .reflectors
        .iter()
        .map(|s| s.parse::<ReflectSpec>())
        .collect::<Result<Vec<_>, _>>()?;
    let balancers = args
        .balancers
        .iter()
        .map(|s| s.parse::<BalanceSpec>())
        .collect::<Result<Vec<_>, _>>()?;
    // Before anything is created: a queue the cluster will not have.
    for b in &balancers {
        b.check_queues(cluster, args.queues)?;
    }
    let layout = PoolLayout::new(cluster, args.buf_size, args.buffers)?;
    let opts = DaemonOptions {
        pool: PoolOptions {
            layout,
            hugepages_dir: args.hugepages,
            fallback_dir: PathBuf::from("/dev/shm"),
            force_fallback: args.no_hugepages,
        },
        geometry: QueueGeometry {
            queue_count: args.queues,
            ring_size: args.queue_len,
        },
        run_dir: args.run_dir.clone(),
        exports,
        nics,
        reflectors,
        balancers,
        stock: args.stock,
        workers: usize::from(args.workers),
        cores: args.cores.clone(),
        idle_spin: Duration::from_micros(args.idle_spin),
        vm_group: args
            .vm_group
            .as_deref()
            .map(|g| zc_host::access::group_id("--vm-group", g))
            .transpose()?,
        control_group: args
            .group
            .as_deref()
            .map(|g| zc_host::access::group_id("--group", g))
            .transpose()?,
        control_mode: zc_host::access::parse_mode(&args.mode)?,
        allow: args
            .allow
            .iter()
            .map(|a| Allow::parse(a).map(|p| (a.clone(), p)))
            .collect::<Result<Vec<_>, _>>()?,
    };
    // Bound first: a port in use fails before anything is created.
    let metrics = args
        .metrics
        .as_deref()
        .map(zc_host::metrics::Bound::listen)
        .transpose()?;
    let state_dir = zc_host::cluster::state_dir(&opts.pool);
    let daemon = Daemon::start(opts)?;
    let _metrics = match metrics {
        Some(bound) => {
            let addr = bound.addr();
            let source = zc_host::daemon::metrics::DaemonSource::start(
                daemon.registry().clone(),
                daemon.ports().clone(),
            );
            match bound.serve(source) {
                Ok(server) => {
                    say!(Info, "zc-hostd: metrics on http://{addr}/metrics");
                    Some(server)
                }
                Err(e) => {
                    say!(Warn, "zc-hostd: warning: --metrics {addr}: cannot start its thread: {e}; serving without metrics");
                    None
                }
            }
        }
        None => None,
    };
    let guard = daemon.cluster();
    let pool = guard.pool();
    if let Some(
        a @ zc_host::cluster::Adopted {
            handed: Some((bufs, packets)),
            ..
        },
    ) = daemon.adopted()
    {
        say!(
            Info,
            "zc-hostd: cluster {cluster} handed over by the zc-hostd before (graceful restart): same pool {}, \
             {} buffers in the queues, {} held by guests, {bufs} in the exports' hands with {packets} packets, {} spare",
            pool.path().display(),
            a.in_queues,
            a.in_guests,
            a.spare,
        );
    } else if let Some(a) = daemon.adopted() {
        say!(
            Info,
            "zc-hostd: cluster {cluster} taken over from a zc-hostd that died: same pool {}, \
             {} buffers in the queues, {} held by guests, {} spare{}",
            pool.path().display(),
            a.in_queues,
            a.in_guests,
            a.spare,
            if a.repaired > 0 {
                format!(" ({} broken ring slots repaired)", a.repaired)
            } else {
                String::new()
            }
        );
    } else if let Some(w) = pool.fallback_warning() {
        say!(Warn, "zc-hostd: warning: {w}");
    }
    say!(
        Info,
        "zc-hostd: cluster {} ready: queues zc:{}@0..{}, {} buffers of {} B ({} spare), pool {} ({} MiB{}), control {}",
        cluster,
        cluster,
        args.queues - 1,
        layout.buf_count,
        layout.buf_size,
        guard.spare_count(),
        pool.path().display(),
        layout.pool_size >> 20,
        if pool.fallback_warning().is_none() { ", hugepages" } else { "" },
        daemon.control_path().display(),
    );
    drop(guard);
    for e in daemon.registry().shared() {
        say!(
            Info,
            "zc-hostd: export {} ready: rx {} tx {} mac {}; QEMU options: zc-hostd -c {cluster} --qemu-args {}",
            e.spec.path.display(),
            e.spec.rx.map_or("-".into(), |q| format!("zc:{cluster}@{q}")),
            e.spec.tx.map_or("-".into(), |q| format!("zc:{cluster}@{q}")),
            MacDisplay(&e.mac),
            e.spec.path.display(),
        );
    }
    for n in daemon.ports().nics.stats() {
        say!(
            Info,
            "zc-hostd: interface port {} ready: {} ({}), ingress {} egress {}",
            n.name,
            n.counters.mode,
            if n.counters.zero_copy {
                "zero-copy"
            } else {
                "copy mode"
            },
            n.ingress.map_or("-".into(), |q| format!(
                "zc:{cluster}@{q} (zcount -i zc:{})",
                n.ifname
            )),
            n.egress.map_or("-".into(), |q| format!(
                "zc:{cluster}@{q} (zsend -i zc:{})",
                n.ifname
            )),
        );
    }
    for r in daemon.ports().reflectors.stats() {
        say!(
            Info,
            "zc-hostd: reflector {} ready: zc:{cluster}@{} back into zc:{cluster}@{}, MACs swapped",
            r.name,
            r.input,
            r.output,
        );
    }
    for b in daemon.ports().balancers.stats() {
        say!(Info, "zc-hostd: balancer {} ready: {}", b.name, b.spec);
    }
    if args.verbose {
        // Exports come and go (attach, detach): list them every second.
        let registry = daemon.registry().clone();
        std::thread::spawn(move || {
            let mut prev: HashMap<String, ExportStats> = HashMap::new();
            let mut t = Instant::now();
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let secs = t.elapsed().as_secs_f64();
                t = Instant::now();
                let mut next = HashMap::new();
                let (exports, workers) = registry.stats();
                for now in exports {
                    say!(
                        Info,
                        "zc-hostd: {}",
                        format_line(&now, prev.get(&now.path).map(|p| (p, secs)))
                    );
                    next.insert(now.path.clone(), now);
                }
                for w in &workers {
                    say!(Info, "zc-hostd: {}", worker_line(w));
                }
                prev = next;
            }
        });
    }
    let sig = match daemon.run()? {
        Stopped::Signal(sig) => sig,
        Stopped::Restart => return exec_successor(cluster, exe, &state_dir),
    };
    let name = if sig == libc::SIGTERM {
        "SIGTERM"
    } else {
        "SIGINT"
    };
    say!(
        Info,
        "zc-hostd: cluster {cluster} stopped ({name}); its files are removed"
    );
    Ok(())
}

/// The end of a graceful restart: the binary at the path this one was
/// started from (a new one, if it was replaced meanwhile: an upgrade) runs
/// in this process, with the same arguments and environment, and takes
/// the cluster over from the handover.
fn exec_successor(
    cluster: u32,
    exe: std::io::Result<PathBuf>,
    state_dir: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    use std::os::unix::process::CommandExt;
    let keep = format!(
        "the cluster's files stay: start zc-hostd -c {cluster} again with the same options to take it over"
    );
    let exe =
        exe.map_err(|e| format!("cannot restart: where is this zc-hostd's binary? {e}; {keep}"))?;
    say!(
        Info,
        "zc-hostd: cluster {cluster}: handed over; restarting as {}",
        exe.display()
    );
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(&exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    let e = cmd.args(args).exec();
    zc_host::handover::Handover::remove(state_dir);
    Err(format!("cannot restart as {}: {e}; {keep}", exe.display()).into())
}

/// `restart`: asks the daemon to hand over to a new one, then waits until
/// the new one serves. The old one closes this connection once it stopped
/// serving, and never answers again: an answer after that is the new one's.
fn restart(args: &Args, cluster: u32) -> Result<(), Box<dyn std::error::Error>> {
    let sock = client::connect(&args.run_dir, cluster)?;
    let Reply::Restarting { pid } = client::call(&sock, &Request::Restart)?.0 else {
        return Err("unexpected reply from zc-hostd".into());
    };
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let _ = std::io::Read::read(&mut &sock, &mut [0u8; 1]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(info) = client::cluster_info(&args.run_dir, cluster) {
            println!(
                "cluster {cluster} restarted: zc-hostd pid {} serves it ({} spare buffers)",
                info.daemon_pid, info.spare_buffers
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "zc-hostd (pid {pid}) did not serve cluster {cluster} again within 30 s; see its log"
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
