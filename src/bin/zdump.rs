//! zdump: writes the packets arriving on a zc queue to a pcap file or stdout.

use clap::Parser;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use zc::capture::CaptureWriter;
use zc::tool::{self, CommonArgs, Counters, Reporter, Summary, BURST, IDLE_POLLS, IDLE_SLEEP};
use zc::{QueueEnd, Receiver};

#[derive(Parser, Debug)]
#[command(
    name = "zdump",
    version,
    about = "Write the packets arriving on a zc queue to a pcap file",
    long_about = "Write the packets arriving on a zc queue to a pcap file (nanosecond \
timestamps, Ethernet link type) that tcpdump, tshark and Wireshark open; `-w -` streams \
the capture to stdout, e.g. into `tshark -r -`. Each packet is copied out of its pool \
buffer once, into the file's buffer, and the buffer goes back to the queue.\n\n\
Names: zc:<cluster>@<queue> is queue <queue> of the cluster that `zc-hostd -c <cluster>` \
serves (e.g. zc:99@0). One process consumes a queue at a time. Inside a VM the same name \
opens the zc virtio-net device that exports the queue; --vhost-user PATH runs that guest \
driver over the export's vhost-user socket without a VM.\n\n\
Once a second zdump prints PF_RING-style `Absolute Stats` and `Actual Stats` lines to \
stderr. It stops after -c packets, after -t seconds, or on Ctrl-C, and prints a summary \
(and with --json, when the capture goes to a file, one JSON line on stdout). A write \
that fails (a full disk) ends it with one line and a non-zero exit.",
    after_help = "Examples:\n  zdump -i zc:99@0 -w day.pcap               # until Ctrl-C\n  zdump -i zc:99@0 -w - -c 100 | tshark -r -  # 100 packets into tshark\n  zdump -i zc:99@1 -w head.pcap -s 128       # keep the first 128 bytes of each"
)]
struct Args {
    /// Queue to capture, e.g. zc:99@0.
    #[arg(short = 'i', value_name = "NAME")]
    name: String,

    /// Where the capture goes: a file (created or truncated), or - for stdout.
    #[arg(short = 'w', value_name = "FILE|-")]
    write: PathBuf,

    /// Stop after COUNT packets.
    #[arg(short = 'c', value_name = "COUNT")]
    count: Option<u64>,

    /// Keep at most SNAPLEN bytes of each packet (the file notes each
    /// packet's full length).
    #[arg(short = 's', value_name = "SNAPLEN", default_value_t = 262_144,
          value_parser = clap::value_parser!(u32).range(1..=262_144))]
    snaplen: u32,

    /// Stop after SECONDS seconds.
    #[arg(short = 't', value_name = "SECONDS")]
    seconds: Option<f64>,

    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tool::exit("zdump", run(&args))
}

/// Where packets go; the name is what an error line calls it.
fn output(path: &PathBuf) -> Result<(Box<dyn Write>, String), String> {
    if path.as_os_str() == "-" {
        return Ok((Box::new(io::stdout().lock()), "stdout".into()));
    }
    let f = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((Box::new(f), path.display().to_string()))
}

enum Failure {
    Write(io::Error),
    Queue(String),
}

fn run(args: &Args) -> Result<(), String> {
    let deadline = match args.seconds {
        Some(s) if s > 0.0 && s.is_finite() => Some(Duration::from_secs_f64(s)),
        Some(s) => return Err(format!("-t {s} is not a duration: give seconds above 0")),
        None => None,
    };
    let to_stdout = args.write.as_os_str() == "-";
    if to_stdout && args.common.json {
        return Err(
            "--json prints to stdout, which -w - fills with the capture: write to a file or drop --json"
                .into(),
        );
    }
    if let Some(core) = args.common.core {
        tool::pin_to_core(core).map_err(|e| format!("-g: {e}"))?;
    }
    let stop = tool::stop_on_signals();
    let mut rx = zc::open_rx_with(&args.name, &args.common.options()).map_err(|e| e.to_string())?;
    let (out, out_name) = output(&args.write)?;
    let write_err = |e: io::Error| format!("{out_name}: cannot write the capture: {e}");
    let mut cap = CaptureWriter::new(out, args.snaplen).map_err(write_err)?;
    let write_err = Failure::Write;
    let mut hand = rx
        .take_buffers(BURST)
        .map_err(|e| format!("{}: {e}", args.name))?;
    let counters = Arc::new(Counters::default());
    let reporter = Reporter::start(counters.clone());
    let limit = args.count.unwrap_or(u64::MAX);
    let pool = rx.pool().clone();
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let (mut packets, mut bytes) = (0u64, 0u64);
    let mut idle = 0u32;
    let mut dirty = false;
    let mut data = vec![0u8; pool.layout().max_packet() as usize];
    // A reader that went away (`| head`) ends the capture, not an error.
    let mut reader_gone = false;
    let result = (|| -> Result<(), Failure> {
        while packets < limit && !stop.load(Ordering::Relaxed) {
            let want = BURST.min((limit - packets) as usize);
            let n = rx.recv_burst(&mut hand[..want]);
            if n == 0 {
                // Nothing waiting: what is buffered goes out now, so a
                // reader of the stream sees packets as they arrive.
                if dirty {
                    cap.flush().map_err(write_err)?;
                    dirty = false;
                }
                idle += 1;
                if idle > IDLE_POLLS {
                    if let Some(e) = rx.failure() {
                        return Err(Failure::Queue(format!("{}: {e}", args.name)));
                    }
                    rx.wait_recv(IDLE_SLEEP);
                }
                if deadline.is_some_and(|d| start.elapsed() >= d) {
                    break;
                }
                continue;
            }
            idle = 0;
            first.get_or_insert_with(Instant::now);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            for h in &hand[..n] {
                let p = pool.packet(h);
                let len = p.read_at(0, &mut data);
                cap.write(now, &data[..len]).map_err(write_err)?;
                bytes += len as u64;
            }
            dirty = true;
            packets += n as u64;
            counters.publish(packets, bytes);
            if deadline.is_some_and(|d| start.elapsed() >= d) {
                break;
            }
        }
        cap.flush().map_err(write_err)
    })();
    match result {
        Ok(()) => {}
        Err(Failure::Write(e)) if to_stdout && e.kind() == io::ErrorKind::BrokenPipe => {
            reader_gone = true
        }
        Err(Failure::Write(e)) => return Err(format!("{out_name}: cannot write the capture: {e}")),
        Err(Failure::Queue(e)) => return Err(e),
    }
    let elapsed = first.map_or(Duration::ZERO, |t| t.elapsed());
    drop(reporter);
    let summary = Summary::new(&args.name, packets, bytes, 0, elapsed);
    eprintln!("{}", summary.text());
    if reader_gone {
        eprintln!("zdump: stdout closed by its reader: capture ended");
    }
    if args.common.json {
        println!("{}", summary.json());
    }
    Ok(())
}
