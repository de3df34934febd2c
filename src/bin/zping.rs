//! zping: round-trip times through zc queues, and the reflector that sends
//! the probes back.

use clap::Parser;
use serde::Serialize;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use zc::latency::{Histogram, Rtt};
use zc::probe::{self, now_ns, Outstanding, Probe, Reply};
use zc::tool::{self, CommonArgs, Counters, Reporter, Summary, BURST, IDLE_SLEEP};
use zc::{BufferIndex, Direction, PoolView, QueueEnd, Receiver, Rx, Sender, Tx};

#[derive(Parser, Debug)]
#[command(
    name = "zping",
    version,
    about = "Measure round-trip times through zc queues, or reflect probes back",
    long_about = "Measure round-trip times through zc queues. zping sends probes (Ethernet/IPv4/UDP \
packets carrying a sequence number and their CLOCK_MONOTONIC send time) on NAME at -r probes per \
second and receives the replies on the -o queue; a reflector (`zping --reflect`) on the far side \
sends every probe back with its MAC addresses swapped, in the very buffer it arrived in.\n\n\
Names: zc:<cluster>@<queue> is queue <queue> of the cluster that `zc-hostd -c <cluster>` serves. \
A host queue carries one direction, so on the host zping needs -o: `zping -i zc:99@0 -o zc:99@1` \
sends into queue 0 and receives from queue 1, and `zping --reflect -i zc:99@0 -o zc:99@1` consumes \
queue 0 and produces into queue 1. Inside a VM (or with --vhost-user PATH, the guest driver \
without a VM) a zc virtio-net device carries both: without -o zping sends on the device of NAME \
and receives on the same device (zc:<cluster>@<queue> names it by what it sends into; the \
reflector names it by what it receives; zc:eth1 by interface).\n\n\
Waiting: by default zping busy-polls for replies between probes (one core at 100%), so the \
figure is the path's, not a wake-up's. --sleep waits in the transport's wait instead and so \
measures the interrupt path: the host queue's futex, the vhost-user call eventfd; a PCI device in \
a VM has no interrupts, so there it sleeps up to 1 ms at a time. The reflector busy-polls too \
and sleeps only after a second without packets (the first probe after that pays the wake-up); \
with --sleep it sleeps whenever its input is empty.\n\n\
Once a second zping prints PF_RING-style `Absolute Stats` (probes sent, replies received, lost) \
and `Actual Stats` (probe rate, and min/p50/p90/p99/p99.9/max round-trip time over that second) \
to stderr. After -c probes (or Ctrl-C) it waits up to --timeout for the replies still out, \
counts the rest as lost and prints a summary over the whole run (with --json one JSON line on \
stdout, with a log-linear histogram of the round-trip times). A reply later than --timeout is \
late and counts as lost.",
    after_help = "Examples:\n  zping --reflect -i zc:99@0 -o zc:99@1 &      # host reflector\n  zping -i zc:99@0 -o zc:99@1 -c 10000 -r 10000  # ten thousand probes, one second\n  zping -i zc:99@1 -c 1000                      # in a VM: through the device of queue 1\n  zping -i zc:99@1 --vhost-user /run/zc/vm1.sock -r 1000000 -c 5000000 --json -g 0"
)]
struct Args {
    /// Where probes go (with --reflect: where they come from), e.g. zc:99@0.
    #[arg(short = 'i', value_name = "NAME")]
    name: String,

    /// Where replies come back (with --reflect: where they go). Default: the
    /// same device as NAME, where the transport carries both directions.
    #[arg(short = 'o', value_name = "NAME")]
    other: Option<String>,

    /// Send COUNT probes (with --reflect: reflect COUNT packets), then stop.
    #[arg(short = 'c', value_name = "COUNT")]
    count: Option<u64>,

    /// Probes per second.
    #[arg(short = 'r', value_name = "PPS", default_value_t = 1000.0)]
    rate: f64,

    /// Probe length in bytes, 62 up to the cluster's buffer size minus 64.
    #[arg(short = 'l', value_name = "LEN", default_value_t = 64)]
    len: usize,

    /// A reply later than this is lost (and counted late); at the end zping
    /// waits this long for the replies still out.
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = tool::parse_seconds)]
    timeout: Duration,

    /// Wait in the transport's wait (interrupts) instead of busy-polling.
    #[arg(long)]
    sleep: bool,

    /// Be the reflector: send every packet received on NAME back on -o with
    /// its MAC addresses swapped, zero-copy.
    #[arg(long)]
    reflect: bool,

    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tool::exit("zping", run(&args))
}

fn run(args: &Args) -> Result<(), String> {
    if args.common.vhost_user.is_some() && args.other.is_some() {
        return Err(format!(
            "-o {}: --vhost-user PATH is one device, and zping sends and receives on it; leave out -o",
            args.other.as_deref().unwrap_or_default()
        ));
    }
    if let Some(core) = args.common.core {
        tool::pin_to_core(core).map_err(|e| format!("-g: {e}"))?;
    }
    if args.sleep {
        tool::wake_promptly();
    }
    let (rx, tx) = open(args)?;
    if args.reflect {
        reflect(args, rx, tx)
    } else {
        ping(args, rx, tx)
    }
}

/// The pool a queue end's handles point into, cloned once before the loop
/// (the clone keeps the mapping alive; packet access then counts nothing).
fn view(q: &impl QueueEnd) -> PoolView {
    q.pool().clone()
}

/// The receiving and the sending end: two names, or one device for both.
fn open(args: &Args) -> Result<(Rx, Tx), String> {
    let opts = args.common.options();
    let Some(other) = &args.other else {
        let by = if args.reflect {
            Direction::Rx
        } else {
            Direction::Tx
        };
        return zc::open_duplex_with(&args.name, by, &opts).map_err(|e| match e {
            zc::Error::OneWay(_) => format!(
                "{}: a cluster queue on this host carries one direction; give the queue the {} with -o (e.g. -o {})",
                args.name,
                if args.reflect { "replies go into" } else { "replies come back on" },
                other_queue_example(&args.name)
            ),
            e => e.to_string(),
        });
    };
    let (recv, send) = if args.reflect {
        (&args.name, other)
    } else {
        (other, &args.name)
    };
    let rx = zc::open_rx_with(recv, &opts).map_err(|e| e.to_string())?;
    // Both names on one device: the second open finds it held by this
    // very process.
    let tx = zc::open_tx_with(send, &opts).map_err(|e| match e {
        zc::Error::Guest {
            source: zc_guest::GuestError::Busy { what, pid },
            ..
        } if pid == std::process::id() => format!(
            "-i {} and -o {} lead to the same device ({what}), which carries both directions: leave out -o",
            args.name, other
        ),
        e => e.to_string(),
    })?;
    Ok((rx, tx))
}

/// `zc:99@1` for `zc:99@0` (anything else for other names).
fn other_queue_example(name: &str) -> String {
    match name.parse::<zc::Name>() {
        Ok(zc::Name::Queue { cluster, queue }) => {
            format!("zc:{}@{}", cluster.0, queue.0 ^ 1)
        }
        _ => "zc:99@1".into(),
    }
}

/// What the probe loop hands the reporter thread once a second.
struct Tick {
    sent: u64,
    received: u64,
    lost: u64,
    /// Probes sent in this second, and its length.
    sent_now: u64,
    secs: f64,
    /// Round-trip times of this second; comes back cleared.
    rtt: Box<Histogram>,
}

/// Prints the once-a-second lines from its own thread, so that formatting
/// percentiles never delays a reply.
struct TickPrinter {
    ticks: Option<mpsc::Sender<Tick>>,
    empties: mpsc::Receiver<Box<Histogram>>,
    thread: Option<JoinHandle<()>>,
}

impl TickPrinter {
    fn start() -> TickPrinter {
        let (ticks, rx) = mpsc::channel::<Tick>();
        let (back, empties) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            for mut t in rx {
                let rtt = match t.rtt.rtt() {
                    Some(r) => format!("RTT {}", r.text()),
                    None => "no replies".into(),
                };
                eprintln!(
                    "=========================\n\
                     Absolute Stats: {} pkts sent, {} received ({} lost)\n\
                     Actual Stats: {:.2} pps - {rtt}\n\
                     =========================",
                    t.sent,
                    t.received,
                    t.lost,
                    t.sent_now as f64 / t.secs.max(1e-9),
                );
                t.rtt.clear();
                let _ = back.send(t.rtt);
            }
        });
        TickPrinter {
            ticks: Some(ticks),
            empties,
            thread: Some(thread),
        }
    }

    fn send(&self, tick: Tick) {
        if let Some(t) = &self.ticks {
            let _ = t.send(tick);
        }
    }

    /// An empty histogram for the next second: last second's but one,
    /// cleared by the printer (a new one only if it has not caught up).
    fn empty(&self) -> Box<Histogram> {
        self.empties.try_recv().unwrap_or_default()
    }
}

impl Drop for TickPrinter {
    fn drop(&mut self) {
        self.ticks = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The end result of a probe run, printed as one JSON line with --json.
#[derive(Serialize)]
struct PingSummary {
    name: String,
    reply_name: String,
    len: usize,
    rate: f64,
    sent: u64,
    received: u64,
    lost: u64,
    /// Replies after --timeout (counted lost).
    late: u64,
    duplicates: u64,
    /// Packets on the reply queue that are not this run's reflected probes.
    bad: u64,
    /// Probes not sent because the outgoing queue took nothing for a whole
    /// --timeout (the reflector gone): not counted in `sent`.
    skipped: u64,
    /// Replies that came back in the very buffer their probe left in: the
    /// whole round trip was zero-copy.
    same_buffer: u64,
    seconds: f64,
    pps: f64,
    rtt_ns: Option<Rtt>,
    /// Non-empty buckets `[lo, hi, count]`: count replies took lo..=hi ns.
    histogram: Vec<[u64; 3]>,
}

impl PingSummary {
    fn text(&self) -> String {
        let rtt = match &self.rtt_ns {
            Some(r) => format!("RTT {}", r.text()),
            None => "no replies".into(),
        };
        let mut s = format!(
            "=========================\n\
             Absolute Stats: {} pkts sent, {} received ({} lost)\n\
             Total: {} pkts in {:.3} s: {:.2} pps - {rtt}",
            self.sent, self.received, self.lost, self.sent, self.seconds, self.pps
        );
        if self.received > 0 {
            s.push_str(&format!(
                "\nZero-copy: {} of {} replies came back in the buffer their probe left in",
                self.same_buffer, self.received
            ));
        }
        if self.skipped > 0 {
            s.push_str(&format!(
                "\nSkipped: {} probes not sent: the outgoing queue took nothing for --timeout (is the reflector running?)",
                self.skipped
            ));
        }
        if self.late + self.duplicates + self.bad > 0 {
            s.push_str(&format!(
                "\nReplies: {} late (after --timeout), {} duplicates, {} not this run's probes",
                self.late, self.duplicates, self.bad
            ));
        }
        s.push_str("\n=========================");
        s
    }
}

/// When probes are due: slot k at `start + k * interval`. A backlog (zping
/// was descheduled) goes out a burst per pass. Probes that do not fit into
/// the outgoing queue stay due; when nothing could be sent for a whole
/// timeout (the reflector is gone and its queue full) the due slots are
/// skipped, so that a run always ends on time.
struct Schedule {
    interval: f64,
    start: u64,
    /// Slots used: probes sent plus skipped.
    slots: u64,
    skipped: u64,
    /// Since when the outgoing queue took nothing.
    blocked_since: Option<u64>,
}

impl Schedule {
    fn new(rate: f64, start: u64) -> Schedule {
        Schedule {
            interval: 1e9 / rate,
            start,
            slots: 0,
            skipped: 0,
            blocked_since: None,
        }
    }

    /// Slots due by `now`, at most `left` more than used.
    #[inline(always)]
    fn backlog(&self, now: u64, left: u64) -> u64 {
        let since = now.saturating_sub(self.start) as f64;
        let due = (since / self.interval) as u64 + 1;
        due.saturating_sub(self.slots).min(left)
    }

    /// How many probes to send now: the backlog, at most a burst.
    #[inline(always)]
    fn take(&self, now: u64, left: u64) -> usize {
        self.backlog(now, left).min(BURST as u64) as usize
    }

    /// `n` of the probes taken went out at `now`.
    #[inline(always)]
    fn sent(&mut self, n: usize, now: u64, timeout: u64, left: u64) {
        if n > 0 {
            self.slots += n as u64;
            self.blocked_since = None;
            return;
        }
        match self.blocked_since {
            None => self.blocked_since = Some(now),
            Some(t) if now - t >= timeout => {
                let skip = self.backlog(now, left);
                self.skipped += skip;
                self.slots += skip;
                self.blocked_since = Some(now);
            }
            Some(_) => {}
        }
    }

    /// When the next slot is due.
    fn next_due(&self) -> u64 {
        self.start + (self.slots as f64 * self.interval) as u64
    }
}

/// A run id that differs between runs: time and pid, mixed.
fn run_id() -> u32 {
    let x = (now_ns() ^ (u64::from(std::process::id()) << 40)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 32) as u32
}

fn ping(args: &Args, mut rx: Rx, mut tx: Tx) -> Result<(), String> {
    let send_name = args.name.clone();
    let reply_name = args.other.clone().unwrap_or_else(|| args.name.clone());
    if args.len < probe::MIN_LEN {
        return Err(format!(
            "-l {} is too short: probes are at least {} bytes",
            args.len,
            probe::MIN_LEN
        ));
    }
    let max = tx.pool().layout().max_packet() as usize;
    if args.len > max {
        return Err(format!(
            "-l {} is too long: {send_name} has {}-byte buffers, so probes are {}..={max} bytes",
            args.len,
            tx.pool().layout().buf_size,
            probe::MIN_LEN
        ));
    }
    if !(args.rate > 0.0 && args.rate <= 1e8) {
        return Err(format!(
            "-r {} is not a probe rate: give probes per second above 0, at most 100000000",
            args.rate
        ));
    }
    let timeout = args.timeout.as_nanos().max(1) as u64;
    let stop = tool::stop_on_signals();
    let probe = Probe::new(args.len, run_id());
    let mut out_hand = tx
        .take_buffers(BURST)
        .map_err(|e| format!("{send_name}: {e}"))?;
    let mut in_hand = rx
        .take_buffers(BURST)
        .map_err(|e| format!("{reply_name}: {e}"))?;
    let (out_pool, in_pool) = (view(&tx), view(&rx));
    // The window holds every probe that can be out within the timeout.
    let mut out = Outstanding::new((args.rate * args.timeout.as_secs_f64() * 2.0) as u64 + 64);
    let mut total = Histogram::default();
    let printer = TickPrinter::start();
    let mut second: Box<Histogram> = Box::default();
    let limit = args.count.unwrap_or(u64::MAX);
    let start = now_ns();
    let mut sched = Schedule::new(args.rate, start);
    let (mut bad, mut same, mut last_sent) = (0u64, 0u64, start);
    let (mut tick_at, mut tick_sent) = (start, 0u64);
    // Set once no more probes go out: the replies still out have until then.
    let mut end_by: Option<u64> = None;
    loop {
        let now = now_ns();
        match end_by {
            None if sched.slots >= limit || stop.load(Ordering::Relaxed) => {
                end_by = Some(last_sent + timeout);
            }
            None => {
                let want = sched.take(now, limit - sched.slots);
                if want > 0 {
                    let seq = out.sent();
                    let mut left_in = [BufferIndex::new(0); BURST];
                    for (i, h) in out_hand[..want].iter_mut().enumerate() {
                        probe.stamp(&mut out_pool.packet_mut(h), seq + i as u64, now);
                        left_in[i] = h.index();
                    }
                    // What does not fit is due again at the next pass.
                    let n = tx.send_burst(&mut out_hand[..want]);
                    if n > 0 {
                        out.on_sent(&left_in[..n], now);
                        last_sent = now;
                    }
                    sched.sent(n, now, timeout, limit - sched.slots);
                }
            }
            Some(t) if out.in_flight() == 0 || now >= t => break,
            Some(_) => {}
        }
        let n = rx.recv_burst(&mut in_hand);
        if n > 0 {
            let at = now_ns();
            for h in &in_hand[..n] {
                match probe.parse(&in_pool.packet(h)) {
                    Reply::Probe { seq, sent } => {
                        if let Some(b) = out.on_reply(seq) {
                            let rtt = at.saturating_sub(sent);
                            total.record(rtt);
                            second.record(rtt);
                            same += u64::from(b == h.index());
                        }
                    }
                    Reply::Bad => bad += 1,
                }
            }
        } else if args.sleep {
            let until = match end_by {
                Some(t) => t,
                None => sched.next_due(),
            };
            let now = now_ns();
            if until > now {
                rx.wait_recv(Duration::from_nanos(until - now).min(IDLE_SLEEP));
            }
        }
        if now >= tick_at + 1_000_000_000 {
            if let Some(e) = rx.failure().or_else(|| tx.failure()) {
                return Err(format!("{send_name}: {e}"));
            }
            let tick = Tick {
                sent: out.sent(),
                received: out.received,
                lost: out.lost,
                sent_now: out.sent() - tick_sent,
                secs: (now - tick_at) as f64 / 1e9,
                rtt: std::mem::replace(&mut second, printer.empty()),
            };
            printer.send(tick);
            tick_at = now;
            tick_sent = out.sent();
        }
        out.expire(now.saturating_sub(timeout));
    }
    let seconds = (last_sent.max(start) - start) as f64 / 1e9;
    drop(printer);
    out.finish();
    let summary = PingSummary {
        name: send_name,
        reply_name,
        len: args.len,
        rate: args.rate,
        sent: out.sent(),
        received: out.received,
        lost: out.lost,
        late: out.late,
        duplicates: out.duplicates,
        bad: bad + out.bogus,
        skipped: sched.skipped,
        same_buffer: same,
        seconds,
        pps: if seconds > 0.0 {
            out.sent().saturating_sub(1) as f64 / seconds
        } else {
            0.0
        },
        rtt_ns: total.rtt(),
        histogram: total.buckets(),
    };
    eprintln!("{}", summary.text());
    if args.common.json {
        println!(
            "{}",
            serde_json::to_string(&summary).expect("summary serialises")
        );
    }
    Ok(())
}

/// A reflector busy-polls for this long after its last packet before it
/// sleeps in the queue's wait.
const REFLECT_SPIN_NS: u64 = 1_000_000_000;

fn reflect(args: &Args, mut rx: Rx, mut tx: Tx) -> Result<(), String> {
    let stop = tool::stop_on_signals();
    let mut hand = rx
        .take_buffers(BURST)
        .map_err(|e| format!("{}: {e}", args.name))?;
    let pool = view(&rx);
    let counters = Arc::new(Counters::default());
    let reporter = Reporter::start(counters.clone());
    let limit = args.count.unwrap_or(u64::MAX);
    let (mut packets, mut bytes, mut runts) = (0u64, 0u64, 0u64);
    let mut first: Option<u64> = None;
    let mut last = now_ns();
    let mut polls = 0u32;
    while packets < limit && !stop.load(Ordering::Relaxed) {
        let want = BURST.min((limit - packets) as usize);
        let n = rx.recv_burst(&mut hand[..want]);
        if n == 0 {
            polls = polls.wrapping_add(1);
            if args.sleep || polls % 1024 == 0 && now_ns() - last > REFLECT_SPIN_NS {
                if let Some(e) = rx.failure().or_else(|| tx.failure()) {
                    return Err(format!("{}: {e}", args.name));
                }
                rx.wait_recv(IDLE_SLEEP);
            }
            continue;
        }
        // Swap in place; runts (no room for two MACs) stay in the hand,
        // behind the packets that go back out.
        let mut k = 0;
        for i in 0..n {
            let len = hand[i].len() as usize;
            if pool.packet_mut(&mut hand[i]).swap_macs() {
                bytes += len as u64;
                hand.swap(i, k);
                k += 1;
            } else {
                runts += 1;
            }
        }
        let mut done = 0;
        let mut idle = 0u32;
        while done < k {
            let m = tx.send_burst(&mut hand[done..k]);
            done += m;
            if m == 0 {
                idle += 1;
                if idle > tool::IDLE_POLLS {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Some(e) = tx.failure() {
                        return Err(format!(
                            "{}: {e}",
                            args.other.as_ref().unwrap_or(&args.name)
                        ));
                    }
                    tx.wait_send(IDLE_SLEEP);
                }
            }
        }
        last = now_ns();
        first.get_or_insert(last);
        packets += done as u64;
        counters.publish(packets, bytes);
        counters.drops.store(runts, Ordering::Relaxed);
    }
    // A guest device stops when closed: let the last replies leave.
    let _ = tx.flush(Duration::from_secs(1));
    drop(reporter);
    let elapsed = Duration::from_nanos(first.map_or(0, |f| last - f));
    let summary = Summary::new(&args.name, packets, bytes, runts, elapsed);
    eprintln!("{}", summary.text());
    if args.common.json {
        println!("{}", summary.json());
    }
    Ok(())
}
