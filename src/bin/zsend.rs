//! zsend: sends test packets into a zc queue, as fast as it can or at a rate.

use clap::Parser;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zc::capture::CaptureReader;
use zc::testpkt::{Flows, Template, MIN_LEN};
use zc::tool::{self, CommonArgs, Counters, Reporter, Summary, BURST, IDLE_SLEEP};
use zc::QueueEnd;

#[derive(Parser, Debug)]
#[command(
    name = "zsend",
    version,
    about = "Send test packets into a zc queue",
    long_about = "Send Ethernet/IPv4/UDP test packets into a zc queue without copying: each \
packet is written into a pool buffer once and handed over by swapping buffer handles. \
Every packet carries a 64-bit sequence number and a payload checksum that \
`zcount --verify` checks. With -f FILE it replays a pcap or pcapng capture instead \
(Ethernet link type), -n times, at top speed, at -r packets per second, or with the \
capture's own timing (--timing original).\n\n\
Names: zc:<cluster>@<queue> is queue <queue> of the cluster that `zc-hostd -c <cluster>` \
serves (e.g. zc:99@0). One process sends into a queue at a time. Inside a VM the same name \
opens the zc virtio-net device that exports the queue (zc:<interface>, e.g. zc:eth1, takes \
over that interface's device); --vhost-user PATH runs that guest driver over the export's \
vhost-user socket without a VM.\n\n\
Once a second zsend prints PF_RING-style `Absolute Stats` and `Actual Stats` lines to \
stderr; at the end a summary (and with --json one JSON line on stdout).",
    after_help = "Examples:\n  zsend -i zc:99@0 -f day.pcap -n 3   # replay a capture three times, at top speed\n  zsend -i zc:99@0 -f day.pcapng --timing original  # with the capture's own gaps\n  zsend -i zc:99@0                    # 60-byte packets, unlimited rate, until Ctrl-C\n  zsend -i zc:99@0 -l 1500 -n 1000000  # one million 1500-byte packets\n  zsend -i zc:99@0 -r 1000 -g 1        # 1000 packets/s from a thread pinned to core 1\n  zsend -i zc:99@0 --flows 1024 --seed 7 -n 1000000  # 1024 UDP flows, both directions"
)]
struct Args {
    /// Queue to send into, e.g. zc:99@0.
    #[arg(short = 'i', value_name = "NAME")]
    name: String,

    /// Packet length in bytes, 60 up to the cluster's buffer size minus 256.
    #[arg(
        short = 'l',
        value_name = "LEN",
        default_value_t = 60,
        conflicts_with = "file"
    )]
    len: usize,

    /// Stop after COUNT packets (default: until Ctrl-C). With -f: replay
    /// the file COUNT times (default once; 0: until Ctrl-C).
    #[arg(short = 'n', value_name = "COUNT")]
    count: Option<u64>,

    /// Send at most PPS packets per second (default: unlimited).
    #[arg(short = 'r', value_name = "PPS", conflicts_with = "timing")]
    rate: Option<f64>,

    /// Replay the packets of a capture file (pcap or pcapng, Ethernet link
    /// type) instead of making test packets; each is copied into a pool buffer once.
    #[arg(short = 'f', value_name = "FILE.pcap")]
    file: Option<std::path::PathBuf>,

    /// With -f: `original` keeps the capture's gaps between packets
    /// (default: as fast as the queue takes them, or -r).
    #[arg(long, value_name = "original", requires = "file", value_parser = ["original"])]
    timing: Option<String>,

    /// Spread the packets over N distinct UDP flows (IPv4 addresses in
    /// 10.0.0.0/8 and ports from a generator seeded with --seed), in pairs:
    /// one packet of a flow's forward direction, one back, then the next
    /// flow; any 2N packets in a row carry both directions of every flow.
    #[arg(long, value_name = "N", conflicts_with = "file",
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    flows: Option<u32>,

    /// With --flows: the generator's seed (the same seed, the same flows).
    #[arg(long, value_name = "S", default_value_t = 1, requires = "flows")]
    seed: u64,

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

fn check_rate(args: &Args) -> Result<(), String> {
    if let Some(r) = args.rate {
        if !(r > 0.0 && r.is_finite()) {
            return Err(format!(
                "-r {r} is not a rate: give packets per second above 0"
            ));
        }
    }
    Ok(())
}

/// Ends a run: waits for a guest device to complete what is in flight,
/// then prints the summary.
fn finish(
    args: &Args,
    tx: &mut zc::Tx,
    reporter: Reporter,
    start: Instant,
    (sent, bytes, drops): (u64, u64, u64),
) -> Result<(), String> {
    if !tx.flush(Duration::from_secs(5)) {
        return Err(format!(
            "{}: the device did not complete the last packets within 5 s{}",
            args.name,
            tx.failure().map_or(String::new(), |e| format!(": {e}"))
        ));
    }
    let elapsed = start.elapsed();
    drop(reporter);
    let summary = Summary::new(&args.name, sent, bytes, drops, elapsed);
    eprintln!("{}", summary.text());
    if args.common.json {
        println!("{}", summary.json());
    }
    Ok(())
}

fn run(args: &Args) -> Result<(), String> {
    check_rate(args)?;
    match &args.file {
        Some(file) => replay(args, file),
        None => generate(args),
    }
}

/// Replays a capture file `-n` times.
fn replay(args: &Args, path: &std::path::Path) -> Result<(), String> {
    // The file is checked before the queue is opened: a bad file changes
    // nothing in the cluster.
    let mut reader = CaptureReader::open(path).map_err(|e| e.to_string())?;
    if let Some(core) = args.common.core {
        tool::pin_to_core(core).map_err(|e| format!("-g: {e}"))?;
    }
    let stop = tool::stop_on_signals();
    let mut tx = zc::open_tx_with(&args.name, &args.common.options()).map_err(|e| e.to_string())?;
    let max = tx.pool().layout().max_packet() as usize;
    let mut hand = tx
        .take_buffers(BURST)
        .map_err(|e| format!("{}: {e}", args.name))?;
    let counters = Arc::new(Counters::default());
    let reporter = Reporter::start(counters.clone());
    let loops = match args.count {
        Some(0) => u64::MAX,
        Some(n) => n,
        None => 1,
    };
    let original = args.timing.is_some();
    let pool = tx.pool().clone();
    let start = Instant::now();
    let (mut sent, mut bytes, mut empty) = (0u64, 0u64, 0u64);
    let mut pending = 0usize;
    let mut pending_bytes = 0u64;
    // What a broken file ends with; what came before it is sent first.
    let mut failed = None;
    'loops: for l in 0..loops {
        if l > 0 {
            reader = CaptureReader::open(path).map_err(|e| e.to_string())?;
        }
        let loop_start = Instant::now();
        let mut first_ts = None;
        loop {
            if stop.load(Ordering::Relaxed) {
                break 'loops;
            }
            let number = reader.packets() + 1;
            let Some(frame) = (match reader.next_frame() {
                Ok(f) => f,
                Err(e) => {
                    failed = Some(e.to_string());
                    break 'loops;
                }
            }) else {
                break;
            };
            if frame.data.is_empty() {
                // A queue slot of length 0 is an empty buffer: nothing to send.
                empty += 1;
                continue;
            }
            if frame.data.len() > max {
                failed = Some(format!(
                    "{}: packet {} is {} bytes, more than the {max} a buffer of {} holds \
                     (start the cluster with a larger zc-hostd --buf-size)",
                    path.display(),
                    number,
                    frame.data.len(),
                    args.name
                ));
                break 'loops;
            }
            let due = if original {
                let first = *first_ts.get_or_insert(frame.timestamp);
                Some(loop_start + frame.timestamp.saturating_sub(first))
            } else {
                args.rate.map(|pps| {
                    start + Duration::from_secs_f64((sent + pending as u64) as f64 / pps)
                })
            };
            if let Some(due) = due {
                if due > Instant::now() {
                    let n = tool::send_all(&mut tx, &mut hand[..pending], stop, &args.name)?;
                    sent += n as u64;
                    bytes += pending_bytes;
                    pending = 0;
                    pending_bytes = 0;
                    counters.publish(sent, bytes);
                    wait_until(due, stop);
                }
            }
            let len = frame.data.len();
            pool.packet_mut(&mut hand[pending])
                .fill(frame.data)
                .map_err(|e| format!("{}: {e}", args.name))?;
            pending += 1;
            pending_bytes += len as u64;
            if pending == BURST {
                let n = tool::send_all(&mut tx, &mut hand[..pending], stop, &args.name)?;
                sent += n as u64;
                bytes += pending_bytes;
                pending = 0;
                pending_bytes = 0;
                counters.publish(sent, bytes);
            }
        }
    }
    let n = tool::send_all(&mut tx, &mut hand[..pending], stop, &args.name)?;
    if n == pending {
        bytes += pending_bytes;
    }
    sent += n as u64;
    if let Some(e) = failed {
        // Whatever went is delivered; the line says where the file broke.
        let _ = tx.flush(Duration::from_secs(5));
        drop(reporter);
        return Err(e);
    }
    finish(args, &mut tx, reporter, start, (sent, bytes, empty))
}

/// Sleeps, then spins, until `due` (or a stop signal).
fn wait_until(due: Instant, stop: &AtomicBool) {
    loop {
        let now = Instant::now();
        if now >= due || stop.load(Ordering::Relaxed) {
            return;
        }
        let left = due - now;
        if left > Duration::from_micros(500) {
            std::thread::sleep((left - Duration::from_micros(200)).min(IDLE_SLEEP));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Sends generated test packets.
fn generate(args: &Args) -> Result<(), String> {
    if args.len < MIN_LEN {
        return Err(format!(
            "-l {} is too short: packets are at least {MIN_LEN} bytes",
            args.len
        ));
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
    let flows = args.flows.map(|n| Flows::new(n as usize, args.seed));
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
    let pool = tx.pool().clone();
    while sent < limit && !stop.load(Ordering::Relaxed) {
        let want = pacer.allowance(sent, BURST.min((limit - sent) as usize));
        if want == 0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        match &flows {
            Some(f) => {
                for (i, h) in hand[..want].iter_mut().enumerate() {
                    template.stamp_flow(&mut pool.packet_mut(h), sent + i as u64, f);
                }
            }
            None => {
                for (i, h) in hand[..want].iter_mut().enumerate() {
                    template.stamp(&mut pool.packet_mut(h), sent + i as u64);
                }
            }
        }
        let done = tool::send_all(&mut tx, &mut hand[..want], stop, &args.name)?;
        // The buffers just swapped in are written next round: start fetching.
        for h in &hand[..done] {
            pool.prefetch(h);
        }
        sent += done as u64;
        counters.publish(sent, sent * args.len as u64);
    }
    // A guest device stops when closed: let it finish what is in flight.
    finish(
        args,
        &mut tx,
        reporter,
        start,
        (sent, sent * args.len as u64, 0),
    )
}
