//! zbridge: moves packets from a queue of one cluster to a queue of another,
//! copying each once: the only way a packet crosses a trust domain.

use clap::Parser;
use serde::Serialize;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zc::tool::{self, Counters, Reporter, Summary, BURST, IDLE_POLLS, IDLE_SLEEP};
use zc::{QueueEnd, Receiver};

#[derive(Parser, Debug)]
#[command(
    name = "zbridge",
    version,
    about = "Copy packets from a queue of one cluster into a queue of another",
    long_about = "Copy packets from a queue of one zc cluster into a queue of another: the \
one copy at the boundary between two trust domains. A cluster is a trust domain: every \
process and VM attached to it can read and modify every buffer of its pool, and nothing \
of another cluster. zbridge attaches to both (as the consumer of -i and the producer of \
-o), copies each packet into a buffer of the destination pool and hands the source buffer \
back to its queue with the next receive, so neither side ever sees the other's memory.\n\n\
When the destination queue is full zbridge waits (the source queue backs up; nothing is \
lost). A packet longer than the destination's buffers hold is dropped and counted. Once \
a second it prints PF_RING-style `Absolute Stats` and `Actual Stats` lines to stderr \
(packets and bytes copied); it stops after -c packets, after -t seconds, or on Ctrl-C, and \
prints a summary (with --json one JSON line on stdout: input, output, packets, bytes, \
drops, seconds, pps, gbps).",
    after_help = "Examples:\n  zbridge -i zc:99@3 -o zc:100@0              # until Ctrl-C\n  zbridge -i zc:99@3 -o zc:100@0 -c 1000 --json\n  zbridge -i zc:99@3 -o zc:100@0 -g 1         # the copy loop on core 1"
)]
struct Args {
    /// Queue to consume from, e.g. zc:99@3.
    #[arg(short = 'i', value_name = "NAME")]
    input: String,

    /// Queue to produce into, e.g. zc:100@0 (usually of another cluster).
    #[arg(short = 'o', value_name = "NAME")]
    output: String,

    /// Stop after COUNT packets copied.
    #[arg(short = 'c', value_name = "COUNT")]
    count: Option<u64>,

    /// Stop after SECONDS seconds.
    #[arg(short = 't', value_name = "SECONDS", value_parser = tool::parse_seconds)]
    seconds: Option<Duration>,

    /// Pin the copy loop to this CPU core.
    #[arg(short = 'g', value_name = "CORE")]
    core: Option<usize>,

    /// If a name is not there yet (its cluster's daemon is starting),
    /// retry for up to SECONDS instead of failing at once.
    #[arg(long, value_name = "SECONDS", value_parser = tool::parse_seconds)]
    wait: Option<Duration>,

    /// Print the final summary as one JSON line on stdout.
    #[arg(long)]
    json: bool,
}

/// The JSON line: the two names and zcount's fields, over what was copied.
#[derive(Serialize)]
struct BridgeSummary<'a> {
    input: &'a str,
    output: &'a str,
    #[serde(flatten)]
    totals: &'a Summary,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tool::exit("zbridge", run(&args))
}

fn run(args: &Args) -> Result<(), String> {
    if args.input == args.output {
        return Err(format!(
            "-i and -o are both {}: give two different queues",
            args.input
        ));
    }
    if let Some(core) = args.core {
        tool::pin_to_core(core)?;
    }
    let stop = tool::stop_on_signals();
    let opts = zc::Options {
        wait: args.wait,
        ..zc::Options::default()
    };
    let mut rx = zc::open_rx_with(&args.input, &opts).map_err(|e| e.to_string())?;
    let mut tx = zc::open_tx_with(&args.output, &opts).map_err(|e| e.to_string())?;
    let mut src_hand = rx
        .take_buffers(BURST)
        .map_err(|e| format!("{}: {e}", args.input))?;
    let mut dst_hand = tx
        .take_buffers(BURST)
        .map_err(|e| format!("{}: {e}", args.output))?;
    let (src, dst) = (rx.pool().clone(), tx.pool().clone());
    let counters = Arc::new(Counters::default());
    let reporter = Reporter::start(counters.clone());
    let limit = args.count.unwrap_or(u64::MAX);
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let (mut packets, mut bytes, mut drops) = (0u64, 0u64, 0u64);
    let mut idle = 0u32;
    let mut polls = 0u32;
    while packets < limit && !stop.load(Ordering::Relaxed) {
        let want = BURST.min((limit - packets) as usize);
        let n = rx.recv_burst(&mut src_hand[..want]);
        if n == 0 {
            idle += 1;
            if idle > IDLE_POLLS {
                if let Some(e) = rx.failure() {
                    return Err(format!("{}: {e}", args.input));
                }
                rx.wait_recv(IDLE_SLEEP);
                if args.seconds.is_some_and(|d| start.elapsed() >= d) {
                    break;
                }
            }
            continue;
        }
        idle = 0;
        first.get_or_insert_with(Instant::now);
        // The one copy: source buffer to destination buffer. The source
        // buffers stay in this hand only until the next receive swaps them
        // back into their queue.
        let mut lens = [0u64; BURST];
        let mut filled = 0;
        for h in &src_hand[..n] {
            let pkt = src.packet(h);
            match dst.packet_mut(&mut dst_hand[filled]).copy_from(&pkt) {
                Ok(()) => {
                    lens[filled] = pkt.len() as u64;
                    filled += 1;
                }
                Err(_) => drops += 1,
            }
        }
        let sent = tool::send_all(&mut tx, &mut dst_hand[..filled], stop, &args.output)?;
        packets += sent as u64;
        // Stopped while the destination was full: what did not go was not
        // copied across.
        bytes += lens[..sent].iter().sum::<u64>();
        if sent < filled {
            break;
        }
        counters.publish(packets, bytes);
        counters.drops.store(drops, Ordering::Relaxed);
        polls = polls.wrapping_add(1);
        if polls % 256 == 0 && args.seconds.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
    }
    if !tx.flush(Duration::from_secs(5)) {
        return Err(format!(
            "{}: the device did not complete the last packets within 5 s",
            args.output
        ));
    }
    let elapsed = first.map_or(Duration::ZERO, |t| t.elapsed());
    drop(reporter);
    let summary = Summary::new(
        &format!("{}>{}", args.input, args.output),
        packets,
        bytes,
        drops,
        elapsed,
    );
    eprintln!("{}", summary.text());
    if args.json {
        let line = BridgeSummary {
            input: &args.input,
            output: &args.output,
            totals: &summary,
        };
        println!(
            "{}",
            serde_json::to_string(&line).map_err(|e| e.to_string())?
        );
    }
    Ok(())
}
