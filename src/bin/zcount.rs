//! zcount: counts (and optionally verifies) the packets arriving on a zc queue.

use clap::Parser;
use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zc::testpkt::{self, FlowKey, SeqTracker};
use zc::tool::{self, CommonArgs, Counters, Reporter, Summary, BURST, IDLE_POLLS, IDLE_SLEEP};
use zc::{QueueEnd, Receiver};

#[derive(Parser, Debug)]
#[command(
    name = "zcount",
    version,
    about = "Count the packets arriving on a zc queue",
    long_about = "Count the packets arriving on a zc queue, without copying them: received \
buffers are swapped for empty ones and only their lengths are read, unless --verify asks \
for each packet's sequence number and payload checksum (as written by zsend) to be checked.\n\n\
Names: zc:<cluster>@<queue> is queue <queue> of the cluster that `zc-hostd -c <cluster>` \
serves (e.g. zc:99@0). One process consumes a queue at a time. Inside a VM the same name \
opens the zc virtio-net device that exports the queue (zc:<interface>, e.g. zc:eth1, takes \
over that interface's device); --vhost-user PATH runs that guest driver over the export's \
vhost-user socket without a VM.\n\n\
Once a second zcount prints PF_RING-style `Absolute Stats` and `Actual Stats` lines to \
stderr. It stops after -n packets, after -t seconds, or on Ctrl-C, and prints a summary \
(and with --json one JSON line on stdout: packets, bytes, drops, seconds, pps, gbps, \
flows (distinct IP flows seen, a flow's two directions counted once: protocol, addresses, \
ports), flow_directions (each direction counted), and with --verify seq_errors and \
checksum_errors). Only --json reads packet headers to tell flows apart. An idle zcount sleeps instead of spinning.",
    after_help = "Examples:\n  zcount -i zc:99@0                     # count until Ctrl-C\n  zcount -i zc:99@0 -n 1000000 --verify # exactly one million packets, checked\n  zcount -i zc:99@0 -t 10 --json -g 0   # ten seconds on core 0, JSON summary"
)]
struct Args {
    /// Queue to count, e.g. zc:99@0.
    #[arg(short = 'i', value_name = "NAME")]
    name: String,

    /// Stop after COUNT packets.
    #[arg(short = 'n', value_name = "COUNT")]
    count: Option<u64>,

    /// Stop after SECONDS seconds.
    #[arg(short = 't', value_name = "SECONDS")]
    seconds: Option<f64>,

    /// Check every packet's sequence number and payload checksum (zsend's format).
    #[arg(long)]
    verify: bool,

    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tool::exit("zcount", run(&args))
}

fn run(args: &Args) -> Result<(), String> {
    let deadline = match args.seconds {
        Some(s) if s > 0.0 && s.is_finite() => Some(Duration::from_secs_f64(s)),
        Some(s) => return Err(format!("-t {s} is not a duration: give seconds above 0")),
        None => None,
    };
    if let Some(core) = args.common.core {
        tool::pin_to_core(core)?;
    }
    let stop = tool::stop_on_signals();
    let mut rx = zc::open_rx_with(&args.name, &args.common.options()).map_err(|e| e.to_string())?;
    let mut hand = rx
        .take_buffers(BURST)
        .map_err(|e| format!("{}: {e}", args.name))?;
    let counters = Arc::new(Counters::default());
    let reporter = Reporter::start(counters.clone());
    let limit = args.count.unwrap_or(u64::MAX);
    let pool = rx.pool().clone();
    let start = Instant::now();
    // Rates are measured from the first packet, not from start-up.
    let mut first: Option<Instant> = None;
    let (mut packets, mut bytes, mut checksum_errors) = (0u64, 0u64, 0u64);
    let mut seq = SeqTracker::default();
    let mut flows: HashSet<FlowKey> = HashSet::new();
    let mut last_flow = None;
    let mut idle = 0u32;
    let mut polls = 0u32;
    while packets < limit && !stop.load(Ordering::Relaxed) {
        let want = BURST.min((limit - packets) as usize);
        let n = rx.recv_burst(&mut hand[..want]);
        if n == 0 {
            idle += 1;
            if idle > IDLE_POLLS {
                if let Some(e) = rx.failure() {
                    return Err(format!("{}: {e}", args.name));
                }
                rx.wait_recv(IDLE_SLEEP);
                if deadline.is_some_and(|d| start.elapsed() >= d) {
                    break;
                }
            }
            continue;
        }
        idle = 0;
        first.get_or_insert_with(Instant::now);
        for h in &hand[..n] {
            bytes += u64::from(h.len());
            if args.common.json {
                // Packets of one flow come in runs: skip the set when the
                // flow is the last one's.
                if let Some(k) = testpkt::flow_of(&pool.packet(h)) {
                    if last_flow != Some(k) {
                        flows.insert(k);
                        last_flow = Some(k);
                    }
                }
            }
            if args.verify {
                match testpkt::verify(&pool.packet(h)) {
                    Ok(s) => seq.observe(s),
                    Err(_) => checksum_errors += 1,
                }
            }
        }
        packets += n as u64;
        counters.publish(packets, bytes);
        polls = polls.wrapping_add(1);
        if polls % 256 == 0 && deadline.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
    }
    let elapsed = first.map_or(Duration::ZERO, |t| t.elapsed());
    drop(reporter);
    let mut summary = Summary::new(&args.name, packets, bytes, 0, elapsed);
    if args.verify {
        summary.seq_errors = Some(seq.errors);
        summary.checksum_errors = Some(checksum_errors);
    }
    if args.common.json {
        summary.flow_directions = Some(flows.len() as u64);
        let both: HashSet<FlowKey> = flows.iter().map(|k| k.both_ways()).collect();
        summary.flows = Some(both.len() as u64);
    }
    eprintln!("{}", summary.text());
    if args.common.json {
        println!("{}", summary.json());
    }
    Ok(())
}
