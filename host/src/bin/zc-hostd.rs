//! zc-hostd: creates a zc cluster (hugepage buffer pool + packet queues) and
//! serves it to host processes and, later, to virtual machines.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use zc_host::daemon::server::{Daemon, DaemonOptions};
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
Stop the daemon with Ctrl-C or SIGTERM: it removes the cluster's files. A cluster left \
behind by a killed daemon is cleaned up by the next start.",
    after_help = "Example:\n  zc-hostd -c 99 -q 4 &\n  zcount -i zc:99@0 &\n  zsend -i zc:99@0 -n 1000000 -l 64"
)]
struct Args {
    /// Cluster id: the <cluster> in zc:<cluster>@<queue>.
    #[arg(short = 'c', long = "cluster", value_name = "ID")]
    cluster: u32,

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

    /// Log attachments and detachments.
    #[arg(short = 'v', long)]
    verbose: bool,
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

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let layout = PoolLayout::new(args.cluster, args.buf_size, args.buffers)?;
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
        run_dir: args.run_dir,
    };
    let daemon = Daemon::start(opts)?;
    let pool = daemon.cluster().pool();
    if let Some(w) = pool.fallback_warning() {
        eprintln!("zc-hostd: warning: {w}");
    }
    eprintln!(
        "zc-hostd: cluster {} ready: queues zc:{}@0..{}, {} buffers of {} B ({} spare), pool {} ({} MiB{}), control {}",
        args.cluster,
        args.cluster,
        args.queues - 1,
        layout.buf_count,
        layout.buf_size,
        daemon.cluster().spare_count(),
        pool.path().display(),
        layout.pool_size >> 20,
        if pool.fallback_warning().is_none() { ", hugepages" } else { "" },
        daemon.control_path().display(),
    );
    let sig = daemon.run()?;
    let name = if sig == libc::SIGTERM {
        "SIGTERM"
    } else {
        "SIGINT"
    };
    eprintln!(
        "zc-hostd: cluster {} stopped ({name}); its files are removed",
        args.cluster
    );
    Ok(())
}
