//! zc-hostd: creates a zc cluster (hugepage buffer pool + packet queues) and
//! serves it to host processes and, as vhost-user virtio-net devices, to
//! virtual machines.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use zc_host::client;
use zc_host::control::{ClusterInfo, Reply, Request};
use zc_host::daemon::server::{Daemon, DaemonOptions};
use zc_host::export::qemu_args::QemuArgs;
use zc_host::export::spec::parse_mac;
use zc_host::export::stats::{format_line, ExportStats};
use zc_host::export::{ExportConfig, ExportSpec, DEFAULT_STOCK};
use zc_host::pool::PoolOptions;
use zc_host::queues::QueueGeometry;
use zc_proto::PoolLayout;

#[derive(Parser, Debug)]
#[command(
    name = "zc-hostd",
    version,
    about = "Create a zc cluster (buffer pool + packet queues) and serve it",
    long_about = "Create a zc cluster: a buffer pool on 2 MiB hugepages and a set of \
single-producer single-consumer packet queues. Applications open the queues by name, \
zc:<cluster>@<queue> (e.g. zc:99@0), through the control socket <run-dir>/<cluster>/ctl; \
one process may produce into a queue and one may consume from it at a time. Packets move \
by swapping buffer handles: nothing is copied.\n\n\
With --export, queues are also served to virtual machines as vhost-user virtio-net \
devices: what a host process sends on queue rx=Q reaches the guest, what the guest sends \
arrives on queue tx=Q. `zc-hostd -c ID --qemu-args SOCKET` prints the QEMU options that \
attach a VM; `zc-hostd -c ID stats` shows per-export counters.\n\n\
Stop the daemon with Ctrl-C or SIGTERM: it removes the cluster's files. A cluster left \
behind by a killed daemon is cleaned up by the next start.",
    after_help = "Example:\n  zc-hostd -c 99 -q 4 &\n  zcount -i zc:99@0 &\n  zsend -i zc:99@0 -n 1000000 -l 64\n\n\
Serving queues 0 and 1 to a VM:\n  zc-hostd -c 99 --export /tmp/vm1.sock,rx=0,tx=1 &\n  \
qemu-system-x86_64 ... $(zc-hostd -c 99 --qemu-args /tmp/vm1.sock)\n  \
zsend -i zc:99@0 -n 1000     # the guest receives these\n  zcount -i zc:99@1        # counts what the guest sends"
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

    /// Pool buffers each export's guest may hold (zero-copy; bounds buffers in flight).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_STOCK)]
    stock: u32,

    /// Pin the export poll threads to these cores (export i gets the i-th, cycling).
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

    /// Bytes per buffer, including the 64-byte headroom (largest packet = B - 64).
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

    /// Log attachments and detachments, and print a statistics line per
    /// export every second.
    #[arg(short = 'v', long, global = true)]
    verbose: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the running daemon's per-export statistics.
    Stats {
        /// As JSON (one object: cluster info and exports).
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let level = if args.verbose { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_target(false)
        .format_timestamp(None)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zc-hostd: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn stats(
    run_dir: &Path,
    cluster: u32,
) -> Result<(ClusterInfo, Vec<ExportStats>), Box<dyn std::error::Error>> {
    let sock = client::connect(run_dir, cluster)?;
    match client::call(&sock, &Request::Stats)? {
        (Reply::Stats { info, exports }, _) => Ok((info, exports)),
        _ => Err("unexpected reply from zc-hostd".into()),
    }
}

fn print_qemu_args(
    args: &Args,
    cluster: u32,
    socket: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let (info, exports) = stats(&args.run_dir, cluster)?;
    let want = std::fs::canonicalize(socket).unwrap_or_else(|_| socket.to_path_buf());
    let (index, e) = exports
        .iter()
        .enumerate()
        .find(|(_, e)| {
            let p = PathBuf::from(&e.path);
            std::fs::canonicalize(&p).unwrap_or(p) == want
        })
        .ok_or_else(|| {
            format!(
                "cluster {cluster} has no export on {}; its exports: {}",
                socket.display(),
                exports
                    .iter()
                    .map(|e| e.path.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
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

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let cluster = args
        .cluster
        .ok_or("the cluster id is required: -c ID (e.g. -c 99)")?;
    if let Some(Cmd::Stats { json }) = &args.cmd {
        let (info, exports) = stats(&args.run_dir, cluster)?;
        if *json {
            println!(
                "{}",
                serde_json::json!({ "cluster": info, "exports": exports })
            );
        } else {
            println!(
                "cluster {}: {} queues, {} buffers ({} spare), pool {}",
                info.cluster, info.queues, info.buf_count, info.spare_buffers, info.pool_path
            );
            for e in &exports {
                println!("{}", format_line(e, None));
            }
        }
        return Ok(());
    }
    if let Some(socket) = &args.qemu_args {
        return print_qemu_args(&args, cluster, socket);
    }
    let exports: Vec<ExportConfig> = args
        .exports
        .iter()
        .enumerate()
        .map(|(i, spec)| ExportConfig {
            spec: spec.clone(),
            stock: args.stock,
            core: (!args.cores.is_empty()).then(|| args.cores[i % args.cores.len()]),
        })
        .collect();
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
    };
    let daemon = Daemon::start(opts)?;
    let guard = daemon.cluster();
    let pool = guard.pool();
    if let Some(w) = pool.fallback_warning() {
        eprintln!("zc-hostd: warning: {w}");
    }
    eprintln!(
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
    for e in daemon.exports() {
        eprintln!(
            "zc-hostd: export {} ready: rx {} tx {} mac {}; QEMU options: zc-hostd -c {cluster} --qemu-args {}",
            e.shared.spec.path.display(),
            e.shared.spec.rx.map_or("-".into(), |q| format!("zc:{cluster}@{q}")),
            e.shared.spec.tx.map_or("-".into(), |q| format!("zc:{cluster}@{q}")),
            zc_host::export::spec::MacDisplay(&e.shared.mac),
            e.shared.spec.path.display(),
        );
    }
    if args.verbose && !daemon.exports().is_empty() {
        let shared: Vec<_> = daemon.exports().iter().map(|e| e.shared.clone()).collect();
        std::thread::spawn(move || {
            let mut prev: Vec<ExportStats> = shared.iter().map(|s| s.stats()).collect();
            let mut t = Instant::now();
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let secs = t.elapsed().as_secs_f64();
                t = Instant::now();
                for (s, p) in shared.iter().zip(prev.iter_mut()) {
                    let now = s.stats();
                    eprintln!("zc-hostd: {}", format_line(&now, Some((p, secs))));
                    *p = now;
                }
            }
        });
    }
    let sig = daemon.run()?;
    let name = if sig == libc::SIGTERM {
        "SIGTERM"
    } else {
        "SIGINT"
    };
    eprintln!("zc-hostd: cluster {cluster} stopped ({name}); its files are removed");
    Ok(())
}
