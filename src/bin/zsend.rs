//! zsend: sends test packets into a zc queue, as fast as it can or at a rate.

use clap::Parser;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zc::testpkt::{Template, MIN_LEN};
use zc::tool::{self, CommonArgs, Counters, Reporter, Summary, BURST, IDLE_POLLS, IDLE_SLEEP};
use zc::{QueueEnd, Sender};

#[derive(Parser, Debug)]
#[command(
    name = "zsend",
    version,
    about = "Send test packets into a zc queue",
    long_about = "Send Ethernet/IPv4/UDP test packets into a zc queue without copying: each \
packet is written into a pool buffer once and handed over by swapping buffer handles. \
Every packet carries a 64-bit sequence number and a payload checksum that \
`zcount --verify` checks.\n\n\
Names: zc:<cluster>@<queue> is queue <queue> of the cluster that `zc-hostd -c <cluster>` \
serves (e.g. zc:99@0). One process sends into a queue at a time. Inside a VM the same name \
opens the zc virtio-net device that exports the queue (zc:<interface>, e.g. zc:eth1, takes \
over that interface's device); --vhost-user PATH runs that guest driver over the export's \
vhost-user socket without a VM.\n\n\
Once a second zsend prints PF_RING-style `Absolute Stats` and `Actual Stats` lines to \
stderr; at the end a summary (and with --json one JSON line on stdout).",
    after_help = "Examples:\n  zsend -i zc:99@0                    # 60-byte packets, unlimited rate, until Ctrl-C\n  zsend -i zc:99@0 -l 1500 -n 1000000  # one million 1500-byte packets\n  zsend -i zc:99@0 -r 1000 -g 1        # 1000 packets/s from a thread pinned to core 1"
)]
struct Args {
    /// Queue to send into, e.g. zc:99@0.
    #[arg(short = 'i', value_name = "NAME")]
    name: String,

    /// Packet length in bytes, 60 up to the cluster's buffer size minus 64.
    #[arg(short = 'l', value_name = "LEN", default_value_t = 60)]
    len: usize,

    /// Stop after COUNT packets (default: until Ctrl-C).
    #[arg(short = 'n', value_name = "COUNT")]
    count: Option<u64>,

    /// Send at most PPS packets per second (default: unlimited).
    #[arg(short = 'r', value_name = "PPS")]
    rate: Option<f64>,

    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tool::exit("zsend", run(&args))
}

/// Paces bursts to a packet rate; unlimited when `pps` is None.
struct Pacer {
    pps: Option<f64>,
    start: Instant,
}

impl Pacer {
    /// How many packets may go now, at most `want`.
    fn allowance(&self, sent: u64, want: usize) -> usize {
        let Some(pps) = self.pps else { return want };
        let due = (self.start.elapsed().as_secs_f64() * pps) as u64 + 1;
        (due.saturating_sub(sent) as usize).min(want)
    }
}

fn run(args: &Args) -> Result<(), String> {
    if args.len < MIN_LEN {
        return Err(format!(
            "-l {} is too short: packets are at least {MIN_LEN} bytes",
            args.len
        ));
    }
    if let Some(r) = args.rate {
        if !(r > 0.0 && r.is_finite()) {
            return Err(format!(
                "-r {r} is not a rate: give packets per second above 0"
            ));
        }
    }
    if let Some(core) = args.common.core {
        tool::pin_to_core(core)?;
    }
    let stop = tool::stop_on_signals();
    let mut tx = zc::open_tx_with(&args.name, &args.common.options()).map_err(|e| e.to_string())?;
    let max = tx.pool().layout().max_packet() as usize;
    if args.len > max {
        return Err(format!(
            "-l {} is too long: {} has {}-byte buffers, so packets are {MIN_LEN}..={max} bytes",
            args.len,
            args.name,
            tx.pool().layout().buf_size
        ));
    }
    let template = Template::new(args.len);
    let mut hand = tx
        .take_buffers(BURST)
        .map_err(|e| format!("{}: {e}", args.name))?;
    let counters = Arc::new(Counters::default());
    let reporter = Reporter::start(counters.clone());
    let limit = args.count.unwrap_or(u64::MAX);
    let pacer = Pacer {
        pps: args.rate,
        start: Instant::now(),
    };
    let start = Instant::now();
    let mut sent = 0u64;
    let pool = *tx.pool();
    while sent < limit && !stop.load(Ordering::Relaxed) {
        let want = pacer.allowance(sent, BURST.min((limit - sent) as usize));
        if want == 0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        for (i, h) in hand[..want].iter_mut().enumerate() {
            template.stamp(&mut pool.packet_mut(h), sent + i as u64);
        }
        let mut done = 0;
        let mut idle = 0u32;
        while done < want {
            let n = tx.send_burst(&mut hand[done..want]);
            done += n;
            if n == 0 {
                idle += 1;
                if idle > IDLE_POLLS {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Some(e) = tx.failure() {
                        return Err(format!("{}: {e}", args.name));
                    }
                    tx.wait_send(IDLE_SLEEP);
                }
            }
        }
        // The buffers just swapped in are written next round: start fetching.
        for h in &hand[..done] {
            pool.prefetch(h);
        }
        sent += done as u64;
        counters.publish(sent, sent * args.len as u64);
    }
    // A guest device stops when closed: let it finish what is in flight.
    if !tx.flush(Duration::from_secs(5)) {
        return Err(format!(
            "{}: the device did not complete the last packets within 5 s{}",
            args.name,
            tx.failure().map_or(String::new(), |e| format!(": {e}"))
        ));
    }
    let elapsed = start.elapsed();
    drop(reporter);
    let summary = Summary::new(&args.name, sent, sent * args.len as u64, 0, elapsed);
    eprintln!("{}", summary.text());
    if args.common.json {
        println!("{}", summary.json());
    }
    Ok(())
}
